"""`compress generate`: try a model or checkpoint in one command. Streams a greedy completion of a prompt and
reports the prefill and decode speed (tokens per second) and the peak memory, with the kernel each layer runs.

Protocol of the numbers printed: batch 1, greedy decoding with the KV cache, the prompt as tokenized (chat-templated
with --chat), prefill = the prompt's forward pass and its first new token, decode = the steps after it; one run, no
warm-up (a first call includes one-off costs; `bench/inference_speed.py` reports medians after a warm-up). With
--compile the decode runs a static KV cache and a compiled one-token step; the compile is reported on its own.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

import torch

from compress.core.errors import ConfigError
from compress.evals.compiled_decode import StaticDecoder
from compress.evals.efficiency import greedy_decode, host_peak_rss, kernel_report, reset_host_peak
from compress.sources.models import load_model, resolve_device, resolve_dtype, resolve_source


def generate(model: str, prompt: str, *, max_new_tokens: int = 128, chat: bool = False, dtype: str = "auto",
             device: str = "auto", threads: int | None = None, compile: bool = False,
             write: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate up to `max_new_tokens` after `prompt`, streaming the text to `write`; returns the text and speeds.
    `compile`: a static KV cache and a torch.compile'd decode step (compress.evals.compiled_decode); the first
    compiled step is timed apart (`compile_seconds`) and left out of the decode speed."""
    if not prompt:
        raise ConfigError("--prompt is empty; give the text to complete")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens!r} is out of range; allowed: >= 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads!r} is out of range; allowed: >= 1")
    dev = resolve_device(device)
    resolve_dtype(dtype)
    resolve_source(model)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = load_model(model, dtype=dtype, device="cpu")
    m, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise ConfigError(f"model {model!r} has no tokenizer files; cannot generate from text")
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ConfigError(f"--chat: the tokenizer of {model!r} has no chat template; drop --chat")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    max_pos = getattr(m.config, "max_position_embeddings", None)
    if max_pos and ids.shape[1] + max_new_tokens > max_pos:
        raise ConfigError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's "
                          f"{max_pos} positions")
    m.to(dev)
    ids = ids.to(dev)
    load_seconds = time.perf_counter() - t0
    shown = ""
    tokens: list[int] = []

    def on_token(t: int) -> None:
        nonlocal shown
        tokens.append(t)
        text = tok.decode(tokens, skip_special_tokens=True)
        if write and text.startswith(shown) and len(text) > len(shown):
            write(text[len(shown):])
            shown = text
        elif write and not text.startswith(shown):  # a multi-byte character completed differently: resync
            shown = text

    reset_host_peak()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    decoder = StaticDecoder(m, ids.shape[1] + max_new_tokens, compile=True) if compile else None
    with torch.no_grad():
        if decoder is None:
            new, prefill_s, decode_s = greedy_decode(m, ids, max_new_tokens, eos_token_id=tok.eos_token_id,
                                                     on_token=on_token)
            timed_steps = len(new) - 1
        else:
            new, prefill_s, decode_s = decoder.generate(ids, max_new_tokens, eos_token_id=tok.eos_token_id,
                                                        on_token=on_token)
            timed_steps = decoder.timed_steps
    text = tok.decode(new, skip_special_tokens=True)
    if write and len(text) > len(shown):
        write(text[len(shown):])
    kernels = kernel_report(m)
    return {
        "model": loaded.name, "prompt_tokens": int(ids.shape[1]), "new_tokens": len(new), "text": text,
        "prefill_seconds": prefill_s, "decode_seconds": decode_s,
        "prefill_tokens_per_second": ids.shape[1] / prefill_s,
        "decode_tokens_per_second": timed_steps / decode_s if timed_steps > 0 and decode_s > 0 else None,
        "decode_steps": timed_steps, "compile_seconds": decoder.compile_seconds if decoder else None,
        "dequant_compile_seconds": decoder.dequant_compile_seconds if decoder else None,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else host_peak_rss(),
        "peak_memory_measure": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "process peak RSS (VmHWM)",
        "load_seconds": load_seconds, "device": str(dev), "threads": torch.get_num_threads(),
        "dtype": str(next(m.parameters()).dtype).replace("torch.", ""),
        "kernels": dict(Counter(kernels["per_layer"].values())),
        "protocol": {"batch": 1, "decode": "greedy with KV cache" + (
                         "; static KV cache, torch.compile'd one-token step, its first (compiling) step timed apart"
                         if compile else ""), "chat_template": chat, "runs": 1, "warmup": 0},
    }
