"""Evaluate a GGUF file with llama.cpp's own forward pass (llama-cpp-python, the optional `gguf` extra).

Perplexity uses exactly compress's protocol (evals/perplexity.py): the same tokenizer (the model's, not llama.cpp's),
the same test text joined the same way, the same non-overlapping windows of `seqlen` token ids with no BOS added;
llama.cpp evaluates each window from an empty KV cache and returns logits for every position; mean next-token NLL
per window (float64 log-softmax of llama.cpp's float32 logits), perplexity = exp(mean over windows).
Greedy generation: llama.cpp's argmax token, one token at a time; decode tokens/s = generated tokens / decode time
(the prompt's prefill excluded), with the thread count recorded.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from compress.core.errors import CompressError
from compress.evals.perplexity import prepare, protocol_key


def llama_cpp_available() -> str | None:
    """None if llama-cpp-python imports, else the one-line reason."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means "absent" to the callers
        return f"llama-cpp-python is not installed (pip install '.[gguf]'): {type(e).__name__}: {e}"
    return None


def load_gguf(path: str | os.PathLike, n_ctx: int = 512, threads: int | None = None):
    """A llama_cpp.Llama over `path` that returns logits for every position."""
    reason = llama_cpp_available()
    if reason:
        raise CompressError(reason)
    from llama_cpp import Llama

    if not Path(path).is_file():
        raise CompressError(f"GGUF file {str(path)!r} does not exist")
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                 n_threads=threads or os.cpu_count(), verbose=False)


def window_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for one sequence evaluated from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def llamacpp_perplexity(path: str | os.PathLike, tokenizer, dataset: str = "wikitext2", *, seqlen: int = 512,
                        max_windows: int | None = None, data_dir: str | None = None, threads: int | None = None,
                        llm=None, progress: bool = False) -> dict[str, Any]:
    """Perplexity of a GGUF file by llama.cpp's forward pass, on compress's windows. {"value", "protocol", ...}."""
    from tqdm.auto import tqdm

    protocol, ids = prepare(tokenizer, dataset, seqlen=seqlen, max_windows=max_windows, data_dir=data_dir,
                            dtype="llama.cpp (file types; float32 activations)")
    protocol["runtime"] = "llama.cpp via llama-cpp-python " + _version()
    llm = llm or load_gguf(path, n_ctx=seqlen, threads=threads)
    t0 = time.perf_counter()
    nlls = []
    for w in tqdm(range(protocol["windows"]), desc="llama.cpp perplexity", disable=not progress, leave=False):
        window = ids[0, w * seqlen:(w + 1) * seqlen].tolist()
        nlls.append(_nll(window_logits(llm, window), window))
    return {"value": math.exp(float(np.mean(nlls))), "protocol": protocol, "protocol_key": protocol_key(protocol),
            "seconds": round(time.perf_counter() - t0, 3), "file": str(path), "bytes": Path(path).stat().st_size}


def llamacpp_greedy(path: str | os.PathLike, prompt_ids: list[int], n: int = 32, *, threads: int | None = None,
                    llm=None) -> dict[str, Any]:
    """Greedy continuation of `prompt_ids` by llama.cpp: {"tokens", "decode_tokens_per_s", "prefill_s", "threads"}."""
    threads = threads or os.cpu_count()
    llm = llm or load_gguf(path, n_ctx=max(64, len(prompt_ids) + n), threads=threads)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    t2 = time.perf_counter()
    return {"tokens": out, "prefill_s": round(t1 - t0, 4), "decode_s": round(t2 - t1, 4),
            "decode_tokens_per_s": round(n / (t2 - t1), 2), "threads": threads, "prompt_tokens": len(prompt_ids)}


def _version() -> str:
    try:
        import llama_cpp

        return getattr(llama_cpp, "__version__", "?")
    except Exception:  # noqa: BLE001
        return "?"


def llamacpp_quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: str) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize) from a GGUF file to `ftype` (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1)."""
    reason = llama_cpp_available()
    if reason:
        raise CompressError(reason)
    import llama_cpp

    ftypes = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
              "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
              "Q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1}
    if ftype not in ftypes:
        raise CompressError(f"llama.cpp file type {ftype!r} is not offered here; allowed: {', '.join(ftypes)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[ftype]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise CompressError(f"llama_model_quantize({str(src)!r} -> {ftype}) failed with code {rc}")
    return Path(dst)
