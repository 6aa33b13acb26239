"""compress fit: the knapsack allocator (against brute force), budgets, the mixed plan in a checkpoint, the verb."""
import itertools
import json
import random

import pytest
import torch

from compress.core.errors import ConfigError
from compress.kernels.knapsack import BudgetError, multiple_choice_knapsack


def _brute(sizes, losses, budget):
    best = None
    for choice in itertools.product(*[range(len(s)) for s in sizes]):
        size = sum(s[j] for s, j in zip(sizes, choice))
        if size > budget:
            continue
        loss = sum(l[j] for l, j in zip(losses, choice))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, choice)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    n, k = rng.randint(2, 5), rng.randint(1, 4)
    sizes = [[rng.randint(1, 20) for _ in range(k)] for _ in range(n)]
    losses = [[rng.random() * 10 for _ in range(k)] for _ in range(n)]
    budget = sum(min(s) for s in sizes) + rng.randint(0, 30)
    res = multiple_choice_knapsack(sizes, losses, budget)
    want = _brute(sizes, losses, budget)
    assert res.exact
    assert res.size <= budget
    assert res.loss == pytest.approx(want[0])
    assert res.size == sum(s[j] for s, j in zip(sizes, res.choice))


def test_knapsack_hand_built_instance():
    # three layers; the cheap choice of the sensitive layer 1 costs much more loss than anywhere else
    sizes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
    losses = [[5.0, 2.0, 1.0], [100.0, 10.0, 1.0], [6.0, 2.5, 1.0]]
    res = multiple_choice_knapsack(sizes, losses, 9)
    assert res.choice == [0, 2, 1] and res.loss == pytest.approx(8.5)  # the sensitive layer gets the most room
    assert res.loss == pytest.approx(_brute(sizes, losses, 9)[0])
    assert multiple_choice_knapsack(sizes, losses, 12).choice == [2, 2, 2]
    assert multiple_choice_knapsack(sizes, losses, 6).choice == [0, 0, 0]


def test_knapsack_discretised_never_exceeds_the_budget():
    rng = random.Random(7)
    sizes = [[rng.randint(1000, 100000) for _ in range(4)] for _ in range(30)]
    losses = [[rng.random() for _ in range(4)] for _ in range(30)]
    budget = sum(min(s) for s in sizes) + 200000
    res = multiple_choice_knapsack(sizes, losses, budget, max_units=500)
    assert not res.exact and res.unit > 1
    assert res.size <= budget


def test_knapsack_budget_below_minimum_names_it():
    with pytest.raises(BudgetError, match=r"^the budget 3 \(bits\) is below the smallest possible plan: 4 \(bits\)$"):
        multiple_choice_knapsack([[2, 5], [2, 3]], [[1, 0], [1, 0]], 3, what="bits")


# ---------------------------------------------------------------------------------------------------------------
def _plan(tmp_path, model, settings):
    from compress.model.arch import find_blocks
    from compress.model.surgery import is_linear_like

    prefix, blocks = find_blocks(model)
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, m in b.named_modules() if n and is_linear_like(m)]
    layers = {n: settings[i % len(settings)] for i, n in enumerate(names)}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "compress-plan", "version": 1, "label": "test", "layers": layers}))
    return path, layers


def test_mixed_plan_checkpoint_reloads_identically(tmp_path, tiny_llama, tiny_tok):
    from compress.evals.size import checkpoint_bytes
    from compress.formats import save_checkpoint
    from compress.formats.native import load_checkpoint
    from compress.pipeline.recipe import Recipe, RunContext
    from compress.sources.data import get_calibration

    settings = [{"method": "gptq", "bits": 3, "group_size": 16, "sym": False},
                {"method": "rtn", "bits": 4, "group_size": 32, "sym": False},
                {"method": "rtn", "bits": 2, "group_size": -1, "sym": True}]
    path, layers = _plan(tmp_path, tiny_llama, settings)
    calib = get_calibration("generated", tiny_tok, nsamples=4, seqlen=32, seed=0, model=tiny_llama)
    model = Recipe.from_specs([{"method": "mixed", "plan": str(path)}]).run(
        tiny_llama, RunContext(tokenizer=tiny_tok, calibration=calib, progress=False))
    for name, s in layers.items():
        m = model.get_submodule(name)
        assert (m.spec.bits, m.spec.group_size, m.spec.sym) == (s["bits"], s["group_size"], s["sym"])
    out = tmp_path / "ckpt"
    save_checkpoint(model, tiny_tok, out)
    back, _, _ = load_checkpoint(out)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    for name, s in layers.items():
        assert back.get_submodule(name).spec.bits == s["bits"]
    assert checkpoint_bytes(out) > 0


def test_mixed_refuses_a_block_method(tmp_path, tiny_llama):
    from compress.pipeline.method import build_method

    path, _ = _plan(tmp_path, tiny_llama, [{"method": "awq", "bits": 4, "group_size": 32}])
    with pytest.raises(ConfigError, match="method 'awq' cannot be set per linear"):
        build_method("mixed", {"plan": str(path)})


# ---------------------------------------------------------------------------------------------------------------
def _fit_spec(tiny_model_dir, tmp_path, **kw):
    from compress.runs.spec import RunSpec

    base = dict(model=str(tiny_model_dir), calib="generated", nsamples=4, seqlen=32, eval=["pydoc"], eval_seqlen=64,
                eval_windows=2, results_dir=str(tmp_path / "results"), output=str(tmp_path / "fitted"),
                fit_group_sizes=["16", "32"], baseline=False, progress=False)
    base.update(kw)
    return RunSpec.build(base, kind="fit")


def test_fit_meets_the_bit_budget_and_records_the_plan(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    from compress.runs.fit import fit

    (rec,) = fit(_fit_spec(tiny_model_dir, tmp_path, max_bits=3.5))
    f = rec["fit"]
    assert f["meets_budget"] and rec["size"]["bits_per_weight"] <= 3.5
    assert f["predicted"]["checkpoint_bytes"] == rec["size"]["checkpoint_bytes"]  # the dry write is exact
    assert rec["details"]["mixed"]["plan"]["layers"]
    assert len(f["plan_counts"]) > 1  # a real mix at this budget
    assert rec["method"] == "mixed" and rec["kind"] == "fit"


def test_fit_meets_a_byte_budget_exactly_as_written(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    from compress.evals.size import checkpoint_bytes
    from compress.runs.fit import fit

    budget = 215_000
    (rec,) = fit(_fit_spec(tiny_model_dir, tmp_path, max_size=str(budget), sensitivity="hessian"))
    assert rec["fit"]["meets_budget"]
    assert checkpoint_bytes(rec["checkpoint"]) == rec["size"]["checkpoint_bytes"] <= budget
    assert rec["fit"]["predicted"]["checkpoint_bytes"] == rec["size"]["checkpoint_bytes"]


def test_fit_frontier_writes_one_record_per_budget(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    from compress.runs.fit import fit
    from compress.runs.results import read_records

    recs = fit(_fit_spec(tiny_model_dir, tmp_path, max_bits=4.5, frontier=2, fit_methods=["rtn"]))
    budgets = [r["fit"]["budget"]["value"] for r in recs]
    assert len(recs) == 2 and budgets[0] < budgets[1] == 4.5
    assert all(r["size"]["bits_per_weight"] <= b for r, b in zip(recs, budgets))
    assert len(read_records(str(tmp_path / "results"))) == 2
    assert recs[0]["fit"]["sensitivity"] == recs[1]["fit"]["sensitivity"]  # one sensitivity pass for every budget


@pytest.mark.parametrize("args,match", [
    (["--max-bits", "1.0"], r"--max-bits 1 is below the smallest possible plan: \d\.\d{4} bits per weight"),
    (["--max-size", "1KB"], r"--max-size 1000 bytes is below the smallest possible plan: \d+ bytes"),
    ([], r"compress fit needs exactly one budget"),
    (["--max-bits", "3", "--fit-methods", "awq"], r"--fit-methods 'awq' cannot be set per linear"),
    (["--max-bits", "3", "--fit-bits", "9"], r"--fit-bits 9 is out of range"),
    (["--max-size", "lots"], r"--max-size 'lots' is not a size"),
])
def test_fit_cli_bad_budgets_are_one_line(tiny_model_dir, tmp_path, args, match):
    from click.testing import CliRunner

    from compress.cli import main

    r = CliRunner().invoke(main, ["fit", "-m", str(tiny_model_dir), "--calib", "generated", "--nsamples", "2",
                                  "--seqlen", "16", "--eval", "none", "--no-baseline", "--results-dir",
                                  str(tmp_path / "r"), "-o", str(tmp_path / "o"), *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and __import__("re").search(match, lines[0]), r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt,match", [
    ("gptq", r"--export gptq: the plan mixes 2 grids \(w3 g16, w4 g32\)"),
    ("compressed-tensors", r"--export compressed-tensors: the plan mixes 2 grids"),
    ("gguf", r"--export gguf: gptq's grid \(3-bit asymmetric group 16\) has no GGUF type"),
])
def test_exports_check_a_mixed_plan_before_any_work(tmp_path, tiny_llama, fmt, match):
    from compress.formats.exporters import check_plan

    path, _ = _plan(tmp_path, tiny_llama, [{"method": "gptq", "bits": 3, "group_size": 16},
                                           {"method": "rtn", "bits": 4, "group_size": 32}])
    with pytest.raises(ConfigError, match=match):
        check_plan(fmt, [("mixed", {"plan": str(path)})], {})


def test_gguf_export_takes_a_plan_of_gguf_grids(tmp_path, tiny_llama):
    from compress.formats.exporters import check_plan

    path, _ = _plan(tmp_path, tiny_llama, [{"method": "gptq", "bits": 4, "group_size": 32},
                                           {"method": "rtn", "bits": 8, "group_size": 32, "sym": True}])
    check_plan("gguf", [("mixed", {"plan": str(path)})], {})  # Q4_1 and Q8_0 per tensor: accepted
    check_plan("dense", [("mixed", {"plan": str(path)})], {})


def test_gguf_export_of_a_mixed_plan_has_one_type_per_tensor(tmp_path, tiny_llama, tiny_tok):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install '.[gguf]')")
    from compress.formats.gguf import write_gguf
    from compress.pipeline.recipe import Recipe, RunContext

    path, layers = _plan(tmp_path, tiny_llama, [{"method": "rtn", "bits": 4, "group_size": 32},
                                                {"method": "rtn", "bits": 8, "group_size": 32, "sym": True}])
    model = Recipe.from_specs([{"method": "mixed", "plan": str(path)}]).run(tiny_llama, RunContext(progress=False))
    write_gguf(model, tiny_tok, tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.0.attn_k.weight"] == "Q8_0"
    assert {"Q4_1", "Q8_0"} <= set(types.values())


def test_fit_byte_budget_counts_quantized_embeddings(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    from compress.runs.fit import fit

    (rec,) = fit(_fit_spec(tiny_model_dir, tmp_path, max_size="150KB", quantize_embeddings="8", fit_methods=["rtn"]))
    assert rec["fit"]["meets_budget"] and rec["size"]["checkpoint_bytes"] <= 150_000
    assert rec["fit"]["predicted"]["checkpoint_bytes"] == rec["size"]["checkpoint_bytes"]
