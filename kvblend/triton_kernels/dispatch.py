"""Backend choice for every op: the Triton kernel or its torch reference."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel.

    "auto" picks Triton for CUDA tensors when triton is installed, "triton" forces it (CPU tensors
    then need TRITON_INTERPRET=1 set before kvblend.triton_kernels is imported), "torch" never.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise ValueError("backend='triton' asked for, but triton is not installed")
    if not on_cuda and not INTERPRETING:
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before import)")
    return True
