"""The offline precompute (`kvblend precompute`) counts what the store holds after the run, not what it sent:
a chunk the disk tier refuses (an entry over its budget) is reported lost, never stored. A tiny random-weight
Llama computes the KV (loads a model: slow)."""

import pytest
from tiny_models import save_tiny_model

from kvblend.model.runner import LlamaModel
from kvblend.rag.precompute import precompute_chunks
from kvblend.store import StoreConfig, open_store

pytestmark = pytest.mark.slow  # loads a model


@pytest.fixture(scope="module")
def tiny(model_dir, tmp_path_factory):
    return LlamaModel.from_dir(save_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("tiny"), model_dir),
                               dtype="float32")


CHUNKS = [("doc", i, list(range(100 + 40 * i, 164 + 40 * i))) for i in range(3)]


def test_precompute_counts_the_chunks_the_store_holds(tiny, tmp_path):
    with open_store(StoreConfig.from_settings(tmp_path / "store")) as store:
        report = precompute_chunks(tiny, store, CHUNKS)
        assert (report.stored, report.cached, report.lost) == (3, 0, 0)
        assert store.totals()["disk"].entries == 3
        again = precompute_chunks(tiny, store, CHUNKS)
        assert (again.stored, again.cached, again.lost) == (0, 3, 0)


def test_a_chunk_the_store_refuses_is_reported_lost(tiny, tmp_path):
    with open_store(StoreConfig.from_settings(tmp_path / "store", disk_gb=1e-6)) as store:  # 1 KiB: no entry fits
        report = precompute_chunks(tiny, store, CHUNKS)
        assert (report.stored, report.lost) == (0, 3) and store.totals()["disk"].entries == 0
