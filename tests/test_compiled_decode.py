"""Static KV cache + torch.compile'd decode step (compress.evals.compiled_decode): the same greedy tokens as the eager
loop, the integer weight-only kernels kept as kernel calls inside the compiled graph, one-line errors."""
from __future__ import annotations

import copy

import pytest
import torch

from compress.core.errors import ConfigError
from compress.evals.compiled_decode import StaticDecoder, compiler_missing
from compress.evals.efficiency import greedy_decode, kernel_report
from compress.model.tiny import tiny_model
from compress.pipeline.recipe import Recipe, RunContext


def _model(spec: dict | None) -> torch.nn.Module:
    m = tiny_model(seed=0, hidden=128, intermediate=256, heads=4, kv_heads=2)
    with torch.no_grad():  # larger block weights, so greedy decoding does not just repeat one token
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                mod.weight.mul_(5)
    if spec:
        m = Recipe.from_specs([spec]).run(copy.deepcopy(m), RunContext(progress=False, model_dtype=torch.float32))
    return m.eval()


def _needs_compiler():
    why = compiler_missing()
    if why:
        pytest.skip(f"torch.compile unavailable: {why}")


@pytest.mark.parametrize("spec, op", [({"method": "rtn", "bits": 4, "group_size": 64}, "int4"),
                                      ({"method": "rtn", "bits": 8, "group_size": -1}, "int8")])
def test_compiled_decode_matches_eager_greedy_tokens(spec, op):
    _needs_compiler()
    from torch._inductor.utils import run_and_get_code

    m = _model(spec)
    kinds = " ".join(kernel_report(m)["layers"])
    assert f"{op} weight-only kernel" in kinds  # the layers run their kernel (float32 activations)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    eager, _, _ = greedy_decode(m, prompt, 12)
    assert len(set(eager)) > 3  # a real sequence, not one token repeated
    static = StaticDecoder(m, 9 + 12, compile=False).generate(prompt, 12)[0]
    dec = StaticDecoder(m, 9 + 12, compile=True)
    compiled, codes = run_and_get_code(dec.generate, prompt, 12)
    tokens = compiled[0]
    assert static == eager and tokens == eager
    assert dec.compile_seconds is not None and dec.compile_seconds > 0 and dec.timed_steps == 10
    assert dec.generate(prompt, 12)[0] == eager  # the cache resets; the compiled step is reused
    calls = [line for line in "\n".join(codes).splitlines()
             if "(" in line and not line.lstrip().startswith(("#", "assert_size_stride"))]
    # inductor lowers aten._weight_int4pack_mm_for_cpu to the same ATen kernel (its group size as a tensor)
    names = {"int4": ("int4mm_packed_weight_cpu", "_weight_int4pack_mm"), "int8": ("_weight_int8pack_mm",)}[op]
    n_calls = sum(any(n in line for n in names) for line in calls)
    assert n_calls == 14, n_calls  # 2 blocks x 7 linears: every one a kernel call, none decomposed


def test_static_decoder_bad_input_one_line():
    m = _model(None)
    with pytest.raises(ConfigError, match="exceeds the model's 512 positions"):
        StaticDecoder(m, 10_000, compile=False)
    dec = StaticDecoder(m, 8, compile=False)
    with pytest.raises(ConfigError, match="exceed the cache's 8 positions"):
        dec.generate(torch.zeros(1, 6, dtype=torch.long), 4)
    with pytest.raises(ConfigError, match="batch 1 only"):
        dec.generate(torch.zeros(2, 3, dtype=torch.long), 2)
