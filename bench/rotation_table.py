"""Issue 17's table: W4/W3/W2 x {RTN, GPTQ, rotate+RTN, rotate+GPTQ, AutoRound, rotate+AutoRound} on the offline
SmolLM2-135M, in one run on one machine.

Every method gets the same calibration samples (C4 train, the data kit's sample, seed 0; RTN and rotate+RTN use
none) and the same grid (asymmetric, group 64 by default); perplexity is this project's (WikiText-2 raw test,
seqlen 2048, --eval-windows windows, bfloat16). rotate: randomized Hadamard R1 (576 = Paley II 36 x Sylvester 16,
signs seed 0) fused, online Hadamard R4 before down_proj (1536 = Paley I 12 x Sylvester 128). AutoRound: --iters
SignSGD steps per block (the paper's 200), mini-batch --minibatch (the paper's 8), lr 1/iters. About 4-bit: the
model's linears were GGUF Q4_1 (asymmetric 4-bit, groups of 32), so 4-bit asymmetric g32 would be lossless by
construction; hence g64. Each row is appended to --out (atomically) as soon as it is measured.

    python bench/rotation_table.py                                          # all rows, 32 x 512 C4, 4 windows
    python bench/rotation_table.py --bits 3,2 --methods gptq,rotate+gptq --eval-windows all --out t.json
    python bench/rotation_table.py --bits 2 --methods gptq,rotate+gptq --observer mse   # GPTQ's mse grid search
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = {
    "rtn": [{"method": "rtn"}],
    "gptq": [{"method": "gptq"}],
    "rotate+rtn": [{"method": "rotate"}, {"method": "rtn"}],
    "rotate+gptq": [{"method": "rotate"}, {"method": "gptq"}],
    "autoround": [{"method": "autoround"}],
    "rotate+autoround": [{"method": "rotate"}, {"method": "autoround"}],
}


def main() -> None:
    import torch

    from bench.awq_hqq_table import machine
    from compress.core.paths import atomic_write_bytes
    from compress.evals.perplexity import perplexity
    from compress.pipeline.recipe import Recipe, RunContext
    from compress.sources.data import get_calibration
    from compress.sources.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"from {', '.join(METHODS)}")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--iters", type=int, default=200, help="AutoRound SignSGD steps per block (the paper's 200)")
    ap.add_argument("--minibatch", type=int, default=8, help="AutoRound sequences per step (the paper's 8)")
    ap.add_argument("--eval-windows", default="4", help="WikiText-2 test windows of 2048 tokens, or all")
    ap.add_argument("--observer", default="minmax", choices=("minmax", "mse", "act-mse"),
                    help="range observer of the RTN and GPTQ grids (AutoRound learns its own clipping from min/max)")
    ap.add_argument("--out", default=None, help="write the table as JSON (atomically, after every row)")
    args = ap.parse_args()
    os.environ.setdefault("COMPRESS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    windows = None if args.eval_windows == "all" else int(args.eval_windows)
    names = args.methods.split(",")
    for n in names:
        if n not in METHODS:
            raise SystemExit(f"unknown method {n!r}; known: {', '.join(METHODS)}")

    start = machine()
    lm = load_model("smollm2", dtype="bfloat16")
    calib = get_calibration(args.calib, lm.tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    ev = dict(seqlen=2048, max_windows=windows, progress=False)
    fp = perplexity(lm.model, lm.tokenizer, "wikitext2", **ev)
    p = fp["protocol"]
    protocol = (f"WikiText-2 {p['variant']} {p['split']}, seqlen 2048, {p['windows']}/{p['windows_total']} windows, "
                f"{p['dtype']}; calibration {calib.nsamples} x {calib.seqlen} tokens of {calib.source.variant} "
                f"{calib.source.split}, seed 0; grid asymmetric g{args.group_size}, RTN/GPTQ observer {args.observer}; AutoRound {args.iters} steps, "
                f"mini-batch {args.minibatch}, lr 1/{args.iters}; torch threads {torch.get_num_threads()}")
    print(f"protocol: {protocol}\nmachine at start: {start}\nfull precision: {fp['value']:.3f}", flush=True)
    rows = []

    def save() -> None:
        if args.out:
            atomic_write_bytes(Path(args.out), json.dumps({"protocol": protocol, "full_precision": fp["value"],
                                                           "rows": rows, "machine_start": start,
                                                           "machine_now": machine()}, indent=1).encode())

    for bits in [int(b) for b in args.bits.split(",")]:
        for n in names:
            stages = [s if s["method"] == "rotate" else {**s, "bits": bits, "group_size": args.group_size}
                      for s in METHODS[n]]
            stages = [{**s, "iters": args.iters, "minibatch": args.minibatch} if s["method"] == "autoround" else s
                      for s in stages]
            if args.observer != "minmax":
                stages = [{**s, "observer": args.observer} if s["method"] in ("rtn", "gptq") else s for s in stages]
            model = copy.deepcopy(lm.model)
            t0 = time.perf_counter()
            model = Recipe.from_specs(stages).run(model, RunContext(calibration=calib, progress=False))
            secs = time.perf_counter() - t0
            ppl = perplexity(model, lm.tokenizer, "wikitext2", **ev)["value"]
            del model
            rows.append({"bits": bits, "group_size": args.group_size, "method": n, "observer": args.observer,
                         "ppl": round(ppl, 4),
                         "seconds": round(secs, 1), "uptime": os.popen("uptime").read().strip()})
            print(f"w{bits} g{args.group_size} {n:17s} ppl {ppl:10.3f}  {secs:7.1f} s", flush=True)
            save()
    end = machine()
    print(f"\n{'setting':9s} {'method':17s} {'ppl':>10s} {'vs gptq':>8s} {'seconds':>8s}")
    for r in rows:
        base = next((x["ppl"] for x in rows if x["bits"] == r["bits"] and x["method"] == "gptq"), None)
        ratio = f"{r['ppl'] / base:8.3f}" if base else f"{'-':>8s}"
        print(f"w{r['bits']} g{r['group_size']:<5d} {r['method']:17s} {r['ppl']:10.3f} {ratio} {r['seconds']:8.1f}")
    print(f"(full precision {fp['value']:.3f}; {protocol}; machine at end: {end['uptime']})")
    save()


if __name__ == "__main__":
    main()
