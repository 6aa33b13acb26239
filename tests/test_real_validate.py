"""The validation step on the real offline model (SmolLM2-135M: context 8192, width 576): settings it cannot honour are
refused from the files' headers, before a weight is loaded."""
import pytest

from compress.core.errors import CompressError
from compress.runs.runner import validate
from compress.runs.spec import RunSpec

pytestmark = pytest.mark.real


def _spec(tmp_path, **run):
    stages = [run.pop("stage", {"method": "gptq", "bits": 3, "group_size": 64})]
    return RunSpec.build({"model": "smollm2", "calib": "wikitext2", "nsamples": 4, "seqlen": 512, "eval": "wikitext2",
                          "output": str(tmp_path / "out"), **run}, kind="quantize", stages=stages)


def test_real_model_settings_checked_before_loading(tmp_path, monkeypatch, caplog):
    import compress.sources.models as models

    def no_weights(*a, **k):
        raise AssertionError("validate loaded the model")

    monkeypatch.setattr(models, "load_model", no_weights)
    recipe, out = validate(_spec(tmp_path))  # a good run passes
    assert out and recipe.method_name == "gptq"
    with pytest.raises(CompressError, match=r"--seqlen 16384 is longer than the context of model 'smollm2' \(8192 positions\)"):
        validate(_spec(tmp_path, seqlen=16384))
    with pytest.raises(CompressError, match=r"--group-size 1024 of gptq is larger than the width of layer .*\(576 inputs\)"):
        validate(_spec(tmp_path, stage={"method": "gptq", "bits": 4, "group_size": 1024}))
    with pytest.raises(CompressError, match=r"has \d+ tokens; --nsamples 512 x --seqlen 8192 = 4194304 would repeat text"):
        validate(_spec(tmp_path, nsamples=512, seqlen=8192))
    with caplog.at_level("WARNING", logger="compress"):
        validate(_spec(tmp_path, eval_seqlen=10000, ignore=["lm_head_nothing"]))
    assert "--eval-seqlen 10000 is longer than the context" in caplog.text
    assert "--ignore 'lm_head_nothing' matches no linear layer" in caplog.text
