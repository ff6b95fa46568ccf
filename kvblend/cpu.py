"""The host CPU: its model name, its ISA flags, the dtype a CPU engine computes in by default, and where
kvblend's background threads run.

bf16 only where the CPU computes it natively (AVX512-BF16, AMX-BF16, Arm's BF16 extension): elsewhere torch and
vLLM emulate bf16 matmuls, tens of times slower than fp32 (measured on an AVX2-only EPYC: < 1 GFLOP/s against
37 GFLOP/s, issue 18). Reads /proc/cpuinfo (Linux); where it cannot, no flags are known and the answer is fp32.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)
CPUINFO = Path("/proc/cpuinfo")
# x86: avx512_bf16 (Cooper Lake, Zen 4+), amx_bf16 (Sapphire Rapids+); aarch64: bf16 (Armv8.6 BF16 extension).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# The flags a CPU benchmark records beside its results: vector widths and the low-precision extensions.
ISA_FLAG_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "asimd", "sve", "bf16", "i8mm", "fphp")


@functools.lru_cache(maxsize=1)
def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where it cannot be read)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU's ISA flags: /proc/cpuinfo `flags` (x86) or `Features` (aarch64); empty where unknown."""
    fields = _cpuinfo_fields()
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what the platform module knows."""
    fields = _cpuinfo_fields()
    return fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()


def native_bf16(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether a CPU with these flags (default: this one's) computes bf16 natively."""
    return bool(NATIVE_BF16_FLAGS & set(cpu_flags() if flags is None else flags))


def cpu_compute_dtype(flags: frozenset[str] | set[str] | None = None) -> str:
    """The default dtype of a CPU engine (vLLM and kvblend's torch runner): "bfloat16" on a CPU with native
    bf16, else "float32". `flags` default to this CPU's; an explicit dtype from the user always wins over this."""
    return "bfloat16" if native_bf16(flags) else "float32"


def cpu_record() -> dict:
    """What a CPU benchmark records beside its results: model, core count, the ISA flags that decide its speed,
    and the compute dtype chosen from them. Ratios compare within one such machine only."""
    flags = cpu_flags()
    return {"model": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(),
            "isa": sorted(f for f in flags if f.startswith(ISA_FLAG_PREFIXES)),
            "native_bf16": native_bf16(flags), "compute_dtype": cpu_compute_dtype(flags)}


def unpin_thread() -> None:
    """Let the calling thread run on every CPU the process's cgroup allows (the kernel drops the others). A thread
    inherits its creator's affinity, and vLLM's CPU worker pins its main thread (an OpenMP thread) to one core
    before kvblend's connector starts its store: store writes and reads started there would share the core of
    the forward pass's master thread while the other cores cannot take them. Called first in kvblend's threads
    that move KV (store writer, prefetch, entry reads, layer fetch); a no-op where the OS has no thread affinity."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError as exc:  # the thread keeps its inherited CPUs: slower where it shares them, never wrong
        log.warning("kvblend: cannot widen a background thread's CPU affinity: %s", exc)
