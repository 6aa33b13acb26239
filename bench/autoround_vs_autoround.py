"""This project's AutoRound against intel's `auto-round` package (the reference SignRound), side by side in one run,
on SmolLM2-135M.

Both quantize every decoder-block linear at the same grid (bits, group size, asymmetric by default), from the same
calibration token sequences (C4 train, the data kit's sample, seed 0, in the same order), with the same number of
SignSGD steps per block and the same mini-batch; both models are then measured by the same perplexity code
(WikiText-2 raw test, seqlen 2048, --eval-windows windows, bfloat16). Wall time: ours is Recipe.run of `autoround`
(the engine's block loop included), the package's is its quantize() call. About 4-bit: the model's linears were GGUF
Q4_1 (asymmetric 4-bit, groups of 32), so 4-bit asymmetric g32 would be lossless by construction; hence g64.

auto-round runs in its own virtual environment, created on first use in $COMPRESS_CACHE_DIR/venvs/autoround-0.16.1
(torch pinned to 2.13.0, the CPU wheel), through bench/_autoround_worker.py; a benchmark-only dependency.

    python bench/autoround_vs_autoround.py                                    # w4/w3/w2 g64, 200 steps, 8 windows
    python bench/autoround_vs_autoround.py --bits 3 --iters 50 --minibatch 4 --nsamples 32 --eval-windows 4
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

PEER = "auto-round==0.16.1"
TORCH_PIN = "torch==2.13.0"


def peer_python(venv: Path) -> Path:
    """The peer venv's python (bench/_peer.py), created on first use."""
    from bench._peer import peer_python as make

    return make(venv, PEER, TORCH_PIN, ("safetensors",))


def main() -> None:
    from bench.awq_hqq_table import machine
    from compress.core.paths import cache_dir
    from compress.evals.perplexity import perplexity
    from compress.pipeline.recipe import Recipe, RunContext
    from compress.sources.data import get_calibration
    from compress.sources.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true", help="symmetric grid for both tools (default: asymmetric)")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--iters", type=int, default=200, help="SignSGD steps per block, both tools (the paper's 200)")
    ap.add_argument("--minibatch", type=int, default=8, help="sequences per step, both tools (the paper's 8)")
    ap.add_argument("--eval-windows", default="8", help="windows of 2048 tokens to use, or all")
    ap.add_argument("--venv", default=None, help="peer venv folder (default: $COMPRESS_CACHE_DIR/venvs/autoround-0.16.1)")
    args = ap.parse_args()
    windows = None if args.eval_windows == "all" else int(args.eval_windows)
    os.environ.setdefault("COMPRESS_DATA_DIR", str(REPO.parent / "shared" / "data"))

    py = peer_python(Path(args.venv) if args.venv else cache_dir() / "venvs" / "autoround-0.16.1")
    start = machine()
    lm = load_model("smollm2", dtype="bfloat16")
    calib = get_calibration(args.calib, lm.tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    ev = dict(seqlen=2048, max_windows=windows, progress=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="autoround-bench-") as tmp:
        tmp = Path(tmp)
        lm.model.save_pretrained(tmp / "model")
        lm.tokenizer.save_pretrained(tmp / "model")
        from safetensors.torch import load_file, save_file

        save_file({"ids": calib.input_ids.contiguous()}, str(tmp / "calib.safetensors"))
        fp = perplexity(lm.model, lm.tokenizer, "wikitext2", **ev)
        p = fp["protocol"]
        protocol = (f"WikiText-2 {p['variant']} {p['split']}, seqlen 2048, {p['windows']}/{p['windows_total']} windows, "
                    f"{p['dtype']}; calibration {calib.nsamples} x {calib.seqlen} tokens of {calib.source.variant} "
                    f"{calib.source.split}, seed 0; {args.iters} SignSGD steps per block, mini-batch {args.minibatch}")
        print(f"protocol: {protocol}\nmachine at start: {start}\nfull precision: {fp['value']:.3f}", flush=True)
        for bits in [int(b) for b in args.bits.split(",")]:
            label = f"w{bits} g{args.group_size}{' sym' if args.sym else ''}"
            model = copy.deepcopy(lm.model)
            stage = {"method": "autoround", "bits": bits, "group_size": args.group_size, "sym": args.sym,
                     "iters": args.iters, "minibatch": args.minibatch}
            t0 = time.perf_counter()
            model = Recipe.from_specs([stage]).run(model, RunContext(calibration=calib, progress=False))
            ours_s = time.perf_counter() - t0
            ours_ppl = perplexity(model, lm.tokenizer, "wikitext2", **ev)["value"]
            del model
            print(f"{label}  compress AutoRound: ppl {ours_ppl:.3f}  {ours_s:.0f} s", flush=True)
            job = {"model_dir": str(tmp / "model"), "calib": str(tmp / "calib.safetensors"), "bits": bits,
                   "group_size": args.group_size, "sym": args.sym, "iters": args.iters, "batch_size": args.minibatch,
                   "out": str(tmp / f"peer-{bits}.safetensors")}
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            res = subprocess.run([str(py), str(REPO / "bench" / "_autoround_worker.py"), json.dumps(job)],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
                raise SystemExit(f"auto-round failed for {label}")
            peer = json.loads(res.stdout.strip().splitlines()[-1])
            model = copy.deepcopy(lm.model)
            for name, w in load_file(job["out"]).items():
                model.get_submodule(name[: -len(".weight")]).weight.data.copy_(w)
            peer_ppl = perplexity(model, lm.tokenizer, "wikitext2", **ev)["value"]
            del model
            print(f"{label}  auto-round: ppl {peer_ppl:.3f}  {peer['seconds']:.0f} s  ({peer['versions']})", flush=True)
            rows.append((label, ours_ppl, ours_s, peer_ppl, peer["seconds"]))
    print()
    print(f"{'setting':10s} {'ppl compress':>13s} {'ppl auto-round':>15s} {'ppl ratio':>10s} {'s compress':>11s} "
          f"{'s auto-round':>13s} {'time ratio':>11s}")
    for label, op, os_, pp, ps in rows:
        print(f"{label:10s} {op:13.3f} {pp:15.3f} {op / pp:10.3f} {os_:11.0f} {ps:13.0f} {os_ / ps:11.2f}")
    print(f"(full precision {fp['value']:.3f}; {protocol}; ratios are compress / auto-round: below 1 is better for "
          f"compress; machine at end: {machine()['uptime']})")


if __name__ == "__main__":
    main()
