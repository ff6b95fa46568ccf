"""Sparse-query attention on one GPU: work schedules, tile-bound computation and launch configs (issue 15, round 4).

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16), 15% of S positions as sorted random
queries over all S keys (S = 8256 and 32832), FLOPs of visible pairs only. Per variant: relative error against the
fp32 torch reference, then TFLOP/s as CUDA-graph replays of 10 calls on 4 rotated input sets ("call": the whole
`sparse_query_attention`, tile bounds included; "kernel": the attention launch alone on precomputed bounds), and
the compiled kernel's registers, spills and shared memory. Also the tile-bound step alone (torch ops vs one Triton
launch). Run on the device, from the repo root:  python benchmarks/attention_schedules.py --out $OUT
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvblend.triton_kernels.sparse_attention import (  # noqa: E402
    DEFAULT_CONFIG,
    _launch_attention,
    sparse_query_attention,
    sparse_query_attention_ref,
    tile_key_bounds,
)

HEADS, KV_HEADS, DIM = 32, 8, 128
SIZES = (8256, 32832)
# (BLOCK_M, BLOCK_N, warps, stages, schedule, programs per multiprocessor, bounds, fold, lazy, mask_block_n)
VARIANTS = [
    (128, 128, 8, 3, 0, 0, "torch", False, False, 0), (128, 128, 8, 3, 0, 0, "kernel", True, False, 0),
    (128, 128, 8, 3, 1, 1, "kernel", True, False, 0), (128, 128, 8, 3, 0, 0, "kernel", True, True, 0),
    (128, 128, 8, 3, 1, 1, "kernel", True, True, 0), (128, 128, 8, 3, 0, 0, "kernel", True, False, 64),
    (128, 128, 8, 3, 0, 0, "kernel", True, True, 64), (128, 128, 8, 3, 1, 1, "kernel", True, True, 64),
    (128, 64, 8, 3, 0, 0, "kernel", True, True, 0), (128, 128, 8, 3, 0, 0, "kernel", True, False, 0),
]


def cases(device: torch.device, g: torch.Generator) -> dict:
    out = {}
    for n in SIZES:
        sets = []
        for _ in range(4):
            rows = torch.sort(torch.randperm(n, device=device, generator=g)[: n * 15 // 100]).values
            sets.append((torch.randn(rows.numel(), HEADS, DIM, device=device, dtype=torch.bfloat16, generator=g),
                         torch.randn(n, KV_HEADS, DIM, device=device, dtype=torch.bfloat16, generator=g),
                         torch.randn(n, KV_HEADS, DIM, device=device, dtype=torch.bfloat16, generator=g), rows))
        pos = torch.arange(n, device=device)
        q, k, v, rows = sets[0]
        ref = torch.cat([sparse_query_attention_ref(q[i:i + 1024], rows[i:i + 1024], k, v, pos, DIM ** -0.5).float()
                         for i in range(0, rows.numel(), 1024)])
        out[n] = {"sets": sets, "pos": pos, "ref": ref, "flops": 4 * HEADS * DIM * float((rows + 1).sum())}
    return out


def graph_ms(fn, sets) -> float:
    """Median over 12 replays (rotating the 4 input sets) of a CUDA graph of 10 calls, per call."""
    graphs = []
    for args in sets:
        fn(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                fn(*args)
        graphs.append(graph)
    times = []
    for i in range(12):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        graphs[i % 4].replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 10)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--variants", default=None, help="indices into VARIANTS, comma separated")
    args = parser.parse_args()
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    g = torch.Generator(device=device).manual_seed(4)
    data = cases(device, g)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    mm = graph_ms(lambda x, y: x @ y, [(a, b)] * 4)
    report = {"device": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "torch": torch.__version__, "matmul_TFLOPs": 2 * 8192 ** 3 / mm / 1e9, "multiprocessors": sms,
              "bounds": [], "variants": []}
    del a, b
    print(f"matmul {report['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    for n, case in data.items():
        for tokens_per_tile in (16, 32):
            row = {"tokens": n, "tokens_per_tile": tokens_per_tile,
                   "torch_us": 1e3 * graph_ms(lambda q, k, v, r: tile_key_bounds(r, case["pos"], tokens_per_tile, True),
                                              case["sets"])}
            report["bounds"].append(row)
            print("bounds", row, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picked = range(len(VARIANTS)) if not args.variants else [int(i) for i in args.variants.split(",")]
    for index in picked:
        bm, bn, warps, stages, schedule, per_sm, bounds, fold, lazy, mask_bn = VARIANTS[index]
        config = dict(DEFAULT_CONFIG, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, tma=True,
                      schedule=schedule, programs=per_sm * sms, bounds=bounds, fold=fold, lazy=lazy,
                      mask_block_n=mask_bn)
        row = {"variant": index, **{key: config[key] for key in config}}
        try:
            for n, case in data.items():
                pos = case["pos"]
                q, k, v, rows = case["sets"][0]
                result = sparse_query_attention(q, rows, k, v, pos, keys_sorted=True, config=config).float()
                row[f"err_{n}"] = float((result - case["ref"]).norm() / case["ref"].norm())
                call = graph_ms(lambda q, k, v, r: sparse_query_attention(q, r, k, v, pos, keys_sorted=True,
                                                                          config=config), case["sets"])
                row[f"call_TFLOPs_{n}"] = case["flops"] / call / 1e9
                tpt = bm // (HEADS // KV_HEADS)
                prepared = []
                for q, k, v, r in case["sets"]:
                    full, end = tile_key_bounds(r, pos, tpt, True)
                    prepared.append((q, k, v, r, full, end, torch.empty_like(q)))

                def launch(q, k, v, r, full, end, o):
                    return _launch_attention(q, r, k, v, pos, o, full, end, DIM ** -0.5, config, bm, bn, stages)
                compiled = launch(*prepared[0])
                row.update(n_regs=compiled.n_regs, n_spills=compiled.n_spills, shared=compiled.metadata.shared)
                kernel = graph_ms(launch, prepared)
                row[f"kernel_TFLOPs_{n}"] = case["flops"] / kernel / 1e9
            row["status"] = "ok" if max(row[f"err_{n}"] for n in SIZES) < 1e-2 else "wrong"
        except Exception as exc:  # noqa: BLE001 - a config the chip cannot hold: recorded, not fatal
            row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        report["variants"].append(row)
        print(json.dumps(row), flush=True)
        (out / "attention_schedules.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'#':>2} {'M/N/w/s':>12} {'sched':>5} {'bounds':>6} {'fold':>4} {'lazy':>4} {'mbn':>3} {'regs':>4} {'spill':>5} {'smem':>6} "
          f"{'8k call':>8} {'8k kern':>8} {'32k call':>8} {'32k kern':>8}")
    for r in report["variants"]:
        if r["status"] != "ok":
            print(r["variant"], r["status"][:100])
            continue
        print(f"{r['variant']:>2} {r['BLOCK_M']}/{r['BLOCK_N']}/{r['num_warps']}/{r['num_stages']:>1} "
              f"{r['schedule']:>5}{'/' + str(r['programs']) if r['schedule'] else '':<5} {r['bounds']:>6} {str(r['fold'])[0]:>4} {str(r['lazy'])[0]:>4} {r['mask_block_n']:>3} "
              f"{r['n_regs']:>4} {r['n_spills']:>5} {r['shared']:>6} "
              + " ".join(f"{r[f'{kind}_TFLOPs_{n}']:8.0f}" for n in SIZES for kind in ("call", "kernel")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
