"""Our GGUF files against llama.cpp's own quantizer, all measured by llama.cpp, side by side in one run.

    python bench/gguf_vs_llamacpp.py                                   # defaults below (~15 min on 2 busy cores)
    python bench/gguf_vs_llamacpp.py --nsamples 16 --eval-windows 8    # quicker

Rows: F16 (our float export of SmolLM2-135M-Instruct), llama.cpp's `llama_model_quantize` of that F16 file to Q4_0 /
Q4_1 / Q8_0, and our exports written from the methods' codes: RTN and GPTQ 4-bit symmetric group 32 (Q4_0) on the
plain symmetric grid (scale 2 max|w| / 15) and on ggml's signed-scale grid (`--signed-scale`: d = m / -8 with m the
signed extreme, the rule of llama.cpp's own Q4_0, so "RTN Q4_0 signed" is llama.cpp's quantizer up to rounding), GPTQ
4-bit asymmetric group 32 (Q4_1), RTN 8-bit symmetric group 32 (Q8_0). For every file llama.cpp (llama-cpp-python)
measures the perplexity on compress's windows (WikiText-2 raw test, the model's tokenizer, non-overlapping windows,
no BOS), the file size, and the greedy decode speed (32 tokens after a 7-token prompt, batch 1); for our rows
compress's own float32 perplexity of the same model is printed beside it.

About 4-bit on this model: its linears were GGUF Q4_1 (asymmetric 4-bit, groups of 32), so the Q4_1 rows (4-bit
asymmetric g32, ours and llama.cpp's) are lossless by construction and say little; the Q4_0 rows (symmetric) are not.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

OURS = {
    "ours RTN Q4_0": [{"method": "rtn", "bits": 4, "group_size": 32, "sym": True}],
    "ours GPTQ Q4_0": [{"method": "gptq", "bits": 4, "group_size": 32, "sym": True}],
    # ggml's own Q4_0 grid (the signed extreme on code 0, all 16 levels): RTN on it is llama.cpp's Q4_0
    "ours RTN Q4_0 signed": [{"method": "rtn", "bits": 4, "group_size": 32, "sym": True, "signed_scale": True}],
    "ours GPTQ Q4_0 signed": [{"method": "gptq", "bits": 4, "group_size": 32, "sym": True, "signed_scale": True}],
    "ours GPTQ Q4_1": [{"method": "gptq", "bits": 4, "group_size": 32, "sym": False}],
    "ours RTN Q8_0": [{"method": "rtn", "bits": 8, "group_size": 32, "sym": True}],
}
THEIRS = ("Q4_0", "Q4_1", "Q8_0")


def _types(path: Path) -> str:
    import gguf

    counts: dict[str, int] = {}
    tensors = gguf.GGUFReader(str(path)).tensors
    for t in tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    emb = next(t.tensor_type.name for t in tensors if t.name == "token_embd.weight")
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items())) + f" (token_embd {emb})"


def main() -> None:
    from compress.evals.llamacpp import llama_cpp_available, llamacpp_greedy, llamacpp_perplexity, llamacpp_quantize, load_gguf
    from compress.evals.perplexity import perplexity
    from compress.formats.gguf import write_gguf
    from compress.pipeline.recipe import Recipe, RunContext
    from compress.sources.data import get_calibration
    from compress.sources.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--only", default=None, help="comma-separated rows, measured in the order given (default: all)")
    ap.add_argument("--out", default=None, help="folder for the .gguf files (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (1 is faster on an "
                    "oversubscribed machine: its threads spin at every barrier)")
    args = ap.parse_args()
    reason = llama_cpp_available()
    if reason:
        raise SystemExit(reason)
    import llama_cpp

    data_dir = os.environ.get("COMPRESS_DATA_DIR")
    out = Path(args.out or tempfile.mkdtemp(prefix="gguf-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    threads = args.threads
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  commit {commit}  "
          f"llama-cpp-python {llama_cpp.__version__}  {threads} threads\nload: {uptime}")
    print(f"model SmolLM2-135M-Instruct (float32 in compress); calibration c4 train {args.nsamples} x "
          f"{args.seqlen} (seed 0); perplexity wikitext2 raw test, seqlen {args.eval_seqlen}, {args.eval_windows} "
          "windows, the model's tokenizer, measured by llama.cpp", flush=True)
    loaded = load_model("smollm2", dtype="float32")
    tok = loaded.tokenizer
    prompt = tok("The history of the city begins in", return_tensors="pt").input_ids[0].tolist()
    ev = dict(seqlen=args.eval_seqlen, max_windows=args.eval_windows, data_dir=data_dir)
    rows = []

    def measure(name: str, path: Path, ours_ppl: float | None = None, note: str = "") -> None:
        llm = load_gguf(path, n_ctx=args.eval_seqlen, threads=threads)
        ppl = llamacpp_perplexity(path, tok, "wikitext2", llm=llm, **ev)
        gen = llamacpp_greedy(path, prompt, 32, llm=llm, threads=threads)
        del llm
        row = {"row": name, "llama.cpp ppl": round(ppl["value"], 4), "bytes": path.stat().st_size,
               "decode tok/s": gen["decode_tokens_per_s"], "compress ppl": None if ours_ppl is None else round(ours_ppl, 4),
               "types": _types(path), "eval s": ppl["seconds"], "note": note}
        rows.append(row)
        print(f"{name:<22}{row['llama.cpp ppl']:>12.4f}{row['bytes'] / 2**20:>10.2f} MiB{row['decode tok/s']:>10.1f}"
              f"{'' if ours_ppl is None else f'{ours_ppl:>13.4f}':>13}  {row['types']}  {note}", flush=True)

    print(f"{'row':<22}{'llama.cpp ppl':>12}{'size':>14}{'dec tok/s':>10}{'compress ppl':>13}  tensor types", flush=True)
    f16 = out / "f16.gguf"
    write_gguf(loaded.model, tok, f16, name="SmolLM2-135M-Instruct")  # llama.cpp's quantizer starts from this file
    calib = get_calibration("c4", tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0, data_dir=data_dir)
    names = ["F16", *[f"llama.cpp {ft}" for ft in THEIRS], *OURS]
    order = [n.strip() for n in args.only.split(",")] if args.only else names
    unknown = [n for n in order if n not in names]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(names)}")
    for name in order:  # in the order asked for
        if name == "F16":
            fp = perplexity(loaded.model, tok, "wikitext2", progress=False, **ev)["value"]
            measure("F16", f16, fp, "our float export")
        elif name.startswith("llama.cpp "):
            ft = name.split()[1]
            t0 = time.perf_counter()
            path = llamacpp_quantize(f16, out / f"llamacpp-{ft}.gguf", ft)
            measure(name, path, None, f"llama_model_quantize of F16 ({time.perf_counter() - t0:.1f} s)")
        else:
            stages = OURS[name]
            model = load_model("smollm2", dtype="float32").model
            ctx = RunContext(tokenizer=tok, calibration=calib, progress=False, model_dtype=torch.float32)
            t0 = time.perf_counter()
            model = Recipe.from_specs(stages).run(model, ctx)
            secs = time.perf_counter() - t0
            ours = perplexity(model, tok, "wikitext2", progress=False, **ev)["value"]
            path = out / (name.replace(" ", "-").lower() + ".gguf")
            write_gguf(model, tok, path, name="SmolLM2-135M-Instruct " + name)
            measure(name, path, ours, f"from the codes; {stages[0]['method']} {secs:.0f} s")
            del model
    print(f"files in {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "load": uptime, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
