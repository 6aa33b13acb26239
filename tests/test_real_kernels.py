"""Real-model checks of the integer kernels and the quantized embeddings on SmolLM2-135M-Instruct (run with --real;
small samples: perplexity on 2 windows of 512 tokens of WikiText-2 raw test, bfloat16).

* Perplexity through the kernels agrees with perplexity through the de-quantization fallback to 1e-2 relative, for
  RTN W4 g64 (int4 kernel, groups of 64), W4 g128 (width 576: a last group of 64, run as kernel groups of 64) and W8
  per channel (int8 kernel). Not to the issue's 1e-3: the kernels take bfloat16 scales (and zeros), the fallback
  rounds each de-quantized weight to bfloat16, and on 2 windows these two bf16-level roundings move perplexity by
  0.2-0.8% (measured 2026-12-01: W8 28.449 vs 28.211, W4 g64 38.526 vs 38.662), the same size as bf16 vs float32
  compute of the same weights (28.353, 38.890). 4-bit asymmetric g32 would be lossless on this model (GGUF Q4_1).
* In float32 compute (RTN W4 g64 on the int4 kernel, W8 per channel on the int8 kernel, 1 window) the kernel and
  the fallback agree to 1e-3 relative (1 window of 256 tokens): the gap above is bf16 rounding, not the kernels.
  Both comparisons force the int4 kernel for every call (by default calls of more than 256 rows de-quantize).
* The default 4-bit checkpoint (RTN w4 g128) with --quantize-embeddings 8 is <= 85 MiB on disk, reloads onto the
  kernels, and answers a chat prompt.
"""
import copy
from unittest import mock

import pytest

from compress.evals.perplexity import perplexity
from compress.layers.kernels import select_kernels
from compress.pipeline.recipe import Recipe, RunContext

pytestmark = pytest.mark.real


def _ppl(model, tok, data_dir, windows=2, seqlen=512):
    return perplexity(model, tok, "wikitext2", seqlen=seqlen, max_windows=windows, data_dir=str(data_dir),
                      fallback=False, progress=False)["value"]


def _kernel_for_every_call():
    """The CPU int4 and int8 kernels for calls of any row count (by default a 512-token window de-quantizes, which is
    faster there: compress.kernels.weight_only.CPU_MAX_ROWS), so that the comparison goes through the kernel."""
    import contextlib

    import torch

    from compress.kernels import weight_only
    stack = contextlib.ExitStack()
    for limits in weight_only.CPU_MAX_ROWS.values():
        stack.enter_context(mock.patch.dict(limits, {torch.bfloat16: 10**9, torch.float32: 10**9}))
    return stack


@pytest.mark.parametrize("bits,group,kernel", [(4, 64, "int4"), (4, 128, "int4"), (8, -1, "int8")])
def test_kernel_and_fallback_perplexity_agree(real_loaded, data_dir, bits, group, kernel):
    model = Recipe.from_specs([{"method": "rtn", "bits": bits, "group_size": group}]).run(
        copy.deepcopy(real_loaded.model), RunContext(progress=False))
    table = select_kernels(model, quiet=True)
    assert all(f"{kernel} weight-only kernel" in k for k in table.values()), set(table.values())
    with _kernel_for_every_call():
        with_kernel = _ppl(model, real_loaded.tokenizer, data_dir)
    select_kernels(model, enable=False, quiet=True)
    with_fallback = _ppl(model, real_loaded.tokenizer, data_dir)
    assert abs(with_kernel - with_fallback) / with_fallback < 1e-2, (with_kernel, with_fallback)


def test_default_4bit_checkpoint_with_int8_embeddings(real_loaded, tmp_path):
    from compress.formats.native import load_checkpoint, save_checkpoint
    from compress.layers.quant_embedding import quantize_embeddings
    from compress.runs.generate import generate

    model = Recipe.from_specs([{"method": "rtn", "bits": 4, "group_size": 128}]).run(
        copy.deepcopy(real_loaded.model), RunContext(progress=False))
    quantize_embeddings(model, 8)
    out = save_checkpoint(model, real_loaded.tokenizer, tmp_path / "w4-emb8")
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert size <= 85 * 2**20, size / 2**20
    back, _, _ = load_checkpoint(out)
    assert "int8 weight-only" in back.get_output_embeddings().kernel
    r = generate(str(out), "What is the capital of France?", chat=True, max_new_tokens=16)
    assert "Paris" in r["text"], r["text"]


@pytest.mark.parametrize("bits,group,kernel", [(4, 64, "int4"), (8, -1, "int8")])
def test_kernel_and_fallback_perplexity_agree_in_float32(real_loaded, data_dir, bits, group, kernel):
    """In float32 compute (the kernels take float32 activations and float32 scales) the bf16 roundings are gone and
    the kernel and the fallback agree to the issue's 1e-3 relative."""
    import torch

    model = copy.deepcopy(real_loaded.model).float()
    model = Recipe.from_specs([{"method": "rtn", "bits": bits, "group_size": group}]).run(
        model, RunContext(progress=False, model_dtype=torch.float32))
    table = select_kernels(model, quiet=True)
    quant = [k for k in table.values() if "weight-only kernel" in k]
    assert len(quant) == 210 and all(f"{kernel} weight-only kernel" in k and "float32 inputs" in k for k in quant), \
        set(table.values())
    # 1 window of 256 tokens: the CPU int4 kernel's float32 path is slow at many rows (2 windows of 512 took over 5
    # minutes per grid on the shared 2-core CPU, 2026-12-02)
    with _kernel_for_every_call():
        with_kernel = _ppl(model, real_loaded.tokenizer, data_dir, windows=1, seqlen=256)
    select_kernels(model, enable=False, quiet=True)
    with_fallback = _ppl(model, real_loaded.tokenizer, data_dir, windows=1, seqlen=256)
    print(f"float32 {kernel} kernel {with_kernel:.4f} vs fallback {with_fallback:.4f}")
    assert abs(with_kernel - with_fallback) / with_fallback < 1e-3, (with_kernel, with_fallback)
