"""rope_shift_gather: Triton kernel vs torch reference, on random K/V, both RoPE styles, partial rotary."""

import pytest
import torch

from kvblend.rope import RopeSpec, rope_shift
from kvblend.triton_kernels import rope_shift_gather, rope_shift_gather_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (src tokens, dst tokens, rows moved, kv heads, head_dim, rotary_dim)
SHAPES = [(37, 45, 29, 3, 64, 64), (23, 31, 17, 3, 64, 32), (9, 13, 7, 8, 128, 128)]


def inv_freq(rotary_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return (1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)).float()


def make_case(shape, dtype, seed=0):
    num_src, num_dst, num_rows, heads, head_dim, rotary_dim = shape
    gen = torch.Generator().manual_seed(seed)
    src_k = torch.randn(num_src, heads, head_dim, generator=gen).to(DEVICE, dtype)
    src_v = torch.randn(num_src, heads, head_dim, generator=gen).to(DEVICE, dtype)
    src_rows = torch.randperm(num_src, generator=gen)[:num_rows].to(DEVICE)
    dst_rows = torch.randperm(num_dst, generator=gen)[:num_rows].to(DEVICE)
    delta = torch.randint(-3000, 3000, (num_rows,), generator=gen).to(DEVICE)
    return src_k, src_v, src_rows, dst_rows, delta, inv_freq(rotary_dim).to(DEVICE)


def poisoned_dst(num_dst, src_k):
    shape = (num_dst, *src_k.shape[1:])
    return (torch.full(shape, float("nan"), dtype=src_k.dtype, device=DEVICE) for _ in range(2))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(shape, style, dtype):
    src_k, src_v, src_rows, dst_rows, delta, freq = make_case(shape, dtype)
    outputs = {}
    for backend in ("triton", "torch"):
        dst_k, dst_v = poisoned_dst(shape[1], src_k)
        rope_shift_gather(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, style, backend=backend)
        outputs[backend] = dst_k, dst_v
    (tri_k, tri_v), (ref_k, ref_v) = outputs["triton"], outputs["torch"]
    written = torch.zeros(shape[1], dtype=torch.bool, device=DEVICE)
    written[dst_rows] = True
    for out in (tri_k, tri_v):
        assert not out[written].isnan().any(), "a destination row was left (partly) unwritten"
        assert out[~written].isnan().all(), "a row outside dst_rows was written"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(tri_k[written], ref_k[written], rtol=tol, atol=tol)
    assert torch.equal(tri_v[written], src_v[src_rows[torch.argsort(dst_rows)]])
    assert torch.equal(ref_v[written], tri_v[written])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_reference_agrees_with_model_rope_shift(shape, style):
    src_k, src_v, src_rows, dst_rows, delta, freq = make_case(shape, torch.bfloat16, seed=1)
    dst_k, dst_v = poisoned_dst(shape[1], src_k)
    rope_shift_gather_ref(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, style)
    spec = RopeSpec(theta=10000.0, rotary_dim=shape[5], style=style)
    expected = rope_shift(src_k[src_rows], delta, spec, freq)
    assert torch.equal(dst_k[dst_rows], expected)


def test_shift_by_zero_is_identity_and_round_trip_is_close():
    shape = SHAPES[0]
    src_k, src_v, src_rows, dst_rows, delta, freq = make_case(shape, torch.float32, seed=2)
    dst_k, dst_v = poisoned_dst(shape[1], src_k)
    zero = torch.zeros_like(delta)
    rope_shift_gather(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, zero, freq, "neox", backend="triton")
    assert torch.equal(dst_k[dst_rows], src_k[src_rows])
    rope_shift_gather(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, "neox", backend="triton")
    back_k, back_v = poisoned_dst(shape[0], src_k)
    rope_shift_gather(dst_k, dst_v, dst_rows, back_k, back_v, src_rows, -delta, freq, "neox", backend="triton")
    torch.testing.assert_close(back_k[src_rows], src_k[src_rows], rtol=1e-4, atol=1e-4)


def test_strided_destination_view():
    shape = SHAPES[1]
    src_k, src_v, src_rows, dst_rows, delta, freq = make_case(shape, torch.bfloat16, seed=3)
    outputs = []
    for backend in ("triton", "torch"):
        buffer = torch.full((2, shape[1], shape[3], shape[4]), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        wide_v = torch.full((shape[1], 2 * shape[3], shape[4]), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        dst_k, dst_v = buffer[1], wide_v[:, : shape[3]]
        rope_shift_gather(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, "gptj", backend=backend)
        assert buffer[0].isnan().all() and wide_v[:, shape[3] :].isnan().all()
        outputs.append((dst_k[dst_rows], dst_v[dst_rows]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1.6e-2, atol=1.6e-2)
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_no_rows_is_a_no_op():
    src_k, src_v, _, _, _, freq = make_case(SHAPES[0], torch.float32)
    dst_k, dst_v = poisoned_dst(5, src_k)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    rope_shift_gather(src_k, src_v, empty, dst_k, dst_v, empty, empty, freq, "neox", backend="triton")
    assert dst_k.isnan().all() and dst_v.isnan().all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(style="yarn"), "rope style"),
        (lambda a: a.update(backend="cuda"), "backend"),
        (lambda a: a.update(src_rows=a["src_rows"] + 100), "src_rows"),
        (lambda a: a.update(dst_rows=a["dst_rows"] - 100), "dst_rows"),
        (lambda a: a.update(delta=a["delta"][:-1]), "delta"),
        (lambda a: a.update(delta=a["delta"].int()), "delta"),
        (lambda a: a.update(freq=torch.ones(40, device=DEVICE)), "freq"),
        (lambda a: a.update(dst_k=a["dst_k"].half()), "dtype"),
    ],
)
def test_bad_arguments_are_refused(change, message):
    src_k, src_v, src_rows, dst_rows, delta, freq = make_case(SHAPES[0], torch.float32)
    dst_k, dst_v = poisoned_dst(SHAPES[0][1], src_k)
    args = dict(src_k=src_k, src_v=src_v, src_rows=src_rows, dst_k=dst_k, dst_v=dst_v, dst_rows=dst_rows,
                delta=delta, freq=freq, style="neox", backend="triton")
    change(args)
    with pytest.raises(ValueError, match=message):
        rope_shift_gather(**args)
