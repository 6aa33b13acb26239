"""Runs the `hqq` package's quantizer in its own virtual environment (never imports `compress`); driven by
bench/hqq_vs_hqq.py. Arguments: JSON {weights (safetensors of the float Linear weights, by module name), bits,
group_size, out (safetensors written with the de-quantized weights)}. Uses hqq's own defaults for the setting:
hqq_base_quant_config(nbits, group_size, axis=1) -> Quantizer.quantize (optimize=True: the proximal half-quadratic
solver, lp 0.7, beta 10, kappa 1.01, 20 iterations with early stopping; round_zero for 4 bits; float zero and scale).
Prints one JSON line: {"seconds": wall time of the quantize calls, "versions": {...}}."""
import json
import sys
import time

import torch


def main() -> None:
    args = json.loads(sys.argv[1])
    import hqq
    from hqq.core.quantize import Quantizer, hqq_base_quant_config
    from safetensors.torch import load_file, save_file

    weights = load_file(args["weights"])
    params = dict(hqq_base_quant_config(nbits=int(args["bits"]), group_size=int(args["group_size"]), axis=1)["weight_quant_params"])
    params.pop("view_as_float", None)
    out = {}
    seconds = 0.0
    for name, w in weights.items():
        t0 = time.perf_counter()
        W_q, meta = Quantizer.quantize(w, device="cpu", bitpack=False, compute_dtype=torch.float32, **params)
        meta["compute_dtype"] = torch.float32
        w_hat = Quantizer.dequantize(W_q, meta)
        seconds += time.perf_counter() - t0
        out[name] = w_hat.to(w.dtype).contiguous()
    save_file(out, args["out"])
    print(json.dumps({"seconds": round(seconds, 2), "params": {k: v for k, v in params.items()},
                      "versions": {"hqq": getattr(hqq, "__version__", "?"), "torch": torch.__version__}}))


if __name__ == "__main__":
    main()
