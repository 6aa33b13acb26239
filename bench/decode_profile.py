"""Where a decode step's time goes: torch.profiler over greedy decode steps (batch 1, KV cache, after a prompt of
--prompt-len random tokens and a warm-up) of the bf16 model and RTN variants on their kernels. Prints, per variant,
the milliseconds per token, the share in the matmul kernels, and the top ops by self CPU time.

    python bench/decode_profile.py [--steps 16] [--prompt-len 128] [--only bf16,rtn-w4-g64]
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import time

import torch
from torch.profiler import profile

from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.models import load_model

VARIANTS = {"bf16": [], "rtn-w4-g64": [{"method": "rtn", "bits": 4, "group_size": 64}],
            "rtn-w8-ch": [{"method": "rtn", "bits": 8, "group_size": -1}]}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::linear", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm",
              "aten::bmm", "aten::matmul", "aten::_int_mm")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), f"· {torch.get_num_threads()} threads")
    base = load_model("smollm2", dtype="bfloat16").model
    prompt = torch.randint(0, base.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    for name, stages in VARIANTS.items():
        if args.only and name not in args.only.split(","):
            continue
        model = Recipe.from_specs(stages).run(copy.deepcopy(base), RunContext(progress=False)) if stages else base
        out = model(input_ids=prompt, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(4):  # warm-up
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        with profile() as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            wall = (time.perf_counter() - t0) / args.steps
        ev = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ev)
        mm = sum(e.self_cpu_time_total for e in ev if e.key in MATMUL_OPS)
        print(f"\n{name}: {wall * 1e3:.1f} ms/token (profiled), matmul kernels {100 * mm / total:.0f}% of op self time, "
              f"{sum(e.count for e in ev) / args.steps:.0f} op calls/token")
        for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:10]:
            print(f"  {e.key:45s} {e.self_cpu_time_total / args.steps / 1e3:8.2f} ms/token  {e.count // args.steps:5d} calls")


if __name__ == "__main__":
    main()
