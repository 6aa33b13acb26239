"""rotate and AutoRound on the real SmolLM2-135M-Instruct (run with --real; tiny counts).

Protocol: calibration 8 x 256 tokens of the data kit's C4 train sample (seed 0); perplexity on WikiText-2 raw test,
4 windows of 512 tokens; bfloat16; grid w3 g64 asymmetric (4-bit asymmetric g32 would be lossless on this model, whose
linears were GGUF Q4_1). The seqlen-2048 table (W4/W3/W2) is bench/rotation_table.py, in docs/benchmarks.md.
"""
import copy

import pytest
import torch

from compress.evals.perplexity import perplexity
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import get_calibration

pytestmark = pytest.mark.real
EVAL = dict(seqlen=512, max_windows=4, progress=False)
GRID = dict(bits=3, group_size=64)
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def calib(real_loaded, data_dir):
    return get_calibration("c4", real_loaded.tokenizer, nsamples=8, seqlen=256, seed=0)


def _run(real_loaded, calib, *stages):
    return Recipe.from_specs([s if s["method"] == "rotate" else {**s, **GRID} for s in stages]).run(
        copy.deepcopy(real_loaded.model), RunContext(calibration=calib, progress=False))


def _ppl(real_loaded, calib, key, *stages):
    if key not in RESULTS:
        RESULTS[key] = perplexity(_run(real_loaded, calib, *stages), real_loaded.tokenizer, "wikitext2", **EVAL)["value"]
    return RESULTS[key]


def test_rotated_float_model_same_logits(real_loaded):
    model = copy.deepcopy(real_loaded.model).float()
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        rot = Recipe.from_specs([{"method": "rotate"}]).run(model, RunContext(progress=False))
        out = rot(ids).logits
    err = (out - ref).abs().max().item()
    print(f"float32 SmolLM2, 48 random tokens: max |logit difference| after rotate {err:.2e} (max |logit| {ref.abs().max():.1f})")
    assert err < 1e-3


def test_rotate_then_gptq_beats_gptq(real_loaded, calib):
    gptq = _ppl(real_loaded, calib, "gptq", {"method": "gptq"})
    rot = _ppl(real_loaded, calib, "rotate+gptq", {"method": "rotate"}, {"method": "gptq"})
    print(f"w3 g64 wikitext2@512x4, calibration c4 8x256: GPTQ {gptq:.3f}  rotate+GPTQ {rot:.3f}")
    assert rot < gptq


def test_autoround_beats_rtn_and_gptq(real_loaded, calib):
    # 20 SignSGD steps (lr 1/20): 2026-12-03, 1 thread, RTN 105.758, AutoRound 59.274 (GPTQ on this protocol: 85.919).
    # 2026-12-04, one shuffle per pass for the mini-batches, 1 thread, an Intel CPU with AMX (another machine: its bf16
    # GEMM rounds differently): RTN 105.850, GPTQ 94.738, AutoRound 60.830.
    # 10 steps (lr 0.1) had given 123.991 on this protocol, worse than RTN (not diagnosed further).
    rtn = _ppl(real_loaded, calib, "rtn", {"method": "rtn"})
    gptq = _ppl(real_loaded, calib, "gptq", {"method": "gptq"})
    ar = _ppl(real_loaded, calib, "autoround", {"method": "autoround", "iters": 20, "minibatch": 4})
    print(f"w3 g64 wikitext2@512x4, calibration c4 8x256: RTN {rtn:.3f}  GPTQ {gptq:.3f}  "
          f"AutoRound (20 steps, batch 4) {ar:.3f}")
    assert ar < rtn
    assert ar < gptq


def test_rotated_quantized_checkpoint_reloads_to_same_perplexity(real_loaded, calib, tmp_path):
    from compress.formats.native import load_checkpoint, save_checkpoint

    model = _run(real_loaded, calib, {"method": "rotate"}, {"method": "rtn"})
    before = perplexity(model, real_loaded.tokenizer, "wikitext2", **EVAL)["value"]
    save_checkpoint(model, real_loaded.tokenizer, tmp_path / "ck")
    back, _, _ = load_checkpoint(tmp_path / "ck")
    after = perplexity(back, real_loaded.tokenizer, "wikitext2", **EVAL)["value"]
    print(f"rotate+RTN w3 g64 wikitext2@512x4: in memory {before:.4f}, reloaded {after:.4f}")
    assert after == pytest.approx(before, rel=1e-4)
