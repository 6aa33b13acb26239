"""Native checkpoints: real packed storage in safetensors, identical reload, dense export, atomic writes."""
import json

import pytest
import torch

from compress.core.errors import CompressError
from compress.formats import check_output_dir, load_checkpoint, save_checkpoint
from compress.layers.quant_linear import QuantLinear
from compress.pipeline.recipe import Recipe, RunContext


def _quantize(model, method="rtn", **opts):
    return Recipe.from_specs([{"method": method, **opts}]).run(model, RunContext(progress=False))


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("opts", [{"bits": 4, "group_size": 32}, {"bits": 3, "group_size": -1, "sym": True}, {"bits": 2, "group_size": 48}])
def test_reload_reproduces_logits(arch, opts, tmp_path, tiny_tok):
    from compress.model.tiny import tiny_model

    model = _quantize(tiny_model(arch, seed=3, hidden=96), **opts)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = save_checkpoint(model, tiny_tok, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compress"
    assert all(m["bits"] == opts["bits"] for m in qc["modules"].values())
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        packed = [k for k in keys if k.endswith("weight_packed")]
        assert packed and f.get_tensor(packed[0]).dtype == torch.int32  # integers on disk, not floats
        assert not any(k.endswith("q_proj.weight") for k in keys)
    loaded, tok, info = load_checkpoint(out)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(qc["modules"])
    with torch.no_grad():
        again = loaded(input_ids=ids).logits
    assert torch.equal(ref, again)


def test_dense_checkpoint_loads_in_plain_transformers(tmp_path, tiny_llama, tiny_tok):
    from transformers import AutoModelForCausalLM

    out = save_checkpoint(tiny_llama, tiny_tok, tmp_path / "dense")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    m = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, tiny_llama(input_ids=ids).logits, atol=1e-6)


def test_dense_export_of_quantized_model(tmp_path, tiny_llama, tiny_tok):
    from transformers import AutoModelForCausalLM

    from compress.formats.exporters import export

    q = _quantize(tiny_llama, bits=4, group_size=32)
    path = export("dense", q, tiny_tok, tmp_path / "q")
    m = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, q(input_ids=ids).logits, atol=1e-5)


def test_existing_output_refused_and_kept(tmp_path, tiny_llama, tiny_tok):
    out = save_checkpoint(tiny_llama, tiny_tok, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(CompressError, match="already holds a checkpoint; pass --overwrite"):
        save_checkpoint(tiny_llama, tiny_tok, out)
    assert (out / "model.safetensors").read_bytes() == before
    with pytest.raises(CompressError, match="already holds"):
        check_output_dir(out)


def test_failed_write_leaves_old_checkpoint(tmp_path, tiny_llama, tiny_tok, monkeypatch):
    import compress.formats.base as fmt

    out = save_checkpoint(tiny_llama, tiny_tok, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "write_safetensors", boom)
    with pytest.raises(OSError):
        save_checkpoint(tiny_llama, tiny_tok, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind


def test_overwrite_replaces(tmp_path, tiny_llama, tiny_tok):
    out = save_checkpoint(tiny_llama, tiny_tok, tmp_path / "ckpt")
    q = _quantize(tiny_llama, bits=4, group_size=32)
    save_checkpoint(q, tiny_tok, out, overwrite=True)
    assert "quantization_config" in json.loads((out / "config.json").read_text())
