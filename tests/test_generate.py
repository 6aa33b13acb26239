"""`compress generate`: streams a completion and prints the speeds; one error line for a missing or corrupt model."""
from __future__ import annotations

from click.testing import CliRunner

from compress.cli import main


def _ckpt(tiny_model_dir, tmp_path):
    res = CliRunner().invoke(main, ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "-m",
                                    str(tiny_model_dir), "--eval", "none", "--no-baseline", "-o", str(tmp_path / "ck"),
                                    "--quantize-embeddings", "8", "--no-progress"])
    assert res.exit_code == 0, res.output
    return tmp_path / "ck"


def test_generate_streams_and_reports_speed(tiny_model_dir, tmp_path):
    ck = _ckpt(tiny_model_dir, tmp_path)
    res = CliRunner().invoke(main, ["generate", "-m", str(ck), "--prompt", "hello world", "-n", "6"])
    assert res.exit_code == 0, res.output
    assert "prefill" in res.output and "tok/s" in res.output and "peak memory" in res.output
    assert "quant_embedding" not in res.output  # kernels are described, not module types
    from compress.runs.generate import generate

    out = generate(str(ck), "hello world", max_new_tokens=6)
    assert 1 <= out["new_tokens"] <= 6 and out["prefill_tokens_per_second"] > 0
    assert any("tied to model.embed_tokens" in k for k in out["kernels"])


def test_generate_missing_and_corrupt_checkpoints_fail_in_one_line(tiny_model_dir, tmp_path):
    res = CliRunner().invoke(main, ["generate", "-m", str(tmp_path / "nope"), "--prompt", "hi"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "does not exist" in res.output
    ck = _ckpt(tiny_model_dir, tmp_path)
    st = ck / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])  # truncated
    res = CliRunner().invoke(main, ["generate", "-m", str(ck), "--prompt", "hi"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
    assert "model.safetensors" in res.output and "truncated" in res.output  # the guarded reader names the file
    res = CliRunner().invoke(main, ["generate", "-m", str(ck), "--prompt", "hi", "-n", "0"])
    assert res.exit_code == 2 and "--max-new-tokens 0" in res.output


def test_generate_compile_reports_compile_time(tiny_model_dir, tmp_path):
    from compress.evals.compiled_decode import compiler_missing

    why = compiler_missing()
    if why:
        import pytest

        pytest.skip(f"torch.compile unavailable: {why}")
    ck = _ckpt(tiny_model_dir, tmp_path)
    res = CliRunner().invoke(main, ["generate", "-m", str(ck), "--prompt", "hello world", "-n", "5", "--compile"])
    assert res.exit_code == 0, res.output
    assert "compile " in res.output and "left out of the decode speed" in res.output
