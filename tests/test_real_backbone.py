"""Real-model checks of the backbone on SmolLM2-135M-Instruct (run with --real; small sample counts).

Note on 4-bit: the model's linears were GGUF Q4_1 (asymmetric 4-bit, groups of 32), so 4-bit asymmetric group 32
would be lossless by construction; these checks use group 128 and per-channel grids.
"""
import copy

import pytest

from compress.evals.perplexity import perplexity
from compress.formats import load_checkpoint, save_checkpoint
from compress.pipeline.recipe import Recipe, RunContext

pytestmark = pytest.mark.real
EVAL = dict(seqlen=512, max_windows=12, progress=False)


@pytest.fixture(scope="module")
def fp_ppl(real_loaded, data_dir):
    return perplexity(real_loaded.model, real_loaded.tokenizer, "wikitext2", **EVAL)["value"]


def _rtn(model, bits, group_size=128):
    return Recipe.from_specs([{"method": "rtn", "bits": bits, "group_size": group_size}]).run(model, RunContext(progress=False))


def test_rtn_bits_order_and_8bit_close(real_loaded, real_model, fp_ppl):
    tok = real_loaded.tokenizer
    ppl = {}
    for bits in (8, 4, 3):
        m = _rtn(copy.deepcopy(real_model), bits)
        ppl[bits] = perplexity(m, tok, "wikitext2", **EVAL)["value"]
    print(f"RTN g128 wikitext2@512x12: fp {fp_ppl:.3f}  8-bit {ppl[8]:.3f}  4-bit {ppl[4]:.3f}  3-bit {ppl[3]:.3f}")
    assert abs(ppl[8] - fp_ppl) / fp_ppl < 0.01
    assert fp_ppl < ppl[4] < ppl[3]
    assert ppl[4] < 3 * fp_ppl  # sane


def test_checkpoint_reloads_to_same_perplexity(real_loaded, real_model, tmp_path):
    tok = real_loaded.tokenizer
    bf16_bytes = sum(p.numel() * 2 for p in real_model.parameters())  # before RTN swaps the linears for packed ones
    m = _rtn(real_model, 4)
    ppl = perplexity(m, tok, "wikitext2", **EVAL)["value"]
    out = save_checkpoint(m, tok, tmp_path / "rtn4")
    loaded, tok2, _ = load_checkpoint(out)
    again = perplexity(loaded, tok2, "wikitext2", **EVAL)["value"]
    assert again == pytest.approx(ppl, rel=1e-4)
    disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert disk < 0.5 * bf16_bytes  # really smaller than bf16 (the 4-bit linears; embeddings stay bf16)


def test_cli_main_job(real_loaded, tmp_path, monkeypatch):
    """The README's main job, with a capped evaluation: FP and quantized perplexity, size, checkpoint, record,
    and `compress eval` on the checkpoint gives the same number."""
    from click.testing import CliRunner

    from compress.cli import main
    from compress.runs.results import read_records

    monkeypatch.chdir(tmp_path)
    common = ["--eval-seqlen", "512", "--eval-windows", "8", "--no-progress"]
    res = CliRunner().invoke(main, ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "128", *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    before, after = rec["metrics"]["before"]["ppl_wikitext2"]["value"], rec["metrics"]["after"]["ppl_wikitext2"]["value"]
    assert before < after < 2 * before
    assert 4.1 < rec["size"]["bits_per_weight"] < 4.3
    ckpt = rec["checkpoint"]
    assert (tmp_path / ckpt / "model.safetensors").is_file()
    res = CliRunner().invoke(main, ["eval", "--model", ckpt, *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert read_records()[-1]["metrics"]["after"]["ppl_wikitext2"]["value"] == pytest.approx(after, rel=1e-4)
