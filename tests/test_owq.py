"""OWQ: weak columns chosen by Hessian sensitivity, kept in float16, honest bits, exact reload."""
import pytest
import torch

from compress.core.errors import ConfigError
from compress.evals.size import model_size
from compress.formats import load_checkpoint, save_checkpoint
from compress.kernels.obs import gptq_quantize
from compress.kernels.quant_grid import QuantSpec, rtn_quantize
from compress.layers.quant_linear import OWQLinear, QuantLinear
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import Calibration, TextSource


def _calib():
    torch.manual_seed(0)
    return Calibration(torch.randint(0, 256, (8, 48)), TextSource("test", "random", "-", "-"), 0)


def _run(method, **opts):
    from compress.model.tiny import tiny_model

    model = tiny_model("llama", seed=1, hidden=96, layers=2)
    recipe = Recipe.from_specs([{"method": method, "bits": 3, "group_size": 32, **opts}])
    return recipe.run(model, RunContext(calibration=_calib(), progress=False)), recipe


def _layer_problem(seed=0, outliers=(3, 17)):
    """A layer whose inputs have a few very large channels (the activation outliers OWQ is about)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g)
    x[:, list(outliers)] *= 25
    w = torch.randn(48, 64, generator=g)
    return w, 2 * x.t() @ x / x.shape[0], x


def test_weak_columns_are_the_most_sensitive_and_reduce_error():
    from compress.methods.owq import sensitivity

    w, H, x = _layer_problem()
    spec = QuantSpec(3, 32, False)
    sens = sensitivity(w, H, rtn_quantize(w, spec).dequantize())
    weak = torch.sort(torch.topk(sens, 2).indices).values
    assert weak.tolist() == [3, 17]  # lambda_j ||dW_j||^2 singles out the outlier channels
    g, _ = gptq_quantize(w, H, spec)
    q, info = gptq_quantize(w, H, spec, keep_float=weak)
    assert q.codes.shape == (48, 62) and info.kept.shape == (48, 2)
    full = torch.empty_like(w)
    rest = [j for j in range(64) if j not in (3, 17)]
    full[:, rest] = q.dequantize()
    full[:, weak] = info.kept
    err_owq = ((x @ (w - full).t()) ** 2).sum()
    err_gptq = ((x @ (w - g.dequantize()).t()) ** 2).sum()
    assert err_owq < 0.5 * err_gptq


def test_bits_accounting_is_honest_and_within_target():
    gptq, _ = _run("gptq")
    owq, recipe = _run("owq", target_bits=3.2)
    base, bits = model_size(gptq)["bits_per_weight"], model_size(owq)["bits_per_weight"]
    assert base < bits <= base + 0.2 + 1e-9
    mods = [m for m in owq.modules() if isinstance(m, OWQLinear)]
    assert mods and sum(m.n_weak for m in mods) == recipe.report()["owq"]["weak_columns_total"]
    for m in mods:
        qpart = QuantLinear(m.in_features - m.n_weak, m.out_features, m.spec)
        # every stored bit counted: codes, scales, zeros, float16 columns and their int32 indices
        assert m.storage_bits() == qpart.storage_bits() + m.n_weak * (16 * m.out_features + 32)
        assert m.weak_weight.dtype == torch.float16 and m.weak_idx.dtype == torch.int32
        w = m.dequantize_weight(torch.float32)
        assert torch.equal(w[:, m.weak_idx.long()], m.weak_weight.float())
        # the other columns lie exactly on the grid their scales and zeros define
        qw = m.quantized_weight()
        k = w[:, m.quant_columns()] / qw.scales.float()[:, qw.g_idx.long()] + qw.zeros.float()[:, qw.g_idx.long()]
        assert torch.allclose(k, k.round(), atol=1e-3)
    # with no budget above the grid there are no weak columns: plain GPTQ layers
    none, _ = _run("owq", target_bits=3.0)
    assert not any(isinstance(m, OWQLinear) for m in none.modules())


@pytest.mark.parametrize("opts", [{"weak_columns": 4}, {"weak_columns": 2, "act_order": True, "static_groups": False}])
def test_reload_reproduces_logits(opts, tmp_path, tiny_tok):
    model, _ = _run("owq", **opts)
    assert all(m.n_weak == opts["weak_columns"] for m in model.modules() if isinstance(m, OWQLinear))
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = save_checkpoint(model, tiny_tok, tmp_path / "owq")
    loaded, _, _ = load_checkpoint(out)
    assert sum(isinstance(m, OWQLinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)
    assert model_size(loaded)["bits_per_weight"] == model_size(model)["bits_per_weight"]


@pytest.mark.parametrize("opts,msg", [
    ({"target_bits": 3.1, "weak_columns": 2}, "both given"),
    ({"target_bits": 2.5}, "--target-bits 2.5 is below --bits 3"),
    ({"weak_columns": -1}, "--weak-columns -1 is out of range"),
])
def test_bad_options(opts, msg):
    with pytest.raises(ConfigError, match=msg):
        Recipe.from_specs([{"method": "owq", "bits": 3, **opts}])


def test_reference_allocation_follows_the_authors_formula():
    """--allocation reference: k = round(in * r * ratio) made even, r = 12/(16-bits) * (target-bits) / linears per
    block; attention ratio 1, LLaMA MLP 0.375 (xvyaward/owq model_config.json)."""
    from compress.methods.owq import reference_weak_count

    model, recipe = _run("owq", target_bits=3.5, allocation="reference", sensitivity_grid="reference")
    layers = recipe.stages[0].report["layers"]
    r = 12 / 13 * 0.5 / 7
    for name, info in layers.items():
        lin = dict(model.named_modules())[name]
        ratio = 1.0 if "self_attn" in name else 0.375
        k = round(lin.in_features * r * ratio)
        assert info["weak_columns"] == k + k % 2 and info["weak_columns"] % 2 == 0
    assert layers["model.layers.0.self_attn.q_proj"]["weak_columns"] > layers["model.layers.0.mlp.up_proj"]["weak_columns"]
    assert recipe.stages[0].report["allocation"] == "reference"
    assert reference_weak_count(4096, 3, 3.01, 1.0, 7) == 6  # LLaMA-7B q_proj at 3.01 bits: 5.4 -> 5 -> even 6
    with pytest.raises(ConfigError, match="--allocation reference"):
        Recipe.from_specs([{"method": "owq", "allocation": "reference", "weak_columns": 4}])


@pytest.mark.parametrize("sym", [False, True])
def test_mse_grid_beats_min_max_in_its_norm_and_changes_the_ranking(sym):
    from compress.kernels.quant_grid import mse_fake_quantize
    from compress.methods.owq import sensitivity

    w, H, _ = _layer_problem(seed=3)
    w[:, 5] *= 8  # an outlier weight column: min/max stretches every row's grid for it, the MSE range clips it
    if sym:  # the reference's symmetric grid: scale max|w| / 2^(b-1), codes -4..3 (its largest candidate range)
        scale = w.abs().amax(1, keepdim=True) / 4
        minmax = torch.clamp(torch.round(w / scale), -4, 3) * scale
    else:
        minmax = rtn_quantize(w, QuantSpec(3, -1, sym)).dequantize()
    mse = mse_fake_quantize(w, 3, sym)
    err = lambda q: ((w - q).abs() ** 2.4).mean(1)  # noqa: E731
    assert torch.all(err(mse) <= err(minmax) * (1 + 1e-3) + 1e-6) and err(mse).sum() < err(minmax).sum()
    levels = 2 ** 3
    assert all(torch.unique(mse[i]).numel() <= levels for i in range(w.shape[0]))
    assert not torch.allclose(sensitivity(w, H, mse), sensitivity(w, H, minmax), rtol=0.05)
