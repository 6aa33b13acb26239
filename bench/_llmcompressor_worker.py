"""Runs llm-compressor's GPTQ or AWQ in its own virtual environment (never imports `compress`); driven by
bench/gptq_vs_llmcompressor.py and bench/awq_vs_llmcompressor.py. Arguments: JSON {model_dir, calib (safetensors with
"ids" [N, L]), bits, group_size (-1: per channel), sym, out (safetensors written with the quantized Linear weights, as
floats), method ("gptq", the default; "awq": AWQModifier with its defaults, then QuantizationModifier on the grid;
"spinquant": SpinQuantModifier(rotations, transform_type) then GPTQModifier on the grid, with "rotations" (default
["R1", "R2"], the offline ones, fused into the weights) and "transform_type" (default "random-hadamard")), observer
(optional: compressed-tensors' weight observer name, e.g. "mse"; default its own, min/max)}.
Prints one JSON line: {"seconds": wall time of oneshot(), "versions": {...}}."""
import json
import sys
import time

import torch


def main() -> None:
    args = json.loads(sys.argv[1])
    import compressed_tensors
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(args["model_dir"])
    ids = load_file(args["calib"])["ids"]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    g = int(args["group_size"])
    weights = QuantizationArgs(num_bits=int(args["bits"]), type="int", symmetric=bool(args["sym"]),
                               strategy="channel" if g == -1 else "group", group_size=None if g == -1 else g,
                               **({"observer": args["observer"]} if args.get("observer") else {}))
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if args.get("method", "gptq") == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # its defaults: the architecture's mappings (norm -> q/k/v, v -> o, norm -> gate/up, up -> down), duo_scaling,
        # n_grid 20; then round-to-nearest on the grid
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    elif args.get("method") == "spinquant":
        from llmcompressor.modifiers.transform import SpinQuantModifier

        rotate = SpinQuantModifier(rotations=args.get("rotations", ["R1", "R2"]),
                                   transform_type=args.get("transform_type", "random-hadamard"))
        recipe = [rotate, GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    else:
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])  # its defaults: block_size 128,
        # dampening_frac 0.01, actorder static
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations for host-to-device copies; without an accelerator
        # torch refuses pin_memory(). Everything stays on the CPU here, so pinning is skipped (nothing else changes).
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            w = mod.weight.detach()
            if args.get("method", "gptq") == "awq":  # RTN's weights stay float until saved: fake-quantize them here
                from compressed_tensors.quantization import forward_quantize

                with torch.no_grad():
                    w = forward_quantize(mod, w, "weight", mod.quantization_scheme.weights)
            out[name + ".weight"] = w.to("cpu").contiguous()
    save_file(out, args["out"])
    if args.get("method") == "spinquant":  # the rotations rewrote every tensor (embedding, norms, untied head)
        state = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
        save_file(state, args["out"].replace(".safetensors", "-rest.safetensors"))
    if args.get("method", "gptq") == "awq":  # AWQ also rewrote the norms (and v / up rows): every other float tensor
        rest = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()
                if p.dim() == 1 or not name.endswith(".weight") or name.rsplit(".", 1)[0] not in
                {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}}
        save_file(rest, args["out"].replace(".safetensors", "-rest.safetensors"))
    print(json.dumps({"seconds": round(seconds, 2), "versions": {
        "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__, "torch": torch.__version__}}))


if __name__ == "__main__":
    main()
