"""Where the CPU weight-only kernels stop paying: time per call of one QuantLinear through `_weight_int4pack_mm_for_cpu`
(RTN w4) or `_weight_int8pack_mm` (RTN w8 per channel) and through the de-quantization fallback, for row counts
1..512, in bfloat16 and float32 (the numbers behind compress.kernels.weight_only.CPU_MAX_ROWS). Prints date, commit,
load, threads and whether the CPU has AMX-bf16.

    python bench/int4_crossover.py [--threads 1] [--shapes 1536x576,576x1536] [--group-size 64] [--bits 4,8]
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
    ap.add_argument("--group-size", type=int, default=64, help="int4 rows' group size (int8: per channel)")
    ap.add_argument("--bits", default="4,8", help="4 (the int4 kernel), 8 (the int8 kernel)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  commit {commit}  "
          f"torch {torch.__version__}  {args.threads} thread(s)  AMX-bf16 {weight_only._AMX}\nload: "
          + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    for bits in (int(b) for b in args.bits.split(",")):
        kernel, group = ("int4", args.group_size) if bits == 4 else ("int8", -1)
        print(f"RTN w{bits} {'g' + str(group) if group > 0 else 'per channel'}; ms per call, {kernel} kernel / fallback "
              "(ratio > 1: the fallback is faster)")
        for shape in args.shapes.split(","):
            out_f, in_f = (int(v) for v in shape.split("x"))
            w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
            for dtype in (torch.bfloat16, torch.float32):
                layer = QuantLinear.from_quantized(rtn_quantize(w, QuantSpec(bits, group)), dtype=dtype)
                cells = []
                for m in ROWS:
                    x = torch.randn(m, in_f).to(dtype)
                    layer.select_kernel(True)
                    with mock.patch.dict(weight_only.CPU_MAX_ROWS[kernel], {dtype: 10**9}):
                        k = _ms(layer, x)
                    layer.select_kernel(False)
                    f = _ms(layer, x)
                    cells.append(f"{m}: {k:.2f}/{f:.2f} ({k / f:.2f})")
                print(f"{shape} {str(dtype).replace('torch.', '')}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
