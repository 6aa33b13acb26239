"""Mixture-of-experts models (transformers 5's fused experts): every expert matrix compressed by RTN, GPTQ, HQQ,
Wanda, SparseGPT with statistics from the tokens routed to it, unrouted experts reported and given the fallback,
the router kept, native save/reload, dense export, bits per weight counting the experts."""
import math

import pytest
import torch

from compress.core.errors import CompressError
from compress.layers.experts import SplitExperts, fused_experts_modules, fused_to_split
from compress.layers.quant_linear import QuantLinear
from compress.pipeline.recipe import Recipe, RunContext

ARCHS = ["mixtral", "qwen3_moe"]
E = 4  # experts per block of the tiny models


def _moe(kind, seed=0):
    from compress.model.tiny import tiny_model

    return tiny_model(kind, seed=seed, hidden=64, intermediate=128, layers=2, kv_heads=2)


def _calib(n=8, L=32, seed=1):
    from compress.sources.data import Calibration, TextSource

    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(0, 256, (n, L), generator=g), TextSource("test", "random", "-", "-"), seed)


def _ppl(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(loss.item()), logits


def _run(model, specs, calib=None):
    return Recipe.from_specs(specs).run(model, RunContext(calibration=calib, progress=False))


@pytest.mark.parametrize("kind", ARCHS)
def test_split_experts_compute_exactly_what_fused_experts_compute(kind):
    model = _moe(kind)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    names = fused_to_split(model)
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert not fused_experts_modules(model)
    split = model.get_submodule(names[0])
    assert isinstance(split, SplitExperts) and len(split.gate_up) == E
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_expert_quantized_router_kept_and_reload_same_perplexity(kind, method, tmp_path, tiny_tok):
    from compress.evals.coverage import block_coverage, coverage_summary
    from compress.evals.size import model_size
    from compress.formats import load_checkpoint, save_checkpoint

    model = _moe(kind)
    before = model_size(model)
    assert before["bits_per_weight"] == 32.0  # float32 tiny model: the fused experts are counted as weights
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(7))
    model = _run(model, [{"method": method, "bits": 4, "group_size": 32}], _calib() if method == "gptq" else None)
    for i in range(2):
        experts = model.model.layers[i].mlp.experts
        assert isinstance(experts, SplitExperts)
        assert all(isinstance(m, QuantLinear) and m.spec.bits == 4 for m in [*experts.gate_up, *experts.down])
        assert model.model.layers[i].mlp.gate.weight.dtype == torch.float32  # router kept in 16/32 bits
    size = model_size(model)
    assert size["linear_weights"] == before["linear_weights"]
    assert 4.0 < size["bits_per_weight"] < 5.0, size  # w4 g32 asymmetric: 4 + (16 + 4) / 32 = 4.625
    cov = block_coverage(model)
    assert set(cov["kept"]) == {"norm", "router"}, cov["kept"]
    assert len(cov["kept"]["router"]) == 2
    assert cov["compressed_modules"] == 2 * (4 + 2 * E)  # q k v o + gate_up/down of each expert, per block
    assert "router" in coverage_summary(cov)
    ppl, logits = _ppl(model, ids)
    out = save_checkpoint(model, tiny_tok, tmp_path / "ckpt")
    loaded, _, _ = load_checkpoint(out)
    assert isinstance(loaded.model.layers[0].mlp.experts, SplitExperts)
    ppl2, logits2 = _ppl(loaded, ids)
    assert torch.allclose(logits2, logits, atol=1e-5), (logits2 - logits).abs().max()
    assert ppl2 == pytest.approx(ppl, rel=1e-6)
    assert model_size(loaded)["bits_per_weight"] == size["bits_per_weight"]


def test_gptq_statistics_come_from_the_tokens_routed_to_each_expert():
    from compress.pipeline.engine import Engine

    model = _moe("mixtral")
    fused_to_split(model)
    calib = _calib(n=4, L=16)
    engine = Engine(model, calib.input_ids, progress=False, batch_size=2)
    seen = {}

    def on_block(ctx):
        names = [n for n in ctx.targets() if ".experts." in n]
        stats = ctx.collect(names, ("hessian",))
        routed = []
        ctx.forward_all({"mlp.gate": lambda m, i, out: routed.append(out[2])})
        idx = torch.cat([r.flatten() for r in routed])
        for e in range(E):
            n_e = int((idx == e).sum())
            assert stats[f"mlp.experts.gate_up.{e}"].ntokens == n_e
            assert stats[f"mlp.experts.down.{e}"].ntokens == n_e
        seen[ctx.index] = sum(stats[f"mlp.experts.gate_up.{e}"].ntokens for e in range(E))

    engine.observe(on_block)
    assert seen == {0: 2 * 4 * 16, 1: 2 * 4 * 16}  # top-2: every token reaches two experts


def _never_route_to(model, expert):
    """Forward hooks on every router: the top-k slots that chose `expert` take another expert instead."""
    def hook(module, inp, out):
        logits, scores, idx = out
        alt = torch.where(idx[:, :1] == 0, 1, 0).expand_as(idx)  # an expert the token's other slot does not use
        alt = torch.where((idx == alt).any(dim=1, keepdim=True), 2 if expert != 2 else 1, alt)
        return logits, scores, torch.where(idx == expert, alt, idx)

    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


@pytest.mark.parametrize("method", ["gptq", "sparsegpt", "wanda"])
def test_expert_without_calibration_tokens_is_reported_and_falls_back(method, caplog):
    from compress.kernels.quant_grid import QuantSpec, rtn_quantize
    from compress.layers.weights import linear_weight

    model = _moe("qwen3_moe")
    handles = _never_route_to(model, 3)
    fused_w = [layer.mlp.experts.gate_up_proj[3].detach().clone() for layer in model.model.layers]
    opts = {"bits": 4, "group_size": 32} if method == "gptq" else {"sparsity": 0.5}
    stage = Recipe.from_specs([{"method": method, **opts}])
    with caplog.at_level("WARNING", logger="compress"):
        model = stage.run(model, RunContext(calibration=_calib(), progress=False))
    for h in handles:
        h.remove()
    unrouted = stage.stages[0].report["unrouted"]
    assert sorted(unrouted) == sorted(f"model.layers.{i}.mlp.experts.{p}.3" for i in range(2) for p in ("gate_up", "down"))
    assert "received no calibration token" in caplog.text
    for i, w in enumerate(fused_w):
        lin = model.model.layers[i].mlp.experts.gate_up[3]
        if method == "gptq":  # RTN on the same grid
            assert torch.equal(lin.dequantize_weight(torch.float32), rtn_quantize(w, QuantSpec(4, 32)).dequantize())
        else:  # magnitude: half removed, the kept weights unchanged (no error feedback without data)
            got = linear_weight(lin).float()
            keep = got != 0
            assert keep.float().mean().item() == pytest.approx(0.5, abs=0.02)
            assert torch.equal(got[keep], w[keep])
            if method == "wanda":  # within each output row, the largest |w| kept
                a = w.abs()
                assert all(a[r][keep[r]].min() >= a[r][~keep[r]].max() for r in range(a.shape[0]))
        other = model.model.layers[i].mlp.experts.gate_up[0]  # a routed expert: no fallback
        assert f"model.layers.{i}.mlp.experts.gate_up.0" not in unrouted and other is not None


@pytest.mark.parametrize("method,opts", [("hqq", {"bits": 4, "group_size": 32}), ("wanda", {"sparsity": 0.5})])
def test_other_weight_methods_compress_every_expert(method, opts):
    from compress.evals.coverage import block_coverage

    model = _run(_moe("mixtral"), [{"method": method, **opts}], _calib())
    experts = model.model.layers[1].mlp.experts
    assert all(getattr(m, "module_type", None) in ("quant_linear", "sparse_linear") for m in [*experts.gate_up, *experts.down])
    assert set(block_coverage(model)["kept"]) == {"norm", "router"}


def test_methods_that_cannot_compress_experts_refuse_naming_the_parameter():
    from compress.evals.coverage import refuse_fused_experts

    with pytest.raises(CompressError, match=r"model.layers.0.mlp.experts.gate_up_proj .*fused mixture-of-experts weights, "
                                            r"which awq cannot compress; .*methods that compress experts: .*gptq"):
        _run(_moe("mixtral"), [{"method": "awq", "bits": 4, "group_size": 32}], _calib())
    with pytest.raises(CompressError, match=r"which llm-int8 cannot compress"):
        refuse_fused_experts(_moe("mixtral"), "llm-int8")


def test_exports_of_quantized_experts(tmp_path, tiny_tok):
    from transformers import AutoModelForCausalLM

    from compress.formats.exporters import export

    model = _run(_moe("mixtral"), [{"method": "rtn", "bits": 4, "group_size": 32, "sym": True}])
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    _, logits = _ppl(model, ids)
    dense = export("dense", model, tiny_tok, tmp_path / "out", overwrite=True)
    plain = AutoModelForCausalLM.from_pretrained(dense)  # transformers itself reads the fused experts back
    assert plain.model.layers[0].mlp.experts.gate_up_proj.shape == (E, 2 * 128, 64)
    _, logits2 = _ppl(plain, ids)
    assert torch.allclose(logits2, logits, atol=1e-4)
    with pytest.raises(CompressError, match=r"--export gptq: model.layers.0.mlp.experts holds mixture-of-experts"):
        export("gptq", model, tiny_tok, tmp_path / "out", overwrite=True)


@pytest.mark.parametrize("kind", ARCHS)
def test_cli_gptq_on_a_moe_folder_then_eval_same_perplexity(kind, tmp_path, tiny_tok):
    from tests.test_cli import QUICK, _run as cli
    from compress.runs.results import read_records

    folder = tmp_path / f"tiny-{kind}"
    _moe(kind).save_pretrained(folder)
    tiny_tok.save_pretrained(folder)
    out = tmp_path / "ckpt"
    res = cli(["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", "--model", str(folder),
               "--output", str(out), *QUICK], tmp_path)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    assert 4.0 < rec["size"]["bits_per_weight"] < 5.0 and rec["size_before"]["bits_per_weight"] == \
        {"bfloat16": 16.0, "float16": 16.0, "float32": 32.0}[rec["model"]["dtype"]]  # the fused experts counted
    assert rec["coverage"]["kept"] == {"norm": 2 * (4 if kind == "qwen3_moe" else 2), "router": 2}
    assert "router" in rec["coverage"]["summary"]
    ppl = rec["metrics"]["after"]["ppl_pydoc"]["value"]
    res = cli(["eval", "--model", str(out), "--eval", "pydoc", "--eval-seqlen", "128", "--eval-windows", "4",
               "--no-progress"], tmp_path)
    assert res.exit_code == 0, res.output
    assert read_records()[-1]["metrics"]["after"]["ppl_pydoc"]["value"] == pytest.approx(ppl, rel=1e-5)
