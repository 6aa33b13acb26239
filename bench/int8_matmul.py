"""int8 x int8 -> int32 matmul against float matmuls on this CPU, for SmolLM2-135M's linear shapes.

For each layer shape (in -> out) and token count M, measured side by side in one run (interleaved rounds, median):
  int8 _int_mm    torch._int_mm(x_int8 [M, K], W_int8^T) with W stored [out, in] as the checkpoints hold it
  int8 _int_mm Kn the same with W pre-transposed to a contiguous [in, out] copy
  int8 fallback   compress.layers.w8a8_linear's exact fallback (float32 matmuls over <=1024-column chunks, int32 sums)
  fp32, bf16      x @ W^T in float32 / bfloat16
  W8A8Linear      the whole layer: per-token int8 quantization of x, int8 matmul, rescale (bf16 in and out)
and the ratios float time / int8 time (> 1: int8 faster). Usage: python bench/int8_matmul.py [--tokens 1,16,128,512]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from compress.layers.w8a8_linear import W8A8Linear
from compress.kernels.int8 import int8_matmul_fallback, int_mm_supported

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (576, 192), "gate/up_proj": (576, 1536), "down_proj": (1536, 576)}


def _time(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,16,128,512", help="token counts M, comma-separated")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is printed")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not int_mm_supported("cpu"):
        print("torch._int_mm is not available on this CPU build; only the fallback is timed against floats")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("times in ms (median of interleaved rounds); ratio = float time / int8 _int_mm time\n")
    head = f"{'layer':<14}{'M':>5} {'int8':>8} {'int8 Kn':>8} {'fallbk':>8} {'fp32':>8} {'bf16':>8} | {'fp32/int8':>9} {'bf16/int8':>9} | {'W8A8Lin':>8} {'bf16 Lin':>8} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    g = torch.Generator().manual_seed(0)
    use_int_mm = int_mm_supported("cpu")
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, generator=g)
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        wq_kn = wq.t().contiguous()
        w32, w16 = w.clone(), w.to(torch.bfloat16)
        lin16 = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        lin16.weight.data.copy_(w16)
        w8a8 = W8A8Linear.from_float(w16)
        for m in (int(t) for t in args.tokens.split(",")):
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
            x32 = torch.randn(m, k, generator=g)
            x16 = x32.to(torch.bfloat16)
            reps = max(3, min(200, int(2e8 / (m * k * n))))
            cases = {
                "int8": (lambda: torch._int_mm(xq, wq.t())) if use_int_mm else (lambda: int8_matmul_fallback(xq, wq)),
                "int8 Kn": (lambda: torch._int_mm(xq, wq_kn)) if use_int_mm else (lambda: int8_matmul_fallback(xq, wq)),
                "fallback": lambda: int8_matmul_fallback(xq, wq),
                "fp32": lambda: x32 @ w32.t(),
                "bf16": lambda: x16 @ w16.t(),
                "w8a8": lambda: w8a8(x16),
                "lin16": lambda: lin16(x16),
            }
            times: dict[str, list[float]] = {c: [] for c in cases}
            with torch.no_grad():
                for _ in range(args.rounds):
                    for c, fn in cases.items():
                        times[c].append(_time(fn, reps))
            med = {c: statistics.median(v) * 1e3 for c, v in times.items()}
            print(f"{name:<14}{m:>5} {med['int8']:>8.3f} {med['int8 Kn']:>8.3f} {med['fallback']:>8.3f} {med['fp32']:>8.3f} "
                  f"{med['bf16']:>8.3f} | {med['fp32'] / med['int8']:>9.2f} {med['bf16'] / med['int8']:>9.2f} | "
                  f"{med['w8a8']:>8.3f} {med['lin16']:>8.3f} {med['lin16'] / med['w8a8']:>6.2f}")


if __name__ == "__main__":
    main()
