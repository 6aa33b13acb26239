"""How many weight groups of the real model have no weight of one sign (the groups the symmetric-grid fix changes).

    python bench/one_signed_groups.py        # SmolLM2-135M-Instruct, every linear of the decoder blocks

The GPTQ reference's symmetric grid gave such a group scale max/(2^b - 1) and clipped it; compress.kernels.quant_grid
now spans ±max|w| always. Where this prints 0 for a grid, RTN (and GPTQ/SparseGPT with static groups, whose grids
come from the original weights) give bit-identical codes before and after the fix on this model.
"""
from __future__ import annotations

import torch

from compress.model.arch import find_blocks
from compress.model.surgery import is_linear_like
from compress.sources.models import load_model


def main() -> None:
    model = load_model("smollm2", dtype="bfloat16").model
    _, blocks = find_blocks(model)
    weights = [m.weight.float() for b in blocks for n, m in b.named_modules() if n and is_linear_like(m)]
    print(f"{len(weights)} linears of the decoder blocks")
    for gs in (-1, 128, 64, 32):
        one = total = 0
        for w in weights:
            g = w.shape[1] if gs == -1 else gs
            for s in range(0, w.shape[1], g):  # a shorter last group where g does not divide the width
                c = w[:, s:s + g]
                one += int(((c.min(1).values >= 0) | (c.max(1).values <= 0)).sum())
                total += c.shape[0]
        print(f"group {'per-channel' if gs == -1 else gs}: {one} one-signed groups of {total}")


if __name__ == "__main__":
    main()
