"""Perplexity with the protocol of the GPTQ/Wanda/SmoothQuant papers.

Join the test split ("\\n\\n" for WikiText-2, " " for PTB and C4), tokenize once, cut into non-overlapping windows of
`seqlen` tokens (C4: at most 256 windows), mean next-token NLL per window, perplexity = exp(mean over windows).
Every number is returned with its full protocol (dataset variant, split, seqlen, windows used of total, tokenizer,
dtype), because perplexities measured differently must never be compared.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from compress.core.errors import ConfigError
from compress.sources.data import eval_text, tokenize_text, tokenizer_fingerprint, with_pydoc_fallback

C4_MAX_WINDOWS = 256


def protocol_key(protocol: dict[str, Any]) -> str:
    """Hash of everything that makes two perplexities comparable."""
    keep = {k: protocol[k] for k in sorted(protocol) if k not in ("origin",)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def _window_nll(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each sequence in the batch, computed in float32."""
    out = model(input_ids=batch, use_cache=False)
    logits = out.logits[:, :-1, :].float()
    target = batch[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(batch.shape[0], -1).mean(dim=1)


def prepare(tokenizer, dataset: str = "wikitext2", *, seqlen: int = 2048, max_windows: int | None = None,
            data_dir: str | None = None, fallback: bool = False, dtype: torch.dtype | str = "float32"):
    """Tokenize the test text and fix the protocol without running a model: (protocol, token ids [1, T])."""
    if seqlen < 2:
        raise ConfigError(f"--eval-seqlen {seqlen!r} is out of range; allowed: >= 2")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"--eval-windows {max_windows!r} is out of range; allowed: >= 1 (or omit it for all windows)")
    loader = lambda n: eval_text(n, data_dir)  # noqa: E731
    src = with_pydoc_fallback(loader, dataset) if fallback else loader(dataset)
    ids = tokenize_text(src, tokenizer)
    total = ids.shape[1] // seqlen
    if src.name == "c4":
        total = min(total, C4_MAX_WINDOWS)
    if total < 1:
        raise ConfigError(f"{dataset}: the text has {ids.shape[1]} tokens, fewer than one window of --eval-seqlen {seqlen}")
    n = min(total, max_windows) if max_windows else total
    protocol = {
        **src.record(),
        "metric": "perplexity",
        "join": {"wikitext2": "\\n\\n", "wikitext2-v1": "\\n\\n", "ptb": " ", "c4": " "}.get(src.name, "\\n\\n"),
        "seqlen": seqlen,
        "windows": n,
        "windows_total": total,
        "tokens": n * seqlen,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dtype": str(dtype).replace("torch.", ""),
    }
    return protocol, ids


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, dataset: str = "wikitext2", *, seqlen: int = 2048,
               max_windows: int | None = None, batch_size: int = 1, data_dir: str | None = None,
               device: torch.device | str | None = None, fallback: bool = False, progress: bool = True) -> dict[str, Any]:
    """Perplexity of `model` on a dataset's test text. Returns {"value", "protocol", "protocol_key", "seconds"}."""
    from tqdm.auto import tqdm

    dtype = next(model.parameters()).dtype
    protocol, ids = prepare(tokenizer, dataset, seqlen=seqlen, max_windows=max_windows, data_dir=data_dir,
                            fallback=fallback, dtype=dtype)
    n = protocol["windows"]
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    nlls = []
    for s in tqdm(range(0, n, batch_size), desc=f"perplexity {protocol['dataset']}", unit="batch", disable=not progress, leave=False):
        b = min(batch_size, n - s)
        batch = ids[0, s * seqlen:(s + b) * seqlen].view(b, seqlen).to(device)
        nlls.append(_window_nll(model, batch).cpu())
    if was_training:
        model.train()
    value = math.exp(torch.cat(nlls).double().mean().item())
    return {"value": value, "protocol": protocol, "protocol_key": protocol_key(protocol),
            "seconds": round(time.perf_counter() - t0, 3)}


@torch.no_grad()
def streamed_perplexity(folder, tokenizer, dataset: str = "wikitext2", *, seqlen: int = 2048,
                        max_windows: int | None = None, data_dir: str | None = None, fallback: bool = False,
                        dtype: torch.dtype | None = None, progress: bool = True) -> dict[str, Any]:
    """perplexity() of the model in `folder` (a transformers folder or a native checkpoint) with one decoder block in
    memory at a time: the windows' hidden states go through block 0, then block 1, ... (each block read from the
    folder and freed), then the final norm and head; the same protocol, windows one at a time as perplexity()."""
    from tqdm.auto import tqdm

    from compress.pipeline.engine import Engine
    from compress.pipeline.stream import StreamedModel

    sm = StreamedModel(folder, dtype)
    sm.load_rest()
    protocol, ids = prepare(tokenizer, dataset, seqlen=seqlen, max_windows=max_windows, data_dir=data_dir,
                            fallback=fallback, dtype=sm.dtype)
    n = protocol["windows"]
    t0 = time.perf_counter()
    windows = ids[0, :n * seqlen].view(n, seqlen)
    engine = Engine(sm.model, windows, batch_size=1, progress=False)
    try:
        engine.capture(quiet=True)
        for i in tqdm(range(len(sm.blocks)), desc=f"perplexity {protocol['dataset']} (streamed)", unit="block",
                      disable=not progress, leave=False):
            block = sm.load_block(i)
            engine.forward_block(block, write_outputs=True)
            engine.inputs, engine.outputs = engine.outputs, engine.inputs
            sm.free_block(i)
        norm, head = sm.final_head()
        nlls = []
        for s in range(n):
            logits = head(norm(engine.inputs.data[s:s + 1]))[:, :-1, :].float()
            target = windows[s:s + 1, 1:]
            nlls.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").mean().view(1))
    finally:
        engine.release()
    value = math.exp(torch.cat(nlls).double().mean().item())
    return {"value": value, "protocol": protocol, "protocol_key": protocol_key(protocol),
            "seconds": round(time.perf_counter() - t0, 3), "streamed": True}
