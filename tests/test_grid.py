"""Experiment grids: expansion and keys, resume after a real kill, failed cells recorded, the Ray executor."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import main
from compress.core.errors import ConfigError
from compress.runs.grid import load_grid
from compress.runs.results import read_records

REPO = Path(__file__).resolve().parent.parent
QUICK_EVAL = {"eval": ["pydoc"], "eval_seqlen": 128, "eval_windows": 2}
QUICK_CALIB = {"calib": "pydoc", "nsamples": 4, "seqlen": 64}


def _grid(tmp_path, models, methods, name="g", **extra):
    doc = {"name": name, "models": [str(m) for m in models], "methods": methods, "calibration": [QUICK_CALIB],
           "evaluation": QUICK_EVAL, "run": {"save": False, "baseline": False}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


SIX = [{"method": "rtn", "bits": [2, 3, 4, 8], "group_size": 32}, {"method": "gptq", "bits": [4, 8], "group_size": 32}]


def test_expansion_keys_and_validation(tmp_path, tiny_model_dir):
    path = _grid(tmp_path, [tiny_model_dir], SIX, calibration=[QUICK_CALIB, {**QUICK_CALIB, "nsamples": 8}])
    grid = load_grid(path)
    # rtn needs no calibration: its 4 cells do not multiply by the 2 calibration settings; gptq's 2 do
    assert len(grid.cells) == 4 + 2 * 2
    assert len({c.key for c in grid.cells}) == len(grid.cells)
    assert [c.key for c in load_grid(path).cells] == [c.key for c in grid.cells]  # stable
    spec = grid.cells[0].spec(None, None)
    assert spec.tag == grid.cells[0].key and spec.stages == [{"method": "rtn", "bits": 2, "group_size": 32}]
    assert spec.kind == "quantize" and spec.eval == ["pydoc"] and spec.eval_windows == 2 and not spec.save
    only_eval = load_grid(_grid(tmp_path, [tiny_model_dir], [{"method": "none"}], name="fp")).cells
    assert len(only_eval) == 1 and only_eval[0].spec(None, None).kind == "eval"
    bad = _grid(tmp_path, [tiny_model_dir], [{"method": "rtn", "bits": [4, 9]}], name="bad")
    with pytest.raises(ConfigError, match="--bits 9 is out of range"):
        load_grid(bad)
    with pytest.raises(ConfigError, match="unknown key 'nsample'"):
        load_grid(_grid(tmp_path, [tiny_model_dir], SIX, name="bad2", calibration=[{"nsample": 3}]))


def test_grid_killed_midway_resumes_only_missing_cells(tmp_path, tiny_model_dir):
    path = _grid(tmp_path, [tiny_model_dir], SIX)
    results = tmp_path / "store"
    keys = {c.key for c in load_grid(path).cells}
    assert len(keys) == 6
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "-q", "grid", "run", str(path), "--results-dir",
                             str(results)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len([r for r in read_records(results) if r.get("status") == "ok"]) >= 2:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # a hard kill: no handler, no cleanup
        proc.wait()
    first = {r["tag"]: r["run_id"] for r in read_records(results)}
    assert 2 <= len(first) < 6, proc.stderr.read().decode()[-2000:]
    res = CliRunner().invoke(main, ["grid", "status", str(path), "--results-dir", str(results)])
    assert f"{len(first)} done, 0 failed, {6 - len(first)} pending" in res.output
    res = CliRunner().invoke(main, ["grid", "run", str(path), "--results-dir", str(results)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"{len(first)} already done, ran {6 - len(first)}: {6 - len(first)} ok, 0 failed" in res.output
    recs = read_records(results)
    assert sorted(r["tag"] for r in recs) == sorted(keys)  # every cell once: none lost, none run twice
    assert all(first[r["tag"]] == r["run_id"] for r in recs if r["tag"] in first)
    assert {r["executor"] for r in recs} == {"in-process"} and all(r["status"] == "ok" for r in recs)
    res = CliRunner().invoke(main, ["grid", "run", str(path), "--results-dir", str(results)], catch_exceptions=False)
    assert "6 already done, ran 0" in res.output and len(read_records(results)) == 6


def test_failed_cell_is_recorded_and_the_grid_goes_on(tmp_path, tiny_model_dir):
    path = _grid(tmp_path, [tmp_path / "no-such-model", tiny_model_dir], [{"method": "rtn", "bits": 8, "group_size": 32}])
    res = CliRunner().invoke(main, ["grid", "run", str(path)], catch_exceptions=False)
    assert res.exit_code == 1 and "1 ok, 1 failed" in res.output
    failed = [r for r in read_records() if r["status"] == "failed"]
    assert len(failed) == 1 and "does not exist" in failed[0]["error"] and failed[0]["tag"]
    res = CliRunner().invoke(main, ["grid", "status", str(path)])
    assert "1 done, 1 failed, 0 pending" in res.output and "FAILED" in res.output


def test_ray_executor_runs_the_grid_locally(tmp_path, tiny_model_dir):
    pytest.importorskip("ray")
    path = _grid(tmp_path, [tiny_model_dir], SIX)
    res = CliRunner().invoke(main, ["grid", "run", str(path), "--executor", "ray", "--num-cpus", "2"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    recs = read_records()
    assert len(recs) == 6 and all(r["status"] == "ok" and r["executor"] == "ray" for r in recs)
    assert {r["tag"] for r in recs} == {c.key for c in load_grid(path).cells}
    assert all("ppl_pydoc" in r["metrics"]["after"] for r in recs)
    res = CliRunner().invoke(main, ["grid", "run", str(path), "--executor", "ray", "--num-cpus", "2"])
    assert "6 already done, ran 0" in res.output  # nothing resubmitted
