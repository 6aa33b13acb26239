"""OWQ's and OWL's reference-code options beside this project's earlier choices, side by side on the real model.

    python bench/reference_options.py                 # OWQ w3 g128 3.01 (4 variants) and OWL 70% (2 mappings)
    python bench/reference_options.py --only owl      # one family

Protocols (those of docs/benchmarks.md, so the rows compare with the numbers there):
* OWQ: calibration 16 x 256 tokens of WikiText-2 validation (the data kit's), seed 0; perplexity WikiText-2 raw test,
  8 windows of 512 tokens; bfloat16 (tests/test_real_gptq_owq.py's protocol). 3-bit asymmetric, group 128.
* OWL: calibration 64 x 512 tokens of WikiText-2 validation, seed 0; perplexity WikiText-2 raw test, 16 windows of
  2048 tokens; bfloat16 (bench/pruning_table.py's protocol); 70% unstructured, M 5, lambda 0.08.
Prints the machine's load (uptime), the date, the commit and each run's time.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import subprocess
import time
from pathlib import Path

import torch

from compress.evals.perplexity import perplexity
from compress.evals.size import model_size
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import get_calibration
from compress.sources.models import load_model

OWQ = {
    "owq budget + layer grid (before)": {},
    "owq reference allocation + layer grid": {"allocation": "reference"},
    "owq budget + reference grid": {"sensitivity_grid": "reference"},
    "owq reference allocation + reference grid (--paper-protocol's)": {"allocation": "reference",
                                                                      "sensitivity_grid": "reference"},
}
OWL = {"owl wanda bounded (before)": {"mapping": "bounded"}, "owl wanda reference (now default)": {"mapping": "reference"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("owq", "owl"), default=None)
    ap.add_argument("--new-only", action="store_true", help="only the reference variants (the 'before' rows are the "
                                                             "documented numbers, same protocol)")
    args = ap.parse_args()
    commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}  commit {commit}  "
          f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    loaded = load_model("smollm2", dtype="bfloat16")
    tok = loaded.tokenizer
    if args.only in (None, "owq"):
        calib = get_calibration("wikitext2", tok, nsamples=16, seqlen=256, seed=0)
        for label, opts in OWQ.items():
            if args.new_only and "reference allocation + reference grid" not in label:
                continue
            t0 = time.perf_counter()
            recipe = Recipe.from_specs([{"method": "owq", "bits": 3, "group_size": 128, "target_bits": 3.01, **opts}])
            model = recipe.run(copy.deepcopy(loaded.model), RunContext(calibration=calib, progress=False))
            ppl = perplexity(model, tok, "wikitext2", seqlen=512, max_windows=8, progress=False)["value"]
            weak = recipe.stages[0].report["weak_columns_total"]
            print(f"{label:66s} ppl {ppl:8.3f}  {model_size(model)['bits_per_weight']} bits/weight  "
                  f"{weak} weak columns  {time.perf_counter() - t0:.0f} s", flush=True)
            del model
    if args.only in (None, "owl"):
        calib = get_calibration("wikitext2", tok, nsamples=64, seqlen=512, seed=0)
        for label, opts in OWL.items():
            if args.new_only and "before" in label:
                continue
            t0 = time.perf_counter()
            recipe = Recipe.from_specs([{"method": "owl", "sparsity": 0.7, "outlier_m": 5, "lam": 0.08, **opts}])
            model = recipe.run(copy.deepcopy(loaded.model), RunContext(calibration=calib, progress=False))
            ppl = perplexity(model, tok, "wikitext2", seqlen=2048, max_windows=16, progress=False)["value"]
            sp = recipe.stages[0].report["layer_sparsities"]
            print(f"{label:66s} ppl {ppl:8.3f}  layer sparsities {min(sp):.4f}..{max(sp):.4f} "
                  f"(spread {max(sp) - min(sp):.4f}, mean {sum(sp) / len(sp):.4f})  {time.perf_counter() - t0:.0f} s",
                  flush=True)
            del model
    print(f"end {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
