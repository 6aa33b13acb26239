"""AWQ, HQQ and the act-mse observer on the real SmolLM2-135M-Instruct (run with --real; tiny counts).

Protocol: calibration 8 x 256 tokens of the data kit's C4 train sample (seed 0); perplexity on WikiText-2 raw test,
4 windows of 512 tokens; bfloat16; grid w3 g64 asymmetric (4-bit asymmetric g32 would be lossless on this model, whose
linears were GGUF Q4_1; the w4 g64 rows and seqlen 2048 are in bench/awq_hqq_table.py and docs/benchmarks.md).
"""
import copy

import pytest

from compress.evals.perplexity import perplexity
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import get_calibration

pytestmark = pytest.mark.real
EVAL = dict(seqlen=512, max_windows=4, progress=False)
GRID = dict(bits=3, group_size=64)
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def calib(real_loaded, data_dir):
    return get_calibration("c4", real_loaded.tokenizer, nsamples=8, seqlen=256, seed=0)


def _ppl(real_loaded, calib, key, *stages):
    if key not in RESULTS:
        model = Recipe.from_specs([{**s, **GRID} for s in stages]).run(copy.deepcopy(real_loaded.model),
                                                                      RunContext(calibration=calib, progress=False))
        RESULTS[key] = perplexity(model, real_loaded.tokenizer, "wikitext2", **EVAL)["value"]
    return RESULTS[key]


@pytest.mark.parametrize("key,stages", [
    pytest.param("hqq", [{"method": "hqq"}], marks=pytest.mark.xfail(strict=True, reason=(
        "measured on this protocol: HQQ w3 g64 121.012 (integer iterations, the default) and 808.098 (--float-zero) "
        "vs min/max RTN 105.758: the l_p<1 weight fit trades the large weights' error for the bulk's; the issue's "
        "HQQ < RTN does not hold here"))),
    ("rtn act-mse", [{"method": "rtn", "observer": "act-mse"}]),
    ("awq", [{"method": "awq", "n_grid": 10}]),
])
def test_beats_minmax_rtn(real_loaded, calib, key, stages):
    rtn = _ppl(real_loaded, calib, "rtn", {"method": "rtn"})
    ppl = _ppl(real_loaded, calib, key, *stages)
    print(f"w3 g64 wikitext2@512x4, calibration c4 8x256: RTN {rtn:.3f}  {key} {ppl:.3f}")
    assert ppl < rtn
