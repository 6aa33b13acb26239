"""AWQ, HQQ and the range observers (minmax | mse | act-mse): the issue's unit checks on tiny models and random
groups, the CLI runs, and the exports of their results (GPTQ, compressed-tensors) through the shared integer storage."""
import copy
import json

import pytest
import torch

from compress.core.errors import ConfigError
from compress.kernels.hqq import HQQParams, hqq_params, hqq_quantize, lp_objective
from compress.kernels.quant_grid import (OBSERVERS, QuantSpec, find_params, params_from_range, round_scale, rtn_quantize,
                                         weighted_sq_error)
from compress.layers.quant_linear import QuantLinear
from compress.pipeline.engine import Engine
from compress.pipeline.method import build_method
from compress.pipeline.recipe import Recipe
from tests.test_cli import QUICK, _run
from tests.test_smoothquant import _outlier_model


def _engine_run(model, calib, *specs):
    recipe = Recipe.from_specs(list(specs))
    Engine(model, calib, progress=False).run(recipe.stages)
    return recipe


def first_block_feeds(model, vocab, seqlen):
    """channel_producers of the model's first decoder block, traced on the inputs it gets from random token ids."""
    from compress.model.arch import channel_producers, find_blocks, trace_block

    _, blocks = find_blocks(model)
    cap = {}
    h = blocks[0].register_forward_pre_hook(lambda m, a, k: cap.update(a=a, k=dict(k)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, vocab, (1, seqlen)))
    h.remove()
    x = cap["a"][0] if cap["a"] else cap["k"].pop("hidden_states")
    return channel_producers(blocks[0], x, cap["k"], trace_block(blocks[0], x, cap["k"]))


def _quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# ---- AWQ --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_awq_alpha0_no_clip_is_rtn(arch, tiny_calib):
    """alpha = 0 gives s = 1: nothing is folded, nothing clipped, so AWQ's codes, scales and zeros are RTN's."""
    model = _outlier_model(arch)
    rtn, awq = copy.deepcopy(model), copy.deepcopy(model)
    _engine_run(rtn, tiny_calib, {"method": "rtn", "bits": 3, "group_size": 16})
    rec = _engine_run(awq, tiny_calib, {"method": "awq", "bits": 3, "group_size": 16, "alpha": 0.0, "clip": False})
    a, b = _quant_layers(rtn), _quant_layers(awq)
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        for t in ("weight_packed", "weight_scale", "weight_zero_point"):
            assert torch.equal(getattr(a[n], t), getattr(b[n], t)), (n, t)
    for (na, pa), (nb, pb) in zip(rtn.named_parameters(), awq.named_parameters()):
        assert torch.equal(pa, pb), na  # the norms are untouched too
    assert all(v["alpha"] == 0.0 for v in rec.stages[0].report["layers"].values())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_awq_folded_scales_keep_float_outputs(arch, tiny_calib):
    """Scale search with folding only (no clipping, no quantization): the float model computes the same function."""
    model = _outlier_model(arch)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    scaled = copy.deepcopy(model)
    rec = _engine_run(scaled, tiny_calib, {"method": "awq", "bits": 3, "group_size": 16, "n_grid": 5, "clip": False,
                                           "scale_only": True})
    layers = rec.stages[0].report["layers"]
    assert layers and any(v["alpha"] > 0 for v in layers.values())  # some scales were really folded
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), scaled.named_parameters()) if not torch.equal(p, q)]
    assert any("norm" in n for n in changed) and any("proj" in n or "fc1" in n for n in changed)
    with torch.no_grad():
        out = scaled(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not _quant_layers(scaled)


def test_awq_beats_rtn_on_outlier_model_and_searches_lower_loss(tiny_calib):
    model = _outlier_model("llama")
    with torch.no_grad():
        ref = model(input_ids=tiny_calib).logits
    errs = {}
    for name, spec in {"rtn": {"method": "rtn"}, "awq": {"method": "awq", "n_grid": 5}}.items():
        m = copy.deepcopy(model)
        rec = _engine_run(m, tiny_calib, {**spec, "bits": 3, "group_size": 16})
        with torch.no_grad():
            errs[name] = float(((m(input_ids=tiny_calib).logits - ref) ** 2).mean())
        if name == "awq":
            for v in rec.stages[0].report["layers"].values():
                assert v["loss"] <= v["loss_alpha0"]  # alpha = 0 is on the grid: the chosen one is never worse
    assert errs["awq"] < errs["rtn"]


def test_awq_then_gptq_one_pass(tiny_calib):
    model = _outlier_model("llama")
    rec = _engine_run(model, tiny_calib, {"method": "awq", "bits": 3, "group_size": 16, "n_grid": 3, "scale_only": True},
                      {"method": "gptq", "bits": 3, "group_size": 16})
    assert len(_quant_layers(model)) == 14 and rec.stages[0].report["layers"]


def test_awq_clip_search_never_worse_than_no_clip():
    from compress.methods.awq import clip_search

    torch.manual_seed(0)
    w = torch.randn(16, 48) * torch.rand(1, 48) * 3
    x = torch.randn(200, 48) * (1 + 5 * torch.rand(48))
    H = x.t() @ x / 200
    spec = QuantSpec(3, 16)
    clipped, bounds = clip_search(w, H, spec, 20, 0.5)
    for g in range(3):
        cols = slice(16 * g, 16 * (g + 1))

        def err(v):
            d = rtn_quantize(v[:, cols], spec).dequantize() - w[:, cols]
            return ((d @ H[cols, cols]) * d).sum(dim=1)

        assert torch.all(err(clipped) <= err(w) + 1e-5)
    assert torch.all(bounds <= w.abs().view(16, 3, 16).amax(-1) + 1e-6)


def test_awq_bad_options():
    with pytest.raises(ConfigError, match="observer 'act-mse'"):
        build_method("awq", {"observer": "act-mse"})
    with pytest.raises(ConfigError, match="--alpha"):
        build_method("awq", {"alpha": 1.5})


# ---- HQQ --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,sym,opt_scale", [(4, True, True), (3, False, True), (4, False, True), (2, False, True)])
def test_hqq_integer_solver_objective_never_increases(bits, sym, opt_scale):
    torch.manual_seed(bits)
    w = torch.randn(32, 64) * torch.linspace(0.1, 3, 64)  # 32 random groups of 64
    spec = QuantSpec(bits, 64, sym)
    scale, zero, trace = hqq_params(w, spec, HQQParams(optimize_scale=opt_scale, solver="integer"))
    assert len(trace) == 21
    assert all(b <= a for a, b in zip(trace, trace[1:])), trace
    assert trace[-1] < trace[0]  # the solver does move
    s0, z0 = params_from_range(w.min(1).values, w.max(1).values, spec)
    final = lp_objective(w, scale, zero, spec.maxq, 0.7)
    assert torch.all(final <= lp_objective(w, s0, z0, spec.maxq, 0.7))  # the stored grid never worse than min/max
    assert final.sum() < lp_objective(w, s0, z0, spec.maxq, 0.7).sum()
    assert trace[-1] == pytest.approx(float(final.sum()))  # the trace is the stored grid's objective
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= spec.maxq
    if sym:
        assert torch.all(zero == 2 ** (bits - 1))


def _reference_solver(w, bits, iters=20, lp=0.7, beta=10.0, kappa=1.01):
    """hqq 0.2.8's optimize_weights_proximal_legacy as Quantizer.quantize calls it (axis=1), written out step by step
    from its source, with the best iterate kept: (inverse scale, float zero, errors)."""
    maxq = 2**bits - 1
    mn, mx = w.min(1, keepdim=True)[0], w.max(1, keepdim=True)[0]
    inv = (maxq / (mx - mn)).clamp(max=2e4)
    zero = -mn * inv
    zero = torch.round(zero) if bits == 4 else zero
    best, best_zero, errs = float("inf"), zero, []
    for _ in range(iters):
        wq = torch.round(w * inv + zero).clamp(0, maxq)
        wr = (wq - zero) / inv
        err = float((w - wr).abs().mean())
        if err >= best:
            break
        best, best_zero = err, zero
        errs.append(err)
        x = w - wr
        we = torch.sign(x) * torch.relu(x.abs() - (1 / beta) * x.abs().pow(lp - 1))
        zero = torch.mean(wq - (w - we) * inv, 1, keepdim=True)
        beta *= kappa
    return inv, best_zero, errs


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_reference_solver_follows_the_package_and_never_increases(bits):
    torch.manual_seed(bits)
    w = torch.randn(32, 64) * torch.linspace(0.1, 3, 64)
    spec = QuantSpec(bits, 64)
    scale, zero, trace = hqq_params(w, spec, HQQParams())  # the default solver
    inv, zf, errs = _reference_solver(w, bits)
    assert trace == pytest.approx(errs, rel=1e-4, abs=1e-7)
    assert 2 <= len(trace) <= 20 and all(b < a for a, b in zip(trace, trace[1:]))  # it moves, and never up
    assert torch.equal(zero, zf.squeeze(1).round().clamp(0, spec.maxq))  # the float zero, rounded onto the grid
    assert torch.equal(scale, round_scale(1 / inv.squeeze(1)))
    # on the integer grid the result is an ordinary min/max-scale grid with a moved zero
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= spec.maxq
    with pytest.raises(ConfigError, match="solver 'float'"):
        HQQParams(solver="float")


def test_hqq_quantize_grid_and_short_last_group():
    torch.manual_seed(0)
    w = torch.randn(8, 100)
    spec = QuantSpec(3, 32)
    qw = hqq_quantize(w, spec)
    assert qw.scales.shape == (8, 4) and qw.codes.max() <= 7
    # the short last group (4 columns) is solved on its own
    s, z, _ = hqq_params(w[:, 96:], spec)
    assert torch.equal(qw.scales[:, 3].float(), s) and torch.equal(qw.zeros[:, 3].float(), z)
    # codes are round-to-nearest on the chosen grid
    sc, zc = qw.scales.float()[:, qw.g_idx.long()], qw.zeros.float()[:, qw.g_idx.long()]
    assert torch.equal(qw.codes.float(), torch.clamp(torch.round(w / sc) + zc, 0, spec.maxq))
    # the integer solver keeps each group's best l_p iterate: its l_p error is below min/max RTN's
    err = lambda v: float((v - w).abs().pow(0.7).sum())  # noqa: E731
    assert err(hqq_quantize(w, spec, HQQParams(solver="integer")).dequantize()) < err(rtn_quantize(w, spec).dequantize())


# ---- observers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,sym", [(2, False), (3, False), (4, False), (4, True), (3, True)])
def test_act_mse_never_worse_than_minmax_on_any_group(bits, sym):
    torch.manual_seed(bits + 10 * sym)
    for trial in range(4):
        w = torch.randn(64, 32) * (1 + 4 * torch.rand(64, 1)) + 0.3 * torch.randn(64, 1)
        cw = torch.rand(32) ** 4 * 10  # a few heavy columns
        spec = QuantSpec(bits, 32, sym, "act-mse")
        s, z = find_params(w, spec, cw)
        s0, z0 = find_params(w, QuantSpec(bits, 32, sym))
        e = weighted_sq_error(w, s, z, spec.maxq, cw.view(1, -1))
        e0 = weighted_sq_error(w, s0, z0, spec.maxq, cw.view(1, -1))
        assert torch.all(e <= e0), (trial, (e - e0).max())
        assert torch.any(e < e0)
    mse = find_params(w, QuantSpec(bits, 32, sym, "mse"))
    assert torch.all(weighted_sq_error(w, *mse, spec.maxq) <= weighted_sq_error(w, s0, z0, spec.maxq))


def test_observer_option_and_errors():
    assert OBSERVERS == ("minmax", "mse", "act-mse")
    with pytest.raises(ConfigError, match="observer 'l1' is not known; allowed: minmax, mse, act-mse"):
        QuantSpec(4, 32, observer="l1")
    with pytest.raises(ConfigError, match="needs the calibration inputs"):
        find_params(torch.randn(4, 8), QuantSpec(4, 8, observer="act-mse"))
    with pytest.raises(ConfigError, match="--observer"):
        build_method("rtn", {"observer": "l1"})
    with pytest.raises(ConfigError, match="allowed: minmax"):
        build_method("qat", {"observer": "mse"})
    assert build_method("rtn", {"observer": "act-mse"}).needs.calibration
    assert not build_method("rtn", {"observer": "mse"}).needs.calibration
    assert build_method("gptq", {"observer": "act-mse"}).describe().startswith("w4 g128 act-mse")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_observers_lower_output_error(method, tiny_calib):
    model = _outlier_model("llama")
    with torch.no_grad():
        ref = model(input_ids=tiny_calib).logits
    errs = {}
    for obs in OBSERVERS:
        m = copy.deepcopy(model)
        _engine_run(m, tiny_calib, {"method": method, "bits": 3, "group_size": 16, "observer": obs})
        with torch.no_grad():
            errs[obs] = float(((m(input_ids=tiny_calib).logits - ref) ** 2).mean())
    assert errs["act-mse"] < errs["minmax"], errs


# ---- CLI and exports ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,label", [
    (["--method", "awq", "--bits", "4", "--group-size", "64", "--n-grid", "4"], "awq(w4 g64 grid 4)"),
    (["--method", "hqq", "--bits", "4", "--group-size", "64"], "hqq(w4 g64 p0.7)"),
    (["--method", "hqq", "--bits", "4", "--group-size", "32", "--sym"], "hqq(w4 g32 sym p0.7)"),
    (["--method", "awq", "--bits", "4", "--group-size", "32", "--sym", "--n-grid", "2"], "awq(w4 g32 sym grid 2)"),
    (["--method", "rtn", "--observer", "act-mse", "--bits", "3", "--group-size", "32"], "rtn(w3 g32 act-mse)"),
])
def test_cli_quantize_records(args, label, tiny_model_dir, tmp_path):
    from compress.runs.results import read_records

    out = tmp_path / "ckpt"
    res = _run(["quantize", *args, "--model", str(tiny_model_dir), "--output", str(out),
                "--export", "gptq", "--export", "compressed-tensors", *QUICK], tmp_path)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    assert rec["status"] == "ok" and rec["setting"] == label
    assert rec["metrics"]["after"]["ppl_pydoc"]["value"] > 0
    # compressed-tensors holds symmetric grids only (transformers reads no asymmetric pack-quantized): an asymmetric
    # grid falls back to the GPTQ folder, as the exporter documents
    assert set(rec["exports"]) == {"gptq", "compressed-tensors"}
    assert rec["exports"]["compressed-tensors"].endswith("-compressed-tensors" if "--sym" in args else "-gptq")
    ppl = rec["metrics"]["after"]["ppl_pydoc"]["value"]
    for fmt, folder in rec["exports"].items():
        cfg = json.loads((tmp_path / folder / "config.json").read_text())
        assert "quantization_config" in cfg
        res = _run(["eval", "--model", str(tmp_path / folder), "--eval", "pydoc", "--eval-seqlen", "128", "--eval-windows",
                    "4", "--no-progress"], tmp_path)
        assert res.exit_code == 0, res.output
        # the GPTQ folder loads through this project's layers (same numbers); compressed-tensors through transformers'
        # own decompression in bfloat16, whose rounding of s * (q - z) differs slightly (the stored tensors are equal)
        tol = 1e-4 if folder.endswith("-gptq") else 1e-3
        assert read_records()[-1]["metrics"]["after"]["ppl_pydoc"]["value"] == pytest.approx(ppl, rel=tol), fmt


@pytest.mark.parametrize("shape,spec", [((16, 96), QuantSpec(3, 32)), ((16, 100), QuantSpec(4, 32, True)),
                                        ((8, 70), QuantSpec(2, -1)), ((8, 40), QuantSpec(3, 64))])
def test_rtn_fake_quantize_matches_rtn(shape, spec):
    from compress.kernels.quant_grid import rtn_fake_quantize

    w = torch.randn(*shape) * 2
    assert torch.equal(rtn_fake_quantize(w, spec), rtn_quantize(w, spec).dequantize())


def test_awq_clip_search_short_last_group():
    from compress.methods.awq import clip_search

    torch.manual_seed(1)
    w, x = torch.randn(8, 40), torch.randn(100, 40)
    H = x.t() @ x / 100
    clipped, bounds = clip_search(w, H, QuantSpec(3, 16), 20, 0.5)
    assert bounds.shape == (8, 3) and torch.all(clipped.abs() <= w.abs() + 1e-7)
    d0 = rtn_quantize(w[:, 32:], QuantSpec(3, 16)).dequantize() - w[:, 32:]
    d1 = rtn_quantize(clipped[:, 32:], QuantSpec(3, 16)).dequantize() - w[:, 32:]
    assert torch.all(((d1 @ H[32:, 32:]) * d1).sum(1) <= ((d0 @ H[32:, 32:]) * d0).sum(1) + 1e-5)


@pytest.mark.parametrize("arch,kv_heads,expected", [
    ("llama", None, {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"}),
    ("llama", 2, {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"}),  # grouped KV: tied
    ("opt", None, {"self_attn.out_proj": "self_attn.v_proj", "fc2": "fc1"}),  # ReLU is positively homogeneous
])
def test_channel_producers_from_data_flow(arch, kv_heads, expected):
    """The linear-to-linear pairs AWQ's reference code scales (up -> down, v -> o, OPT's fc1 -> fc2), found by the
    exact power-of-two test on the traced block; never gate -> down (SiLU) or q/k -> o (softmax). With grouped KV
    heads the map of o's input channels onto v's output channels is read off the data flow: query head h reads KV
    head h // (heads / kv_heads)."""
    from compress.model.tiny import tiny_model

    feeds = first_block_feeds(tiny_model(arch, kv_heads=kv_heads), vocab=256, seqlen=16)
    assert {k: f.producer for k, f in feeds.items()} == expected
    o = "self_attn.out_proj" if arch == "opt" else "self_attn.o_proj"
    if kv_heads is None:
        assert all(f.index is None for f in feeds.values())
    else:  # 4 query heads of 16 channels over 2 KV heads: channel j of o reads v channel (j // 32) * 16 + j % 16
        j = torch.arange(64)
        assert torch.equal(feeds[o].index, (j // 32) * 16 + j % 16) and feeds["mlp.down_proj"].index is None


@pytest.mark.parametrize("arch,kv_heads", [("llama", None), ("llama", 2), ("opt", None)])
def test_awq_linear_scales_fold_and_report(arch, kv_heads, tiny_calib):
    """The linear-fed groups are searched and folded (producer rows / s, consumer columns * s, tied across the query
    heads of a KV group): the float model computes the same function, and turning them off leaves the producers'
    output rows alone."""
    model = _outlier_model(arch, kv_heads=kv_heads)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    spec = {"method": "awq", "bits": 3, "group_size": 16, "n_grid": 5, "clip": False, "scale_only": True}
    on, off = copy.deepcopy(model), copy.deepcopy(model)
    rep_on = _engine_run(on, tiny_calib, spec).stages[0].report["layers"]
    rep_off = _engine_run(off, tiny_calib, {**spec, "linear_scales": False}).stages[0].report["layers"]
    producer = "mlp.up_proj" if arch == "llama" else "fc1"
    assert any(k.endswith(producer) for k in rep_on) and not any(k.endswith(producer) for k in rep_off)
    assert any(k.endswith("v_proj") for k in rep_on)
    assert any(v.get("tied") for v in rep_on.values()) == (kv_heads is not None)
    untied = _engine_run(copy.deepcopy(model), tiny_calib, {**spec, "tied_scales": False}).stages[0].report["layers"]
    assert any(k.endswith("v_proj") for k in untied) == (kv_heads is None)
    duo = copy.deepcopy(model)  # duo scaling's weight statistics are tied the same way
    _engine_run(duo, tiny_calib, {**spec, "duo_scaling": True})
    with torch.no_grad():
        torch.testing.assert_close(duo(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(on(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
