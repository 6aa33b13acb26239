"""AutoRound (SignRound): zero iterations are RTN, learning lowers the block error, codes on the RTN grid."""
import copy

import pytest
import torch

from compress.core.errors import ConfigError
from compress.kernels.quant_grid import QuantSpec, rtn_quantize
from compress.kernels.signround import group_view, signround_fake_quant, signround_quantize, ungroup
from compress.layers.quant_linear import QuantLinear
from compress.pipeline.recipe import Recipe, RunContext


class _Calib:
    def __init__(self, ids):
        self.input_ids = ids


def _calib(n=8, L=32, seed=1):
    return _Calib(torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("bits,gs,sym", [(3, 32, False), (2, 32, True), (4, 40, False), (3, -1, False), (3, -1, True)])
def test_zero_iterations_equal_rtn(tiny_llama, bits, gs, sym):
    grid = dict(bits=bits, group_size=gs, sym=sym)
    ar = Recipe.from_specs([{"method": "autoround", "iters": 0, **grid}]).run(copy.deepcopy(tiny_llama),
                                                                             RunContext(calibration=_calib(), progress=False))
    rtn = Recipe.from_specs([{"method": "rtn", **grid}]).run(copy.deepcopy(tiny_llama), RunContext(progress=False))
    a, r = dict(ar.named_modules()), dict(rtn.named_modules())
    n = 0
    for name, mod in r.items():
        if isinstance(mod, QuantLinear):
            n += 1
            for buf in ("weight_packed", "weight_scale", "weight_zero_point"):
                x, y = getattr(a[name], buf), getattr(mod, buf)
                assert (x is None and y is None) or torch.equal(x, y), (name, buf)
    assert n == 14


def test_kernel_identity_parameters_are_rtn_codes():
    w = torch.randn(16, 72)
    spec = QuantSpec(3, 32, False)
    a, b = signround_quantize(w, None, None, None, spec), rtn_quantize(w, spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    # the training-time fake quant is the stored grid (float16 scales, straight-through)
    wg = group_view(w, 32)
    fq = ungroup(signround_fake_quant(wg, torch.zeros_like(wg), torch.ones(wg.shape[:2]), torch.ones(wg.shape[:2]), spec), 72)
    torch.testing.assert_close(fq, b.dequantize(), rtol=0, atol=1e-6)


def test_rounding_offsets_move_codes_by_at_most_one():
    w = torch.randn(8, 64)
    spec = QuantSpec(4, 32, False)
    wg = group_view(w, 32)
    v = torch.full_like(wg, 0.49)
    up = signround_quantize(w, v, None, None, spec).codes.int()
    base = signround_quantize(w, None, None, None, spec).codes.int()
    assert ((up - base) >= 0).all() and ((up - base) <= 1).all() and (up != base).any()
    # clipping (alpha, beta < 1) shrinks the scales
    small = signround_quantize(w, None, torch.full(wg.shape[:2], 0.5), torch.full(wg.shape[:2], 0.5), spec)
    assert (small.scales.float() < signround_quantize(w, None, None, None, spec).scales.float()).all()


def _output_error(model, ref, ids):
    with torch.no_grad():
        return (model(ids).logits - ref(ids).logits).pow(2).mean().item()


def test_learning_lowers_the_block_loss_and_the_model_error(tiny_llama):
    calib = _calib(8, 32)
    recipe = Recipe.from_specs([{"method": "autoround", "bits": 2, "group_size": 32, "iters": 40}])
    ar = recipe.run(copy.deepcopy(tiny_llama), RunContext(calibration=calib, progress=False))
    losses = recipe.report()["autoround"]["block_loss"]
    assert set(losses) == {"model.layers.0", "model.layers.1"}
    assert all(v["best"] < v["first"] for v in losses.values())
    rtn = Recipe.from_specs([{"method": "rtn", "bits": 2, "group_size": 32}]).run(copy.deepcopy(tiny_llama), RunContext(progress=False))
    assert _output_error(ar, tiny_llama, calib.input_ids) < _output_error(rtn, tiny_llama, calib.input_ids)
    assert all(isinstance(m, QuantLinear) for n, m in ar.named_modules() if n.endswith("_proj"))


def test_learned_parameters_stay_in_range(tiny_llama):
    from compress.methods.autoround import _SignRoundLinear

    lin = torch.nn.Linear(32, 8)
    w = _SignRoundLinear(lin, QuantSpec(3, 16, False))
    with torch.no_grad():
        w.v.fill_(3.0)
        w.alpha.fill_(0.1)
        w.beta.fill_(2.0)
    w.clamp_()
    assert w.v.max() == 0.5 and w.alpha.min() == 0.5 and w.beta.max() == 1.0


def test_bad_options_refused():
    with pytest.raises(ConfigError, match="--observer 'mse' is not allowed"):
        Recipe.from_specs([{"method": "autoround", "observer": "mse"}])
    with pytest.raises(ConfigError, match="iters"):
        Recipe.from_specs([{"method": "autoround", "iters": -1}])


@pytest.mark.parametrize("n,size", [(16, 4), (10, 4), (3, 8)])
def test_minibatches_cover_every_sample_once_per_pass(n, size):
    from compress.methods.autoround import _batches

    size_eff = min(size, n)
    per_pass = n // size_eff
    it = _batches(n, size, torch.Generator().manual_seed(0))
    for _ in range(3):
        seen = torch.cat([next(it) for _ in range(per_pass)])
        assert len(seen) == per_pass * size_eff
        assert len(set(seen.tolist())) == len(seen)  # no sample twice within a pass
        if n % size_eff == 0:
            assert sorted(seen.tolist()) == list(range(n))
