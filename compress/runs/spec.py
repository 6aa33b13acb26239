"""The run specification: every option of a run, written once. The CLI's options (compress.cli), recipe files'
settings and grid files' `run:` / `calibration:` / `evaluation:` entries are all read from these fields.

A field's metadata describes it on the command line: `help`, the verbs that offer it (`verbs`: "run" for the
compression verbs, "eval" for `compress eval`), an optional `flag` (else --field-name), `short`, `multiple`
(repeatable flag, a list), `sep` (one comma-separated string, a list), `cli_type` (what the flag parses before
coercion; e.g. "all" or a number for --eval-windows). Booleans become --name/--no-name pairs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from compress.core.errors import ConfigError

RUN, EVAL, FIT = "run", "eval", "fit"
BOTH = (RUN, EVAL)


def option(default: Any = None, help: str = "", *, verbs: tuple[str, ...] = (RUN,), factory=None, **cli: Any):
    meta = {"help": help, "verbs": verbs, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def internal(default: Any = None, *, factory=None):
    """A field a verb sets itself (not a flag)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"verbs": ()})
    return field(default=default, metadata={"verbs": ()})


@dataclass
class RunSpec:
    """Everything that defines a run (a grid cell is one of these)."""

    kind: str = internal("quantize")  # quantize | prune | finetune | distill | recipe | eval
    stages: list[dict[str, Any]] = internal(factory=list)  # [{"method": NAME, **options}]
    model: str = option("smollm2", "hub id, local folder, .gguf file, checkpoint folder, or 'smollm2' (the offline "
                        "default)", verbs=BOTH, short="-m")
    dtype: str = option("auto", "compute dtype: auto (bfloat16), float32, bfloat16, float16", verbs=BOTH)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda[:N]", verbs=BOTH)
    calib: str = option("c4", "calibration source (C4 train, as the papers calibrate; never the evaluation text): c4, "
                        "wikitext2, wikitext2-v1, ptb, pydoc, generated, file:PATH")
    nsamples: int = option(128, "calibration sequences")
    seqlen: int = option(512, "tokens per calibration sequence")
    seed: int = option(0, "seed for calibration sampling and training")
    paper_protocol: bool = option(False, "the papers' calibration: --calib c4 --nsamples 128 --seqlen 2048, and each "
                                         "method's reference-code options (OWQ: --allocation/--sensitivity-grid "
                                         "reference) unless given")
    data_dir: str | None = option(None, "local data kit folder (else $COMPRESS_DATA_DIR, else ~/.cache/compress/data, "
                                  "else the hub)", verbs=BOTH)
    eval: list[str] = option(help="perplexity datasets, comma-separated (wikitext2, wikitext2-v1, ptb, c4, pydoc, "
                             "file:PATH); 'none' to skip", verbs=BOTH, sep=",", factory=lambda: ["wikitext2"])
    eval_seqlen: int = option(2048, "perplexity window length", verbs=BOTH)
    eval_windows: int | None = option(32, "perplexity windows to use (a cap for quick runs); 'all' for the whole split",
                                      verbs=BOTH, cli_type=str)
    eval_batch_size: int = internal(1)
    tasks: list[str] = option(help="lm-eval zero-shot tasks, comma-separated (e.g. piqa,arc_easy)", verbs=BOTH, sep=",",
                              factory=list)
    task_limit: int | None = option(None, "items per lm-eval task (a cap for quick runs)", verbs=BOTH, flag="--limit",
                                    aliases=("limit",))
    efficiency: bool = option(False, "also measure prefill/decode tokens per second, peak memory, kernel kind",
                              verbs=(EVAL,))
    quantize_embeddings: str = option("none", "after the method, quantize the token embedding (and the LM head tied "
                                      "to it, reading the same codes): 8 = int8 per row, 4 = 4-bit groups of 32",
                                      choices=("none", "8", "4"))
    baseline: bool = option(True, "measure the uncompressed model too (cached per model and protocol)")
    output: str | None = option(None, "checkpoint folder (default: checkpoints/<model>-<method>-<setting>)", short="-o")
    save: bool = option(True, "write a checkpoint")
    overwrite: bool = option(False, "replace an existing checkpoint folder")
    exports: list[str] = option(help="also write this checkpoint format (dense, gptq, compressed-tensors, ...); "
                                "repeatable", flag="--export", multiple=True, factory=list)
    gguf_requant: str | None = option(None, "with --export gguf: re-quantize the de-quantized linears to this GGUF type "
                                      "(q4_0, q4_1, q5_0, q5_1, q8_0, f16) instead of writing the method's codes; "
                                      "needed for grids with no GGUF type (3-bit, group 128, act-order, OWQ)")
    gguf_embed: str = option("auto", "with --export gguf: token embedding type (auto: q8_0 for quantized models, "
                             "f16 otherwise)", choices=("auto", "q8_0", "f16"))
    results_dir: str | None = option(None, "results store folder (default: $COMPRESS_RESULTS_DIR or ./results)",
                                     verbs=BOTH)
    batch_size: int = option(8, "calibration sequences per forward pass in the engine")
    spill: str = option("auto", "keep the activation cache in a memory-mapped file on disk",
                        choices=("auto", "always", "never"))
    stream: str = option("auto", "models larger than memory: read each decoder block from the safetensors folder when "
                         "the engine reaches it, write it compressed to the checkpoint and free it; perplexity block by "
                         "block too (layer-wise methods, float folders; auto: when the model would not fit in RAM)",
                         choices=("auto", "on", "off"))
    ignore: list[str] = option(help="regex of linear layer names to leave uncompressed; repeatable", multiple=True,
                               factory=list)
    # compress fit (verb "fit" only)
    max_bits: float | None = option(None, "budget: average bits per weight of the decoder-block linears as stored "
                                    "(codes + scales + zero points + indices)", verbs=(FIT,), cli_type=float)
    max_size: str | None = option(None, "budget: bytes of the checkpoint's safetensors files on disk, e.g. 80MB "
                                  "(10^6), 76MiB (2^20) or a byte count", verbs=(FIT,))
    fit_methods: list[str] = option(help="methods the plan may use per linear, comma-separated (rtn, gptq, hqq)",
                                    verbs=(FIT,), sep=",", factory=lambda: ["gptq", "rtn"])
    fit_bits: list[str] = option(help="candidate bit widths, comma-separated", verbs=(FIT,), sep=",",
                                 factory=lambda: ["2", "3", "4", "8"])
    fit_group_sizes: list[str] = option(help="candidate group sizes, comma-separated (-1: per output channel)",
                                        verbs=(FIT,), sep=",", factory=lambda: ["64", "128"])
    fit_sym: bool = option(False, "symmetric candidate grids", verbs=(FIT,))
    sensitivity: str = option("fisher", "per-layer cost of a candidate: fisher (output error weighted by the squared "
                              "loss gradient of each output, BRECQ eq. 10) or hessian (the layer-wise output error "
                              "tr(dW H dW^T), GPTQ eq. 1)", verbs=(FIT,), choices=("fisher", "hessian"))
    frontier: int | None = option(None, "fit N budgets evenly spaced from the smallest plan up to the budget given, "
                                  "each one a run and a point of `compress report`", verbs=(FIT,), cli_type=int)
    teacher: str | None = internal(None)
    progress: bool = option(True, "progress bars", verbs=BOTH)
    tag: str | None = internal(None)  # e.g. a grid cell key

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def build(cls, values: dict[str, Any], *, where: str = "", **fixed: Any) -> "RunSpec":
        """A spec from option values as a user writes them (CLI flags, a recipe or grid file): comma-separated
        strings or single values for list options, 'all' for --eval-windows, aliases; unknown keys refused."""
        known = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
        alias = {a: f.name for f in known.values() for a in f.metadata.get("aliases", ())}
        kw: dict[str, Any] = {}
        for key, value in values.items():
            name = alias.get(key, key)
            if name not in known:
                raise ConfigError(f"{where + ' setting ' if where else ''}{key!r} is not a run option; "
                                  f"known: {', '.join(sorted(known))}")
            kw[name] = coerce(known[name], value)
        return cls(**kw, **fixed)


# The calibration of GPTQ, AWQ, OWQ, SparseGPT, Wanda, OWL...: 128 random windows of 2048 tokens of C4's train split.
PAPER_PROTOCOL = {"calib": "c4", "nsamples": 128, "seqlen": 2048}


def apply_paper_protocol(spec: RunSpec) -> None:
    """--paper-protocol: set the papers' calibration (a conflicting value the user gave is refused) and each stage's
    method's `paper_options` where the stage does not set them. In place."""
    from compress.pipeline.method import METHODS  # here, not at the top: `compress --help` reads this module


    defaults = {f.name: f.default for f in dataclasses.fields(RunSpec)}
    for name, value in PAPER_PROTOCOL.items():
        given = getattr(spec, name)
        if given not in (defaults[name], value):
            raise ConfigError(f"--paper-protocol sets --{name.replace('_', '-')} {value}; drop --{name.replace('_', '-')} "
                              f"{given!r} or --paper-protocol")
        setattr(spec, name, value)
    for stage in spec.stages:
        cls = METHODS.get(stage.get("method")) if stage.get("method") in METHODS else None
        for key, value in (getattr(cls, "paper_options", None) or {}).items():
            stage.setdefault(key, value)


def run_fields(verb: str | None = None) -> list[dataclasses.Field]:
    """The user-settable fields, or those offered by one verb ("run" or "eval")."""
    return [f for f in dataclasses.fields(RunSpec)
            if f.metadata.get("verbs") and (verb is None or verb in f.metadata["verbs"])]


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """A user-written value of field `f` as the spec stores it."""
    meta = f.metadata
    if meta.get("sep"):
        items = value if isinstance(value, (list, tuple)) else str(value or "").split(meta["sep"])
        return [str(x).strip() for x in items if str(x).strip() and str(x).strip().lower() != "none"]
    if meta.get("multiple"):
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else ([] if value is None else [str(value)])
    if meta.get("choices") and value is not None and not isinstance(value, str):
        value = str(value)  # e.g. `quantize_embeddings: 8` in a YAML file
    if f.name == "eval_windows":
        if value is None or str(value).lower() == "all":
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--eval-windows {value!r} is not a number or 'all'") from None
    return value
