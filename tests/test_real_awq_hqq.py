"""AWQ, HQQ and the act-mse observer on the real SmolLM2-135M-Instruct (run with --real; tiny counts, about 2 min).

Protocol: calibration 4 x 256 tokens of the data kit's C4 train sample (seed 0; min/max RTN and HQQ use none);
perplexity on WikiText-2 raw test, 4 windows of 512 tokens; bfloat16; grid w3 g64 asymmetric only (4-bit asymmetric
g32 would be lossless on this model, whose linears were GGUF Q4_1; the w4 g64 rows and seqlen 2048 are in
bench/awq_hqq_table.py and docs/benchmarks.md). AWQ with a 10-point alpha grid (the paper's 20 in the bench).
"""
import copy

import pytest
import torch

from compress.evals.perplexity import perplexity
from compress.kernels.hqq import HQQParams, hqq_params, lp_objective
from compress.kernels.quant_grid import QuantSpec, params_from_range
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import get_calibration

pytestmark = pytest.mark.real
EVAL = dict(seqlen=512, max_windows=4, progress=False)
GRID = dict(bits=3, group_size=64)
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def calib(real_loaded, data_dir):
    return get_calibration("c4", real_loaded.tokenizer, nsamples=4, seqlen=256, seed=0)


def _ppl(real_loaded, calib, key, *stages):
    if key not in RESULTS:
        model = Recipe.from_specs([{**s, **GRID} for s in stages]).run(copy.deepcopy(real_loaded.model),
                                                                      RunContext(calibration=calib, progress=False))
        RESULTS[key] = perplexity(model, real_loaded.tokenizer, "wikitext2", **EVAL)["value"]
    return RESULTS[key]


@pytest.mark.parametrize("key,stages", [
    pytest.param("hqq", [{"method": "hqq"}], marks=pytest.mark.xfail(strict=True, reason=(
        "HQQ's l_p<1 weight fit does not beat min/max RTN on this model: on this protocol (both calibration-free) "
        "HQQ w3 g64 (the reference's iterations, zero rounded) gave 107.9 vs RTN 106.1 (the integer solver 121.0 vs 105.8 "
        "in the one-thread probe), "
        "and the hqq package's own solver (float zero, its 0.2.8 defaults) 315.0 in that probe; "
        "docs/benchmarks.md, HQQ section"))),
    ("rtn act-mse", [{"method": "rtn", "observer": "act-mse"}]),
    ("awq", [{"method": "awq", "n_grid": 10}]),
])
def test_beats_minmax_rtn(real_loaded, calib, key, stages):
    rtn = _ppl(real_loaded, calib, "rtn", {"method": "rtn"})
    ppl = _ppl(real_loaded, calib, key, *stages)
    print(f"w3 g64 wikitext2@512x4, calibration c4 4x256: RTN {rtn:.3f}  {key} {ppl:.3f}")
    assert ppl < rtn


def test_hqq_solvers_on_real_weights(real_loaded):
    """Each solver's own objective on real weights never rises: the reference solver's mean |W - W_hat| falls over
    its iterations; the integer solver leaves every group's l_p error at most min/max's, the total lower."""
    spec = QuantSpec(3, 64)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.15.self_attn.q_proj"):
        w = real_loaded.model.get_submodule(name).weight.detach().float().reshape(-1, 64)
        _, _, trace = hqq_params(w, spec, HQQParams())
        assert len(trace) >= 2 and all(b < a for a, b in zip(trace, trace[1:])), (name, trace)
        scale, zero, trace = hqq_params(w, spec, HQQParams(solver="integer"))
        s0, z0 = params_from_range(w.min(1).values, w.max(1).values, spec)
        start, final = lp_objective(w, s0, z0, spec.maxq, 0.7), lp_objective(w, scale, zero, spec.maxq, 0.7)
        assert torch.all(final <= start) and final.sum() < 0.99 * start.sum(), name
        assert all(b <= a for a, b in zip(trace, trace[1:]))


def test_awq_linear_pairs_on_the_real_block(real_loaded):
    """On SmolLM2 (grouped-query attention: 9 query heads of 64 over 3 KV heads; v_proj 192 outputs, o_proj 576
    inputs) the data-flow test finds the reference's up -> down pair one to one, and v -> o tied: o's input channel j
    reads v channel (j // 192) * 64 + j % 64 (llm-awq and llm-compressor skip this pair for these shapes)."""
    from tests.test_awq_hqq import first_block_feeds

    feeds = first_block_feeds(real_loaded.model, vocab=1000, seqlen=32)
    assert {k: f.producer for k, f in feeds.items()} == {"mlp.down_proj": "mlp.up_proj", "self_attn.o_proj": "self_attn.v_proj"}
    j = torch.arange(576)
    assert feeds["mlp.down_proj"].index is None and torch.equal(feeds["self_attn.o_proj"].index, (j // 192) * 64 + j % 64)
