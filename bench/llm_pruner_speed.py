"""Prefill speed of an LLM-Pruner model against the dense model, measured side by side in one run.

Prefill = one forward pass over the prompt with a KV cache and only the last position's logits, which is what
`generate` runs before the first new token. Dense and pruned passes alternate (so a busy machine slows both alike)
and the median of each is compared.

    python bench/llm_pruner_speed.py                          # prune the default model to --ratio 0.2 in memory
    python bench/llm_pruner_speed.py --checkpoint checkpoints/smollm2-llm-pruner-r0.2-taylor-element1-block
    python bench/llm_pruner_speed.py --seqlen 2048 --repeats 10 --threads 2

Without --checkpoint the pruned shapes are made with --importance magnitude (no calibration data needed); speed
depends only on the shapes, which the allocation fixes from --ratio whatever the importance.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def prefill_seconds(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="dense model (default: the offline SmolLM2-135M)")
    ap.add_argument("--checkpoint", default=None, help="pruned checkpoint folder (default: prune in memory)")
    ap.add_argument("--ratio", type=float, default=0.2, help="share of parameters to remove when pruning in memory")
    ap.add_argument("--uniform", action="store_true", help="prune every block alike when pruning in memory")
    ap.add_argument("--seqlen", type=int, default=512, help="prompt tokens")
    ap.add_argument("--batch", type=int, default=1, help="prompts per pass")
    ap.add_argument("--repeats", type=int, default=10, help="timed passes of each model")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import transformers

    import compress

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    dense = compress.load(args.model, dtype=args.dtype).model
    if args.checkpoint:
        pruned = compress.load(args.checkpoint, dtype=args.dtype).model
        how = args.checkpoint
    else:
        import copy

        pruned = compress.apply(copy.deepcopy(dense), "llm-pruner", device="cpu", progress=False, ratio=args.ratio,
                                importance="magnitude", uniform=args.uniform)
        how = f"pruned in memory (ratio {args.ratio}, magnitude importance{', uniform' if args.uniform else ''})"
    for m in (dense, pruned):
        m.eval()
        m.config.use_cache = True
    vocab = dense.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(0))
    for m in (dense, pruned):  # warm-up
        prefill_seconds(m, ids)
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    for _ in range(args.repeats):
        times["dense"].append(prefill_seconds(dense, ids))
        times["pruned"].append(prefill_seconds(pruned, ids))
    med = {k: statistics.median(v) for k, v in times.items()}
    pd, pp = compress.size(dense)["params"], compress.size(pruned)["params"]
    print(f"pruned model: {how}")
    print(f"prefill of {args.batch} x {args.seqlen} tokens, {args.dtype}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} alternating passes")
    print(f"  dense : {pd:>12,} parameters  {1000 * med['dense']:8.1f} ms  {args.batch * args.seqlen / med['dense']:8.0f} tok/s")
    print(f"  pruned: {pp:>12,} parameters  {1000 * med['pruned']:8.1f} ms  {args.batch * args.seqlen / med['pruned']:8.0f} tok/s")
    print(f"parameters: {pp / pd:.3f}x   prefill speed-up (dense time / pruned time): {med['dense'] / med['pruned']:.3f}x")


if __name__ == "__main__":
    main()
