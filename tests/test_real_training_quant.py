"""Real-model checks of training-aware quantization on SmolLM2-135M-Instruct (run with --real; tiny budgets).

3-bit asymmetric, group 128 (not 4-bit: the model's linears were GGUF Q4_1, so 4-bit group 32 is lossless on it).
QAT and PEQA start from the RTN grid, train a few steps of 2 x 128 WikiText-2 (validation) tokens, and must beat
that RTN model's WikiText-2 test perplexity (seqlen 512, 8 windows); the exported checkpoint must reload to the same
perplexity.
"""
import copy

import pytest

from compress.evals.perplexity import perplexity
from compress.pipeline.recipe import Recipe, RunContext

pytestmark = pytest.mark.real
EVAL = dict(seqlen=512, max_windows=8, progress=False)
GRID = dict(bits=3, group_size=128)
TRAIN = dict(train_batch_size=2, train_seqlen=128, train_samples=48, grad_clip=1.0)


@pytest.fixture(scope="module")
def ctx(real_loaded, data_dir):
    from compress.sources.data import get_calibration

    cal = get_calibration("wikitext2", real_loaded.tokenizer, nsamples=4, seqlen=128, seed=0)
    return RunContext(tokenizer=real_loaded.tokenizer, calibration=cal, progress=False)


@pytest.fixture(scope="module")
def rtn_ppl(real_loaded, ctx):
    model = Recipe.from_specs([{"method": "rtn", **GRID}]).run(copy.deepcopy(real_loaded.model), ctx)
    return perplexity(model, real_loaded.tokenizer, "wikitext2", **EVAL)["value"]


def _train(real_model, ctx, method, **opts):
    recipe = Recipe.from_specs([{"method": method, **GRID, **TRAIN, **opts}])
    return recipe.run(real_model, ctx), recipe.stages[0].report


def test_qat_3bit_beats_its_rtn_init_and_reloads(real_loaded, real_model, ctx, rtn_ppl, tmp_path):
    from compress.formats import load_checkpoint, save_checkpoint

    tok = real_loaded.tokenizer
    model, rep = _train(real_model, ctx, "qat", steps=20, lr=5e-5)
    ppl = perplexity(model, tok, "wikitext2", **EVAL)["value"]
    t = rep["training"]
    print(f"QAT w3 g128, {t['steps']} steps of 2x128 tokens: train loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}, "
          f"held-out {rep['heldout_loss_init']:.3f} -> {rep['heldout_loss_final']:.3f}; wikitext2@512x8 RTN {rtn_ppl:.2f} -> QAT {ppl:.2f}")
    assert rep["heldout_loss_final"] < rep["heldout_loss_init"]
    assert ppl < 0.9 * rtn_ppl
    out = save_checkpoint(model, tok, tmp_path / "qat")
    loaded, tok2, _ = load_checkpoint(out)
    assert perplexity(loaded, tok2, "wikitext2", **EVAL)["value"] == pytest.approx(ppl, rel=1e-4)


def test_peqa_3bit_trains_only_scales_and_beats_its_rtn_init(real_loaded, real_model, ctx, rtn_ppl):
    model, rep = _train(real_model, ctx, "peqa", steps=20, lr=1e-3)
    ppl = perplexity(model, real_loaded.tokenizer, "wikitext2", **EVAL)["value"]
    print(f"PEQA w3 g128, {rep['training']['trainable_params']} trainable scales: wikitext2@512x8 RTN {rtn_ppl:.2f} -> {ppl:.2f}")
    assert rep["trained_tensors"] == ["weight_scale"] and rep["training"]["trainable_params"] == rep["scales"]
    assert rep["scales"] == 30 * (576 * 5 * 2 + 192 * 5 * 2 + 1536 * 5 * 2 + 576 * 12)  # 5 groups of <=128 in 576, 12 in 1536
    assert ppl < rtn_ppl
