"""GPU blend benchmark: TTFT of kvblend's blend path against HF transformers on a Llama-3-8B-shaped model.

Random bf16 weights are built on the device (no checkpoint can be fetched there) and shared by the HF model
and kvblend's runner. Prompts: 6, 16, 32, 64 chunks x 512 tokens + a 64-token question. Rows, one run, one GPU:
  hf_full_prefill, kvblend_full_prefill, prefix_caching (first chunk reused), full_reuse, cacheblend (r=0.15),
  epic (k=16) -- the last three with chunk KV resident on the GPU and in CPU pinned memory, post-check layers
  as CUDA graphs and the layers up to the last check too once a shape repeats (the second warm-up captures
  them) -- and cacheblend_eager (pinned, no graphs).
TTFT = prompt in -> first-token logits, median of --reps timed runs after warm-up (spread: min and max), CUDA
events, and each run draws another chunk order (rotated inputs). First, in the same run: the ceilings, the
sparse-attention configs (Triton tile configs and the Gluon Hopper kernel, each checked against the torch
reference, the fastest kept for the TTFT rows), FlexAttention with a block mask on the same case, and the copy
kernels. Run on the device:
  KVBLEND_GIT_SHA=<sha> python -m benchmarks.gpu_blend --out $OUT   (writes gpu_blend_<gpu>.json and .png there)
`--tiny` runs a 5-layer toy shape (past the default check layers 1 and 3) on the CPU to check the script.
On CUDA the process runs as a vLLM GPU worker does, with one torch intra-op thread (vLLM's
`set_torch_threads_for_runtime`, unless OMP_NUM_THREADS is set outside): the default pool's spinning workers
caused the slow-run tail (RESULTS, fourth round). `--torch-threads N` overrides; the JSON records the count.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import RESULTS, record, result_path, tiny_out, write  # noqa: E402
from kvblend.blend.config import BlendConfig  # noqa: E402
from kvblend.blend.engine import BlendEngine  # noqa: E402
from kvblend.blend.layout import ChunkRef, PromptLayout  # noqa: E402
from kvblend.blend.source import TensorLayerSource  # noqa: E402
from kvblend.model.runner import LlamaModel  # noqa: E402
from kvblend.model.spec import spec_from_config  # noqa: E402
from kvblend.model.weights import fuse_projections, weights_from_tensors  # noqa: E402
from kvblend.store.key import ChunkKey  # noqa: E402
from kvblend.triton_kernels import paged_kv_write, rope_shift_gather, sparse_query_attention  # noqa: E402
from kvblend.triton_kernels.sparse_attention import DEFAULT_CONFIG, sparse_query_attention_ref  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, rope_theta=500000.0, max_position_embeddings=4096,
            rms_norm_eps=1e-5, tie_word_embeddings=False)
CHUNK, QUESTION = 512, 64
# cacheblend as every round measured it: without the quality gate, which is on by default since issue 16 (its host
# read at the first check layer would keep the check layers out of CUDA graphs)
CACHEBLEND = BlendConfig("cacheblend", 0.15, gate_bound=None)


class Timer:
    """Milliseconds of a callable: CUDA events on the GPU, perf_counter on the CPU. `repeat` > 1 runs it back to
    back between the two events and returns the mean, so a kernel's launch cost on the host stays hidden."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeat: int = 1) -> float:
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            return (time.perf_counter() - start) * 1e3 / repeat
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / repeat


def build_models(config: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_config = LlamaConfig(**config, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        hf = LlamaForCausalLM(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    spec = spec_from_config({**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"]}, dtype="bfloat16",
                            weights_id="random-seed-0")
    weights = weights_from_tensors(dict(hf.named_parameters()), spec, device)
    return hf, LlamaModel(spec, weights)


def make_chunks(model: LlamaModel, n: int, device: torch.device):
    """n random 512-token chunks, each prefilled alone from position 0 (as the store would hold them)."""
    g = torch.Generator().manual_seed(1)
    chunks = []
    for i in range(n):
        ids = torch.randint(0, model.spec.vocab_size, (CHUNK,), generator=g)
        out = model.prefill(ids.to(device))
        key = ChunkKey.for_tokens(model.spec.fingerprint, ids.tolist(), "bench")
        chunks.append((ChunkRef(tuple(ids.tolist()), key), out.k, out.v))
    question = torch.randint(0, model.spec.vocab_size, (QUESTION,), generator=g).tolist()
    return chunks, question


def run_blend(engine: BlendEngine, layout: PromptLayout, config: BlendConfig, source, cache, slots,
              exact_prefix: int = 0, prefix_kv=None):
    """Plan, run every layer, write the prompt's KV into a paged cache (as the connector does), logits."""
    plan = engine.plan(layout, config, exact_prefix=exact_prefix, bases={c.key: 0 for c in layout.chunks})
    result = engine.run(plan, source=source if plan.cached_keys else None, prefix_kv=prefix_kv)
    if cache is not None:
        for layer in range(result.k.shape[0]):
            paged_kv_write(result.k[layer], result.v[layer], cache[layer], slots, "flash", check=False)
    return result


def measure_ceilings(device: torch.device, timer: Timer) -> dict:
    n = 1 << 29 if device.type == "cuda" else 1 << 22
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(10))
    m = 8192 if device.type == "cuda" else 512
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_ms = statistics.median(timer(lambda: a @ b) for _ in range(10))
    return {"copy_GBps": 2 * src.nbytes / copy_ms / 1e6, "matmul_TFLOPs": 2 * m**3 / mm_ms / 1e9}


def kernel_rates(model: LlamaModel, device: torch.device, timer: Timer, ceilings: dict, tokens: int) -> list[dict]:
    """rope_shift_gather and paged_kv_write on `tokens` rows (enough to fill the GPU), each timed over 20
    back-to-back calls, against the copy ceiling measured in the same run."""
    s = model.spec
    g = torch.Generator(device=device).manual_seed(2)
    src_k = torch.randn(tokens, s.num_kv_heads, s.head_dim, device=device, dtype=torch.bfloat16, generator=g)
    src_v = torch.randn_like(src_k)
    dst_k, dst_v = torch.empty_like(src_k), torch.empty_like(src_v)
    rows = torch.randperm(tokens, device=device, generator=g)
    delta = torch.randint(0, tokens, (tokens,), device=device, generator=g)
    src_rows = torch.arange(tokens, device=device)
    rope_ms = statistics.median(timer(lambda: rope_shift_gather(
        src_k, src_v, src_rows, dst_k, dst_v, rows, delta, model.freq, "neox", check=False), 20) for _ in range(5))
    blocks = tokens // 16 + 1
    cache = torch.empty(2, blocks, 16, s.num_kv_heads, s.head_dim, device=device, dtype=torch.bfloat16)
    slots = torch.randperm(blocks * 16, device=device, generator=g)[:tokens]
    write_ms = statistics.median(timer(lambda: paged_kv_write(dst_k, dst_v, cache, slots, "flash", check=False), 20)
                                 for _ in range(5))
    kv_bytes = 2 * src_k.nbytes
    return [
        {"kernel": "rope_shift_gather", "achieved": 2 * kv_bytes / rope_ms / 1e6, "ceiling": ceilings["copy_GBps"], "unit": "GB/s"},
        {"kernel": "paged_kv_write", "achieved": 2 * kv_bytes / write_ms / 1e6, "ceiling": ceilings["copy_GBps"], "unit": "GB/s"},
        {"kernel": "rope_shift_gather+paged_kv_write", "achieved": 4 * kv_bytes / (rope_ms + write_ms) / 1e6,
         "ceiling": ceilings["copy_GBps"], "unit": "GB/s"},
    ]


def attention_sets(spec, device: torch.device, tokens: int, g: torch.Generator) -> list[tuple]:
    """4 rotated input sets (q, k, v, query positions): 15% of `tokens` positions as queries over all keys."""
    sets = []
    for _ in range(4):
        q_rows = torch.sort(torch.randperm(tokens, device=device, generator=g)[: tokens * 15 // 100]).values
        sets.append(tuple(torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=g) for shape in (
            (q_rows.numel(), spec.num_heads, spec.head_dim), (tokens, spec.num_kv_heads, spec.head_dim),
            (tokens, spec.num_kv_heads, spec.head_dim))) + (q_rows,))
    return sets


def chunked_reference(q, q_rows, k, v, pos, scale: float, chunk: int = 1024) -> torch.Tensor:
    """The fp32 reference in query chunks (its dense mask of a 32k prompt would not fit at once)."""
    return torch.cat([sparse_query_attention_ref(q[i:i + chunk], q_rows[i:i + chunk], k, v, pos, scale).float()
                      for i in range(0, q_rows.numel(), chunk)])


def attention_rates(model: LlamaModel, device: torch.device, timer: Timer, ceilings: dict, tokens: int,
                    long_tokens: int, configs: list[dict]) -> tuple[list[dict], dict]:
    """sparse_query_attention on 15% of `tokens` positions as queries over all keys (the reported case), on 15%
    of `long_tokens`, and on every position of `tokens` (the causal prefill case, against SDPA's flash kernel),
    per launch config: checked against the fp32 reference (relative error); timed on 4 rotated input sets as
    CUDA-graph replays of 10 calls (GPU time, as the post-check layers run) and eagerly (host launch cost
    included, as the layers up to the last check run). FlexAttention with a block mask on the sparse case.
    Returns the rows and the config fastest on the two sparse cases together (sum of its graph times relative
    to the best at each size)."""
    s = model.spec
    g = torch.Generator(device=device).manual_seed(4)
    scale = 1 / math.sqrt(s.head_dim)
    cases = {}
    for n in (tokens, long_tokens):
        sets = attention_sets(s, device, n, g)
        pos = torch.arange(n, device=device)
        cases[n] = (sets, pos, 4 * s.num_heads * s.head_dim * float((sets[0][3] + 1).sum()),
                    chunked_reference(sets[0][0], sets[0][3], sets[0][1], sets[0][2], pos, scale))
    sets, pos, flops, ref = cases[tokens]
    full_flops = 4 * s.num_heads * s.head_dim * tokens * (tokens + 1) / 2

    def rate(fn, work, case_sets=sets):
        ms = statistics.median(timer(lambda: fn(*case_sets[i % 4]), 10) for i in range(8))
        return work / ms / 1e9

    def graph_rate(fn, work, case_sets):
        if device.type != "cuda":
            return rate(fn, work, case_sets)
        graphs = []
        for args in case_sets:
            fn(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(10):
                    fn(*args)
            graphs.append(graph)
        ms = statistics.median(timer(graphs[i % 4].replay) / 10 for i in range(8))
        return work / ms / 1e9

    rows = []
    for config in configs:
        row = {"kernel": "sparse_query_attention (15% queries)", **config, "ceiling": ceilings["matmul_TFLOPs"],
               "unit": "TFLOP/s"}
        try:
            for n, key in ((tokens, ""), (long_tokens, "long_")):
                case_sets, case_pos, case_flops, case_ref = cases[n]

                def call(q, k, v, r, case_pos=case_pos):
                    return sparse_query_attention(q, r, k, v, case_pos, keys_sorted=True, config=config)
                q0, k0, v0, rows0 = case_sets[0]
                out = call(q0, k0, v0, rows0).float()
                row[f"{key}rel_err"] = float((out - case_ref).norm() / case_ref.norm())
                row["achieved" if not key else "long_TFLOPs"] = graph_rate(call, case_flops, case_sets)
            row["long_tokens"] = long_tokens
            row["eager_TFLOPs"] = rate(lambda q, k, v, r: sparse_query_attention(q, r, k, v, pos, keys_sorted=True,
                                                                                   config=config), flops)
            full = torch.randn(tokens, s.num_heads, s.head_dim, device=device, dtype=torch.bfloat16, generator=g)
            row["causal_full_TFLOPs"] = graph_rate(lambda q, k, v, r: sparse_query_attention(
                full, pos, k, v, pos, keys_sorted=True, config=config), full_flops, sets)
            row["status"] = "ok" if max(row["rel_err"], row["long_rel_err"]) < 1e-2 else "wrong"
        except Exception as exc:  # a config the chip cannot hold (shared memory): recorded, not fatal
            row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        print(f"attention {config}: {row.get('achieved', 0):.0f} TFLOP/s sparse "
              f"(eager {row.get('eager_TFLOPs', 0):.0f}), "
              f"{row.get('long_TFLOPs', 0):.0f} at {long_tokens}, {row.get('causal_full_TFLOPs', 0):.0f} causal, "
              f"err {row.get('rel_err', float('nan')):.1e} {row['status']}", flush=True)
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    best = None
    if ok:
        top = {key: max(r[key] for r in ok) for key in ("achieved", "long_TFLOPs")}
        best = min(ok, key=lambda r: sum(top[key] / r[key] for key in top))
    rows.append(flex_attention_rate(sets, pos, ref, flops, rate, ceilings, device))
    full = torch.randn(tokens, s.num_heads, s.head_dim, device=device, dtype=torch.bfloat16, generator=g)
    group = s.num_heads // s.num_kv_heads
    sdpa = rate(lambda q, k, v, r: torch.nn.functional.scaled_dot_product_attention(
        full.transpose(0, 1)[None], k.repeat_interleave(group, 1).transpose(0, 1)[None],
        v.repeat_interleave(group, 1).transpose(0, 1)[None], is_causal=True), full_flops)
    rows.append({"kernel": "torch SDPA causal (all positions, KV heads expanded)", "achieved": sdpa,
                 "ceiling": ceilings["matmul_TFLOPs"], "unit": "TFLOP/s", "status": "ok"})
    return rows, best


def flex_attention_rate(sets, pos, ref, flops, rate, ceilings, device) -> dict:
    """torch's FlexAttention (compiled) on the sparse case, its block mask built from the query positions."""
    row = {"kernel": "flex_attention + block mask (15% queries)", "ceiling": ceilings["matmul_TFLOPs"],
           "unit": "TFLOP/s"}
    if device.type != "cuda":
        return {**row, "status": "skipped (CPU)"}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        masks = {}

        def block_mask(q_rows):
            def causal_by_position(b, h, q_idx, kv_idx):
                return pos[kv_idx] <= q_rows[q_idx]
            return create_block_mask(causal_by_position, None, None, q_rows.numel(), pos.numel(), device=device)

        def run(q, k, v, q_rows):
            if id(q_rows) not in masks:
                masks[id(q_rows)] = block_mask(q_rows)
            out = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=masks[id(q_rows)], enable_gqa=True)
            return out[0].transpose(0, 1)

        q0, k0, v0, rows0 = sets[0]
        start = time.perf_counter()
        out = run(q0, k0, v0, rows0).float()
        row["compile_s"] = round(time.perf_counter() - start, 1)
        row["rel_err"] = float((out - ref).norm() / ref.norm())
        for q, k, v, r in sets:
            run(q, k, v, r)
        row["achieved"] = rate(run, flops)
        start = time.perf_counter()
        for _ in range(10):
            block_mask(rows0)
        torch.cuda.synchronize()
        row["block_mask_ms"] = (time.perf_counter() - start) * 100
        row["status"] = "ok" if row["rel_err"] < 1e-2 else "wrong"
    except Exception as exc:
        row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    print(f"flex_attention: {row}", flush=True)
    return row


# The Triton kernel with pointer loads of K/V (the kernel before tensor descriptors) first, then with
# tensor-descriptor (TMA) loads: (BLOCK_M, BLOCK_N, warps, stages, tma); last the Gluon Hopper kernel (its own tiles).
ATTENTION_CONFIGS = [dict(DEFAULT_CONFIG, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st, tma=t, gluon=False)
                     for m, n, w, st, t in ((128, 64, 8, 3, False), (128, 128, 8, 3, True), (128, 64, 8, 4, True),
                                            (64, 128, 4, 3, True))] + [dict(DEFAULT_CONFIG, gluon=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="5-layer toy shape on the CPU (script check)")
    parser.add_argument("--chunks", default="6,16,32,64")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder of the result files (default: benchmarks/results; "
                                                    "--tiny: a temp folder)")
    parser.add_argument("--unfused", action="store_true", help="keep separate Q/K/V and gate/up GEMMs")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default on CUDA: 1, as a vLLM GPU worker; on CPU: torch's)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    threads = args.torch_threads or (1 if device.type == "cuda" else None)
    if threads:
        torch.set_num_threads(threads)
    timer = Timer(device)
    sizes = [int(x) for x in args.chunks.split(",")]
    hf, model = build_models(TINY if args.tiny else LLAMA3_8B, device)
    if not args.unfused:
        fuse_projections(model.weights)
    ceilings = measure_ceilings(device, timer)
    attention_tokens = 16 * CHUNK + QUESTION if not args.tiny else 1088
    long_tokens = 64 * CHUNK + QUESTION if not args.tiny else 2112
    configs = ATTENTION_CONFIGS if device.type == "cuda" else ATTENTION_CONFIGS[:1]
    attention, best = attention_rates(model, device, timer, ceilings, attention_tokens, long_tokens, configs)
    if best is not None:
        DEFAULT_CONFIG.update({k: best[k] for k in DEFAULT_CONFIG})
    kernels = kernel_rates(model, device, timer, ceilings, 1 << 16 if not args.tiny else 1088)
    graphs = device.type == "cuda"
    engine, eager = BlendEngine(model, cuda_graphs=graphs), BlendEngine(model)
    chunks, question = make_chunks(model, max(sizes), device)
    pinned = [(k.cpu().pin_memory() if device.type == "cuda" else k.cpu(),
               v.cpu().pin_memory() if device.type == "cuda" else v.cpu()) for _, k, v in chunks]
    rows, breakdown = [], {}
    g = torch.Generator().manual_seed(3)
    for n in sizes:
        tokens = n * CHUNK + QUESTION
        blocks = tokens // 16 + 1
        cache = torch.empty(model.spec.num_layers, 2, blocks, 16, model.spec.num_kv_heads, model.spec.head_dim,
                            device=device, dtype=torch.bfloat16)
        slots = torch.arange(tokens, device=device)

        def draw():
            order = torch.randperm(len(chunks), generator=g)[:n].tolist()
            layout = PromptLayout.build([], [chunks[i][0] for i in order], question)
            return order, layout

        def hf_row(order, layout):
            ids = layout.token_ids().to(device)[None]
            with torch.inference_mode():
                hf(ids, logits_to_keep=1, use_cache=True)

        def blend_row(config, where, blender=engine):
            def fn(order, layout):
                src = pinned if where == "cpu_pinned" else [(chunks[i][1], chunks[i][2]) for i in range(len(chunks))]
                sel = [src[i] for i in order]
                source = TensorLayerSource([k for k, _ in sel], [v for _, v in sel], device)
                run_blend(blender, layout, config, source, cache, slots)
            return fn

        def prefix_row(order, layout):
            first = chunks[order[0]]
            rest = PromptLayout.from_segments([first[0].token_ids] + [c.token_ids for c in layout.chunks[1:]] + [question])
            run_blend(engine, rest, BlendConfig("full_prefill", 1.0), None, cache, slots,
                      exact_prefix=CHUNK, prefix_kv=(first[1], first[2]))

        plan = [("hf_full_prefill", None, hf_row),
                ("kvblend_full_prefill", None, blend_row(BlendConfig("full_prefill", 1.0), "gpu")),
                ("prefix_caching", None, prefix_row)]
        for where in ("gpu", "cpu_pinned"):
            plan += [("full_reuse", where, blend_row(BlendConfig("full_reuse", 0.0), where)),
                     ("cacheblend", where, blend_row(CACHEBLEND, where)),
                     ("epic", where, blend_row(BlendConfig("epic", 16 / CHUNK, epic_tokens=16), where))]
        if graphs:
            plan.append(("cacheblend_eager", "cpu_pinned", blend_row(CACHEBLEND, "cpu_pinned",
                                                                     eager)))
        for name, where, fn in plan:
            for _ in range(args.warmup):
                fn(*draw())
            times, runs = [], []
            for _ in range(args.reps):
                order, layout = draw()
                wall, cpu = time.perf_counter(), time.process_time()
                times.append(timer(lambda: fn(order, layout)))
                runs.append({"wall_ms": round((time.perf_counter() - wall) * 1e3, 2),
                             "cpu_ms": round((time.process_time() - cpu) * 1e3, 2), **gpu_state()})
            rows.append({"row": name, "tokens": tokens, "kv_source": where, "ttft_ms": statistics.median(times),
                         "min_ms": min(times), "max_ms": max(times), "ttft_ms_all": [round(t, 3) for t in times],
                         "runs": runs})
            print(f"{tokens:6d} {name:22s} {where or '-':10s} {statistics.median(times):9.2f} ms "
                  f"[{min(times):.2f}, {max(times):.2f}]", flush=True)
        breakdown[tokens] = profile_stages(engine, draw, pinned, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (tiny)"
    report = record(
        "gpu_blend", rows, device=device_name, torch=torch.__version__, shape="tiny" if args.tiny else "llama-3-8b",
        fused_projections=not args.unfused, torch_threads=torch.get_num_threads(),
        attention_config=dict(DEFAULT_CONFIG), ceilings=ceilings, kernels=kernels, attention=attention,
        cuda_graphs={"buckets": engine.graphs.stats(), "check_layer_shapes": engine.check_graphs.stats(),
                     "workspace_MiB": engine.graphs.workspace_bytes() / 2**20} if graphs else None,
        cacheblend_stage_ms_cpu_pinned=breakdown)
    folder = Path(args.out) if args.out else Path(tiny_out("")) if args.tiny else RESULTS
    path = write(folder / result_path("gpu_blend", device_name).name, report)
    plot(rows, path.with_suffix(".png"), report["device"])
    print_summary(rows, kernels + attention, ceilings, report["cuda_graphs"])
    return 0


def gpu_state() -> dict:
    """SM clock (MHz), power (W) and NVML's clock-event (throttle) reason bits, read just after a timed run, to tell
    a slow run on a slowed GPU from one slowed on the host ({} where NVML is not there)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return {"sm_MHz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "power_W": round(pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3, 1),
                "clock_events": pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)}
    except Exception:  # noqa: BLE001 - no NVML (CPU, --tiny): the timings stand alone
        return {}


def profile_stages(engine: BlendEngine, draw, pinned, device) -> dict:
    """One cacheblend run (KV from pinned memory) with its stages timed on the device (`BlendRun.start_profile`),
    for the per-stage breakdown, and its chunk KV's copies (`h2d`)."""
    order, layout = draw()
    sel = [pinned[i] for i in order]
    source = TensorLayerSource([k for k, _ in sel], [v for _, v in sel], device, timed=True)
    plan = engine.plan(layout, CACHEBLEND, bases={c.key: 0 for c in layout.chunks})
    run = engine.start(plan, source)
    if device.type == "cuda":
        run.start_profile()
    with torch.inference_mode():
        for layer in range(engine.model.spec.num_layers):
            run.step(layer)
        result = run.finish()
    return {**{k: round(v, 3) for k, v in result.stats.stage_ms.items()}, "h2d": source.copy_times()}


def print_summary(rows: list[dict], kernels: list[dict], ceilings: dict, graphs: dict | None) -> None:
    base = {r["tokens"]: r["ttft_ms"] for r in rows if r["row"] == "hf_full_prefill"}
    own = {r["tokens"]: r["ttft_ms"] for r in rows if r["row"] == "kvblend_full_prefill"}
    print(f"\nceilings: device copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"{'tokens':>6s} {'row':22s} {'kv':10s} {'ttft ms':>9s} {'min':>8s} {'max':>8s} {'vs HF':>7s} {'vs own':>7s}")
    for r in rows:
        print(f"{r['tokens']:6d} {r['row']:22s} {r['kv_source'] or '-':10s} {r['ttft_ms']:9.2f} {r['min_ms']:8.2f} "
              f"{r['max_ms']:8.2f} {base[r['tokens']] / r['ttft_ms']:6.2f}x {own[r['tokens']] / r['ttft_ms']:6.2f}x")
    for k in kernels:
        if "achieved" in k:
            label = k["kernel"] + (" gluon" if k.get("gluon") else
                                   f" {k['BLOCK_M']}/{k['BLOCK_N']}/{k['num_warps']}/{k['num_stages']}"
                                   f"{' tma' * k['tma']}" if "BLOCK_M" in k else "")
            print(f"{label:62s} {k['achieved']:9.1f} {k['unit']} of {k['ceiling']:.0f} "
                  f"({k['achieved'] / k['ceiling']:.0%}) {k.get('status', '')}")
        else:
            print(f"{k['kernel']:62s} {k.get('status', '')}")
    if graphs:
        print(f"cuda graphs: workspace {graphs['workspace_MiB']:.0f} MiB; buckets {graphs['buckets']}; "
              f"check-layer shapes {graphs['check_layer_shapes']}")


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = sorted({(r["row"], r["kv_source"]) for r in rows}, key=lambda x: (x[0], str(x[1])))
    for name, where in names:
        pts = sorted((r["tokens"], r["ttft_ms"]) for r in rows if r["row"] == name and r["kv_source"] == where)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name}" + (f" ({where})" if where else ""))
    ax.set(xlabel="prompt tokens", ylabel="TTFT ms (median)", title=f"Llama-3-8B shape, {device}", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
