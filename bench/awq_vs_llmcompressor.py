"""This project's AWQ against llm-compressor's AWQModifier, side by side in one run, on the offline SmolLM2-135M.

Both tools get the very same calibration samples (--nsamples x --seqlen tokens of the data kit's C4 train sample,
seed 0, drawn by compress.sources.data) and the same grid (bits, group 64, asymmetric); both quantized models are then
measured by the same perplexity code (WikiText-2 raw test, seqlen 2048, --eval-windows windows, bfloat16). Wall time
is that of the compression call alone: compress's Recipe.run and llm-compressor's oneshot(), each with its defaults
(ours: the paper's s = mean|X|^alpha, 20-point alpha grid, auto_clip, norm-fed groups only; llm-compressor 0.14:
duo_scaling, 20-point grid, no clipping, mappings norm -> q/k/v, v -> o, norm -> gate/up, up -> down, then RTN).
`--also '{"duo_scaling": true}'` adds variants of ours.

llm-compressor runs in the peer venv bench/gptq_vs_llmcompressor.py creates ($COMPRESS_CACHE_DIR/venvs/
llmcompressor-0.14), through bench/_llmcompressor_worker.py.

    python bench/awq_vs_llmcompressor.py                          # w4 g64 and w3 g64
    python bench/awq_vs_llmcompressor.py --bits 3 --nsamples 128 --seqlen 512 --eval-windows all
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


def main() -> None:
    from bench.awq_hqq_table import machine
    from bench.gptq_vs_llmcompressor import peer_python
    from bench._peer import copy_peer_parameters
    from compress.core.paths import cache_dir
    from compress.evals.perplexity import perplexity
    from compress.pipeline.recipe import Recipe, RunContext
    from compress.sources.data import get_calibration
    from compress.sources.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", default="8", help="windows of 2048 tokens to use, or all")
    ap.add_argument("--also", action="append", default=[], metavar="JSON",
                    help='another compress AWQ setting to run beside the default, e.g. \'{"duo_scaling": true}\'')
    ap.add_argument("--venv", default=None, help="peer venv folder (default: $COMPRESS_CACHE_DIR/venvs/llmcompressor-0.14)")
    args = ap.parse_args()
    windows = None if args.eval_windows == "all" else int(args.eval_windows)
    os.environ.setdefault("COMPRESS_DATA_DIR", str(REPO.parent / "shared" / "data"))

    py = peer_python(Path(args.venv) if args.venv else cache_dir() / "venvs" / "llmcompressor-0.14")
    start = machine()
    lm = load_model("smollm2", dtype="bfloat16")
    calib = get_calibration(args.calib, lm.tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    ev = dict(seqlen=2048, max_windows=windows, progress=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="awq-bench-") as tmp:
        tmp = Path(tmp)
        lm.model.save_pretrained(tmp / "model")
        lm.tokenizer.save_pretrained(tmp / "model")
        from safetensors.torch import load_file, save_file

        save_file({"ids": calib.input_ids.contiguous()}, str(tmp / "calib.safetensors"))
        fp = perplexity(lm.model, lm.tokenizer, "wikitext2", **ev)
        p = fp["protocol"]
        protocol = (f"WikiText-2 {p['variant']} {p['split']}, seqlen 2048, {p['windows']}/{p['windows_total']} windows, "
                    f"{p['dtype']}; calibration {calib.nsamples} x {calib.seqlen} tokens of {calib.source.variant} "
                    f"{calib.source.split}, seed 0")
        print(f"protocol: {protocol}\nmachine at start: {start}\nfull precision: {fp['value']:.3f}", flush=True)
        for bits in [int(b) for b in args.bits.split(",")]:
            label = f"w{bits} g{args.group_size}"
            for extra in [{}] + [json.loads(a) for a in args.also]:
                model = copy.deepcopy(lm.model)
                stage = {"method": "awq", "bits": bits, "group_size": args.group_size, **extra}
                t0 = time.perf_counter()
                model = Recipe.from_specs([stage]).run(model, RunContext(calibration=calib, progress=False))
                secs = time.perf_counter() - t0
                ppl = perplexity(model, lm.tokenizer, "wikitext2", **ev)["value"]
                del model
                name = "compress AWQ" + (f" {json.dumps(extra)}" if extra else "")
                print(f"{label}  {name}: ppl {ppl:.3f}  {secs:.0f} s", flush=True)
                if not extra:
                    ours_ppl, ours_s = ppl, secs
            job = {"model_dir": str(tmp / "model"), "calib": str(tmp / "calib.safetensors"), "bits": bits,
                   "group_size": args.group_size, "sym": False, "method": "awq", "out": str(tmp / f"peer-{bits}.safetensors")}
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            res = subprocess.run([str(py), str(REPO / "bench" / "_llmcompressor_worker.py"), json.dumps(job)],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
                raise SystemExit(f"llm-compressor AWQ failed for {label}")
            peer = json.loads(res.stdout.strip().splitlines()[-1])
            model = copy.deepcopy(lm.model)
            for name, w in load_file(job["out"]).items():
                model.get_submodule(name[: -len(".weight")]).weight.data.copy_(w)
            # llm-compressor folds its scales into the norms too: copy every other tensor it changed
            copy_peer_parameters(model, job["out"].replace(".safetensors", "-rest.safetensors"))
            peer_ppl = perplexity(model, lm.tokenizer, "wikitext2", **ev)["value"]
            del model
            print(f"{label}  llm-compressor AWQ: ppl {peer_ppl:.3f}  {peer['seconds']:.0f} s  ({peer['versions']})", flush=True)
            rows.append((label, ours_ppl, ours_s, peer_ppl, peer["seconds"]))
    print()
    print(f"{'setting':10s} {'ppl compress':>13s} {'ppl llm-comp':>13s} {'ppl ratio':>10s} {'s compress':>11s} "
          f"{'s llm-comp':>11s} {'time ratio':>11s}")
    for label, op, os_, pp, ps in rows:
        print(f"{label:10s} {op:13.3f} {pp:13.3f} {op / pp:10.3f} {os_:11.0f} {ps:11.0f} {os_ / ps:11.2f}")
    print(f"(full precision {fp['value']:.3f}; {protocol}; grid asymmetric; ratios are compress / llm-compressor: below 1 "
          f"is better for compress; machine at end: {machine()['uptime']})")


if __name__ == "__main__":
    main()
