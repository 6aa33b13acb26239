"""Mixed per-layer quantization: a plan file gives every linear its own method and grid (e.g. `compress fit`'s plan).

The plan is JSON: {"format": "compress-plan", "version": 1, "label": "...", "layers": {QUALIFIED_NAME: {"method":
"gptq", "bits": 3, "group_size": 64, "sym": false, ...options}}}. In the sequential engine each block's linears are
compressed by their own setting's method (one method object per distinct setting), with the statistics those
methods need gathered once per block; layers the plan does not name stay in float. Only methods that compress one
linear at a time take part (RTN, GPTQ, HQQ): AWQ chooses one scale vector for every linear reading the same input,
so it has no per-linear setting. Each QuantLinear stores its own grid, so the native checkpoint holds the mix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from compress.core.config import MethodConfig, option
from compress.core.errors import ConfigError
from compress.core.readers import read_json_object
from compress.pipeline.method import Method, Needs, build_method, get_method, register

PLAN_FORMAT = "compress-plan"


def per_linear_methods() -> tuple[str, ...]:
    """Methods a plan may name: layer-wise quantizers that compress one linear at a time."""
    return ("rtn", "gptq", "hqq")


def check_layer_method(name: str) -> type[Method]:
    cls = get_method(name)
    if cls.name not in per_linear_methods():
        raise ConfigError(f"method {name!r} cannot be set per linear (it compresses a block or an input group "
                          f"jointly); per-linear methods: {', '.join(per_linear_methods())}")
    return cls


def read_plan(path: str) -> dict[str, Any]:
    plan = read_json_object(path, "plan file")
    layers = plan.get("layers")
    if plan.get("format") != PLAN_FORMAT or not isinstance(layers, dict) or not layers:
        raise ConfigError(f"plan file {path!r} is not a compress plan (needs \"format\": \"{PLAN_FORMAT}\" and a "
                          "non-empty \"layers\" mapping)")
    for lname, setting in layers.items():
        if not isinstance(setting, dict) or "method" not in setting:
            raise ConfigError(f"plan file {path!r}: layer {lname!r} needs a mapping with a 'method' key")
    return plan


def setting_key(setting: dict[str, Any]) -> str:
    return json.dumps(setting, sort_keys=True)


@dataclass
class MixedConfig(MethodConfig):
    plan: str = option("", "JSON plan file: each linear's method and grid (written by `compress fit`)")



@register("mixed", family="quantization", summary="Mixed precision from a plan: each linear its own method and grid",
          paper="per-layer plan (e.g. from `compress fit`: HAWQ-V2, Dong et al. 2020, arXiv 1911.03852)")
class Mixed(Method):
    Config = MixedConfig
    layerwise = True

    def __init__(self, config=None):
        super().__init__(config)
        # without --plan the method is inert (its defaults must build); running it is refused in prepare
        self.plan = read_plan(self.config.plan) if self.config.plan else {"layers": {}}
        self.methods: dict[str, Method] = {}
        for lname, setting in self.plan["layers"].items():
            key = setting_key(setting)
            if key not in self.methods:
                check_layer_method(setting["method"])
                self.methods[key] = build_method(setting["method"], {k: v for k, v in setting.items() if k != "method"})
        subs = list(self.methods.values())
        stats = tuple(sorted({s for m in subs for s in m.stats_needed()}))
        self.needs = Needs(calibration=any(m.needs.calibration for m in subs), stats=stats)
        self.true_sequential = any(m.true_sequential for m in subs)
        self.report = {"plan": self.plan}

    def describe(self) -> str:
        return self.plan.get("label") or f"plan of {len(self.plan['layers'])} layers"

    def prepare(self, model, ctx) -> None:
        if not self.config.plan:
            raise ConfigError("method mixed needs --plan: a JSON plan file (written by `compress fit`)")
        names = {n for n, _ in model.named_modules()}
        unknown = [n for n in self.plan["layers"] if n not in names]
        if unknown:
            raise ConfigError(f"plan file {self.config.plan!r} names layer {unknown[0]!r}, which the model does not have "
                              f"({len(unknown)} unknown)")

    def compress_block(self, block) -> None:
        want = self.stats_needed()
        layers = self.plan["layers"]
        for group in block.linear_groups(self.true_sequential):
            group = [n for n in group if block.qualified(n) in layers]
            if not group:
                continue
            stats = block.collect(group, want) if (want and self.needs.calibration) else {n: None for n in group}
            for name in group:
                qname = block.qualified(name)
                method = self.methods[setting_key(layers[qname])]
                new = method.compress_linear(qname, block.get(name), stats[name] if method.needs.calibration else None)
                if new is not None:
                    block.replace(name, new)
            del stats
        for m in self.methods.values():  # per-layer losses of the sub-methods (GPTQ's), under one key
            for lname, info in (m.report.get("layers") or {}).items():
                self.report.setdefault("layers", {})[lname] = {"method": m.name, **info}
