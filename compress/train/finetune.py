"""Fine-tuning data and the held-out measurement shared by adapter-training methods (QLoRA, LoRA recovery).

Data is either
* instructions: a local `.jsonl` of {"instruction", "input", "output"} records (Alpaca's fields), or, online, a
  `datasets` hub id with the same fields (`hf:tatsu-lab/alpaca`). Each record becomes prompt + response + EOS;
  the prompt's tokens are masked with -100 in the labels, so only the response is learned (QLoRA trains on the
  target only, Dettmers et al. 2023, Sec. 5 / Appendix B). The last `heldout` records are never trained on.
* or plain LM text: `train_samples` windows of the run's calibration source (compress.train.trainer.training_data), and
  `heldout` windows of that dataset's evaluation split as the held-out set.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.core.config import MethodConfig, option
from compress.core.errors import ConfigError, DataError
from compress.core.paths import read_jsonl
from compress.formats import compressed_modules
from compress.kernels.losses import Batch
from compress.layers.nf4 import is_nf4_linear
from compress.model.arch import find_blocks
from compress.sources.data import eval_text, tokenize_text, with_pydoc_fallback
from compress.train.trainer import training_data, training_source

log = logging.getLogger("compress")

# Alpaca's prompt (Taori et al. 2023), the usual template for {instruction, input, output} records.
ALPACA = {
    "with_input": ("Below is an instruction that describes a task, paired with an input that provides further context. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "no_input": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}


@dataclass
class InstructionOptions(MethodConfig):
    instructions: str | None = option(None, "instruction data: a .jsonl of {instruction, input, output} records, or "
                                            "hf:<dataset id> online; default: plain LM text of the --calib source")
    prompt_format: str = option("alpaca", "how a record becomes a prompt: alpaca (Alpaca's template) or chat (the "
                                          "tokenizer's chat template)", choices=("alpaca", "chat"))
    heldout: int = option(16, "held-out examples (instruction records or text windows) to measure the loss on",
                          range=(1, None))


def load_instructions(spec: str) -> list[dict[str, str]]:
    """Records {instruction, input, output} from a local .jsonl file or (online) a `datasets` id given as hf:ID."""
    if spec.startswith("hf:"):
        from compress.sources.data import hub_reachable

        if not hub_reachable():
            raise DataError(f"--instructions {spec!r}: the Hugging Face hub is not reachable; give a local .jsonl file")
        import datasets

        rows = list(datasets.load_dataset(spec[3:], split="train"))
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"--instructions {spec!r}: no such file (a .jsonl of {{instruction, input, output}} records, or hf:<id>)")
        rows = read_jsonl(path, strict=f"--instructions {spec!r}")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise DataError(f"--instructions {spec!r}: record {i + 1} needs string fields 'instruction' and 'output' "
                            f"('input' optional)")
        records.append({"instruction": row["instruction"], "input": str(row.get("input") or ""), "output": row["output"]})
    if not records:
        raise DataError(f"--instructions {spec!r} holds no records")
    return records


def prompt_text(record: dict[str, str], tokenizer, prompt_format: str) -> str:
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--prompt-format chat needs a tokenizer with a chat template; this one has none (use alpaca)")
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    template = ALPACA["with_input" if record["input"] else "no_input"]
    return template.format(**record)


def encode_instructions(records: list[dict[str, str]], tokenizer, seqlen: int, prompt_format: str = "alpaca") -> Batch:
    """input_ids / labels / attention_mask [N, seqlen]: prompt tokens and padding are -100 in the labels; sequences
    longer than seqlen are cut (a record whose response is cut away entirely is an error)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    ids = torch.full((len(records), seqlen), pad if pad is not None else 0, dtype=torch.int64)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, rec in enumerate(records):
        prompt = tokenizer(prompt_text(rec, tokenizer, prompt_format), add_special_tokens=prompt_format != "chat")["input_ids"]
        answer = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        seq = (prompt + answer)[:seqlen]
        if len(prompt) >= seqlen:
            raise DataError(f"instruction record {i + 1}: its prompt alone has {len(prompt)} tokens, not fewer than "
                            f"--train-seqlen {seqlen}; raise --train-seqlen")
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(prompt):len(seq)] = torch.tensor(seq[len(prompt):])
        mask[i, :len(seq)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def finetune_data(ctx: Any, model: nn.Module, config: Any) -> tuple[Batch, Batch, dict[str, Any]]:
    """(training batch, held-out batch, description for the record) for a method whose config has TrainConfig's
    and InstructionOptions' fields."""
    if config.instructions:
        records = load_instructions(config.instructions)
        if len(records) <= config.heldout:
            raise DataError(f"--instructions {config.instructions!r} has {len(records)} records; more than --heldout "
                            f"{config.heldout} are needed (the last {config.heldout} are held out)")
        train_recs, held_recs = records[:-config.heldout], records[-config.heldout:]
        train = encode_instructions(train_recs, ctx.tokenizer, config.train_seqlen, config.prompt_format)
        held = encode_instructions(held_recs, ctx.tokenizer, config.train_seqlen, config.prompt_format)
        desc = {"data": "instructions", "source": config.instructions, "prompt_format": config.prompt_format,
                "train_records": len(train_recs), "heldout_records": len(held_recs), "seqlen": config.train_seqlen}
        return train, held, desc
    ids = training_data(ctx, model, config)
    src_name = training_source(ctx)
    if src_name == "generated":
        raise ConfigError("plain-text fine-tuning needs a text source for its held-out windows; --calib generated has "
                          "none (use --instructions or another --calib)")
    loader = lambda n: eval_text(n, ctx.data_dir)  # noqa: E731
    src = with_pydoc_fallback(loader, src_name) if ctx.data_dir is None else loader(src_name)
    stream = tokenize_text(src, ctx.tokenizer)[0]
    n = min(config.heldout, stream.numel() // config.train_seqlen)
    if n < 1:
        raise DataError(f"{src.name}: its evaluation text has fewer than --train-seqlen {config.train_seqlen} tokens")
    held = {"input_ids": stream[: n * config.train_seqlen].view(n, config.train_seqlen).clone()}
    desc = {"data": "text", "train_source": src_name, "train_sequences": int(ids.shape[0]), "seqlen": config.train_seqlen,
            "heldout_source": f"{src.name} {src.split} (first {n} windows)", "heldout_sequences": n}
    return {"input_ids": ids}, held, desc


def require_float_linears(model: nn.Module, method: str, advice: str) -> None:
    """Refuse (one ConfigError) a model whose layers hold integer codes (this project's compressed modules, NF4):
    `method` trains or re-quantizes float weights."""
    # sparse layers (SparseLinear: a float weight with zeros) train like any float linear; their zeros are kept
    quantized = [n for n, m in compressed_modules(model).items()
                 if not _float_linear(m) and not getattr(m, "is_compress_transform", False)]  # the online Hadamard wraps
    quantized += [n for n, m in model.named_modules() if is_nf4_linear(m)]
    if quantized:
        raise ConfigError(f"{method} needs float linear weights; the model holds quantized layers ({quantized[0]}, ...): "
                          f"{advice}")


def _float_linear(mod: nn.Module) -> bool:
    """A linear whose weight is a float tensor it trains directly (nn.Linear, the pruners' SparseLinear), not integer
    codes (QuantLinear, bitsandbytes int8/NF4)."""
    w = getattr(mod, "weight", None)
    return isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor) and w.is_floating_point() and \
        type(w) in (torch.Tensor, nn.Parameter)


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where the decoder blocks' linear weights are exactly zero (a pruned model's masks), per module name; modules
    without zeros are left out."""
    path, blocks = find_blocks(model)
    masks = {}
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if _float_linear(mod):
                zero = mod.weight.detach() == 0
                if bool(zero.any()):
                    masks[f"{path}.{i}.{name}"] = zero
    return masks


def sparsity(masks: dict[str, torch.Tensor], model: nn.Module) -> float:
    """Fraction of zeros over the block linears of `model` (those named in masks and the others)."""
    _, blocks = find_blocks(model)
    total = sum(m.weight.numel() for b in blocks for m in b.modules() if _float_linear(m))
    return sum(int(z.sum()) for z in masks.values()) / total if total else 0.0


def keep_zeros_in_training(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[Any]:
    """Gradient hooks that zero the gradient of every masked weight: with AdamW and no weight decay on those
    entries their moments stay zero, so the weights stay exactly zero (sparsity kept through training)."""
    handles = []
    for name, zero in masks.items():
        w = model.get_submodule(name).weight
        keep = (~zero).to(w.device)
        handles.append(w.register_hook(lambda g, keep=keep: g * keep.to(g.dtype)))
    return handles


@torch.no_grad()
def reapply_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Set the masked weights back to zero (after merging dense adapter updates into pruned weights)."""
    for name, zero in masks.items():
        model.get_submodule(name).weight.masked_fill_(zero.to(model.get_submodule(name).weight.device), 0)
