"""The public Python API (compress.api, exposed lazily by `import compress`): the steps of a run as functions."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import compress
from compress.layers.quant_linear import QuantLinear

TEXT = " ".join(f"The {w} of the model is measured on held-out text number {i}." for i, w in
                enumerate(["size", "speed", "accuracy", "cost", "memory"] * 40))


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return f"file:{p}"


def test_import_compress_is_light():
    code = "import sys, compress; assert callable(compress.RunSpec); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_load_calibrate_apply_evaluate_save(tiny_model_dir, text_file, tmp_path):
    m = compress.load(str(tiny_model_dir))
    calib = compress.calibration(m.tokenizer, text_file, nsamples=4, seqlen=32)
    assert calib.input_ids.shape == (4, 32)
    before = compress.evaluate(m.model, m.tokenizer, text_file, seqlen=64, windows=4, progress=False)
    report: dict = {}
    model = compress.apply(m.model, "gptq", calibration=calib, bits=4, group_size=32, progress=False, report=report)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert "gptq" in report
    after = compress.evaluate(model, m.tokenizer, text_file, seqlen=64, windows=4, progress=False)
    assert math.isfinite(after["value"]) and after["protocol"] == before["protocol"]
    assert compress.size(model)["bits_per_weight"] < 5
    paths = compress.save(model, m.tokenizer, tmp_path / "ckpt", exports=["gptq"])
    assert set(paths) == {"native", "gptq"} and (paths["gptq"] / "quantize_config.json").is_file()
    again = compress.load(str(paths["native"]))
    assert compress.evaluate(again.model, again.tokenizer, text_file, seqlen=64, windows=4,
                             progress=False)["value"] == pytest.approx(after["value"], rel=1e-5)


def test_apply_refuses_missing_calibration_and_unknown_method(tiny_llama):
    with pytest.raises(compress.ConfigError, match="needs calibration data"):
        compress.apply(tiny_llama, "gptq", bits=4)
    with pytest.raises(compress.ConfigError, match="unknown method 'nope'"):
        compress.apply(tiny_llama, "nope")
    with pytest.raises(compress.ConfigError, match="bits"):
        compress.apply(tiny_llama, "rtn", bits=99)


def test_apply_stages_and_run_record(tiny_model_dir, text_file, tmp_path):
    m = compress.load(str(tiny_model_dir))
    model = compress.apply(m.model, [{"method": "magnitude", "sparsity": 0.5}, {"method": "rtn", "bits": 8}],
                           progress=False)
    assert any(type(mod).__name__ == "SparseQuantLinear" or isinstance(mod, QuantLinear) for mod in model.modules())
    record = compress.run({"kind": "quantize", "model": str(tiny_model_dir), "stages": [{"method": "rtn", "bits": 4}],
                           "eval": text_file, "eval_seqlen": 64, "eval_windows": 2, "output": str(tmp_path / "out"),
                           "progress": False})
    assert record["status"] == "ok" and record["metrics"]["after"]
    assert (tmp_path / "out" / "config.json").is_file()
    with pytest.raises(compress.ConfigError, match="'nsamplez' is not a run option"):
        compress.run({"nsamplez": 3})
    torch.testing.assert_close(torch.tensor(1.0), torch.tensor(1.0))
