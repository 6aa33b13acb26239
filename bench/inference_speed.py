"""Inference speed of compressed models, side by side in one run on this machine: prefill tokens/s (a prompt of 512
tokens), decode tokens/s (128 new tokens, greedy, KV cache), peak RSS and the kernel every layer ran, for the bf16
model, RTN (and, with --gptq, GPTQ) W4 g32/g64/g128, W8 weight-only per channel, W8A8 (SmoothQuant, per-token
dynamic activations), LLM-Pruner 20%; ratios to bf16; llama.cpp on the model's own GGUF as the reference line when a
Python with llama-cpp-python is given (--llama-python). Median of --repeats runs after one warm-up (bench protocol
of compress.evals.efficiency). Prints a Markdown table with the date, commit, machine load (uptime) and threads.

    python bench/inference_speed.py [--repeats 3] [--prompt-len 512] [--decode-tokens 128] [--gptq]
        [--llama-python /path/to/python] [--only bf16,rtn-w4-g64] [--json out.json] [--threads N]
        [--compile bf16,rtn-w4-g64,rtn-w8-ch]   # adds "<variant> compiled" rows and their compile seconds
    (variants "...+emb8" also quantize the embedding and the tied head, as --quantize-embeddings 8)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from compress.evals.efficiency import kernel_report, measure_speed
from compress.evals.size import model_size
from compress.layers.kernels import select_kernels
from compress.layers.quant_embedding import quantize_embeddings
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import get_calibration
from compress.sources.models import default_gguf_path, load_model

REPO = Path(__file__).resolve().parent.parent

VARIANTS = {  # name -> (stages, needs calibration)
    "bf16": ([], False),
    "rtn-w4-g32": ([{"method": "rtn", "bits": 4, "group_size": 32}], False),
    "rtn-w4-g64": ([{"method": "rtn", "bits": 4, "group_size": 64}], False),
    "rtn-w4-g128": ([{"method": "rtn", "bits": 4, "group_size": 128}], False),
    "gptq-w4-g32": ([{"method": "gptq", "bits": 4, "group_size": 32}], True),
    "gptq-w4-g64": ([{"method": "gptq", "bits": 4, "group_size": 64}], True),
    "gptq-w4-g128": ([{"method": "gptq", "bits": 4, "group_size": 128}], True),
    "rtn-w8-ch": ([{"method": "rtn", "bits": 8, "group_size": -1}], False),
    "w8a8-smoothquant": ([{"method": "smoothquant"}], True),
    "llm-pruner-20%": ([{"method": "llm-pruner", "ratio": 0.2}], True),
    # + the token embedding and the tied LM head quantized (--quantize-embeddings 8: int8 per row, the head on the int8
    # kernel): at batch-1 decode the bf16 head is 28M of the model's 135M weights, read every token
    "rtn-w4-g64+emb8": ([{"method": "rtn", "bits": 4, "group_size": 64}], False),
    "rtn-w4-g32+emb8": ([{"method": "rtn", "bits": 4, "group_size": 32}], False),
}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _llama_cpp(python: str, args) -> dict | None:
    gguf = str(default_gguf_path())
    cmd = [python, str(REPO / "bench" / "_llama_cpp_worker.py"), gguf, str(args.prompt_len), str(args.decode_tokens),
           str(args.repeats), str(torch.get_num_threads())]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"llama.cpp not measured: {type(e).__name__}: {getattr(e, 'stderr', '') or e}".splitlines()[0])
        return None
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["gguf"] = os.path.basename(gguf)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gptq", action="store_true", help="also GPTQ W4 (same layouts as RTN; needs calibration)")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration sequences (wikitext2 train, 512 tokens)")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python, for the reference line")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); on a shared machine "
                                                              "1 thread avoids thread-pool stalls")
    ap.add_argument("--compile", default=None, metavar="VARIANTS",
                    help="also a compiled row (static KV cache + torch.compile'd decode step) of each of these "
                         "comma-separated variants ('all': every variant run), e.g. bf16,rtn-w4-g64,rtn-w8-ch")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in VARIANTS if args.only is None or n in args.only.split(",")]
    if not args.gptq and args.only is None:
        names = [n for n in names if not n.startswith("gptq")]
    compiled = set(names if args.compile == "all" else (args.compile or "").split(",")) - {""}
    if compiled - set(names):
        sys.exit(f"--compile {args.compile}: {', '.join(sorted(compiled - set(names)))} not among the variants run "
                 f"({', '.join(names)})")
    head = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "--short", "HEAD") + ("+dirty" if _git("status", "--porcelain") else ""),
            "uptime_before": _uptime(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "protocol": f"batch 1, prompt {args.prompt_len} random token ids (seed 0), {args.decode_tokens} new tokens "
                        f"greedy with KV cache, median of {args.repeats} after 1 warm-up, eager PyTorch"
                        + ("; compiled rows: static KV cache, torch.compile(dynamic=False) of the one-token decode "
                           "step, eager prefill with compiled de-quantization, compile = the warm-up's first "
                           "compiled step (compile + 1 token) [+ the de-quantization's compile, per layer shape]"
                           if compiled else ""),
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "default (/tmp/torchinductor_<user>)",
            "calibration": f"wikitext2 train, {args.nsamples} x 512 tokens (GPTQ, SmoothQuant, LLM-Pruner)"}
    loaded = load_model(args.model, dtype="bfloat16")
    base, tok = loaded.model, loaded.tokenizer
    calib = None
    if any(VARIANTS[n][1] for n in names):
        calib = get_calibration("wikitext2", tok, nsamples=args.nsamples, seqlen=512, seed=0)
    rows = {}
    for name in names:
        stages, needs = VARIANTS[name]
        model = base if not stages else Recipe.from_specs(stages).run(
            copy.deepcopy(base), RunContext(tokenizer=tok, calibration=calib if needs else None, progress=False,
                                            model_dtype=torch.bfloat16))
        if "+emb" in name:  # "...+emb<bits>": --quantize-embeddings <bits>
            quantize_embeddings(model, int(name.rsplit("+emb", 1)[1]))
            select_kernels(model)
        kern = kernel_report(model)
        for row, comp in ((name, False), (f"{name} compiled", True)):
            if comp and name not in compiled:
                continue
            try:
                speed = measure_speed(model, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                                      repeats=args.repeats, compile=comp)
            except Exception as e:  # a compile failure is a result to record, not a crash of the other rows
                if not comp:
                    raise
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"{row}: not measured: {msg}", flush=True)
                rows[row] = {"error": msg}
                continue
            rows[row] = {"prefill": speed["prefill_tokens_per_second"], "decode": speed["decode_tokens_per_second"],
                         "peak_rss_mib": round(speed["peak_memory_bytes"] / 2**20, 1),
                         "bits_per_weight": model_size(model)["bits_per_weight"],
                         "kernels": dict(Counter(kern["per_layer"].values())),
                         "compile_seconds": speed.get("compile_seconds"),
                         "dequant_compile_seconds": speed.get("dequant_compile_seconds")}
            print(f"{row}: prefill {rows[row]['prefill']:.1f} tok/s, decode {rows[row]['decode']:.2f} tok/s"
                  + (f", compile {rows[row]['compile_seconds']:.1f} s" if comp else ""), flush=True)
        if model is not base:
            del model
            gc.collect()
    llama = _llama_cpp(args.llama_python, args) if args.llama_python else None
    head["uptime_after"] = _uptime()
    _print_table(head, rows, llama)
    if args.json:
        Path(args.json).write_text(json.dumps({"head": head, "rows": rows, "llama_cpp": llama}, indent=2))


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def _short(kernel: str) -> str:
    for key, short in (("int4 weight-only", "int4 kernel"), ("int8 weight-only", "int8 kernel"),
                       ("int8 x int8", "int8 x int8 _int_mm"), ("dequantize-on-the-fly", "dequantize fallback"),
                       ("dense", "bf16 matmul")):
        if key in kernel:
            return short
    return kernel[:40]


def _print_table(head: dict, rows: dict, llama: dict | None) -> None:
    ref = rows.get("bf16")
    print(f"\n{head['date']} · commit {head['commit']} · torch {head['torch']} · {head['threads']} threads\n"
          f"load before: {head['uptime_before']}\nload after:  {head['uptime_after']}\n{head['protocol']}; "
          f"{head['calibration']}\n")
    print("| model | prefill tok/s | × bf16 | decode tok/s | × bf16 | compile s | peak RSS MiB | bits/weight | "
          "kernels (layers) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | not measured: {r['error']} | | | | | | | |")
            continue
        kern = Counter()
        for k, n in r["kernels"].items():
            kern[_short(k)] += n
        pr = f"{r['prefill'] / ref['prefill']:.2f}" if ref else "-"
        dr = f"{r['decode'] / ref['decode']:.2f}" if ref else "-"
        ks = ", ".join(f"{k} ({n})" for k, n in kern.most_common())
        cs = f"{r['compile_seconds']:.1f}" if r.get("compile_seconds") is not None else "-"
        if r.get("dequant_compile_seconds") is not None:
            cs += f" + {r['dequant_compile_seconds']:.1f}"  # the decode step + the prefill's de-quantization
        print(f"| {name} | {r['prefill']:.1f} | {pr} | {r['decode']:.2f} | {dr} | {cs} | {r['peak_rss_mib']:.0f} | "
              f"{r['bits_per_weight']} | {ks} |")
    if llama:
        pr = f"{llama['prefill_tokens_per_second'] / ref['prefill']:.2f}" if ref else "-"
        dr = f"{llama['decode_tokens_per_second'] / ref['decode']:.2f}" if ref else "-"
        print(f"| llama.cpp {llama['llama_cpp_version']} ({llama['gguf']}) | {llama['prefill_tokens_per_second']:.1f} "
              f"| {pr} | {llama['decode_tokens_per_second']:.2f} | {dr} | - | - | - | llama.cpp |")
    else:
        print("| llama.cpp | not measured | | | | | | | |")


if __name__ == "__main__":
    sys.exit(main())
