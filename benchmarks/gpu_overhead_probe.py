"""Where the blend path's time goes on the GPU when little is recomputed: host overhead per op and per layer.

Prints the cost of an empty torch launch, then profiles full_reuse and cacheblend runs (Llama-3-8B shape) with
torch.profiler: host time per op type and the number of kernels per layer.  python benchmarks/gpu_overhead_probe.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_blend import LLAMA3_8B, Timer, build_models, make_chunks, run_blend  # noqa: E402
from kvblend.blend.config import BlendConfig  # noqa: E402
from kvblend.blend.engine import BlendEngine  # noqa: E402
from kvblend.blend.layout import PromptLayout  # noqa: E402
from kvblend.blend.source import TensorLayerSource  # noqa: E402


def main() -> int:
    device = torch.device("cuda")
    x = torch.randn(16, device=device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(2000):
        x.add_(1.0)
    launch_us = (time.perf_counter() - start) / 2000 * 1e6
    torch.cuda.synchronize()
    print(f"host cost of one tiny torch launch: {launch_us:.1f} us")
    _, model = build_models(LLAMA3_8B, device)
    engine = BlendEngine(model)
    chunks, question = make_chunks(model, 16, device)
    layout = PromptLayout.build([], [c[0] for c in chunks], question)
    timer = Timer(device)
    for policy in ("full_reuse", "cacheblend"):
        def once():
            source = TensorLayerSource([c[1] for c in chunks], [c[2] for c in chunks], device)
            run_blend(engine, layout, BlendConfig(policy, 0.15, gate_bound=None), source, None, None)
        for _ in range(2):
            once()
        print(policy, "ttft ms", sorted(timer(once) for _ in range(5))[2])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            once()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(table)
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"{policy}: {kernels} GPU kernels in one run ({kernels / 32:.0f} per layer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
