"""sparse_query_attention: Triton kernel vs torch reference; causal by absolute position, GQA, (un)sorted keys."""

import math

import pytest
import torch

from kvblend.triton_kernels import attention_bands, sparse_query_attention, sparse_query_attention_ref
from kvblend.triton_kernels.sparse_attention import tile_key_bounds, tile_key_bounds_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (queries, keys, query heads, kv heads, head_dim)
SHAPES = [(37, 101, 9, 3, 64), (5, 70, 32, 8, 128), (70, 150, 4, 4, 64), (9, 65, 6, 1, 64)]


def make_case(shape, dtype, seed, keys_sorted=True):
    """Random q/k/v; keys at positions 0..S-1 (shuffled unless keys_sorted); queries at a random subset of them."""
    queries, keys, heads, kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(queries, heads, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(keys, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(keys, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k_pos = torch.arange(keys) if keys_sorted else torch.randperm(keys, generator=gen)
    q_pos = torch.randperm(keys, generator=gen)[:queries].sort().values
    return q, q_pos.to(DEVICE), k, v, k_pos.to(DEVICE)


def check_close(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(shape, dtype, poisoned_empty):
    q, q_pos, k, v, k_pos = make_case(shape, dtype, seed=shape[0])
    ref = sparse_query_attention(q, q_pos, k, v, k_pos, backend="torch")
    check_close(sparse_query_attention(q, q_pos, k, v, k_pos, backend="triton"), ref, dtype)
    check_close(sparse_query_attention(q, q_pos, k, v, k_pos, backend="triton", keys_sorted=True), ref, dtype)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_unsorted_keys_and_queries(shape, poisoned_empty):
    q, _, k, v, k_pos = make_case(shape, torch.bfloat16, seed=1, keys_sorted=False)
    q_pos = torch.randint(0, shape[1], (shape[0],), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out = sparse_query_attention(q, q_pos, k, v, k_pos, backend="triton")
    check_close(out, sparse_query_attention_ref(q, q_pos, k, v, k_pos, 1 / math.sqrt(shape[4])), torch.bfloat16)


def test_reference_is_causal_softmax_by_position():
    q, q_pos, k, v, k_pos = make_case((6, 20, 4, 2, 64), torch.float64, seed=3, keys_sorted=False)
    out = sparse_query_attention_ref(q, q_pos, k, v, k_pos, scale=0.3)
    for i in range(6):
        for h in range(4):
            visible = k_pos <= q_pos[i]
            weights = torch.softmax((k[visible, h // 2] @ q[i, h]) * 0.3, dim=0)
            torch.testing.assert_close(out[i, h], weights @ v[visible, h // 2], rtol=1e-5, atol=1e-5)


def test_custom_scale(poisoned_empty):
    q, q_pos, k, v, k_pos = make_case(SHAPES[0], torch.float32, seed=4)
    out = sparse_query_attention(q, q_pos, k, v, k_pos, scale=0.05, backend="triton")
    check_close(out, sparse_query_attention_ref(q, q_pos, k, v, k_pos, 0.05), torch.float32)


@pytest.mark.parametrize("keys_sorted", [False, True])
def test_query_with_no_visible_key_gets_zeros(keys_sorted, poisoned_empty):
    q, q_pos, k, v, k_pos = make_case(SHAPES[0], torch.bfloat16, seed=5)
    k_pos = k_pos + 10
    q_pos[:4] = torch.tensor([-1, 0, 5, 9])
    ref = sparse_query_attention(q, q_pos, k, v, k_pos, backend="torch")
    out = sparse_query_attention(q, q_pos, k, v, k_pos, backend="triton", keys_sorted=keys_sorted)
    assert torch.equal(ref[:4], torch.zeros_like(ref[:4]))
    check_close(out, ref, torch.bfloat16)


def test_no_queries():
    q, q_pos, k, v, k_pos = make_case(SHAPES[0], torch.float32, seed=6)
    out = sparse_query_attention(q[:0], q_pos[:0], k, v, k_pos, backend="triton")
    assert out.shape == (0, 9, 64)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(q=a["q"][:, :8]), "multiple"),
        (lambda a: a.update(q=a["q"][..., :48], k=a["k"][..., :48], v=a["v"][..., :48]), "power of two"),
        (lambda a: a.update(q=a["q"].half()), "dtype"),
        (lambda a: a.update(q_pos=a["q_pos"][:-1]), "q_pos"),
        (lambda a: a.update(k_pos=a["k_pos"].int()), "k_pos"),
        (lambda a: a.update(v=a["v"][:-1]), "K and V"),
        (lambda a: a.update(backend="flash"), "backend"),
    ],
)
def test_bad_arguments_are_refused(change, message):
    q, q_pos, k, v, k_pos = make_case(SHAPES[0], torch.float32, seed=7)
    args = dict(q=q, q_pos=q_pos, k=k, v=v, k_pos=k_pos, backend="triton")
    change(args)
    with pytest.raises(ValueError, match=message):
        sparse_query_attention(**args)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys_sorted", [True, False])
def test_cpu_serving_path_matches_reference(shape, dtype, keys_sorted):
    """backend="auto" on CPU tensors: SDPA per position band with reusable masks (every query sees its own key)."""
    q, q_pos, k, v, k_pos = make_case(shape, dtype, seed=7, keys_sorted=keys_sorted)
    q, q_pos, k, v, k_pos = (t.cpu() for t in (q, q_pos, k, v, k_pos))
    ref = sparse_query_attention(q, q_pos, k, v, k_pos, backend="torch")
    check_close(sparse_query_attention(q, q_pos, k, v, k_pos, keys_sorted=keys_sorted), ref, dtype)
    bands = attention_bands(q_pos, k_pos, dtype, keys_sorted)
    assert len(bands.bounds) == (4 if keys_sorted and shape[0] >= 8 else 1)
    for _ in range(2):  # the same bands serve several layers
        check_close(sparse_query_attention(q, q_pos, k, v, k_pos, keys_sorted=keys_sorted, bands=bands), ref, dtype)


def test_cpu_serving_path_refuses_bands_of_other_rows():
    q, q_pos, k, v, k_pos = (t.cpu() for t in make_case(SHAPES[0], torch.float32, seed=8))
    bands = attention_bands(q_pos[:-3], k_pos, torch.float32, True)
    with pytest.raises(ValueError, match="do not fit"):
        sparse_query_attention(q, q_pos, k, v, k_pos, keys_sorted=True, bands=bands)


@pytest.mark.parametrize("keys_sorted", [True, False])
def test_tile_key_bounds_are_tight(keys_sorted):
    """Keys before `full` are visible to every query of the tile, keys from `end` on to none, both tight."""
    gen = torch.Generator().manual_seed(9)
    k_pos = torch.randint(0, 400, (300,), generator=gen).sort().values  # gaps and repeated positions
    q_pos = torch.randint(-5, 420, (53,), generator=gen)
    full, end = tile_key_bounds(q_pos, k_pos, 8, keys_sorted)
    assert full.shape == end.shape == (7,)
    for tile in range(7):
        pos = q_pos[tile * 8 : tile * 8 + 8]
        visible = k_pos[None, :] <= pos[:, None]
        if keys_sorted:
            assert int(full[tile]) == int(visible.all(dim=0).sum())
            assert int(end[tile]) == int(visible.any(dim=0).nonzero().max()) + 1 if visible.any() else int(end[tile]) == 0
        else:
            assert (int(full[tile]), int(end[tile])) == (0, 300)


@pytest.mark.parametrize("keys_sorted", [True, False])
@pytest.mark.parametrize("probes", [16, 256])
def test_in_kernel_bounds_match_reference(keys_sorted, probes):
    """The bounds each attention program searches for itself equal tile_key_bounds; 16 probes over 300 keys
    make the counted stretch (19 keys) longer than one probe vector."""
    gen = torch.Generator().manual_seed(12)
    k_pos = torch.randint(0, 400, (300,), generator=gen).sort().values.to(DEVICE)
    for q_pos, tokens_per_tile in ((torch.randint(-5, 420, (53,), generator=gen), 8),
                                   (torch.randint(0, 400, (70,), generator=gen).sort().values, 32),
                                   (torch.tensor([-3, 399, 400, 1000]), 3)):
        q_pos = q_pos.to(DEVICE)
        expected = tile_key_bounds(q_pos, k_pos, tokens_per_tile, keys_sorted)
        found = tile_key_bounds_triton(q_pos, k_pos, tokens_per_tile, keys_sorted, probes)
        assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])


@pytest.mark.parametrize("config", [None, {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2,
                                            "tma": False}])
def test_unmasked_and_masked_key_tiles(config, poisoned_empty):
    """Queries late in a long prompt (repeated positions included, as padded CUDA-graph rows are): most key tiles
    take the unmasked path, the band around each tile's positions the masked one."""
    gen = torch.Generator().manual_seed(10)
    q, _, k, v, k_pos = make_case((70, 300, 8, 2, 64), torch.bfloat16, seed=11)
    q_pos = torch.cat([torch.full((5,), 140), torch.randperm(160, generator=gen)[:65] + 140]).sort().values.to(DEVICE)
    ref = sparse_query_attention_ref(q, q_pos, k, v, k_pos, 1 / math.sqrt(64))
    check_close(sparse_query_attention(q, q_pos, k, v, k_pos, backend="triton", keys_sorted=True, config=config),
                ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_descriptor_loads(dtype, poisoned_empty):
    """tma=True: K/V tiles through tensor descriptors of K/V views with heads packed (as slices of a fused QKV)."""
    queries, keys, heads, kv_heads, head_dim = 33, 150, 8, 2, 64
    gen = torch.Generator().manual_seed(13)
    qkv = torch.randn(keys, heads + 2 * kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k, v = qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    q = torch.randn(queries, heads, head_dim, generator=gen).to(DEVICE, dtype)
    k_pos = torch.arange(keys, device=DEVICE)
    q_pos = torch.randperm(keys, generator=gen)[:queries].sort().values.to(DEVICE)
    ref = sparse_query_attention_ref(q, q_pos, k, v, k_pos, 1 / math.sqrt(head_dim))
    out = sparse_query_attention(q, q_pos, k, v, k_pos, backend="triton", keys_sorted=True,
                                 config={"BLOCK_M": 32, "BLOCK_N": 32, "tma": True})
    check_close(out, ref, dtype)


GLUON_SHAPES = [(37, 101, 8, 2, 64), (90, 700, 16, 8, 64), (300, 2000, 32, 8, 128), (5, 70, 32, 8, 128), (700, 1500, 8, 8, 128),
                (129, 3000, 16, 2, 128), (1238, 8256, 32, 8, 128)]


def gluon_case(shape, dtype, seed, keys_sorted):
    """Random q/k/v; keys at sorted positions with gaps (shuffled unless keys_sorted); queries at random positions,
    some before the first key, repeated ones included."""
    queries, keys, heads, kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(queries, heads, head_dim, generator=gen).to("cuda", dtype)
    k = torch.randn(keys, kv_heads, head_dim, generator=gen).to("cuda", dtype)
    v = torch.randn(keys, kv_heads, head_dim, generator=gen).to("cuda", dtype)
    k_pos = torch.randperm(2 * keys, generator=gen)[:keys].sort().values + 3
    if not keys_sorted:
        k_pos = k_pos[torch.randperm(keys, generator=gen)]
    q_pos = torch.randint(0, 2 * keys + 6, (queries,), generator=gen).sort().values
    return q, q_pos.to("cuda"), k, v, k_pos.to("cuda")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the Gluon kernel runs on Hopper (sm_90) only")
@pytest.mark.parametrize("shape", GLUON_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keys_sorted", [True, False])
def test_gluon_kernel_matches_reference(shape, dtype, keys_sorted, poisoned_empty):
    """The Gluon Hopper kernel (GQA groups 1, 2, 4, 8; ragged last tiles; gaps in positions), and the Triton
    kernel on the same cases (on Hopper the default config takes the Gluon kernel where it supports the call)."""
    from kvblend.triton_kernels.sparse_attention_gluon import gluon_supports

    q, q_pos, k, v, k_pos = gluon_case(shape, dtype, seed=shape[0], keys_sorted=keys_sorted)
    assert gluon_supports(q, k, v)
    ref = sparse_query_attention_ref(q, q_pos, k, v, k_pos, 1 / math.sqrt(shape[4]))
    for gluon in (True, False):
        out = sparse_query_attention(q, q_pos, k, v, k_pos, backend="triton", keys_sorted=keys_sorted,
                                     config={"gluon": gluon})
        check_close(out, ref, dtype)
        assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
