"""Kernel sweep on one GPU: launch configs of sparse_query_attention, and the fused element-wise kernels vs torch.

(a) sparse_query_attention at the Llama-3-8B shape (32 query heads, 8 kv heads, head_dim 128, bf16; S = 8256 keys
    at positions 0..S-1, keys_sorted=True as the blend engine calls it): Tq = 1293 sorted random query rows
    (CacheBlend's ~15 %) and a full prefill (Tq = S), for several (BLOCK_M, BLOCK_N, num_warps, num_stages).
    TFLOP/s count the visible (causal) pairs only: 4 * heads * head_dim * sum(q_pos + 1). Before it is timed,
    each config's output is checked against the fp32 torch reference on both cases (the full case's reference
    is computed in query chunks). For scale: torch SDPA (bf16, is_causal, KV heads expanded) on the full case.
(b) rms_norm, rope_qk, silu_mul and silu_mul_fused against the torch code they replace in the runner, at T = 8256
    and T = 1293 (hidden 4096, 32/8 heads, head_dim 128, intermediate 14336, bf16), in GB/s of the bytes each
    reads and writes, against a measured device-to-device copy. "host us" is the wall time per call of 500
    back-to-back calls at T = 1: the launch overhead the fused kernels are meant to cut.
GPU times: triton.testing.do_bench medians (L2 flushed before each run). Run on the device, from the repo root:
    python benchmarks/kernel_sweep.py [--json PATH]
`--tiny` runs toy shapes on the CPU under TRITON_INTERPRET=1 (perf_counter timings) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and kvblend.triton_kernels are imported

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvblend.triton_kernels import (
    rms_norm,
    rms_norm_ref,
    rope_qk,
    rope_qk_ref,
    silu_mul,
    silu_mul_fused,
    sparse_query_attention,
    sparse_query_attention_ref,
)
from kvblend.triton_kernels.sparse_attention import DEFAULT_CONFIG

# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first is the current default.
CONFIGS = [
    (64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 64, 8, 3), (64, 32, 4, 3), (64, 128, 4, 3),
    (64, 128, 8, 3), (64, 128, 4, 2), (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3),
    (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2),
]
TINY_CONFIGS = [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)]
FULL = {"heads": 32, "kv_heads": 8, "head_dim": 128, "keys": 8256, "sparse_queries": 1293, "hidden": 4096,
        "inter": 14336, "tokens": (8256, 1293)}
TINY = {"heads": 8, "kv_heads": 2, "head_dim": 64, "keys": 200, "sparse_queries": 37, "hidden": 256, "inter": 512,
        "tokens": (33, 7)}
BACKEND = "triton"  # the kernels themselves, also on the CPU (--tiny, interpreter)
ATTN_TOL = 2e-2  # bf16, as tests/test_kernel_sparse_attention.py
DEADLINE_S = 120.0  # the attention sweep stops starting new configs after this (the whole run must stay < 3 min)


class Bench:
    """Median milliseconds of a callable: triton.testing.do_bench on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def ms(self, fn, rep: int = 100) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def host_us(self, fn, calls: int = 500) -> float:
        """Wall time per call of back-to-back calls, synchronised once (host-bound for tiny work)."""
        calls = calls if self.cuda else 5
        for _ in range(10 if self.cuda else 1):
            fn()
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - start) / calls * 1e6


def copy_gbps(bench: Bench, device: torch.device) -> float:
    n = 1 << 29 if device.type == "cuda" else 1 << 20
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / bench.ms(lambda: dst.copy_(src)) / 1e6


# --- (a) sparse_query_attention launch configs ---------------------------------------------------------------


def attention_case(shape: dict, queries: int | None, device: torch.device, seed: int):
    """q/k/v bf16 at the given shape; keys at 0..S-1; queries at `queries` sorted random rows (None: all rows)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    keys, heads, kv_heads, dim = shape["keys"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    k = torch.randn(keys, kv_heads, dim, device=device, generator=gen).bfloat16()
    v = torch.randn(keys, kv_heads, dim, device=device, generator=gen).bfloat16()
    k_pos = torch.arange(keys, device=device)
    if queries is None:
        q_pos = k_pos.clone()
    else:
        q_pos = torch.randperm(keys, device=device, generator=gen)[:queries].sort().values
    q = torch.randn(q_pos.numel(), heads, dim, device=device, generator=gen).bfloat16()
    flops = 4 * heads * dim * float((q_pos + 1).sum())
    return q, q_pos, k, v, k_pos, flops


def chunked_reference(q, q_pos, k, v, k_pos, chunk: int = 2048) -> torch.Tensor:
    """sparse_query_attention_ref over query chunks (the full case's fp32 scores would not fit at once)."""
    scale = 1.0 / math.sqrt(q.shape[2])
    return torch.cat([sparse_query_attention_ref(q[i : i + chunk], q_pos[i : i + chunk], k, v, k_pos, scale)
                      for i in range(0, q.shape[0], chunk)])


def sweep_attention(bench: Bench, shape: dict, configs: list, device: torch.device, started: float) -> list[dict]:
    cases = {
        "sparse": attention_case(shape, shape["sparse_queries"], device, seed=1),
        "full": attention_case(shape, None, device, seed=2),
    }
    references = {name: chunked_reference(*case[:5]) for name, case in cases.items()}
    rows = []
    for block_m, block_n, warps, stages in configs:
        row = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
        if time.perf_counter() - started > DEADLINE_S:
            rows.append({**row, "status": "skipped (deadline)"})
            continue
        config = dict(row)
        try:
            for name, (q, q_pos, k, v, k_pos, flops) in cases.items():
                def run(q=q, q_pos=q_pos, k=k, v=v, k_pos=k_pos, config=config):
                    return sparse_query_attention(q, q_pos, k, v, k_pos, backend=BACKEND, keys_sorted=True, config=config)

                err = (run().float() - references[name].float()).abs().max().item()
                row[f"{name}_err"] = err
                if not err <= ATTN_TOL:
                    raise AssertionError(f"{name} max abs error {err:.3g} > {ATTN_TOL}")
                ms = bench.ms(run)
                row[f"{name}_ms"] = ms
                row[f"{name}_TFLOPs"] = flops / ms / 1e9
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - out of shared memory, a wrong result: report and go on
            row["status"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:70] if str(exc) else ''}"
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sdpa = torch_sdpa_full(bench, cases["full"], device)
    return rows, sdpa, {name: case[5] for name, case in cases.items()}


def torch_sdpa_full(bench: Bench, case, device: torch.device) -> float | None:
    """bf16 torch SDPA with is_causal on the full case (keys at 0..S-1 = queries), KV heads expanded beforehand."""
    q, _, k, v, _, flops = case
    if device.type != "cuda":
        return None
    group = q.shape[1] // k.shape[1]
    qt = q.transpose(0, 1)[None]
    kt = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]
    vt = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]
    ms = bench.ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    return flops / ms / 1e9


# --- (b) fused element-wise kernels vs the runner's torch code --------------------------------------------------


def elementwise_cases(shape: dict, tokens: int, device: torch.device, seed: int) -> list[tuple]:
    """(name, triton fn, torch fn, bytes moved) per kernel at `tokens` tokens."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, inter, heads, kv_heads, dim = shape["hidden"], shape["inter"], shape["heads"], shape["kv_heads"], shape["head_dim"]

    def randn(*size):
        return torch.randn(*size, device=device, generator=gen).bfloat16()

    x, weight = randn(tokens, hidden), randn(hidden)
    q, k = randn(tokens, heads, dim), randn(tokens, kv_heads, dim)
    freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)).float()
    angles = torch.arange(tokens, device=device, dtype=torch.float32)[:, None] * freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    gate, up, gate_up = randn(tokens, inter), randn(tokens, inter), randn(tokens, 2 * inter)
    b = 2  # bytes per bf16 element
    return [
        ("rms_norm", lambda: rms_norm(x, weight, 1e-5, backend=BACKEND), lambda: rms_norm_ref(x, weight, 1e-5),
         2 * x.numel() * b + weight.numel() * b),
        ("rope_qk", lambda: rope_qk(q, k, cos, sin, "neox", backend=BACKEND), lambda: rope_qk_ref(q, k, cos, sin, "neox"),
         2 * (q.numel() + k.numel()) * b + 2 * cos.numel() * 4),
        ("silu_mul", lambda: silu_mul(gate, up, backend=BACKEND), lambda: F.silu(gate) * up, 3 * gate.numel() * b),
        ("silu_mul_fused", lambda: silu_mul_fused(gate_up, backend=BACKEND),
         lambda: F.silu(gate_up[:, :inter]) * gate_up[:, inter:], 3 * gate.numel() * b),
    ]


def sweep_elementwise(bench: Bench, shape: dict, device: torch.device) -> list[dict]:
    rows = []
    host = {name: (bench.host_us(tri), bench.host_us(ref)) for name, tri, ref, _ in elementwise_cases(shape, 1, device, 0)}
    for tokens in shape["tokens"]:
        for name, tri, ref, nbytes in elementwise_cases(shape, tokens, device, seed=tokens):
            tri_ms, ref_ms = bench.ms(tri), bench.ms(ref)
            rows.append({"kernel": name, "tokens": tokens, "triton_us": tri_ms * 1e3, "torch_us": ref_ms * 1e3,
                         "triton_GBps": nbytes / tri_ms / 1e6, "torch_GBps": nbytes / ref_ms / 1e6,
                         "triton_host_us": host[name][0], "torch_host_us": host[name][1]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --- report ----------------------------------------------------------------------------------------------------


def print_report(device_name, copy, attn_rows, sdpa, flops, ew_rows, shape) -> None:
    print(f"device: {device_name}; torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}")
    except ImportError:
        print()
    print(f"device copy: {copy:.0f} GB/s")
    print(f"\n(a) sparse_query_attention, {shape['heads']}/{shape['kv_heads']} heads, D={shape['head_dim']}, bf16, "
          f"S={shape['keys']}: sparse Tq={shape['sparse_queries']} ({flops['sparse'] / 1e9:.1f} GFLOP visible), "
          f"full Tq=S ({flops['full'] / 1e9:.1f} GFLOP visible)")
    print(f"{'BM':>4} {'BN':>4} {'wrp':>3} {'stg':>3} | {'sparse ms':>9} {'TFLOP/s':>7} | {'full ms':>8} {'TFLOP/s':>7} | "
          f"{'max err':>7} | status")
    default = tuple(DEFAULT_CONFIG[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    for r in attn_rows:
        key = (r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"])
        if r["status"] == "ok":
            err = max(r["sparse_err"], r["full_err"])
            print(f"{key[0]:>4} {key[1]:>4} {key[2]:>3} {key[3]:>3} | {r['sparse_ms']:9.3f} {r['sparse_TFLOPs']:7.1f} | "
                  f"{r['full_ms']:8.3f} {r['full_TFLOPs']:7.1f} | {err:7.1e} | ok{' (default)' if key == default else ''}")
        else:
            print(f"{key[0]:>4} {key[1]:>4} {key[2]:>3} {key[3]:>3} | {'':>9} {'':>7} | {'':>8} {'':>7} | {'':>7} | "
                  f"{r['status']}")
    ok = [r for r in attn_rows if r["status"] == "ok"]
    for case in ("sparse", "full"):
        if ok:
            best = min(ok, key=lambda r: r[f"{case}_ms"])
            print(f"best {case}: BLOCK_M={best['BLOCK_M']} BLOCK_N={best['BLOCK_N']} num_warps={best['num_warps']} "
                  f"num_stages={best['num_stages']}: {best[f'{case}_ms']:.3f} ms, {best[f'{case}_TFLOPs']:.1f} TFLOP/s")
    if sdpa is not None:
        print(f"torch SDPA bf16 is_causal, full case (KV heads expanded): {sdpa:.1f} TFLOP/s")
    print(f"\n(b) element-wise kernels vs the runner's torch code (bf16; GB/s of bytes read + written; copy {copy:.0f} GB/s)")
    print(f"{'kernel':<15} {'T':>5} | {'triton us':>9} {'GB/s':>6} {'%copy':>5} | {'torch us':>9} {'GB/s':>6} | "
          f"{'speedup':>7} | {'host us/call T=1 triton / torch':>31}")
    for r in ew_rows:
        print(f"{r['kernel']:<15} {r['tokens']:>5} | {r['triton_us']:9.1f} {r['triton_GBps']:6.0f} "
              f"{r['triton_GBps'] / copy:5.0%} | {r['torch_us']:9.1f} {r['torch_GBps']:6.0f} | "
              f"{r['torch_us'] / r['triton_us']:6.2f}x | {r['triton_host_us']:14.1f} / {r['torch_host_us']:.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.tiny:
        device, shape, configs = torch.device("cpu"), TINY, TINY_CONFIGS
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --tiny to check the script on the CPU)", file=sys.stderr)
            return 1
        device, shape, configs = torch.device("cuda"), FULL, CONFIGS
    bench = Bench(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    copy = copy_gbps(bench, device)
    attn_rows, sdpa, flops = sweep_attention(bench, shape, configs, device, started)
    ew_rows = sweep_elementwise(bench, shape, device)
    print_report(device_name, copy, attn_rows, sdpa, flops, ew_rows, shape)
    print(f"\nsweep took {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device_name, "copy_GBps": copy, "attention": attn_rows,
                                               "sdpa_full_TFLOPs": sdpa, "elementwise": ew_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
