"""--paper-protocol: the papers' calibration (C4, 128 x 2048) and the reference-code options of each method."""
import pytest

from compress.core.errors import CompressError, ConfigError
from compress.runs.spec import PAPER_PROTOCOL, RunSpec, apply_paper_protocol


def test_sets_calibration_and_method_reference_options():
    spec = RunSpec.build({"paper_protocol": True}, kind="quantize",
                         stages=[{"method": "owq", "bits": 3, "allocation": "budget"}, {"method": "gptq", "bits": 4}])
    apply_paper_protocol(spec)
    assert {k: getattr(spec, k) for k in PAPER_PROTOCOL} == {"calib": "c4", "nsamples": 128, "seqlen": 2048}
    assert spec.stages[0]["allocation"] == "budget"  # given by the user: kept
    assert spec.stages[0]["sensitivity_grid"] == "reference"  # not given: the reference's
    assert set(spec.stages[1]) == {"method", "bits"}
    assert spec.to_dict()["paper_protocol"] is True  # the record says which protocol was used


@pytest.mark.parametrize("given,flag", [({"seqlen": 512}, "--seqlen"), ({"calib": "ptb"}, "--calib"),
                                        ({"nsamples": 16}, "--nsamples")])
def test_conflicting_calibration_is_refused(given, flag):
    spec = RunSpec.build({"paper_protocol": True, **given}, kind="quantize", stages=[{"method": "gptq"}])
    if given == {"seqlen": 512}:  # 512 is also the default: indistinguishable from not given, so it is replaced
        apply_paper_protocol(spec)
        assert spec.seqlen == 2048
        return
    with pytest.raises(ConfigError, match=f"--paper-protocol sets {flag} .*; drop {flag}"):
        apply_paper_protocol(spec)


@pytest.mark.real
def test_real_paper_protocol_is_refused_on_the_data_kit(tmp_path, monkeypatch):
    """The data kit's C4 train sample has room for fewer than 128 disjoint windows of 2048 SmolLM2 tokens: the run
    is refused before any weight is loaded, with the reason, instead of repeating text or falling back."""
    import compress.sources.models as models
    from compress.runs.runner import validate

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    spec = RunSpec.build({"model": "smollm2", "paper_protocol": True, "output": str(tmp_path / "o")}, kind="quantize",
                         stages=[{"method": "gptq", "bits": 3, "group_size": 64}])
    with pytest.raises(CompressError, match=r"--paper-protocol \(C4, 128 x 2048 tokens\) cannot be met: .*c4.* has "
                                            r"room for \d+ windows of --seqlen 2048"):
        validate(spec)
