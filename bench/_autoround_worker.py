"""Runs intel's `auto-round` (SignRound) in its own virtual environment (never imports `compress`); driven by
bench/autoround_vs_autoround.py. Arguments: JSON {model_dir, calib (safetensors with "ids" [N, L]), bits, group_size,
sym, iters, batch_size, out (safetensors written with the quantized Linear weights, as floats)}. auto-round's own
defaults otherwise (SignRound: lr 1/iters with linear decay, min/max clip scales in [0.5, 1], best-loss parameters,
quantized block inputs). Prints one JSON line: {"seconds": wall time of quantize(), "versions": {...}}."""
import json
import sys
import time

import torch


def main() -> None:
    args = json.loads(sys.argv[1])
    import auto_round
    import transformers
    from auto_round import AutoRound
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(args["model_dir"])
    ids = load_file(args["calib"])["ids"]
    bs = int(args["batch_size"])
    batches = [ids[i:i + bs] for i in range(0, ids.shape[0], bs)]  # the same token sequences, in order
    ar = AutoRound(model, tokenizer=tok, bits=int(args["bits"]), group_size=int(args["group_size"]),
                   sym=bool(args["sym"]), iters=int(args["iters"]), nsamples=int(ids.shape[0]),
                   seqlen=int(ids.shape[1]), batch_size=bs, dataset=batches, device_map="cpu", seed=0)
    t0 = time.perf_counter()
    qmodel, _ = ar.quantize()
    seconds = time.perf_counter() - t0
    out = {}
    for name, mod in qmodel.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            out[name + ".weight"] = mod.weight.detach().to("cpu", torch.bfloat16).contiguous()
    if not out:
        raise SystemExit("auto-round returned no float Linear layers to read the fake-quantized weights from")
    save_file(out, args["out"])
    print(json.dumps({"seconds": round(seconds, 2), "linears": len(out), "versions": {
        "auto_round": getattr(auto_round, "__version__", "?"), "transformers": transformers.__version__,
        "torch": torch.__version__}}))


if __name__ == "__main__":
    main()
