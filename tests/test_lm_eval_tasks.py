"""lm-eval integration: the shipped offline task definitions match the data kit, a task whose data is absent is one
clear error naming the folder, and a tiny model is scored through `compress eval --tasks` with a full protocol."""

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import main
from compress.core.errors import DataError
from compress.evals import lm_eval_tasks as lt
from compress.runs.results import read_records

PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "lambada_openai")


def test_every_paper_task_is_shipped_and_its_files_are_in_the_kit(data_dir):
    shipped = lt.offline_tasks()
    assert set(PAPER_TASKS) <= set(shipped)
    for name in PAPER_TASKS:
        files = lt.required_files(shipped[name])
        assert files, name
        assert all((data_dir / f).is_file() for f in files), (name, files)
        assert lt.missing_data(name, data_dir) is None


def test_resolved_yamls_hold_the_absolute_data_dir(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    folder = lt.materialize(["piqa", "hellaswag"], data_dir)
    assert (folder / "taskfns.py").is_file()
    for name in ("piqa", "hellaswag"):
        text = (folder / f"{name}.yaml").read_text()
        assert lt.PLACEHOLDER not in text and str(data_dir.resolve()) in text
    assert lt.materialize(["piqa", "hellaswag"], data_dir) == folder  # content-addressed: written once
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


def test_absent_data_is_one_clear_error_naming_the_folder(tmp_path):
    (tmp_path / "arc").mkdir()  # arc folder present, but without arc_challenge.jsonl; no piqa folder at all
    (tmp_path / "arc" / "arc_easy.jsonl").write_text("{}\n")
    with pytest.raises(DataError) as e:
        lt.split_tasks(["piqa"], tmp_path, hub=False)
    msg = str(e.value)
    assert str(tmp_path / "piqa") in msg and "missing" in msg and "hub is not reachable" in msg
    assert lt.split_tasks(["arc_easy"], tmp_path, hub=False) == (["arc_easy"], [])
    with pytest.raises(DataError, match=str(tmp_path / "arc") + ".*arc_challenge.jsonl"):
        lt.split_tasks(["arc_challenge"], tmp_path, hub=False)
    with pytest.raises(DataError, match="no offline definition"):
        lt.split_tasks(["mmlu"], tmp_path, hub=False)
    assert lt.split_tasks(["piqa", "mmlu"], tmp_path, hub=True) == ([], ["piqa", "mmlu"])  # online: lm-eval's own


def test_cli_missing_task_data_one_line_nothing_written(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty-kit"
    empty.mkdir()
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_model_dir), "--data-dir", str(empty), "--eval", "none",
                                    "--tasks", "piqa", "--limit", "3", "--no-progress"])
    assert res.exit_code == 2, res.output
    last = [ln for ln in res.output.splitlines() if ln.strip()][-1]
    assert last.startswith("error: task 'piqa'") and str(empty / "piqa") in last
    assert not read_records()


def test_cli_eval_tasks_on_tiny_model_records_protocol_and_repeats(tiny_model_dir, tmp_path):
    args = ["eval", "--model", str(tiny_model_dir), "--eval", "none", "--tasks", "winogrande,boolq", "--limit", "6",
            "--no-progress"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    first, second = (r["metrics"]["after"] for r in read_records())
    assert set(first) == {"winogrande_acc", "boolq_acc"}
    for key, rec in first.items():
        assert 0.0 <= rec["value"] <= 1.0 and rec["higher_is_better"] is True
        assert second[key]["value"] == rec["value"] and second[key]["protocol_key"] == rec["protocol_key"]
        p = rec["protocol"]
        assert p["lm_eval"] == "0.4.13" and p["task_version"] is not None and p["backend"].startswith("lm-eval HFLM")
        assert p["dtype"] == "bfloat16" and p["batch_size"] >= 1 and p["limit"] == 6 and p["items"] == 6
        assert p["num_fewshot"] == 0 and p["task_definition"].startswith("compress offline")
    assert first["boolq_acc"]["protocol"]["items_total"] == 3270
    assert first["winogrande_acc"]["protocol"]["data"] == "winogrande/winogrande.jsonl"


def test_shipped_yamls_are_lm_eval_task_configs():
    for name, path in lt.offline_tasks().items():
        text = path.read_text().replace("!function", "")
        doc = yaml.safe_load(text)
        assert doc["task"] == name and doc["metric_list"] and "version" in doc["metadata"]
