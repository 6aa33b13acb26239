"""`compress fit`: the most accurate mixed-precision model under a size budget, chosen across methods and per layer.

1. Candidates: every (method x bits x group size) of --fit-methods, --fit-bits, --fit-group-sizes (per-linear
   methods only: rtn, gptq, hqq).
2. Sizes: each candidate's bits as the native checkpoint stores them (the packed codes, float16 scales, packed zero
   points and any group index of a QuantLinear of that layer's shape: compress.evals.size's accounting), and for
   --max-size the exact bytes of the safetensors files the plan writes (a dry write of zero tensors of the plan's
   shapes: embeddings, norms, header and all).
3. Sensitivity of each linear to each candidate, measured on the calibration set with the float model's inputs
   (one observing pass of the sequential engine): the layer's output error under the candidate's compressed weight,
   E_t ||(W - What) x_t||^2 = tr((W - What) H (W - What)^T) / 2 with H = 2/n X^T X (GPTQ eq. 1's objective) —
   `--sensitivity hessian` — or, by default (`fisher`), each output channel's error weighted by the mean squared
   gradient of the language-model loss with respect to that output (the diagonal Fisher of the layer's outputs,
   BRECQ eq. 10, Li et al. 2021, arXiv 2102.05426): dL ~ 1/2 sum_i F_i E_t[dz_ti^2], which puts every layer's error in
   the units of the final loss (HAWQ-V2's idea of a second-order, loss-scaled per-layer cost, arXiv 1911.03852).
   Cached per model, calibration set, candidates and kind.
4. Allocation: an exact multiple-choice knapsack by dynamic programming over discretised size (compress.kernels.
   knapsack; sizes rounded up, so the plan never exceeds the budget); a budget below the smallest plan is one error.
5. Apply: the plan runs as the `mixed` method (each linear its own method and grid) through the ordinary runner:
   evaluation, checkpoint, results record (with the plan, the budget, the predicted and the measured size).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compress.core.errors import ConfigError
from compress.core.paths import atomic_write_bytes, cache_dir
from compress.evals.size import checkpoint_bytes, storage_bits
from compress.formats.base import state_for_saving, write_safetensors
from compress.formats.exporters import check_plan
from compress.kernels.knapsack import BudgetError, multiple_choice_knapsack
from compress.layers.quant_embedding import quantize_embeddings
from compress.layers.quant_linear import QuantLinear
from compress.layers.weights import linear_weight
from compress.model.arch import find_blocks
from compress.model.surgery import is_linear_like, set_module
from compress.pipeline.method import build_method
from compress.pipeline.recipe import RunContext
from compress.runs.results import append_record, results_dir
from compress.runs.runner import _slug, execute, print_summary, validate
from compress.runs.spec import RunSpec
from compress.sources.data import get_calibration
from compress.sources.models import load_model, resolve_device

log = logging.getLogger("compress")

PER_LINEAR = ("rtn", "gptq", "hqq")
SENSITIVITIES = ("fisher", "hessian")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """'80MB' (10^6), '76.3MiB' (2^20), '83886080' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*", str(text), flags=re.I)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-size {text!r} is not a size; write e.g. 80MB (10^6 bytes), 76MiB (2^20) or a byte count")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclass(frozen=True)
class Candidate:
    method: str
    bits: int
    group_size: int
    sym: bool

    def setting(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size, "sym": self.sym}

    def label(self) -> str:
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.method} w{self.bits} {g}{' sym' if self.sym else ''}"


def _ints(values: list[str], flag: str, lo: int, hi: int | None, special: tuple[int, ...] = ()) -> list[int]:
    out = []
    for v in values:
        try:
            n = int(v)
        except ValueError:
            raise ConfigError(f"{flag} {v!r} is not a whole number") from None
        if n not in special and (n < lo or (hi is not None and n > hi)):
            raise ConfigError(f"{flag} {n} is out of range; allowed: {lo}..{hi if hi else ''}"
                              + (f" or {', '.join(map(str, special))}" if special else ""))
        out.append(n)
    if not out:
        raise ConfigError(f"{flag} needs at least one value")
    return sorted(set(out))


def candidates(spec: RunSpec) -> list[Candidate]:
    methods = [m.strip().lower() for m in spec.fit_methods]
    if not methods:
        raise ConfigError("--fit-methods needs at least one method")
    for m in methods:
        if m not in PER_LINEAR:
            why = " (AWQ chooses one scale vector for every linear reading the same input, so it has no per-linear " \
                  "setting)" if m == "awq" else ""
            raise ConfigError(f"--fit-methods {m!r} cannot be set per linear{why}; allowed: {', '.join(PER_LINEAR)}")
    bits = _ints(spec.fit_bits, "--fit-bits", 2, 8)
    groups = _ints(spec.fit_group_sizes, "--fit-group-sizes", 1, None, special=(-1,))
    return [Candidate(m, b, g, spec.fit_sym) for m in dict.fromkeys(methods) for b in bits for g in groups]


def check_fit_options(spec: RunSpec) -> tuple[str, float | int]:
    """('bits', max bits per weight) or ('bytes', max checkpoint bytes), checked before any work."""
    if (spec.max_bits is None) == (spec.max_size is None):
        raise ConfigError("compress fit needs exactly one budget: --max-bits BITS (average bits per weight of the "
                          "decoder-block linears, as stored) or --max-size SIZE (checkpoint bytes on disk, e.g. 80MB)")
    if spec.sensitivity not in SENSITIVITIES:
        raise ConfigError(f"--sensitivity {spec.sensitivity!r} is not allowed; use {' or '.join(SENSITIVITIES)}")
    if spec.frontier is not None and spec.frontier < 1:
        raise ConfigError(f"--frontier {spec.frontier!r} is out of range; allowed: >= 1")
    if spec.max_bits is not None:
        if not (0 < float(spec.max_bits) <= 32):
            raise ConfigError(f"--max-bits {spec.max_bits!r} is out of range; allowed: 0 < bits <= 32")
        return "bits", float(spec.max_bits)
    return "bytes", parse_size(spec.max_size)


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------
def _has_g_idx(cand: Candidate) -> bool:
    # the stored layout of each method's defaults: GPTQ's act-order with static groups stores no group index
    return False


def empty_layer(module: nn.Module, cand: Candidate, device: str = "meta", dtype: torch.dtype = torch.float32) -> QuantLinear:
    from compress.kernels.quant_grid import QuantSpec

    return QuantLinear(module.in_features, module.out_features, QuantSpec(cand.bits, cand.group_size, cand.sym),
                       bias=getattr(module, "bias", None) is not None, has_g_idx=_has_g_idx(cand), dtype=dtype,
                       device=device)


def block_linears(model: nn.Module, ctx: RunContext) -> tuple[dict[str, nn.Module], int, int]:
    """(planned linears by qualified name, weights of every block linear, storage bits of the unplanned ones)."""
    prefix, blocks = find_blocks(model)
    planned: dict[str, nn.Module] = {}
    weights = fixed = 0
    for i, block in enumerate(blocks):
        for n, m in block.named_modules():
            if not n or not is_linear_like(m):
                continue
            q = f"{prefix}.{i}.{n}"
            weights += m.in_features * m.out_features
            if ctx.include(q):
                planned[q] = m
            else:
                fixed += storage_bits(m)
    if not planned:
        raise ConfigError("no linear layer of the decoder blocks is left to fit (check --ignore)")
    return planned, weights, fixed


class DryWriter:
    """Exact bytes on disk of the safetensors files a plan writes: the plan's layers as zero tensors of their stored
    shapes in a copy of the model, written by the checkpoint writer itself into a temporary folder."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], embeddings: str):
        self.model = copy.deepcopy(model)
        if embeddings != "none":
            quantize_embeddings(self.model, int(embeddings))
        self.layers = layers
        self.dtype = next(model.parameters()).dtype

    def nbytes(self, plan: dict[str, Candidate]) -> int:
        for name, cand in plan.items():
            set_module(self.model, name, empty_layer(self.layers[name], cand, device="cpu", dtype=self.dtype))
        with tempfile.TemporaryDirectory(prefix="compress-fit-size-") as d:
            write_safetensors(state_for_saving(self.model), Path(d))
            return checkpoint_bytes(d)


# ---------------------------------------------------------------------------------------------------------------
# Sensitivity
# ---------------------------------------------------------------------------------------------------------------
def output_fisher(model: nn.Module, ids: torch.Tensor, names: list[str], *, batch_size: int, device: torch.device,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of (dL/dz_i)^2 for every output channel i of each named linear, L the summed
    next-token cross-entropy of the float model (the diagonal empirical Fisher of the layer outputs)."""
    acc = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64) for n in names}
    handles = []

    def out_hook(name):
        def grad_hook(g: torch.Tensor) -> None:  # observes the gradient, returns None: the gradient is unchanged
            acc[name].add_(g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu())

        def hook(module, inp, out):
            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook

    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(out_hook(n)))
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    model.to(device)
    ntok = 0
    try:
        with torch.enable_grad():
            for s in tqdm(range(0, ids.shape[0], batch_size), desc="fisher (backward passes)", disable=not progress):
                x = ids[s:s + batch_size].to(device)
                logits = model(input_ids=x, use_cache=False).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         x[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                ntok += x.shape[0] * x.shape[1]
    finally:
        for h in handles:
            h.remove()
        for p, r in saved:
            p.requires_grad_(r)
        model.to("cpu")
    return {n: (a / max(ntok, 1)).float() for n, a in acc.items()}


def _cache_key(model_fp: str, calib: dict, cands: list[Candidate], layers: list[str], kind: str) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "model": model_fp, "calib": calib, "cands": [c.label() for c in cands],
                       "layers": layers, "kind": kind}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def sensitivities(model: nn.Module, ctx: RunContext, layers: dict[str, nn.Module], cands: list[Candidate], kind: str,
                  *, model_fp: str | None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per planned linear, the estimated loss increase of each candidate (see the module docstring)."""
    calib_rec = ctx.calibration.record()
    key = _cache_key(model_fp, calib_rec, cands, sorted(layers), kind) if model_fp else None
    path = cache_dir() / "fit" / f"sensitivity-{key}.json" if key else None
    if path is not None and path.is_file():
        try:
            doc = json.loads(path.read_text())
            if set(doc["losses"]) == set(layers):
                log.info("sensitivities read from the cache %s", path)
                return doc["losses"], {**doc["info"], "cached": str(path)}
        except (OSError, ValueError, KeyError):
            log.warning("ignoring the unreadable sensitivity cache %s", path)
    t0 = time.perf_counter()
    names = list(layers)
    weights = {n: None for n in names}
    if kind == "fisher":
        weights = output_fisher(model, ctx.calibration.input_ids, names, batch_size=min(ctx.batch_size, 4),
                                device=ctx.device, progress=ctx.progress)
    methods = {c: build_method(c.method, {k: v for k, v in c.setting().items() if k != "method"}) for c in cands}
    want = tuple(sorted({"hessian"} | {s for m in methods.values() for s in m.stats_needed()}))
    losses: dict[str, list[float]] = {}

    def on_block(b) -> None:
        targets = [n for n in b.targets() if b.qualified(n) in layers]
        if not targets:
            return
        stats = b.collect(targets, want)
        for n in targets:
            _layer_costs(b, n, stats[n])
        del stats

    @torch.no_grad()
    def _layer_costs(b, n: str, st) -> None:
        q, lin = b.qualified(n), b.get(n)
        W = linear_weight(lin).float()
        H = st.hessian
        F = weights[q].to(W.device) if weights[q] is not None else None
        row = []
        for c in cands:
            m = methods[c]
            new = m.compress_linear(q, lin, st if m.needs.calibration else None)
            D = new.dequantize_weight(torch.float32) - W
            per_row = ((D @ H) * D).sum(dim=1) / 2  # E_t[(dz_i)^2] per output channel
            row.append(float((per_row * F).sum() / 2) if F is not None else float(per_row.sum()))
        losses[q] = row

    ctx.engine(model).observe(on_block, desc=f"sensitivity ({len(cands)} candidates per linear)")
    info = {"kind": kind, "seconds": round(time.perf_counter() - t0, 1), "calibration": calib_rec,
            "definition": ("1/2 sum_i F_i E_t[(dz_ti)^2], F_i the mean squared loss gradient of output i (BRECQ eq. 10)"
                           if kind == "fisher" else "E_t ||(W - What) x_t||^2 = tr(dW H dW^T)/2 (GPTQ eq. 1)"),
            "inputs": "the float model's (one observing pass)"}
    if path is not None:
        atomic_write_bytes(path, json.dumps({"losses": losses, "info": info}).encode())
    return losses, info


# ---------------------------------------------------------------------------------------------------------------
# Allocation
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Sizing:
    layers: dict[str, nn.Module]
    cands: list[Candidate]
    bits: dict[str, list[int]]  # per layer, per candidate: stored bits of the layer's weight
    bias_bits: dict[str, int]
    weights: int  # every block linear's weights (the bits-per-weight denominator)
    fixed_bits: int  # stored bits of block linears left out of the plan
    writer: DryWriter

    @classmethod
    def build(cls, model: nn.Module, ctx: RunContext, cands: list[Candidate], embeddings: str) -> "Sizing":
        layers, weights, fixed = block_linears(model, ctx)
        bits = {n: [empty_layer(m, c).storage_bits() for c in cands] for n, m in layers.items()}
        bias = {n: (m.bias.numel() * m.bias.element_size() * 8 if getattr(m, "bias", None) is not None else 0)
                for n, m in layers.items()}
        return cls(layers, cands, bits, bias, weights, fixed, DryWriter(model, layers, embeddings))

    def plan_of(self, choice: list[int]) -> dict[str, Candidate]:
        return {n: self.cands[j] for n, j in zip(self.layers, choice)}

    def bits_per_weight(self, plan: dict[str, Candidate]) -> float:
        return (self.fixed_bits + sum(self.bits[n][self.cands.index(c)] for n, c in plan.items())) / self.weights

    def smallest(self) -> list[int]:
        return [min(range(len(self.cands)), key=lambda j: b[j]) for b in self.bits.values()]


def allocate(sizing: Sizing, losses: dict[str, list[float]] | None, budget_kind: str, budget: float
             ) -> tuple[dict[str, Candidate], dict[str, Any]]:
    """The least-loss plan within the budget (losses None: only check the budget, return the smallest plan)."""
    names = list(sizing.layers)
    if budget_kind == "bits":
        total = math.floor(budget * sizing.weights) - sizing.fixed_bits
        sizes = [sizing.bits[n] for n in names]
        if losses is None:
            smallest = sum(min(s) for s in sizes)
            if smallest > total:
                raise BudgetError(f"--max-bits {budget:g} is below the smallest possible plan: "
                                  f"{(smallest + sizing.fixed_bits) / sizing.weights:.4f} bits per weight (the smallest "
                                  f"candidate for every layer)")
            return sizing.plan_of(sizing.smallest()), {}
        res = multiple_choice_knapsack(sizes, [losses[n] for n in names], total, what="bits")
        return sizing.plan_of(res.choice), {"unit_bits": res.unit, "exact": res.exact, "loss": res.loss}
    # bytes on disk: the layers' payload plus everything else the files hold (exact, by dry writes)
    sizes = [[-(-(b + sizing.bias_bits[n]) // 8) for b in sizing.bits[n]] for n in names]
    smallest_plan = sizing.plan_of(sizing.smallest())
    smallest_bytes = sizing.writer.nbytes(smallest_plan)
    if smallest_bytes > budget:
        raise BudgetError(f"--max-size {int(budget)} bytes is below the smallest possible plan: {smallest_bytes} bytes "
                          f"({smallest_bytes / 1e6:.2f} MB) on disk")
    if losses is None:
        return smallest_plan, {}
    payload_min = sum(s[j] for s, j in zip(sizes, sizing.smallest()))
    other = smallest_bytes - payload_min  # embeddings, norms, header, ...
    target = int(budget) - other
    for _ in range(8):
        res = multiple_choice_knapsack(sizes, [losses[n] for n in names], target, what="bytes")
        plan = sizing.plan_of(res.choice)
        exact = sizing.writer.nbytes(plan)
        if exact <= budget:
            return plan, {"unit_bytes": res.unit, "exact": res.exact, "loss": res.loss, "predicted_bytes": exact}
        target -= exact - int(budget)  # the header grew with the plan's shapes: take it off the payload budget
    raise ConfigError(f"could not fit the plan's header into --max-size {int(budget)} bytes")


# ---------------------------------------------------------------------------------------------------------------
# The verb
# ---------------------------------------------------------------------------------------------------------------
def _budget_text(kind: str, value: float) -> str:
    return f"{round(value, 4):g} bpw" if kind == "bits" else f"{value / 1e6:.2f} MB"


def write_plan(plan: dict[str, Candidate], label: str, path: Path, meta: dict[str, Any]) -> Path:
    doc = {"format": "compress-plan", "version": 1, "label": label, **meta,
           "layers": {n: c.setting() for n, c in plan.items()}}
    atomic_write_bytes(path, json.dumps(doc, indent=1).encode())
    return path


def fit(spec: RunSpec, console=None) -> list[dict[str, Any]]:
    """Run `compress fit`: one record per budget (one, or --frontier N of them). Returns the records."""
    budget_kind, budget = check_fit_options(spec)
    cands = candidates(spec)
    top_label = _budget_text(budget_kind, budget)
    model_slug = _slug(Path(spec.model).name) or "model"
    base_out = spec.output or str(Path("checkpoints") / f"{model_slug}-fit-{_slug(top_label)}")
    probe = copy.copy(spec)
    probe.stages = [{"method": "mixed"}]
    probe.output = base_out
    validate(probe)  # output folder, data, model files, exports, store: before any work
    for fmt in spec.exports:  # every grid the plan may choose must fit the export
        check_plan(fmt, [(c.method, {k: v for k, v in c.setting().items() if k != "method"}) for c in cands],
                   spec.to_dict())
    device = resolve_device(spec.device)
    loaded = load_model(spec.model, dtype=spec.dtype, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    ctx = RunContext(tokenizer=tok, device=device, data_dir=spec.data_dir, seed=spec.seed, batch_size=spec.batch_size,
                     spill=spec.spill, ignore=list(spec.ignore), progress=spec.progress, model_spec=spec.model,
                     model_dtype=next(model.parameters()).dtype)
    sizing = Sizing.build(model, ctx, cands, spec.quantize_embeddings)
    allocate(sizing, None, budget_kind, budget)  # a budget below the smallest plan: one line, before any work
    if spec.frontier:
        lo_plan = sizing.plan_of(sizing.smallest())
        lo = sizing.bits_per_weight(lo_plan) if budget_kind == "bits" else sizing.writer.nbytes(lo_plan)
        budgets = [lo + (budget - lo) * k / spec.frontier for k in range(1, spec.frontier + 1)]
    else:
        budgets = [budget]
    calib = get_calibration(spec.calib, tok, nsamples=spec.nsamples, seqlen=spec.seqlen, seed=spec.seed,
                            data_dir=spec.data_dir, model=model, fallback=spec.data_dir is None)
    ctx.calibration = calib
    losses, sens_info = sensitivities(model, ctx, sizing.layers, cands, spec.sensitivity, model_fp=loaded.fingerprint)
    del model, loaded
    records = []
    plans_dir = results_dir(spec.results_dir) / "plans"
    for b in budgets:
        plan, alloc = allocate(sizing, losses, budget_kind, b)
        predicted_bytes = alloc.get("predicted_bytes") or sizing.writer.nbytes(plan)
        predicted_bpw = sizing.bits_per_weight(plan)
        methods = "+".join(dict.fromkeys(c.method for c in cands))
        label = f"fit {_budget_text(budget_kind, b)} {methods} {spec.sensitivity}"
        counts: dict[str, int] = {}
        for c in plan.values():
            counts[c.label()] = counts.get(c.label(), 0) + 1
        stamp = hashlib.sha256(json.dumps({n: c.label() for n, c in plan.items()}, sort_keys=True).encode()).hexdigest()[:10]
        plan_path = write_plan(plan, label, plans_dir / f"plan-{_slug(label)}-{stamp}.json",
                               {"budget": {"kind": budget_kind, "value": b}, "sensitivity": spec.sensitivity})
        log.info("plan for %s: %s; predicted %.4f bits per weight, %d bytes on disk", _budget_text(budget_kind, b),
                 ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())), predicted_bpw, predicted_bytes)
        run = copy.copy(spec)
        run.kind = "fit"
        run.stages = [{"method": "mixed", "plan": str(plan_path)}]
        run.output = base_out if len(budgets) == 1 else f"{base_out}-{_slug(_budget_text(budget_kind, b))}"
        run.tag = run.tag or "fit"
        record = execute(run, console=None, store=False)
        size = record.get("size") or {}
        measured = {"bits_per_weight": size.get("bits_per_weight"), "checkpoint_bytes": size.get("checkpoint_bytes")}
        meets = (predicted_bpw <= b and (measured["bits_per_weight"] or 0) <= b + 5e-5) if budget_kind == "bits" else (
            measured["checkpoint_bytes"] is not None and measured["checkpoint_bytes"] <= b)
        record["fit"] = {
            "budget": {"kind": budget_kind, "value": b,
                       "unit": "bits per weight of the decoder-block linears as stored" if budget_kind == "bits"
                       else "bytes of the checkpoint's safetensors files"},
            "allocator": "exact multiple-choice knapsack, dynamic programming over discretised size (sizes rounded up)",
            "allocation": alloc,
            "candidates": [c.label() for c in cands],
            "sensitivity": sens_info,
            "plan_file": str(plan_path),
            "plan_counts": counts,
            "predicted": {"bits_per_weight": round(predicted_bpw, 6), "checkpoint_bytes": predicted_bytes},
            "measured": measured,
            "meets_budget": bool(meets),
        }
        if measured["checkpoint_bytes"] is not None and measured["checkpoint_bytes"] != predicted_bytes:
            log.warning("checkpoint bytes %s differ from the plan's predicted %s", measured["checkpoint_bytes"],
                        predicted_bytes)
        if not meets:
            log.error("the written checkpoint exceeds the budget %s", _budget_text(budget_kind, b))
        record["_store"] = str(append_record(record, spec.results_dir))
        if console is not None:
            print_summary(record, console)
            console.print(f"fit: budget {_budget_text(budget_kind, b)}; plan {', '.join(f'{k} x{v}' for k, v in sorted(counts.items()))}; "
                          f"stored {measured['bits_per_weight']} bits per weight, {measured['checkpoint_bytes']} bytes on disk "
                          f"(predicted {predicted_bytes}); {'within' if meets else 'OVER'} the budget; plan {plan_path}")
        records.append(record)
    return records
