"""This project's rotate -> GPTQ against llm-compressor's SpinQuant transform + GPTQ, side by side in one run, on
SmolLM2-135M.

Both rotate (norms folded, Hadamard rotations fused into the weights), then run GPTQ on every decoder-block linear at
the same grid (bits, group size, asymmetric) from the same calibration token sequences (C4 train, the data kit's
sample, seed 0); both models are measured by the same perplexity code (WikiText-2 raw test, seqlen 2048,
--eval-windows windows, bfloat16). Rotations: ours R1 (randomized Hadamard 576 = Paley II 36 x Sylvester 16), with
and without the online R4 before down_proj, with and without R2 (--ours picks the variants); llm-compressor's SpinQuantModifier with its offline rotations R1 and R2
(transform_type random-hadamard; R2 rotates v_proj/o_proj per head, ours with --r2 too), fused, so the bench reads
its weights into the same model. (Its R4 is a run-time hook of its own stack, not read here.) Wall time: ours is
Recipe.run (rotation and GPTQ), llm-compressor's is its oneshot().

llm-compressor runs in the peer venv bench/gptq_vs_llmcompressor.py creates ($COMPRESS_CACHE_DIR/venvs/
llmcompressor-0.14), through bench/_llmcompressor_worker.py (method "spinquant").

    python bench/rotation_vs_llmcompressor.py                                  # w4/w3/w2 g64, 32 x 512 C4, 8 windows
    python bench/rotation_vs_llmcompressor.py --bits 3 --nsamples 128 --eval-windows all
    python bench/rotation_vs_llmcompressor.py --bits 2 --observer mse                  # both tools' MSE range search
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

# our rotate stages beside llm-compressor's R1 + R2 (R4: the online Hadamard before down_proj)
OURS = {"r1+r4": {}, "r1": {"online": False}, "r1+r2+r4": {"r2": True}, "r1+r2": {"r2": True, "online": False}}


def main() -> None:
    import torch

    from bench.awq_hqq_table import machine
    from bench.gptq_vs_llmcompressor import peer_python
    from bench._peer import copy_peer_parameters
    from compress.core.paths import cache_dir
    from compress.evals.perplexity import perplexity
    from compress.pipeline.recipe import Recipe, RunContext
    from compress.sources.data import get_calibration
    from compress.sources.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", default="8", help="windows of 2048 tokens to use, or all")
    ap.add_argument("--ours", default="r1+r4,r1+r2+r4,r1", help=f"our rotations, from {', '.join(OURS)}")
    ap.add_argument("--observer", default="minmax", choices=("minmax", "mse"),
                    help="both tools' GPTQ range observer (ours --observer; llm-compressor's QuantizationArgs observer)")
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
    with tempfile.TemporaryDirectory(prefix="rotation-bench-") as tmp:
        tmp = Path(tmp)
        lm.model.save_pretrained(tmp / "model")
        lm.tokenizer.save_pretrained(tmp / "model")
        from safetensors.torch import save_file

        save_file({"ids": calib.input_ids.contiguous()}, str(tmp / "calib.safetensors"))
        fp = perplexity(lm.model, lm.tokenizer, "wikitext2", **ev)
        p = fp["protocol"]
        protocol = (f"WikiText-2 {p['variant']} {p['split']}, seqlen 2048, {p['windows']}/{p['windows_total']} windows, "
                    f"{p['dtype']}; calibration {calib.nsamples} x {calib.seqlen} tokens of {calib.source.variant} "
                    f"{calib.source.split}, seed 0; grid asymmetric; GPTQ observer {args.observer}")
        print(f"protocol: {protocol}\nmachine at start: {start}\nfull precision: {fp['value']:.3f}", flush=True)
        for bits in [int(b) for b in args.bits.split(",")]:
            label = f"w{bits} g{args.group_size}"
            ours = {}
            for name, rot in ((f"rotate({v.upper()})+gptq", OURS[v]) for v in args.ours.split(",")):
                model = copy.deepcopy(lm.model)
                stages = [{"method": "rotate", **rot}, {"method": "gptq", "bits": bits, "group_size": args.group_size,
                                                         "observer": args.observer}]
                t0 = time.perf_counter()
                model = Recipe.from_specs(stages).run(model, RunContext(calibration=calib, progress=False))
                secs = time.perf_counter() - t0
                ppl = perplexity(model, lm.tokenizer, "wikitext2", **ev)["value"]
                del model
                ours[name] = (ppl, secs)
                print(f"{label}  compress {name}: ppl {ppl:.3f}  {secs:.0f} s", flush=True)
            job = {"model_dir": str(tmp / "model"), "calib": str(tmp / "calib.safetensors"), "bits": bits,
                   "group_size": args.group_size, "sym": False, "method": "spinquant", "rotations": ["R1", "R2"],
                   "transform_type": "random-hadamard", "out": str(tmp / f"peer-{bits}.safetensors"),
                   **({"observer": args.observer} if args.observer != "minmax" else {})}
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            res = subprocess.run([str(py), str(REPO / "bench" / "_llmcompressor_worker.py"), json.dumps(job)],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
                raise SystemExit(f"llm-compressor SpinQuant + GPTQ failed for {label}")
            peer = json.loads(res.stdout.strip().splitlines()[-1])
            model = copy.deepcopy(lm.model)
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # its head is untied
            model.config.tie_word_embeddings = False
            copy_peer_parameters(model, job["out"].replace(".safetensors", "-rest.safetensors"))
            peer_ppl = perplexity(model, lm.tokenizer, "wikitext2", **ev)["value"]
            del model
            print(f"{label}  llm-compressor SpinQuant(R1,R2)+GPTQ: ppl {peer_ppl:.3f}  {peer['seconds']:.0f} s  "
                  f"({peer['versions']})", flush=True)
            rows.append((label, ours, peer_ppl, peer["seconds"]))
    print()
    print(f"{'setting':9s} {'ours':20s} {'ppl ours':>9s} {'ppl llm-comp':>13s} {'ppl ratio':>10s} {'s ours':>7s} "
          f"{'s llm-comp':>11s} {'time ratio':>11s}")
    for label, ours, pp, ps in rows:
        for name, (op, os_) in ours.items():
            print(f"{label:9s} {name:20s} {op:9.3f} {pp:13.3f} {op / pp:10.3f} {os_:7.0f} {ps:11.0f} {os_ / ps:11.2f}")
    print(f"(full precision {fp['value']:.3f}; {protocol}; ratios are compress / llm-compressor: below 1 is better for "
          f"compress; machine at end: {machine()['uptime']})")


if __name__ == "__main__":
    main()
