"""LLM-Pruner's importance estimate against the structured baselines on SmolLM2-135M, side by side in one run: the
same pruned shapes for every row (only which heads / MLP channels go differs), the same calibration sequences and
evaluation windows; random over several seeds, since one random draw says little.

    python bench/llm_pruner_baselines.py                      # ratio 0.2, random seeds 0..7
    python bench/llm_pruner_baselines.py --seeds 3 --eval-windows 4
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time


def main() -> None:
    import compress

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, default=8, help="random baseline seeds 0..N-1")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--round-to", type=int, default=1)
    args = ap.parse_args()

    loaded = compress.load("smollm2", dtype="bfloat16")
    tok = loaded.tokenizer
    calib = compress.calibration(tok, "wikitext2", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    ev = dict(seqlen=args.eval_seqlen, windows=args.eval_windows, progress=False)
    print(f"SmolLM2-135M-Instruct bfloat16, llm-pruner --ratio {args.ratio} --round-to {args.round_to}; Taylor "
          f"calibration wikitext2 {args.nsamples} x {args.seqlen}; perplexity wikitext2 raw test "
          f"{args.eval_windows} x {args.eval_seqlen}", flush=True)
    dense = compress.evaluate(loaded.model, tok, "wikitext2", **ev)["value"]
    print(f"{'importance':<22}{'ppl':>12}{'s':>7}\n{'dense':<22}{dense:>12.2f}", flush=True)

    def run(importance: str, seed: int = 0) -> float:
        t0 = time.perf_counter()
        model = compress.apply(copy.deepcopy(loaded.model), "llm-pruner", calibration=calib, device="cpu", seed=seed,
                               progress=False, ratio=args.ratio, round_to=args.round_to, importance=importance)
        ppl = compress.evaluate(model, tok, "wikitext2", **ev)["value"]
        label = importance + (f" seed {seed}" if importance == "random" else "")
        print(f"{label:<22}{ppl:>12.2f}{time.perf_counter() - t0:>7.0f}", flush=True)
        return ppl

    ppl = {imp: run(imp) for imp in ("taylor", "magnitude", "magnitude-l1")}
    rand = [run("random", s) for s in range(args.seeds)]
    med = statistics.median(rand)
    print(f"random over {len(rand)} seeds: median {med:.2f}, min {min(rand):.2f}, max {max(rand):.2f}")
    for imp, p in ppl.items():
        below = sum(r < p for r in rand)
        print(f"{imp:<14} {p:.2f}: {p / dense:.2f}x dense, {p / med:.2f}x the random median; "
              f"{below} of {len(rand)} random seeds are lower")


if __name__ == "__main__":
    main()
