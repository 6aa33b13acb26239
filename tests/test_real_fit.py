"""`compress fit` on the real SmolLM2-135M-Instruct (run with --real; small counts).

Protocol: calibration 8 x 256 tokens of the data kit's C4 train sample (seed 0), for the sensitivities and the plan
alike; perplexity on WikiText-2 raw test, 4 windows of 512 tokens; bfloat16. Candidates RTN w3/w4 g64 asymmetric (4-bit asymmetric g32 is lossless on this model, whose linears were GGUF Q4_1, so it is not offered).
The fitted plan at 3.5 bits per weight (as stored) must beat uniform RTN w3 g64 (3.30 bits, the largest uniform RTN
setting within the budget) and the log-linear interpolation between it and RTN w4 g128 (4.16 bits). The full
acceptance table (GPTQ and RTN, 2048-token windows) is bench/fit_frontier.py's, in docs/benchmarks.md.
"""
import copy
import math

import pytest

from compress.evals.perplexity import perplexity
from compress.evals.size import model_size
from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import get_calibration

pytestmark = pytest.mark.real
EVAL = dict(seqlen=512, max_windows=4, progress=False)


def _uniform(real_loaded, bits, gs):
    model = Recipe.from_specs([{"method": "rtn", "bits": bits, "group_size": gs}]).run(
        copy.deepcopy(real_loaded.model), RunContext(progress=False))
    return model_size(model)["bits_per_weight"], perplexity(model, real_loaded.tokenizer, "wikitext2", **EVAL)["value"]


def test_fit_beats_the_uniform_rtn_frontier_at_3_5_bits(real_loaded, data_dir, tmp_path):
    from compress.runs.fit import fit
    from compress.runs.spec import RunSpec

    spec = RunSpec.build(dict(max_bits=3.5, fit_methods=["rtn"], fit_bits=["3", "4"], fit_group_sizes=["64"], calib="c4", nsamples=8,
                              seqlen=256, eval=["wikitext2"], eval_seqlen=512, eval_windows=4, baseline=False,
                              results_dir=str(tmp_path / "results"), output=str(tmp_path / "fit"), progress=False,
                              data_dir=str(data_dir)), kind="fit")
    (rec,) = fit(spec)
    bpw, ppl = rec["size"]["bits_per_weight"], rec["metrics"]["after"]["ppl_wikitext2"]["value"]
    assert rec["fit"]["meets_budget"] and bpw <= 3.5
    assert rec["fit"]["predicted"]["checkpoint_bytes"] == rec["size"]["checkpoint_bytes"]
    lo_b, lo = _uniform(real_loaded, 3, 64)
    hi_b, hi = _uniform(real_loaded, 4, 128)
    t = (bpw - lo_b) / (hi_b - lo_b)
    interp = math.exp((1 - t) * math.log(lo) + t * math.log(hi))
    print(f"wikitext2@512x4, calibration c4 8x256: fit {bpw:.4f} bpw {ppl:.3f}; RTN w3 g64 {lo_b} bpw {lo:.3f}; "
          f"RTN w4 g128 {hi_b} bpw {hi:.3f}; interpolation {interp:.3f}; plan {rec['fit']['plan_counts']}")
    assert lo_b <= bpw < hi_b
    assert ppl < lo and ppl < interp
