"""Knowledge distillation on SmolLM2-135M, measured side by side in one run (CPU, small budgets):

  A. a layer-dropped student (half the blocks, evenly spread): no training / the same steps with the plain LM loss /
     the same steps with KD (kd_weight 0.5, T 2) from the full model;
  B. 50% unstructured pruning (methods/wanda.py when the project has it, else per-row magnitude pruning, |W| smallest
     half of each output row), then no recovery / KD recovery (kd_weight 1) through a recipe whose teacher is the
     unpruned start model; sparsity is checked to be unchanged by the recovery.

Perplexity: WikiText-2 raw test, joined with "\\n\\n", windows of --eval-seqlen tokens, the first --eval-windows of
them. Training windows: --train-samples windows of the WikiText-2 validation text (never the test split).

    python bench/distill_recovery.py --steps 100 --recovery-steps 60
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import compress
from compress.pipeline.method import Method, Needs, build_method
from compress.pipeline.recipe import Recipe
from compress.train.finetune import sparsity, zero_masks
from compress.train.layer_drop import block_influence, drop_blocks, importance_keep, uniform_keep


class RowMagnitude(Method):
    """50% per-output-row magnitude pruning (the bench's stand-in when no pruning method is registered)."""

    name, family = "row-magnitude", "pruning"
    needs = Needs()

    def __init__(self, sparsity: float = 0.5):
        super().__init__()
        self.sparsity = sparsity

    def apply(self, model, ctx):
        from compress.model.arch import find_blocks

        _, blocks = find_blocks(model)
        with torch.no_grad():
            for block in blocks:
                for mod in block.modules():
                    if type(mod) is torch.nn.Linear:
                        k = int(mod.weight.shape[1] * self.sparsity)
                        idx = mod.weight.abs().argsort(dim=1)[:, :k]
                        mod.weight.scatter_(1, idx, 0.0)
        return model


def stages(*items: dict | Method) -> list[dict] | Recipe:
    """What compress.apply takes: the stage mappings as they are, or a Recipe when one of them is a Method instance
    (the unregistered stand-in above, which a stage mapping cannot name)."""
    if all(isinstance(s, dict) for s in items):
        return list(items)
    return Recipe([s if isinstance(s, Method)
                   else build_method(s["method"], {k: v for k, v in s.items() if k != "method"}) for s in items])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--recovery-steps", type=int, default=60)
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument("--train-samples", type=int, default=256)
    ap.add_argument("--train-seqlen", type=int, default=256)
    ap.add_argument("--train-batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the layer-dropped students")
    ap.add_argument("--recovery-lr", type=float, default=1e-4, help="peak learning rate of KD recovery after pruning")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--only", choices=("all", "student", "recovery"), default="all")
    args = ap.parse_args()

    loaded = compress.load("smollm2", dtype="bfloat16")
    tok = loaded.tokenizer
    calib = compress.calibration(tok, "wikitext2", nsamples=32, seqlen=256, seed=0, data_dir=args.data_dir)
    # what every compress.apply below runs with (the run's dtype, bfloat16, is taken from the model)
    run = dict(calibration=calib, tokenizer=tok, data_dir=args.data_dir, device="cpu", seed=0, progress=True)

    def ppl(model) -> float:
        return compress.evaluate(model, tok, "wikitext2", seqlen=args.eval_seqlen, windows=args.eval_windows,
                                 data_dir=args.data_dir, progress=False)["value"]

    train = dict(train_samples=args.train_samples, train_seqlen=args.train_seqlen, train_batch_size=args.train_batch_size,
                 lr=args.lr)
    rows: list[tuple[str, float, str]] = []

    def add(label: str, value: float, note: str = "") -> None:  # printed as soon as measured, the table at the end
        rows.append((label, value, note))
        print(f"measured: {label}: {value:.3f} {note}", flush=True)

    t0 = time.perf_counter()
    full = ppl(loaded.model)
    add("full model (30 blocks)", full)
    if args.only in ("all", "student"):
        drop = dict(student_layers=args.student_layers, layer_selection="uniform")
        student = copy.deepcopy(loaded.model)
        drop_blocks(student, uniform_keep(loaded.model.config.num_hidden_layers, args.student_layers))
        add(f"student {args.student_layers} blocks, no training", ppl(student), "uniform: evenly spread blocks")
        del student
        scores = block_influence(loaded.model, calib.input_ids, batch_size=8)
        student = drop_blocks(copy.deepcopy(loaded.model), importance_keep(scores, args.student_layers))
        add(f"student {args.student_layers} blocks by Block Influence, no training", ppl(student), "(for comparison)")
        del student
        for label, kd in (("LM loss only", 0.0), ("KD 0.5 + LM 0.5, T 2", 0.5)):
            report: dict = {}
            student = compress.apply(copy.deepcopy(loaded.model), "distill", teacher=loaded.model, report=report, **run,
                                     **drop, steps=args.steps, kd_weight=kd, temperature=2.0, **train)
            rep = report["distill"]
            add(f"student {args.student_layers} blocks, {args.steps} steps {label}", ppl(student),
                f"train loss {rep['loss_first']} -> {rep['loss_last']}, {rep['seconds']} s")
            del student
    if args.only in ("all", "recovery"):
        if "wanda" in compress.list_methods():
            prune, pname = {"method": "wanda", "sparsity": 0.5}, "Wanda 50%"
        else:
            prune, pname = RowMagnitude(0.5), "magnitude 50% per row (no pruning method in this tree)"
        pruned = compress.apply(copy.deepcopy(loaded.model), stages(prune), **run)
        sp = sparsity(zero_masks(pruned), pruned)
        add(f"{pname}, no recovery", ppl(pruned), f"sparsity {sp:.4f}")
        del pruned
        kd = {"method": "distill", "steps": args.recovery_steps, "kd_weight": 1.0, "temperature": 2.0,
              **{**train, "lr": args.recovery_lr}}
        report = {}
        # no teacher given: the recipe keeps the unpruned start model as the teacher
        recovered = compress.apply(copy.deepcopy(loaded.model), stages(prune, kd), report=report, **run)
        sp2 = sparsity(zero_masks(recovered), recovered)
        rep = report["distill"]
        add(f"{pname} + KD recovery {args.recovery_steps} steps", ppl(recovered),
            f"sparsity {sp2:.4f}, train loss {rep['loss_first']} -> {rep['loss_last']}, {rep['seconds']} s")
    print(f"\nWikiText-2 raw test perplexity, seqlen {args.eval_seqlen}, first {args.eval_windows} windows; "
          f"training: {args.train_samples} x {args.train_seqlen} wikitext2 validation windows, batch "
          f"{args.train_batch_size}, lr {args.lr} (recovery {args.recovery_lr}); bfloat16; total {time.perf_counter() - t0:.0f} s")
    for label, value, note in rows:
        print(f"  {label:<62} {value:10.3f}   x{value / full:6.3f} of full   {note}")


if __name__ == "__main__":
    main()
