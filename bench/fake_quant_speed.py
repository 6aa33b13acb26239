"""Fake-quantization cost per training step: the fused autograd function (compress.train.fake_quant._FakeQuant) against
the same expression composed from torch ops (ste_fake_quantize on gathered per-column scales), and against the
plain bf16 matmul it feeds, measured side by side on SmolLM2-135M-sized linears (3-bit, group 128).

    OMP_NUM_THREADS=1 python bench/fake_quant_speed.py [--tokens 1024] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from compress.kernels.fake_quant import GroupLayout, _FakeQuant, ste_fake_quantize, stored_scale_ste
from compress.kernels.quant_grid import QuantSpec, rtn_quantize

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down of one SmolLM2 block


def step(kind: str, w, s, z, layout, x, maxq):
    if kind == "matmul only":
        wh = w.detach().to(x.dtype).requires_grad_(True)
        y = F.linear(x, wh)
    else:
        if kind == "composed":
            gi = layout.g_idx
            wh = ste_fake_quantize(w, stored_scale_ste(s)[:, gi], z[:, gi], maxq)
        else:
            wh = _FakeQuant.apply(w, stored_scale_ste(s), z, layout, maxq)
        y = F.linear(x, wh.to(x.dtype))
    y.float().sum().backward()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    spec = QuantSpec(3, 128)
    cases = []
    for out_f, in_f in SHAPES:
        w0 = torch.randn(out_f, in_f) * 0.02
        qw = rtn_quantize(w0, spec)
        layout = GroupLayout(qw.g_idx, qw.scales.shape[1], spec.group_size, True)
        w = w0.clone().requires_grad_(True)
        s = qw.scales.float().clone().requires_grad_(True)
        z = qw.zeros.float()
        x = torch.randn(args.tokens, in_f, dtype=torch.bfloat16)
        cases.append((w, s, z, layout, x))
    times = {}
    for kind in ("matmul only", "composed", "fused"):
        for c in cases:  # warm-up
            step(kind, *c, spec.maxq)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            for c in cases:
                step(kind, *c, spec.maxq)
        times[kind] = (time.perf_counter() - t0) / args.repeats
    print(f"one block's 4 linear shapes, {args.tokens} tokens, forward+backward, {torch.get_num_threads()} thread(s):")
    for kind, t in times.items():
        print(f"  {kind:12s} {t * 1000:8.1f} ms   x{t / times['matmul only']:.2f} of the matmul")
    print(f"fused / composed: {times['fused'] / times['composed']:.2f}")


if __name__ == "__main__":
    main()
