"""Sparse-query attention on one GPU: main-loop and schedule variants of the kernel (issue 15, round 5).

Ablations ("ablate": 1 skips the masked band, 2 the unmasked keys, 3 both, 4 replaces the bound search by the
bounds of evenly spread queries) time parts of the kernel: their outputs are incomplete by construction.
Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16), 15% of S positions as sorted random
queries over all S keys (S = 8256 and 32832), FLOPs of visible pairs only. Per variant: relative error against the
fp32 torch reference, then TFLOP/s of the whole `sparse_query_attention` call as CUDA-graph replays of 10 calls on
4 rotated input sets (median of ROUNDS rounds, all variants interleaved in each round), and the compiled kernel's registers, spills and shared memory. Also the tile-bound search
alone (torch ops, and the kernel's in-kernel search as its own launch), and which Gluon (Hopper) modules the
installed Triton has. Run on the device, from the repo root:  python benchmarks/attention_schedules.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvblend.triton_kernels.sparse_attention import (  # noqa: E402
    DEFAULT_CONFIG,
    _sparse_query_attention_kernel,
    sparse_query_attention,
    sparse_query_attention_ref,
    tile_key_bounds,
    tile_key_bounds_triton,
)

HEADS, KV_HEADS, DIM = 32, 8, 128
SIZES = (8256, 32832)
# launch-config overrides of DEFAULT_CONFIG
VARIANTS = [
    {}, {"bounds": 1}, {"bounds": 2}, {"bounds": 3}, {"ablate": 4}, {}, {"bounds": 2},
]
ROUNDS = 5  # timing rounds, the variants interleaved in each, so drift of the clock hits them all alike


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


def capture(fn, sets) -> list:
    """CUDA graphs of 10 calls, one per input set."""
    graphs = []
    for args in sets:
        fn(*args)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                fn(*args)
        graphs.append(graph)
    return graphs


def replay_ms(graphs) -> float:
    """Median over 12 replays (rotating the input sets' graphs), per call."""
    times = []
    for i in range(12):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        graphs[i % len(graphs)].replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 10)
    return statistics.median(times)


def graph_ms(fn, sets) -> float:
    return replay_ms(capture(fn, sets))


def _compiled() -> list:
    return [k for cache in _sparse_query_attention_kernel.device_caches.values() for k in cache[0].values()]


def compiled_count() -> int:
    return len(_compiled())


def compiled_stats() -> dict:
    """Registers, spills and shared memory of the most recently compiled attention kernel."""
    last = _compiled()[-1]
    return {"n_regs": last.n_regs, "n_spills": last.n_spills, "shared": last.metadata.shared}


def gluon_modules() -> dict:
    """What the installed Triton offers for explicit Hopper kernels (Gluon)."""
    found = {"triton": triton.__version__}
    try:
        from triton.experimental import gluon  # noqa: F401
        from triton.experimental.gluon.language.nvidia import hopper
        found["hopper"] = sorted(n for n in dir(hopper) if not n.startswith("_"))
        for sub in ("tma", "mbarrier"):
            found[f"hopper.{sub}"] = sorted(n for n in dir(getattr(hopper, sub, None)) if not n.startswith("_"))
        from triton.experimental.gluon import language as gl
        found["gl.warp_specialize"] = hasattr(gl, "warp_specialize")
    except Exception as exc:  # noqa: BLE001 - recorded: the answer is what exists
        found["error"] = f"{type(exc).__name__}: {exc}"
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--variants", default=None, help="indices into VARIANTS, comma separated")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    report = {"device": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "torch": torch.__version__, "gluon": gluon_modules(), "multiprocessors": sms, "bounds": [],
              "variants": []}
    print(json.dumps(report["gluon"]), flush=True)
    g = torch.Generator(device=device).manual_seed(4)
    data = cases(device, g)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    report["matmul_TFLOPs"] = 2 * 8192 ** 3 / graph_ms(lambda x, y: x @ y, [(a, b)] * 4) / 1e9
    del a, b
    print(f"matmul {report['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    tokens_per_tile = DEFAULT_CONFIG["BLOCK_M"] // (HEADS // KV_HEADS)
    for n, case in data.items():
        pos = case["pos"]
        row = {"tokens": n, "tokens_per_tile": tokens_per_tile,
               "torch_us": 1e3 * graph_ms(lambda q, k, v, r: tile_key_bounds(r, pos, tokens_per_tile, True),
                                          case["sets"]),
               "triton_us": 1e3 * graph_ms(lambda q, k, v, r: tile_key_bounds_triton(r, pos, tokens_per_tile, True),
                                           case["sets"])}
        report["bounds"].append(row)
        print("bounds", row, flush=True)
    picked = range(len(VARIANTS)) if not args.variants else [int(i) for i in args.variants.split(",")]
    graphs = {}
    for index in picked:
        config = dict(DEFAULT_CONFIG, **VARIANTS[index])
        row = {"variant": index, **config}
        try:
            for n, case in data.items():
                pos = case["pos"]
                q, k, v, rows = case["sets"][0]
                before = compiled_count()
                result = sparse_query_attention(q, rows, k, v, pos, keys_sorted=True, config=config).float()
                row[f"err_{n}"] = float((result - case["ref"]).norm() / case["ref"].norm())
                if compiled_count() > before:
                    row.update(compiled_stats())
                graphs[index, n] = capture(lambda q, k, v, r, pos=pos, config=config: sparse_query_attention(
                    q, r, k, v, pos, keys_sorted=True, config=config), case["sets"])
            row["status"] = "ok" if max(row[f"err_{n}"] for n in SIZES) < 1e-2 or config["ablate"] else "wrong"
        except Exception as exc:  # noqa: BLE001 - a config the compiler or chip refuses: recorded, not fatal
            row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        report["variants"].append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in report["variants"] if r["status"] == "ok"]
    for _ in range(ROUNDS):
        for r in ok:
            for n in SIZES:
                r.setdefault(f"rounds_{n}", []).append(data[n]["flops"] / replay_ms(graphs[r["variant"], n]) / 1e9)
    for r in ok:
        for n in SIZES:
            r[f"TFLOPs_{n}"] = statistics.median(r[f"rounds_{n}"])
    (out / "attention_schedules.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'#':>2} {'variant':<48} {'regs':>4} {'spill':>5} {'smem':>6} {'8k':>6} {'32k':>6} {'err':>7}"
          f"  (median of {ROUNDS} interleaved rounds [min, max])")
    for r in report["variants"]:
        name = json.dumps(VARIANTS[r["variant"]])
        if r["status"] != "ok":
            print(f"{r['variant']:>2} {name:<48} {r['status'][:160]}")
            continue
        print(f"{r['variant']:>2} {name:<48} {r.get('n_regs', '-'):>4} {r.get('n_spills', '-'):>5} "
              f"{r.get('shared', '-'):>6} "
              + " ".join(f"{r[f'TFLOPs_{n}']:6.0f}" for n in SIZES) + f" {max(r[f'err_{n}'] for n in SIZES):7.1e}  "
              + " ".join(f"[{min(r[f'rounds_{n}']):.0f}, {max(r[f'rounds_{n}']):.0f}]" for n in SIZES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
