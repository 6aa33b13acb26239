"""GGUF export (`--export gguf`): one `.gguf` file that llama.cpp (and Ollama / LM Studio on top of it) loads, written
with the `gguf` package's GGUFWriter. Quantized linears are written from the codes the method chose, not re-rounded:

  grid (bits, group 32)     GGUF type  block of 32 weights along the input (llama.cpp ggml-common.h)
  8-bit symmetric           Q8_0       fp16 d, 32 int8 q:                 w = d * q          (q = code - 128)
  4-bit symmetric           Q4_0       fp16 d, 16 bytes of nibbles:       w = d * (q - 8)
  4-bit asymmetric          Q4_1       fp16 d, fp16 m, 16 bytes:          w = d * q + m      (m = -d * zero, fp16)
  5-bit symmetric           Q5_0       fp16 d, uint32 high bits, 16 bytes: w = d * (q - 16)
  5-bit asymmetric          Q5_1       fp16 d, fp16 m, uint32, 16 bytes:  w = d * q + m

Within a block, values 0-15 sit in the low nibbles of the 16 bytes and values 16-31 in the high nibbles; bit j of a
Q5 block's uint32 is the fifth bit of value j. Symmetric grids are exact (our zero point is 2^(bits-1), the types'
fixed offset; the float16 scale d may be negative: `--signed-scale`, ggml's own Q4_0/Q5_0 grid, which puts each
block's signed extreme on code 0); asymmetric ones store m = -d * zero rounded to fp16, the one rounding the type imposes (|error| <=
half an fp16 ulp of m per weight). Any other grid (3/2/6/7-bit, groups other than 32, per-channel, an act-order group
index, OWQ's float columns, W8A8, NF4) has no GGUF type and is refused with one line before any work, unless
`--gguf-requant TYPE` asks for the de-quantized weights to be re-quantized with gguf.quants (llama.cpp's reference
rounding); the file's metadata and the run record say so. Float linears are written F16 (or the requant type).

Model metadata and tensor names follow llama.cpp's convert_hf_to_gguf for each architecture: LLaMA family (`llama`,
SmolLM2; q/k rows permuted from HF's rotate-half to llama.cpp's interleaved RoPE: whole rows move, so codes stay
exact) and Qwen2 (`qwen2`, NEOX RoPE: no permutation; q/k/v biases). Norms and biases are F32; embeddings Q8_0
(auto, for quantized models; llama.cpp's rounding) or F16. The tokenizer is the model's (GPT-2 BPE: tokens, types,
merges, special ids, chat template via gguf.SpecialVocab; the pre-tokenizer named by llama.cpp's chktxt hash).
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from compress.core.errors import CompressError, ConfigError
from compress.formats.base import AtomicFolder, Format
from compress.layers.quant_linear import OWQLinear, QuantLinear
from compress.layers.weights import linear_weight
from compress.model.surgery import is_linear_like

log = logging.getLogger("compress")

GGUF_FILE = "model.gguf"
QK = 32  # weights per block of every type below

# (bits, symmetric) at group size 32 -> GGUF type name
GRID_TYPES: dict[tuple[int, bool], str] = {(8, True): "Q8_0", (4, True): "Q4_0", (4, False): "Q4_1",
                                           (5, True): "Q5_0", (5, False): "Q5_1"}
REQUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16")
EMBED_TYPES = ("auto", "q8_0", "f16")
EXPORTABLE = "8-bit sym g32 (Q8_0), 4-bit sym g32 (Q4_0), 4-bit asym g32 (Q4_1), 5-bit sym g32 (Q5_0), 5-bit asym g32 (Q5_1)"

# llama.cpp's pre-tokenizer names by the sha256 of str(tokenizer.encode(CHKTXT)) (convert_hf_to_gguf get_vocab_base_pre)
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 '
          '33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}

# HF model_type -> (llama.cpp architecture, q/k permuted for interleaved RoPE)
ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
_BLOCK_TENSORS = {  # HF name inside a decoder block -> llama.cpp name
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


# ---------------------------------------------------------------------------------------------------------------
# Grids and options, checked before any work
# ---------------------------------------------------------------------------------------------------------------
def grid_type(bits: int, group_size: int, sym: bool, act_order: bool = False) -> str | None:
    """The GGUF type holding this integer grid exactly, or None."""
    if group_size != QK or act_order:
        return None
    return GRID_TYPES.get((int(bits), bool(sym)))


def _grid_label(bits: int, group_size: int, sym: bool, act_order: bool) -> str:
    g = "per-channel" if group_size == -1 else f"group {group_size}"
    return f"{bits}-bit {'symmetric' if sym else 'asymmetric'} {g}{' act-order (group index)' if act_order else ''}"


def refusal(what: str) -> ConfigError:
    return ConfigError(f"--export gguf: {what} has no GGUF type; exportable grids: {EXPORTABLE} "
                       "(or pass --gguf-requant q4_0|q4_1|q5_0|q5_1|q8_0|f16 to re-quantize the de-quantized weights)")


def check_options(options: dict[str, Any]) -> tuple[str | None, str]:
    requant = options.get("gguf_requant")
    embed = options.get("gguf_embed") or "auto"
    if requant is not None and str(requant).lower() not in REQUANT_TYPES:
        raise ConfigError(f"--gguf-requant {requant!r} is not a GGUF type this export writes; allowed: {', '.join(REQUANT_TYPES)}")
    if str(embed).lower() not in EMBED_TYPES:
        raise ConfigError(f"--gguf-embed {embed!r} is not allowed; allowed: {', '.join(EMBED_TYPES)}")
    return (str(requant).lower() if requant is not None else None), str(embed).lower()


def check_plan(stages: list[tuple[str, dict[str, Any]]], options: dict[str, Any]) -> None:
    """Refuse, before any work, a recipe whose integer grid GGUF cannot hold (unless --gguf-requant)."""
    requant, _ = check_options(options)
    if requant is not None:
        return
    for name, cfg in stages:
        if cfg.get("target_bits") is not None or cfg.get("weak_columns") is not None or name == "owq":
            raise refusal(f"{name}'s float16 weak columns")
        bits, gs = cfg.get("bits"), cfg.get("group_size")
        if bits is None or gs is None:
            continue
        act_order = bool(cfg.get("act_order")) and not bool(cfg.get("static_groups"))
        if grid_type(bits, gs, bool(cfg.get("sym")), act_order) is None:
            raise refusal(f"{name}'s grid ({_grid_label(bits, gs, bool(cfg.get('sym')), act_order)})")
        if cfg.get("sym") and bits in (4, 5) and not cfg.get("signed_scale") and name not in ("hqq", "autoround"):
            log.info("gguf: %s %d-bit symmetric uses GPTQ's grid (2 max|w| / %d); --signed-scale gives ggml's own "
                     "Q%d_0 grid (all %d levels), usually lower error", name, bits, 2**bits - 1, bits, 2**bits)


# ---------------------------------------------------------------------------------------------------------------
# Block packers: our codes -> GGUF blocks (uint8 [rows, in/32 * block bytes]), vectorised with numpy
# ---------------------------------------------------------------------------------------------------------------
def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[rows, nb, 32] values < 16 -> [rows, nb, 16] bytes: value j low nibble, value j+16 high nibble of byte j."""
    q = q.astype(np.uint8)
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """[rows, nb, 32] 5-bit values -> [rows, nb, 4] bytes of the little-endian uint32 whose bit j is value j's bit 4."""
    hb = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return hb.sum(axis=-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(*q.shape[:-1], 4)


def pack_blocks(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, qtype: str) -> np.ndarray:
    """GGUF blocks of one weight from integer codes [rows, in] (uint8), fp16 scales [rows, in/32], zero points
    [rows, in/32]; see the module docstring for each layout."""
    rows, n = codes.shape
    if n % QK:
        raise CompressError(f"--export gguf: an input width of {n} is not a multiple of the {QK}-weight GGUF block")
    nb = n // QK
    q = codes.reshape(rows, nb, QK).astype(np.int32)
    d = scales.astype(np.float16).reshape(rows, nb)
    z = zeros.astype(np.int32).reshape(rows, nb)
    parts = [_f16_bytes(d)]
    if qtype == "Q8_0":
        parts.append((q - 128).astype(np.int8).view(np.uint8))
    elif qtype == "Q4_0":
        parts.append(_nibbles(q))
    elif qtype == "Q5_0":
        parts += [_high_bits(q), _nibbles(q)]
    elif qtype in ("Q4_1", "Q5_1"):
        m = (-(d.astype(np.float32) * z.astype(np.float32))).astype(np.float16)
        parts.append(_f16_bytes(m))
        parts += ([_high_bits(q)] if qtype == "Q5_1" else []) + [_nibbles(q)]
    else:
        raise CompressError(f"no block packer for GGUF type {qtype!r}")
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def unpack_blocks(data: np.ndarray, qtype: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inverse of pack_blocks: (codes [rows, n] int32, d [rows, n/32] fp16, m [rows, n/32] fp16 or None)."""
    nb = n // QK
    b = np.ascontiguousarray(data).reshape(-1, nb, data.shape[-1] // nb)
    rows = b.shape[0]
    d = b[..., 0:2].copy().view("<f2").reshape(rows, nb)
    m = b[..., 2:4].copy().view("<f2").reshape(rows, nb) if qtype in ("Q4_1", "Q5_1") else None
    off = 4 if m is not None else 2
    if qtype == "Q8_0":
        return b[..., 2:].view(np.int8).astype(np.int32).reshape(rows, n) + 128, d, None
    hi = None
    if qtype in ("Q5_0", "Q5_1"):
        qh = b[..., off:off + 4].copy().view("<u4").reshape(rows, nb, 1)
        hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4
        off += 4
    qs = b[..., off:off + 16].astype(np.int32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    if hi is not None:
        q = q | hi
    return q.reshape(rows, n), d, m


# ---------------------------------------------------------------------------------------------------------------
# Tensors of the model
# ---------------------------------------------------------------------------------------------------------------
def _qk_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's permute(W, n_head): HF rotate-half -> interleaved pairs, per head."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _float(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _quantize_ref(w: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """llama.cpp's reference rounding (gguf.quants) of a float weight into `qtype` (or F16 / F32)."""
    from gguf import GGMLQuantizationType, quants

    t = GGMLQuantizationType[qtype]
    if qtype == "F32":
        return w.astype(np.float32), t
    if qtype == "F16":
        return w.astype(np.float16), t
    return quants.quantize(w.astype(np.float32), t), t


class _Tensors:
    """Collects (name, data, raw type) in llama.cpp order, counting what was exact and what was re-rounded."""

    def __init__(self, requant: str | None):
        self.requant = requant.upper() if requant else None
        self.items: list[tuple[str, np.ndarray, Any]] = []
        self.types: dict[str, int] = {}
        self.requantized: list[str] = []

    def add(self, name: str, data: np.ndarray, qtype: Any) -> None:
        self.items.append((name, data, qtype))
        self.types[qtype.name] = self.types.get(qtype.name, 0) + 1

    def plain(self, name: str, t: torch.Tensor, qtype: str = "F32") -> None:
        self.add(name, *_quantize_ref(_float(t), qtype))

    def linear(self, name: str, module: nn.Module, rows: np.ndarray | None, hf_name: str) -> None:
        from gguf import GGMLQuantizationType

        if self.requant is None and isinstance(module, QuantLinear) and not isinstance(module, OWQLinear):
            qw = module.quantized_weight()
            spec = qw.spec
            qtype = grid_type(spec.bits, spec.group_size, spec.sym, not qw.natural_order)
            if qtype is None:
                raise refusal(f"{hf_name}'s grid ({_grid_label(spec.bits, spec.group_size, spec.sym, not qw.natural_order)})")
            codes, scales, zeros = (x.cpu().numpy() for x in (qw.codes, qw.scales, qw.zeros))
            if rows is not None:
                codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
            self.add(name, pack_blocks(codes, scales, zeros, qtype), GGMLQuantizationType[qtype])
            return
        if self.requant is None and not type(module) is nn.Linear:
            raise refusal(f"{hf_name} ({type(module).__name__})")
        w = _float(linear_weight(module))
        if rows is not None:
            w = w[rows]
        qtype = self.requant or "F16"
        if self.requant is not None:
            self.requantized.append(hf_name)
        self.add(name, *_quantize_ref(w, qtype))


def _arch(model: nn.Module) -> tuple[str, bool]:
    mt = getattr(model.config, "model_type", None)
    if mt not in ARCHS:
        raise CompressError(f"--export gguf: model type {mt!r} has no GGUF writer here; supported: {', '.join(ARCHS)}")
    return ARCHS[mt]


def _check_model(model: nn.Module) -> None:
    cfg = model.config
    if getattr(cfg, "rope_scaling", None):
        rs = cfg.rope_scaling
        kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else rs
        if kind not in (None, "default"):
            raise CompressError(f"--export gguf: rope scaling {kind!r} is not written by this exporter; supported: none")


def _head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def collect_tensors(model: nn.Module, requant: str | None, embed: str) -> _Tensors:
    arch, permute = _arch(model)
    _check_model(model)
    cfg = model.config
    base = model.model
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    embed_type = ("Q8_0" if quantized or requant not in (None, "f16") else "F16") if embed == "auto" else embed.upper()
    out = _Tensors(requant)
    out.plain("token_embd.weight", base.embed_tokens.weight, embed_type)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    for i, block in enumerate(base.layers):
        for hf, gg in _BLOCK_TENSORS.items():
            mod = block.get_submodule(hf)
            name = f"blk.{i}.{gg}"
            rows = None
            if permute and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                rows = _qk_rows(mod.out_features, n_head if hf.endswith("q_proj") else n_kv)
            if is_linear_like(mod):
                out.linear(f"{name}.weight", mod, rows, f"model.layers.{i}.{hf}")
                bias = getattr(mod, "bias", None)
                if bias is not None:
                    out.plain(f"{name}.bias", bias[rows] if rows is not None else bias)
            else:
                out.plain(f"{name}.weight", mod.weight)
        extra = [n for n, m in block.named_modules() if n and is_linear_like(m) and n not in _BLOCK_TENSORS]
        if extra:
            raise CompressError(f"--export gguf: block {i} has linears {extra} that the {arch} GGUF layout has no place for")
    out.plain("output_norm.weight", base.norm.weight)
    if not getattr(cfg, "tie_word_embeddings", False):
        head = model.lm_head
        if isinstance(head, QuantLinear) or requant:
            out.linear("output.weight", head, None, "lm_head")
        else:
            out.plain("output.weight", head.weight, embed_type)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
def pre_tokenizer(tokenizer: Any) -> str:
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(chkhsh)
    if name is None:
        log.warning("GGUF export: the tokenizer's pre-tokenizer hash %s is not one llama.cpp names here; writing "
                    "'default' (llama.cpp's GPT-2 style split)", chkhsh[:12])
        return "default"
    return name


def vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types in id order, as llama.cpp's converter builds them for GPT-2 BPE vocabularies."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            special = decoder[i].special or (tok.startswith("<|") and tok.endswith("|>"))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    import gguf

    if len(tokenizer.get_vocab()) > vocab_size:
        raise CompressError(f"--export gguf: the tokenizer has {len(tokenizer.get_vocab())} tokens, more than the "
                            f"model's vocab_size {vocab_size}")
    tokens, types = vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        special.add_to_gguf(writer)
    if not special.merges:
        writer.add_token_merges([_noop_merge(tokenizer)])


def _noop_merge(tokenizer: Any) -> str:
    """One merge for a BPE vocabulary that has none (llama.cpp refuses a gpt2 vocabulary without the merges key, and
    GGUF cannot store an empty array): two tokens whose concatenation is not a token. llama.cpp falls back to the
    parts' byte tokens when a merged piece is not in the vocabulary, so the merge changes no tokenization."""
    vocab_ = tokenizer.get_vocab()
    singles = sorted(t for t in vocab_ if len(t) == 1)
    for a in singles:
        for b in singles:
            if a + b not in vocab_:
                return f"{a} {b}"
    raise CompressError("--export gguf: the tokenizer has no merges and no pair to stand in for them")


# ---------------------------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------------------------
def write_gguf(model: nn.Module, tokenizer: Any, path: Path, *, requant: str | None = None, embed: str = "auto",
               name: str | None = None) -> dict[str, Any]:
    """Write `path` (a .gguf file). Returns what was written: architecture, tensor types, re-quantized layers."""
    import gguf

    if tokenizer is None:
        raise CompressError("--export gguf needs the model's tokenizer (llama.cpp reads it from the file)")
    arch, _ = _arch(model)
    tensors = collect_tensors(model, requant, embed)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or getattr(cfg, "_name_or_path", "") or arch)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    hd = _head_dim(cfg)
    w.add_rope_dimension_count(hd)
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(cfg.num_key_value_heads or cfg.num_attention_heads))
    if hd != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    w.add_rope_freq_base(float(theta))
    w.add_vocab_size(int(cfg.vocab_size))
    ftypes = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
              "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "F16": gguf.LlamaFileType.MOSTLY_F16}
    lin = {}
    for n, _, t in tensors.items:
        if n.startswith("blk.") and t.name in ftypes and not n.endswith(("norm.weight", ".bias")):
            lin[t.name] = lin.get(t.name, 0) + 1
    main = max(lin, key=lin.get) if lin else "F16"
    w.add_file_type(ftypes[main])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("compress.linears", "re-quantized to " + tensors.requant + " from the de-quantized weights (gguf.quants "
                 "reference rounding)" if tensors.requant else "written from the method's integer codes (not re-rounded)")
    write_tokenizer(w, tokenizer, int(cfg.vocab_size))
    for n, data, t in tensors.items:
        w.add_tensor(n, data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return {"file": str(path), "architecture": arch, "file_type": main, "tensor_types": tensors.types,
            "requantized": (f"{len(tensors.requantized)} linears re-quantized to {tensors.requant} from their "
                            "de-quantized weights") if tensors.requant else None,
            "bytes": path.stat().st_size}


class GGUFFormat(Format):
    name = "gguf"
    summary = "GGUF for llama.cpp / Ollama / LM Studio (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 from the codes; F16)"
    exports = True
    options = ("gguf_requant", "gguf_embed")

    def handles(self, model: nn.Module) -> bool:
        return True  # write_gguf says in one line why a model's layers do not fit

    def check_plan(self, stages: list[tuple[str, dict[str, Any]]], options: dict[str, Any]) -> None:
        check_plan(stages, options)

    def export(self, model: nn.Module, tokenizer: Any, target: Path, overwrite: bool, **options: Any) -> Path:
        requant, embed = check_options(options)
        with AtomicFolder(target, overwrite) as tmp:
            info = write_gguf(model, tokenizer, tmp / GGUF_FILE, requant=requant, embed=embed)
        log.info("GGUF written: %s (%s, %s, %d bytes)", Path(target) / GGUF_FILE, info["file_type"],
                 info["requantized"] or "from the method's codes", info["bytes"])
        return Path(target) / GGUF_FILE

    def note(self, options: dict[str, Any]) -> str | None:
        requant, embed = check_options(options)
        how = (f"linears re-quantized to {requant.upper()} from their de-quantized weights (gguf.quants reference "
               "rounding), not the method's codes") if requant else "linears written from the method's integer codes"
        return f"{how}; embeddings {embed}"


FORMAT = GGUFFormat()
