"""The rotate transform (QuaRot/SpinQuant R1 + online R4), its Hadamard matrices and fast transform, its composition
with the quantizers, checkpoints and exports (tiny random models)."""
import copy
import math

import pytest
import torch

from compress.core.errors import ConfigError
from compress.kernels.hadamard import (
    fwht,
    hadamard_factor,
    hadamard_matrix,
    hadamard_plan,
    hadamard_transform,
    paley1,
    paley2,
    random_hadamard,
    random_orthogonal,
    sylvester,
)
from compress.layers.online_hadamard import OnlineHadamardLinear, online_hadamards
from compress.model.tiny import tiny_model, tiny_tokenizer
from compress.pipeline.recipe import Recipe, RunContext


class _Calib:
    def __init__(self, ids):
        self.input_ids = ids


def _model(arch, hidden=96, intermediate=192, seed=0):
    m = tiny_model(arch, seed=seed, hidden=hidden, intermediate=intermediate, heads=4 if hidden % 8 == 0 else 2)
    with torch.no_grad():  # non-trivial norm scales, so that the folding is exercised
        g = torch.Generator().manual_seed(seed + 7)
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return m


def _ids(n=2, L=24, seed=3):
    return torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(seed))


# ---- Hadamard matrices ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [sylvester(16), paley1(11), paley1(19), paley2(5), paley2(17), hadamard_matrix(576),
                               hadamard_matrix(1536), hadamard_matrix(96)], ids=lambda h: str(h.shape[0]))
def test_hadamard_matrices_are_hadamard(h):
    n = h.shape[0]
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.t(), n * torch.eye(n), rtol=0, atol=0)


def test_plans_for_smollm2_widths():
    assert hadamard_plan(576).describe() == "576 = paley2(q=17) 36 x sylvester 16"
    assert hadamard_plan(1536).describe() == "1536 = paley1(q=11) 12 x sylvester 128"
    assert hadamard_plan(4096).m == 1
    assert hadamard_plan(92) is None and hadamard_plan(6) is None  # 92 = 4 x 23: no Paley order divides it
    with pytest.raises(ConfigError, match="no Hadamard matrix of order 92"):
        hadamard_matrix(92)


@pytest.mark.parametrize("n", [64, 96, 576, 1536])
def test_fast_transform_equals_dense_product_and_is_orthogonal(n):
    plan = hadamard_plan(n)
    x = torch.randn(3, 5, n, dtype=torch.float64).float()
    dense = hadamard_matrix(n).double() / math.sqrt(n)
    torch.testing.assert_close(dense @ dense.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    fast = hadamard_transform(x, hadamard_factor(plan), plan.p)
    torch.testing.assert_close(fast.double(), x.double() @ dense.t(), rtol=0, atol=1e-5)
    # the norm is kept (orthogonal), and the butterfly alone is the Sylvester product
    torch.testing.assert_close(fast.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    y = torch.randn(4, plan.p)
    torch.testing.assert_close(fwht(y), y @ sylvester(plan.p), rtol=0, atol=1e-4)


def test_r1_matrices_orthogonal():
    for r in (random_hadamard(576, seed=1), random_orthogonal(80, seed=1)):
        torch.testing.assert_close(r @ r.t(), torch.eye(r.shape[0], dtype=torch.float64), rtol=0, atol=1e-10)
    assert not torch.equal(random_hadamard(64, 1), random_hadamard(64, 2))


def test_fwht_refuses_non_power_of_two():
    with pytest.raises(ConfigError, match="power-of-two width, not 12"):
        fwht(torch.zeros(2, 12))


# ---- the transform: same function --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("r1,online", [("hadamard", True), ("hadamard", False), ("random", True)])
def test_rotated_float_model_gives_the_same_logits(arch, r1, online):
    model = _model(arch)
    ref = copy.deepcopy(model)
    recipe = Recipe.from_specs([{"method": "rotate", "r1": r1, "online": online}])
    rot = recipe.run(model, RunContext(progress=False))
    ids = _ids()
    with torch.no_grad():
        a, b = ref(ids).logits, rot(ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
    assert bool(online_hadamards(rot)) == online
    assert rot.config.tie_word_embeddings is False
    assert rot.lm_head.weight.data_ptr() != rot.model.embed_tokens.weight.data_ptr()
    # the rotation really changed the weights, and every norm scale was folded
    assert not torch.allclose(rot.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert all(torch.all(p == 1) for n, p in rot.named_parameters() if n.endswith("layernorm.weight") or n == "model.norm.weight")
    assert "r1" in recipe.report()["rotate"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_r2_per_head_rotation_is_exact_with_grouped_query_attention(arch):
    m = tiny_model(arch, seed=1, hidden=128, intermediate=256, heads=4, kv_heads=2)  # head_dim 32, 2 q heads per kv
    ref = copy.deepcopy(m)
    recipe = Recipe.from_specs([{"method": "rotate", "r2": True}])
    rot = recipe.run(m, RunContext(progress=False))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(rot(ids).logits, ref(ids).logits, rtol=0, atol=2e-5)
    assert "per head of 32" in recipe.report()["rotate"]["r2"]
    # R2 changed v_proj and o_proj beyond what R1 alone does
    r1_only = Recipe.from_specs([{"method": "rotate"}]).run(copy.deepcopy(ref), RunContext(progress=False))
    v, v1 = rot.model.layers[0].self_attn.v_proj.weight, r1_only.model.layers[0].self_attn.v_proj.weight
    assert not torch.allclose(v, v1)
    torch.testing.assert_close(rot.model.layers[0].self_attn.q_proj.weight, r1_only.model.layers[0].self_attn.q_proj.weight)


def test_random_r1_for_a_width_without_hadamard():
    model = _model("llama", hidden=92, intermediate=192)
    with pytest.raises(ConfigError, match="hidden width 92.*--r1 random"):
        Recipe.from_specs([{"method": "rotate"}]).run(copy.deepcopy(model), RunContext(progress=False))
    rot = Recipe.from_specs([{"method": "rotate", "r1": "random"}]).run(copy.deepcopy(model), RunContext(progress=False))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(rot(ids).logits, model(ids).logits, rtol=0, atol=2e-5)


def test_layernorm_models_refused_in_one_line(tiny_opt):
    with pytest.raises(ConfigError, match="model type 'opt' is not supported"):
        Recipe.from_specs([{"method": "rotate"}]).run(tiny_opt, RunContext(progress=False))


def test_bad_options_refused():
    with pytest.raises(ConfigError, match="r1"):
        Recipe.from_specs([{"method": "rotate", "r1": "spin"}])


def test_rotate_after_quantizing_refused():
    model = Recipe.from_specs([{"method": "rtn", "bits": 4, "group_size": 32}]).run(_model("llama"), RunContext(progress=False))
    with pytest.raises(ConfigError, match="rotate float nn.Linear layers, before quantizing"):
        Recipe.from_specs([{"method": "rotate", "online": False}]).run(model, RunContext(progress=False))


# ---- composition, checkpoints, exports ---------------------------------------------------------------------------
def _nll(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


@pytest.mark.parametrize("quant", [{"method": "rtn"}, {"method": "gptq"}, {"method": "awq", "n_grid": 4},
                                   {"method": "autoround", "iters": 4}], ids=lambda q: q["method"])
def test_rotated_quantized_checkpoint_reloads_to_the_same_perplexity(tmp_path, quant):
    from compress.formats.native import load_checkpoint, save_checkpoint
    from compress.layers.quant_linear import QuantLinear

    calib = _Calib(_ids(8, 32, seed=5))
    stages = [{"method": "rotate"}, {**quant, "bits": 3, "group_size": 32}]
    model = Recipe.from_specs(stages).run(_model("llama"), RunContext(calibration=calib, progress=False))
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, OnlineHadamardLinear) and isinstance(down.linear, QuantLinear)
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "ck")
    cfg = __import__("json").loads((tmp_path / "ck" / "config.json").read_text())
    mods = cfg["quantization_config"]["modules"]
    assert mods["model.layers.0.mlp.down_proj"]["type"] == "online_hadamard"
    assert mods["model.layers.0.mlp.down_proj"]["hadamard"] == "192 = paley1(q=11) 12 x sylvester 16"
    assert mods["model.layers.0.mlp.down_proj.linear"]["type"] == "quant_linear"
    assert cfg["tie_word_embeddings"] is False
    back, _, _ = load_checkpoint(tmp_path / "ck")
    assert isinstance(back.model.layers[1].mlp.down_proj, OnlineHadamardLinear)
    ids = _ids(2, 32, seed=9)
    assert math.exp(_nll(back, ids)) == pytest.approx(math.exp(_nll(model, ids)), rel=1e-6)


def test_rotated_float_checkpoint_reloads(tmp_path):
    from compress.formats.native import load_checkpoint, save_checkpoint

    model = Recipe.from_specs([{"method": "rotate"}]).run(_model("qwen2"), RunContext(progress=False))
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "ck")
    back, _, _ = load_checkpoint(tmp_path / "ck")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_coverage_counts_the_inner_linear_once():
    from evals.coverage import block_coverage

    model = Recipe.from_specs([{"method": "rotate"}, {"method": "rtn", "bits": 4, "group_size": 32}]).run(
        _model("llama"), RunContext(progress=False))
    cov = block_coverage(model)
    assert cov["compressed_modules"] == 14 and "linear not compressed" not in cov["kept"]
    cov = block_coverage(Recipe.from_specs([{"method": "rotate"}]).run(_model("llama"), RunContext(progress=False)))
    assert len(cov["kept"]["linear not compressed"]) == 14  # float after rotate alone: the inner linears are seen


def test_exports_refuse_online_rotation_before_any_work_and_dense_folds_it(tmp_path):
    from compress.formats.dense import dequantized_copy
    from compress.formats.exporters import check_plan, export

    plan = [("rotate", {"r1": "hadamard", "online": True}), ("gptq", {"bits": 4, "group_size": 32})]
    for fmt in ("gptq", "compressed-tensors", "gguf"):
        with pytest.raises(ConfigError, match=f"--export {fmt} cannot carry rotate's online Hadamard.*--no-online"):
            check_plan(fmt, plan)
    check_plan("dense", plan)
    check_plan("gptq", [("rotate", {"online": False}), ("gptq", {"bits": 4, "group_size": 32})])
    model = Recipe.from_specs([{"method": "rotate"}, {"method": "rtn", "bits": 4, "group_size": 32, "sym": True}]).run(
        _model("llama"), RunContext(progress=False))
    with pytest.raises(ConfigError, match="cannot carry rotate's online Hadamard"):
        export("gptq", model, tiny_tokenizer(), tmp_path / "x")
    dense = dequantized_copy(model)
    assert not online_hadamards(dense)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    # the dense export is a plain transformers folder (untied head, R4 folded): transformers alone gives the same logits
    from transformers import AutoModelForCausalLM

    out = export("dense", model, tiny_tokenizer(), tmp_path / "d")
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


def test_r1_only_rotated_model_exports_to_gptq(tmp_path):
    from compress.formats.exporters import export

    model = Recipe.from_specs([{"method": "rotate", "online": False}, {"method": "rtn", "bits": 4, "group_size": 32, "sym": True}]).run(
        _model("llama", hidden=64, intermediate=128), RunContext(progress=False))
    out = export("gptq", model, tiny_tokenizer(), tmp_path / "x")
    assert (out / "config.json").exists()


# ---- the command line -----------------------------------------------------------------------------------------------
def test_cli_rotate_recipe_runs_saves_reloads_and_refuses_gptq_export_first(tiny_model_dir, tmp_path):
    from test_cli import QUICK, _run

    from compress.runs.results import read_records

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: %s\nstages:\n  - {method: rotate}\n  - {method: gptq, bits: 4, group_size: 32}\n" % tiny_model_dir)
    res = _run(["recipe", str(recipe), "--output", str(tmp_path / "bad"), "--export", "gptq", *QUICK], tmp_path)
    assert res.exit_code != 0 and "cannot carry rotate's online Hadamard" in res.output
    assert not (tmp_path / "bad").exists()
    res = _run(["recipe", str(recipe), "--output", str(tmp_path / "o"), "--export", "dense", *QUICK], tmp_path)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    assert rec["method"] == "rotate+gptq" and rec["status"] == "ok"
    ppl = rec["metrics"]["after"]["ppl_pydoc"]["value"]
    for folder in ("o", "o-dense"):
        res = _run(["eval", "--model", str(tmp_path / folder), "--eval", "pydoc", "--eval-seqlen", "128",
                    "--eval-windows", "4", "--no-progress"], tmp_path)
        assert res.exit_code == 0, res.output
        assert read_records()[-1]["metrics"]["after"]["ppl_pydoc"]["value"] == pytest.approx(ppl, rel=1e-3)


def test_cli_autoround(tiny_model_dir, tmp_path):
    from test_cli import QUICK, _run

    from compress.runs.results import read_records

    res = _run(["quantize", "--method", "autoround", "--bits", "3", "--group-size", "32", "--iters", "3",
                "--minibatch", "2", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), *QUICK], tmp_path)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    assert rec["method"] == "autoround" and rec["status"] == "ok"
