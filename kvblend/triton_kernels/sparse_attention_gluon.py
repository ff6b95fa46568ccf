"""`sparse_query_attention` as a Gluon kernel for Hopper (sm_90): FA3's layout written out by hand.

One loader warp streams K and V tiles by TMA into two-stage rings (mbarriers: ready and empty per stage, K and V
apart), and two consumer warpgroups, each with 64 of the tile's 128 query rows (GQA heads packed, as in the Triton
kernel), run S = Q K^T and O += P V on wgmma with the fp32 online softmax between. Two overlaps keep the tensor
cores busy: across warpgroups (one's softmax runs while the other's products do) and inside each (tile j's score
product is issued together with tile j-1's output product, and tile j's softmax runs under the latter). Each
warpgroup finds its own key bounds (its rows span half the tile's positions), so its masked band is narrower.
Same inputs, output and masking as the Triton kernel; Gluon has no interpreter, so that kernel stays the CI path
and the fallback. `sparse_query_attention_ref` is the reference of both. Written against Triton 3.6's Gluon API.
"""

from __future__ import annotations

import torch

from kvblend.triton_kernels.dispatch import HAS_TRITON, INTERPRETING

# Gluon's API moves between Triton releases: the kernel is used only with the release it was written and tested
# against (other releases, or any import failure, take the Triton kernel).
GLUON_TRITON_RELEASE = "3.6."

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAS_GLUON = HAS_TRITON and not INTERPRETING and triton.__version__.startswith(GLUON_TRITON_RELEASE)
except (ImportError, AttributeError):
    HAS_GLUON = False

# Query rows per consumer warpgroup (wgmma's M per warpgroup), keys per tile, ring depth, registers of the second
# consumer warpgroup and of the loader warp (the first consumer, the default partition, gets what maxnreg leaves).
HALF_M = 64
BLOCK_N = 128
STAGES = 2
CONSUMER_REGS = 240
LOADER_REGS = 24
MAXNREG = 168

if HAS_GLUON:
    INT64_MAX = gl.constexpr(9223372036854775807)
    _HALF_M = gl.constexpr(HALF_M)

    @gluon.constexpr_function
    def _row_layout(head_dim, num_warps):
        """Blocked layout for [rows, head_dim] tiles read or written with 16-byte vectors along head_dim."""
        head_dim, num_warps = gl._unwrap_if_constexpr(head_dim), gl._unwrap_if_constexpr(num_warps)
        lanes_d = min(head_dim // 8, 32)
        return gl.BlockedLayout([1, 8], [32 // lanes_d, lanes_d], [num_warps, 1], [1, 0])

    @gluon.constexpr_function
    def _nvmma_layout(shape, dtype):
        """Shared layout wgmma and TMA read (swizzled for `shape` of `dtype`)."""
        return gl.NVMMASharedLayout.get_default_for(gl._unwrap_if_constexpr(shape), gl._unwrap_if_constexpr(dtype))

    @gluon.jit
    def _keys_at_or_before(k_pos, num_keys, x, PROBES: gl.constexpr, layout: gl.constexpr):
        """How many of the sorted k_pos are <= x: the Triton kernel's two-level search (probes, then one stretch)."""
        stride = gl.cdiv(num_keys, PROBES)
        probe = gl.arange(0, PROBES, layout=layout) * stride
        probed = gl.load(k_pos + probe, mask=probe < num_keys, other=INT64_MAX)
        base = gl.maximum(gl.sum((probed <= x).to(gl.int32), axis=0) - 1, 0) * stride
        count = base
        for off in range(0, stride, PROBES):
            key = base + off + gl.arange(0, PROBES, layout=layout)
            key_ok = (key < num_keys) & (key < base + stride)
            count += gl.sum((key_ok & (gl.load(k_pos + key, mask=key_ok, other=0) <= x)).to(gl.int32), axis=0)
        return count

    @gluon.jit
    def _half_bounds(q_pos, k_pos, first_token, num_queries, num_keys, TOKENS: gl.constexpr,
                     KEYS_SORTED: gl.constexpr, PROBES: gl.constexpr, layout: gl.constexpr):
        """(full, end) of one warpgroup's query tokens: keys [0, full) visible to all of them, [end, S) to none;
        (0, 0) when it has no token, (0, S) without sorted keys."""
        token = first_token + gl.arange(0, TOKENS, layout=layout)
        ok = token < num_queries
        pos = gl.load(q_pos + token, mask=ok, other=0)
        if KEYS_SORTED:
            lowest = gl.min(gl.where(ok, pos, INT64_MAX), axis=0)
            highest = gl.max(gl.where(ok, pos, -INT64_MAX), axis=0)
            end = _keys_at_or_before(k_pos, num_keys, highest, PROBES, layout)
            full = gl.minimum(_keys_at_or_before(k_pos, num_keys, lowest, PROBES, layout), end)
        else:
            end = gl.where(first_token < num_queries, num_keys, 0)
            full = end * 0
        return full, end

    @gluon.jit
    def _loader(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, kv_head, num_tiles,
                HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """One warp: K and V tiles [0, num_tiles) into their rings; a K (V) stage is refilled once both consumers
        are done with its score (output) product."""
        for j in range(num_tiles):
            stage = j % STAGES
            phase = ((j // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(stage), phase)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [j * BLOCK_N, kv_head * HEAD_DIM], k_ready.index(stage),
                                            k_smem.index(stage))
            mbarrier.wait(v_empty.index(stage), phase)
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [j * BLOCK_N, kv_head * HEAD_DIM], v_ready.index(stage),
                                            v_smem.index(stage))

    @gluon.jit
    def _issue_scores(q_tile, k_smem, k_ready, j, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      s_layout: gl.constexpr):
        """S = Q K_j^T on wgmma, issued (not waited for) once K_j is in."""
        stage = j % STAGES
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        return warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)),
                             gl.full([_HALF_M, BLOCK_N], 0.0, gl.float32, s_layout), use_acc=False, is_async=True)

    @gluon.jit
    def _issue_output(p_op, acc, v_smem, v_ready, j, STAGES: gl.constexpr):
        """O += P V_j on wgmma, issued once V_j is in."""
        stage = j % STAGES
        mbarrier.wait(v_ready.index(stage), (j // STAGES) & 1)
        return warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)

    @gluon.jit
    def _softmax_step(scores, m_i, l_i, pos, k_pos, j, num_keys, qk_scale, BLOCK_N: gl.constexpr,
                      MASKED: gl.constexpr, s_layout: gl.constexpr):
        """Online-softmax step of key tile j (m_i, l_i in base-2 units of the scaled scores): P, the rescale of the
        rows so far, l and m. MASKED applies the causal-by-position mask (keys past the end read as hidden)."""
        if MASKED:
            key = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            kpos = gl.load(k_pos + key, mask=key < num_keys, other=INT64_MAX)
            scores = gl.where(kpos[None, :] <= pos[:, None], scores, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(scores, axis=1) * qk_scale)
        p = gl.exp2(scores * qk_scale - m_new[:, None])  # the scale and the max in one FMA per score
        alpha = gl.exp2(m_i - m_new)
        return p, alpha, l_i * alpha + gl.sum(p, axis=1), m_new

    @gluon.jit
    def _attend_tile(acc, l_i, m_i, p_prev, q_tile, pos, k_pos, k_smem, v_smem, k_ready, v_ready, k_empty,
                           v_empty, j, num_keys, qk_scale, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                           MASKED: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                           p_layout: gl.constexpr):
        """Key tile j with FA3's overlap inside the warpgroup: S_j and then O += P_{j-1} V_{j-1} are issued
        together, and tile j's softmax runs while the output product of tile j-1 is on the tensor cores."""
        scores = _issue_scores(q_tile, k_smem, k_ready, j, BLOCK_N, STAGES, s_layout)
        acc = _issue_output(p_prev, acc, v_smem, v_ready, j - 1, STAGES)
        scores = warpgroup_mma_wait(num_outstanding=1, deps=(scores, ))
        mbarrier.arrive(k_empty.index(j % STAGES), count=1)
        p, alpha, l_i, m_i = _softmax_step(scores, m_i, l_i, pos, k_pos, j, num_keys, qk_scale, BLOCK_N, MASKED,
                                           s_layout)
        acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev))
        mbarrier.arrive(v_empty.index((j - 1) % STAGES), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        return acc, l_i, m_i, gl.convert_layout(p.to(k_smem.dtype), p_layout)

    @gluon.jit
    def _consumer(q, q_pos, out, k_pos, q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, half, kv_head,
                  first_token, full, end, num_tiles, num_queries, num_keys, qk_scale,
                  q_stride_t, q_stride_h, out_stride_t, out_stride_h,
                  GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """One warpgroup: 64 query rows (token-major, the GROUP heads of kv_head within), keys [0, full) without
        the mask, [full, end) with it, one tile ahead; the ring's later tiles (the other warpgroup's band) only
        freed."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        io_layout: gl.constexpr = _row_layout(HEAD_DIM, 4)

        row = gl.arange(0, _HALF_M, layout=gl.SliceLayout(1, io_layout))
        token = first_token + row // GROUP
        head = kv_head * GROUP + row % GROUP
        row_ok = token < num_queries
        dim = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
        q_offset = token.to(gl.int64)[:, None] * q_stride_t + head[:, None] * q_stride_h + dim[None, :]
        q_tile = q_smem.index(half)
        q_tile.store(gl.load(q + q_offset, mask=row_ok[:, None], other=0.0))
        fence_async_shared()
        gl.thread_barrier()

        s_row = gl.arange(0, _HALF_M, layout=gl.SliceLayout(1, s_layout))
        s_token = first_token + s_row // GROUP
        pos = gl.load(q_pos + s_token, mask=s_token < num_queries, other=-1)
        m_i = gl.full([_HALF_M], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.full([_HALF_M], 0.0, gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.full([_HALF_M, HEAD_DIM], 0.0, gl.float32, o_layout)
        unmasked_tiles = full // BLOCK_N
        band_end = gl.cdiv(end, BLOCK_N)
        if band_end > 0:  # tile 0 through the masked path (exact either way), then one tile ahead
            scores = _issue_scores(q_tile, k_smem, k_ready, 0, BLOCK_N, STAGES, s_layout)
            scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores, ))
            mbarrier.arrive(k_empty.index(0), count=1)
            p, alpha, l_i, m_i = _softmax_step(scores, m_i, l_i, pos, k_pos, 0, num_keys, qk_scale, BLOCK_N,
                                               True, s_layout)
            p_prev = gl.convert_layout(p.to(k_smem.dtype), p_layout)
            for j in range(1, unmasked_tiles):
                acc, l_i, m_i, p_prev = _attend_tile(
                    acc, l_i, m_i, p_prev, q_tile, pos, k_pos, k_smem, v_smem, k_ready, v_ready, k_empty,
                    v_empty, j, num_keys, qk_scale, BLOCK_N, STAGES, False, s_layout, o_layout, p_layout)
            for j in range(gl.maximum(unmasked_tiles, 1), band_end):
                acc, l_i, m_i, p_prev = _attend_tile(
                    acc, l_i, m_i, p_prev, q_tile, pos, k_pos, k_smem, v_smem, k_ready, v_ready, k_empty,
                    v_empty, j, num_keys, qk_scale, BLOCK_N, STAGES, True, s_layout, o_layout, p_layout)
            acc = _issue_output(p_prev, acc, v_smem, v_ready, band_end - 1, STAGES)
            acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev))
            mbarrier.arrive(v_empty.index((band_end - 1) % STAGES), count=1)
        for j in range(band_end, num_tiles):  # waits for the data so it cannot free a stage a whole ring early
            stage = j % STAGES
            mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
            mbarrier.arrive(k_empty.index(stage), count=1)
            mbarrier.wait(v_ready.index(stage), (j // STAGES) & 1)
            mbarrier.arrive(v_empty.index(stage), count=1)

        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        acc = acc / gl.where(l_o > 0.0, l_o, 1.0)[:, None]
        out_offset = token.to(gl.int64)[:, None] * out_stride_t + head[:, None] * out_stride_h + dim[None, :]
        gl.store(out + out_offset, gl.convert_layout(acc.to(out.dtype.element_ty), io_layout), mask=row_ok[:, None])

    @gluon.jit
    def _sparse_query_attention_gluon_kernel(
        q, q_pos, k_desc, v_desc, k_pos, out, num_queries, num_keys, num_tiles, qk_scale,
        q_stride_t, q_stride_h, out_stride_t, out_stride_h,
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        KEYS_SORTED: gl.constexpr, PROBES: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
    ):
        TOKENS_HALF: gl.constexpr = _HALF_M // GROUP
        kv_head = gl.program_id(0)
        tile = num_tiles - 1 - gl.program_id(1)  # the last tiles see the most keys: launch them first
        first = tile * 2 * TOKENS_HALF
        search_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        full0, end0 = _half_bounds(q_pos, k_pos, first, num_queries, num_keys, TOKENS_HALF, KEYS_SORTED, PROBES,
                                   search_layout)
        full1, end1 = _half_bounds(q_pos, k_pos, first + TOKENS_HALF, num_queries, num_keys, TOKENS_HALF,
                                   KEYS_SORTED, PROBES, search_layout)
        key_tiles = gl.cdiv(gl.maximum(end0, end1), BLOCK_N)

        q_layout: gl.constexpr = _nvmma_layout([_HALF_M, HEAD_DIM], q.dtype.element_ty)
        q_smem = gl.allocate_shared_memory(q.dtype.element_ty, [2, _HALF_M, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)

        gl.warp_specialize([
            (_consumer, (q, q_pos, out, k_pos, q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, 0,
                         kv_head, first,
                         full0, end0, key_tiles, num_queries, num_keys, qk_scale, q_stride_t, q_stride_h, out_stride_t,
                         out_stride_h, GROUP, HEAD_DIM, BLOCK_N, STAGES)),
            (_consumer, (q, q_pos, out, k_pos, q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, 1,
                         kv_head,
                         first + TOKENS_HALF, full1, end1, key_tiles, num_queries, num_keys, qk_scale, q_stride_t,
                         q_stride_h, out_stride_t, out_stride_h, GROUP, HEAD_DIM, BLOCK_N, STAGES)),
            (_loader, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, kv_head, key_tiles, HEAD_DIM,
                       BLOCK_N, STAGES)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def gluon_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The Gluon kernel's cases: Hopper, fp16/bf16, head_dim 64 or 128, a GQA group dividing 64, K/V with heads
    packed [S, kv_heads * D] on 16-byte aligned rows (TMA)."""
    if not HAS_GLUON or not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    group = q.shape[1] // k.shape[1]
    head_dim = q.shape[2]
    return (q.dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128) and HALF_M % group == 0
            and k.shape[0] > 0
            and all(t.stride(1) == head_dim and (t.stride(0) * t.element_size()) % 16 == 0
                    and t.data_ptr() % 16 == 0 for t in (k, v)))


def sparse_query_attention_gluon(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 k_pos: torch.Tensor, qk_scale: float, keys_sorted: bool, probes: int) -> torch.Tensor:
    """Launch the Gluon kernel (callers check `gluon_supports` first); qk_scale in base 2 (scale * log2 e)."""
    num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[:2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_queries == 0:
        return out
    tokens_per_tile = 2 * HALF_M // group
    num_tiles = -(-num_queries // tokens_per_tile)
    dtype = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, head_dim], dtype)
    k_desc, v_desc = (TensorDescriptor(t, [num_keys, num_kv_heads * head_dim], [t.stride(0), 1],
                                       [BLOCK_N, head_dim], layout) for t in (k, v))
    _sparse_query_attention_gluon_kernel[(num_kv_heads, num_tiles)](
        q, q_pos, k_desc, v_desc, k_pos, out, num_queries, num_keys, num_tiles, qk_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_N=BLOCK_N, STAGES=STAGES, KEYS_SORTED=keys_sorted, PROBES=probes,
        CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, num_warps=4, maxnreg=MAXNREG,
    )
    return out
