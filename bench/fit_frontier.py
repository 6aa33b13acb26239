"""Acceptance 1 of `compress fit` (issue 18): fitted mixed precision vs the uniform settings, one protocol, one run.

Runs, in one process on this machine, the uniform GPTQ and RTN grids (w2/w3/w4 x g64/g128; 4-bit asymmetric g32
is lossless on SmolLM2 by construction, its weights were GGUF Q4_1, so it is left out of both the uniform points and
the fit's candidates) and `compress fit --max-bits B` for each B, every run with the same calibration and the same
WikiText-2 protocol; then writes the table (each fitted point against every uniform point of equal or smaller size
and against the log-linear interpolation between the two uniform points that bracket its size) and the report PNG.

    flock /work/heavy.lock python bench/fit_frontier.py --budgets 3.5,3.0 [--windows 8] [--nsamples 32]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="3.5,3.0", help="bits-per-weight budgets to fit ('none': uniform points only)")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--methods", default="gptq,rtn")
    ap.add_argument("--uniform", default="gptq,rtn")
    ap.add_argument("--sensitivity", default="fisher")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "fit"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "fit_frontier"))
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table and PNG from the store")
    args = ap.parse_args()
    out = Path(args.out)
    results = out / "results"
    os.environ.setdefault("COMPRESS_CACHE_DIR", str(out / "cache"))

    from compress.runs.fit import fit
    from compress.runs.runner import execute
    from compress.runs.spec import RunSpec

    common = dict(calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, eval=["wikitext2"],
                  eval_seqlen=args.eval_seqlen, eval_windows=args.windows, results_dir=str(results), overwrite=True,
                  data_dir=os.environ.get("COMPRESS_DATA_DIR"), progress=False)
    t_all = time.perf_counter()
    if not args.table_only:
        for b in [float(x) for x in args.budgets.split(",") if x.strip() not in ("", "none")]:
            t0 = time.perf_counter()
            spec = RunSpec.build({**common, "max_bits": b, "fit_methods": args.methods, "sensitivity": args.sensitivity,
                                  "output": str(out / "ckpt" / f"fit-{b}")}, kind="fit")
            fit(spec)
            print(f"fit {b}: {time.perf_counter() - t0:.0f} s", flush=True)
        for method in args.uniform.split(","):
            for bits in (3, 4, 2):
                for gs in (64, 128):
                    t0 = time.perf_counter()
                    spec = RunSpec.build({**common, "output": str(out / "ckpt" / f"{method}-w{bits}-g{gs}")},
                                         kind="quantize", stages=[{"method": method, "bits": bits, "group_size": gs}])
                    execute(spec)
                    print(f"{method} w{bits} g{gs}: {time.perf_counter() - t0:.0f} s", flush=True)
    table(results, args, time.perf_counter() - t_all)


def _points(results: Path):
    from compress.runs.results import read_records

    pts = []
    for r in read_records(str(results)):
        ppl = (r.get("metrics", {}).get("after") or {}).get("ppl_wikitext2")
        if r.get("status") != "ok" or not ppl:
            continue
        pts.append({"method": r["method"], "setting": r["setting"], "bpw": r["size"]["bits_per_weight"],
                    "bytes": r["size"].get("checkpoint_bytes"), "ppl": ppl["value"], "protocol": ppl["protocol"],
                    "fit": r.get("fit"), "calibration": r.get("calibration"), "time": r["time"],
                    "commit": r.get("env", {}).get("git_commit")})
    latest = {}
    for p in pts:
        latest[(p["method"], p["setting"])] = p
    return list(latest.values())


def table(results: Path, args, seconds: float) -> None:
    pts = _points(results)
    uni = sorted((p for p in pts if not p["fit"]), key=lambda p: p["bpw"])
    fits = sorted((p for p in pts if p["fit"]), key=lambda p: p["bpw"])
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, machine load: {up}",
             f"bench wall time {seconds:.0f} s", ""]
    if pts:
        pr, cal = pts[0]["protocol"], pts[0]["calibration"] or {}
        lines.append(f"protocol: WikiText-2 raw {pr.get('split')}, seqlen {pr.get('seqlen')}, {pr.get('windows')} windows; "
                     f"calibration {cal.get('dataset')} {cal.get('nsamples')} x {cal.get('seqlen')} seed {cal.get('seed')}; "
                     f"dtype bfloat16; bits per weight of the decoder-block linears as stored")
    lines += ["", "| setting | bits/weight (stored) | checkpoint bytes | WikiText-2 ppl |", "|---|---|---|---|"]
    for p in sorted(pts, key=lambda p: p["bpw"]):
        lines.append(f"| {p['setting']} | {p['bpw']:.4f} | {p['bytes']:,} | {p['ppl']:.3f} |")
    lines += ["", "| fitted | budget | stored bpw | ppl | best uniform of <= size | interpolation (log-ppl linear in bits) between | interpolated ppl | below both |",
              "|---|---|---|---|---|---|---|---|"]
    for f in fits:
        smaller = [u for u in uni if u["bpw"] <= f["bpw"]]
        best = min(smaller, key=lambda u: u["ppl"]) if smaller else None
        front = _front(uni)
        lo = max((u for u in front if u["bpw"] <= f["bpw"]), key=lambda u: u["bpw"], default=None)
        hi = min((u for u in front if u["bpw"] > f["bpw"]), key=lambda u: u["bpw"], default=None)
        interp = None
        if lo and hi:
            t = (f["bpw"] - lo["bpw"]) / (hi["bpw"] - lo["bpw"])
            interp = math.exp((1 - t) * math.log(lo["ppl"]) + t * math.log(hi["ppl"]))
        ok = best is not None and f["ppl"] < best["ppl"] and interp is not None and f["ppl"] < interp
        best_txt = f"{best['setting']} {best['ppl']:.3f}" if best else "-"
        br = f"{lo['setting']} ({lo['bpw']:.3f}) .. {hi['setting']} ({hi['bpw']:.3f})" if lo and hi else "-"
        it = f"{interp:.3f}" if interp is not None else "-"
        lines.append(f"| {f['setting']} | {f['fit']['budget']['value']} | {f['bpw']:.4f} | {f['ppl']:.3f} | {best_txt} | "
                     f"{br} | {it} | {'yes' if ok else 'NO'} |")
    text = "\n".join(lines)
    (Path(args.out) / "table.md").write_text(text + "\n")
    print(text)
    from compress.runs.console import _console
    from compress.runs.report import report

    try:
        report(metric="wikitext2_ppl", model=None, results_dir=str(results), axis="bits", protocol=None, out=args.png,
               console=_console())
    except Exception as e:  # noqa: BLE001 - the table stands without the picture
        print(f"report: {e}", file=sys.stderr)


def _front(uni):
    """Uniform points no other uniform point beats at equal or smaller size (the uniform frontier)."""
    return [u for u in uni if not any(v is not u and v["bpw"] <= u["bpw"] and v["ppl"] < u["ppl"] for v in uni)]


if __name__ == "__main__":
    main()
