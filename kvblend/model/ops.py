"""The per-token ops the runner and the blend engine call, swappable as one set.

The default set is `kvblend.triton_kernels` (Triton on CUDA, the torch references elsewhere). A host with faster
kernels of its own (vLLM's C++ CPU ops, `kvblend.vllm.cpu_ops`) passes a set with the same contracts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvblend.triton_kernels import rms_norm, rope_qk, rope_shift_gather


@dataclass(frozen=True)
class ModelOps:
    """rms_norm(x, weight, eps) -> new tensor; rope_qk(q, k, cos, sin, style) -> (q, k), which may reuse q's
    and k's storage; rope_shift_gather(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, style,
    check=...) writes into dst_k/dst_v."""

    name: str = "kvblend"
    rms_norm: Callable = rms_norm
    rope_qk: Callable = rope_qk
    rope_shift_gather: Callable = rope_shift_gather

    def __post_init__(self) -> None:
        for field_name in ("rms_norm", "rope_qk", "rope_shift_gather"):
            if not callable(getattr(self, field_name)):
                raise TypeError(f"ModelOps.{field_name} must be callable, got {getattr(self, field_name)!r}")


DEFAULT_OPS = ModelOps()
