"""Shared fixtures: tiny random models (fast, default) and the real offline model (marker `real`, run with --real)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--real", action="store_true", help="also run the checks on the real offline model (SmolLM2-135M)")
    parser.addoption("--real-only", action="store_true", help="run only the real-model checks")


def pytest_configure(config):
    # Tests and CI read the data kit from ../shared/data unless COMPRESS_DATA_DIR says otherwise.
    if not os.environ.get("COMPRESS_DATA_DIR") and DEFAULT_DATA.is_dir():
        os.environ["COMPRESS_DATA_DIR"] = str(DEFAULT_DATA)
    elif os.environ.get("COMPRESS_DATA_DIR"):
        # A relative path (the README's ../shared/data) must survive tests that change directory.
        os.environ["COMPRESS_DATA_DIR"] = os.path.abspath(os.environ["COMPRESS_DATA_DIR"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def pytest_collection_modifyitems(config, items):
    real = config.getoption("--real") or config.getoption("--real-only")
    only = config.getoption("--real-only")
    skip_real = pytest.mark.skip(reason="real-model check: run with --real")
    skip_fast = pytest.mark.skip(reason="--real-only")
    for item in items:
        if "real" in item.keywords and not real:
            item.add_marker(skip_real)
        elif "real" not in item.keywords and only:
            item.add_marker(skip_fast)


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """Every test writes its results records into its own folder."""
    monkeypatch.setenv("COMPRESS_RESULTS_DIR", str(tmp_path / "results"))


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny-model tests run single-threaded: their ops are too small to gain from threads, and on a busy machine
    competing thread pools slow them down by an order of magnitude. Real-model checks keep all cores."""
    if "real" in request.keywords:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = os.environ.get("COMPRESS_DATA_DIR")
    if not d or not Path(d).is_dir():
        pytest.fail(f"the data kit is needed: set COMPRESS_DATA_DIR (looked for {DEFAULT_DATA})")
    return Path(d)


@pytest.fixture()
def tiny_tok():
    from compress.model.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture()
def tiny_llama():
    from compress.model.tiny import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture()
def tiny_opt():
    from compress.model.tiny import tiny_model

    return tiny_model("opt", seed=0)


@pytest.fixture()
def tiny_calib():
    torch.manual_seed(1)
    return torch.randint(0, 256, (8, 32))


@pytest.fixture()
def tiny_model_dir(tmp_path):
    """A tiny llama saved as a transformers folder with a byte tokenizer: the CLI runs on it in seconds."""
    from compress.model.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama", seed=0, hidden=64, intermediate=128, layers=2)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def real_loaded():
    """SmolLM2-135M-Instruct (bfloat16), loaded once per session. Tests take copies through `real_model`."""
    from compress.sources.models import load_model

    return load_model("smollm2", dtype="bfloat16")


@pytest.fixture()
def real_model(real_loaded):
    return copy.deepcopy(real_loaded.model)
