"""Sparse checkpoints: bitmask + kept values on disk (compressed-tensors' bit order), smaller than dense, reloading
bit-identical dense weights; the dense export and the CLI end to end."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from compress.evals.size import checkpoint_bytes, model_size
from compress.formats import load_checkpoint, save_checkpoint
from compress.layers.sparse_linear import SparseLinear, pack_bitmask, unpack_bitmask
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import Calibration, TextSource


def _prune(model, **opts):
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    calib = Calibration(ids, TextSource("test", "random", "-", "-"), 0)
    return Recipe.from_specs([{"method": "wanda", **opts}]).run(model, RunContext(calibration=calib, progress=False))


def _bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("cols", [8, 13, 64])
def test_bitmask_is_numpy_packbits_little(cols):
    keep = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) > 0.5
    packed = pack_bitmask(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (cols + 7) // 8)
    assert np.array_equal(packed.numpy(), np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_bitmask(packed, cols), keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [{"sparsity": 0.5}, {"pattern": "2:4"}, {"sparsity": 0.8}])
def test_sparse_checkpoint_smaller_and_bit_identical(dtype, opts, tmp_path, tiny_tok):
    from compress.model.tiny import tiny_model

    dense = tiny_model("llama", seed=2, hidden=64, intermediate=128, layers=2, dtype=dtype)
    dense_dir = save_checkpoint(dense, tiny_tok, tmp_path / "dense")
    model = _prune(dense, **opts)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    out = save_checkpoint(model, tiny_tok, tmp_path / "sparse")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    sc = qc["sparsity_config"]
    target = 0.8 if opts.get("sparsity") == 0.8 else 0.5
    assert sc["format"] == "sparse-bitmask" and sc["global_sparsity"] == pytest.approx(target, abs=0.01)
    assert sc["sparsity_structure"] == opts.get("pattern", "unstructured") and len(sc["targets"]) == 14
    assert all(qc["modules"][n]["type"] == "sparse_linear" for n in weights)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.mlp.down_proj"
        assert f"{name}.weight" not in keys  # no dense copy of a pruned weight
        assert f.get_tensor(f"{name}.weight_bitmask").dtype == torch.uint8
        values = f.get_tensor(f"{name}.weight_compressed")
        assert values.dtype == dtype and values.numel() == int((weights[name] != 0).sum())
    # pruned linears hold 14 of the tiny model's weights next to its embeddings: the file shrinks accordingly
    linear_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    saved = checkpoint_bytes(dense_dir) - checkpoint_bytes(out)
    assert saved > 0.9 * linear_bytes * (target - 1 / (8 * weights[name].element_size()))
    loaded, _, info = load_checkpoint(out)
    assert info["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    for n, w in weights.items():
        m = loaded.get_submodule(n)
        assert isinstance(m, SparseLinear) and m.weight.dtype == dtype
        assert torch.equal(_bits(m.weight), _bits(w)), n  # bit for bit
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_size_accounting_counts_bitmask_and_values(tiny_tok):
    from compress.layers.weights import count_parameters
    from compress.model.tiny import tiny_model

    model = tiny_model("llama", seed=0, hidden=64, intermediate=128, layers=2)
    params = count_parameters(model)
    pruned = _prune(model, sparsity=0.5)
    size = model_size(pruned)
    assert size["bits_per_weight"] == pytest.approx(1 + 0.5 * 32)  # 1 mask bit + half the float32 values
    assert size["params"] == params  # logical parameters, as for quantized layers


def test_negative_zero_and_kept_zero_reload_exactly(tmp_path, tiny_tok, tiny_llama):
    model = _prune(tiny_llama, sparsity=0.5)
    layer = model.model.layers[0].self_attn.q_proj
    kept = layer.keep_mask().nonzero()[:2]
    layer.weight.data[kept[0, 0], kept[0, 1]] = -0.0  # a stored -0.0 is a value, not a hole
    before = layer.weight.detach().clone()
    loaded, _, _ = load_checkpoint(save_checkpoint(model, tiny_tok, tmp_path / "c"))
    assert torch.equal(_bits(loaded.model.layers[0].self_attn.q_proj.weight), _bits(before))


def test_dense_export_of_pruned_model(tmp_path, tiny_llama, tiny_tok):
    from transformers import AutoModelForCausalLM

    from compress.formats.exporters import export

    model = _prune(tiny_llama, pattern="2:4")
    path = export("dense", model, tiny_tok, tmp_path / "p")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(path)
    assert float((plain.model.layers[1].mlp.up_proj.weight == 0).float().mean()) == pytest.approx(0.5)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)


def test_cli_prune_record_checkpoint_and_eval(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from compress.cli import main
    from compress.runs.results import read_records

    quick = ["--model", str(tiny_model_dir), "--calib", "pydoc", "--nsamples", "4", "--seqlen", "64", "--eval", "pydoc",
             "--eval-seqlen", "128", "--eval-windows", "4", "--no-progress"]
    out = tmp_path / "ckpt"
    res = CliRunner().invoke(main, ["prune", "--method", "wanda", "--sparsity", "0.6", "--output", str(out), *quick],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    assert rec["method"] == "wanda" and rec["family"] == "pruning"
    assert rec["details"]["wanda"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert rec["size"]["bits_per_weight"] == pytest.approx(1 + 0.4 * 16, abs=0.15)  # bfloat16 values (--dtype auto)
    assert rec["size"]["checkpoint_bytes"] < sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    ppl = rec["metrics"]["after"]["ppl_pydoc"]["value"]
    res = CliRunner().invoke(main, ["eval", "--model", str(out), "--eval", "pydoc", "--eval-seqlen", "128",
                                    "--eval-windows", "4", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert read_records()[-1]["metrics"]["after"]["ppl_pydoc"]["value"] == pytest.approx(ppl, rel=1e-4)
    res = CliRunner().invoke(main, ["prune", "--method", "wanda", "--pattern", "3:4", "--sparsity", "0.5",
                                    "--output", str(tmp_path / "bad"), *quick])
    assert res.exit_code == 2 and "--sparsity 0.5 conflicts with --pattern 3:4" in res.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("stages", [
    [{"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 32}],
    [{"method": "wanda", "pattern": "2:4"}, {"method": "gptq", "bits": 3, "group_size": -1, "sym": True, "act_order": True}],
])
def test_pruned_then_quantized_checkpoint_leaves_out_zero_codes(stages, tmp_path, tiny_tok):
    """Codes at their group's zero point (the pruned weights) are not stored; every code comes back on reload."""
    from compress.layers.quant_linear import QuantLinear
    from compress.layers.sparse_linear import SparseQuantLinear
    from compress.model.tiny import tiny_model

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    calib = Calibration(ids, TextSource("test", "random", "-", "-"), 0)
    spec = {k: v for k, v in stages[-1].items() if k in ("bits", "group_size", "sym")}
    run = lambda st: Recipe.from_specs(st).run(tiny_model("llama", seed=4, hidden=64, intermediate=128, layers=2),  # noqa: E731
                                                RunContext(calibration=calib, progress=False))
    model = run(stages)
    plain = run([{"method": "gptq", **spec}])  # the same grid without pruning
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseQuantLinear)}
    assert len(layers) == 14 and all(m.sparsity >= 0.5 for m in layers.values())
    # half the codes or more left out, one mask bit added (scales and zero points unchanged)
    assert model_size(model)["bits_per_weight"] <= model_size(plain)["bits_per_weight"] - 0.5 * spec["bits"] + 1 + 0.05
    out = save_checkpoint(model, tiny_tok, tmp_path / "sq")
    plain_out = save_checkpoint(plain, tiny_tok, tmp_path / "q")
    assert checkpoint_bytes(out) < checkpoint_bytes(plain_out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["global_sparsity"] >= 0.5
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(k.endswith("weight_packed") for k in f.keys())
    loaded, _, _ = load_checkpoint(out)
    for n, m in layers.items():
        again = loaded.get_submodule(n)
        assert isinstance(again, SparseQuantLinear) and isinstance(again, QuantLinear)
        assert torch.equal(again.weight_packed, m.weight_packed), n
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
