"""Bad input, as a new user produces it by accident, driven through the CLI: for every case a non-zero exit, one line
on stderr naming the value or the file, no traceback, and an existing checkpoint and results store left byte for
byte as they were. Also: Ctrl-C mid-run (a real SIGINT) and during the checkpoint write, and --verbose."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compress.cli import main

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--calib", "pydoc", "--nsamples", "4", "--seqlen", "64", "--eval", "pydoc", "--eval-seqlen", "128",
         "--eval-windows", "2", "--no-progress", "--no-baseline"]


def _invoke(args: list[str], cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(old)


def _snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder, a checkpoint of it written by `compress quantize`, and the results store holding that
    run's record: what every bad input must leave untouched."""
    from compress.model.tiny import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("world")
    model = root / "tiny"
    tiny_model("llama", seed=0, hidden=64, intermediate=128, layers=2).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    store, ckpt = root / "results", root / "ckpt"
    torch.set_num_threads(1)
    res = _invoke(["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "--model", str(model),
                   "--output", str(ckpt), "--results-dir", str(store), *QUICK], root)
    assert res.exit_code == 0, res.output
    return {"root": root, "model": model, "ckpt": ckpt, "store": store}


# ---------------------------------------------------------------------------------------------------------------
# Makers of bad files: each takes the world and a scratch folder and returns the path to pass
# ---------------------------------------------------------------------------------------------------------------
def _copy_model(w, tmp: Path) -> Path:
    dst = tmp / "model"
    shutil.copytree(w["model"], dst)
    return dst


def truncated_shard(w, tmp):
    m = _copy_model(w, tmp)
    st = m / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) * 2 // 3])  # an interrupted copy
    return m


def edit_config(change):
    def make(w, tmp):
        m = _copy_model(w, tmp)
        cfg = json.loads((m / "config.json").read_text())
        change(cfg)
        (m / "config.json").write_text(json.dumps(cfg))
        return m
    return make


def config_not_json(w, tmp):
    m = _copy_model(w, tmp)
    (m / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    return m


def config_a_list(w, tmp):
    m = _copy_model(w, tmp)
    (m / "config.json").write_text("[1, 2]")
    return m


def index_missing_shard(w, tmp):
    m = _copy_model(w, tmp)
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002.safetensors"}}))
    return m


def ckpt_unknown_module_type(w, tmp):
    dst = tmp / "ckpt"
    shutil.copytree(w["ckpt"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    first = next(iter(cfg["quantization_config"]["modules"]))
    cfg["quantization_config"]["modules"][first]["type"] = "hexlinear"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def not_gguf(w, tmp):
    p = tmp / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip file, renamed")
    return p


def truncated_gguf(w, tmp):
    p = tmp / "cut.gguf"
    # a real GGUF header (magic, version 3, 5 tensors, 2 metadata entries) and then nothing
    p.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (2).to_bytes(8, "little") + b"\x07")
    return p


def text(name, body: str | bytes):
    def make(w, tmp):
        p = tmp / name
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
        return p
    return make


def torn_store(w, tmp):
    d = tmp / "torn"
    d.mkdir()
    (d / "runs.jsonl").write_text('{"run_id": "a", "status": "ok"}\n{"run_id": "b", "sta')
    return d


# (case id, verb arguments with {model} {ckpt} {store} {file} placeholders, the maker of {file}, text the line names)
RUN = ["--model", "{model}", "--results-dir", "{store}", "--output", "{out}", *QUICK]
CASES = [
    # corrupt or truncated files
    ("truncated-shard", ["eval", "--model", "{file}", "--results-dir", "{store}", "--eval", "pydoc"], truncated_shard,
     "model.safetensors' is truncated"),
    ("config-not-json", ["eval", "--model", "{file}", "--results-dir", "{store}"], config_not_json, "is not valid JSON: line 1"),
    ("config-not-object", ["eval", "--model", "{file}", "--results-dir", "{store}"], config_a_list, "must hold a JSON object"),
    ("unknown-quant-method", ["eval", "--model", "{file}", "--results-dir", "{store}"],
     edit_config(lambda c: c.update(quantization_config={"quant_method": "zipquant"})), "quant_method 'zipquant' is unknown"),
    ("quant-config-not-mapping", ["eval", "--model", "{file}", "--results-dir", "{store}"],
     edit_config(lambda c: c.update(quantization_config=["gptq"])), "quantization_config must be a mapping, not list"),
    ("unknown-native-format", ["eval", "--model", "{file}", "--results-dir", "{store}"],
     edit_config(lambda c: c.update(quantization_config={"quant_method": "compress", "format": "zstd"})),
     "format 'zstd' is not known"),
    ("unknown-format-key", ["eval", "--model", "{file}", "--results-dir", "{store}"],
     edit_config(lambda c: c.update(compress_format="tarball")), "compress_format 'tarball' is not a known format"),
    ("unknown-module-type", ["eval", "--model", "{file}", "--results-dir", "{store}"], ckpt_unknown_module_type,
     "type 'hexlinear', unknown"),
    ("unknown-architecture", ["eval", "--model", "{file}", "--results-dir", "{store}"],
     edit_config(lambda c: c.update(model_type="transmogrifier")), "model_type 'transmogrifier' is not an architecture"),
    ("index-missing-shard", ["eval", "--model", "{file}", "--results-dir", "{store}"], index_missing_shard,
     "is missing shard model-00002.safetensors"),
    ("not-gguf", ["eval", "--model", "{file}", "--results-dir", "{store}"], not_gguf, "is not GGUF"),
    ("truncated-gguf", ["eval", "--model", "{file}", "--results-dir", "{store}"], truncated_gguf, "cut.gguf"),
    ("recipe-yaml-syntax", ["recipe", "{file}", *RUN], text("r.yaml", "stages:\n  - {method: rtn, bits: 4\n"),
     "r.yaml' is not valid YAML: line"),
    ("grid-yaml-syntax", ["grid", "run", "{file}"], text("g.yaml", "models: [a\nmethods:\n  - rtn\n"),
     "g.yaml' is not valid YAML: line"),
    ("grid-missing", ["grid", "status", "{tmp}/nope.yaml"], None, "grid file"),
    ("report-torn-store", ["report", "--results-dir", "{file}"], torn_store, "runs.jsonl': line 2 is not JSON"),
    ("run-into-torn-store", ["quantize", "--method", "rtn", "--model", "{model}", "--results-dir", "{file}",
                             "--output", "{out}", *QUICK], torn_store, "runs.jsonl': line 2 is not JSON"),
    ("calib-jsonl-bad-line", ["quantize", "--method", "gptq", *RUN, "--calib", "file:{file}"],
     text("c.jsonl", '{"text": "hello"}\nnot json\n'), "line 2 is not JSON"),
    ("calib-not-utf8", ["quantize", "--method", "gptq", *RUN, "--calib", "file:{file}"],
     text("c.txt", b"\xff\xfe\x00binary\x00" * 40), "is not UTF-8 text"),
    ("calib-file-missing", ["quantize", "--method", "gptq", *RUN, "--calib", "file:{tmp}/none.txt"], None,
     "none.txt' does not exist"),
    # settings the model or the data cannot honour
    ("seqlen-beyond-context", ["quantize", "--method", "gptq", *RUN, "--seqlen", "4096"], None,
     "--seqlen 4096 is longer than the context of model"),
    ("too-many-samples", ["quantize", "--method", "gptq", *RUN, "--calib", "file:{file}", "--nsamples", "64"],
     text("small.txt", "a short text. " * 60), "would repeat text"),
    ("group-size-wider-than-layer", ["quantize", "--method", "rtn", *RUN, "--group-size", "256"], None,
     "--group-size 256 of rtn is larger than the width of layer"),
    ("nm-n-not-below-m", ["prune", "--method", "wanda", *RUN, "--pattern", "4:4"], None, "'4:4' needs 0 < N < M"),
    ("ignore-not-regex", ["quantize", "--method", "rtn", *RUN, "--ignore", "mlp.(up"], None,
     "--ignore 'mlp.(up' is not a regular expression"),
    ("device-without-cuda", ["quantize", "--method", "rtn", *RUN, "--device", "cuda"], None,
     "--device 'cuda' was asked for but CUDA is not available"),
    ("device-unknown", ["eval", "--model", "{model}", "--results-dir", "{store}", "--device", "tpu9"], None,
     "--device 'tpu9'"),
    ("dtype-unknown", ["eval", "--model", "{model}", "--results-dir", "{store}", "--dtype", "float8"], None,
     "--dtype 'float8' is not supported"),
    ("eval-dataset-unknown", ["quantize", "--method", "rtn", *RUN, "--eval", "wikitext3"], None,
     "unknown dataset 'wikitext3'"),
    ("calib-source-unknown", ["quantize", "--method", "gptq", *RUN, "--calib", "wiki"], None,
     "unknown calibration source 'wiki'"),
    ("nsamples-not-a-number", ["quantize", "--method", "gptq", *RUN, "--nsamples", "many"], None,
     "'many' is not a valid integer"),
    ("eval-windows-zero", ["eval", "--model", "{model}", "--results-dir", "{store}", "--eval-windows", "0"], None,
     "--eval-windows 0 is out of range"),
    ("bits-out-of-range", ["quantize", "--method", "gptq", *RUN, "--bits", "9"], None, "--bits 9 is out of range"),
    ("output-holds-checkpoint", ["quantize", "--method", "rtn", "--model", "{model}", "--results-dir", "{store}",
                                 "--output", "{ckpt}", *QUICK], None, "already holds a checkpoint; pass --overwrite"),
    ("model-path-missing", ["eval", "--model", "./no/such/model", "--results-dir", "{store}"], None,
     "model path './no/such/model' does not exist"),
    ("method-of-other-family", ["prune", "--method", "gptq", *RUN], None, "method 'gptq' is a quantization method"),
    ("export-unknown", ["quantize", "--method", "rtn", *RUN, "--export", "onnx"], None, "--export 'onnx' is not a known format"),
]


@pytest.mark.parametrize("args,make,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(world, tmp_path, args, make, needle):
    if "--device" in args and "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the case is for machines without it")
    before = _snapshot(world["ckpt"], world["store"])
    file = make(world, tmp_path) if make else None
    fill = {"model": world["model"], "ckpt": world["ckpt"], "store": world["store"], "file": file, "tmp": tmp_path,
            "out": tmp_path / "out"}
    argv = [a.format(**{k: str(v) for k, v in fill.items()}) for a in args]
    res = _invoke(argv, tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code != 0, res.output
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert _snapshot(world["ckpt"], world["store"]) == before


def test_case_count():
    assert len(CASES) >= 25


# ---------------------------------------------------------------------------------------------------------------
# Warnings: settings the run can honour, but not as asked
# ---------------------------------------------------------------------------------------------------------------
def test_ignore_matching_nothing_and_long_eval_seqlen_warn(world, caplog):
    from compress.runs.runner import validate
    from compress.runs.spec import RunSpec

    spec = RunSpec.build({"model": str(world["model"]), "calib": "pydoc", "nsamples": 2, "seqlen": 32, "eval": "pydoc",
                          "eval_seqlen": 4096, "ignore": ["attention_zzz"], "save": False, "results_dir": str(world["store"])},
                         kind="quantize", stages=[{"method": "rtn", "bits": 4, "group_size": 32}])
    with caplog.at_level("WARNING", logger="compress"):
        validate(spec)
    assert "--ignore 'attention_zzz' matches no linear layer" in caplog.text
    assert "--eval-seqlen 4096 is longer than the context" in caplog.text and "(512 positions)" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# --verbose: the traceback after the one line; without it, none
# ---------------------------------------------------------------------------------------------------------------
def test_verbose_shows_traceback_after_the_line(world, tmp_path):
    m = truncated_shard(world, tmp_path)
    quiet = _invoke(["eval", "--model", str(m), "--results-dir", str(world["store"])], tmp_path)
    loud = _invoke(["--verbose", "eval", "--model", str(m), "--results-dir", str(world["store"])], tmp_path)
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.output and len(quiet.stderr.strip().splitlines()) == 1
    first, *rest = loud.stderr.strip().splitlines()
    assert first == quiet.stderr.strip()
    assert rest and rest[0].startswith("Traceback") and "FileFormatError" in rest[-1]


def test_unforeseen_error_is_one_line_too(world, tmp_path, monkeypatch):
    import compress.runs.runner as runner

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(runner, "load_model", boom)
    res = _invoke(["eval", "--model", str(world["model"]), "--results-dir", str(world["store"])], tmp_path)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.stderr.strip() == "error: internal error: RuntimeError: a bug (`compress --verbose ...` shows the traceback)"


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------------------------
def test_ctrl_c_while_writing_the_checkpoint_leaves_nothing(world, tmp_path, monkeypatch):
    import compress.formats.base as base

    before = _snapshot(world["ckpt"], world["store"])
    real = base.write_safetensors

    def interrupted(state, folder, metadata=None):
        real(state, folder, metadata)  # the weights are on disk in the temporary folder, config.json not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "write_safetensors", interrupted)
    out = tmp_path / "out"
    res = _invoke(["quantize", "--method", "rtn", "--group-size", "32", "--model", str(world["model"]),
                   "--results-dir", str(world["store"]), "--output", str(out), *QUICK], tmp_path)
    assert res.exit_code == 130, res.output
    assert res.stderr.strip() == "interrupted (Ctrl-C): no checkpoint was written; no results record was appended"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert _snapshot(world["ckpt"], world["store"]) == before


def test_atomic_folder_keeps_the_old_checkpoint_on_ctrl_c(tmp_path):
    from compress.formats import AtomicFolder

    target = tmp_path / "ck"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with AtomicFolder(target, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new, half")
            raise KeyboardInterrupt
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_sigint_mid_run(tmp_path):
    """A real SIGINT to a `compress quantize` process while GPTQ runs: exit 130, one line saying nothing was kept,
    no checkpoint folder (not even a temporary one), the results store unchanged."""
    from compress.model.tiny import tiny_model, tiny_tokenizer

    model = tmp_path / "wide"
    tiny_model("llama", seed=0, hidden=256, intermediate=1024, layers=4).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    store = tmp_path / "results"
    store.mkdir()
    (store / "runs.jsonl").write_text('{"run_id": "earlier", "status": "ok"}\n')
    before = _snapshot(store)
    out = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "quantize", "--method", "gptq", "--model", str(model),
                             "--calib", "pydoc", "--nsamples", "32", "--seqlen", "256", "--eval", "none",
                             "--no-baseline", "--no-progress", "--results-dir", str(store), "--output", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any("sequential pass" in ln for ln in seen):
        time.sleep(0.1)
    assert proc.poll() is None, "".join(seen) + proc.stderr.read()
    assert any("sequential pass" in ln for ln in seen), "".join(seen)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, err
    assert lines == ["interrupted (Ctrl-C): no checkpoint was written; no results record was appended"], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert _snapshot(store) == before
