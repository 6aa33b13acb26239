"""GPTQ and OWQ on the real SmolLM2-135M-Instruct (run with --real; small calibration and capped perplexity).

Protocol: calibration 16 x 256 tokens of the data kit's WikiText-2 validation text (seed 0); perplexity on WikiText-2
raw test, 8 windows of 512 tokens; bfloat16. About 4-bit: the model's linears were GGUF Q4_1 (asymmetric 4-bit,
groups of 32), so 4-bit asymmetric group 32 would be lossless by construction; these checks use group 128 (which
leaves a last group of 64 of the 576-wide inputs) and 3 bits.
"""
import copy

import pytest

from compress.evals.perplexity import perplexity
from compress.evals.size import model_size
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import get_calibration

pytestmark = pytest.mark.real
EVAL = dict(seqlen=512, max_windows=8, progress=False)
RESULTS: dict[str, tuple[float, float]] = {}


@pytest.fixture(scope="module")
def calib(real_loaded, data_dir):
    return get_calibration("wikitext2", real_loaded.tokenizer, nsamples=16, seqlen=256, seed=0)


def _quantized_ppl(real_loaded, calib, key, **stage):
    if key not in RESULTS:
        model = Recipe.from_specs([stage]).run(copy.deepcopy(real_loaded.model), RunContext(calibration=calib, progress=False))
        RESULTS[key] = (perplexity(model, real_loaded.tokenizer, "wikitext2", **EVAL)["value"],
                        model_size(model)["bits_per_weight"])
    return RESULTS[key]


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_at_g128(real_loaded, calib, bits):
    rtn, _ = _quantized_ppl(real_loaded, calib, f"rtn{bits}", method="rtn", bits=bits, group_size=128)
    gptq, bpw = _quantized_ppl(real_loaded, calib, f"gptq{bits}", method="gptq", bits=bits, group_size=128)
    print(f"w{bits} g128 wikitext2@512x8: RTN {rtn:.3f}  GPTQ {gptq:.3f} ({bpw} bits/weight)")
    assert gptq < rtn


def test_owq_3bit_not_worse_than_gptq_3bit(real_loaded, calib):
    gptq, gptq_bpw = _quantized_ppl(real_loaded, calib, "gptq3", method="gptq", bits=3, group_size=128)
    owq, owq_bpw = _quantized_ppl(real_loaded, calib, "owq3", method="owq", bits=3, group_size=128, target_bits=3.01)
    print(f"w3 g128 wikitext2@512x8: GPTQ {gptq:.3f} ({gptq_bpw} bits/weight)  OWQ 3.01 {owq:.3f} ({owq_bpw} bits/weight)")
    assert gptq_bpw < owq_bpw <= gptq_bpw + 0.01 + 1e-9  # the weak columns cost at most the 0.01 bits asked for
    assert owq <= gptq
