"""vLLM's C++ rotary kernel as the blend's rope shift (`ModelOps.rope_shift_gather`) on a CPU engine.

Inside vLLM the blend's norms, projections and RoPE of recomputed rows are vLLM's own modules; what remains
kvblend's is moving cached chunk K to its new positions. vLLM's rotary kernel does that rotation in one pass
(the torch reference spends most of its time in bf16 <-> fp32 passes). Its numerics are vLLM's own (fp32
inside, cos/sin in the tensor's dtype), so it differs from the torch reference by bf16 rounding only:
`check_ops` measures that on random data before the worker uses it.
"""

from __future__ import annotations

import torch

from kvblend.model.ops import DEFAULT_OPS, ModelOps
from kvblend.rope import RopeSpec, cos_sin, inv_freq
from kvblend.triton_kernels.rope_shift import check_rope_shift_args

# Relative to the largest reference value: bf16 rounding differences are ~2^-8; a wrong layout is O(1).
CHECK_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def _kernels():
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

    return torch.ops._C


def rope_shift_gather(src_k: torch.Tensor, src_v: torch.Tensor, src_rows: torch.Tensor, dst_k: torch.Tensor,
                      dst_v: torch.Tensor, dst_rows: torch.Tensor, delta: torch.Tensor, freq: torch.Tensor,
                      style: str, check: bool = True) -> None:
    """dst_k[dst_rows] = src_k[src_rows] turned by delta * freq; dst_v[dst_rows] = src_v[src_rows]."""
    num_rows = check_rope_shift_args(src_k, src_v, src_rows, dst_k, dst_v, dst_rows, delta, freq, style, check)
    if not num_rows:
        return
    src, dst = _as_run(src_rows), _as_run(dst_rows)
    in_place = src is not None and dst is not None and dst_k[dst].is_contiguous()
    if in_place:  # a blend's chunk rows usually are one run on both sides: slice copies, rotation in place
        k = dst_k[dst]
        k.copy_(src_k[src])
        dst_v[dst] = src_v[src]
    else:
        k = src_k.index_select(0, src_rows)
    cos, sin = cos_sin(freq.float(), delta)
    rows = torch.arange(num_rows, device=k.device)
    _kernels().rotary_embedding(rows, k.view(num_rows, -1), None, k.shape[2], torch.cat((cos, sin), -1).to(k.dtype),
                                style == "neox")
    if not in_place:
        dst_k.index_copy_(0, dst_rows, k)
        dst_v.index_copy_(0, dst_rows, src_v.index_select(0, src_rows))


def _as_run(index: torch.Tensor) -> slice | None:
    """`index` as a slice when it is one ascending run of consecutive rows, else None."""
    first, n = int(index[0]), index.numel()
    if int(index[-1]) - first + 1 != n or not torch.equal(index, torch.arange(first, first + n, device=index.device)):
        return None
    return slice(first, first + n)


VLLM_CPU_OPS = ModelOps(name="vllm-cpu", rope_shift_gather=rope_shift_gather)


def check_ops(ops: ModelOps, dtype: torch.dtype, head_dim: int, style: str, seed: int = 0,
              freq: torch.Tensor | None = None) -> str | None:
    """Compare `ops` with the torch references on random rows (RoPE at `freq`, the model's frequencies; default
    theta 10000 over the whole head); the first mismatch as a reason, else None."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def differs(name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
        err = (got.float() - want.float()).abs().max().item()
        limit = CHECK_TOL.get(dtype, 2e-2) * want.float().abs().max().item()
        if err <= limit:
            return None
        return f"{ops.name} {name} differs from the torch reference by {err:.3g} (limit {limit:.3g})"

    ref = DEFAULT_OPS
    freq = inv_freq(RopeSpec(10000.0, head_dim, style)) if freq is None else freq
    src_k, src_v = rand(50, 2, head_dim), rand(50, 2, head_dim)
    src_rows, dst_rows = torch.randperm(50, generator=gen)[:37], torch.randperm(60, generator=gen)[:37]
    delta = torch.randint(-3000, 3000, (37,), generator=gen)
    got = torch.zeros(60, 2, head_dim, dtype=dtype), torch.zeros(60, 2, head_dim, dtype=dtype)
    want = torch.zeros_like(got[0]), torch.zeros_like(got[1])
    ops.rope_shift_gather(src_k, src_v, src_rows, *got, dst_rows, delta, freq, style)
    ref.rope_shift_gather(src_k, src_v, src_rows, *want, dst_rows, delta, freq, style, backend="torch")
    return differs("rope_shift_gather k", got[0], want[0]) or differs("rope_shift_gather v", got[1], want[1])
