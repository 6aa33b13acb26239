"""The report reads only the results store: protocols are never mixed, the Pareto front is right, files are written."""
from click.testing import CliRunner

from compress.cli import main
from compress.runs.report import build_report, collect_points, pareto_front
from compress.runs.results import append_record

PPL_PROTO = {"dataset": "wikitext2", "metric": "perplexity", "seqlen": 512, "windows": 8, "windows_total": 280}


def _rec(method, setting, bits, ppl, *, key="k512", before=None, acc=None, status="ok", t="2026-01-01T00:00:00"):
    after = {"ppl_wikitext2": {"value": ppl, "protocol": {**PPL_PROTO, "seqlen": 512 if key == "k512" else 2048},
                               "protocol_key": key}}
    if acc is not None:
        after["piqa_acc"] = {"value": acc, "higher_is_better": True, "protocol": {"task": "piqa"}, "protocol_key": "pq"}
    rec = {"run_id": f"{method}-{setting}-{bits}", "time": t, "kind": "quantize", "status": status, "method": method,
           "setting": f"{method}({setting})", "model": {"name": "M", "fingerprint": "fp"},
           "metrics": {"after": after, "before": {}}, "size": {"bits_per_weight": bits, "memory_bytes": int(bits * 1e6)}}
    if before is not None:
        rec["metrics"]["before"] = {"ppl_wikitext2": {"value": before, "protocol": PPL_PROTO, "protocol_key": key}}
        rec["size_before"] = {"bits_per_weight": 16.0, "memory_bytes": int(16e6)}
    return rec


# (method, setting, bits per weight, perplexity): the front is, by hand, w2-gptq, w3-gptq, w4-rtn-g64, w8, and fp.
HAND = [
    ("rtn", "w2 g128", 2.25, 900.0),   # dominated by gptq w2 (same bits, lower ppl)
    ("gptq", "w2 g128", 2.25, 60.0),   # front
    ("rtn", "w3 g128", 3.25, 40.0),    # dominated by gptq w3
    ("gptq", "w3 g128", 3.25, 22.0),   # front
    ("rtn", "w4 g128", 4.25, 19.0),    # dominated by gptq w4 g128 (same bits, lower ppl)
    ("rtn", "w4 g64", 4.5, 18.0),      # front (better than everything smaller)
    ("gptq", "w4 g128", 4.25, 18.5),   # front: better than rtn w4 g128 at the same size
    ("rtn", "w8 g128", 8.25, 17.2),    # front
    ("gptq", "w8 g128", 8.25, 17.2),   # tie with rtn w8: neither dominates the other -> both front
]
FRONT = {"gptq w2 g128", "gptq w3 g128", "gptq w4 g128", "rtn w4 g64", "rtn w8 g128", "gptq w8 g128", "uncompressed"}


def _hand_records():
    recs = [_rec(m, s, b, p, before=17.0 if i == 0 else None) for i, (m, s, b, p) in enumerate(HAND)]
    recs.append(_rec("rtn", "w3 g64", 3.5, 21.0, key="k2048"))  # another protocol: must be left out
    recs.append(_rec("rtn", "w2 g64", 2.5, 10.0, status="failed"))  # failed: left out
    return recs


def test_pareto_front_on_hand_made_records():
    points, left, proto = build_report(_hand_records(), "wikitext2_ppl")
    assert {p.label for p in points if p.front} == FRONT
    assert len(points) == len(HAND) + 1  # plus the uncompressed point from the "before" metrics
    assert left["failed runs"] == 1 and sum(n for why, n in left.items() if "other protocols" in why) == 1
    assert "seqlen 512" in proto


def test_pareto_front_higher_is_better_and_ties():
    recs = [_rec("a", "x", 2.0, 1.0, acc=0.50), _rec("b", "y", 3.0, 1.0, acc=0.60), _rec("c", "z", 3.0, 1.0, acc=0.55),
            _rec("d", "u", 4.0, 1.0, acc=0.60), _rec("e", "v", 1.5, 1.0, acc=0.40)]
    points, _, _ = build_report(recs, "piqa_acc")
    assert {p.method for p in points if p.front} == {"a", "b", "e"}  # d is as good as b but larger; c is worse than b
    points, _ = collect_points(recs, "piqa_acc")
    front = pareto_front(points, "bytes")
    assert [p.method for p in front] == ["e", "a", "b"]  # ordered by size


def test_latest_run_of_a_setting_wins():
    old = _rec("rtn", "w4 g128", 4.25, 30.0, t="2026-01-01T00:00:00")
    new = _rec("rtn", "w4 g128", 4.25, 19.0, t="2026-02-01T00:00:00")
    points, left, _ = build_report([new, old], "ppl_wikitext2")
    assert [p.value for p in points] == [19.0] and sum(left.values()) == 1


def test_cli_report_writes_table_and_png(tmp_path):
    for r in _hand_records():
        append_record(r)
    out = tmp_path / "rep"
    res = CliRunner().invoke(main, ["report", "--metric", "wikitext2_ppl", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "Pareto" in res.output or "front" in res.output
    assert "left out" in res.output and "failed" in res.output
    md = (tmp_path / "rep.md").read_text()
    assert md.count("**front**") == len(FRONT) and "| gptq | w3 g128 |" in md
    png = (tmp_path / "rep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    res = CliRunner().invoke(main, ["report", "--metric", "nope_acc"])
    assert res.exit_code == 2 and "no record" in res.output
