"""The peer tools' virtual environments, shared by the side-by-side benches (each peer pins its own versions)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def peer_python(venv: Path, peer: str, torch_pin: str, extra: tuple[str, ...] = ()) -> Path:
    """The peer venv's python, creating the venv on first use (a marker file says it is complete)."""
    py = venv / "bin" / "python"
    marker = venv / ".compress-bench-ready"
    if marker.is_file() and py.is_file():
        return py
    print(f"creating {venv} with {peer} (first run only; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    constraint = venv / "constraints.txt"
    constraint.write_text(torch_pin + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(constraint), torch_pin, peer, *extra], check=True)
    marker.write_text(subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout)
    return py


def copy_peer_parameters(model, path) -> None:
    """Copy a peer's saved tensors (safetensors at `path`) into `model`'s parameters of the same name; tensors that
    are not parameters of the model (its weight_scale / weight_zero_point quantization parameters) are not read."""
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    for name, w in load_file(str(path)).items():
        if name in params:
            params[name].data.copy_(w)
