"""--quantize-embeddings: the token embedding as integer codes, the tied LM head reading the same codes (stored
once), the checkpoint round trip, and the run option."""
from __future__ import annotations

import pytest
import torch

from compress.core.errors import ConfigError
from compress.formats.native import load_checkpoint, save_checkpoint
from compress.kernels.quant_grid import rtn_quantize
from compress.layers.quant_embedding import EMBEDDING_GRIDS, QuantEmbedding, TiedQuantHead, quantize_embeddings


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_head_reads_the_embedding_codes(tiny_llama, bits):
    from compress.layers.weights import count_parameters

    params = count_parameters(tiny_llama)
    w = tiny_llama.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, w.shape[0], (2, 9))
    report = quantize_embeddings(tiny_llama, bits)
    assert report["tied_head"] and report["bits"] == bits
    assert count_parameters(tiny_llama) == params  # logical parameters unchanged, the tied table counted once
    emb, head = tiny_llama.get_input_embeddings(), tiny_llama.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, TiedQuantHead)
    w_hat = rtn_quantize(w, EMBEDDING_GRIDS[bits]).dequantize()
    torch.testing.assert_close(emb(ids), w_hat[ids])  # row lookup = the de-quantized table
    h = torch.randn(3, w.shape[1])
    torch.testing.assert_close(head(h), h @ w_hat.t(), rtol=1e-4, atol=1e-4)
    assert not list(head.state_dict())  # the head stores nothing: the codes live once, under the embedding
    err = (w_hat - w).abs().max() / w.abs().max()
    assert 0 < err < (0.02 if bits == 8 else 0.2)


def test_checkpoint_round_trip_and_smaller(tiny_llama, tiny_tok, tmp_path):
    dense = save_checkpoint(tiny_llama, tiny_tok, tmp_path / "dense")
    quantize_embeddings(tiny_llama, 8)
    ids = torch.randint(0, 250, (1, 12))
    with torch.no_grad():
        want = tiny_llama(input_ids=ids).logits
    out = save_checkpoint(tiny_llama, tiny_tok, tmp_path / "q")
    model, _, _ = load_checkpoint(out)
    assert isinstance(model.get_output_embeddings(), TiedQuantHead)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want)
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    emb_bytes = tiny_llama.config.vocab_size * tiny_llama.config.hidden_size * 4  # float32 table
    assert size(dense) - size(out) > 0.7 * emb_bytes  # the table went from 4 bytes to ~1 byte a value, stored once


def test_bad_bits_refused(tiny_llama):
    with pytest.raises(ConfigError, match="--quantize-embeddings 3"):
        quantize_embeddings(tiny_llama, 3)


def test_run_option(tiny_model_dir, tmp_path):
    from compress.runs.runner import execute
    from compress.runs.spec import RunSpec

    spec = RunSpec.build({"model": str(tiny_model_dir), "quantize_embeddings": 4, "eval": "none", "baseline": False,
                          "output": str(tmp_path / "ck"), "progress": False},
                         kind="quantize", stages=[{"method": "rtn", "bits": 4, "group_size": 32}])
    rec = execute(spec, store=False)
    assert "embeddings w4 g32" in rec["setting"]
    assert rec["details"]["quantize_embeddings"]["tied_head"]
    model, _, info = load_checkpoint(tmp_path / "ck")
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    with pytest.raises(ConfigError, match="--quantize-embeddings '2'"):
        execute(RunSpec.build({"model": str(tiny_model_dir), "quantize_embeddings": "2"}, kind="quantize",
                              stages=[{"method": "rtn"}]), store=False)
