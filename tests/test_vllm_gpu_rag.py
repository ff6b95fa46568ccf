"""The GPU RAG benchmark's pure parts (benchmarks/vllm_gpu_rag.py): the random checkpoint it writes loads as a
kvblend model with the tokenizer's vocabulary, and its prompts hold the pool's chunks where their spans say, each
prompt starting with a chunk no other prompt starts with. Its engines run in `--tiny` (minutes: not in CI)."""

import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vllm_gpu_rag as bench

from kvblend.model.spec import load_spec


@pytest.fixture(scope="module")
def tiny_checkpoint(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-rag") / "model"
    bench.write_model(out, Path(model_dir), bench.TINY)
    return out


def test_the_checkpoint_has_the_asked_shape_and_the_tokenizers_vocabulary(tiny_checkpoint, tokenizer):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) == 49152
    assert {k: config[k] for k in bench.TINY} == bench.TINY
    spec = load_spec(tiny_checkpoint, dtype="bfloat16")
    assert (spec.num_layers, spec.num_kv_heads, spec.hidden_size) == (4, 2, 128)
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(index) == 9 * 4 + 3
    with safe_open(str(tiny_checkpoint / index["lm_head.weight"]), "pt") as f:
        assert tuple(f.get_tensor("lm_head.weight").shape) == (49152, 128)
    assert (tiny_checkpoint / "tokenizer.json").is_file() and not Path(str(tiny_checkpoint) + ".partial").exists()


def test_prompts_hold_the_pool_chunks_at_their_spans_with_first_chunks_of_their_own(tiny_checkpoint):
    sizes, prompts = [2, 5], 3
    w = bench.build_workload(tiny_checkpoint, sizes, prompts, docs=2, doc_tokens=700, seed=1)
    assert len(w["pool"]) == max(sizes) + bench.EXTRA_CHUNKS
    firsts = []
    for n in sizes:
        entries = w["rag"][str(n)]
        assert [e["warmup"] for e in entries] == [True] + [False] * prompts
        for e in entries:
            chunks = [e["ids"][s : s + length] for s, length in e["spans"]]
            assert len(chunks) == n and all(c in w["pool"] for c in chunks)
            assert len(e["lmcache_ids"]) > len(e["ids"])  # its separators around every chunk
            firsts.append(w["pool"].index(chunks[0]))
    assert len(set(firsts)) == len(firsts)  # no prompt shares a first chunk: no prefix-cache hit past the template
    asks = len(bench.DOCUMENT_ASKS)  # first, after eviction, after a restart cold and with the page cache kept
    assert len(w["documents"]) == 2 and all(len({tuple(q) for q in d}) == asks == 4 for d in w["documents"])
    assert all(len(q) > 700 for d in w["documents"] for q in d)


def test_rows_carry_median_min_max_and_what_each_request_hit():
    results = [{"ttft_ms": t, "prefill_ms": t - 0.5, "wall_ms": t + 1, "cached_tokens": 0, "tokens": 100, "report": {}}
               for t in (5, 1, 3)]
    r = bench.row("kvblend_blend", "rag", results, chunks=6)
    assert (r["ttft_ms_median"], r["ttft_ms_min"], r["ttft_ms_max"], r["n"], r["tokens"]) == (3, 1, 5, 3, 100)
    assert r["wall_ms_median"] == 4 and r["prefill_ms"] == [4.5, 0.5, 2.5]
    assert r["chunks"] == 6 and r["mode"] == "kvblend_blend" and r["scenario"] == "rag"


def test_dropping_the_page_cache_keeps_the_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "entry").write_bytes(b"x" * 4096)
    bench.drop_page_cache(str(tmp_path))
    assert (tmp_path / "a" / "b" / "entry").read_bytes() == b"x" * 4096
