"""The practical 4/3-bit weight quantizers on one table: RTN (min/max), RTN with the act-mse observer, HQQ, AWQ,
GPTQ and AWQ -> GPTQ, on the offline SmolLM2-135M, in one run on one machine.

Every method gets the same calibration samples (C4 train, the data kit's sample, seed 0; HQQ and min/max RTN use
none) and the same grid (asymmetric, group 64 by default); perplexity is this project's (WikiText-2 raw test,
seqlen 2048, --eval-windows windows, bfloat16). About 4-bit: the model's linears were GGUF Q4_1 (asymmetric 4-bit,
groups of 32), so 4-bit asymmetric g32 would be lossless by construction; hence g64 (and 3-bit).

    python bench/awq_hqq_table.py                                   # w4 g64 and w3 g64, 32 x 512 C4, 8 windows
    python bench/awq_hqq_table.py --bits 3 --nsamples 128 --seqlen 512 --eval-windows all --out table.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = {
    "rtn": [{"method": "rtn"}],
    "rtn-mse": [{"method": "rtn", "observer": "mse"}],
    "rtn-act-mse": [{"method": "rtn", "observer": "act-mse"}],
    "hqq": [{"method": "hqq"}],
    "awq": [{"method": "awq"}],
    "gptq": [{"method": "gptq"}],
    "gptq-act-mse": [{"method": "gptq", "observer": "act-mse"}],
    "awq+gptq": [{"method": "awq", "scale_only": True}, {"method": "gptq"}],
}


def machine() -> dict:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit + ("+dirty" if dirty else ""), "uptime": os.popen("uptime").read().strip(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def main() -> None:
    from compress.core.paths import atomic_write_bytes
    from compress.evals.perplexity import perplexity
    from compress.pipeline.recipe import Recipe, RunContext
    from compress.sources.data import get_calibration
    from compress.sources.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", default="rtn,rtn-act-mse,hqq,awq,gptq,awq+gptq", help=f"from {', '.join(METHODS)}")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", default="8", help="WikiText-2 test windows of 2048 tokens, or all")
    ap.add_argument("--awq-grid", type=int, default=20, help="AWQ's alpha grid (n_grid; the paper's 20)")
    ap.add_argument("--out", default=None, help="also write the table as JSON (atomically)")
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
                f"{calib.source.split}, seed 0; AWQ alpha grid {args.awq_grid}")
    print(f"protocol: {protocol}\nmachine at start: {start}\nfull precision: {fp['value']:.3f}", flush=True)
    rows = []

    def save(**extra) -> None:
        if args.out:
            atomic_write_bytes(Path(args.out), json.dumps({"protocol": protocol, "full_precision": fp["value"],
                                                           "rows": rows, "machine_start": start, **extra},
                                                          indent=1).encode())

    for bits in [int(b) for b in args.bits.split(",")]:
        for n in names:
            stages = [{**s, "bits": bits, "group_size": args.group_size} for s in METHODS[n]]
            stages = [{**s, "n_grid": args.awq_grid} if s["method"] == "awq" else s for s in stages]
            model = copy.deepcopy(lm.model)
            t0 = time.perf_counter()
            model = Recipe.from_specs(stages).run(model, RunContext(calibration=calib, progress=False))
            secs = time.perf_counter() - t0
            ppl = perplexity(model, lm.tokenizer, "wikitext2", **ev)["value"]
            del model
            rows.append({"bits": bits, "group_size": args.group_size, "method": n, "ppl": round(ppl, 4), "seconds": round(secs, 1)})
            print(f"w{bits} g{args.group_size} {n:14s} ppl {ppl:9.3f}  {secs:7.1f} s", flush=True)
            save()  # after every row, so a cut-off run keeps what it measured
    end = machine()
    print(f"\n{'setting':10s} {'method':14s} {'ppl':>9s} {'vs rtn':>7s} {'seconds':>8s}")
    for r in rows:
        base = next(x["ppl"] for x in rows if x["bits"] == r["bits"] and x["method"] == names[0])
        print(f"w{r['bits']} g{r['group_size']:<6d} {r['method']:14s} {r['ppl']:9.3f} {r['ppl'] / base:7.3f} {r['seconds']:8.1f}")
    print(f"(full precision {fp['value']:.3f}; {protocol}; grid asymmetric; machine at end: {end['uptime']})")
    save(machine_end=end)


if __name__ == "__main__":
    main()
