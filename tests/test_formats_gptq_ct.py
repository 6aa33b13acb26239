"""GPTQ (v1) and compressed-tensors checkpoints: layouts checked against independent decoders, reload to the same
model, clear refusals."""
import json
import logging

import pytest
import torch

from compress.core.errors import CompressError
from compress.formats.exporters import export
from compress.layers.quant_linear import QuantLinear
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import Calibration, TextSource


def _quantized(method="gptq", hidden=96, **opts):
    from compress.model.tiny import tiny_model

    torch.manual_seed(0)
    calib = Calibration(torch.randint(0, 256, (8, 48)), TextSource("test", "random", "-", "-"), 0)
    model = tiny_model("llama", seed=1, hidden=hidden, intermediate=128, layers=2)
    return Recipe.from_specs([{"method": method, **opts}]).run(model, RunContext(calibration=calib, progress=False))


def _unpack_reference(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes from GPTQ-packed int32 rows [W, cols] the way AutoGPTQ's pack loops lay them out (packed along dim 0):
    2/4/8 bits: value i at bits (i % (32/bits)) * bits of row i // (32/bits); 3 bits: per 3 rows, values 0-9 in row 0,
    value 10 split 2+1 bits over rows 0/1, 11-20 in row 1 from bit 1, value 21 split 1+2 bits over rows 1/2, 22-31 in
    row 2 from bit 2."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(n, w.shape[1], dtype=torch.int64)
    if bits != 3:
        per = 32 // bits
        for i in range(n):
            out[i] = (w[i // per] >> (bits * (i % per))) & (2**bits - 1)
        return out
    for c in range(n // 32):
        r0, r1, r2 = w[3 * c], w[3 * c + 1], w[3 * c + 2]
        base = 32 * c
        for j in range(10):
            out[base + j] = (r0 >> (3 * j)) & 7
        out[base + 10] = ((r0 >> 30) & 3) | ((r1 & 1) << 2)
        for j in range(10):
            out[base + 11 + j] = (r1 >> (3 * j + 1)) & 7
        out[base + 21] = ((r1 >> 31) & 1) | ((r2 & 3) << 1)
        for j in range(10):
            out[base + 22 + j] = (r2 >> (3 * j + 2)) & 7
    return out


@pytest.mark.parametrize("opts", [
    {"bits": 4, "group_size": 32, "act_order": False, "static_groups": False},
    {"bits": 3, "group_size": 32, "act_order": True, "static_groups": False},  # act-order group index
    {"bits": 2, "group_size": -1, "sym": True},
    {"bits": 8, "group_size": 64},  # 96 columns: a shorter last group
    {"bits": 4, "group_size": 32, "sym": True, "signed_scale": True},  # negative float16 scales
])
def test_gptq_layout_and_reload(opts, tmp_path, tiny_tok):
    from safetensors.torch import load_file

    from compress.sources.models import load_model

    model = _quantized(**opts)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = export("gptq", model, tiny_tok, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["group_size"], qc["sym"]) == \
        ("gptq", "gptq", opts["bits"], opts["group_size"], opts.get("sym", False))
    act_order = opts.get("act_order", True) and not opts.get("static_groups", True)
    assert qc["desc_act"] == act_order
    state = load_file(str(out / "model.safetensors"))
    bits = opts["bits"]
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        qw = m.quantized_weight()
        qweight, qzeros = state[f"{name}.qweight"], state[f"{name}.qzeros"]
        assert qweight.dtype == torch.int32 and qweight.shape == (m.in_features // 32 * bits, m.out_features)
        assert torch.equal(_unpack_reference(qweight, bits, m.in_features).t(), qw.codes.long())
        assert qzeros.shape == (qw.scales.shape[1], m.out_features // 32 * bits)
        stored = _unpack_reference(qzeros.t().contiguous(), bits, m.out_features).t()  # [groups, out], v1: zero - 1
        assert torch.equal(stored + 1, qw.zeros.t().long())
        assert torch.equal(state[f"{name}.scales"], qw.scales.t())
        assert torch.equal(state[f"{name}.g_idx"], qw.g_idx)
        if act_order:
            assert not torch.equal(qw.g_idx, m.spec.g_idx(m.in_features))
    loaded = load_model(str(out), dtype="float32")  # the project's loader reads the GPTQ folder itself
    assert loaded.source.kind == "checkpoint" and loaded.info["format"] == "gptq"
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, ref)


@pytest.mark.parametrize("opts", [
    {"damp": 0.05, "static_groups": False, "true_sequential": True, "act_order": False},
    {"damp": 0.2, "static_groups": True, "true_sequential": False, "act_order": True},
])
def test_gptq_quantize_config_is_the_runs(opts, tmp_path, tiny_tok):
    """quantize_config.json carries the run's damp / static_groups / true_sequential, also after a native reload."""
    from compress.formats.native import load_checkpoint, save_checkpoint

    model = _quantized(bits=4, group_size=32, sym=True, **opts)
    qc = json.loads((export("gptq", model, tiny_tok, tmp_path / "q") / "quantize_config.json").read_text())
    want = {"damp_percent": opts["damp"], "static_groups": opts["static_groups"],
            "true_sequential": opts["true_sequential"]}
    assert {k: qc[k] for k in want} == want
    assert qc["meta"]["method"] == "gptq" and qc["meta"]["act_order"] == opts["act_order"]
    save_checkpoint(model, tiny_tok, tmp_path / "native")
    reloaded, _, _ = load_checkpoint(tmp_path / "native")
    qc2 = json.loads((export("gptq", reloaded, tiny_tok, tmp_path / "r") / "quantize_config.json").read_text())
    assert qc2 == qc


def test_gptq_quantize_config_of_rtn_names_no_sweep_settings(tmp_path, tiny_tok):
    model = _quantized("rtn", bits=4, group_size=32, sym=True)
    qc = json.loads((export("gptq", model, tiny_tok, tmp_path / "q") / "quantize_config.json").read_text())
    assert not {"damp_percent", "static_groups", "true_sequential"} & set(qc)
    assert qc["meta"]["method"] == "rtn" and qc["desc_act"] is False


def test_gptq_refusals(tmp_path, tiny_tok):
    owq = _quantized("owq", bits=3, group_size=32, weak_columns=2)
    with pytest.raises(CompressError, match="OWQ float16 weak columns"):
        export("gptq", owq, tiny_tok, tmp_path / "a")
    model = _quantized(bits=4, group_size=32)
    lin = model.model.layers[0].mlp.down_proj
    qw = lin.quantized_weight()
    qw.zeros[0, 0] = 0  # a zero point of 0 has no v1 encoding
    model.model.layers[0].mlp.down_proj = QuantLinear.from_quantized(qw)
    with pytest.raises(CompressError, match="zero point of 0"):
        export("gptq", model, tiny_tok, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("opts", [{"bits": 4, "group_size": 32, "sym": True}, {"bits": 3, "group_size": -1, "sym": True},
                                  {"bits": 4, "group_size": 32, "sym": True, "signed_scale": True}])
def test_compressed_tensors_loads_in_plain_transformers(opts, tmp_path, tiny_tok):
    from transformers import AutoModelForCausalLM

    from compress.evals.perplexity import perplexity

    model = _quantized(**opts)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    kw = dict(seqlen=64, max_windows=4, progress=False)
    ppl = perplexity(model, tiny_tok, f"file:{text}", **kw)["value"]
    out = export("compressed-tensors", model, tiny_tok, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "lm_head" in qc["ignore"]
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert perplexity(hf, tiny_tok, f"file:{text}", **kw)["value"] == pytest.approx(ppl, rel=1e-4)


@pytest.mark.parametrize("opts,why", [
    ({"bits": 4, "group_size": 64, "sym": True}, "does not divide the input width 96"),
    ({"bits": 4, "group_size": 32}, "asymmetric"),
    ({"bits": 4, "group_size": 32, "sym": True, "act_order": True, "static_groups": False}, "act-order group index"),
])
def test_compressed_tensors_falls_back_to_gptq(opts, why, tmp_path, tiny_tok, caplog):
    model = _quantized(**opts)
    with caplog.at_level(logging.WARNING, logger="compress"):
        path = export("compressed-tensors", model, tiny_tok, tmp_path / "q")
    assert why in caplog.text and "Writing the GPTQ format instead" in caplog.text
    assert path == tmp_path / "q-gptq" and not (tmp_path / "q-compressed-tensors").exists()
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


def test_cli_exports_and_eval_of_gptq_folder(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from compress.cli import main
    from compress.runs.results import read_records

    quick = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "64", "--eval", "pydoc", "--eval-seqlen", "128",
             "--eval-windows", "4", "--no-progress"]
    out = tmp_path / "ck"
    res = CliRunner().invoke(main, ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", "--sym",
                                    "--model", str(tiny_model_dir), "--output", str(out), "--export", "gptq",
                                    "--export", "compressed-tensors", *quick], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    assert set(rec["exports"]) == {"gptq", "compressed-tensors"}
    ppl = rec["metrics"]["after"]["ppl_pydoc"]["value"]
    for fmt in ("gptq", "compressed-tensors"):
        res = CliRunner().invoke(main, ["eval", "--model", f"{out}-{fmt}", "--eval", "pydoc", "--eval-seqlen", "128",
                                        "--eval-windows", "4", "--no-progress"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert read_records()[-1]["metrics"]["after"]["ppl_pydoc"]["value"] == pytest.approx(ppl, rel=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_compressed_tensors_bit_widths_read_back_in_installed_reader(bits, tmp_path, tiny_tok):
    """Every width the exporter writes decodes, through the installed compressed-tensors' own unpacker, to our codes."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from safetensors.torch import load_file

    from compress.formats.compressed_tensors import reader_layout_reason

    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    except ImportError:
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import unpack_from_int32
    model = _quantized("rtn", bits=bits, group_size=32, sym=True)
    out = export("compressed-tensors", model, tiny_tok, tmp_path / "q")
    if reader_layout_reason(bits) is not None:  # an older reader: the exporter must have fallen back to GPTQ
        assert out.name.endswith("-gptq")
        return
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["num_bits"] == bits
    state = load_file(str(out / "model.safetensors"))
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            signed = unpack_from_int32(state[f"{name}.weight_packed"], bits, torch.Size([m.out_features, m.in_features]))
            assert torch.equal(signed.to(torch.int64) + 2 ** (bits - 1), m.quantized_weight().codes.long())
            n += 1
    assert n == 14


def test_compressed_tensors_old_reader_layout_falls_back(monkeypatch, tmp_path, tiny_tok, caplog):
    """A reader that packs 32 // bits codes per word (older compressed-tensors) cannot read our 3-bit stream."""
    import compress.formats.compressed_tensors as ct

    def old_pack(value, num_bits, packed_dim=1):  # the pre-0.20 layout: 32 // bits values per word, padding bits
        v = value.to(torch.int64) + 2 ** (num_bits - 1)
        per = 32 // num_bits
        pad = (-v.shape[1]) % per
        v = torch.nn.functional.pad(v, (0, pad)).reshape(v.shape[0], -1, per)
        words = (v << (torch.arange(per) * num_bits)).sum(-1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    monkeypatch.setattr(ct, "_installed_packer", lambda: ("0.9-old", old_pack))
    assert ct.reader_layout_reason(4) is None and ct.reader_layout_reason(8) is None
    assert "lays out 3-bit codes differently" in ct.reader_layout_reason(3)
    model = _quantized("rtn", bits=3, group_size=32, sym=True)
    with caplog.at_level(logging.WARNING, logger="compress"):
        path = export("compressed-tensors", model, tiny_tok, tmp_path / "q")
    assert "0.9-old" in caplog.text and path == tmp_path / "q-gptq"
    monkeypatch.setattr(ct, "_installed_packer", lambda: (None, None))
    assert "not installed" in ct.reader_layout_reason(5)
