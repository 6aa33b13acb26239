"""Pruning: masks at the target sparsity (per row, per group of M, per block, per layer on average), Wanda's mask on a
hand-built case, SparseGPT's reconstruction beating mask-only pruning, OWL's layer sparsities, GPTQ keeping a mask."""
import pytest
import torch
import torch.nn as nn

from compress.core.errors import ConfigError
from compress.kernels.masks import is_nm, keep_mask, nm_keep_mask, row_keep_mask
from compress.kernels.obs import PruneRule, gptq_quantize, sparsegpt_prune
from compress.kernels.quant_grid import QuantSpec
from compress.layers.sparse_linear import SparseLinear
from compress.pipeline.engine import LinearStats
from compress.pipeline.method import build_method
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import Calibration, TextSource


def _run(model, specs, ids):
    calib = Calibration(ids, TextSource("test", "random", "-", "-"), 0)
    recipe = Recipe.from_specs(specs)
    return recipe.run(model, RunContext(calibration=calib, progress=False)), recipe


def _tiny(seed=0):
    from compress.model.tiny import tiny_model

    return tiny_model("llama", seed=seed, hidden=64, intermediate=128, layers=2)


def _assert_reloads(model, tok, tmp_path, ids):
    from compress.formats import load_checkpoint, save_checkpoint

    with torch.no_grad():
        ref = model(input_ids=ids[:2]).logits
    loaded, _, _ = load_checkpoint(save_checkpoint(model, tok, tmp_path / "c"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids[:2]).logits, ref)


def _sparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


# ---- Wanda ----------------------------------------------------------------------------------------------------
def test_wanda_mask_on_hand_built_case():
    """|W|·||X|| per row, not |W|: the hand-computed scores decide, and differ from magnitude's choice."""
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    norms = torch.tensor([1.0, 0.1, 2.0, 10.0])  # scores: row 0 [1, .2, 6, 5], row 1 [4, .1, 2, 20]
    wanda = build_method("wanda", {"sparsity": 0.5})
    lin = nn.Linear(4, 2, bias=False)
    lin.weight.data = W.clone()
    out = wanda.compress_linear("l", lin, LinearStats(10, sq_norms=norms**2))
    assert torch.equal(out.keep_mask(), torch.tensor([[False, False, True, True], [True, False, False, True]]))
    assert torch.equal(out.weight, torch.tensor([[0.0, 0.0, 3.0, 0.5], [4.0, 0.0, 0.0, 2.0]]))
    mag = build_method("magnitude", {"sparsity": 0.5, "scope": "row"}).compress_linear("l", lin, None)
    assert torch.equal(mag.keep_mask(), torch.tensor([[False, True, True, False], [True, False, False, True]]))
    # 2:4 on a width of 8: each group of 4 of each row on its own
    lin8 = nn.Linear(8, 2, bias=False)
    lin8.weight.data = torch.cat([W, W.flip(1)], dim=1)  # second group: rows [.5, 3, -2, 1] and [2, -1, 1, 4]
    norms8 = torch.cat([norms, torch.tensor([3.0, 1.0, 0.5, 0.2])])  # its scores: [1.5, 3, 1, .2] and [6, 1, .5, .8]
    nm = build_method("wanda", {"pattern": "2:4"}).compress_linear("l", lin8, LinearStats(10, sq_norms=norms8**2))
    expect = torch.tensor([[False, False, True, True, True, True, False, False], [True, False, False, True, True, True, False, False]])
    assert torch.equal(nm.keep_mask(), expect)


def test_wanda_through_engine_is_row_topk_of_scores(ids):
    """Block 0 of a tiny llama: the mask is the per-row top-k of |W|·||X_j||_2 with X the layer's real inputs."""
    model = _tiny()
    xs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: xs.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1])))
             for n, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    weights = {n: model.model.layers[0].get_submodule(n).weight.detach().clone() for n in xs}
    pruned, _ = _run(model, [{"method": "wanda", "sparsity": 0.5}], ids)
    for name, chunks in xs.items():
        x = torch.cat(chunks).float()
        w = weights[name]
        scores = w.abs() * x.norm(dim=0)
        k = w.shape[1] // 2
        expect = torch.ones_like(w, dtype=torch.bool).scatter_(1, scores.argsort(dim=1)[:, :k], False)
        got = pruned.model.layers[0].get_submodule(name).keep_mask()
        assert (got == expect).float().mean() > 0.999, name  # ties in float32 sums may flip a weight or two
        assert torch.equal(pruned.model.layers[0].get_submodule(name).weight[got], w[got])  # no weight update


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_wanda_sparsity_exact_per_row(sparsity, ids):
    model, recipe = _run(_tiny(), [{"method": "wanda", "sparsity": sparsity}], ids)
    layers = _sparse_layers(model)
    assert len(layers) == 14
    for name, m in layers.items():
        pruned_per_row = (~m.keep_mask()).sum(dim=1)
        assert torch.all(pruned_per_row == int(m.in_features * sparsity)), name
    assert recipe.report()["wanda"]["sparsity"] == pytest.approx(sparsity, abs=0.02)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_exact_per_group(method, pattern, ids):
    n, m = map(int, pattern.split(":"))
    model, _ = _run(_tiny(), [{"method": method, "pattern": pattern}], ids)
    for name, layer in _sparse_layers(model).items():
        groups = layer.keep_mask().view(layer.out_features, -1, m).sum(dim=2)
        assert torch.all(groups == n), (name, groups.unique())
        assert layer.structure == pattern


def test_nm_last_partial_group_keeps_min_n():
    scores = torch.arange(12.0).view(2, 6)
    keep = nm_keep_mask(scores, 2, 4)
    assert keep.sum(dim=1).tolist() == [4, 4]  # 2 of the first 4, both of the last 2
    assert is_nm(keep, 2, 4)
    assert keep_mask(scores, 0.5).sum() == 6  # rows: int(6 * .5) = 3 removed each


def test_magnitude_layer_scope_keeps_the_largest():
    torch.manual_seed(0)
    w = torch.randn(16, 24)
    lin = nn.Linear(24, 16, bias=False)
    lin.weight.data = w.clone()
    out = build_method("magnitude", {"sparsity": 0.6}).compress_linear("l", lin, None)
    keep = out.keep_mask()
    assert int((~keep).sum()) == int(w.numel() * 0.6)
    assert w.abs()[keep].min() >= w.abs()[~keep].max()
    assert (~keep).sum(dim=1).float().std() > 0  # layer scope: rows lose different amounts


# ---- SparseGPT ----------------------------------------------------------------------------------------------------
def _layer_problem(seed=0, out_f=32, in_f=96, n=512):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    x = base @ torch.randn(8, in_f, generator=g) + 0.3 * torch.randn(n, in_f, generator=g)  # correlated inputs
    x = x * torch.linspace(0.2, 3.0, in_f)  # channels of different scale
    w = torch.randn(out_f, in_f, generator=g)
    return w, x, 2 * x.t() @ x / n


@pytest.mark.parametrize("rule", [PruneRule(0.5), PruneRule(0.7), PruneRule(0.5, (2, 4))])
def test_sparsegpt_beats_mask_only_pruning(rule):
    """The OBS update lowers ||XW^T - XW_hat^T||^2 below Wanda's (same sparsity, no update) and magnitude's."""
    w, x, H = _layer_problem()
    res = sparsegpt_prune(w, H, rule, block_size=32)
    assert torch.all(res.weight[~res.keep] == 0)
    norms = x.norm(dim=0)
    wanda = keep_mask(w.abs() * norms, rule.sparsity, rule.nm, "row")
    mag = keep_mask(w.abs(), rule.sparsity, rule.nm, "row")
    err = lambda w_hat: float(((x @ (w - w_hat).t()) ** 2).sum())  # noqa: E731
    assert err(res.weight) < 0.9 * err(w * wanda) < 0.9 * err(w * mag)
    removed = (~res.keep).float().mean()
    assert removed == pytest.approx(1 - rule.nm[0] / rule.nm[1] if rule.nm else rule.sparsity, abs=1e-3)


def test_sparsegpt_unstructured_exact_per_block():
    w, _, H = _layer_problem(in_f=100)
    res = sparsegpt_prune(w, H, PruneRule(0.6), block_size=32)
    for i1 in range(0, 100, 32):
        blk = res.keep[:, i1:i1 + 32]
        assert int((~blk).sum()) == int(blk.numel() * 0.6)  # SparseGPT compares a whole block of columns


def test_sparsegpt_joint_quantization_on_grid():
    w, _, H = _layer_problem()
    spec = QuantSpec(4, 32, False)
    res = sparsegpt_prune(w, H, PruneRule(0.5), spec, block_size=32)
    qw = res.quantized
    assert torch.all(res.weight[~res.keep] == 0)  # pruned weights sit on the grid's exact zero
    assert torch.all(qw.codes[~res.keep] == qw.zeros[:, qw.g_idx.long()][~res.keep])
    assert torch.equal(qw.dequantize(), res.weight)


def test_sparsegpt_joint_in_model_reloads(ids, tmp_path, tiny_tok):
    from compress.layers.quant_linear import QuantLinear

    model, _ = _run(_tiny(), [{"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 32}], ids)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and all(float((m.weight == 0).float().mean()) >= 0.5 for m in qls)
    _assert_reloads(model, tiny_tok, tmp_path, ids)


# ---- GPTQ with a fixed mask (prune, then quantize) ----------------------------------------------------------------
def test_gptq_fixed_mask_keeps_zeros_and_beats_rtn_of_pruned():
    w, x, H = _layer_problem()
    keep = row_keep_mask(w.abs() * x.norm(dim=0), 0.5)
    pruned = w * keep
    spec = QuantSpec(4, 32, False)
    free, _ = gptq_quantize(pruned, H, spec)
    assert (free.dequantize()[~keep] != 0).sum() > 10  # without a mask, error feedback refills some pruned weights
    wq = gptq_quantize(pruned, H, spec, mask=keep)[0].dequantize()
    assert torch.all(wq[~keep] == 0)
    from compress.kernels.quant_grid import rtn_quantize

    err = lambda w_hat: float(((x @ (pruned - w_hat).t()) ** 2).sum())  # noqa: E731
    assert err(wq) < err(rtn_quantize(pruned, spec).dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_wanda_then_gptq_recipe_keeps_mask(act_order, ids, tmp_path, tiny_tok):
    from compress.layers.quant_linear import QuantLinear

    wanda_only, _ = _run(_tiny(), [{"method": "wanda", "pattern": "2:4"}], ids)
    block0 = {n: m.keep_mask() for n, m in _sparse_layers(wanda_only).items() if ".0." in n}
    model, recipe = _run(_tiny(), [{"method": "wanda", "pattern": "2:4"},
                                   {"method": "gptq", "bits": 8, "group_size": 32, "act_order": act_order}], ids)
    assert recipe.method_name == "wanda+gptq"
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(qls) == 14
    for name, q in qls.items():
        assert is_nm(q.weight != 0, 2, 4), name  # one engine pass: Wanda's 2:4 mask survives GPTQ's error feedback
        assert recipe.report()["gptq"]["layers"][name]["sparsity"] == pytest.approx(0.5)
        if name in block0:  # block 0 sees the same inputs in both runs: the very same mask
            assert torch.all(q.weight[~block0[name]] == 0), name
    _assert_reloads(model, tiny_tok, tmp_path, ids)


def test_gptq_mask_zeros_option():
    from compress.layers.quant_linear import QuantLinear

    w, x, H = _layer_problem()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w * (torch.rand_like(w) > 0.5)
    stats = LinearStats(x.shape[0], hessian=H)
    out = build_method("gptq", {"bits": 4, "group_size": 32, "mask_zeros": True}).compress_linear("l", lin, stats)
    assert isinstance(out, QuantLinear) and torch.all(out.weight[lin.weight == 0] == 0)


# ---- OWL ------------------------------------------------------------------------------------------------------------
def test_owl_layer_sparsities_mean_bound_order():
    from compress.methods.owl import layer_sparsities

    ratios = [0.010, 0.030, 0.020, 0.012, 0.050, 0.011]
    for mapping in ("reference", "bounded"):
        s = layer_sparsities(ratios, 0.7, 0.08, mapping)
        assert sum(s) / len(s) == pytest.approx(0.7, abs=1e-12)
        order = sorted(range(6), key=lambda i: ratios[i])
        assert all(s[order[i]] >= s[order[i + 1]] for i in range(5))  # more outliers, less pruning
        assert layer_sparsities([0.02] * 4, 0.6, 0.08, mapping) == pytest.approx([0.6] * 4)
    assert max(abs(x - 0.7) for x in layer_sparsities(ratios, 0.7, 0.08, "bounded")) <= 0.08 + 1e-12
    # one outlier-heavy layer: the reference (OWL lib/prune.py) keeps the spread 2·lambda = 0.16, the bound shrinks it
    ref = layer_sparsities([0.01] * 9 + [0.2], 0.5, 0.08)
    assert max(ref) - min(ref) == pytest.approx(0.16) and min(ref) == pytest.approx(0.5 - 0.144)
    assert sum(ref) / 10 == pytest.approx(0.5)
    bounded = layer_sparsities([0.01] * 9 + [0.2], 0.5, 0.08, "bounded")
    assert min(bounded) == pytest.approx(0.42) and max(bounded) - min(bounded) == pytest.approx(0.16 * 0.08 / 0.144)
    with pytest.raises(ConfigError, match="OWL layer 0 would get sparsity .* lower --lam or use --mapping bounded"):
        layer_sparsities([0.2] + [0.01] * 9, 0.05, 0.05)  # 0.05 - 0.09 < 0


def test_owl_in_model_average_sparsity_and_per_row(ids, caplog):
    from compress.model.tiny import tiny_model

    model = tiny_model("llama", seed=0, hidden=64, intermediate=128, layers=4)
    with caplog.at_level("INFO", logger="compress"):
        model, recipe = _run(model, [{"method": "owl", "sparsity": 0.7, "lam": 0.1, "outlier_m": 3}], ids)
    rep = recipe.report()["owl"]
    ratios, sp = rep["outlier_ratios"], rep["layer_sparsities"]
    assert len(sp) == 4 and sum(sp) / 4 == pytest.approx(0.7, abs=1e-6)
    assert max(sp) - min(sp) > 0.05  # the layers really differ
    assert "OWL layer sparsities" in caplog.text and "layer   3" in caplog.text
    for name, m in _sparse_layers(model).items():
        i = int(name.split(".")[2])
        assert torch.all((~m.keep_mask()).sum(dim=1) == int(m.in_features * sp[i] + 1e-9)), name  # Wanda at its ratio
    total = sum(m.in_features * m.out_features for m in _sparse_layers(model).values())
    removed = sum(int((~m.keep_mask()).sum()) for m in _sparse_layers(model).values())
    assert removed / total == pytest.approx(0.7, abs=0.01)


def test_owl_sparsegpt_base(ids):
    model, recipe = _run(_tiny(), [{"method": "owl", "sparsity": 0.6, "base": "sparsegpt"}], ids)
    sp = recipe.report()["owl"]["layer_sparsities"]
    for name, m in _sparse_layers(model).items():
        assert m.sparsity == pytest.approx(sp[int(name.split(".")[2])], abs=0.01)


# ---- options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts,message", [
    ("wanda", {"sparsity": 1.5}, "--sparsity 1.5 is out of range; allowed: 0.0..0.99"),
    ("wanda", {"pattern": "2-4"}, "--pattern '2-4' is not allowed; use unstructured or N:M"),
    ("wanda", {"pattern": "4:2"}, "--pattern '4:2' needs 0 < N < M"),
    ("magnitude", {"pattern": "2:4", "sparsity": 0.7}, "--sparsity 0.7 conflicts with --pattern 2:4"),
    ("magnitude", {"scope": "block"}, "--scope 'block' is not allowed; choose one of: layer, row"),
    ("sparsegpt", {"pattern": "2:4", "block_size": 30}, "--block-size 30 is not a multiple of M=4"),
    ("sparsegpt", {"bits": 1}, "--bits 1 is out of range; allowed: 2..8"),
    ("owl", {"pattern": "2:4"}, "--pattern 2:4 is not allowed for owl"),
    ("owl", {"sparsity": 0.05}, "--lam 0.08 is out of range for --sparsity 0.05"),
    ("owl", {"sparsity": 0.9, "lam": 0.1}, "--lam 0.1 is out of range for --sparsity 0.9; allowed: 0..0.09 "
                                           "(every layer sparsity must stay in 0..0.99)"),
    ("owl", {"base": "magnitude"}, "--base 'magnitude' is not allowed; choose one of: wanda, sparsegpt"),
])
def test_bad_options_one_clear_error(method, opts, message):
    with pytest.raises(ConfigError) as e:
        build_method(method, opts)
    assert message in str(e.value)
