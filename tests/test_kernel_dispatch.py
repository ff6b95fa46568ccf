"""Backend choice of the kernel ops, and the package importing (on torch references) without triton."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvblend.triton_kernels import HAS_TRITON
from kvblend.triton_kernels.dispatch import INTERPRETING, use_triton

NO_TRITON_SCRIPT = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
import kvblend.triton_kernels as kernels
assert not kernels.HAS_TRITON
k, v = torch.randn(5, 3, 64), torch.randn(5, 3, 64)
dev_k, _ = kernels.kv_deviation(k, v, k, v)
assert torch.equal(dev_k, torch.zeros(5))
out = kernels.sparse_query_attention(torch.randn(2, 9, 64), torch.tensor([1, 4]), k, v, torch.arange(5))
assert out.shape == (2, 9, 64) and not out.isnan().any()
try:
    kernels.kv_deviation(k, v, k, v, backend="triton")
except ValueError as error:
    assert "not installed" in str(error)
else:
    raise AssertionError("backend='triton' without triton was accepted")
print("ok")
"""


def test_backend_choice():
    cpu = torch.zeros(1)
    assert HAS_TRITON
    assert not use_triton("auto", cpu)
    assert not use_triton("torch", cpu)
    if INTERPRETING:
        assert use_triton("triton", cpu)
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            use_triton("triton", cpu)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        use_triton("cuda", cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA tensors")
def test_auto_picks_triton_for_cuda_tensors():
    assert use_triton("auto", torch.zeros(1, device="cuda"))
    assert not use_triton("auto", torch.zeros(1, device="cuda"), torch.zeros(1))


def test_package_imports_and_runs_without_triton():
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", NO_TRITON_SCRIPT], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
