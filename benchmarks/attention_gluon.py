"""Sparse-query attention, Triton kernel vs the Gluon Hopper kernel, on gpu_blend.py's attention cases.

15% of 3136 / 8256 / 32832 positions as sorted random queries over all keys (Llama-3-8B heads 32/8, head_dim 128, bf16),
visible-pair FLOPs, each kernel checked against the fp32 reference (relative error), then timed as CUDA-graph
replays of 10 calls on 4 rotated input sets, `--rounds` rounds with the kernels interleaved (median [min, max]),
against the bf16 matmul ceiling measured in the same run; and the host time of one eager call (100 calls
enqueued back to back, host clock, no sync inside: what an eager, host-bound layer pays). Run on the device:
  python benchmarks/attention_gluon.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_blend import LLAMA3_8B, Timer, attention_sets, chunked_reference, measure_ceilings  # noqa: E402

from kvblend.triton_kernels import sparse_query_attention  # noqa: E402

KERNELS = {"triton": {"gluon": False}, "gluon": {"gluon": True}}


def graphs_of(call, sets) -> list[torch.cuda.CUDAGraph]:
    """One CUDA graph of 10 calls per input set (captured after a warm-up call)."""
    graphs = []
    for args in sets:
        call(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                call(*args)
        graphs.append(graph)
    return graphs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device("cuda")
    timer = Timer(device)
    ceilings = measure_ceilings(device, timer)
    heads, kv_heads = LLAMA3_8B["num_attention_heads"], LLAMA3_8B["num_key_value_heads"]
    head_dim = LLAMA3_8B["hidden_size"] // heads
    spec = type("Spec", (), dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim))
    g = torch.Generator(device=device).manual_seed(4)
    scale = 1 / math.sqrt(head_dim)
    rows = []
    for tokens in (3136, 8256, 32832):
        sets = attention_sets(spec, device, tokens, g)
        pos = torch.arange(tokens, device=device)
        flops = [4 * heads * head_dim * float((s[3] + 1).sum()) for s in sets]
        ref = chunked_reference(sets[0][0], sets[0][3], sets[0][1], sets[0][2], pos, scale)
        graphs, errors = {}, {}
        for name, config in KERNELS.items():
            def call(q, k, v, r, config=config):
                return sparse_query_attention(q, r, k, v, pos, keys_sorted=True, config=config)
            q0, k0, v0, r0 = sets[0]
            out = call(q0, k0, v0, r0).float()
            errors[name] = float((out - ref).norm() / ref.norm())
            graphs[name] = graphs_of(call, sets)
        host_us = {}
        for name, config in KERNELS.items():
            q0, k0, v0, r0 = sets[0]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(100):
                sparse_query_attention(q0, r0, k0, v0, pos, keys_sorted=True, config=config)
            host_us[name] = (time.perf_counter() - start) * 1e4
            torch.cuda.synchronize()
        rates = {name: [] for name in KERNELS}
        for _ in range(args.rounds):
            for name in KERNELS:
                ms = [timer(graphs[name][i % 4].replay) / 10 for i in range(8)]
                rates[name].append(statistics.median(f / m / 1e9 for f, m in zip(flops * 2, ms)))
        for name in KERNELS:
            row = {"tokens": tokens, "kernel": name, "rel_err": errors[name],
                   "TFLOPs": statistics.median(rates[name]), "min": min(rates[name]), "max": max(rates[name]),
                   "rounds": rates[name], "ceiling": ceilings["matmul_TFLOPs"],
                   "eager_host_us": host_us[name]}
            rows.append(row)
            print(f"{tokens:6d} {name:7s} {row['TFLOPs']:6.1f} TFLOP/s [{row['min']:.1f}, {row['max']:.1f}] "
                  f"= {100 * row['TFLOPs'] / row['ceiling']:.1f}% of {row['ceiling']:.0f}, err {errors[name]:.1e}, "
                  f"host {host_us[name]:.1f} us/call",
                  flush=True)
    report = {"device": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "torch": torch.__version__, "ceilings": ceilings, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_gluon.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
