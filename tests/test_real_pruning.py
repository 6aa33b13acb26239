"""Real-model pruning checks on SmolLM2-135M-Instruct (run with --real; small calibration and capped evaluation).

Calibration 16 x 512 tokens of WikiText-2 validation; perplexity on WikiText-2 raw test, 8 windows of 512 tokens.
"""
import copy

import pytest

from compress.evals.perplexity import perplexity
from compress.pipeline.recipe import Recipe, RunContext

pytestmark = pytest.mark.real
EVAL = dict(seqlen=512, max_windows=8, progress=False)


@pytest.fixture(scope="module")
def calib(real_loaded, data_dir):
    from compress.sources.data import get_calibration

    return get_calibration("wikitext2", real_loaded.tokenizer, nsamples=16, seqlen=512, seed=0, data_dir=str(data_dir))


@pytest.fixture(scope="module")
def pruned_50(real_loaded, calib):
    """Perplexity of the dense model and of magnitude, Wanda and SparseGPT at 50% unstructured; the Wanda model."""
    tok = real_loaded.tokenizer
    ppl = {"dense": perplexity(real_loaded.model, tok, "wikitext2", **EVAL)["value"]}
    models = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = Recipe.from_specs([{"method": method, "sparsity": 0.5}]).run(
            copy.deepcopy(real_loaded.model), RunContext(calibration=calib, progress=False))
        ppl[method] = perplexity(model, tok, "wikitext2", **EVAL)["value"]
        if method == "wanda":
            models[method] = model
    print("50% unstructured, wikitext2 512x8, calib 16x512: " + "  ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    return ppl, models


def test_orderings_at_50_percent(pruned_50):
    ppl, _ = pruned_50
    assert ppl["wanda"] < ppl["magnitude"]
    assert ppl["sparsegpt"] < ppl["magnitude"]
    assert ppl["dense"] < min(ppl["wanda"], ppl["sparsegpt"])


def test_sparse_checkpoint_real(pruned_50, real_loaded, tmp_path):
    """The Wanda-50% checkpoint: about 9 bits per weight on disk for the block linears, same perplexity on reload."""
    from compress.evals.size import checkpoint_bytes, model_size
    from compress.formats import load_checkpoint, save_checkpoint
    from compress.formats.exporters import export

    ppl, models = pruned_50
    model, tok = models["wanda"], real_loaded.tokenizer
    assert model_size(model)["bits_per_weight"] == pytest.approx(9.0, abs=0.01)
    out = save_checkpoint(model, tok, tmp_path / "wanda50")
    dense = export("dense", model, tok, tmp_path / "wanda50")
    linears = model_size(model)["linear_weights"]
    saved = checkpoint_bytes(dense) - checkpoint_bytes(out)
    assert saved == pytest.approx(linears * (16 - 9) / 8, rel=0.01)  # 7 of every 16 bits of the block linears
    loaded, tok2, _ = load_checkpoint(out)
    assert perplexity(loaded, tok2, "wikitext2", **EVAL)["value"] == pytest.approx(ppl["wanda"], rel=1e-4)
