"""paged_kv_write / paged_kv_read: Triton kernel vs torch reference for the "flash", "cpu_attn" and "packed"
layouts."""

import pytest
import torch

from kvblend.triton_kernels import paged_kv_read, paged_kv_read_ref, paged_kv_write, paged_kv_write_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_BLOCKS, BLOCK_SIZE = 7, 16
# (tokens, kv heads, head_dim)
SHAPES = [(29, 3, 64), (5, 8, 128)]
DTYPES = [torch.float32, torch.bfloat16]


def cache_shape(layout, heads, head_dim):
    if layout == "flash":
        return (2, NUM_BLOCKS, BLOCK_SIZE, heads, head_dim)
    return (NUM_BLOCKS, heads, BLOCK_SIZE, 2 * head_dim)


def make_case(shape, dtype, seed, padding=3):
    """Random K/V, distinct random slots with `padding` of them set to -1, and the generator to go on with."""
    tokens, heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    v = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:tokens]
    slots[torch.randperm(tokens, generator=gen)[: min(padding, tokens - 1)]] = -1
    return k, v, slots.to(DEVICE), gen


def random_cache(layout, shape, dtype, gen):
    return torch.randn(cache_shape(layout, *shape[1:]), generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("layout", ["flash", "cpu_attn", "packed"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_matches_reference_and_touches_only_its_slots(layout, shape, dtype):
    k, v, slots, gen = make_case(shape, dtype, seed=shape[0])
    cache = random_cache(layout, shape, dtype, gen)
    tri, ref = cache.clone(), cache.clone()
    paged_kv_write(k, v, tri, slots, layout, backend="triton")
    paged_kv_write_ref(k, v, ref, slots, layout)
    assert torch.equal(tri, ref)

    poisoned = torch.full_like(cache, float("nan"))
    paged_kv_write(k, v, poisoned, slots, layout, backend="triton")
    written = int((slots >= 0).sum()) * 2 * shape[1] * shape[2]
    assert int((~poisoned.isnan()).sum()) == written


@pytest.mark.parametrize("layout", ["flash", "cpu_attn", "packed"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_read_after_write_is_bit_exact(layout, shape, dtype, poisoned_empty):
    k, v, slots, gen = make_case(shape, dtype, seed=shape[0] + 1)
    cache = random_cache(layout, shape, dtype, gen)
    paged_kv_write(k, v, cache, slots, layout, backend="triton")
    valid = slots >= 0
    for backend in ("triton", "torch"):
        read_k, read_v = paged_kv_read(cache, slots[valid], layout, shape[1], shape[2], backend=backend)
        assert torch.equal(read_k, k[valid]) and torch.equal(read_v, v[valid])
    other = torch.tensor([s for s in range(NUM_BLOCKS * BLOCK_SIZE) if s not in set(slots.tolist())], device=DEVICE)
    tri = paged_kv_read(cache, other, layout, shape[1], shape[2], backend="triton")
    ref = paged_kv_read_ref(cache, other, layout, shape[1], shape[2])
    assert torch.equal(tri[0], ref[0]) and torch.equal(tri[1], ref[1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cpu_attn_stores_k_transposed_and_v_row_major(backend):
    shape = (11, 3, 64)
    k, v, slots, gen = make_case(shape, torch.float32, seed=5)
    cache = random_cache("cpu_attn", shape, torch.float32, gen)
    paged_kv_write(k, v, cache, slots, "cpu_attn", backend=backend)
    blocks, heads, size, width = cache.shape
    head_dim = width // 2
    k_half = cache.view(blocks, heads, 2, size * head_dim)
    v_half = cache.view(blocks, heads, 2, size, head_dim)
    for t in torch.nonzero(slots >= 0).flatten().tolist():
        b, o = divmod(int(slots[t]), BLOCK_SIZE)
        for h in range(heads):
            for d in (0, 1, 37, head_dim - 1):
                assert k_half[b, h, 0].view(head_dim, size)[d, o] == k[t, h, d]
            assert torch.equal(v_half[b, h, 1, o, :], v[t, h])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("order", ["HND", "NHD"])
def test_packed_stores_k_then_v_in_the_last_dim_in_either_stride_order(backend, order):
    """vLLM's GPU backends: [blocks, heads, block_size, 2 * head_dim], K in the first half of the last dim, allocated
    heads-major (HND) or offsets-major (NHD, a transposed view)."""
    shape = (23, 3, 64)
    k, v, slots, gen = make_case(shape, torch.bfloat16, seed=10)
    if order == "HND":
        cache = torch.randn(NUM_BLOCKS, 3, BLOCK_SIZE, 128, generator=gen).to(DEVICE, torch.bfloat16)
    else:
        cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, 3, 128, generator=gen).to(DEVICE, torch.bfloat16).transpose(1, 2)
    before = cache.clone()
    paged_kv_write(k, v, cache, slots, "packed", backend=backend)
    touched = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, dtype=torch.bool)
    for t in torch.nonzero(slots >= 0).flatten().tolist():
        b, o = divmod(int(slots[t]), BLOCK_SIZE)
        touched[b, o] = True
        assert torch.equal(cache[b, :, o, :64], k[t]) and torch.equal(cache[b, :, o, 64:], v[t])
    untouched = (~touched.to(DEVICE))[:, None, :, None].expand_as(cache)
    assert torch.equal(cache[untouched], before[untouched])
    valid = slots >= 0
    read_k, read_v = paged_kv_read(cache, slots[valid], "packed", 3, 64, backend=backend)
    assert torch.equal(read_k, k[valid]) and torch.equal(read_v, v[valid])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_flash_stores_k_then_v_by_block_and_offset(backend):
    shape = (11, 3, 64)
    k, v, slots, gen = make_case(shape, torch.bfloat16, seed=6)
    cache = random_cache("flash", shape, torch.bfloat16, gen)
    paged_kv_write(k, v, cache, slots, "flash", backend=backend)
    for t in torch.nonzero(slots >= 0).flatten().tolist():
        b, o = divmod(int(slots[t]), BLOCK_SIZE)
        assert torch.equal(cache[0, b, o], k[t]) and torch.equal(cache[1, b, o], v[t])


def test_flash_cache_with_permuted_strides():
    shape = (29, 3, 64)
    k, v, slots, gen = make_case(shape, torch.bfloat16, seed=7)
    blocks_first = torch.randn(NUM_BLOCKS, 2, BLOCK_SIZE, 3, 64, generator=gen).to(DEVICE, torch.bfloat16)
    tri = blocks_first.clone().transpose(0, 1)
    ref = blocks_first.clone().transpose(0, 1)
    paged_kv_write(k, v, tri, slots, "flash", backend="triton")
    paged_kv_write_ref(k, v, ref, slots, "flash")
    assert torch.equal(tri, ref)
    valid = slots >= 0
    read_k, read_v = paged_kv_read(tri, slots[valid], "flash", 3, 64, backend="triton")
    assert torch.equal(read_k, k[valid]) and torch.equal(read_v, v[valid])


def test_all_padding_and_no_tokens():
    shape = (4, 3, 64)
    k, v, _, gen = make_case(shape, torch.float32, seed=8)
    cache = torch.full(cache_shape("flash", 3, 64), float("nan"), device=DEVICE)
    paged_kv_write(k, v, cache, torch.full((4,), -1, device=DEVICE), "flash", backend="triton")
    paged_kv_write(k[:0], v[:0], cache, torch.zeros(0, dtype=torch.int64, device=DEVICE), "flash", backend="triton")
    assert cache.isnan().all()
    read_k, read_v = paged_kv_read(cache, torch.zeros(0, dtype=torch.int64, device=DEVICE), "flash", 3, 64,
                                   backend="triton")
    assert read_k.shape == read_v.shape == (0, 3, 64)


@pytest.mark.parametrize(
    "layout, cache_dims, message",
    [
        ("paged", (2, NUM_BLOCKS, BLOCK_SIZE, 3, 64), "unknown KV cache layout 'paged'"),
        ("flash", (NUM_BLOCKS, 3, BLOCK_SIZE, 128), r"\(7, 3, 16, 128\) does not match layout 'flash'"),
        ("flash", (2, NUM_BLOCKS, BLOCK_SIZE, 4, 64), "does not match layout 'flash'"),
        ("cpu_attn", (2, NUM_BLOCKS, BLOCK_SIZE, 3, 64), r"\(2, 7, 16, 3, 64\) does not match layout 'cpu_attn'"),
        ("cpu_attn", (NUM_BLOCKS, 3, BLOCK_SIZE, 64), "does not match layout 'cpu_attn'"),
        ("packed", (NUM_BLOCKS, 4, BLOCK_SIZE, 128), r"\(7, 4, 16, 128\) does not match layout 'packed'"),
        ("packed", (NUM_BLOCKS, 3, BLOCK_SIZE, 64), "does not match layout 'packed'"),
    ],
)
def test_wrong_layout_or_shape_is_refused(layout, cache_dims, message):
    k, v, slots, _ = make_case((9, 3, 64), torch.float32, seed=9)
    cache = torch.zeros(cache_dims, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        paged_kv_write(k, v, cache, slots, layout)
    with pytest.raises(ValueError, match=message):
        paged_kv_read(cache, slots.clamp(min=0), layout, 3, 64)


@pytest.mark.parametrize("layout", ["flash", "cpu_attn", "packed"])
def test_bad_slots_dtype_or_backend_are_refused(layout):
    k, v, slots, _ = make_case((9, 3, 64), torch.float32, seed=10)
    cache = torch.zeros(cache_shape(layout, 3, 64), device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_kv_write(k, v, cache, torch.where(slots < 0, NUM_BLOCKS * BLOCK_SIZE, slots), layout)
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_kv_write(k, v, cache, torch.where(slots < 0, -2, slots), layout)
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_kv_write(k, v, cache, slots.int(), layout)
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_kv_write(k, v, cache, slots[:-1], layout)
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_kv_read(cache, slots, layout, 3, 64)
    with pytest.raises(ValueError, match="dtype"):
        paged_kv_write(k.bfloat16(), v.bfloat16(), cache, slots, layout)
    with pytest.raises(ValueError, match="backend"):
        paged_kv_write(k, v, cache, slots, layout, backend="gpu")
