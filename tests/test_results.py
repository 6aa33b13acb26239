"""The results store: atomic appends, concurrent writers, torn lines never produced, bad lines skipped."""
import multiprocessing as mp

from compress.runs.results import append_record, read_records, store_path


def _writer(args):
    path, i = args
    for j in range(10):
        append_record({"writer": i, "j": j}, path)


def test_append_and_read(tmp_path):
    append_record({"a": 1}, tmp_path)
    append_record({"a": 2}, tmp_path)
    assert [r["a"] for r in read_records(tmp_path)] == [1, 2]


def test_concurrent_appends_lose_nothing(tmp_path):
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_writer, [(str(tmp_path), i) for i in range(4)])
    recs = read_records(tmp_path)
    assert len(recs) == 40
    assert {(r["writer"], r["j"]) for r in recs} == {(i, j) for i in range(4) for j in range(10)}


def test_corrupt_line_skipped_and_store_still_appendable(tmp_path, caplog):
    p = store_path(tmp_path)
    append_record({"a": 1}, tmp_path)
    with open(p, "a") as f:
        f.write('{"truncated": ')  # a line torn by some other writer
    append_record({"a": 2}, tmp_path)
    recs = read_records(tmp_path)
    assert [r.get("a") for r in recs] == [1, 2]
    assert "not a JSON record" in caplog.text


def test_crash_during_write_keeps_old_store(tmp_path, monkeypatch):
    import os


    append_record({"a": 1}, tmp_path)
    before = store_path(tmp_path).read_bytes()

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    try:
        append_record({"a": 2}, tmp_path)
    except OSError:
        pass
    assert store_path(tmp_path).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
