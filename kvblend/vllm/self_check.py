"""Start-up self-check: the blend, on vLLM's modules, paged cache and attention backend, must reproduce the KV
vLLM itself computed for its first plain prompt, in every layer.

Two runs on that prompt's own blocks (vLLM's KV is read first and written back after, so nothing vLLM serves
changes): a full prefill (every row recomputed, one causal run), and a CacheBlend run where the middle half of
the prompt is a "chunk" whose cached KV is vLLM's own, rotated back to position 0 — exact KV, so whatever rows
the selection keeps, the result must match; it exercises the rope shift, the selection and sparse-row attention.
Where that run captured CUDA graphs of its post-check layers (a GPU), it runs once more replaying them: a replay
that differs from vLLM's KV turns the graphs off, not blending.
"""

from __future__ import annotations

import torch

from kvblend.blend.config import BlendConfig
from kvblend.blend.layout import ChunkRef, PromptLayout
from kvblend.blend.source import TensorLayerSource
from kvblend.rope import rope_shift
from kvblend.store.key import ChunkKey
from kvblend.vllm.paged import slots_for

# vLLM's bf16 KV against the same modules run row-sparsely: bf16 rounding that grows with depth (~0.01-0.03
# measured); a wrong rope, weight, layout or attention mask shows as O(1) error from layer 0 or 1 on.
LAYER0_TOL = 0.02
ALL_TOL = 0.1


def layer_errors(k: torch.Tensor, v: torch.Tensor, ref_k: torch.Tensor, ref_v: torch.Tensor) -> list[float]:
    """Per layer, the larger of K's and V's relative L2 error against the reference [layers, tokens, ...]."""
    out = []
    for layer in range(ref_k.shape[0]):
        errs = [((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
                for a, b in ((k[layer], ref_k[layer]), (v[layer], ref_v[layer]))]
        out.append(max(errs))
    return out


def _summary(errors: list[float]) -> dict:
    worst = max(range(len(errors)), key=errors.__getitem__)
    return {"layer0": round(errors[0], 5), "worst": round(errors[worst], 5), "worst_layer": worst}


def _within(summary: dict) -> bool:
    """Whether a `_summary` is within the tolerances of bf16 rounding."""
    return summary["layer0"] < LAYER0_TOL and summary["worst"] < ALL_TOL


def _replay_check(worker, plan, ks, vs, job, ref_k, ref_v) -> dict:
    """The exact-chunk blend again, replaying the CUDA graphs its first run captured: its KV must match vLLM's as
    the eager run's did. Otherwise (or if it cannot run) the graphs go off and blending stays on, eager."""
    engine, n = worker._engine, len(job.prompt)
    try:
        again = engine.run(plan, TensorLayerSource(ks, vs, engine.model.device),
                           target=worker.paged_target(job.block_ids, 0, n))
        summary = {**_summary(layer_errors(*worker._read_rows(job.block_ids, 0, n), ref_k, ref_v)),
                   "graphs": again.stats.graphs}
    except Exception as exc:
        engine.graphs.turn_off(f"the self-check's replay could not run: {type(exc).__name__}: {exc}")
        return {"error": engine.graphs.failure}
    if not _within(summary):
        engine.graphs.turn_off(f"a replayed blend's KV differs from vLLM's (layer 0 rel. error {summary['layer0']:.3f}, "
                               f"worst {summary['worst']:.3f} at layer {summary['worst_layer']})")
    return summary


def self_check(worker, job) -> tuple[bool, str, dict]:
    """(passed, reason if not, measurements) for the prompt and blocks of `job` (a SaveJob); the measurements name
    vLLM's attention backend, whose kernel the blend attends with (`attention`: "vllm" or "kvblend"), whether its
    post-check layers replay as CUDA graphs and whether storage loads land layer by layer (no whole-model CUDA
    graphs)."""
    engine, spec = worker._engine, worker.spec
    prompt, n = list(job.prompt), len(job.prompt)
    ref_k, ref_v = worker._read_rows(job.block_ids, 0, n)
    report = {"tokens": n, "backend": worker.caches[0].layer.attn_backend.get_name(), "attention": worker.attention,
              "cuda_graphs": engine.graphs is not None, "layerwise_loads": worker.layerwise_loads}
    try:
        plan = engine.plan(PromptLayout.from_segments([prompt]), BlendConfig(policy="full_prefill"), logits_at="none")
        engine.run(plan, target=worker.paged_target(job.block_ids, 0, n))
        report["full_prefill"] = _summary(layer_errors(*worker._read_rows(job.block_ids, 0, n), ref_k, ref_v))

        a, b = n // 4, 3 * n // 4
        chunk = ChunkRef(tuple(prompt[a:b]), ChunkKey.alone(spec.fingerprint, prompt[a:b]))
        layout = PromptLayout.from_segments([prompt[:a], chunk, prompt[b:]])
        device = engine.model.device  # the reference rows are host copies; the blend reads them where it computes
        chunk_k, chunk_v = ref_k[:, a:b].to(device), ref_v[:, a:b].contiguous().to(device)
        moved_k = rope_shift(chunk_k.reshape(-1, spec.num_kv_heads, spec.head_dim), -a, spec.rope,
                             engine.model.freq).reshape(chunk_k.shape)
        checks = tuple(layer for layer in BlendConfig().check_layers if layer < spec.num_layers) or (0,)
        plan = engine.plan(layout, BlendConfig(check_layers=checks, gate_bound=None), logits_at="none",
                           bases={chunk.key: 0})
        source = TensorLayerSource([moved_k], [chunk_v], device)
        result = engine.run(plan, source, target=worker.paged_target(job.block_ids, 0, n))
        report["cacheblend_exact_chunk"] = {
            **_summary(layer_errors(*worker._read_rows(job.block_ids, 0, n), ref_k, ref_v)),
            "rows_last_layer": result.stats.rows_last_layer}
        if result.stats.graphs == "captured":
            report["cacheblend_replayed"] = _replay_check(worker, plan, [moved_k], [chunk_v], job, ref_k, ref_v)
    finally:
        slots = slots_for(job.block_ids, 0, n, worker.block_size)
        for layer, cache in enumerate(worker.caches):
            cache.write(ref_k[layer], ref_v[layer], slots)
    for name in ("full_prefill", "cacheblend_exact_chunk"):
        r = report[name]
        if not _within(r):
            return False, (f"{name}: blended KV differs from vLLM's (layer 0 rel. error {r['layer0']:.3f}, worst "
                           f"{r['worst']:.3f} at layer {r['worst_layer']})"), report
    return True, "", report
