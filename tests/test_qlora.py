"""QLoRA: the NF4 code book and double quantization as the paper defines them, honest size, training lowers the
held-out loss, the peft adapter reloads onto the NF4 base, the run's checkpoint reloads to the same numbers."""
import copy
import json
import math
import os

import pytest
import torch

from compress.core.errors import CompressError, ConfigError, DataError

# QLoRA (Dettmers et al. 2023, arXiv 2305.14314), Appendix E: the 16 values of the NF4 data type.
NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_code_book_equals_the_papers_values():
    import bitsandbytes.functional as bnbf

    from compress.layers.nf4 import nf4_code_book

    ours = nf4_code_book()
    assert ours.tolist() == pytest.approx(NF4_PAPER, abs=2e-7)
    assert torch.allclose(bnbf.get_4bit_type("nf4", device="cpu"), ours, atol=2e-7)  # the kernel uses the same table


def _linear(out_f, in_f, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.weight.data.normal_(0, 0.02)
    lin.weight.data[0, 5] = 0.3  # an outlier: its block's absmax
    return lin


def test_nf4_quantization_is_blockwise_absmax_to_nearest_code():
    """Sec. 3: per block of 64 consecutive weights along the input, w / absmax rounded to the nearest NF4 value."""
    from compress.layers.nf4 import nf4_code_book, nf4_dequantize, nf4_linear

    lin = _linear(8, 128)
    q = nf4_linear(lin, block_size=64, double_quant=False, compute_dtype=torch.float32)
    w = lin.weight.detach().reshape(-1, 64)
    absmax = w.abs().amax(dim=1, keepdim=True)
    code = nf4_code_book()
    idx = ((w / absmax).unsqueeze(-1) - code).abs().argmin(dim=-1)
    hand = (code[idx] * absmax).reshape(8, 128)
    got = nf4_dequantize(q, torch.float32)
    assert torch.allclose(got, hand, atol=1e-6)
    assert got[0, 5] == pytest.approx(0.3, rel=1e-6)  # the block maximum is represented exactly (code 1.0)


def test_double_quantization_round_trips_within_its_stated_error():
    """The block constants minus their mean, 8-bit in blocks of 256 (each block scaled by its absmax): each constant
    comes back as one of the two 8-bit code values that bracket it (bitsandbytes' rounding picks a neighbour, not
    always the nearest), so within one code step times its block's absmax; the NF4 codes are unchanged."""
    from compress.layers.nf4 import nf4_dequantize, nf4_linear

    lin = _linear(64, 1024, seed=1)  # 1,024 blocks of 64 -> 4 second-level blocks of 256
    single = nf4_linear(lin, block_size=64, double_quant=False, compute_dtype=torch.float32)
    double = nf4_linear(lin, block_size=64, double_quant=True, compute_dtype=torch.float32)
    st = double.weight.quant_state
    assert st.nested and st.absmax.dtype == torch.uint8 and st.state2.blocksize == 256
    c = single.weight.quant_state.absmax.float()  # exact float32 constants
    centred = c - st.offset
    import bitsandbytes.functional as bnbf

    restored = bnbf.dequantize_blockwise(st.absmax, st.state2).float() + st.offset
    code = st.state2.code.float().sort().values
    for b in range(0, c.numel(), 256):
        amax = st.state2.absmax[b // 256]
        assert amax == pytest.approx(centred[b:b + 256].abs().max().item(), rel=1e-6)
        x = (centred[b:b + 256] / amax).clamp(-1, 1)
        hi = torch.searchsorted(code, x).clamp(1, code.numel() - 1)
        step = code[hi] - code[hi - 1]
        err = (restored[b:b + 256] - c[b:b + 256]).abs()
        assert torch.all(err <= step * amax * (1 + 1e-5) + 1e-9)
    rel = ((restored - c).abs() / c).max().item()
    assert 0 < rel < 0.02  # it is lossy, but by a percent or so of each constant
    # the weights: NF4 codes are identical, only the constants moved
    assert torch.equal(double.weight.data, single.weight.data)
    w1, w2 = nf4_dequantize(single, torch.float32), nf4_dequantize(double, torch.float32)
    scale = (restored / c).repeat_interleave(64).reshape(64, 1024)
    assert torch.allclose(w2, w1 * scale, atol=1e-7)


def test_nf4_bits_per_weight_counts_codes_and_double_quantized_constants():
    from compress.evals.size import model_size
    from compress.layers.nf4 import nf4_storage_bits, quantize_model_nf4
    from compress.model.tiny import tiny_model

    lin = _linear(256, 1024)  # 262,144 weights, 4,096 blocks, 16 second-level blocks
    from compress.layers.nf4 import nf4_linear

    q = nf4_linear(lin, block_size=64, double_quant=True)
    n = 256 * 1024
    assert nf4_storage_bits(q) == 4 * n + 8 * (n // 64) + 32 * (n // 64 // 256) + 32
    assert nf4_storage_bits(q) / n == pytest.approx(4.127, abs=5e-4)  # the paper's 4 + 0.127
    plain = nf4_linear(lin, block_size=64, double_quant=False)
    assert nf4_storage_bits(plain) / n == pytest.approx(4.5)  # float32 constants: 32/64 = 0.5 bits

    model = tiny_model("llama", hidden=128, intermediate=256)
    names = quantize_model_nf4(model, block_size=64, progress=False)
    assert len(names) == 14 and model.is_loaded_in_4bit
    size = model_size(model)
    weights = 2 * (4 * 128 * 128 + 3 * 128 * 256)
    assert size["linear_weights"] == weights and size["params"] == sum(p.numel() for p in tiny_model("llama", hidden=128, intermediate=256).parameters())
    assert 4.127 < size["bits_per_weight"] < 4.14  # tiny layers: one second-level block each


def _ctx(tok, **kw):
    from compress.pipeline.recipe import RunContext
    from compress.sources.data import get_calibration

    cal = get_calibration("pydoc", tok, nsamples=4, seqlen=64)
    return RunContext(tokenizer=tok, calibration=cal, progress=False, model_dtype=torch.bfloat16, **kw)


QUICK = {"method": "qlora", "steps": 8, "train_samples": 16, "train_seqlen": 64, "train_batch_size": 4, "lr": 5e-3,
         "heldout": 4, "lora_r": 4}


def test_qlora_lowers_heldout_loss_adapter_reloads_and_checkpoint_reloads(tiny_tok, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from compress.formats import load_checkpoint, save_checkpoint
    from compress.layers.nf4 import is_nf4_linear, quantize_model_nf4
    from compress.model.tiny import tiny_model
    from compress.pipeline.recipe import Recipe
    from compress.train.trainer import heldout_loss

    base = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    recipe = Recipe.from_specs([{**QUICK, "adapter_dir": str(tmp_path / "adapter")}])
    model = recipe.run(copy.deepcopy(base), _ctx(tiny_tok))
    rep = recipe.report()["qlora"]
    assert rep["nf4_layers"] == 14 and rep["double_quant"] and rep["steps"] == 8
    assert rep["heldout_loss_after"] < rep["heldout_loss_before"]
    assert all(is_nf4_linear(m) for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))

    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids}
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    # peft's own reload of the adapter onto a freshly NF4-quantized base reproduces the loss
    fresh = copy.deepcopy(base)
    quantize_model_nf4(fresh, progress=False)
    again = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    assert heldout_loss(again, batch) == pytest.approx(heldout_loss(model, batch), rel=1e-6)

    # the run's checkpoint: bitsandbytes 4-bit base (plain transformers loads it) + adapter/; ours reloads both
    out = save_checkpoint(model, tiny_tok, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes" and cfg["compress_adapter"] == "adapter"
    assert cfg["quantization_config"]["llm_int8_skip_modules"] == ["lm_head"]
    loaded, _, info = load_checkpoint(out)
    assert info["format"] == "bitsandbytes-4bit"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)
    plain = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    assert is_nf4_linear(plain.model.layers[0].mlp.down_proj)


def test_qlora_merge_dense_and_nf4(tiny_tok):
    from compress.evals.size import model_size
    from compress.layers.nf4 import is_nf4_linear
    from compress.model.tiny import tiny_model
    from compress.pipeline.recipe import Recipe
    from compress.train.trainer import heldout_loss

    base = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    ids = {"input_ids": torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))}
    unmerged = Recipe.from_specs([QUICK]).run(copy.deepcopy(base), _ctx(tiny_tok))
    dense = Recipe.from_specs([{**QUICK, "merge": "dense"}]).run(copy.deepcopy(base), _ctx(tiny_tok))
    assert not any(is_nf4_linear(m) for m in dense.modules()) and type(dense).__name__ == "LlamaForCausalLM"
    assert model_size(dense)["bits_per_weight"] == 16.0
    assert heldout_loss(dense, ids) == pytest.approx(heldout_loss(unmerged, ids), rel=2e-2)  # bf16 rounding of W + BA
    nf4 = Recipe.from_specs([{**QUICK, "merge": "nf4"}]).run(copy.deepcopy(base), _ctx(tiny_tok))
    assert all(is_nf4_linear(m) for n, m in nf4.named_modules() if n.endswith("v_proj"))
    assert model_size(nf4)["bits_per_weight"] == pytest.approx(model_size(unmerged)["bits_per_weight"])


def test_instruction_data_masks_the_prompt(tiny_tok, tmp_path):
    from compress.train.finetune import ALPACA, encode_instructions, load_instructions

    path = tmp_path / "inst.jsonl"
    rows = [{"instruction": f"Repeat the word {w}.", "input": "" if i % 2 else "twice", "output": f"{w} {w}"}
            for i, w in enumerate(["cat", "dog", "sun", "sea", "sky", "owl", "elk", "ant"])]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recs = load_instructions(str(path))
    enc = encode_instructions(recs[:2], tiny_tok, 320)
    prompt0 = ALPACA["with_input"].format(**recs[0])
    n_prompt = len(tiny_tok(prompt0)["input_ids"])
    answer = tiny_tok("cat cat", add_special_tokens=False)["input_ids"] + [tiny_tok.eos_token_id]
    assert torch.all(enc["labels"][0, :n_prompt] == -100)
    assert enc["labels"][0, n_prompt:n_prompt + len(answer)].tolist() == answer
    assert torch.all(enc["labels"][0, n_prompt + len(answer):] == -100)
    assert int(enc["attention_mask"][0].sum()) == n_prompt + len(answer)

    from compress.model.tiny import tiny_model
    from compress.pipeline.recipe import Recipe

    recipe = Recipe.from_specs([{**QUICK, "instructions": str(path), "heldout": 2, "train_seqlen": 320, "steps": 4}])
    recipe.run(tiny_model("llama", dtype=torch.bfloat16), _ctx(tiny_tok))
    rep = recipe.report()["qlora"]
    assert rep["data"]["train_records"] == 6 and rep["data"]["heldout_records"] == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match="needs string fields 'instruction' and 'output'"):
        load_instructions(str(bad))
    with pytest.raises(DataError, match="no such file"):
        load_instructions(str(tmp_path / "missing.jsonl"))


def test_qlora_refuses_bad_input(tiny_tok, tmp_path):
    from compress.model.tiny import tiny_model
    from compress.pipeline.method import build_method
    from compress.pipeline.recipe import Recipe

    with pytest.raises(ConfigError, match="--nf4-block-size 48 is not allowed"):
        build_method("qlora", {"nf4_block_size": 48})
    with pytest.raises(ConfigError, match="--merge 'yes' is not allowed"):
        build_method("qlora", {"merge": "yes"})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(CompressError, match="already holds files"):
        build_method("qlora", {"adapter_dir": str(tmp_path / "full")})
    with pytest.raises(ConfigError, match="qlora needs float linear weights; the model holds quantized layers"):
        Recipe.from_specs([{"method": "rtn", "bits": 4, "group_size": 32}, QUICK]).run(tiny_model("llama"), _ctx(tiny_tok))


def test_cli_finetune_qlora_then_eval_same_perplexity(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from compress.cli import main
    from compress.runs.results import read_records

    out = tmp_path / "ckpt"
    common = ["--eval", "pydoc", "--eval-seqlen", "128", "--eval-windows", "2", "--no-progress"]
    res = CliRunner().invoke(main, ["finetune", "--method", "qlora", "--model", str(tiny_model_dir), "--steps", "3",
                                    "--train-samples", "8", "--train-seqlen", "64", "--heldout", "2", "--calib", "pydoc",
                                    "--nsamples", "2", "--seqlen", "64", "--output", str(out), *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "bits per weight incl. adapters" in res.output
    rec = read_records()[-1]
    assert rec["method"] == "qlora" and rec["family"] == "training-aware"
    assert 4.12 < rec["size"]["bits_per_weight"] < 4.2 and rec["size"]["adapter_params"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    ppl = rec["metrics"]["after"]["ppl_pydoc"]["value"]
    res = CliRunner().invoke(main, ["eval", "--model", str(out), *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    again = read_records()[-1]
    assert again["metrics"]["after"]["ppl_pydoc"]["value"] == pytest.approx(ppl, rel=1e-4)
    assert again["size"]["bits_per_weight"] == rec["size"]["bits_per_weight"]
    assert math.isfinite(ppl)
