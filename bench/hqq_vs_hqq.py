"""This project's HQQ against the `hqq` package (Badri & Shaji, mobiusml), side by side in one run, on SmolLM2-135M.

Both quantize every decoder-block linear at the same grid (bits, group size, asymmetric; groups along the input, hqq's
axis=1) with no calibration data; both models are then measured by the same perplexity code (WikiText-2 raw test,
seqlen 2048, --eval-windows windows, bfloat16). Wall time: ours is Recipe.run of `hqq` (the engine's block loop
included); the package's is the sum of its Quantizer.quantize + dequantize calls on the same weights. What differs by
design: hqq keeps its float zero point; ours (the default solver: the package's iterations) rounds that zero onto the
integer grid the project shares, so its result exports to GPTQ / compressed-tensors; `--solver integer` (the second
row of ours) iterates on the integer grid and solves the scale too.

hqq runs in its own virtual environment, created on first use in $COMPRESS_CACHE_DIR/venvs/hqq-0.2.8 (torch pinned
to the CPU wheel 2.13.0), reused afterwards; a benchmark-only dependency.

    python bench/hqq_vs_hqq.py                          # w4 g64 and w3 g64, 8 windows
    python bench/hqq_vs_hqq.py --bits 3 --eval-windows all
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PEER = "hqq==0.2.8.post1"
TORCH_PIN = "torch==2.13.0"


def peer_python(venv: Path) -> Path:
    """The peer venv's python (bench/_peer.py), created on first use."""
    from bench._peer import peer_python as make

    return make(venv, PEER, TORCH_PIN, ())


def main() -> None:
    import torch

    from compress.core.paths import cache_dir
    from compress.evals.perplexity import perplexity
    from compress.pipeline.recipe import Recipe, RunContext
    from compress.sources.models import load_model
    from bench.awq_hqq_table import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--eval-windows", default="8", help="windows of 2048 tokens, or all")
    ap.add_argument("--venv", default=None, help="peer venv folder (default: $COMPRESS_CACHE_DIR/venvs/hqq-0.2.8)")
    args = ap.parse_args()
    windows = None if args.eval_windows == "all" else int(args.eval_windows)
    os.environ.setdefault("COMPRESS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    py = peer_python(Path(args.venv) if args.venv else cache_dir() / "venvs" / "hqq-0.2.8")
    start = machine()
    lm = load_model("smollm2", dtype="bfloat16")
    ev = dict(seqlen=2048, max_windows=windows, progress=False)
    fp = perplexity(lm.model, lm.tokenizer, "wikitext2", **ev)
    p = fp["protocol"]
    protocol = f"WikiText-2 {p['variant']} {p['split']}, seqlen 2048, {p['windows']}/{p['windows_total']} windows, {p['dtype']}"
    print(f"protocol: {protocol}; no calibration data\nmachine at start: {start}\nfull precision: {fp['value']:.3f}", flush=True)
    linears = {n: m for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="hqq-bench-") as tmp:
        from safetensors.torch import load_file, save_file

        tmp = Path(tmp)
        save_file({n: m.weight.detach().contiguous() for n, m in linears.items()}, str(tmp / "weights.safetensors"))
        for bits in [int(b) for b in args.bits.split(",")]:
            label = f"w{bits} g{args.group_size}"
            res = {}
            for name, extra in (("compress HQQ", {}), ("compress HQQ integer", {"solver": "integer"})):
                model = copy.deepcopy(lm.model)
                t0 = time.perf_counter()
                model = Recipe.from_specs([{"method": "hqq", "bits": bits, "group_size": args.group_size, **extra}]).run(
                    model, RunContext(progress=False))
                secs = time.perf_counter() - t0
                ppl = perplexity(model, lm.tokenizer, "wikitext2", **ev)["value"]
                del model
                res[name] = (ppl, secs)
                print(f"{label}  {name}: ppl {ppl:.3f}  {secs:.1f} s", flush=True)
            job = {"weights": str(tmp / "weights.safetensors"), "bits": bits, "group_size": args.group_size,
                   "out": str(tmp / f"peer-{bits}.safetensors")}
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
            out = subprocess.run([str(py), str(REPO / "bench" / "_hqq_worker.py"), json.dumps(job)], capture_output=True,
                                 text=True, env=env)
            if out.returncode != 0:
                print(out.stdout[-3000:], out.stderr[-3000:], sep="\n")
                raise SystemExit(f"hqq failed for {label}")
            peer = json.loads(out.stdout.strip().splitlines()[-1])
            model = copy.deepcopy(lm.model)
            for n, w in load_file(job["out"]).items():
                model.get_submodule(n).weight.data.copy_(w)
            peer_ppl = perplexity(model, lm.tokenizer, "wikitext2", **ev)["value"]
            del model
            print(f"{label}  hqq package: ppl {peer_ppl:.3f}  {peer['seconds']:.1f} s  ({peer['versions']}, {peer['params']})", flush=True)
            rows.append((label, *res["compress HQQ"], *res["compress HQQ integer"], peer_ppl, peer["seconds"]))
    print()
    print(f"{'setting':9s} {'ppl ours':>9s} {'ppl ours i':>10s} {'ppl hqq':>8s} {'ppl ratio':>9s} {'s ours':>7s} {'s hqq':>7s} {'time ratio':>10s}")
    for label, op, os_, zp, zs, pp, ps in rows:
        print(f"{label:9s} {op:9.3f} {zp:10.3f} {pp:8.3f} {op / pp:9.3f} {os_:7.1f} {ps:7.1f} {os_ / ps:10.2f}")
    print(f"(full precision {fp['value']:.3f}; {protocol}; ratios are ours (the package's iterations, zero rounded to the "
          f"integer grid) / hqq package (float zero): below 1 is better for ours; 'ours i': the integer solver; "
          f"machine at end: {machine()['uptime']})")


if __name__ == "__main__":
    main()
