"""The sequential layer-wise engine: the one loop over decoder blocks that every layer-wise method runs in.

    capture the inputs of block 0 for the whole calibration set (one activation cache, [N, L, D])
    for each block i:
        move block i to the compute device
        for each method of the pass: gather the statistics it asks for on block i's linears (forward hooks:
            Hessian 2 X^T X, per-input-channel norms, abs-max), let it compress the block
        recompute block i's outputs with its compressed weights -> inputs of block i+1

Peak memory is one block's activations for the calibration set (two caches: inputs and outputs), kept in the
model's compute dtype, spilled to a memory-mapped file when they would not fit in RAM. On a GPU the model stays on
the CPU and one block at a time visits the GPU.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compress.kernels.hessian import HessianSource
from compress.model.arch import BlockGraph, ChannelFeed, channel_producers, find_blocks, trace_block
from compress.model.surgery import is_linear_like, set_module

if TYPE_CHECKING:  # pragma: no cover
    from compress.pipeline.method import Method

log = logging.getLogger("compress")


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1024 or unit == "TB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"


# ---------------------------------------------------------------------------------------------------------------
# Activation cache
# ---------------------------------------------------------------------------------------------------------------
class ActivationCache:
    """Hidden states [N, L, D] of the calibration set in the compute dtype: a tensor in RAM, or a memory-mapped file."""

    def __init__(self, n: int, seqlen: int, hidden: int, dtype: torch.dtype, *, spill_dir: str | os.PathLike | None = None):
        self.shape = (n, seqlen, hidden)
        self.dtype = dtype
        self.path: Path | None = None
        if spill_dir is None:
            self.data = torch.empty(self.shape, dtype=dtype)
        else:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=spill_dir)
            os.close(fd)
            self.path = Path(name)
            itemsize = torch.empty(0, dtype=dtype).element_size()
            np_dtype = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[itemsize]  # raw storage, viewed as `dtype`
            self._mm = np.memmap(name, dtype=np_dtype, mode="w+", shape=self.shape)
            self.data = torch.from_numpy(self._mm).view(dtype)

    @staticmethod
    def nbytes_for(n: int, seqlen: int, hidden: int, dtype: torch.dtype) -> int:
        return n * seqlen * hidden * torch.empty(0, dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.nbytes_for(*self.shape, self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self.path is not None:
            del self.data
            self._mm._mmap.close() if getattr(self._mm, "_mmap", None) is not None else None
            del self._mm
            self.path.unlink(missing_ok=True)
            self.path = None


# ---------------------------------------------------------------------------------------------------------------
# Per-linear input statistics
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LinearStats(HessianSource):
    """Statistics of one linear layer's inputs over every calibration token.

    hessian: H = 2/n * sum_t x_t x_t^T  [in, in] float32 (GPTQ eq. 1's H = 2 X X^T, normalized by tokens)
    sq_norms: sum_t x_tj^2 [in]; input_norms = sqrt(sq_norms) = ||X_j||_2 (Wanda's activation norm)
    absmax: max_t |x_tj| [in] (SmoothQuant's per-channel activation range)
    """

    ntokens: int
    hessian: torch.Tensor | None = None
    sq_norms: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    last_use: bool = False  # set by Method.compress_block for the last linear reading these statistics

    @property
    def input_norms(self) -> torch.Tensor:
        assert self.sq_norms is not None, "input_norms were not gathered"
        return self.sq_norms.sqrt()


class _Accumulator:
    def __init__(self, in_features: int, want: tuple[str, ...], device: torch.device):
        self.want = want
        self.n = 0
        self.H = torch.zeros(in_features, in_features, device=device) if "hessian" in want else None
        self.sq = torch.zeros(in_features, device=device) if "input_norms" in want else None
        self.amax = torch.zeros(in_features, device=device) if "input_absmax" in want else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.n += x.shape[0]
        if self.H is not None:
            self.H.addmm_(x.t(), x)
        if self.sq is not None:
            self.sq += (x * x).sum(dim=0)
        if self.amax is not None:
            torch.maximum(self.amax, x.abs().amax(dim=0), out=self.amax)

    def finish(self) -> LinearStats:
        H = self.H.mul_(2.0 / max(self.n, 1)) if self.H is not None else None  # in place: no second [in, in] copy
        self.H = None
        return LinearStats(self.n, H, self.sq, self.amax)


# ---------------------------------------------------------------------------------------------------------------
# Block context: what a method sees of one block
# ---------------------------------------------------------------------------------------------------------------
class BlockContext:
    def __init__(self, engine: "Engine", index: int, block: nn.Module, prefix: str):
        self.engine, self.index, self.block, self.prefix = engine, index, block, prefix
        self._graph: BlockGraph | None = None
        self._channel_producers: dict[str, ChannelFeed] | None = None

    # ---- structure ----------------------------------------------------------------------------------------------
    @property
    def graph(self) -> BlockGraph:
        """The block's data flow (linears in order, shared inputs, producing norms), traced once on real inputs."""
        if self._graph is None:
            self._graph = trace_block(self.block, *self._trace_input())
        return self._graph

    @property
    def channel_producers(self) -> dict[str, ChannelFeed]:
        """First linear of a group not fed by a norm -> the linear feeding its channels through products only (up ->
        down; v -> o), with the channel map: traced once, on demand (AWQ's linear-to-linear scales)."""
        if self._channel_producers is None:
            self._channel_producers = channel_producers(self.block, *self._trace_input(), self.graph)
        return self._channel_producers

    def _trace_input(self) -> tuple[torch.Tensor, dict]:
        if self.engine.inputs is not None:
            return self.engine.inputs.data[:1].to(self.engine.device), self.engine.block_kwargs(1)
        return self.engine.synthetic_block_input()  # no calibration data: a short random sequence through the embeddings

    def qualified(self, name: str) -> str:
        return f"{self.prefix}.{self.index}.{name}"

    def targets(self) -> list[str]:
        """Linears of this block the run compresses (all of them unless --ignore patterns exclude some)."""
        names = [n for n, m in self.block.named_modules() if n and is_linear_like(m)]
        return [n for n in names if self.engine.include(self.qualified(n))]

    def linear_groups(self, true_sequential: bool = False) -> list[list[str]]:
        """Groups of target linears to gather statistics for together. True-sequential: the block's input groups in
        data-flow order (q,k,v | o | gate,up | down); otherwise one group with every target."""
        targets = self.targets()
        if not true_sequential or self.engine.inputs is None:
            ordered = [n for n in self.graph.order if n in targets] if self.engine.inputs is not None else targets
            return [ordered] if ordered else []
        groups = [[n for n in g if n in targets] for g in self.graph.input_groups]
        return [g for g in groups if g]

    def get(self, name: str) -> nn.Module:
        return self.block.get_submodule(name)

    def replace(self, name: str, module: nn.Module) -> None:
        set_module(self.block, name, module.to(self.engine.device))

    # ---- data -------------------------------------------------------------------------------------------------------
    def forward_all(self, hooks: dict[str, Callable] | None = None, *, keep_outputs: bool = False) -> None:
        """Run the block over every cached calibration input (optionally with forward hooks on named modules)."""
        self.engine.forward_block(self.block, hooks=hooks, write_outputs=keep_outputs)

    def collect(self, names: list[str], want: tuple[str, ...]) -> dict[str, LinearStats]:
        """Gather input statistics for the named linears in one pass over the calibration set."""
        if self.engine.inputs is None:
            raise RuntimeError("statistics need calibration data; the method must declare needs.calibration=True")
        accs: dict[str, _Accumulator] = {}
        hooks: dict[str, Callable] = {}
        for name in names:
            if name in accs:
                continue
            group = [n for n in self.graph.group_of(name) if n in names]  # linears reading the same tensor share stats
            mod = self.get(group[0])
            acc = _Accumulator(mod.in_features, want, self.engine.device)
            for n in group:
                accs[n] = acc
            hooks[group[0]] = lambda m, inp, out, a=acc: a.add(inp[0])
        self.forward_all(hooks)
        done: dict[int, LinearStats] = {}
        for a in accs.values():
            if id(a) not in done:  # finish() runs once per shared accumulator (it scales H in place)
                done[id(a)] = a.finish()
        return {n: done[id(a)] for n, a in accs.items()}


# ---------------------------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------------------------
class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor, kwargs: dict):
        self.hidden, self.kwargs = hidden, kwargs


class Engine:
    """Runs methods block by block over a model. See the module docstring."""

    def __init__(self, model: nn.Module, calibration: torch.Tensor | None, *, device: torch.device | str = "cpu",
                 batch_size: int = 8, spill: str = "auto", spill_dir: str | None = None,
                 include: Callable[[str], bool] | None = None, progress: bool = True):
        self.model = model
        self.calibration = calibration  # [N, L] token ids or None
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        if spill not in ("auto", "always", "never"):
            raise ValueError(f"spill {spill!r}: use auto, always or never")
        self.spill, self.spill_dir = spill, spill_dir
        self.include = include or (lambda name: True)
        self.progress = progress
        self.prefix, self.blocks = find_blocks(model)
        self.inputs: ActivationCache | None = None
        self.outputs: ActivationCache | None = None
        self._kwargs: dict[int, dict] = {}
        self.dtype = next(model.parameters()).dtype
        self.peak_activation_bytes = 0
        # A streamed model (compress.pipeline.stream): block i is materialised before its turn and written out and
        # freed after it (the next block's inputs computed); None for a model in memory.
        self.block_loader: Callable[[int, nn.Module], None] | None = None
        self.block_done: Callable[[int, nn.Module], None] | None = None

    # ---- activation capture -------------------------------------------------------------------------------------
    def _batches(self, n: int) -> Iterator[slice]:
        for s in range(0, n, self.batch_size):
            yield slice(s, min(s + self.batch_size, n))

    def _non_block_modules_to(self, device: torch.device) -> None:
        block_ids = {id(b) for b in self.blocks}
        for name, mod in self.model.named_modules():
            if id(mod) in block_ids:
                continue
            if any(name.startswith(f"{self.prefix}.{i}.") for i in range(len(self.blocks))):
                continue
            for p in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                p.data = p.data.to(device)

    def _spill_decision(self, nbytes: int) -> str | None:
        import psutil

        if self.spill == "never":
            return None
        if self.spill == "always" or nbytes > 0.5 * psutil.virtual_memory().available:
            return self.spill_dir or tempfile.gettempdir()
        return None

    def capture(self, quiet: bool = False) -> None:
        """Run the calibration set through the model up to block 0 and keep block 0's inputs and call kwargs."""
        ids = self.calibration
        assert ids is not None
        n, seqlen = ids.shape
        hidden = self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else None
        per_cache = ActivationCache.nbytes_for(n, seqlen, hidden or 0, self.dtype) if hidden else 0
        spill_to = self._spill_decision(2 * per_cache)
        (log.debug if quiet else log.info)("activation cache: %d x %d x %s %s = %s per buffer, 2 buffers, %s", n, seqlen, hidden, str(self.dtype).replace("torch.", ""),
                 _human(per_cache), f"memory-mapped in {spill_to}" if spill_to else "in RAM")
        first = self.blocks[0]

        def hook(module, args, kwargs):
            hidden_states = args[0] if args else kwargs.pop("hidden_states")
            raise _Captured(hidden_states, kwargs)

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        self._non_block_modules_to(self.device)
        try:
            for sl in self._batches(n):
                try:
                    with torch.no_grad():
                        self.model(input_ids=ids[sl].to(self.device), use_cache=False)
                except _Captured as c:
                    h = c.hidden
                    if self.inputs is None:
                        self.inputs = ActivationCache(n, seqlen, h.shape[-1], h.dtype, spill_dir=spill_to)
                        self.outputs = ActivationCache(n, seqlen, h.shape[-1], h.dtype, spill_dir=spill_to)
                        self.peak_activation_bytes = self.inputs.nbytes + self.outputs.nbytes
                    self.inputs.data[sl] = h.detach().to("cpu")
                    bs = sl.stop - sl.start
                    if bs not in self._kwargs:
                        self._kwargs[bs] = self._clean_kwargs(c.kwargs)
                else:
                    raise RuntimeError("the model never called its first decoder block")
        finally:
            handle.remove()
            if self.device.type != "cpu":
                self._non_block_modules_to(torch.device("cpu"))

    @staticmethod
    def _clean_kwargs(kwargs: dict) -> dict:
        out = {}
        for k, v in kwargs.items():
            if k in ("cache", "past_key_values", "past_key_value", "layer_past"):
                out[k] = None
            elif k == "use_cache":
                out[k] = False
            elif isinstance(v, torch.Tensor):
                out[k] = v.detach()
            elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
                out[k] = tuple(t.detach() for t in v)
            else:
                out[k] = v
        return out

    def block_kwargs(self, batch: int) -> dict:
        """Keyword arguments the model passes to its blocks, for a micro-batch of `batch` sequences."""
        if batch not in self._kwargs:
            # derive from a captured batch: slice or repeat tensors along the batch dimension where it has one
            src_bs, src = next(iter(self._kwargs.items()))
            self._kwargs[batch] = {k: _rebatch(v, src_bs, batch) for k, v in src.items()}
        return self._kwargs[batch]

    def synthetic_block_input(self) -> tuple[torch.Tensor, dict]:
        """A short random sequence's block-0 input, for tracing block structure when no calibration data exists."""
        saved = (self.calibration, self.inputs, self.outputs, dict(self._kwargs))
        vocab = getattr(self.model.config, "vocab_size", 100)
        self.calibration = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
        self.inputs = self.outputs = None
        self._kwargs = {}
        try:
            self.capture(quiet=True)
            x, kw = self.inputs.data[:1].to(self.device), self._kwargs[1]
        finally:
            self.calibration, self.inputs, self.outputs, self._kwargs = saved[0], saved[1], saved[2], saved[3]
        return x, {k: _to(v, self.device) for k, v in kw.items()}

    # ---- block execution ----------------------------------------------------------------------------------------
    def forward_block(self, block: nn.Module, *, hooks: dict[str, Callable] | None = None, write_outputs: bool = False) -> None:
        handles = [block.get_submodule(name).register_forward_hook(fn) for name, fn in (hooks or {}).items()]
        try:
            with torch.no_grad():
                for sl in self._batches(len(self.inputs)):
                    x = self.inputs.data[sl].to(self.device)
                    out = block(x, **{k: _to(v, self.device) for k, v in self.block_kwargs(sl.stop - sl.start).items()})
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    if write_outputs:
                        self.outputs.data[sl] = out.to("cpu", self.inputs.dtype)
        finally:
            for h in handles:
                h.remove()

    def run(self, methods: list["Method"], *, desc: str = "compressing") -> None:
        """Every method's compress_block sees each block in turn, after the methods before it."""
        needs_data = any(m.needs.calibration for m in methods)
        if needs_data and self.calibration is None:
            names = [m.name for m in methods if m.needs.calibration]
            raise RuntimeError(f"{', '.join(names)} need calibration data but none was given")

        def on_block(ctx: BlockContext) -> None:
            for m in methods:
                m.compress_block(ctx)

        self._block_loop(on_block, with_data=needs_data, desc=desc)

    def observe(self, on_block: Callable[[BlockContext], None], *, desc: str = "observing") -> None:
        """A pass that only looks (statistics, scores) and changes nothing, propagating the model's own outputs."""
        self._block_loop(on_block, with_data=True, desc=desc)

    def _block_loop(self, on_block: Callable[[BlockContext], None], *, with_data: bool, desc: str) -> None:
        """The one block loop: capture block 0's inputs (with_data), then for each block call on_block and compute
        the block's outputs, the next block's inputs, with what on_block left in it."""
        if with_data:
            self.capture()
        try:
            for i, block in enumerate(tqdm(self.blocks, desc=desc, unit="block", disable=not self.progress)):
                if self.block_loader is not None:
                    self.block_loader(i, block)
                moved = self._to_device(block)
                on_block(BlockContext(self, i, block, self.prefix))
                if with_data and i < len(self.blocks) - 1:
                    self.forward_block(block, write_outputs=True)
                    self.inputs, self.outputs = self.outputs, self.inputs
                if moved:
                    block.to("cpu")
                if self.block_done is not None:
                    self.block_done(i, block)
        finally:
            self.release()

    def _to_device(self, block: nn.Module) -> bool:
        if self.device.type == "cpu":
            return False
        block.to(self.device)
        return True

    def release(self) -> None:
        for cache in (self.inputs, self.outputs):
            if cache is not None:
                cache.close()
        self.inputs = self.outputs = None
        self._kwargs = {}


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
        return tuple(t.to(device) for t in v)
    return v


def _rebatch(v: Any, src_bs: int, bs: int) -> Any:
    def one(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != src_bs or src_bs == 1 and bs == 1:
            return t
        if bs <= src_bs:
            return t[:bs]
        reps = math.ceil(bs / src_bs)
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:bs]

    if isinstance(v, torch.Tensor):
        return one(v)
    if isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
        return tuple(one(t) for t in v)
    return v
