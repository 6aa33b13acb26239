"""The calibration loader and evaluation texts."""
import json

import pytest
import torch

from compress.core.errors import ConfigError, DataError
from compress.sources.data import calib_text, eval_text, get_calibration, resolve_data_dir


def test_wikitext2_is_the_hub_split_joined(data_dir):
    src = eval_text("wikitext2")
    # the hub's rows ("", " = Robert Boulter = \n", "", " Robert Boulter is ...") joined with "\n\n"
    assert src.text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert src.text.count("\n\n") >= 4357
    assert src.variant == "wikitext-2-raw-v1" and src.split == "test"


def test_calibration_deterministic_per_seed(tiny_tok, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    a = get_calibration("wikitext2", tiny_tok, nsamples=4, seqlen=64, seed=0)
    b = get_calibration("wikitext2", tiny_tok, nsamples=4, seqlen=64, seed=0, use_cache=False)
    c = get_calibration("wikitext2", tiny_tok, nsamples=4, seqlen=64, seed=1)
    assert a.input_ids.shape == (4, 64)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert list((tmp_path / "calib").glob("*.safetensors"))  # tokenized samples cached on disk
    rec = a.record()
    assert rec["dataset"] == "wikitext2" and rec["split"] == "validation" and rec["seed"] == 0


@pytest.mark.parametrize("name", ["c4", "ptb", "pydoc", "wikitext2-v1"])
def test_sources(name, tiny_tok, data_dir):
    cal = get_calibration(name, tiny_tok, nsamples=2, seqlen=32, seed=0, use_cache=False)
    assert cal.input_ids.shape == (2, 32)
    assert eval_text(name).text


def test_pydoc_calibration_and_eval_disjoint():
    cal, ev = calib_text("pydoc"), eval_text("pydoc")
    assert set(cal.documents).isdisjoint(ev.documents)
    assert len(cal.documents) > len(ev.documents) > 5


def test_file_sources(tmp_path, tiny_tok):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world, " * 200)
    assert get_calibration(f"file:{txt}", tiny_tok, nsamples=2, seqlen=16, use_cache=False).input_ids.shape == (2, 16)
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"document {i} " * 40}) for i in range(5)))
    assert eval_text(f"file:{jl}").text.count("document 3") == 40
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="line 1 has no string field 'text'"):
        eval_text(f"file:{bad}")
    with pytest.raises(DataError, match="does not exist"):
        eval_text(f"file:{tmp_path / 'missing.txt'}")


def test_missing_data_dir_is_clear(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"--data-dir '.*nowhere' does not exist"):
        resolve_data_dir(tmp_path / "nowhere")
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="COMPRESS_DATA_DIR=.* does not exist"):
        resolve_data_dir()


def test_missing_dataset_names_the_file_and_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"wikitext2: no local copy \(looked for .*wikitext-2-raw/wiki.test.raw.*hub is not reachable"):
        eval_text("wikitext2")


def test_fallback_to_pydoc_when_nothing_available(tmp_path, monkeypatch, tiny_tok):
    from compress.sources.data import with_pydoc_fallback

    monkeypatch.delenv("COMPRESS_DATA_DIR", raising=False)
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    src = with_pydoc_fallback(lambda n: eval_text(n), "wikitext2")
    assert src.name == "pydoc" and src.fallback_from == "wikitext2"
    assert src.record()["fallback_from"] == "wikitext2"


def test_bad_counts(tiny_tok):
    with pytest.raises(ConfigError, match="--nsamples 0 is out of range"):
        get_calibration("pydoc", tiny_tok, nsamples=0)


def test_generated_calibration_is_data_free(tiny_llama, tiny_tok):
    cal = get_calibration("generated", tiny_tok, nsamples=3, seqlen=12, seed=0, model=tiny_llama, use_cache=False)
    again = get_calibration("generated", tiny_tok, nsamples=3, seqlen=12, seed=0, model=tiny_llama, use_cache=False)
    assert cal.input_ids.shape == (3, 12) and torch.equal(cal.input_ids, again.input_ids)
    assert cal.record()["dataset"] == "generated"
