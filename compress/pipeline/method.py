"""The method registry: every compression method is one class in one file under methods/, registered by name.

A method declares its family, a one-line summary, the paper it implements, a typed config (compress.core.config) and
what it needs (calibration data, per-linear statistics, gradients, a teacher). Two shapes of method exist:

* layer-wise methods (`layerwise = True`) run inside the sequential engine: for every decoder block the engine
  gathers the statistics they ask for and calls `compress_block` (by default: `compress_linear` per linear);
* model-level methods (training, structured pruning, distillation) implement `apply(model, ctx)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import logging

from compress.core.config import MethodConfig
from compress.core.errors import CompressError, ConfigError
from compress.core.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn
# The engine's BlockContext and the recipe's RunContext, which the hooks below receive, are named in annotations
# only: they build on this contract (compress.pipeline.engine, compress.pipeline.recipe), not the other way round.

log = logging.getLogger("compress")

FAMILIES = ("quantization", "pruning", "training-aware", "distillation")
STATS = ("hessian", "input_norms", "input_absmax")


@dataclass(frozen=True)
class Needs:
    """What a method needs from the run."""

    calibration: bool = False  # calibration token sequences
    stats: tuple[str, ...] = ()  # per-linear input statistics gathered by the engine (see STATS)
    gradients: bool = False  # backward passes through the model
    teacher: bool = False  # a teacher model (distillation)

    def describe(self) -> str:
        parts = []
        if self.calibration:
            parts.append("calibration")
        parts += list(self.stats)
        if self.gradients:
            parts.append("gradients")
        if self.teacher:
            parts.append("teacher")
        return ", ".join(parts) or "nothing"


class Method:
    """Base class of all methods. Subclasses set the class attributes and implement one of the two APIs."""

    name: str = ""
    family: str = ""
    summary: str = ""
    paper: str = ""
    Config: type[MethodConfig] = MethodConfig
    needs: Needs = Needs()
    layerwise: bool = False
    # Options --paper-protocol sets where a stage does not: the reference code's choices behind the paper's numbers.
    paper_options: dict[str, Any] = {}
    # True-sequential order inside a block (GPTQ's option): gather statistics group by group, each group seeing the
    # already-compressed outputs of the groups before it. Methods may ignore it.
    true_sequential: bool = False
    # Mixture-of-experts weights: True where the method compresses each expert matrix as a linear (the recipe splits
    # fused experts into one linear per expert matrix first, compress.layers.experts; hooks then see the tokens routed
    # to each expert). Other weight methods refuse a model with fused experts before any work.
    handles_experts: bool = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.Config()
        self.config.validate()
        # Per-layer facts the method wants in the results record (outlier fractions, sparsities, losses...).
        self.report: dict[str, Any] = {}

    # ---- shared ---------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """Short setting label for tables and plots, e.g. 'w4 g128'."""
        return ""

    def prepare(self, model: "nn.Module", ctx: "RunContext") -> None:
        """Called once before the engine pass (e.g. OWL's whole-model outlier scan)."""

    def finalize(self, model: "nn.Module", ctx: "RunContext") -> "nn.Module":
        """Called once after the engine pass; may return a new model."""
        return model

    # ---- layer-wise API -------------------------------------------------------------------------------------
    def stats_needed(self) -> tuple[str, ...]:
        return self.needs.stats

    def compress_block(self, block: "BlockContext") -> None:
        """Compress one decoder block. Default: gather stats per (true-)sequential group, then each linear."""
        want = self.stats_needed()
        for group in block.linear_groups(self.true_sequential):
            stats = block.collect(group, want) if (want and self.needs.calibration) else {n: None for n in group}
            last = {id(s): n for n, s in stats.items() if s is not None}  # linears sharing statistics: the last reader
            for name in group:
                s = stats[name]
                if s is not None:
                    s.last_use = last[id(s)] == name  # a sweep may then take and free its Hessian
                if s is not None and s.ntokens == 0:  # an expert the router sent no calibration token
                    new = self.unrouted_linear(block.qualified(name), block.get(name))
                else:
                    new = self.compress_linear(block.qualified(name), block.get(name), s)
                if new is not None:
                    block.replace(name, new)
            del stats

    def compress_linear(self, name: str, linear: "nn.Module", stats: Any) -> "nn.Module | None":
        raise NotImplementedError(f"{self.name} must implement compress_linear or compress_block")

    def unrouted_linear(self, name: str, linear: "nn.Module") -> "nn.Module | None":
        """A linear that received no calibration token (an MoE expert the router never picked on the calibration
        set): reported, then compressed by the method's data-free fallback (`compress_unrouted`)."""
        self.report.setdefault("unrouted", []).append(name)
        log.warning("%s: %s received no calibration token; %s", self.name, name, self.unrouted_fallback)
        return self.compress_unrouted(name, linear)

    unrouted_fallback: str = "no fallback"

    def compress_unrouted(self, name: str, linear: "nn.Module") -> "nn.Module | None":
        raise CompressError(f"{name} received no calibration token and {self.name} has no data-free fallback")

    # ---- model-level API ------------------------------------------------------------------------------------
    def apply(self, model: "nn.Module", ctx: "RunContext") -> "nn.Module":
        raise NotImplementedError(f"{self.name} is layer-wise; it runs through the engine")


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


# Every method, lazily: one file per method under methods/ (compress.methods), imported on first use. A method's
# own module declares its family, summary and paper with @register; the entry here only says where it lives.
METHODS: Registry[type[Method]] = Registry("method", {
    name: f"compress.methods.{name.replace('-', '_')}:{cls}" for name, cls in {
        "rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "hqq": "HQQ", "owq": "OWQ", "llm-int8": "LLMInt8", "smoothquant": "SmoothQuant",
        "rotate": "Rotate", "autoround": "AutoRound",
        "mixed": "Mixed",
        "magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "owl": "OWL", "llm-pruner": "LLMPruner",
        "qat": "QAT", "peqa": "PEQA", "llm-qat": "LLMQAT", "qlora": "QLoRA", "lora": "LoraRecovery",
        "distill": "Distill",
    }.items()
}, normalize=_key)


def register(name: str, *, family: str, summary: str, paper: str = "") -> Callable[[type[Method]], type[Method]]:
    """Class decorator: `@register("gptq", family="quantization", summary="...", paper="arXiv 2210.17323")`."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")

    def deco(cls: type[Method]) -> type[Method]:
        for stat in cls.needs.stats:
            if stat not in STATS:
                raise ValueError(f"{name}: unknown statistic {stat!r}; known: {STATS}")
        cls.name, cls.family, cls.summary, cls.paper = name, family, summary, paper
        METHODS.register(name)(cls)
        return cls

    return deco


def all_methods() -> dict[str, type[Method]]:
    """Every method, imported, in family order."""
    return dict(sorted(METHODS.items(), key=lambda kv: (FAMILIES.index(kv[1].family), kv[0])))


def get_method(name: str) -> type[Method]:
    cls = METHODS.get(name)
    if cls.name != _key(name):
        raise ConfigError(f"method {name!r} resolves to {cls.__module__}.{cls.__name__}, registered as {cls.name!r}")
    return cls


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    cls = get_method(name)
    cfg = cls.Config.from_dict(options or {}, method=cls.name)
    return cls(cfg)
