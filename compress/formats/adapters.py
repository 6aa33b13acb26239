"""LoRA adapters kept beside their base model: peft's own format (`adapter_config.json` + `adapter_model.safetensors`)
in the checkpoint's `adapter/` subfolder.

A model wrapped by peft (QLoRA's NF4 base + adapters, a LoRA stage left unmerged) is saved as its base model, in
whatever format the base needs (native, bitsandbytes 4-bit, dense), plus the adapter folder, and config.json says
`"compress_adapter": "adapter"`. The loader rebuilds the base, then applies the adapter with
`PeftModel.from_pretrained`, so the checkpoint evaluates to the run's numbers; any peft user can do the same by hand
(the adapter's `base_model_name_or_path` is the checkpoint folder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.core.errors import ModelError
from compress.core.readers import read_json_object
from compress.formats.base import ADAPTER_KEY, Format, SavedModel, state_for_saving

ADAPTER_DIR = "adapter"


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def base_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict without the adapters, under the base model's own key names."""
    base = peft_model.get_base_model()
    state = state_for_saving(base)
    out = {}
    for k, v in state.items():
        if ".lora_" in k:  # lora_A, lora_B, lora_embedding_*, lora_magnitude_vector: the adapter's own tensors
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def write_adapter(peft_model: nn.Module, folder: Path, final: Path) -> None:
    """peft's save_pretrained into folder/adapter, pointing at the final checkpoint folder as its base."""
    target = folder / ADAPTER_DIR
    peft_model.save_pretrained(str(target), safe_serialization=True)
    cfg_path = target / "adapter_config.json"
    cfg = read_json_object(cfg_path, "adapter config")
    cfg["base_model_name_or_path"] = str(final)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def unwrap_peft(model: nn.Module) -> SavedModel | None:
    if not _is_peft(model):
        return None
    return SavedModel(model=model.get_base_model(), state=base_state(model),
                      write_extra=lambda tmp, final: write_adapter(model, tmp, final), config={ADAPTER_KEY: ADAPTER_DIR})


def attach_adapter(model: nn.Module, folder: Path, config: dict[str, Any]) -> nn.Module:
    """Apply the checkpoint's saved adapter (if config.json names one) to the freshly loaded base."""
    sub = config.get(ADAPTER_KEY)
    if not sub:
        return model
    from peft import PeftModel

    path = Path(folder) / sub
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"checkpoint {str(folder)!r} names adapter folder {sub!r} but {str(path)!r} holds no adapter_config.json")
    peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    peft_model.eval()
    return peft_model


class PeftAdapterFormat(Format):
    name = "peft-adapter"
    summary = "a peft-wrapped model saved as its base plus peft's adapter folder"
    config_keys = (ADAPTER_KEY,)

    def unwrap(self, model: nn.Module) -> SavedModel | None:
        return unwrap_peft(model)

    def finish(self, model: nn.Module, folder: Path, config: dict[str, Any]) -> nn.Module:
        return attach_adapter(model, folder, config)


FORMAT = PeftAdapterFormat()
