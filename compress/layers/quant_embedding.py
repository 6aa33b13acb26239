"""Quantized token embeddings and the LM head that reads the same codes (`--quantize-embeddings 8|4`).

* `QuantEmbedding`: the embedding table [vocab, hidden] stored exactly as a QuantLinear of in_features = hidden and
  out_features = vocab (packed codes along the hidden dimension, float16 scales, packed zero points; see
  compress.layers.quant_linear), so a row lookup gathers and de-quantizes only the rows asked for, and the table can
  also multiply hidden states through the integer kernels (the tied LM head).
* `TiedQuantHead`: the output projection of a model whose head is tied to its input embedding
  (tie_word_embeddings): logits = h @ E^T computed from the embedding's codes. It owns no tensor; the codes are
  stored once, under the embedding.

Grids (compress.kernels.quant_grid, round-to-nearest): 8 bits symmetric per row (one float16 scale per token, the
int8 weight-only kernel runs the head), 4 bits asymmetric in groups of 32 along the hidden dimension (the layout of
GGUF Q4_1; the int4 kernel runs the head).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from compress.core.errors import ConfigError
from compress.kernels.quant_grid import QuantSpec, dequantize_codes, rtn_quantize, unpack_bits
from compress.layers.quant_linear import QuantLinear

EMBEDDING_GRIDS = {8: QuantSpec(8, -1, True), 4: QuantSpec(4, 32, False)}


class QuantEmbedding(QuantLinear):
    """An embedding table held as integer codes (see the module docstring); forward(ids) -> rows in compute dtype."""

    is_compress_linear = False  # an embedding, not one of the model's linear layers
    is_compress_embedding = True  # counted by its logical vocab x hidden parameters (compress.layers.weights)
    module_type = "quant_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, *, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__(embedding_dim, num_embeddings, spec, dtype=dtype, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._row_zeros: torch.Tensor | None = None

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, spec: QuantSpec) -> "QuantEmbedding":
        w = emb.weight.detach()
        qw = rtn_quantize(w, spec)
        mod = cls(w.shape[0], w.shape[1], spec, dtype=w.dtype, device=w.device)
        mod.load_state_dict(QuantLinear.from_quantized(qw, dtype=w.dtype).state_dict())
        return mod

    def _codes_changed(self) -> None:
        self._row_zeros = None
        super()._codes_changed()

    def _zeros_by_row(self) -> torch.Tensor | None:
        """uint8 [vocab, n_groups] zero points, unpacked once (a run-time form; None for a symmetric grid)."""
        if self.weight_zero_point is None:
            return None
        if self._row_zeros is None or self._row_zeros.device != self.weight_zero_point.device:
            self._row_zeros = unpack_bits(self.weight_zero_point, self.spec.bits, self.out_features).t().contiguous()
        return self._row_zeros

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1).long()
        codes = unpack_bits(self.weight_packed.index_select(0, ids), self.spec.bits, self.embedding_dim)
        scales = self.weight_scale.index_select(0, ids)
        zr = self._zeros_by_row()
        if zr is None:
            zeros = torch.full_like(scales, (self.spec.maxq + 1) // 2, dtype=torch.uint8)
        else:
            zeros = zr.index_select(0, ids)
        rows = dequantize_codes(codes, scales, zeros, None, self.spec.group_size).to(self.compute_dtype)
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ E^T (the tied LM head), through this table's integer kernel where one was selected."""
        return QuantLinear.forward(self, hidden)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize_weight()

    def module_config(self) -> dict:
        return {"type": self.module_type, "bits": self.spec.bits, "group_size": self.spec.group_size,
                "sym": self.spec.sym, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim}

    @classmethod
    def from_module_config(cls, cfg: dict, dtype: torch.dtype) -> "QuantEmbedding":
        return cls(cfg["num_embeddings"], cfg["embedding_dim"], QuantSpec(cfg["bits"], cfg["group_size"], cfg["sym"]),
                   dtype=dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec.label()}"


class TiedQuantHead(nn.Module):
    """logits = h @ E^T from a QuantEmbedding's codes (stored once, under the embedding). Bound after building."""

    module_type = "tied_quant_head"
    ties_to_codes = True  # compress.formats.base.load_remaining: nothing to re-tie

    def __init__(self, tied_to: str, out_features: int, in_features: int):
        super().__init__()
        self.tied_to, self.out_features, self.in_features = tied_to, out_features, in_features
        self._source: list[QuantEmbedding] = []  # a list, so the embedding is not registered (or saved) twice

    def bind(self, model: nn.Module) -> None:
        src = model.get_submodule(self.tied_to)
        if not isinstance(src, QuantEmbedding):
            raise ConfigError(f"tied head: {self.tied_to!r} is a {type(src).__name__}, not a QuantEmbedding")
        self._source[:] = [src]

    @property
    def source(self) -> QuantEmbedding:
        if not self._source:
            raise RuntimeError("TiedQuantHead used before bind(model)")
        return self._source[0]

    @property
    def kernel(self) -> str:
        return f"tied to {self.tied_to}: {self.source.kernel}"

    @property
    def weight(self) -> torch.Tensor:
        return self.source.dequantize_weight()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.source.project(hidden)

    def module_config(self) -> dict:
        return {"type": self.module_type, "tied_to": self.tied_to, "out_features": self.out_features,
                "in_features": self.in_features}

    @classmethod
    def from_module_config(cls, cfg: dict, dtype: torch.dtype) -> "TiedQuantHead":
        return cls(cfg["tied_to"], cfg["out_features"], cfg["in_features"])

    def extra_repr(self) -> str:
        return f"tied to {self.tied_to}"


def bind_tied_heads(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, TiedQuantHead):
            mod.bind(model)


def quantize_embeddings(model: nn.Module, bits: int) -> dict:
    """Replace the input embedding by a QuantEmbedding of `bits` (8: symmetric per row; 4: asymmetric groups of 32)
    and the output head by a TiedQuantHead reading the same codes (tied models) or a QuantLinear of the same grid
    (untied). Returns what was done."""
    if bits not in EMBEDDING_GRIDS:
        raise ConfigError(f"--quantize-embeddings {bits!r} is not allowed; use one of {sorted(EMBEDDING_GRIDS)}")
    spec = EMBEDDING_GRIDS[bits]
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ConfigError(f"--quantize-embeddings: the input embedding is a {type(emb).__name__}, not an nn.Embedding")
    names = {id(m): n for n, m in model.named_modules()}
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    qemb = QuantEmbedding.from_embedding(emb, spec)
    model.set_input_embeddings(qemb)
    report = {"embedding": names[id(emb)], "grid": spec.label(), "bits": bits, "tied_head": tied}
    if head is not None:
        if tied:
            model.set_output_embeddings(TiedQuantHead(names[id(emb)], qemb.out_features, qemb.in_features))
            bind_tied_heads(model)
        elif isinstance(head, nn.Linear):
            model.set_output_embeddings(QuantLinear.from_quantized(rtn_quantize(head.weight, spec), head.bias,
                                                                   dtype=head.weight.dtype))
        report["head"] = names[id(head)]
    return report
