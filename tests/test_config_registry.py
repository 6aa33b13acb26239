"""Typed method configs and the registry."""
import pytest

from compress.core.errors import ConfigError
from compress.pipeline.method import FAMILIES, Method, all_methods, build_method, get_method


def test_rtn_registered_with_family_and_summary():
    methods = all_methods()
    assert "rtn" in methods
    cls = methods["rtn"]
    assert cls.family == "quantization" and cls.family in FAMILIES
    assert "round-to-nearest" in cls.summary.lower()


def test_unknown_method_lists_known():
    with pytest.raises(ConfigError, match="unknown method 'nope'.*rtn"):
        get_method("nope")


@pytest.mark.parametrize("opts,match", [
    ({"bits": 0}, r"--bits 0 is out of range; allowed: 2..8"),
    ({"bits": 9}, r"--bits 9 is out of range"),
    ({"group_size": 0}, r"--group-size 0 is out of range; allowed: >= 1 or -1 \(per-channel\)"),
    ({"group_size": -5}, r"--group-size -5"),
    ({"bits": "four"}, r"--bits 'four' is not a valid int"),
    ({"alpha": 0.5}, r"method 'rtn' has no option --alpha; its options are: --bits, --group-size, --observer, --signed-scale, --sym"),
])
def test_bad_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        build_method("rtn", opts)


def test_good_options_coerced():
    m = build_method("rtn", {"bits": "3", "group-size": "-1", "sym": "true"})
    assert (m.config.bits, m.config.group_size, m.config.sym) == (3, -1, True)
    assert m.describe() == "w3 ch sym"


def test_every_method_has_valid_defaults_and_metadata():
    for name, cls in all_methods().items():
        cls()  # defaults validate
        assert cls.summary and cls.family in FAMILIES, name
        # a method either runs in the engine or implements the model-level API
        assert cls.layerwise or cls.apply is not Method.apply, name


def test_recipe_report_keeps_every_stage_of_a_repeated_method(tiny_llama):
    """Two stages of one method keep both reports (the second under `name#2`), not the last one only."""
    from compress.pipeline.recipe import Recipe, RunContext

    r = Recipe.from_specs([{"method": "magnitude", "sparsity": 0.2}, {"method": "magnitude", "sparsity": 0.5}])
    r.run(tiny_llama, RunContext(progress=False))
    rep = r.report()
    assert set(rep) == {"magnitude", "magnitude#2"}
    assert rep["magnitude"] != rep["magnitude#2"]
