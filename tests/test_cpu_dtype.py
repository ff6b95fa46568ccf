"""The CPU engine's default dtype follows the CPU's flags (bf16 only with native bf16), an explicit dtype wins, and
chunk KV stored in one dtype is a clean miss, never an error, for a reader in the other."""

import pytest
import torch

from kvblend import cpu
from kvblend.blend.source import kv_layout
from kvblend.cpu import cpu_compute_dtype, cpu_flags, cpu_model, cpu_record, native_bf16
from kvblend.model.spec import load_spec
from kvblend.store import StoreConfig, open_store
from kvblend.store.entry import ChunkKV
from kvblend.store.key import ChunkKey

AVX2_EPYC = {"sse4_2", "fma", "avx", "f16c", "avx2"}  # the AVX2-only AMD EPYC of issue 18
AVX512_XEON = AVX2_EPYC | {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni", "avx512_vbmi2"}  # this one
COOPER_LAKE = AVX512_XEON | {"avx512_bf16"}
SAPPHIRE_RAPIDS = COOPER_LAKE | {"amx_bf16", "amx_tile", "amx_int8", "avx512_fp16"}
NEOVERSE_V1 = {"fp", "asimd", "sve", "bf16", "i8mm", "svebf16"}


@pytest.mark.parametrize("flags,dtype", [
    (set(), "float32"), (AVX2_EPYC, "float32"), (AVX512_XEON, "float32"), (AVX512_XEON | {"amx_tile"}, "float32"),
    (COOPER_LAKE, "bfloat16"), (SAPPHIRE_RAPIDS, "bfloat16"), (AVX2_EPYC | {"amx_bf16", "amx_tile"}, "bfloat16"),
    (NEOVERSE_V1, "bfloat16"), (NEOVERSE_V1 - {"bf16", "svebf16"}, "float32"),
])
def test_dtype_follows_the_flags(flags, dtype):
    assert cpu_compute_dtype(flags) == dtype
    assert native_bf16(flags) == (dtype == "bfloat16")


@pytest.fixture
def fake_cpuinfo(tmp_path, monkeypatch):
    """Point kvblend.cpu at a cpuinfo file of the test's choosing (the parsed fields are cached: cleared here)."""
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu, "CPUINFO", path)
    cpu._cpuinfo_fields.cache_clear()
    yield path
    cpu._cpuinfo_fields.cache_clear()


def test_flags_are_read_from_cpuinfo_on_x86_and_aarch64(fake_cpuinfo):
    fake_cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
                            "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    assert cpu_flags() == {"fpu", "sse4_2", "avx", "avx2", "fma"} and cpu_model() == "AMD EPYC 7B13"
    assert cpu_compute_dtype() == "float32"
    record = cpu_record()
    assert record["isa"] == ["avx", "avx2", "fma", "sse4_2"] and record["compute_dtype"] == "float32"
    assert record["model"] == "AMD EPYC 7B13" and not record["native_bf16"]
    fake_cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n")
    cpu._cpuinfo_fields.cache_clear()
    assert cpu_compute_dtype() == "bfloat16" and cpu_record()["isa"] == ["asimd", "bf16", "i8mm", "sve"]


def test_no_cpuinfo_means_float32(fake_cpuinfo):
    assert not fake_cpuinfo.exists()
    assert cpu_flags() == frozenset() and cpu_compute_dtype() == "float32" and cpu_model()


def test_every_default_engine_dtype_is_the_cpus_and_an_explicit_one_wins(tmp_path):
    from kvblend.cli import build_parser, dtype_settings, engine_dtype
    from kvblend.rag.config import DEFAULT_ENGINE_ARGS, PipelineConfig

    assert DEFAULT_ENGINE_ARGS["dtype"] == cpu_compute_dtype()
    dirs = {"index_dir": tmp_path / "i", "store_dir": tmp_path / "s"}
    assert PipelineConfig(**dirs).dtype == cpu_compute_dtype()
    other = "bfloat16" if cpu_compute_dtype() == "float32" else "float32"
    assert PipelineConfig(**dirs, engine_args={"dtype": other}).dtype == other
    parser = build_parser()
    for argv in (["query", "Why?"], ["bench"], ["serve"], ["precompute", "docs"]):
        default, explicit = parser.parse_args(argv), parser.parse_args([*argv, "--dtype", other])
        assert engine_dtype(default) == cpu_compute_dtype() and dtype_settings(default) == {}
        assert engine_dtype(explicit) == other
        assert PipelineConfig(**dirs, **dtype_settings(explicit)).dtype == other


def _random_kv(key: ChunkKey, layout, ids: list[int]) -> ChunkKV:
    """Random (never zero) K and V of the model's layout, in its dtype."""
    g = torch.Generator().manual_seed(len(ids))
    shape = (layout.num_layers, len(ids), layout.kv_heads, layout.head_dim)
    dtype = getattr(torch, layout.dtype)
    return ChunkKV(key, torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype),
                   torch.tensor(ids), 0)


def test_chunk_kv_of_the_other_dtype_is_a_clean_miss(model_dir, tmp_path):
    """A store written by a bf16 engine, read by an fp32 one (and back): misses, no error, no entry dropped."""
    specs = {name: load_spec(model_dir, name) for name in ("bfloat16", "float32")}
    assert specs["bfloat16"].fingerprint != specs["float32"].fingerprint  # the dtype is part of every ChunkKey
    ids = list(range(100, 108))
    keys = {name: ChunkKey.alone(spec.fingerprint, ids) for name, spec in specs.items()}
    config = StoreConfig.from_settings(tmp_path / "store", memory_gb=0.01, disk_gb=0.1)
    with open_store(config) as writer:
        writer.put(keys["bfloat16"], _random_kv(keys["bfloat16"], kv_layout(specs["bfloat16"]), ids))
        writer.flush()
    with open_store(config) as reader:  # a fresh process's view: the entry is on disk only
        assert reader.get(keys["float32"], expect=kv_layout(specs["float32"])) is None
        assert reader.get(keys["float32"], layers=(0,), expect=kv_layout(specs["float32"])) is None
        assert not reader.contains(keys["float32"])
        stored = reader.get(keys["bfloat16"], expect=kv_layout(specs["bfloat16"]))
        assert stored is not None and stored.k.dtype == torch.bfloat16, "the other dtype's entry is kept"
        totals = reader.totals()
        assert all(s.errors == 0 and s.corrupt == 0 for s in totals.values())


@pytest.mark.slow
def test_precompute_in_the_other_dtype_recomputes_beside_the_stored_kv(model_dir, tokenizer, tmp_path):
    """precompute_chunks with a bf16 and an fp32 runner over one store: each computes its own KV (the other's is
    a miss), and a second run in either dtype finds everything stored."""
    from kvblend.model.runner import LlamaModel
    from kvblend.model.tokenizer import encode
    from kvblend.rag.precompute import precompute_chunks

    chunks = [("doc", i, encode(tokenizer, text)) for i, text in enumerate(("The for statement iterates.",
                                                                             "A lambda makes a function."))]
    config = StoreConfig.from_settings(tmp_path / "store", memory_gb=0.05, disk_gb=0.1)
    models = {name: LlamaModel.from_dir(model_dir, dtype=name) for name in ("bfloat16", "float32")}
    with open_store(config) as store:
        for model in models.values():
            assert precompute_chunks(model, store, chunks).stored == len(chunks)
        for model in models.values():
            report = precompute_chunks(model, store, chunks)
            assert report.cached == len(chunks) and report.stored == 0
            kv = store.get(report.records[0].key, expect=kv_layout(model.spec))
            assert kv is not None and kv.k.dtype == model.dtype
