"""Efficiency of a model as it runs here: bytes on disk, bits per weight, memory, prefill and decode speed, and
whether its compressed layers run quantized kernels or dequantize their weights on the fly.

Protocol (stored with the numbers): batch 1, a prompt of `prompt_len` random token ids (fixed seed), greedy decode of
`decode_tokens` further tokens with the KV cache; one untimed warm-up, then the median of `repeats` timed runs.
Prefill tokens/s = prompt_len / prefill time (the prompt's forward pass and its first new token); decode tokens/s =
decode_tokens / the time of the `decode_tokens` steps after it.
Peak memory: on CUDA the peak bytes allocated by torch during the measurement (weights included); on the CPU the
process's peak resident set (VmHWM, reset before the measurement where the kernel allows), which also counts the
Python and torch runtime, so it is an upper bound of what the model needs.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from compress.core.errors import ConfigError
from compress.evals.perplexity import protocol_key
from compress.model.surgery import is_linear_like

log = logging.getLogger("compress")

# How each kind of linear layer computes, by class name (classes from optional packages are not imported here).
# A module may also say so itself with a `kernel` attribute: "quantized: ..." or "dequantize-on-the-fly: ...".
KNOWN_KERNELS = {
    "Linear": "dense: float matmul",
    "QuantLinear": "dequantize-on-the-fly: packed integer codes unpacked to the compute dtype every forward, then a float matmul",
    "Linear8bitLt": "quantized: bitsandbytes LLM.int8 int8 matmul with fp16 outlier columns",
    "W8A8Linear": "quantized: int8 x int8 -> int32 matmul (CPU with AMX-int8, calls of >= 256 rows: oneDNN's int8 GEMM "
                  "with the weight scale fused; else torch._int_mm or its exact fallback), per-token/tensor input "
                  "scales",
    "SparseLinear": "dense: float matmul over the weight with its zeros (no sparse kernel)",
    "SparseQuantLinear": "dequantize-on-the-fly: codes of the kept weights unpacked into a dense weight, then a float matmul",
    "OWQLinear": "dequantize-on-the-fly: packed codes plus float16 weak columns, then a float matmul",
    "Linear4bit": "dequantize-on-the-fly: bitsandbytes NF4/FP4 blocks dequantized to the compute dtype per forward",
}


def kernel_report(model: nn.Module) -> dict[str, Any]:
    """Count linear layers by how they compute. `quantized_kernels` is True only if every compressed layer runs
    integer (or other low-precision) kernels; False if any dequantizes on the fly; None if nothing is compressed."""
    kinds: Counter[str] = Counter()
    for mod in model.modules():
        if not is_linear_like(mod):
            continue
        name = type(mod).__name__
        kernel = getattr(mod, "kernel", None) or KNOWN_KERNELS.get(name) or f"unknown ({name})"
        kinds[f"{name}: {kernel}"] += 1
    compressed = {k: n for k, n in kinds.items() if ": dense" not in k}  # sparse layers run dense float matmuls
    if not compressed:
        verdict = None
    else:
        verdict = all(": quantized" in k for k in compressed)
    if verdict is None:
        summary = "no quantized layers: dense float kernels"
    elif verdict:
        summary = "compressed layers run quantized kernels"
    else:
        summary = "compressed layers dequantize their weights on the fly (float matmul; saves memory, not compute)"
    per_layer = {name: (getattr(mod, "kernel", None) or KNOWN_KERNELS.get(type(mod).__name__) or type(mod).__name__)
                 for name, mod in model.named_modules()
                 if (is_linear_like(mod) and name) or isinstance(getattr(mod, "kernel", None), str)}
    return {"layers": dict(kinds), "quantized_kernels": verdict, "summary": summary, "per_layer": per_layer}


def reset_host_peak() -> bool:
    """Reset this process's peak RSS (Linux: write 5 to /proc/self/clear_refs). False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_rss() -> int | None:
    """This process's peak resident set, VmHWM: its own address space's high-water mark. Not ru_maxrss (the fallback
    off Linux), which Linux carries across fork and exec: a worker forked by a bench starts with the parent's resident
    set as its ru_maxrss, which can hide a small peak under the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, *, eos_token_id: int | None = None,
                  on_token: Callable[[int], None] | None = None) -> tuple[list[int], float, float]:
    """Greedy generation with the KV cache, batch 1: (new token ids, prefill seconds, decode seconds). The prefill
    time covers the prompt's forward pass and its first token; the decode time the `new_tokens - 1` steps after it.
    Stops after `eos_token_id` (when given); `on_token` sees each token as it is chosen (streaming)."""
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    tokens = [int(nxt)]
    if on_token:
        on_token(tokens[-1])
    past = out.past_key_values
    while len(tokens) < new_tokens and (eos_token_id is None or tokens[-1] != eos_token_id):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(int(nxt))
        if on_token:
            on_token(tokens[-1])
    _sync(device)
    t2 = time.perf_counter()
    return tokens, t1 - t0, t2 - t1


def _one_run(model: nn.Module, prompt: torch.Tensor, decode_tokens: int, decoder=None) -> tuple[float, float]:
    """(prefill seconds, seconds per decoded token) of one greedy generation with the KV cache (a dynamic one, or
    the static cache and compiled step of `decoder`, a compress.evals.compiled_decode.StaticDecoder)."""
    if decoder is None:
        tokens, prefill, decode = greedy_decode(model, prompt, decode_tokens + 1)
        return prefill, decode / max(len(tokens) - 1, 1)
    tokens, prefill, decode = decoder.generate(prompt, decode_tokens + 1)
    return prefill, decode / max(decoder.timed_steps, 1)


@torch.no_grad()
def measure_speed(model: nn.Module, *, prompt_len: int = 256, decode_tokens: int = 32, repeats: int = 3,
                  seed: int = 0, compile: bool = False) -> dict[str, Any]:
    """Prefill and decode tokens per second of `model` on the device it is on, and the peak memory meanwhile.
    `compile`: decode with a static KV cache and a torch.compile'd one-token step (the prefill stays eager); the
    warm-up compiles it, and `compile_seconds` reports that first compiled step (compile + one token)."""
    if prompt_len < 1 or decode_tokens < 1 or repeats < 1:
        raise ConfigError(f"efficiency: prompt_len {prompt_len}, decode_tokens {decode_tokens} and repeats {repeats} "
                          f"must all be >= 1")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and prompt_len + decode_tokens > max_pos:
        raise ConfigError(f"efficiency: prompt_len + decode_tokens = {prompt_len + decode_tokens} exceeds the model's "
                          f"{max_pos} positions")
    param = next(model.parameters())
    device = param.device
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(device)
    was_training = model.training
    model.eval()
    host_reset = reset_host_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    decoder = None
    if compile:
        from compress.evals.compiled_decode import StaticDecoder

        decoder = StaticDecoder(model, prompt_len + decode_tokens, compile=True)
    _one_run(model, prompt, min(decode_tokens, 4), decoder)  # warm-up (allocator, kernels, compile), untimed
    runs = [_one_run(model, prompt, decode_tokens, decoder) for _ in range(repeats)]
    if was_training:
        model.train()
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    out: dict[str, Any] = {
        "prefill_tokens_per_second": round(prompt_len / prefill, 2),
        "decode_tokens_per_second": round(1.0 / decode, 2),
        "device": str(device),
        "dtype": str(param.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "protocol": {"batch": 1, "prompt_len": prompt_len, "decode_tokens": decode_tokens, "repeats": repeats,
                     "statistic": "median", "warmup": 1, "prompt": f"random token ids, seed {seed}",
                     "decode": "greedy with KV cache; the prefill includes the first new token"
                               + ("; static KV cache, torch.compile'd one-token step (dynamic=False), eager prefill"
                                  if compile else "")},
    }
    if decoder is not None:
        out["compile_seconds"] = round(decoder.compile_seconds, 2)
        out["dequant_compile_seconds"] = decoder.dequant_compile_seconds
        out["protocol"]["decode"] += "; compiled de-quantization in the prefill"
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_memory_measure"] = "torch.cuda.max_memory_allocated during the measurement (weights included)"
    else:
        out["peak_memory_bytes"] = host_peak_rss()
        out["peak_memory_measure"] = ("process peak RSS (VmHWM) during the measurement, Python and torch runtime included"
                                      if host_reset else "process peak RSS since start (VmHWM could not be reset)")
    if torch.cuda.is_available() and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def efficiency_metrics(model: nn.Module, *, prompt_len: int = 256, decode_tokens: int = 32, repeats: int = 3
                       ) -> dict[str, Any]:
    """The speed and memory numbers as metric records (value + protocol + protocol_key), as the runner stores
    perplexities: `prefill_tokens_per_second`, `decode_tokens_per_second`, `peak_memory_bytes`. The kernel kind
    rides along in each record (it explains the speed; it is not part of the protocol)."""
    kernels = kernel_report(model)
    speed = measure_speed(model, prompt_len=prompt_len, decode_tokens=decode_tokens, repeats=repeats)
    protocol = {"metric": "efficiency", **speed["protocol"], "device": speed["device"], "dtype": speed["dtype"],
                "threads": speed["threads"], **({"gpu": speed["gpu"]} if "gpu" in speed else {})}
    out = {}
    for name, higher in (("prefill_tokens_per_second", True), ("decode_tokens_per_second", True),
                         ("peak_memory_bytes", False)):
        proto = {**protocol, "metric": name}
        if name == "peak_memory_bytes":
            proto["measure"] = speed["peak_memory_measure"]
        out[name] = {"value": speed[name], "higher_is_better": higher, "protocol": proto,
                     "protocol_key": protocol_key(proto), "kernels": kernels}
    log.info("efficiency on %s: prefill %.0f tok/s, decode %.1f tok/s, peak memory %.0f MiB; %s", speed["device"],
             speed["prefill_tokens_per_second"], speed["decode_tokens_per_second"], speed["peak_memory_bytes"] / 2**20,
             kernels["summary"])
    return out
