"""The real-client check of the GPTQ export: GPTQModel (the maintained successor of AutoGPTQ) loads our checkpoint on
CPU and computes the same logits, for symmetric grids (natural groups, and an act-order group index). GPTQModel
refuses every asymmetric v1 ("gptq") checkpoint that it did not write itself (a provenance guard against AutoGPTQ's
old zero-point bug: it checks quantization_config.meta.quantizer), so asymmetric exports are not loadable by it
whatever their layout. Skipped where gptqmodel is not importable; it lives in its own environment:

    python3 -m venv .venv-gptqmodel && echo torch==2.13.0 > /tmp/c.txt
    .venv-gptqmodel/bin/pip install -c /tmp/c.txt torch==2.13.0 gptqmodel==7.6.0 pytest && .venv-gptqmodel/bin/pip install -e .
    GPTQMODEL_CPU_WORKERS=2 .venv-gptqmodel/bin/python -m pytest -q tests/test_gptqmodel_client.py
"""
import os

import pytest
import torch

from compress.pipeline.recipe import Recipe, RunContext
from compress.sources.data import Calibration, TextSource

gptqmodel = pytest.importorskip("gptqmodel")


@pytest.mark.parametrize("opts", [{"bits": 4, "group_size": 32, "sym": True},
                                  {"bits": 4, "group_size": 32, "sym": True, "act_order": True, "static_groups": False}])
def test_gptqmodel_loads_our_gptq_checkpoint(opts, tmp_path, tiny_tok):
    from compress.formats.exporters import export
    from compress.model.tiny import tiny_model

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    torch.manual_seed(0)
    calib = Calibration(torch.randint(0, 256, (8, 64)), TextSource("test", "random", "-", "-"), 0)
    model = tiny_model("llama", seed=1, hidden=128, intermediate=256, layers=2, dtype=torch.float16)
    model = Recipe.from_specs([{"method": "gptq", **opts}]).run(model, RunContext(calibration=calib, progress=False))
    ids = torch.randint(0, 256, (1, 48))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    out = export("gptq", model, tiny_tok, tmp_path / "q")
    from gptqmodel import BACKEND, GPTQModel

    loaded = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits.float()
    # float16 kernels on both sides: equal up to float16 accumulation order
    assert torch.allclose(logits, ref, atol=2e-2, rtol=2e-2), (logits - ref).abs().max()
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
