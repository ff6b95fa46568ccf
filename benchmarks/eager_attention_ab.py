"""Eager cacheblend TTFT at 3k (6 chunks, KV from pinned memory, no CUDA graphs) with the sparse attention's Triton
and Gluon kernels switched in one process (A/B/A/B, 2 warm-ups and 10 timed runs each, then the per-stage run),
to tell a cost of the kernel from the state of the process or the machine. Run on the device:
  python benchmarks/eager_attention_ab.py
"""
import statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
import gpu_blend as g
from kvblend.blend.config import BlendConfig
from kvblend.triton_kernels import sparse_attention
from kvblend.triton_kernels.sparse_attention import DEFAULT_CONFIG

torch.set_num_threads(1)
dev = torch.device("cuda")
hf, model = g.build_models(g.LLAMA3_8B, dev)
del hf
g.fuse_projections(model.weights)
eager = g.BlendEngine(model)
chunks, question = g.make_chunks(model, 6, dev)
pinned = [(k.cpu().pin_memory(), v.cpu().pin_memory()) for _, k, v in chunks]
timer = g.Timer(dev)
tokens = 6 * g.CHUNK + g.QUESTION
s = model.spec
cache = torch.empty(s.num_layers, 2, tokens // 16 + 1, 16, s.num_kv_heads, s.head_dim, device=dev, dtype=torch.bfloat16)
slots = torch.arange(tokens, device=dev)
gen = torch.Generator().manual_seed(3)
calls = []
real = sparse_attention.sparse_query_attention_gluon
def counted(*a, **k):
    calls.append(1)
    return real(*a, **k)
sparse_attention.sparse_query_attention_gluon = counted

def draw():
    order = torch.randperm(6, generator=gen).tolist()
    return order, g.PromptLayout.build([], [chunks[i][0] for i in order], question)

def run(order, layout):
    sel = [pinned[i] for i in order]
    source = g.TensorLayerSource([k for k, _ in sel], [v for _, v in sel], dev)
    g.run_blend(eager, layout, BlendConfig("cacheblend", 0.15), source, cache, slots)

for mode in (False, True, False, True):
    DEFAULT_CONFIG["gluon"] = mode
    calls.clear()
    for _ in range(2):
        run(*draw())
    n_warm = len(calls)
    times = []
    for _ in range(10):
        o, l = draw()
        times.append(timer(lambda: run(o, l)))
    stages = g.profile_stages(eager, draw, pinned, dev)
    print(f"gluon={mode}: eager 3k {statistics.median(times):.2f} ms [{min(times):.2f}, {max(times):.2f}], "
          f"gluon calls per run {n_warm / 2:.0f}, stages {stages}", flush=True)
