"""One place for text: calibration token sequences and evaluation texts.

Sources (`--calib` / `--dataset`):
  wikitext2     eval: WikiText-2 raw test split joined with "\\n\\n" (the GPTQ/Wanda/SmoothQuant protocol);
                calibration: random windows of the WikiText-2 validation text (the data kit has no train split).
  wikitext2-v1  the tokenized WikiText-2 release (rare words as <unk>): test for eval, valid for calibration.
  ptb           Penn Treebank (Mikolov's LM split): test sentences joined with " "; calibration from valid.
  c4            eval: C4 validation documents (first 1,100 joined with " ", 256 windows at most, as GPTQ does, but
                from the data kit's 2,000-document subset); calibration: random windows of C4 train documents.
  pydoc         the English documentation every CPython ships (pydoc_data.topics): an embedded corpus, no network.
                Topics are split 4:1 into calibration and evaluation text, disjoint.
  file:PATH     a .txt file, or .jsonl with a "text" field per line.
  generated     data-free calibration: sequences sampled from the model itself (LLM-QAT's hybrid sampling).
Local data: --data-dir, else $COMPRESS_DATA_DIR, else ~/.cache/compress/data; the layout is the data kit's
(see its SOURCES.md). Without a local copy the `datasets` library is used when the hub is reachable.
Everything is deterministic for a seed, and tokenized samples are cached on disk (safetensors).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compress.core.errors import ConfigError, DataError, FileFormatError
from compress.core.paths import cache_dir
from compress.core.readers import load_safetensors, read_jsonl
from compress.layers.weights import count_parameters

log = logging.getLogger("compress")

SOURCES = ("wikitext2", "wikitext2-v1", "ptb", "c4", "pydoc", "generated")


@dataclass
class TextSource:
    """A resolved text: what it is (for records) and its content."""

    name: str  # wikitext2, ptb, c4, pydoc, file:..., ...
    variant: str  # precise description for the protocol record
    split: str
    origin: str  # local path or "datasets:<id>" or "embedded:pydoc_data"
    text: str = field(repr=False, default="")
    documents: list[str] | None = field(repr=False, default=None)  # for document-wise sampling (C4)
    fallback_from: str | None = None

    def record(self) -> dict[str, Any]:
        d = {"dataset": self.name, "variant": self.variant, "split": self.split, "origin": self.origin}
        if self.fallback_from:
            d["fallback_from"] = self.fallback_from
        return d


# ---------------------------------------------------------------------------------------------------------------
# Locating data
# ---------------------------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """--data-dir, else $COMPRESS_DATA_DIR, else ~/.cache/compress/data if present, else None (hub or error)."""
    if data_dir:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise DataError(f"--data-dir {str(data_dir)!r} does not exist or is not a folder")
        return p
    env = os.environ.get("COMPRESS_DATA_DIR")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError(f"COMPRESS_DATA_DIR={env!r} does not exist or is not a folder")
        return p
    p = cache_dir() / "data"
    return p if p.is_dir() else None


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _local_file(data_dir: Path | None, rel: str) -> Path | None:
    if data_dir is None:
        return None
    p = data_dir / rel
    return p if p.is_file() else None


def _missing(name: str, data_dir: Path | None, rel: str) -> DataError:
    where = f"{data_dir / rel}" if data_dir else f"<data dir>/{rel}"
    return DataError(
        f"{name}: no local copy (looked for {where}; set --data-dir or COMPRESS_DATA_DIR to the data kit) "
        f"and the Hugging Face hub is not reachable for the `datasets` fallback"
    )


def _hub_rows(dataset_id: str, config: str | None, split: str, column: str) -> list[str]:
    import datasets

    ds = datasets.load_dataset(dataset_id, config, split=split)
    return list(ds[column])


def _wikitext_rows(path: Path) -> list[str]:
    """Rows of the hub's wikitext split from the release file: each line with its newline, ' \\n' becoming ''."""
    lines = _read_text_file(path, f"data kit file {str(path)!r}").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return ["" if ln == " " else ln + "\n" for ln in lines]


def _pydoc_topics() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    texts = list(dict.fromkeys(topics[n] for n in sorted(topics)))  # several topic names share one text
    calib = [t for i, t in enumerate(texts) if i % 5 != 0]
    evals = [t for i, t in enumerate(texts) if i % 5 == 0]
    return calib, evals


def _jsonl_texts(path: Path, what: str) -> list[str]:
    """The "text" field of every line of a JSON-lines file; a line that is not JSON or has no text is one error."""
    docs = []
    for line, obj in read_jsonl(path, strict=what, numbered=True):
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{what}: line {line} has no string field 'text'")
        docs.append(text)
    return docs


def _read_text_file(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not UTF-8 text (byte {e.start}); is it a text file?") from None
    except OSError as e:
        raise DataError(f"{what} cannot be read: {e.strerror}") from None


def _read_user_file(spec: str) -> tuple[str, list[str]]:
    path = Path(spec[len("file:"):]).expanduser()
    if not path.is_file():
        raise DataError(f"{spec!r}: file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        docs = _jsonl_texts(path, repr(spec))
        return "\n\n".join(docs), docs
    text = _read_text_file(path, repr(spec))
    return text, [text]


@dataclass(frozen=True)
class _Kit:
    """One text of the data kit: the local file and how to read it, else the hub dataset that holds the same text.
    `read` and `fetch` return (text, documents or None)."""

    rel: str  # the file, relative to the data kit
    read: Callable[[Path], tuple[str, list[str] | None]]
    variant: str
    split: str
    fetch: Callable[[], tuple[str, list[str] | None]]
    hub_variant: str
    hub_split: str
    hub_origin: str


def _joined(rows: list[str], sep: str) -> tuple[str, None]:
    return sep.join(rows), None


def _ptb_sentences(path: Path) -> list[str]:
    return [ln.strip() for ln in _read_text_file(path, f"data kit file {str(path)!r}").split("\n") if ln.strip()]


def _c4_parquet(path: Path) -> tuple[str, list[str]]:
    import pyarrow.parquet as pq

    try:
        docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()[:1100]
    except Exception as e:  # noqa: BLE001 - ArrowInvalid and friends: one line naming the file
        raise FileFormatError(f"data kit file {str(path)!r} cannot be read as parquet: {e}".split("\n")[0]) from None
    return " ".join(docs), docs


def _c4_hub(split: str, shard: str, n: int, joined: bool) -> tuple[str, list[str]]:
    import datasets

    docs = list(datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"][:n])
    return (" ".join(docs) if joined else ""), docs


# The evaluation (test) texts, joined as the papers' perplexity protocol does, and the texts calibration windows are
# drawn from (never the evaluation split).
EVAL_KIT: dict[str, _Kit] = {
    "wikitext2": _Kit("wikitext-2-raw/wiki.test.raw", lambda p: _joined(_wikitext_rows(p), "\n\n"),
                      "wikitext-2-raw-v1", "test",
                      lambda: _joined(_hub_rows("wikitext", "wikitext-2-raw-v1", "test", "text"), "\n\n"),
                      "wikitext-2-raw-v1", "test", "datasets:wikitext"),
    "wikitext2-v1": _Kit("wikitext-2/test.txt", lambda p: _joined(_wikitext_rows(p), "\n\n"),
                         "wikitext-2-v1 (tokenized)", "test",
                         lambda: _joined(_hub_rows("wikitext", "wikitext-2-v1", "test", "text"), "\n\n"),
                         "wikitext-2-v1 (tokenized)", "test", "datasets:wikitext"),
    "ptb": _Kit("ptb/ptb.test.txt", lambda p: _joined(_ptb_sentences(p), " "), "ptb_text_only (Mikolov LM split)",
                "test", lambda: _joined(_hub_rows("ptb_text_only", "penn_treebank", "test", "sentence"), " "),
                "ptb_text_only (Mikolov LM split)", "test", "datasets:ptb_text_only"),
    "c4": _Kit("c4/c4_validation_2k.parquet", _c4_parquet,
               "c4 en validation, data-kit 2k subset, first 1100 docs (not the papers' shard)", "validation",
               lambda: _c4_hub("validation", "en/c4-validation.00000-of-00008.json.gz", 1100, True),
               "c4 en validation shard 0, first 1100 docs", "validation", "datasets:allenai/c4"),
}
CALIB_KIT: dict[str, _Kit] = {
    name: _Kit("wikitext-2/valid.txt", lambda p: _joined(_wikitext_rows(p), " "), "wikitext-2-v1 (tokenized)",
               "validation", lambda cfg=cfg: _joined(_hub_rows("wikitext", cfg, "train", "text"), " "), cfg, "train",
               "datasets:wikitext")
    for name, cfg in (("wikitext2", "wikitext-2-raw-v1"), ("wikitext2-v1", "wikitext-2-v1"))
}
CALIB_KIT.update({
    "ptb": _Kit("ptb/ptb.valid.txt", lambda p: _joined(_ptb_sentences(p), " "), "ptb_text_only", "validation",
                lambda: _joined(_hub_rows("ptb_text_only", "penn_treebank", "train", "sentence"), " "),
                "ptb_text_only", "train", "datasets:ptb_text_only"),
    "c4": _Kit("c4/c4_sample.jsonl",
               lambda p: ("", _jsonl_texts(p, f"data kit file {str(p)!r}")),
               "c4 en train shard 0, first 1000 docs", "train",
               lambda: _c4_hub("train", "en/c4-train.00000-of-01024.json.gz", 5000, False),
               "c4 en train shard 0", "train", "datasets:allenai/c4"),
})


def _from_kit(name: str, kit: _Kit, data_dir: str | os.PathLike | None) -> TextSource:
    """The local copy in the data kit, else the hub, else one error naming the file looked for."""
    ddir = resolve_data_dir(data_dir)
    p = _local_file(ddir, kit.rel)
    if p:
        text, docs = kit.read(p)
        return TextSource(name, kit.variant, kit.split, str(p), text, docs)
    if hub_reachable():
        text, docs = kit.fetch()
        return TextSource(name, kit.hub_variant, kit.hub_split, kit.hub_origin, text, docs)
    raise _missing(name, ddir, kit.rel)


def _text(name: str, data_dir: str | os.PathLike | None, kit: dict[str, _Kit], pydoc: tuple[int, str, str],
          unknown: str) -> TextSource:
    """A user file, pydoc's topics (`pydoc`: which part, its description and split), or a data-kit text."""
    name = name.strip()
    if name.startswith("file:"):
        text, docs = _read_user_file(name)
        return TextSource(name, "user file", "all", name[5:], text, docs)
    if name == "pydoc":
        part, variant, split = pydoc
        texts = _pydoc_topics()[part]
        return TextSource("pydoc", variant, split, "embedded:pydoc_data", "\n\n".join(texts), texts)
    if name in kit:
        return _from_kit(name, kit[name], data_dir)
    raise DataError(unknown.format(name=name))


def eval_text(name: str, data_dir: str | os.PathLike | None = None) -> TextSource:
    """The evaluation (test) text of a dataset, joined as the papers' perplexity protocol does."""
    return _text(name, data_dir, EVAL_KIT, (1, "pydoc_data.topics, every 5th topic", "eval"),
                 "unknown dataset {name!r}; choose one of: wikitext2, wikitext2-v1, ptb, c4, pydoc, file:PATH")


def calib_text(name: str, data_dir: str | os.PathLike | None = None) -> TextSource:
    """The text calibration windows are drawn from (never the evaluation split)."""
    return _text(name, data_dir, CALIB_KIT, (0, "pydoc_data.topics, 4 of every 5 topics", "calibration"),
                 f"unknown calibration source {{name!r}}; choose one of: {', '.join(SOURCES)}, file:PATH")


def with_pydoc_fallback(loader: Callable[[str], TextSource], name: str) -> TextSource:
    """Load `name`; if it is a default source (wikitext2 for evaluation, c4 for calibration) and has neither a local
    copy nor a reachable hub, use pydoc and say so."""
    try:
        return loader(name)
    except DataError as e:
        if name not in ("wikitext2", "c4") or os.environ.get("COMPRESS_DATA_DIR"):
            raise
        log.warning("%s unavailable (%s); falling back to the embedded pydoc corpus", name, e)
        src = loader("pydoc")
        src.fallback_from = name
        return src


# ---------------------------------------------------------------------------------------------------------------
# Tokenization, caching, sampling
# ---------------------------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    probe = "Hello world!\n\n = Robert Boulter = \n 3.14 <unk> 日本"
    ids = tokenizer(probe, add_special_tokens=True)["input_ids"]
    h = hashlib.sha256(json.dumps([type(tokenizer).__name__, len(tokenizer), ids]).encode())
    return h.hexdigest()[:16]


def _cache_file(kind: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / kind / f"{digest}.safetensors"


def _cached(kind: str, key: dict[str, Any], build: Callable[[], torch.Tensor], use_cache: bool = True) -> torch.Tensor:
    from safetensors.torch import save_file

    path = _cache_file(kind, key)
    if use_cache and path.is_file():
        try:
            return load_safetensors(path, "token cache entry")["ids"]
        except (FileFormatError, KeyError) as e:  # a corrupt cache entry is rebuilt
            log.warning("%s; rebuilding it", e)
            path.unlink(missing_ok=True)
    ids = build()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            save_file({"ids": ids.contiguous()}, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})
            os.replace(tmp, path)
        finally:  # Ctrl-C or a full disk: no stray temporary file
            tmp.unlink(missing_ok=True)
    return ids


def _source_key(src: TextSource) -> str:
    body = src.text if src.text else "\x00".join(src.documents or [])
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def tokenize_text(src: TextSource, tokenizer, use_cache: bool = True) -> torch.Tensor:
    """The whole text tokenized once, [1, T] int64 (the eval protocol's single tokenization)."""
    key = {"what": "eval", "src": _source_key(src), "tok": tokenizer_fingerprint(tokenizer)}

    def build() -> torch.Tensor:
        import transformers

        prev = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # silence "sequence length is longer than the maximum"
        try:
            return torch.tensor([tokenizer(src.text)["input_ids"]], dtype=torch.int64)
        finally:
            transformers.logging.set_verbosity(prev)

    return _cached("tokens", key, build, use_cache)


@dataclass
class Calibration:
    """N token sequences of length L, and how they were made (for the results record)."""

    input_ids: torch.Tensor  # [N, L] int64
    source: TextSource
    seed: int

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    def record(self) -> dict[str, Any]:
        return {**self.source.record(), "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}


def _check_counts(nsamples: int, seqlen: int) -> None:
    if nsamples < 1:
        raise ConfigError(f"--nsamples {nsamples!r} is out of range; allowed: >= 1")
    if seqlen < 2:
        raise ConfigError(f"--seqlen {seqlen!r} is out of range; allowed: >= 2")


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ's calibration sampling: random windows of seqlen tokens from one long token stream."""
    total = ids.shape[-1]
    if total <= seqlen:
        raise DataError(f"calibration text has {total} tokens, fewer than --seqlen {seqlen}")
    rng = random.Random(seed)
    flat = ids.reshape(-1)
    starts = [rng.randint(0, total - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([flat[s:s + seqlen] for s in starts])


def sample_documents(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ's C4 sampling: a random document longer than seqlen tokens, then a random window inside it."""
    rng = random.Random(seed)
    out = []
    tries = 0
    while len(out) < nsamples:
        tries += 1
        if tries > 200 * nsamples:
            raise DataError(f"fewer than {nsamples} documents longer than --seqlen {seqlen} tokens in the calibration source")
        doc = docs[rng.randint(0, len(docs) - 1)]
        enc = tokenizer(doc)["input_ids"]
        if len(enc) <= seqlen:
            continue
        s = rng.randint(0, len(enc) - seqlen - 1)
        out.append(torch.tensor(enc[s:s + seqlen], dtype=torch.int64))
    return torch.stack(out)


def check_calibration_supply(source: str, tokenizer, *, nsamples: int, seqlen: int, data_dir: str | None = None,
                             fallback: bool = False) -> dict[str, Any]:
    """Before any work: can `source` give `nsamples` windows of `seqlen` tokens without repeating text? A stream
    needs nsamples x seqlen tokens; a document source (C4) needs that many disjoint windows inside documents longer
    than seqlen. Refused with one line saying how much the source has. Returns what it has (for the log)."""
    _check_counts(nsamples, seqlen)
    if source == "generated":
        return {"source": source}
    loader = lambda n: calib_text(n, data_dir)  # noqa: E731
    src = with_pydoc_fallback(loader, source) if fallback else loader(source)
    where = f"calibration source {src.name!r} ({src.origin})"
    if src.documents is not None and not src.text:
        lengths = [len(ids) for ids in tokenizer(src.documents)["input_ids"]]
        windows = sum(n // seqlen for n in lengths if n > seqlen)
        if windows < nsamples:
            raise DataError(f"{where} has room for {windows} windows of --seqlen {seqlen} without repeats "
                            f"({len(lengths)} documents, {sum(lengths)} tokens); --nsamples {nsamples} asks for more")
        return {"source": src.name, "documents": len(lengths), "windows": windows}
    total = tokenize_text(src, tokenizer).shape[-1]
    if nsamples * seqlen > total:
        raise DataError(f"{where} has {total} tokens; --nsamples {nsamples} x --seqlen {seqlen} = {nsamples * seqlen} "
                        f"would repeat text; allowed: nsamples x seqlen <= {total}")
    return {"source": src.name, "tokens": total}


def get_calibration(source: str, tokenizer, *, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                    data_dir: str | None = None, model: torch.nn.Module | None = None, fallback: bool = False,
                    use_cache: bool = True) -> Calibration:
    """N calibration sequences of L tokens from `source`, deterministic for `seed`, cached on disk."""
    _check_counts(nsamples, seqlen)
    if source == "generated":
        if model is None:
            raise DataError("calibration source 'generated' samples from the model; no model was given")
        return generated_calibration(model, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, use_cache=use_cache)
    loader = lambda n: calib_text(n, data_dir)  # noqa: E731
    src = with_pydoc_fallback(loader, source) if fallback else loader(source)
    key = {"what": "calib", "src": _source_key(src), "tok": tokenizer_fingerprint(tokenizer), "n": nsamples, "L": seqlen,
           "seed": seed, "docs": src.documents is not None and not src.text}

    def build() -> torch.Tensor:
        if src.documents is not None and not src.text:
            return sample_documents(src.documents, tokenizer, nsamples, seqlen, seed)
        return sample_windows(tokenize_text(src, tokenizer, use_cache), nsamples, seqlen, seed)

    ids = _cached("calib", key, build, use_cache)
    return Calibration(ids, src, seed)


@torch.no_grad()
def generated_calibration(model: torch.nn.Module, tokenizer, *, nsamples: int, seqlen: int, seed: int,
                          greedy_tokens: int = 4, batch_size: int = 16, use_cache: bool = True) -> Calibration:
    """Data-free calibration (LLM-QAT, Liu et al. 2023, Sec. 2.1): start from a random vocabulary token, take the
    next few tokens greedily (top-1), then sample the rest from the model's distribution."""
    key = {"what": "generated", "model": count_parameters(model), "cfg": hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:16],
           "w": float(next(model.parameters()).float().abs().sum()), "tok": tokenizer_fingerprint(tokenizer), "n": nsamples,
           "L": seqlen, "seed": seed, "greedy": greedy_tokens}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(model.config.vocab_size) if i not in special and i < len(tokenizer)]

    def build() -> torch.Tensor:
        from tqdm.auto import tqdm

        gen = torch.Generator().manual_seed(seed)
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = []
        for b0 in tqdm(range(0, nsamples, batch_size), desc="generating calibration data", leave=False):
            bs = min(batch_size, nsamples - b0)
            first = torch.tensor([[vocab[int(i)]] for i in torch.randint(len(vocab), (bs,), generator=gen)], device=device)
            common = dict(pad_token_id=pad, use_cache=True, eos_token_id=None)  # never stop early: fixed length
            seq = model.generate(first, max_new_tokens=greedy_tokens, do_sample=False, min_new_tokens=greedy_tokens, **common)
            torch.manual_seed(seed * 1_000_003 + b0)
            seq = model.generate(seq, max_new_tokens=seqlen - seq.shape[1], min_new_tokens=seqlen - seq.shape[1],
                                 do_sample=True, top_k=0, top_p=1.0, temperature=1.0, **common)
            out.append(seq[:, :seqlen].cpu())
        return torch.cat(out)

    ids = _cached("calib", key, build, use_cache)
    src = TextSource("generated", f"sampled from the model (greedy first {greedy_tokens} tokens, then sampling)",
                     "generated", "model")
    return Calibration(ids, src, seed)
