"""LLM.int8() through bitsandbytes: the layer computes the paper's decomposition (checked against a reference written
here), exactly the input columns at or above the threshold go through 16/32-bit, outlier fractions are reported, and
the bitsandbytes 8-bit checkpoint reloads identically through this project's loader and plain transformers."""
import copy
import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from compress.core.errors import ConfigError  # noqa: E402
from compress.formats import load_checkpoint, save_checkpoint  # noqa: E402
from compress.methods.llm_int8 import int8_linear  # noqa: E402
from compress.pipeline.engine import Engine  # noqa: E402
from compress.pipeline.recipe import Recipe, RunContext  # noqa: E402

T = 6.0


def reference_llm_int8(x, w, bias, outlier_cols):
    """LLM.int8() (arXiv 2208.07339, eq. 5-6 and section 3.2): vector-wise absmax int8 for the rows of X (over the
    regular columns) and the rows of W, int8 x int8 summed exactly; the outlier columns multiplied in high precision
    (with W's int8 codes de-quantized: bitsandbytes' inference mode stores only int8 weights). Both operands are
    quantized from their float16 values in float32 arithmetic, as bitsandbytes does (so the codes match exactly)."""
    def vectorwise(a):  # [rows, cols] -> int8 codes (as float64), row abs-max
        a = a.half().float()
        c = a.abs().amax(dim=1)
        return torch.round(a * (127.0 / c[:, None])).double(), c.double()

    regular = torch.ones(x.shape[1], dtype=torch.bool)
    regular[outlier_cols] = False
    wq, cw = vectorwise(w)
    xq, cx = vectorwise(x * regular)
    y = (xq @ wq.t()) * cx[:, None] * cw[None, :] / 127**2
    y = y + x.double()[:, outlier_cols] @ (wq[:, outlier_cols] * cw[:, None] / 127).t()
    return y + bias.double()


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 96, generator=g).clamp(-4, 4)
    outliers = [5, 33, 70]
    for j, rows in zip(outliers, ([0, 4], [2], [1, 7, 8])):
        x[:, j] *= 0.1  # small where no outlier sits (the row abs-max stays in the regular columns)
        x[rows, j] = torch.tensor([9.5, -20.0, 6.0])[: len(rows)]  # 6.0 is exactly the threshold: an outlier
    x[3, 50] = 5.9  # the largest value of row 3, just below the threshold: int8 like the rest
    return x, outliers


# bitsandbytes rescales int32 sums by 6.200124e-05, 1.8e-5 above 1/127^2: the tolerance of the comparisons below
TOL = 5e-5


def test_layer_matches_reference_decomposition():
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(40, 96, generator=g), torch.randn(40, generator=g)
    x, outliers = _inputs()
    layer = int8_linear(w, bias, T)
    assert layer.weight.dtype == torch.int8
    with torch.no_grad():
        got = layer(x).double()
    ref = reference_llm_int8(x, w, bias, outliers)
    scale = ref.abs().max()
    assert (got - ref).abs().max() < TOL * scale
    # exactly those columns: one column fewer in 16-bit, the 5.9 column added, or none, is far off
    for other in ([5, 33], [33, 70], [5, 33, 70, 50], []):
        assert (got - reference_llm_int8(x, w, bias, other)).abs().max() > 10 * TOL * scale


def test_threshold_zero_is_plain_vector_wise_int8():
    g = torch.Generator().manual_seed(2)
    w, bias = torch.randn(24, 64, generator=g), torch.zeros(24)
    x, _ = _inputs()
    x = x[:, :64]
    with torch.no_grad():
        got = int8_linear(w, bias, 0.0)(x).double()
    assert (got - reference_llm_int8(x, w, bias, [])).abs().max() < TOL * got.abs().max()


def test_reports_outlier_fraction_per_layer(tiny_calib):
    from compress.model.tiny import tiny_model

    model = tiny_model("llama", seed=0, layers=2)
    amax, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: amax.setdefault(n, []).append(i[0].abs().reshape(-1, i[0].shape[-1]).amax(0))))
    with torch.no_grad():
        model(input_ids=tiny_calib)
    for h in hooks:
        h.remove()
    threshold = 1.0  # the tiny model's activations are small: a low threshold gives some outlier dimensions
    recipe = Recipe.from_specs([{"method": "llm-int8", "outlier_threshold": threshold}])
    q = copy.deepcopy(model)
    Engine(q, tiny_calib, progress=False).run(recipe.stages)
    rep = recipe.report()["llm-int8"]
    assert set(rep["layers"]) == set(amax)
    for name, stats in rep["layers"].items():
        a = torch.stack(amax[name]).amax(0)
        # block 1 sees block 0's int8 outputs: allow a dimension or two at the boundary there
        assert abs(stats["outlier_dims"] - int((a >= threshold).sum())) <= (0 if ".0." in name else 2)
        assert stats["outlier_fraction"] == pytest.approx(stats["outlier_dims"] / a.numel(), abs=1e-6)
    assert 0 < rep["mean_outlier_fraction"] < 1
    from bitsandbytes.nn import Linear8bitLt

    assert sum(isinstance(m, Linear8bitLt) for m in q.modules()) == 14


def test_bitsandbytes_checkpoint_reloads_identically(tmp_path, tiny_calib, tiny_tok):
    from transformers import AutoModelForCausalLM

    from compress.model.tiny import tiny_model
    from compress.sources.models import load_model

    model = tiny_model("llama", seed=0, layers=2)
    ctx = RunContext(progress=False, ignore=[r"layers\.1\.mlp\.down_proj"])
    q = Recipe.from_specs([{"method": "llm-int8", "report_outliers": False}]).run(model, ctx)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ref = q(input_ids=ids).logits
    out = save_checkpoint(q, tiny_tok, tmp_path / "int8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] and qc["llm_int8_threshold"] == T
    assert qc["llm_int8_skip_modules"] == ["model.layers.1.mlp.down_proj", "lm_head"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.self_attn.q_proj.SCB").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.float32
    for reload in (lambda: load_checkpoint(out)[0], lambda: load_model(str(out), dtype="float32").model,
                   lambda: AutoModelForCausalLM.from_pretrained(out)):
        with torch.no_grad():
            assert torch.equal(reload()(input_ids=ids).logits, ref)


def test_later_stages_and_dense_export_read_dequantized_weights(tmp_path, tiny_tok):
    """An int8 layer's `weight` holds integer codes: stages after llm-int8 and `--export dense` must see the float
    weight it represents (codes x row abs-max / 127), not the codes."""
    from compress.formats.exporters import export
    from compress.layers.weights import linear_weight
    from compress.model.tiny import tiny_model

    model = tiny_model("llama", seed=0, layers=1)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    q = Recipe.from_specs([{"method": "llm-int8", "report_outliers": False}]).run(model, RunContext(progress=False))
    layer = q.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.int8
    deq = linear_weight(layer)
    assert deq.dtype == torch.float32
    step = w.abs().amax(1, keepdim=True) / 127
    # within half an int8 step of every weight (bitsandbytes quantizes the float16 copy: its rounding on top)
    assert ((deq - w).abs() <= 0.51 * step + 1e-3 * w.abs()).all()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = q(input_ids=ids).logits
    path = export("dense", q, tiny_tok, tmp_path / "m")
    dense = load_checkpoint(path)[0]
    assert not any(p.dtype == torch.int8 for p in dense.parameters())
    assert torch.equal(dense.model.layers[0].mlp.up_proj.weight, deq.to(dense.model.layers[0].mlp.up_proj.weight.dtype))
    with torch.no_grad():  # float activations now: close to the int8 model, not equal
        assert torch.allclose(dense(input_ids=ids).logits, ref, atol=0.05)
    # a stage after llm-int8 quantizes the represented weight (RTN 8-bit of it stays within one more step)
    q2 = Recipe.from_specs([{"method": "rtn", "bits": 8, "group_size": -1, "sym": True}]).run(q, RunContext(progress=False))
    again = linear_weight(q2.model.layers[0].mlp.up_proj).float()
    assert ((again - w).abs() <= 2 * step).all()


def test_bad_threshold_is_a_one_line_error():
    from compress.pipeline.method import build_method

    with pytest.raises(ConfigError, match=r"--outlier-threshold -1.0 is out of range; allowed: >= 0.0"):
        build_method("llm-int8", {"outlier_threshold": -1.0})
    assert not build_method("llm-int8", {"report_outliers": False}).needs.calibration
