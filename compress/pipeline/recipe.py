"""Recipes: methods composed in order (SmoothQuant then GPTQ, Wanda then GPTQ, prune then distill, ...).

Consecutive layer-wise methods share one pass of the sequential engine: for every block, each method compresses it
in turn (the later ones see the earlier ones' result), then the block's outputs are recomputed once. Model-level
methods (training, structured pruning, distillation) run on the whole model between such passes.

A recipe is a list of stages, each `{"method": NAME, **options}`; in YAML:

    stages:
      - {method: smoothquant, alpha: 0.5, smooth_only: true}   # the smoothing transform alone
      - {method: gptq, bits: 4, group_size: 128}
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.core.errors import CompressError, ConfigError
from compress.core.readers import read_yaml
from compress.layers.experts import fused_experts_modules, fused_to_split
from compress.layers.kernels import select_kernels
from compress.formats.base import record_stages
from compress.pipeline.engine import Engine
from compress.pipeline.method import Method, all_methods, build_method

log = logging.getLogger("compress")


@dataclass
class RunContext:
    """What methods may use besides the model: tokenizer, calibration data, devices, engine settings, teacher."""

    tokenizer: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    calibration: Any = None  # compress.sources.data.Calibration
    data_dir: str | None = None
    seed: int = 0
    batch_size: int = 8
    spill: str = "auto"
    spill_dir: str | None = None
    ignore: list[str] = field(default_factory=list)
    progress: bool = True
    model_spec: str = ""
    model_dtype: torch.dtype = torch.float32
    teacher: Any = None  # a LoadedModel or a model, for distillation-style stages (see teacher_model)
    extras: dict[str, Any] = field(default_factory=dict)

    def teacher_model(self) -> torch.nn.Module | None:
        """The teacher as a model: the --teacher the runner loaded, else the frozen copy of the uncompressed model
        that Recipe.run keeps when a stage declares needs.teacher."""
        if self.teacher is None or isinstance(self.teacher, torch.nn.Module):
            return self.teacher
        return self.teacher.model

    def include(self, name: str) -> bool:
        return not any(re.search(p, name) for p in self.ignore)

    def engine(self, model: torch.nn.Module):
        ids = self.calibration.input_ids if self.calibration is not None else None
        return Engine(model, ids, device=self.device, batch_size=self.batch_size, spill=self.spill,
                      spill_dir=self.spill_dir, include=self.include, progress=self.progress)


WEIGHT_FAMILIES = ("quantization", "pruning")


def experts_refusers(stages: list[Method]) -> list[str]:
    """Weight-compressing stages that cannot compress mixture-of-experts expert matrices."""
    return [m.name for m in stages if m.family in WEIGHT_FAMILIES and not m.handles_experts]


def expert_methods() -> list[str]:
    """Names of the methods that compress expert matrices (imports every method: for error messages)."""
    return [n for n, cls in all_methods().items() if cls.handles_experts]


def _split_experts_for(group: list[Method], model: torch.nn.Module) -> None:
    """Before a layer-wise pass that compresses weights: fused experts become one linear per expert matrix, or the
    pass stops if one of its methods cannot compress them (never a silent 16-bit skip)."""
    fused = fused_experts_modules(model)
    if not fused or not any(m.family in WEIGHT_FAMILIES for m in group):
        return
    refusing = experts_refusers(group)
    if refusing:
        first = next(iter(fused))
        raise CompressError(f"{first}.gate_up_proj (and the other experts of {len(fused)} blocks) are fused "
                            f"mixture-of-experts weights, which {', '.join(refusing)} cannot compress; methods that "
                            f"compress experts: {', '.join(expert_methods())}")
    fused_to_split(model)
    log.info("mixture of experts: %d fused experts modules split into one linear per expert matrix", len(fused))


class Recipe:
    def __init__(self, stages: list[Method]):
        if not stages:
            raise ConfigError("a recipe needs at least one stage")
        self.stages = stages

    @classmethod
    def from_specs(cls, specs: list[dict[str, Any]]) -> "Recipe":
        stages = []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict) or "method" not in spec:
                raise ConfigError(f"recipe stage {i + 1} must be a mapping with a 'method' key, got {spec!r}")
            opts = {k: v for k, v in spec.items() if k != "method"}
            stages.append(build_method(str(spec["method"]), opts))
        return cls(stages)

    @classmethod
    def from_yaml(cls, path: str | Path) -> tuple["Recipe", dict[str, Any]]:
        """Read a recipe file: `stages:` plus optional run settings (model, calib, nsamples, ...). Returns the recipe
        and the file's mapping (the stages as written, and the settings)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file {str(path)!r} does not exist")
        doc = read_yaml(p, "recipe file") or {}
        if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list):
            raise ConfigError(f"recipe file {str(path)!r} needs a 'stages:' list")
        return cls.from_specs(doc["stages"]), doc

    # ------------------------------------------------------------------------------------------------------------
    @property
    def needs_calibration(self) -> bool:
        return any(s.needs.calibration for s in self.stages)

    @property
    def family(self) -> str:
        return self.stages[-1].family if len(self.stages) == 1 else "recipe"

    @property
    def method_name(self) -> str:
        return "+".join(s.name for s in self.stages)

    def label(self) -> str:
        return " -> ".join(f"{s.name}({s.describe()})" if s.describe() else s.name for s in self.stages)

    def specs(self) -> list[dict[str, Any]]:
        return [{"method": s.name, "family": s.family, "config": s.config.to_dict()} for s in self.stages]

    def run(self, model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
        if ctx.teacher is None and any(s.needs.teacher for s in self.stages):
            # Recovery stages (KD after pruning or quantization) learn from the model the run started from.
            import copy

            log.info("keeping a frozen copy of the uncompressed model as the teacher")
            ctx.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        i = 0
        while i < len(self.stages):
            stage = self.stages[i]
            if stage.layerwise:
                group = [stage]
                while i + len(group) < len(self.stages) and self.stages[i + len(group)].layerwise:
                    group.append(self.stages[i + len(group)])
                _split_experts_for(group, model)
                for m in group:
                    m.prepare(model, ctx)
                log.info("sequential pass: %s", " + ".join(m.name for m in group))
                ctx.engine(model).run(group, desc=" + ".join(m.name for m in group))
                for m in group:
                    model = m.finalize(model, ctx)
                i += len(group)
            else:
                log.info("stage: %s", stage.name)
                stage.prepare(model, ctx)
                model = stage.apply(model, ctx)
                model = stage.finalize(model, ctx)
                i += 1
        select_kernels(model)  # the compressed layers' integer kernels (or their fallback), said on screen
        record_stages(model, self.specs())  # what the exports write as the run's settings (GPTQ quantize_config)
        return model

    def report(self) -> dict[str, Any]:
        """Each stage's report under its method name; the second stage of one method is `name#2`, and so on."""
        out: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for s in self.stages:
            seen[s.name] = seen.get(s.name, 0) + 1
            if s.report:
                out[s.name if seen[s.name] == 1 else f"{s.name}#{seen[s.name]}"] = s.report
        return out
