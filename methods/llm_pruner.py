"""LLM-Pruner (Ma et al. 2023, arXiv 2305.11627): structural pruning of a decoder model in three stages.

1. Discovery (Sec. 3.1): the dependency groups of every block, from its traced data flow (compress.sparse.structured): an
   attention head group couples rows of q/k/v with columns of o (under grouped-query attention: a KV head with its
   query heads, or query heads only, equally in every KV group: --gqa), an MLP channel couples a row of gate/up
   (OPT: fc1) with a column of down (fc2); the channel strategy couples one hidden channel across the whole model.
2. Estimation (Sec. 3.2): importance of every group from the loss gradient on a few calibration sequences,
   first-order Taylor |w * dL/dw| element-wise (eq. 4) or per member as a vector (eq. 3), optionally with the
   second-order term 1/2 w^2 F_kk where the diagonal Fisher F stands in for the Hessian (eq. 5); members aggregated by
   sum, product, max or last. Structured magnitude (L2 or L1 of the group) and random scores are the baselines.
3. Recovery (Sec. 3.3): LoRA on every linear for a short budget, merged back into the pruned weights.

The pruned model is physically smaller. --ratio is the share of the model's *total* parameter count removed: the
pruned blocks lose more (they make up for the untouched embeddings and the kept first/last blocks); both are
reported. Every pruned block loses the same share (the paper's local pruning): attention in whole head groups
(rounded), MLP channels making up the rest exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compress.core.config import option
from compress.core.errors import CompressError, ConfigError
from compress.layers.weights import count_parameters
from compress.pipeline.method import Method, Needs, register
from compress.sparse.structured import (
    AGGREGATIONS,
    aggregate,
    allocate,
    attention_coupled,
    check_hidden_separable,
    choose_keep,
    config_updates,
    describe_config,
    discover,
    heads_after,
    hidden_coupled,
    layer_shapes,
    lm_gradients,
    mlp_coupled,
    remove_units,
    unit_scores,
)
from compress.train.lora import LoraOptions, add_lora, merge_lora, train_adapters
from compress.train.trainer import TrainConfig, training_data

log = logging.getLogger("compress")

PAPER_KEEP_FIRST, PAPER_KEEP_LAST = 4, 2  # the paper prunes LLaMA-7B's blocks 4..29 of 32


@dataclass
class LLMPrunerConfig(LoraOptions):
    ratio: float = option(0.2, "share of the model's total parameter count to remove (the pruned blocks lose more)",
                          range=(0.01, 0.9))
    structure: str = option("block", "block: attention heads and MLP channels inside blocks; channel: hidden "
                            "(residual-stream) channels of the whole model", choices=("block", "channel"))
    importance: str = option("taylor", "group importance: taylor (LLM-Pruner), magnitude (squared L2 of the group), "
                             "magnitude-l1 (L1 of the group), random", choices=("taylor", "magnitude", "magnitude-l1", "random"))
    taylor: str = option("element1", "Taylor estimate: element1 (first order per weight, eq. 4), element2 (plus the "
                         "diagonal-Fisher second-order term, eq. 4-5), vector (first order per member, eq. 3)",
                         choices=("element1", "element2", "vector"))
    aggregation: str = option("sum", "group importance from its members' importances", choices=AGGREGATIONS)
    gqa: str = option("kv", "grouped-query attention: kv removes a KV head with all its query heads; query removes "
                      "query heads only, the same number from every KV group", choices=("kv", "query"))
    keep_first: int | None = option(None, "first blocks left unpruned", range=(0, None),
                                    special={None: f"{PAPER_KEEP_FIRST}, or 0 with --uniform / --structure channel"})
    keep_last: int | None = option(None, "last blocks left unpruned", range=(0, None),
                                   special={None: f"{PAPER_KEEP_LAST}, or 0 with --uniform / --structure channel"})
    round_to: int = option(8, "kept MLP width is a multiple of this (aligned widths run faster); 1: exact", range=(1, 1024))
    uniform: bool = option(False, "prune every block alike (no kept blocks): a standard transformers config that "
                           "AutoModelForCausalLM loads")
    recovery_steps: int = option(0, "LoRA recovery optimizer steps after pruning (0: no recovery)", range=(0, None))
    recovery_lr: float = option(1e-4, "LoRA recovery peak learning rate", range=(0.0, 1.0))
    recovery_batch_size: int = option(4, "LoRA recovery sequences per step", range=(1, None))
    recovery_samples: int = option(256, "LoRA recovery training sequences", range=(1, None))
    recovery_seqlen: int = option(256, "tokens per LoRA recovery sequence", range=(2, None))
    recovery_data: str | None = option(None, "text source for LoRA recovery (default: the calibration source)")

    def check(self) -> None:
        for name in ("keep_first", "keep_last"):
            value = getattr(self, name)
            if value and self.uniform:
                raise ConfigError(f"--{name.replace('_', '-')} {value} contradicts --uniform (every block pruned alike)")
            if value and self.structure == "channel":
                raise ConfigError(f"--{name.replace('_', '-')} {value} does not apply to --structure channel "
                                  "(hidden channels run through every block)")

    def kept(self, blocks: int) -> tuple[int, int]:
        if self.uniform or self.structure == "channel":
            return 0, 0
        first = PAPER_KEEP_FIRST if self.keep_first is None else self.keep_first
        last = PAPER_KEEP_LAST if self.keep_last is None else self.keep_last
        if first + last >= blocks:
            raise ConfigError(f"--keep-first {first} and --keep-last {last} leave none of the model's {blocks} blocks "
                              "to prune; lower them (or use --uniform)")
        return first, last

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=max(1, self.recovery_steps), lr=self.recovery_lr, train_batch_size=self.recovery_batch_size,
                           train_samples=self.recovery_samples, train_seqlen=self.recovery_seqlen)


@register("llm-pruner", family="pruning", paper="Ma et al. 2023, arXiv 2305.11627",
          summary="LLM-Pruner: remove whole heads / MLP channels by Taylor importance, LoRA recovery; a smaller dense model")
class LLMPruner(Method):
    Config = LLMPrunerConfig
    needs = Needs(calibration=True, gradients=True)

    def __init__(self, config: LLMPrunerConfig | None = None):
        super().__init__(config)
        data = self.config.importance == "taylor" or self.config.recovery_steps > 0
        self.needs = Needs(calibration=data, gradients=data)

    def describe(self) -> str:
        c = self.config
        parts = [f"r{c.ratio:g}", c.importance + (f"-{c.taylor}" if c.importance == "taylor" else ""), c.structure]
        if c.uniform:
            parts.append("uniform")
        if c.recovery_steps:
            parts.append(f"lora{c.recovery_steps}")
        return " ".join(parts)

    # ---- stage 1: discovery ------------------------------------------------------------------------------------
    def _couplings(self, model, ctx, prefix, layouts):
        c = self.config
        if c.structure == "channel":
            check_hidden_separable(model, layouts)
            return [], [], [hidden_coupled(model, prefix, layouts)]
        first, last = c.kept(len(layouts))
        attn, mlp = [], []
        for i in range(first, len(layouts) - last):
            a, m = attention_coupled(prefix, i, layouts[i], c.gqa), mlp_coupled(prefix, i, layouts[i])
            for co, into in ((a, attn), (m, mlp)):
                if all(ctx.include(mem.module) for mem in co.members):
                    into.append(co)
        return attn, mlp, []

    # ---- stage 2: estimation -----------------------------------------------------------------------------------
    def _salience(self, model, ctx, couplings):
        """(per-element salience function, level) for the configured importance; None for random scores."""
        c = self.config
        if c.importance == "random":
            return None, "element"
        if c.importance == "magnitude":
            return (lambda name, p: p.detach().float() ** 2), "element"  # the group's squared L2 norm
        if c.importance == "magnitude-l1":
            return (lambda name, p: p.detach().float().abs()), "element"  # the group's L1 norm
        if ctx.calibration is None:
            raise CompressError("llm-pruner --importance taylor needs calibration data (--calib)")
        params = {}
        names = {id(p): n for n, p in model.named_parameters()}
        for co in couplings:
            for mem in co.members:
                mod = model.get_submodule(mem.module)
                for p in (mod.weight, getattr(mod, "bias", None)):
                    if isinstance(p, torch.nn.Parameter):
                        params[names[id(p)]] = p
        ids = ctx.calibration.input_ids
        log.info("llm-pruner: loss gradients on %d calibration sequences of %d tokens%s", ids.shape[0], ids.shape[1],
                 " (one backward pass per sequence for the Fisher term)" if c.taylor == "element2" else "")
        grad, fisher = lm_gradients(model, ids, params, fisher=c.taylor == "element2", device=ctx.device,
                                    progress=ctx.progress)

        def salience(name, p):
            w = p.detach().float()
            s = w * grad[name]  # first-order Taylor term dL/dW_k * W_k (eq. 3-4)
            if fisher is not None:
                s = s - 0.5 * w * fisher[name] * w  # second-order term, H_kk ~ diagonal Fisher (eq. 4-5)
            return s

        return salience, ("vector" if c.taylor == "vector" else "element")

    def _scores(self, model, ctx, couplings):
        salience, level = self._salience(model, ctx, couplings)
        gen = torch.Generator().manual_seed(ctx.seed)
        out = []
        for co in couplings:
            if salience is None:
                out.append(torch.rand(co.units, generator=gen, dtype=torch.float64))
            else:
                out.append(aggregate(unit_scores(model, co, salience, level), self.config.aggregation))
        return out

    # ---- the three stages --------------------------------------------------------------------------------------
    def apply(self, model, ctx):
        c = self.config
        prefix, layouts = discover(model)
        before = count_parameters(model)
        shapes_before = layer_shapes(layouts)
        attn, mlp, hidden = self._couplings(model, ctx, prefix, layouts)
        if hidden:
            removals = [self._hidden_removal(model, hidden[0], layouts, before)]
            inner = removals[0] / hidden[0].units
        else:
            accept = None
            if c.uniform and attn:  # only head counts the family's config accepts (a standard config is the point)
                lay, co0 = layouts[attn[0].block], attn[0]

                def accept(steps):
                    heads, kv_heads = heads_after(lay, co0, steps)
                    return config_updates(model, {"heads": heads, "kv_heads": kv_heads}, lay.head_dim) is not None
            alloc = allocate(c.ratio, before, [(co, co.unit_cost(model)) for co in attn],
                             [(co, co.unit_cost(model)) for co in mlp], accept=accept, round_to=c.round_to)
            removals = [alloc.attention_remove] * len(attn) + [alloc.mlp_remove] * len(mlp)
            inner = alloc.inner_ratio
        couplings = attn + mlp + hidden
        model.to(ctx.device)
        try:
            scores = self._scores(model, ctx, couplings)
        finally:
            model.to("cpu")
        for co, sc, rm in zip(couplings, scores, removals):  # every score first, then the removals
            remove_units(model, co, choose_keep(sc, co, rm), prefix=prefix, layouts=layouts)
        config_kind = describe_config(model, prefix, layouts)
        after = count_parameters(model)
        pruned = sorted({co.block for co in attn + mlp})
        self.report = {
            "params_before": before, "params_after": after, "ratio_requested": c.ratio,
            "ratio_total": round((before - after) / before, 5), "ratio_inside_pruned_blocks": round(inner, 5),
            "structure": c.structure, "pruned_blocks": pruned, "config": config_kind,
            "layers_before": shapes_before[0], "layers": layer_shapes(layouts),
            "hidden_size": int(model.get_input_embeddings().weight.shape[1]),
        }
        if hidden:
            log.info("llm-pruner: %d of %d hidden channels removed: %s of the model; config: %s", removals[0],
                     hidden[0].units, self._params_line(before, after), config_kind)
        else:
            s0, s1 = shapes_before[pruned[0]], layer_shapes(layouts)[pruned[0]]
            log.info("llm-pruner: %s; blocks %d-%d lose %.1f%% of their attention+MLP parameters (heads %d->%d, KV heads "
                     "%d->%d, MLP channels %d->%d); config: %s", self._params_line(before, after), pruned[0], pruned[-1],
                     100 * inner, s0["heads"], s1["heads"], s0["kv_heads"], s1["kv_heads"], s0["channels"],
                     s1["channels"], config_kind)
        if c.recovery_steps > 0:
            model = self._recover(model, ctx)
        return model

    def _hidden_removal(self, model, coupled, layouts, before: int) -> int:
        """Hidden channels to remove: the count nearest `ratio` of the parameters whose size the config accepts."""
        want = self.config.ratio * before / coupled.unit_cost(model)
        hidden = coupled.units
        for d in sorted(range(1, hidden), key=lambda d: (abs(d - want), d)):
            if config_updates(model, {"hidden": hidden - d}, layouts[0].head_dim) is not None:
                return d
        raise CompressError(f"{type(model.config).__name__} accepts no smaller hidden size")

    @staticmethod
    def _params_line(before: int, after: int) -> str:
        return f"{before:,} -> {after:,} parameters (-{100 * (before - after) / before:.2f}%)"

    # ---- stage 3: recovery -------------------------------------------------------------------------------------
    def _recover(self, model, ctx):
        c = self.config
        tc = c.train_config()
        data = training_data(ctx, model, tc, source=c.recovery_data)
        log.info("llm-pruner: LoRA recovery (r=%d) for %d steps on %d sequences of %d tokens", c.lora_r, c.recovery_steps,
                 data.shape[0], data.shape[1])
        model.to(ctx.device)
        peft_model = add_lora(model, c)
        self.report["recovery"] = train_adapters(peft_model, ctx, tc, data, None, desc="LoRA recovery")
        return merge_lora(peft_model).to("cpu")
