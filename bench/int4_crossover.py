"""Where the CPU int4 kernel stops paying: time per call of one QuantLinear through `_weight_int4pack_mm_for_cpu`
and through the de-quantization fallback, for row counts 1..512, in bfloat16 and float32 (the numbers behind
compress.kernels.weight_only.INT4_CPU_MAX_ROWS). Prints date, commit, load and threads.

    python bench/int4_crossover.py [--threads 1] [--shapes 1536x576,576x1536] [--group-size 64]
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import time
from pathlib import Path
from unittest import mock

import torch

from compress.kernels import weight_only
from compress.kernels.quant_grid import QuantSpec, rtn_quantize
from compress.layers.quant_linear import QuantLinear

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _ms(layer: QuantLinear, x: torch.Tensor, seconds: float = 0.3) -> float:
    with torch.no_grad():
        layer(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            layer(x)
            n += 1
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", default="1536x576,576x1536", help="out x in of the layers (SmolLM2's MLP)")
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  commit {commit}  "
          f"torch {torch.__version__}  {args.threads} thread(s)\nload: "
          + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"RTN w4 g{args.group_size}; ms per call, kernel / fallback (ratio > 1: the fallback is faster)")
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
        for dtype in (torch.bfloat16, torch.float32):
            layer = QuantLinear.from_quantized(rtn_quantize(w, QuantSpec(4, args.group_size)), dtype=dtype)
            cells = []
            for m in ROWS:
                x = torch.randn(m, in_f).to(dtype)
                layer.select_kernel(True)
                with mock.patch.dict(weight_only.INT4_CPU_MAX_ROWS, {dtype: 10**9}):
                    k = _ms(layer, x)
                layer.select_kernel(False)
                f = _ms(layer, x)
                cells.append(f"{m}: {k:.2f}/{f:.2f} ({k / f:.2f})")
            print(f"{shape} {str(dtype).replace('torch.', '')}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
