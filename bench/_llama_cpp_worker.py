"""Worker for bench/inference_speed.py, run with a Python that has llama-cpp-python (never a dependency of this
project): prefill and greedy decode speed of a GGUF, batch 1, the same protocol as compress.evals.efficiency.
Prints one JSON line."""
from __future__ import annotations

import json
import random
import statistics
import sys
import time

import llama_cpp

gguf, prompt_len, decode_tokens, repeats, threads = sys.argv[1], *map(int, sys.argv[2:6])
llm = llama_cpp.Llama(model_path=gguf, n_ctx=prompt_len + decode_tokens + 8, n_threads=threads,
                      n_threads_batch=threads, n_batch=prompt_len, verbose=False)
rng = random.Random(0)
prompt = [rng.randrange(llm.n_vocab()) for _ in range(prompt_len)]


def one() -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        tok = llm.sample(temp=0.0)  # greedy
        llm.eval([tok])
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / decode_tokens


one()  # warm-up
runs = [one() for _ in range(repeats)]
print(json.dumps({"prefill_tokens_per_second": prompt_len / statistics.median(r[0] for r in runs),
                  "decode_tokens_per_second": 1 / statistics.median(r[1] for r in runs),
                  "llama_cpp_version": llama_cpp.__version__, "threads": threads}))
