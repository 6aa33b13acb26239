"""Why HQQ does (not) beat min/max RTN on SmolLM2: every HQQ solver variant's weights, one perplexity each.

All calibration-free, grid g64 asymmetric, every decoder-block linear quantized and written back as de-quantized
bfloat16 weights, perplexity by this project's code (WikiText-2 raw test, --seqlen, --eval-windows). Variants:
  rtn               min/max RTN
  reference         this project's HQQ default (the hqq package's iterations, then the zero rounded onto the grid)
  integer           --solver integer (iterations on the integer grid, scale solved, best l_p iterate per group)
  integer-l1/-l2    the same iterations, each group's best iterate chosen by l1 / l2 error instead (probe only)
  package-float     the hqq 0.2.8 solver exactly as `Quantizer.quantize(optimize=True, axis=1)` runs it, with its
                    float zero kept (not storable on the integer grid), written out from its source
                    (optimize_weights_proximal_legacy: it returns the zero computed one step after the best)
The package itself, run in its own venv, is in bench/hqq_vs_hqq.py.

    python bench/hqq_solver_probe.py --bits 3,4 --seqlen 512 --eval-windows 4
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
VARIANTS = ("rtn", "reference", "integer", "integer-l1", "integer-l2", "package-float")


def _integer_select(w, spec, crit):
    """compress.kernels.hqq's integer solver with another per-group selection criterion (probe only)."""
    from compress.kernels.hqq import _shrink
    from compress.kernels.quant_grid import params_from_range, round_scale

    maxq, beta = spec.maxq, 10.0
    scale, zero = params_from_range(w.min(1).values, w.max(1).values, spec)
    best = None
    for it in range(21):
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
        r = w - scale[:, None] * (q - zero[:, None])
        obj = r.abs().sum(1) if crit == "l1" else (r * r).sum(1)
        if best is None:
            best, bs, bz = obj, scale.clone(), zero.clone()
        else:
            b = obj < best
            best, bs, bz = torch.where(b, obj, best), torch.where(b, scale, bs), torch.where(b, zero, bz)
        if it == 20:
            break
        target = w - _shrink(r, beta, 0.7)
        zero = torch.clamp(torch.round((q - target / scale[:, None]).mean(1)), 0, maxq)
        d = q - zero[:, None]
        den = (d * d).sum(1)
        sn = (target * d).sum(1) / den.clamp(min=1e-12)
        scale = torch.where((den > 0) & (sn > 0), round_scale(sn), scale)
        beta *= 1.01
    q = torch.clamp(torch.round(w / bs[:, None]) + bz[:, None], 0, maxq)
    return bs[:, None] * (q - bz[:, None])


def _package_float(w, bits):
    """hqq 0.2.8 Quantizer.quantize(optimize=True, axis=1) -> dequantize, on rows = groups (float32, CPU)."""
    maxq = 2**bits - 1
    mn, mx = w.min(1, keepdim=True)[0], w.max(1, keepdim=True)[0]
    denom = mx - mn
    inv = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), maxq / denom).clamp(max=2e4)
    zero = -mn * inv
    zero = torch.round(zero) if bits == 4 else zero  # round_zero: True for 4 bits
    beta, best = 10.0, float("inf")
    for _ in range(20):
        wq = torch.round(w * inv + zero).clamp(0, maxq)
        wr = (wq - zero) / inv
        x = w - wr
        we = torch.sign(x) * torch.relu(x.abs() - (1 / beta) * x.abs().pow(-0.3))
        zero = torch.mean(wq - (w - we) * inv, 1, keepdim=True)
        beta *= 1.01
        err = float((w - wr).abs().mean())
        if err < best:
            best = err
        else:
            break
    return (torch.round(w * inv + zero).clamp(0, maxq) - zero) / inv


def main() -> None:
    from bench.awq_hqq_table import machine
    from compress.evals.perplexity import perplexity
    from compress.kernels.hqq import HQQParams, hqq_quantize
    from compress.kernels.quant_grid import QuantSpec, rtn_quantize
    from compress.sources.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("COMPRESS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    print(f"machine at start: {machine()}", flush=True)
    lm = load_model("smollm2", dtype="bfloat16")
    base = {n: m.weight.detach().clone() for n, m in lm.model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    gs = args.group_size
    for bits in [int(b) for b in args.bits.split(",")]:
        spec = QuantSpec(bits, gs)
        for v in variants:
            t0 = time.perf_counter()
            for n, w0 in base.items():
                w = w0.float()
                if v == "rtn":
                    wh = rtn_quantize(w, spec).dequantize()
                elif v in ("reference", "integer"):
                    wh = hqq_quantize(w, spec, HQQParams(solver=v)).dequantize()
                elif v.startswith("integer-"):
                    wh = _integer_select(w.reshape(-1, gs), QuantSpec(bits, -1), v.split("-")[1]).reshape(w.shape)
                else:
                    wh = _package_float(w.reshape(-1, gs), bits).reshape(w.shape)
                lm.model.get_submodule(n).weight.data.copy_(wh.to(w0.dtype))
            secs = time.perf_counter() - t0
            r = perplexity(lm.model, lm.tokenizer, "wikitext2", seqlen=args.seqlen, max_windows=args.eval_windows,
                           progress=False)
            p = r["protocol"]
            print(f"w{bits} g{gs} {v:14s} ppl {r['value']:9.3f}  (quantize {secs:.1f} s; WikiText-2 {p['variant']} "
                  f"{p['split']}, seqlen {p['seqlen']}, {p['windows']}/{p['windows_total']} windows, {p['dtype']})",
                  flush=True)
    print(f"machine at end: {machine()['uptime']}")


if __name__ == "__main__":
    main()
