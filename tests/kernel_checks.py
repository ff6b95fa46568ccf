"""Comparison shared by the element-wise kernel tests."""

import torch


def assert_kernel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tolerance: dict) -> None:
    """A fresh contiguous output of the right dtype and shape, free of NaN (poison), within (rtol, atol)."""
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert not out.isnan().any()
    rtol, atol = tolerance[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
