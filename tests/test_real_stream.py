"""Real-model check of --stream on SmolLM2-135M-Instruct (run with --real; small samples): RTN W4 g64 (4-bit
asymmetric g32 would be lossless on this model, GGUF Q4_1, so g64) streamed block by block from the model's
safetensors folder writes the in-memory run's checkpoint bit for bit, and its streamed perplexity (WikiText-2 raw
test, 2 windows of 512 tokens, bfloat16) equals perplexity() of the reloaded checkpoint."""
import pytest
import torch

from compress.pipeline.recipe import Recipe, RunContext

pytestmark = pytest.mark.real


def test_streamed_rtn_equals_in_memory_on_smollm2(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.evals.perplexity import perplexity, streamed_perplexity
    from compress.formats import load_checkpoint, save_checkpoint
    from compress.formats.base import read_safetensors
    from compress.pipeline.stream import stream_compress
    from compress.sources.models import float_folder

    _, folder = float_folder("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    spec = [{"method": "rtn", "bits": 4, "group_size": 64}]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    model.config.use_cache = False
    model = Recipe.from_specs(spec).run(model, RunContext(progress=False))
    mem = save_checkpoint(model, tok, tmp_path / "mem")
    recipe = Recipe.from_specs(spec)
    out = tmp_path / "streamed"
    stream_compress(folder, recipe.stages, RunContext(progress=False), out, tok, stage_specs=recipe.specs(),
                    dtype=torch.bfloat16)
    a, b = read_safetensors(mem), read_safetensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    kw = dict(seqlen=512, max_windows=2, data_dir=str(data_dir), progress=False)
    ref = perplexity(load_checkpoint(out)[0], tok, "wikitext2", **kw)
    got = streamed_perplexity(out, tok, "wikitext2", **kw)
    assert got["protocol_key"] == ref["protocol_key"]
    assert got["value"] == pytest.approx(ref["value"], rel=1e-4), (got["value"], ref["value"])
