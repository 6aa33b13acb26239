"""The host CPU's instruction-set flags (Linux /proc/cpuinfo), read once: which integer and bfloat16 paths pay here.

oneDNN picks its kernels by ISA, and some of the choices this package makes depend on them: with AMX tiles
(`amx_bf16`, `amx_int8`) the bf16 GEMM is several times faster than without, and oneDNN's int8 GEMM with signed int8
activations has a native kernel; without AMX that GEMM runs oneDNN's reference implementation (`ref_int8`: measured
4.1 s for one 256 x 576 x 1536 call on an AVX512-VNNI AMD EPYC, against 0.8 ms for torch._int_mm).
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's flags (empty where /proc/cpuinfo is not readable, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_cpu_flag(name: str) -> bool:
    return name in cpu_flags()
