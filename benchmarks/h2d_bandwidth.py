"""Host-to-device bandwidth the ways the served path moves chunk KV onto a GPU: one large pinned copy, a pageable
one, and a blend's `TensorLayerSource` over Llama-3-8B-shaped chunk entries (pinned as the store's memory tier holds
them, and as `SaveQueue` makes them), each timed with CUDA events over every layer, medians of --reps. Then what
storing costs the engine's own thread: the time of a small step (a matmul and a sync) alone, and while SaveQueue's
thread stores a 16k-token prompt's 64 spans into fresh pinned blocks (each a cudaHostAlloc), then into blocks torch's
pinned allocator had cached (is it the allocations that hold the engine's thread up?).

    python benchmarks/h2d_bandwidth.py [--chunks 6,16,63] [--reps 5] [--out FILE]

Each source row also gives its copy stream's own rate (`copies`, CUDA events around each group's copies), alone and
while the compute stream runs a matmul per layer (does the copy keep its rate under compute?).

Why: on the H100 the blend's synced stage times pointed at chunk KV arriving at ~13 GB/s (benchmarks/HISTORY.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from benchmarks.gpu_blend import Timer
from benchmarks.harness import record, write
from kvblend.blend.source import TensorLayerSource
from kvblend.store.key import ChunkKey
from kvblend.vllm.save_queue import SaveQueue

LAYERS, HEADS, HEAD_DIM, CHUNK = 32, 8, 128, 512


def gbps(nbytes: int, ms: float) -> float:
    return round(nbytes / ms / 1e6, 2)


def time_ms(fn, reps: int) -> tuple[float, float, float]:
    """Median, min, max of fn's device time (gpu_blend's CUDA-event Timer), after one warm-up."""
    fn()
    timer = Timer(torch.device("cuda"))
    times = [timer(fn) for _ in range(reps)]
    return statistics.median(times), min(times), max(times)


def plain_copies(nbytes: int, reps: int) -> list[dict]:
    device = torch.device("cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rows = []
    for name, src in (("pinned", torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)),
                      ("pageable", torch.empty(nbytes, dtype=torch.uint8))):
        src.fill_(1)
        med, lo, hi = time_ms(lambda: dst.copy_(src, non_blocking=True), reps)  # noqa: B023
        rows.append({"case": f"one {name} copy", "bytes": nbytes, "ms": med, "min": lo, "max": hi, "GBps": gbps(nbytes, med)})
    return rows


def source_rows(ks, vs, reps: int, label: str, group: int = 4, work: torch.Tensor | None = None) -> dict:
    """Every layer of a TensorLayerSource over (ks, vs), waited on the compute stream as a blend does; with `work`
    (a square matrix), a matmul of it per layer on the compute stream, as a blend's layer computes while the next
    groups copy. `copies`: the last rep's copy stream (`TensorLayerSource.copy_times`): its rate while compute runs."""
    device = torch.device("cuda")
    copies = {}

    def run():
        source = TensorLayerSource(ks, vs, device, group=group, timed=True)
        for layer in range(LAYERS):
            source.wait(layer)[0][:1].add_(0)  # a kernel that reads the staging after the wait, as the blend's gather does
            if work is not None:
                torch.mm(work, work)
        copies.update(source.copy_times())
        source.close()

    nbytes = sum(k.nbytes + v.nbytes for k, v in zip(ks, vs))
    med, lo, hi = time_ms(run, reps)
    compute = {} if work is None else {"matmul_per_layer": list(work.shape),
                                       "matmul_ms": time_ms(lambda: torch.mm(work, work), reps)[0]}
    return {"case": label, "group": group, "chunks": len(ks), "bytes": nbytes, "ms": med, "min": lo, "max": hi,
            "GBps": gbps(nbytes, med), "pinned": all(k.is_pinned() for k in ks), "copies": copies, **compute}


def saved_entries(n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """n chunks' K/V as SaveQueue leaves them in host memory (drawn on the GPU, copied out by its thread)."""
    device = torch.device("cuda")
    got = {}
    saver = SaveQueue(device, lambda key, k, v, ids, base: got.__setitem__(base, (k, v)))
    for i in range(n):
        k = torch.randn(LAYERS, CHUNK, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        ids = list(range(i * CHUNK, (i + 1) * CHUNK))
        saver.submit(ChunkKey.alone("h2d", ids), k, torch.randn_like(k), ids, i * CHUNK)
    saver.close()
    return [got[i * CHUNK][0] for i in range(n)], [got[i * CHUNK][1] for i in range(n)]


def step_while_saving(spans: int = 64, tokens: int = 256, prewarm: bool = False) -> list[dict]:
    """The main thread's step time (a small matmul and a sync, as vLLM's sampling step syncs) alone, then while
    SaveQueue's thread moves `spans` spans of `tokens` tokens to pinned host memory: fresh (each a cudaHostAlloc),
    or with `prewarm` from torch's pinned-block cache (blocks of that size allocated and freed first), which tells
    whether the allocations are what holds the engine's thread up."""
    device = torch.device("cuda")
    if prewarm:
        shape = (LAYERS, tokens, HEADS, HEAD_DIM)
        blocks = [torch.empty(shape, dtype=torch.bfloat16, pin_memory=True) for _ in range(2 * spans)]
        del blocks  # back to torch's caching host allocator, which SaveQueue's allocations then reuse
    a = torch.randn(1024, 1024, device=device)

    def steps(until) -> list[float]:
        times = []
        while not until():
            start = time.perf_counter()
            (a @ a).sum().item()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    deadline = time.perf_counter() + 1.0
    alone = steps(lambda: time.perf_counter() > deadline)
    spans_kv = [(torch.randn(LAYERS, tokens, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16),) * 2
                for _ in range(spans)]
    torch.cuda.synchronize()
    kept = []
    saver = SaveQueue(device, lambda key, k, v, ids, base: kept.append((k, v)))
    done = threading.Event()
    start = time.perf_counter()
    for i, (k, v) in enumerate(spans_kv):
        ids = list(range(i * tokens, (i + 1) * tokens))
        saver.submit(ChunkKey.alone("h2d", ids), k, v, ids, i * tokens)
    threading.Thread(target=lambda: (saver.close(), done.set())).start()
    during = steps(done.is_set)
    total = (time.perf_counter() - start) * 1e3
    nbytes = sum(k.nbytes + v.nbytes for k, v in spans_kv)
    return [{"case": "step alone", "steps": len(alone), "step_ms_median": statistics.median(alone),
             "step_ms_max": max(alone)},
            {"case": f"step while SaveQueue stores {spans} spans" + (" (pinned blocks cached)" if prewarm else ""),
             "bytes": nbytes, "save_ms": total,
             "steps": len(during), "step_ms_median": statistics.median(during) if during else None,
             "step_ms_max": max(during) if during else None, "save_thread_host_ms": saver.host_ms}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", default="6,16,63")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    rows = step_while_saving() + step_while_saving(prewarm=True)[1:] + plain_copies(512 << 20, args.reps)
    for n in (int(x) for x in args.chunks.split(",")):
        shape = (LAYERS, CHUNK, HEADS, HEAD_DIM)
        ks = [torch.empty(shape, dtype=torch.bfloat16, pin_memory=True).normal_() for _ in range(n)]
        vs = [torch.empty(shape, dtype=torch.bfloat16, pin_memory=True).normal_() for _ in range(n)]
        for group in (4, 8):
            rows.append(source_rows(ks, vs, args.reps, "TensorLayerSource, torch.empty(pin_memory=True)", group))
        # 1.1 TFLOP a layer: half of a 32k blend's post-check layer (5k rows through 8B's linear layers, 2.2 TFLOP)
        work = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        rows.append(source_rows(ks, vs, args.reps, "TensorLayerSource while a matmul runs per layer", work=work))
        del work
        del ks, vs
        ks, vs = saved_entries(n)
        rows.append(source_rows(ks, vs, args.reps, "TensorLayerSource, SaveQueue's entries"))
        del ks, vs
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        write(args.out, record("h2d_bandwidth", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
