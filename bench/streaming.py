"""Streaming (--stream) vs the in-memory run, side by side in one run on this machine: peak RSS and wall time of
`compress quantize` file to file, each run in its own process, for RTN and GPTQ on a synthetic LLaMA-shaped model
written to disk with random weights (default: 24 blocks of width 2048, intermediate 5504, vocab 32000, untied head,
about 1.34 B parameters, 2.7 GB in bf16), and whether the two checkpoints hold the same tensors bit for bit.
Prints a Markdown table with the date, commit, machine load (uptime) and the protocol; the model folder is deleted
at the end (--keep keeps it).

    python bench/streaming.py [--layers 24] [--hidden 2048] [--intermediate 5504] [--vocab 32000]
        [--methods rtn,gptq] [--nsamples 4] [--seqlen 512] [--dir /tmp] [--modes memory,stream] [--json out.json]
        [--keep]

Calibration: the 'pydoc' text (offline, always present) through a byte tokenizer, --nsamples x --seqlen tokens;
the grid: 4-bit asymmetric groups of 128 (GPTQ: act-order off, damp 0.01, true-sequential). No evaluation
(--eval none --no-baseline): the bench measures the compression's memory and time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def write_synthetic(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int, seed: int = 0) -> int:
    """A LLaMA-shaped transformers folder of random bf16 weights, written one block per shard (never the whole model
    in memory). Returns the bytes of its safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from compress.model.tiny import tiny_tokenizer

    folder.mkdir(parents=True)
    heads = hidden // 64
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, use_cache=False, bos_token_id=None, eos_token_id=256, pad_token_id=256)
    cfg.dtype = "bfloat16"
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    shards: list[dict] = [{"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight":
                           torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": rnd(vocab, hidden)}]
    total = 0
    weight_map = {}
    n = layers + 1
    for i in range(n):
        if i > 0:
            p = f"model.layers.{i - 1}."
            shards = [{p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                       **{p + f"self_attn.{k}_proj.weight": rnd(hidden, hidden) for k in "qkvo"},
                       p + "mlp.gate_proj.weight": rnd(intermediate, hidden),
                       p + "mlp.up_proj.weight": rnd(intermediate, hidden),
                       p + "mlp.down_proj.weight": rnd(hidden, intermediate)}]
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shards[0], str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shards[0]})
        total += sum(t.numel() * t.element_size() for t in shards[0].values())
        shards.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return total


def worker(args: list[str]) -> None:
    """One `compress quantize` in this process; prints {"peak_rss", "seconds", "exit"} as the last line."""
    from click.testing import CliRunner

    from compress.cli import main
    from compress.evals.efficiency import host_peak_rss

    t0 = time.perf_counter()
    res = CliRunner().invoke(main, args, catch_exceptions=True)
    dt = time.perf_counter() - t0
    if res.exit_code != 0:
        sys.stderr.write(res.output[-3000:] + (repr(res.exception) if res.exception else ""))
    print(json.dumps({"peak_rss": host_peak_rss(), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": dt, "exit": res.exit_code}))


def same_tensors(a: Path, b: Path) -> tuple[bool, int, str]:
    """(every tensor equal bit for bit, tensors compared, first difference), one tensor at a time."""
    import torch
    from safetensors import safe_open

    from compress.core.readers import safetensors_files

    def where(folder):
        out = {}
        for fn in safetensors_files(folder):
            with safe_open(str(folder / fn), "pt") as f:
                out.update({k: fn for k in f.keys()})
        return out

    wa, wb = where(a), where(b)
    if sorted(wa) != sorted(wb):
        return False, 0, f"names differ: {sorted(set(wa) ^ set(wb))[:3]}"
    for k in wa:
        with safe_open(str(a / wa[k]), "pt") as fa, safe_open(str(b / wb[k]), "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False, len(wa), k
    qa = json.loads((a / "config.json").read_text()).get("quantization_config")
    qb = json.loads((b / "config.json").read_text()).get("quantization_config")
    return qa == qb, len(wa), "" if qa == qb else "quantization_config differs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--modes", default="memory,stream")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="compress-stream-bench-", dir=args.dir))
    src = work / "synthetic"
    rows = []
    try:
        t0 = time.perf_counter()
        nbytes = write_synthetic(src, args.layers, args.hidden, args.intermediate, args.vocab)
        params = nbytes // 2
        print(f"synthetic model: {args.layers} blocks, width {args.hidden}, intermediate {args.intermediate}, vocab "
              f"{args.vocab}: {params / 1e9:.2f} B parameters, {nbytes / 1e9:.2f} GB bf16 "
              f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)
        for method in args.methods.split(","):
            outs = {}
            for mode in args.modes.split(","):
                out = work / f"{method}-{mode}"
                cli = ["quantize", "--method", method, "--bits", "4", "--group-size", "128", "--model", str(src),
                       "--output", str(out), "--eval", "none", "--no-baseline", "--calib", "pydoc", "--nsamples",
                       str(args.nsamples), "--seqlen", str(args.seqlen), "--no-progress", "--dtype", "bfloat16",
                       "--results-dir", str(work / "results"), "--stream", "on" if mode == "stream" else "off"]
                proc = subprocess.run([sys.executable, __file__, "--worker", *cli], capture_output=True, text=True,
                                      cwd=str(work))
                try:
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    res = {"exit": proc.returncode, "peak_rss": None, "seconds": None}
                if res["exit"] != 0:
                    print(f"{method} {mode}: failed (exit {res['exit']}): {proc.stderr[-2000:]}", flush=True)
                outs[mode] = out
                row = {"method": method, "mode": mode, **res, "model_bytes": nbytes}
                rows.append(row)
                print(f"{method} {mode}: peak RSS {res['peak_rss'] / 2**30 if res['peak_rss'] else float('nan'):.2f} GiB "
                      f"(VmHWM; ru_maxrss {(res.get('ru_maxrss') or float('nan')) / 2**30:.2f} GiB), "
                      f"{res['seconds'] or float('nan'):.0f} s", flush=True)
            if all((outs[m] / "config.json").is_file() for m in outs) and len(outs) == 2:
                ok, n, diff = same_tensors(*outs.values())
                rows.append({"method": method, "mode": "identical", "identical": ok, "tensors": n, "diff": diff})
                print(f"{method}: streamed and in-memory checkpoints identical bit for bit: {ok} ({n} tensors{', ' + diff if diff else ''})", flush=True)
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print()
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {_git('rev-parse', '--short', 'HEAD')}, "
          f"load: {uptime}; threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"model: synthetic LLaMA {args.layers} x {args.hidden} (intermediate {args.intermediate}, vocab {args.vocab}, "
          f"untied head), random bf16 weights, {nbytes / 1e9:.2f} GB; W4 g128 asymmetric; calibration pydoc "
          f"{args.nsamples} x {args.seqlen} (GPTQ); --dtype bfloat16, no evaluation")
    print()
    print("| method | run | peak RSS | RSS / model size | wall time |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["mode"] == "identical":
            continue
        rss = r["peak_rss"]
        print(f"| {r['method']} | {'streamed (--stream on)' if r['mode'] == 'stream' else 'in memory'} | "
              f"{rss / 2**30:.2f} GiB | {rss / r['model_bytes']:.2f} | {r['seconds']:.0f} s |" if rss else
              f"| {r['method']} | {r['mode']} | failed | | |")
    for r in rows:
        if r["mode"] == "identical":
            print(f"\n{r['method']}: checkpoints identical bit for bit: {r['identical']} ({r['tensors']} tensors)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
