"""The command line, end to end on a tiny model folder, and every bad input as one clear line, nothing written."""
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from compress.cli import main
from compress.runs.results import read_records

QUICK = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "64", "--eval", "pydoc", "--eval-seqlen", "128",
         "--eval-windows", "4", "--no-progress"]


def _run(args, cwd):
    runner = CliRunner()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(old)


def test_methods_lists_rtn(tmp_path):
    res = _run(["methods"], tmp_path)
    assert res.exit_code == 0
    assert "rtn" in res.output and "quantization" in res.output and "Round-to-nearest" in res.output


def test_quantize_then_eval_same_perplexity(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    res = _run(["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32", "--model", str(tiny_model_dir),
                "--output", str(out), *QUICK], tmp_path)
    assert res.exit_code == 0, res.output
    assert "ppl_pydoc" in res.output and "bits per weight" in res.output
    rec = read_records()[-1]
    assert rec["method"] == "gptq" and rec["status"] == "ok"
    assert rec["calibration"]["dataset"] == "pydoc" and rec["calibration"]["nsamples"] == 4
    ppl = rec["metrics"]["after"]["ppl_pydoc"]["value"]
    assert rec["metrics"]["before"]["ppl_pydoc"]["protocol"] == rec["metrics"]["after"]["ppl_pydoc"]["protocol"]
    assert 4.0 < rec["size"]["bits_per_weight"] < 5.0
    assert rec["size"]["checkpoint_bytes"] > 0 and rec["env"]["versions"]["torch"]
    res = _run(["eval", "--model", str(out), "--eval", "pydoc", "--eval-seqlen", "128", "--eval-windows", "4", "--no-progress"], tmp_path)
    assert res.exit_code == 0, res.output
    again = read_records()[-1]["metrics"]["after"]["ppl_pydoc"]["value"]
    assert again == pytest.approx(ppl, rel=1e-4)


def test_recipe_file(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: %s\nstages:\n  - {method: rtn, bits: 8, group_size: 32}\n  - {method: gptq, bits: 4, group_size: 32}\n" % tiny_model_dir)
    res = _run(["recipe", str(recipe), "--output", str(tmp_path / "o"), *QUICK], tmp_path)
    assert res.exit_code == 0, res.output
    rec = read_records()[-1]
    assert rec["method"] == "rtn+gptq" and rec["kind"] == "recipe"


BAD = [
    (["quantize", "--method", "nope"], "unknown method 'nope'; known methods: "),
    (["quantize", "--method", "rtn", "--bits", "0"], "--bits 0 is out of range; allowed: 2..8"),
    (["quantize", "--method", "rtn", "--bits", "9"], "--bits 9 is out of range; allowed: 2..8"),
    (["quantize", "--method", "rtn", "--group-size", "0"], "--group-size 0 is out of range"),
    (["quantize", "--method", "rtn", "--model", "./no/such/model"], "model path './no/such/model' does not exist"),
    (["quantize", "--method", "rtn", "--data-dir", "/no/such/dir"], "--data-dir '/no/such/dir' does not exist"),
    (["quantize", "--method", "gptq", "--nsamples", "0"], "--nsamples 0 is out of range; allowed: >= 1"),
    (["quantize", "--method", "rtn", "--damp", "0.1"], "method 'rtn' has no option --damp"),
    (["quantize", "--method", "rtn", "--export", "nope"], "--export 'nope' is not a known format; known: "),
    (["quantize", "--method", "rtn", "--bits", "3", "--group-size", "32", "--export", "gguf"],
     "--export gguf: rtn's grid (3-bit asymmetric group 32) has no GGUF type; exportable grids: "),
    (["quantize", "--method", "rtn", "--sym", "--group-size", "32", "--export", "gguf", "--gguf-requant", "q3_k"],
     "--gguf-requant 'q3_k' is not a GGUF type this export writes; allowed: "),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_nonzero_nothing_written(args, message, tiny_model_dir, tmp_path):
    if "--model" not in args:
        args = args + ["--model", str(tiny_model_dir)]
    res = _run(args + ["--output", str(tmp_path / "out")], tmp_path)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], res.output
    assert not (tmp_path / "out").exists()
    assert not read_records()


def test_existing_output_not_overwritten(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")
    res = _run(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--output", str(out), *QUICK], tmp_path)
    assert res.exit_code == 2 and "already holds a checkpoint; pass --overwrite" in res.output
    assert json.loads((out / "config.json").read_text()) == {}
    res = _run(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--output", str(out), "--overwrite", *QUICK], tmp_path)
    assert res.exit_code == 0, res.output
    assert "quantization_config" in json.loads((out / "config.json").read_text())


def test_shipped_recipe_files_validate():
    """Every example recipe in recipes/ names registered methods with valid options."""
    from compress.pipeline.recipe import Recipe

    files = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
    assert files
    for f in files:
        assert Recipe.from_yaml(f)[0].stages
