"""Real-model checks of the evaluation harness on SmolLM2-135M-Instruct (run with --real; small item counts).

lm-eval accuracy from the local data kit, in memory and through `compress eval` (on the offline model and on a
compressed checkpoint): the same model scores the same twice, and 2-bit RTN (group 128) scores no better than the
original. (The model's linears were GGUF Q4_1, so 4-bit asymmetric group 32 would be lossless by construction; 2-bit
g128 is far from that.)
"""
import pytest
from click.testing import CliRunner

from compress.cli import main
from compress.evals.lm_eval_tasks import evaluate_tasks
from compress.formats import save_checkpoint
from compress.pipeline.recipe import Recipe, RunContext
from compress.runs.results import read_records

pytestmark = pytest.mark.real
TASKS = "piqa,arc_easy,hellaswag"
LIMIT = 30


def _values(metrics):
    return {k: round(v["value"], 6) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def fp_scores(real_loaded):
    return evaluate_tasks(real_loaded.model, real_loaded.tokenizer, TASKS.split(","), limit=LIMIT)


def test_accuracy_from_local_data_repeatable_and_2bit_not_better(real_loaded, real_model, fp_scores, tmp_path, monkeypatch):
    fp = _values(fp_scores)
    print("SmolLM2-135M bf16, limit", LIMIT, fp)
    assert set(fp) == {"piqa_acc", "piqa_acc_norm", "arc_easy_acc", "arc_easy_acc_norm", "hellaswag_acc", "hellaswag_acc_norm"}
    assert fp["piqa_acc"] > 0.55 and fp["arc_easy_acc"] > 0.35  # clearly above chance (0.5 and 0.25)
    monkeypatch.chdir(tmp_path)
    common = ["--eval", "none", "--tasks", TASKS, "--limit", str(LIMIT), "--no-progress"]
    res = CliRunner().invoke(main, ["eval", "--model", "smollm2", *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    again = read_records()[-1]["metrics"]["after"]
    assert _values(again) == fp  # the same model, the same accuracy (through the CLI, freshly loaded)
    assert {v["protocol_key"] for v in again.values()} == {v["protocol_key"] for v in fp_scores.values()}
    q = Recipe.from_specs([{"method": "rtn", "bits": 2, "group_size": 128}]).run(real_model, RunContext(progress=False))
    ckpt = save_checkpoint(q, real_loaded.tokenizer, tmp_path / "rtn2")
    res = CliRunner().invoke(main, ["eval", "--model", str(ckpt), *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    low = _values(read_records()[-1]["metrics"]["after"])
    print("RTN w2 g128 checkpoint, limit", LIMIT, low)
    for task in ("piqa", "arc_easy", "hellaswag"):
        assert low[f"{task}_acc"] <= fp[f"{task}_acc"] and low[f"{task}_acc_norm"] <= fp[f"{task}_acc_norm"], task


def test_other_local_tasks_run(real_loaded):
    out = _values(evaluate_tasks(real_loaded.model, real_loaded.tokenizer,
                                 ["arc_challenge", "winogrande", "boolq", "lambada_openai"], limit=20))
    print("SmolLM2-135M bf16, limit 20", out)
    for k, v in out.items():
        assert (0.0 <= v <= 1.0) if not k.endswith("_ppl") else (1.0 < v < 1e4), (k, v)
    assert {"arc_challenge_acc", "winogrande_acc", "boolq_acc", "lambada_openai_acc", "lambada_openai_ppl"} <= set(out)
