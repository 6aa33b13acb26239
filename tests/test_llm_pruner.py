"""LLM-Pruner (methods/llm_pruner.py): the parameter count drops by --ratio, uniform pruning gives a standard
transformers checkpoint, non-uniform pruning reloads through this project's loader to identical logits, bad
options are one clear error; on the real model (--real): 20% smaller, reloads, generates, Taylor beats the
baselines and LoRA recovery helps."""
import json
from types import SimpleNamespace

import pytest
import torch

from compress.core.errors import CompressError, ConfigError
from compress.formats import load_checkpoint, save_checkpoint
from compress.layers.weights import count_parameters
from compress.model.tiny import tiny_model
from compress.pipeline.recipe import Recipe, RunContext

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


def _prune(model, calib=None, tokenizer=None, **opts):
    """Run the method; calib: token ids [N, L] or a compress.sources.data.Calibration."""
    recipe = Recipe.from_specs([{"method": "llm-pruner", **opts}])
    if isinstance(calib, torch.Tensor):
        calib = SimpleNamespace(input_ids=calib, source=SimpleNamespace(name="pydoc"))
    ctx = RunContext(calibration=calib, tokenizer=tokenizer, progress=False)
    return recipe.run(model, ctx), recipe.stages[0].report


@pytest.mark.parametrize("arch,kw,opts", [
    ("llama", {"heads": 4, "kv_heads": 2}, {"keep_first": 1, "keep_last": 1}),
    ("llama", {"heads": 4, "kv_heads": 2}, {"uniform": True, "gqa": "query", "taylor": "element2", "aggregation": "prod", "round_to": 1}),
    ("opt", {}, {"keep_first": 1, "keep_last": 0, "taylor": "vector"}),
    ("llama", {"heads": 2, "kv_heads": 1, "hidden": 128}, {"structure": "channel"}),  # hidden % heads == 0 (LlamaConfig)
])
def test_parameter_count_drops_by_the_ratio(arch, kw, opts, tiny_calib):
    model = tiny_model(arch, seed=0, layers=4, **kw)
    before = count_parameters(model)
    model, rep = _prune(model, tiny_calib, ratio=0.3, **opts)
    after = count_parameters(model)
    assert abs((before - after) / before - 0.3) < 0.01
    assert rep["params_before"] == before and rep["params_after"] == after
    if opts.get("keep_first") or opts.get("keep_last"):
        assert rep["ratio_inside_pruned_blocks"] > rep["ratio_total"]  # the pruned blocks make up for the kept ones
        kept = [0] if arch == "opt" else [0, 3]
        assert all(rep["layers"][i] == rep["layers_before"] for i in kept)
    if opts.get("structure") != "channel":
        widths = {l["channels"] for l, b in zip(rep["layers"], rep["layers_before"]) if l != b}
        assert widths and all(w % opts.get("round_to", 8) == 0 for w in widths)  # --round-to, default 8
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_uniform_loads_with_plain_transformers(tmp_path, tiny_calib, tiny_tok):
    from transformers import AutoModelForCausalLM

    model, rep = _prune(tiny_model("llama", seed=0, layers=3, heads=4, kv_heads=2), tiny_calib, ratio=0.35, uniform=True)
    assert rep["config"] == "standard"
    out = save_checkpoint(model, tiny_tok, tmp_path / "pruned")
    cfg = json.loads((out / "config.json").read_text())
    assert "structured_pruning" not in cfg
    shape = rep["layers"][0]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (shape["heads"], shape["kv_heads"], shape["channels"])
    assert shape["heads"] < 4 and shape["channels"] < 128
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert count_parameters(plain) == count_parameters(model)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, model(input_ids=IDS).logits)


@pytest.mark.parametrize("arch,kw,opts", [
    ("llama", {"heads": 4, "kv_heads": 2}, {"keep_first": 1, "keep_last": 1}),
    ("opt", {}, {"uniform": True, "importance": "magnitude"}),  # OPT ties head width to hidden size: never standard
])
def test_non_uniform_reloads_through_our_loader(arch, kw, opts, tmp_path, tiny_calib, tiny_tok):
    from transformers import AutoModelForCausalLM

    from compress.sources.models import load_model

    model, rep = _prune(tiny_model(arch, seed=0, layers=4, **kw), tiny_calib, ratio=0.25, **opts)
    assert rep["config"] == "per-layer"
    out = save_checkpoint(model, tiny_tok, tmp_path / "pruned")
    cfg = json.loads((out / "config.json").read_text())
    assert [dict(l) for l in cfg["structured_pruning"]["layers"]] == rep["layers"]
    loaded, _, _ = load_checkpoint(out)
    via_cli_loader = load_model(str(out), dtype="float32").model
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
        assert torch.equal(loaded(input_ids=IDS).logits, ref)
        assert torch.equal(via_cli_loader(input_ids=IDS).logits, ref)
    disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert disk < 0.8 * 4 * count_parameters(tiny_model(arch, seed=0, layers=4, **kw))  # float32: 4 bytes a parameter
    with pytest.raises(Exception, match="size"):  # plain transformers refuses the shapes rather than loading garbage
        AutoModelForCausalLM.from_pretrained(out)


def test_magnitude_and_random_need_no_calibration():
    from compress.pipeline.method import build_method

    assert not build_method("llm-pruner", {"importance": "random"}).needs.calibration
    assert build_method("llm-pruner", {"importance": "magnitude", "recovery_steps": 5}).needs.calibration
    model, rep = _prune(tiny_model("llama", seed=0, layers=3), ratio=0.2, importance="random", uniform=True)
    assert rep["ratio_total"] == pytest.approx(0.2, abs=0.01)


def test_importance_decides_what_goes(tiny_calib):
    """Same sizes for every importance, different heads/channels kept; random follows the seed."""
    a, _ = _prune(tiny_model("llama", seed=0, layers=2), tiny_calib, ratio=0.3, uniform=True)
    b, _ = _prune(tiny_model("llama", seed=0, layers=2), tiny_calib, ratio=0.3, uniform=True, importance="magnitude")
    w = [m.model.layers[1].mlp.down_proj.weight for m in (a, b)]
    assert w[0].shape == w[1].shape and not torch.equal(w[0], w[1])
    # magnitude keeps the channels of largest group L2 norm
    ref = tiny_model("llama", seed=0, layers=2).model.layers[1].mlp
    norms = ref.gate_proj.weight.pow(2).sum(1) + ref.up_proj.weight.pow(2).sum(1) + ref.down_proj.weight.pow(2).sum(0)
    keep = norms.argsort(descending=True)[: w[1].shape[1]].sort().values
    assert torch.equal(w[1], ref.down_proj.weight[:, keep])
    # magnitude-l1: the largest group L1 norm
    c, _ = _prune(tiny_model("llama", seed=0, layers=2), tiny_calib, ratio=0.3, uniform=True, importance="magnitude-l1")
    l1 = ref.gate_proj.weight.abs().sum(1) + ref.up_proj.weight.abs().sum(1) + ref.down_proj.weight.abs().sum(0)
    keep = l1.argsort(descending=True)[: w[1].shape[1]].sort().values
    assert torch.equal(c.model.layers[1].mlp.down_proj.weight, ref.down_proj.weight[:, keep])


def test_lora_recovery_runs_and_merges(tiny_calib, monkeypatch):
    import compress.train.trainer as trainer

    monkeypatch.setattr(trainer, "training_data", lambda ctx, model, cfg, source=None: torch.randint(0, 256, (8, 24)))
    import compress.methods.llm_pruner as lp

    monkeypatch.setattr(lp, "training_data", trainer.training_data)
    model, rep = _prune(tiny_model("llama", seed=0, layers=3), tiny_calib, ratio=0.25, uniform=True, recovery_steps=3,
                        recovery_lr=1e-3)
    assert rep["recovery"]["steps"] == 3 and rep["recovery"]["trainable_params"] > 0
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert type(model).__name__ == "LlamaForCausalLM" and rep["config"] == "standard"


@pytest.mark.parametrize("opts,message", [
    ({"ratio": 0.95}, "--ratio 0.95 is out of range; allowed: 0.01..0.9"),
    ({"uniform": True, "keep_first": 2}, "--keep-first 2 contradicts --uniform"),
    ({"structure": "channel", "keep_last": 1}, "--keep-last 1 does not apply to --structure channel"),
    ({"gqa": "both"}, "--gqa 'both' is not allowed; choose one of: kv, query"),
    ({"importance": "l1"}, "--importance 'l1' is not allowed; choose one of: taylor, magnitude, magnitude-l1, random"),
    ({"aggregation": "mean"}, "--aggregation 'mean' is not allowed; choose one of: sum, prod, max, last"),
])
def test_bad_options_are_one_clear_error(opts, message):
    from compress.pipeline.method import build_method

    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
        build_method("llm-pruner", opts)


def test_model_dependent_errors(tiny_calib):
    with pytest.raises(ConfigError, match="--keep-first 4 and --keep-last 2 leave none of the model's 2 blocks"):
        _prune(tiny_model("llama", seed=0), tiny_calib)
    with pytest.raises(CompressError, match="--structure channel: OPTForCausalLM's config ties"):
        _prune(tiny_model("opt", seed=0), tiny_calib, structure="channel")
    with pytest.raises(CompressError, match="needs calibration data"):
        _prune(tiny_model("llama", seed=0), None, uniform=True)
    with pytest.raises(CompressError, match="--ratio 0.9 would remove"):
        _prune(tiny_model("llama", seed=0, layers=4), tiny_calib, ratio=0.9, keep_first=1, keep_last=1)


def test_cli_prune_then_eval(tiny_model_dir, tmp_path):
    import os

    from click.testing import CliRunner

    from compress.cli import main
    from compress.runs.results import read_records

    quick = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "64", "--eval", "pydoc", "--eval-seqlen", "128",
             "--eval-windows", "4", "--no-progress"]
    out = tmp_path / "ckpt"
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = CliRunner().invoke(main, ["prune", "--method", "llm-pruner", "--ratio", "0.3", "--keep-first", "1",
                                        "--keep-last", "0", "--model", str(tiny_model_dir), "--output", str(out), *quick],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        rec = read_records()[-1]
        assert rec["method"] == "llm-pruner" and rec["details"]["llm-pruner"]["config"] == "per-layer"
        assert rec["size"]["params"] == pytest.approx(0.7 * rec["size_before"]["params"], rel=0.015)
        ppl = rec["metrics"]["after"]["ppl_pydoc"]["value"]
        res = CliRunner().invoke(main, ["eval", "--model", str(out), "--eval", "pydoc", "--eval-seqlen", "128",
                                        "--eval-windows", "4", "--no-progress"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert read_records()[-1]["metrics"]["after"]["ppl_pydoc"]["value"] == pytest.approx(ppl, rel=1e-4)
        res = CliRunner().invoke(main, ["prune", "--method", "llm-pruner", "--ratio", "0.3", "--model", str(tiny_model_dir),
                                        "--output", str(tmp_path / "bad"), *quick])
        assert res.exit_code == 2 and "leave none of the model's 2 blocks" in res.output
        assert not (tmp_path / "bad").exists()
    finally:
        os.chdir(old)


# ---------------------------------------------------------------------------------------------------------------
# Real model (--real): SmolLM2-135M-Instruct, bfloat16; calibration 8 x 128 tokens of WikiText-2 (validation
# windows), perplexity on WikiText-2 raw test, 8 windows of 512 tokens.
# ---------------------------------------------------------------------------------------------------------------
REAL_EVAL = dict(seqlen=512, max_windows=8, progress=False)


@pytest.fixture(scope="module")
def real_calib(real_loaded, data_dir):
    from compress.sources.data import get_calibration

    return get_calibration("wikitext2", real_loaded.tokenizer, nsamples=8, seqlen=128, seed=0)


@pytest.fixture(scope="module")
def real_pruned(real_loaded, real_calib):
    """The default LLM-Pruner (Taylor, element-wise first order, sum; blocks 4..27) at --ratio 0.2, and its perplexity."""
    import copy

    from compress.evals.perplexity import perplexity

    model, rep = _prune(copy.deepcopy(real_loaded.model), real_calib, ratio=0.2)
    return model, rep, perplexity(model, real_loaded.tokenizer, "wikitext2", **REAL_EVAL)["value"]


@pytest.mark.real
def test_real_20_percent_smaller_reloads_and_generates(real_loaded, real_pruned, tmp_path):
    from compress.evals.perplexity import perplexity

    model, rep, ppl = real_pruned
    dense_params = count_parameters(real_loaded.model)
    assert abs(count_parameters(model) / dense_params - 0.8) <= 0.01
    assert rep["layers"][10] == {"heads": 6, "kv_heads": 2, "channels": rep["layers"][10]["channels"]}
    assert rep["layers"][0] == rep["layers"][29] == {"heads": 9, "kv_heads": 3, "channels": 1536}  # kept blocks
    out = save_checkpoint(model, real_loaded.tokenizer, tmp_path / "pruned")
    disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert abs(disk / (2 * dense_params) - 0.8) < 0.01  # bfloat16 on disk, 20% fewer bytes
    loaded, tok, _ = load_checkpoint(out)
    assert perplexity(loaded, tok, "wikitext2", **REAL_EVAL)["value"] == pytest.approx(ppl, rel=1e-4)
    prompt = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = loaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=tok.eos_token_id)
    text = tok.decode(gen[0, prompt.shape[1]:], skip_special_tokens=True)
    print(f"pruned SmolLM2 (-20%) continues 'The capital of France is' with: {text!r}")
    assert gen.shape[1] > prompt.shape[1] and text.strip()


@pytest.mark.real
def test_real_taylor_beats_baselines_and_lora_recovers(real_loaded, real_model, real_pruned, real_calib):
    import copy

    from compress.evals.perplexity import perplexity

    tok = real_loaded.tokenizer
    model, rep, taylor = real_pruned
    ppl = {"taylor": taylor}
    for importance in ("magnitude", "random"):
        m, r = _prune(copy.deepcopy(real_model), real_calib, ratio=0.2, importance=importance)
        assert r["layers"] == rep["layers"]  # the same shapes: only the choice of heads / channels differs
        ppl[importance] = perplexity(m, tok, "wikitext2", **REAL_EVAL)["value"]
    recovered, r = _prune(real_model, real_calib, tok, ratio=0.2, recovery_steps=12, recovery_lr=5e-4,
                          recovery_samples=48, recovery_seqlen=128, recovery_batch_size=4)
    ppl["taylor+lora"] = perplexity(recovered, tok, "wikitext2", **REAL_EVAL)["value"]
    print("LLM-Pruner -20% on SmolLM2, wikitext2 512x8:", ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()),
          f"(LoRA loss {r['recovery']['loss_first']:.3f} -> {r['recovery']['loss_last']:.3f})")
    assert ppl["taylor"] < ppl["magnitude"] and ppl["taylor"] < ppl["random"]
    assert ppl["taylor+lora"] < ppl["taylor"]
