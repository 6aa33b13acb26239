"""GGUF export: block packers against gguf.quants' reference, the file's tensors against the model's integer codes
(LLaMA and Qwen2), refusals before any work, re-quantization, and llama.cpp itself (skipped where absent).

Real check (--real): SmolLM2-135M, GPTQ 4-bit symmetric group 32 (Q4_0; 4-bit asymmetric g32 would be lossless on
this model, whose linears were GGUF Q4_1 — symmetric is not), calibration 8 x 256 tokens of WikiText-2 train;
WikiText-2 raw test, 4 windows of 512 tokens: llama.cpp's perplexity of the file within 1% of compress's (float32),
and greedy generation of 32 tokens agreeing with compress on the first 16.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

gguf = pytest.importorskip("gguf")

from compress.core.errors import CompressError, ConfigError  # noqa: E402
from compress.formats.gguf import (  # noqa: E402
    GRID_TYPES,
    _qk_rows,
    check_plan,
    pack_blocks,
    unpack_blocks,
    write_gguf,
)
from compress.kernels.quant_grid import QuantSpec, rtn_quantize  # noqa: E402
from compress.layers.quant_linear import QuantLinear  # noqa: E402
from compress.model.surgery import set_module  # noqa: E402
from compress.model.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from compress.evals.llamacpp import llama_cpp_available  # noqa: E402

NO_LLAMA_CPP = llama_cpp_available()


def _random_grid(rows, n, bits, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g).to(torch.uint8).numpy()
    scales = (torch.rand(rows, n // 32, generator=g) * 0.1 + 1e-3).half().numpy()
    zeros = (np.full((rows, n // 32), 2 ** (bits - 1)) if sym
             else torch.randint(0, 2**bits, (rows, n // 32), generator=g).numpy()).astype(np.uint8)
    return codes, scales, zeros


@pytest.mark.parametrize("grid", sorted(GRID_TYPES.items()))
def test_packer_matches_gguf_reference_dequantize(grid):
    """pack_blocks' bytes, decoded by gguf.quants (llama.cpp's layout), give our grid's weights: exactly for the
    symmetric types, with m = -d*zero rounded to fp16 for Q4_1/Q5_1."""
    (bits, sym), qtype = grid
    codes, scales, zeros = _random_grid(8, 128, bits, sym)
    data = pack_blocks(codes, scales, zeros, qtype)
    t = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[t]
    assert data.shape == (8, 128 // block * nbytes)
    deq = gguf.quants.dequantize(data, t)
    d = np.repeat(scales.astype(np.float32), 32, axis=1)
    z = np.repeat(zeros.astype(np.float32), 32, axis=1)
    if sym:
        want = d * (codes.astype(np.float32) - z)
        assert np.array_equal(deq, want)
    else:
        m = np.repeat((-(scales.astype(np.float32) * zeros.astype(np.float32))).astype(np.float16).astype(np.float32), 32, axis=1)
        assert np.array_equal(deq, d * codes.astype(np.float32) + m)
        exact = d * (codes.astype(np.float32) - z)
        assert np.abs(deq - exact).max() <= np.abs(m).max() * 2**-10  # fp16 rounding of m only
    q, dd, mm = unpack_blocks(data, qtype, 128)
    assert np.array_equal(q, codes) and np.array_equal(dd, scales)
    assert (mm is None) == sym


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0"])
def test_packer_reproduces_gguf_reference_quantize_bytes(qtype):
    """Blocks quantized by gguf.quants (llama.cpp's reference rounding), unpacked and packed again: identical bytes."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1)).numpy()
    t = gguf.GGMLQuantizationType[qtype]
    ref = gguf.quants.quantize(w, t)
    q, d, _ = unpack_blocks(ref, qtype, 256)
    zero = {"Q8_0": 128, "Q4_0": 8, "Q5_0": 16}[qtype]
    again = pack_blocks(q.astype(np.uint8), d, np.full(d.shape, zero, np.uint8), qtype)
    assert np.array_equal(again, ref)


def _quantize_all(model, bits, sym, group=32):
    ref = {}
    for n, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and n.startswith("model.layers"):
            q = QuantLinear.from_quantized(rtn_quantize(mod.weight, QuantSpec(bits, group, sym)), mod.bias)
            set_module(model, n, q)
            ref[n] = q.quantized_weight().dequantize().numpy()
    return ref


def _tensors(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (5, True)])
def test_export_tensors_are_the_models_codes(arch, bits, sym, tmp_path):
    model = tiny_model(arch, kv_heads=2)
    ref = _quantize_all(model, bits, sym)
    info = write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf")
    qtype = GRID_TYPES[(bits, sym)]
    assert info["file_type"] == qtype and info["architecture"] == arch
    r, t = _tensors(tmp_path / "m.gguf")
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields[f"{arch}.attention.head_count_kv"].contents() == 2
    assert r.fields[f"{arch}.block_count"].contents() == 2
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    for i in range(2):
        for hf, gg in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down")]:
            x = t[f"blk.{i}.{gg}.weight"]
            assert x.tensor_type.name == qtype
            want = ref[f"model.layers.{i}.{hf}"]
            if arch == "llama" and gg in ("attn_q", "attn_k"):  # rows in llama.cpp's interleaved-RoPE order
                want = want[_qk_rows(want.shape[0], 4 if gg == "attn_q" else 2)]
            got = gguf.quants.dequantize(x.data, x.tensor_type)
            tol = 0 if sym else float(np.abs(want).max()) * 2**-9
            assert np.abs(got - want).max() <= tol, (gg, i)
        assert t[f"blk.{i}.attn_norm.weight"].tensor_type.name == "F32"
        assert (f"blk.{i}.attn_q.bias" in t) == (arch == "qwen2")
    assert t["token_embd.weight"].tensor_type.name == "Q8_0"
    assert "output.weight" not in t  # tied embeddings


def test_qk_permutation_is_llama_cpps():
    """_qk_rows is convert_hf_to_gguf's permute(W, n_head): reshape(n_head, 2, d/2, ...).swapaxes(1, 2)."""
    w = np.arange(8 * 3).reshape(8, 3)
    theirs = w.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)
    assert np.array_equal(w[_qk_rows(8, 2)], theirs)


def test_float_model_exports_f16_and_requant(tmp_path):
    model = tiny_model("llama")
    info = write_gguf(model, tiny_tokenizer(), tmp_path / "f16.gguf")
    assert info["file_type"] == "F16" and info["requantized"] is None
    _, t = _tensors(tmp_path / "f16.gguf")
    assert t["token_embd.weight"].tensor_type.name == "F16"
    w = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    got = gguf.quants.dequantize(t["blk.0.ffn_down.weight"].data, t["blk.0.ffn_down.weight"].tensor_type)
    assert np.array_equal(got, w.astype(np.float16).astype(np.float32))
    # a 3-bit group-128 grid has no GGUF type: refused, unless re-quantized on request
    model3 = tiny_model("llama")
    _quantize_all(model3, 3, False, group=64)
    with pytest.raises(ConfigError, match="3-bit asymmetric group 64.*has no GGUF type; exportable grids: 8-bit sym g32"):
        write_gguf(model3, tiny_tokenizer(), tmp_path / "no.gguf")
    info = write_gguf(model3, tiny_tokenizer(), tmp_path / "rq.gguf", requant="q4_0")
    assert info["file_type"] == "Q4_0" and "re-quantized to Q4_0" in info["requantized"]
    r, _ = _tensors(tmp_path / "rq.gguf")
    assert "re-quantized to Q4_0" in r.fields["compress.linears"].contents()


@pytest.mark.parametrize("stage,what", [
    (("gptq", {"bits": 4, "group_size": 128, "sym": True}), "gptq's grid (4-bit symmetric group 128)"),
    (("rtn", {"bits": 3, "group_size": 32, "sym": False}), "rtn's grid (3-bit asymmetric group 32)"),
    (("rtn", {"bits": 4, "group_size": -1, "sym": True}), "rtn's grid (4-bit symmetric per-channel)"),
    (("gptq", {"bits": 4, "group_size": 32, "sym": True, "act_order": True}), "act-order (group index)"),
    (("owq", {"bits": 4, "group_size": 32, "target_bits": 4.2}), "owq's float16 weak columns"),
])
def test_plan_refused_in_one_line(stage, what):
    with pytest.raises(ConfigError) as e:
        check_plan([stage], {})
    msg = str(e.value)
    assert "\n" not in msg and what in msg and "exportable grids:" in msg and "--gguf-requant" in msg
    check_plan([stage], {"gguf_requant": "q4_0"})  # asked to re-quantize: allowed


def test_plan_accepts_exportable_grids():
    for (bits, sym) in GRID_TYPES:
        check_plan([("gptq", {"bits": bits, "group_size": 32, "sym": sym, "act_order": False})], {})
    check_plan([("gptq", {"bits": 4, "group_size": 32, "sym": True, "act_order": True, "static_groups": True})], {})
    with pytest.raises(ConfigError, match="--gguf-requant 'q3_k' is not a GGUF type"):
        check_plan([], {"gguf_requant": "q3_k"})


def test_cli_export_gguf_writes_file_and_record(tiny_model_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from compress.cli import main
    from compress.runs.results import read_records

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ck"
    res = CliRunner().invoke(main, ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "--sym",
                                    "--model", str(tiny_model_dir), "--output", str(out), "--export", "gguf",
                                    "--eval", "none", "--no-baseline", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    path = rec["exports"]["gguf"]
    assert path == str(out) + "-gguf/model.gguf"
    assert "from the method's integer codes" in rec["export_notes"]["gguf"]
    r, t = _tensors(path)
    assert t["blk.0.ffn_up.weight"].tensor_type.name == "Q4_0"
    # bad grid: one error line, before the model is loaded, nothing written
    res = CliRunner().invoke(main, ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "128",
                                    "--model", str(tiny_model_dir), "--output", str(tmp_path / "bad"), "--export", "gguf"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: --export gguf: gptq's grid (4-bit asymmetric group 128) has no GGUF type")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad-gguf").exists()


def test_unsupported_architecture_refused(tmp_path):
    with pytest.raises(CompressError, match="model type 'opt' has no GGUF writer here; supported: llama, qwen2"):
        write_gguf(tiny_model("opt"), tiny_tokenizer(), tmp_path / "o.gguf")


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp itself
# ---------------------------------------------------------------------------------------------------------------
needs_llama_cpp = pytest.mark.skipif(NO_LLAMA_CPP is not None, reason=str(NO_LLAMA_CPP))


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_loads_and_matches_logits(arch, tmp_path):
    """llama.cpp's forward pass of our Q4_0 file gives the logits of our QuantLinear model (both architectures)."""
    from compress.evals.llamacpp import load_gguf, window_logits

    model = tiny_model(arch, kv_heads=2, layers=2, hidden=128, intermediate=256, heads=4)
    _quantize_all(model, 4, True)
    write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", embed="f16")
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0].float().numpy()
    llm = load_gguf(tmp_path / "m.gguf", n_ctx=64, threads=1)
    theirs = window_logits(llm, ids[0].tolist())
    assert theirs.shape == ours.shape
    # llama.cpp's CPU matmul rounds the activations to Q8_0 blocks for Q4_0 weights: close, not bit-identical
    # (measured: 0.4% of the largest logit, every argmax equal)
    assert np.abs(theirs - ours).max() < 0.01 * np.abs(ours).max(), np.abs(theirs - ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.95


@pytest.mark.real
@needs_llama_cpp
def test_real_gptq_q4_0_in_llama_cpp(tmp_path, data_dir):
    from compress.api import run
    from compress.evals.llamacpp import llamacpp_greedy, llamacpp_perplexity, load_gguf
    from compress.evals.perplexity import perplexity
    from compress.formats import load_checkpoint

    out = tmp_path / "smol-gptq"
    rec = run({"kind": "quantize", "stages": [{"method": "gptq", "bits": 4, "group_size": 32, "sym": True}],
               "nsamples": 8, "seqlen": 256, "eval": ["none"], "baseline": False, "output": str(out),
               "exports": ["gguf"], "dtype": "float32", "data_dir": str(data_dir), "progress": False}, store=False)
    path = rec["exports"]["gguf"]
    model, tok, _ = load_checkpoint(out, dtype=torch.float32)
    ours = perplexity(model, tok, "wikitext2", seqlen=512, max_windows=4, data_dir=str(data_dir), progress=False)
    llm = load_gguf(path, n_ctx=512)
    theirs = llamacpp_perplexity(path, tok, "wikitext2", seqlen=512, max_windows=4, data_dir=str(data_dir), llm=llm)
    print(json.dumps({"compress": ours["value"], "llama.cpp": theirs["value"]}))
    assert abs(theirs["value"] / ours["value"] - 1) < 0.01
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=32, do_sample=False)[0, prompt.shape[1]:].tolist()
    lc = llamacpp_greedy(path, prompt[0].tolist(), 32, llm=llm)["tokens"]
    assert gen[:16] == lc[:16], (gen, lc)
