"""SmoothQuant: the smoothing transform (exact, eq. 3-4, found through the traced graph), W8A8 with real int8 layers,
composition before GPTQ in one engine pass, native checkpoints and the compressed-tensors export."""
import copy
import json

import pytest
import torch

from compress.core.errors import ConfigError
from compress.formats import load_checkpoint, save_checkpoint
from compress.layers.quant_linear import QuantLinear
from compress.layers.w8a8_linear import W8A8Linear
from compress.pipeline.engine import Engine
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import Calibration


def _outlier_model(arch, seed=0, kv_heads=None):
    """A tiny model whose norms are not all-ones and whose hidden states carry a few large channels (the activation
    outliers SmoothQuant is about)."""
    from compress.model.tiny import tiny_model

    model = tiny_model(arch, seed=seed, layers=2, hidden=64, intermediate=128, kv_heads=kv_heads)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_((0.5 + torch.rand(p.shape, generator=g)) if name.endswith("weight") else 0.1 * torch.randn(p.shape, generator=g))
                if name.endswith("weight"):
                    p[[3, 17, 40]] *= 25.0  # outlier channels after every norm
    return model


def _run(model, calib, *specs):
    recipe = Recipe.from_specs(list(specs))
    for stage in recipe.stages:  # as Recipe.run does (SmoothQuant picks its default alpha from the model type)
        stage.prepare(model, RunContext(progress=False))
    Engine(model, calib, progress=False).run(recipe.stages)
    return recipe


def _norm_inputs(model, calib):
    """max|X_j| of the inputs of every q_proj / gate_proj (or OPT's q_proj / fc1), from a plain forward pass."""
    amax, hooks = {}, []
    for name, mod in model.named_modules():
        if name.endswith(("q_proj", "gate_proj", "fc1")):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, n=name: amax.__setitem__(n, torch.maximum(amax.get(n, torch.zeros(i[0].shape[-1])), i[0].abs().reshape(-1, i[0].shape[-1]).amax(0)))))
    with torch.no_grad():
        model(input_ids=calib)
    for h in hooks:
        h.remove()
    return amax


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_smoothing_alone_keeps_outputs(arch, tiny_calib):
    model = _outlier_model(arch)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    smoothed = copy.deepcopy(model)
    recipe = _run(smoothed, tiny_calib, {"method": "smoothquant", "alpha": 0.5, "smooth_only": True})
    with torch.no_grad():
        out = smoothed(input_ids=ids).logits
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    report = recipe.report()["smoothquant"]["smoothed"]
    assert len(report) == 2 * 2  # attention norm and MLP norm of each of the 2 blocks
    for entry in report.values():  # the outlier channels were flattened
        assert entry["act_max_over_median_after"] < entry["act_max_over_median_before"] / 3
    changed = [n for n, p in smoothed.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])]
    assert any("norm" in n for n in changed) and any("q_proj" in n for n in changed)
    assert not any(n.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")) for n in changed)


def test_smoothing_factors_are_eq4(tiny_calib):
    """s_j = max|X_j|^a / max|W_j|^(1-a), max|W_j| over q, k and v together: read back from the folded norm."""
    model = _outlier_model("llama")
    alpha = 0.7
    block0 = copy.deepcopy(model)
    amax = _norm_inputs(block0, tiny_calib)["model.layers.0.self_attn.q_proj"]
    attn = model.model.layers[0].self_attn
    w_max = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).abs().amax(0)
    expected = amax.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    _run(model, tiny_calib, {"method": "smoothquant", "alpha": alpha, "smooth_only": True})
    s = norm_before / model.model.layers[0].input_layernorm.weight
    assert torch.allclose(s, expected, rtol=1e-4)
    k_before = block0.model.layers[0].self_attn.k_proj.weight
    assert torch.allclose(model.model.layers[0].self_attn.k_proj.weight, k_before * s, rtol=1e-5, atol=1e-7)


def test_smoothing_lowers_w8a8_error_with_static_activations(tiny_calib):
    """The paper's claim on a toy: with outlier channels, per-tensor int8 activations lose far less after smoothing."""
    model = _outlier_model("llama", seed=1)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    errs = {}
    for smooth in (False, True):
        m = copy.deepcopy(model)
        _run(m, tiny_calib, {"method": "smoothquant", "smooth": smooth, "act_scheme": "per-tensor", "alpha": 0.5})
        assert sum(isinstance(x, W8A8Linear) for x in m.modules()) == 2 * 7
        with torch.no_grad():
            errs[smooth] = (m(input_ids=ids).logits - ref).pow(2).mean().item()
    assert errs[True] < 0.5 * errs[False]


def test_smooth_then_gptq_in_one_engine_pass(tiny_calib, monkeypatch):
    model = _outlier_model("llama")
    captures = []
    orig = Engine.capture
    monkeypatch.setattr(Engine, "capture", lambda self, quiet=False: (captures.append(1), orig(self, quiet))[1])
    smoothed = copy.deepcopy(model)
    _run(smoothed, tiny_calib, {"method": "smoothquant", "smooth_only": True})
    captures.clear()
    recipe = Recipe.from_specs([{"method": "smoothquant", "smooth_only": True}, {"method": "gptq", "bits": 8, "group_size": -1}])
    ctx = RunContext(progress=False, calibration=Calibration(tiny_calib, None, 0))
    out = recipe.run(model, ctx)
    assert len(captures) == 1  # both stages share one sequential pass
    assert sum(isinstance(m, QuantLinear) for m in out.modules()) == 2 * 7
    # block 0 saw the same inputs in both runs, so its norms were smoothed identically; GPTQ then quantized the
    # smoothed weights (8-bit: close to the smoothed float model)
    assert torch.equal(out.model.layers[0].input_layernorm.weight, smoothed.model.layers[0].input_layernorm.weight)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = smoothed(input_ids=ids).logits
        assert (out(input_ids=ids).logits - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("scheme", ["per-token", "per-tensor"])
def test_w8a8_checkpoint_reloads_identically(scheme, tmp_path, tiny_calib, tiny_tok):
    model = _outlier_model("llama")
    _run(model, tiny_calib, {"method": "smoothquant", "act_scheme": scheme})
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = save_checkpoint(model, tiny_tok, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compress"
    assert {m["type"] for m in qc["modules"].values()} == {"w8a8_linear"}
    assert {m["act_scheme"] for m in qc["modules"].values()} == {scheme}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
        assert ("model.layers.0.mlp.down_proj.input_scale" in f.keys()) == (scheme == "per-tensor")
    loaded, _, _ = load_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)


@pytest.mark.parametrize("scheme", ["per-token", "per-tensor"])
def test_compressed_tensors_export_loads_in_transformers(scheme, tmp_path, tiny_calib, tiny_tok, monkeypatch):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    from compress.formats.dense import dequantized_copy
    from compress.formats.exporters import export

    model = _outlier_model("llama")
    _run(model, tiny_calib, {"method": "smoothquant", "act_scheme": scheme, "alpha": 0.5})
    path = export("compressed-tensors", model, tiny_tok, tmp_path / "m")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # the library's own schema accepts it
    assert parsed.format == "int-quantized" and qc["ignore"] == ["lm_head"]
    acts = parsed.config_groups["group_0"].input_activations
    assert (acts.strategy, acts.dynamic) == (("token", True) if scheme == "per-token" else ("tensor", False))
    ct = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = ct(input_ids=ids).logits
        if scheme == "per-tensor":  # static scales: the same computation (theirs fake-quantized in float)
            assert torch.allclose(theirs, ours, atol=1e-4)
        else:
            # Dynamic per token, compressed-tensors' reference divides each token's abs-max by 127.5 (its bit range
            # 255 / 2); we divide by 127 as vLLM's dynamic int8 kernel does (scale = absmax / 127.0f). That divisor
            # is the whole difference, layer by layer: with it set to 127.5 each of our int8 layers computes theirs.
            # (Whole-model logits are not compared: a 1e-6 float difference that flips one rounding in block 0
            # grows through the blocks.)
            import compress.kernels.int8 as int8

            g = torch.Generator().manual_seed(3)
            pairs = [(n, m, ct.get_submodule(n)) for n, m in model.named_modules() if isinstance(m, W8A8Linear)]
            assert len(pairs) == 14
            for divisor, same in ((127, False), (127.5, True)):
                monkeypatch.setattr(int8, "INT8_MAX", divisor)
                for name, m, t in pairs:
                    x = 3 * torch.randn(2, 5, m.in_features, generator=g)
                    assert torch.allclose(m(x), t(x), atol=1e-4) == same, (name, divisor)
        for m in ct.modules():  # weights alone: identical to our de-quantized int8 weights
            m.quantization_enabled = False
        weights_only = ct(input_ids=ids).logits
        assert torch.allclose(weights_only, dequantized_copy(model)(input_ids=ids).logits, atol=1e-5)


def test_bad_options_are_one_line_errors():
    from compress.pipeline.method import build_method

    with pytest.raises(ConfigError, match=r"--alpha 1.5 is out of range; allowed: 0.0..1.0"):
        build_method("smoothquant", {"alpha": 1.5})
    with pytest.raises(ConfigError, match=r"--act-scheme 'per-row' is not allowed; choose one of: per-token, per-tensor"):
        build_method("smoothquant", {"act_scheme": "per-row"})
    with pytest.raises(ConfigError, match="--smooth-only with --no-smooth"):
        build_method("smoothquant", {"smooth_only": True, "smooth": False})
    assert not build_method("smoothquant", {"smooth": False}).needs.calibration  # dynamic W8A8 needs no data


def test_cli_smoothquant_and_eval_same_perplexity(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from compress.cli import main
    from compress.runs.results import read_records

    quick = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "64", "--eval", "pydoc", "--eval-seqlen", "128",
             "--eval-windows", "2", "--no-progress"]
    out = tmp_path / "sq"
    res = CliRunner().invoke(main, ["quantize", "--method", "smoothquant", "--alpha", "0.5", "--model", str(tiny_model_dir),
                                    "--output", str(out), "--export", "compressed-tensors", *quick], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    assert rec["method"] == "smoothquant" and rec["details"]["smoothquant"]["smoothed"]
    assert 8.0 < rec["size"]["bits_per_weight"] < 8.5
    assert (tmp_path / "sq-compressed-tensors" / "config.json").is_file()
    res = CliRunner().invoke(main, ["eval", "--model", str(out), "--eval", "pydoc", "--eval-seqlen", "128",
                                    "--eval-windows", "2", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert read_records()[-1]["metrics"]["after"]["ppl_pydoc"]["value"] == pytest.approx(rec["metrics"]["after"]["ppl_pydoc"]["value"], rel=1e-4)


@pytest.mark.parametrize("arch,alpha", [("llama", 0.85), ("opt", 0.5)])
def test_alpha_defaults_by_architecture(arch, alpha, tiny_calib):
    """No --alpha: the authors' value for the model type (LLaMA 0.85, OPT 0.5); the smoothing factors are eq. 4 at it."""
    from compress.quant.smoothing import smoothing_factors

    model = _outlier_model(arch)
    ref = copy.deepcopy(model)
    recipe = Recipe.from_specs([{"method": "smoothquant", "smooth_only": True}])
    recipe.run(model, RunContext(calibration=Calibration(tiny_calib, None, 0), progress=False))
    assert recipe.stages[0].report["alpha"] == alpha
    explicit = Recipe.from_specs([{"method": "smoothquant", "smooth_only": True, "alpha": alpha}])
    explicit.run(ref, RunContext(calibration=Calibration(tiny_calib, None, 0), progress=False))
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    assert recipe.stages[0].report["smoothed"] and smoothing_factors  # smoothing really happened


def test_per_tensor_weight_scales_o1_o3(tmp_path, tiny_calib, tiny_tok):
    """--weight-scheme per-tensor: one float16 scale per weight matrix (the paper's O1/O3), stored, reloaded, exported."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    from compress.formats.exporters import export

    model = _outlier_model("llama")
    _run(model, tiny_calib, {"method": "smoothquant", "act_scheme": "per-tensor", "weight_scheme": "per-tensor"})
    lins = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(lins) == 14 and all(m.weight_scale.shape == (1, 1) for m in lins)
    m = lins[0]
    w = m.dequantize_weight(torch.float32)
    assert torch.equal(w, m.weight.float() * m.weight_scale.float()) and int(m.weight.abs().max()) == 127
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    loaded, _, _ = load_checkpoint(save_checkpoint(model, tiny_tok, tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)
    qc = json.loads((export("compressed-tensors", model, tiny_tok, tmp_path / "m") / "config.json").read_text())
    assert QuantizationConfig.model_validate(qc["quantization_config"]).config_groups["group_0"].weights.strategy == "tensor"
