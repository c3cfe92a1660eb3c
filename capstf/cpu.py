"""What this CPU's instruction set offers, which decides capstf's CPU defaults.

capstf's machines come as AVX2-only AMD EPYCs, AMD EPYCs with AVX512-BF16 and Intel Xeons with
AMX; oneDNN's convolutions, and so the fastest precision and convolution gradients, differ
between them (docs/performance.md). Read on Linux; elsewhere nothing is known, which gives the
choices for the plainest CPU.
"""
import functools

TIERS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")  # the best first


@functools.cache
def flags() -> frozenset:
    """The CPU's feature flags, as /proc/cpuinfo names them; empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has(flag: str) -> bool:
    return flag in flags()


def describe() -> str:
    """The best instruction set tier present ("amx_bf16" ... "avx2"), or "unknown"."""
    return next((tier for tier in TIERS if has(tier)), "unknown")
