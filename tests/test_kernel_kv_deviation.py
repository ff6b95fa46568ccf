"""kv_deviation: Triton kernel vs torch reference on random K/V."""

import pytest
import torch

from kvblend.triton_kernels import kv_deviation, kv_deviation_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (tokens, kv heads, head_dim)
SHAPES = [(37, 3, 64), (5, 8, 128), (1, 3, 64), (203, 1, 64)]


def random_kv(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(shape, dtype, poisoned_empty):
    k_a, v_a, k_b, v_b = random_kv(shape, dtype, seed=shape[0])
    dev_k, dev_v = kv_deviation(k_a, v_a, k_b, v_b, backend="triton")
    ref_k, ref_v = kv_deviation_ref(k_a, v_a, k_b, v_b)
    assert dev_k.dtype == dev_v.dtype == torch.float32 and dev_k.shape == (shape[0],)
    torch.testing.assert_close(dev_k, ref_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dev_v, ref_v, rtol=1e-5, atol=1e-5)


def test_reference_is_squared_l2_per_token():
    k_a, v_a, k_b, v_b = random_kv((7, 3, 64), torch.float64, seed=0)
    dev_k, dev_v = kv_deviation(k_a, v_a, k_b, v_b, backend="torch")
    for t in range(7):
        assert dev_k[t].item() == pytest.approx(((k_a[t] - k_b[t]) ** 2).sum().item(), rel=1e-6)
        assert dev_v[t].item() == pytest.approx(((v_a[t] - v_b[t]) ** 2).sum().item(), rel=1e-6)


def test_strided_views(poisoned_empty):
    k_a, v_a, k_b, v_b = random_kv((42, 6, 64), torch.bfloat16, seed=1)
    # Token-strided, head-sliced and head_dim-strided views (the last is copied before the launch).
    views = (k_a[::2, :3], v_a[:21, 3:], k_b[1::2], v_b[21:].transpose(1, 2).contiguous().transpose(1, 2))
    views = (views[0], views[1], views[2][:, :3], views[3][:, 2:5])
    dev = kv_deviation(*views, backend="triton")
    ref = kv_deviation_ref(*views)
    for got, expected in zip(dev, ref):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_identical_inputs_give_zero():
    k, v, _, _ = random_kv((13, 3, 64), torch.bfloat16, seed=2)
    dev_k, dev_v = kv_deviation(k, v, k.clone(), v.clone(), backend="triton")
    assert torch.equal(dev_k, torch.zeros_like(dev_k)) and torch.equal(dev_v, torch.zeros_like(dev_v))


def test_no_tokens():
    k_a, v_a, k_b, v_b = random_kv((0, 3, 64), torch.float32, seed=0)
    dev_k, dev_v = kv_deviation(k_a, v_a, k_b, v_b, backend="triton")
    assert dev_k.shape == dev_v.shape == (0,)


def test_mismatched_shapes_and_unknown_backend_are_refused():
    k_a, v_a, k_b, v_b = random_kv((9, 3, 64), torch.float32, seed=0)
    with pytest.raises(ValueError, match="differ"):
        kv_deviation(k_a, v_a, k_b[:8], v_b[:8], backend="triton")
    with pytest.raises(ValueError, match="K and V"):
        kv_deviation(k_a, v_a[:8], k_b, v_b, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        kv_deviation(k_a, v_a, k_b, v_b, backend="numpy")

