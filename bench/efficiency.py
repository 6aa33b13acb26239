"""Speed and memory of the offline model dense (bfloat16) and RTN-quantized (QuantLinear, which dequantizes on the
fly), measured side by side in one run with compress.evals.efficiency (speed, kernels) and compress.size; prints the
ratios.

    python bench/efficiency.py [--prompt-len 256] [--decode-tokens 32] [--repeats 3] [--model smollm2]
"""
from __future__ import annotations

import argparse
import copy

import compress
from compress.evals.efficiency import kernel_report, measure_speed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = compress.load(args.model).model
    variants = {"bf16 dense": base}
    for bits in (8, 4):
        variants[f"rtn w{bits} g128"] = compress.apply(copy.deepcopy(base), "rtn", device="cpu", progress=False,
                                                       bits=bits, group_size=128)
    rows = {}
    for name, model in variants.items():
        speed = measure_speed(model, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, repeats=args.repeats)
        rows[name] = (speed, compress.size(model), kernel_report(model))
    ref = rows["bf16 dense"][0]
    print(f"prompt {args.prompt_len} tokens, {args.decode_tokens} decoded, batch 1, median of {args.repeats}, "
          f"{ref['device']}, {ref['threads']} threads")
    for name, (speed, size, kern) in rows.items():
        print(f"{name:12s} prefill {speed['prefill_tokens_per_second']:8.1f} tok/s "
              f"(x{speed['prefill_tokens_per_second'] / ref['prefill_tokens_per_second']:.2f})  "
              f"decode {speed['decode_tokens_per_second']:6.1f} tok/s "
              f"(x{speed['decode_tokens_per_second'] / ref['decode_tokens_per_second']:.2f})  "
              f"{size['bits_per_weight']:5.2f} bits/weight  {size['memory_bytes'] / 2**20:6.1f} MiB  | {kern['summary']}")


if __name__ == "__main__":
    main()
