"""The pruning table of the README, measured side by side in one run on the real model (SmolLM2-135M).

Runs each configuration through the real command line (`compress prune ...` / `compress recipe ...`), one after the
other with one protocol, so that every number lands in the results store with its protocol, then prints perplexity,
its ratio to magnitude pruning at the same sparsity, achieved sparsity and bits per weight.

    python bench/pruning_table.py --results-dir results/pruning            # everything (hours on 2 busy cores)
    python bench/pruning_table.py --only wanda-50,magnitude-50 --nsamples 32 --eval-windows 8   # a quick look
    python bench/pruning_table.py --report-only --results-dir results/pruning                   # print the table

About 4-bit rows: the model's linears were GGUF Q4_1 (asymmetric 4-bit, groups of 32), so 4-bit asymmetric group 32
would be lossless by construction; the joint rows use group 128.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> (verb arguments or a recipe, the magnitude row it is compared with)
CONFIGS: dict[str, tuple[list[str] | list[dict], str | None]] = {
    "magnitude-50": (["prune", "--method", "magnitude", "--sparsity", "0.5"], None),
    "wanda-50": (["prune", "--method", "wanda", "--sparsity", "0.5"], "magnitude-50"),
    "sparsegpt-50": (["prune", "--method", "sparsegpt", "--sparsity", "0.5"], "magnitude-50"),
    "magnitude-2:4": (["prune", "--method", "magnitude", "--pattern", "2:4"], None),
    "wanda-2:4": (["prune", "--method", "wanda", "--pattern", "2:4"], "magnitude-2:4"),
    "sparsegpt-2:4": (["prune", "--method", "sparsegpt", "--pattern", "2:4"], "magnitude-2:4"),
    "magnitude-70": (["prune", "--method", "magnitude", "--sparsity", "0.7"], None),
    "wanda-70": (["prune", "--method", "wanda", "--sparsity", "0.7"], "magnitude-70"),
    "owl-70": (["prune", "--method", "owl", "--sparsity", "0.7"], "magnitude-70"),
    "sparsegpt-70": (["prune", "--method", "sparsegpt", "--sparsity", "0.7"], "magnitude-70"),
    "owl-sparsegpt-70": (["prune", "--method", "owl", "--sparsity", "0.7", "--base", "sparsegpt"], "magnitude-70"),
    "sparsegpt-50+w4g128": (["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--bits", "4", "--group-size", "128"], "magnitude-50"),
    "wanda-50->gptq-w4g128": ([{"method": "wanda", "sparsity": 0.5}, {"method": "gptq", "bits": 4, "group_size": 128}], "magnitude-50"),
    "gptq-w4g128": (["quantize", "--method", "gptq", "--bits", "4", "--group-size", "128"], None),
}


def run(name: str, args: argparse.Namespace) -> None:
    verb, _ = CONFIGS[name]
    common = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib", args.calib,
              "--eval-seqlen", str(args.eval_seqlen), "--eval-windows", str(args.eval_windows),
              "--results-dir", args.results_dir, "--no-progress"]
    if args.save:
        common += ["--output", str(Path(args.save) / name.replace(":", "_")), "--overwrite"]
    else:
        common += ["--no-save"]
    if isinstance(verb[0], dict):
        import yaml

        recipe = Path(tempfile.mkdtemp()) / f"{name.replace(':', '_')}.yaml"
        recipe.write_text(yaml.safe_dump({"stages": verb}))
        cmd = ["recipe", str(recipe)]
    else:
        cmd = list(verb)
    print(f"== {name}: compress {' '.join(cmd + common)}", flush=True)
    subprocess.run([sys.executable, "-c", "from compress.cli import main; main()", *cmd, *common], check=True)


def report(args: argparse.Namespace) -> None:
    from compress.runs.results import read_records

    rows = {}  # the latest record of each configuration, recognised by its recipe
    for r in read_records(args.results_dir):
        name = _match(r)
        if name:
            rows[name] = r
    print(f"{'configuration':24s} {'ppl':>10s} {'vs magnitude':>13s} {'sparsity':>9s} {'bits/w':>7s} {'disk MB':>8s}  protocol")
    base = next((r for r in rows.values()), None)
    if base:
        b = base["metrics"]["before"].get("ppl_wikitext2") or {}
        if b:
            print(f"{'dense (bf16)':24s} {b['value']:10.3f} {'':>13s} {0:9.3f} {16:7.2f} {'':>8s}")
    for name, (_, ref) in CONFIGS.items():
        r = rows.get(name)
        if r is None:
            continue
        a = r["metrics"]["after"]["ppl_wikitext2"]
        ratio = ""
        if ref and ref in rows:
            ratio = f"{a['value'] / rows[ref]['metrics']['after']['ppl_wikitext2']['value']:.3f}"
        det = r.get("details", {})
        sp = next((d.get("sparsity") for d in det.values() if isinstance(d, dict) and "sparsity" in d), None)
        disk = r["size"].get("checkpoint_bytes")
        p = a["protocol"]
        c = r.get("calibration") or {}
        proto = (f"{p['variant']} {p['split']} seqlen {p['seqlen']} x {p['windows']}/{p['windows_total']} windows; "
                 f"calib {c.get('dataset', '-')} {c.get('nsamples', '-')}x{c.get('seqlen', '-')}")
        print(f"{name:24s} {a['value']:10.3f} {ratio:>13s} {sp if sp is not None else float('nan'):9.3f} "
              f"{r['size']['bits_per_weight']:7.2f} {disk / 1e6 if disk else float('nan'):8.1f}  {proto}")


def _match(rec: dict) -> str | None:
    stages = rec.get("recipe") or []
    names = [s["method"] for s in stages]
    cfgs = [s["config"] for s in stages]
    if names == ["wanda", "gptq"]:
        return "wanda-50->gptq-w4g128"
    if names == ["gptq"]:
        return "gptq-w4g128" if cfgs[0]["bits"] == 4 and cfgs[0]["group_size"] == 128 else None
    if len(names) != 1:
        return None
    m, c = names[0], cfgs[0]
    if m == "magnitude" and c.get("scope", "layer") != "layer":  # the table's magnitude rows rank whole layers
        return None
    if c.get("pattern", "unstructured") != "unstructured":
        return f"{m}-{c['pattern']}"
    s = int(round(100 * (c.get("sparsity") or 0.5)))
    if m == "sparsegpt" and c.get("bits"):
        return f"sparsegpt-{s}+w{c['bits']}g{c['group_size']}"
    if m == "owl" and c.get("base") == "sparsegpt":
        return f"owl-sparsegpt-{s}"
    return f"{m}-{s}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations (default: all)")
    ap.add_argument("--calib", default="wikitext2")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", default="16")
    ap.add_argument("--results-dir", default="results/pruning")
    ap.add_argument("--save", default=None, help="write each checkpoint under this folder (default: no checkpoints)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        for name in args.only.split(","):
            if name not in CONFIGS:
                sys.exit(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
            run(name, args)
    report(args)


if __name__ == "__main__":
    main()
