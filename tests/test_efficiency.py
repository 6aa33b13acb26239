"""Efficiency: kernels said as they are (QuantLinear on an integer kernel or de-quantizing), real speed numbers, the CLI flag."""
from click.testing import CliRunner

from compress.cli import main
from compress.evals.efficiency import efficiency_metrics, kernel_report, measure_speed
from compress.layers.kernels import select_kernels
from compress.pipeline.recipe import Recipe, RunContext
from compress.runs.results import read_records


def test_kernel_report_dense_and_quantized(tiny_llama):
    dense = kernel_report(tiny_llama)
    assert dense["quantized_kernels"] is None and "dense" in dense["summary"]
    q = Recipe.from_specs([{"method": "rtn", "bits": 4, "group_size": 32}]).run(tiny_llama, RunContext(progress=False))
    rep = kernel_report(q)  # the method's end chose the int4 kernel for every layer (all widths divide by 32)
    assert rep["quantized_kernels"] is True and "quantized kernels" in rep["summary"]
    assert rep["layers"][next(k for k in rep["layers"] if k.startswith("QuantLinear"))] == 2 * 7  # 7 linears per block
    assert all("int4 weight-only kernel" in k for n, k in rep["per_layer"].items() if ".layers." in n)
    select_kernels(q, enable=False)  # the de-quantization fallback is reported as such
    rep = kernel_report(q)
    assert rep["quantized_kernels"] is False and "dequantize" in rep["summary"]


def test_speed_numbers(tiny_llama):
    out = measure_speed(tiny_llama, prompt_len=16, decode_tokens=4, repeats=1)
    assert out["prefill_tokens_per_second"] > 0 and out["decode_tokens_per_second"] > 0
    assert out["peak_memory_bytes"] > 0 and out["device"] == "cpu"
    m = efficiency_metrics(tiny_llama, prompt_len=16, decode_tokens=4, repeats=1)
    assert m["decode_tokens_per_second"]["higher_is_better"] and not m["peak_memory_bytes"]["higher_is_better"]
    assert m["prefill_tokens_per_second"]["kernels"]["quantized_kernels"] is None


def test_cli_eval_efficiency(tiny_model_dir):
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_model_dir), "--eval", "none", "--efficiency",
                                    "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    after = read_records()[-1]["metrics"]["after"]
    assert {"prefill_tokens_per_second", "decode_tokens_per_second", "peak_memory_bytes"} <= set(after)
