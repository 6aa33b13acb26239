"""This project's GPTQ against llm-compressor's GPTQ, side by side in one run, on the offline SmolLM2-135M.

Both tools get the very same calibration samples (128 x 512 tokens of the data kit's WikiText-2 validation text,
seed 0, drawn by compress.calibration) and the same grid (bits, group size, symmetric or not); both quantized models
are then measured by the same perplexity code (compress.evaluate: WikiText-2 test, seqlen 2048; --eval picks the raw
or the tokenized v1 text, --eval-windows caps the windows). Wall time is that of the compression call alone:
compress.apply and llm-compressor's oneshot(), each with its library defaults (ours: act-order with static groups,
dampening 0.01, block 128; llm-compressor 0.14: actorder "static", dampening_frac 0.01, block_size 128).

llm-compressor pins another transformers, so it runs in its own virtual environment, created on first use in
$COMPRESS_CACHE_DIR/venvs/llmcompressor-0.14 (torch pinned to the CPU wheel 2.13.0 by a constraint) and reused
afterwards; it is a benchmark-only dependency. llm-compressor refuses groups that do not divide the model's width
(576), hence group 64 and per-channel by default.

    python bench/gptq_vs_llmcompressor.py                      # groups 64 and per-channel, 4-bit asymmetric
    python bench/gptq_vs_llmcompressor.py --groups 64 --sym --eval-windows 32
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

PEER = "llmcompressor==0.14.0.1"
TORCH_PIN = "torch==2.13.0"


def peer_python(venv: Path) -> Path:
    """The peer venv's python (bench/_peer.py), created on first use."""
    from bench._peer import peer_python as make

    return make(venv, PEER, TORCH_PIN, ())


def main() -> None:
    import compress
    from compress.core.paths import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default="64,-1", help="group sizes, comma-separated (-1: per channel)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sym", action="store_true", help="symmetric grid for both tools (default: asymmetric)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval", default="wikitext2", help="wikitext2 (raw) or wikitext2-v1 (tokenized)")
    ap.add_argument("--eval-windows", default="all", help="windows of 2048 tokens to use, or all")
    ap.add_argument("--also", action="append", default=[], metavar="JSON",
                    help='another compress GPTQ setting to run beside the default, e.g. \'{"act_order": false}\'; repeatable')
    ap.add_argument("--venv", default=None, help="peer venv folder (default: $COMPRESS_CACHE_DIR/venvs/llmcompressor-0.14)")
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    windows = None if args.eval_windows == "all" else int(args.eval_windows)
    os.environ.setdefault("COMPRESS_DATA_DIR", str(REPO.parent / "shared" / "data"))

    py = peer_python(Path(args.venv) if args.venv else cache_dir() / "venvs" / "llmcompressor-0.14")
    lm = compress.load("smollm2", dtype="bfloat16")
    calib = compress.calibration(lm.tokenizer, "wikitext2", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    ev = dict(seqlen=2048, windows=windows, progress=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptq-bench-") as tmp:
        tmp = Path(tmp)
        lm.model.save_pretrained(tmp / "model")
        lm.tokenizer.save_pretrained(tmp / "model")
        from safetensors.torch import load_file, save_file

        save_file({"ids": calib.input_ids.contiguous()}, str(tmp / "calib.safetensors"))
        fp = compress.evaluate(lm.model, lm.tokenizer, args.eval, **ev)
        proto = fp["protocol"]
        print(f"protocol: {proto['variant']} {proto['split']}, seqlen 2048, {proto['windows']}/{proto['windows_total']} "
              f"windows, {proto['dtype']}; calibration {calib.nsamples} x {calib.seqlen} tokens of "
              f"{calib.source.variant} {calib.source.split}, seed 0", flush=True)
        print(f"full precision: {fp['value']:.3f}", flush=True)
        for g in groups:
            label = f"w{args.bits} {'per-channel' if g == -1 else f'g{g}'}{' sym' if args.sym else ''}"
            # this project: its defaults, then any --also variants
            for extra in [{}] + [json.loads(a) for a in args.also]:
                model = copy.deepcopy(lm.model)
                stage = {"method": "gptq", "bits": args.bits, "group_size": g, "sym": args.sym, **extra}
                t0 = time.perf_counter()
                model = compress.apply(model, [stage], calibration=calib, device="cpu", progress=False)
                secs = time.perf_counter() - t0
                ppl = compress.evaluate(model, lm.tokenizer, args.eval, **ev)["value"]
                del model
                name = "compress GPTQ" + (f" {json.dumps(extra)}" if extra else "")
                print(f"{label}  {name}: ppl {ppl:.3f}  {secs:.0f} s", flush=True)
                if not extra:
                    ours_ppl, ours_s = ppl, secs
            # the peer, in its own venv, on the same samples
            job = {"model_dir": str(tmp / "model"), "calib": str(tmp / "calib.safetensors"), "bits": args.bits,
                   "group_size": g, "sym": args.sym, "out": str(tmp / f"peer-{g}.safetensors")}
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            res = subprocess.run([str(py), str(REPO / "bench" / "_llmcompressor_worker.py"), json.dumps(job)],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
                raise SystemExit(f"llm-compressor failed for {label}")
            peer = json.loads(res.stdout.strip().splitlines()[-1])
            model = copy.deepcopy(lm.model)
            weights = load_file(job["out"])
            for name, w in weights.items():
                model.get_submodule(name[: -len(".weight")]).weight.data.copy_(w)
            peer_ppl = compress.evaluate(model, lm.tokenizer, args.eval, **ev)["value"]
            del model
            print(f"{label}  llm-compressor GPTQ: ppl {peer_ppl:.3f}  {peer['seconds']:.0f} s  ({peer['versions']})", flush=True)
            rows.append((label, ours_ppl, ours_s, peer_ppl, peer["seconds"]))
    print()
    print(f"{'setting':18s} {'ppl compress':>13s} {'ppl llm-comp':>13s} {'ppl ratio':>10s} {'s compress':>11s} "
          f"{'s llm-comp':>11s} {'time ratio':>11s}")
    for label, op, os_, pp, ps in rows:
        print(f"{label:18s} {op:13.3f} {pp:13.3f} {op / pp:10.3f} {os_:11.0f} {ps:11.0f} {os_ / ps:11.2f}")
    print(f"(full precision {fp['value']:.3f}; ratios are compress / llm-compressor: below 1 is better for compress)")


if __name__ == "__main__":
    main()
