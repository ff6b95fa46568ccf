"""Which requests the connector blends, decided on its scheduler side over a real store (no engine starts here):
a request without kvblend parameters is served exactly unless the deployment turns discovery-blending on, and a
store request is never blended nor loaded, even when its prompt holds another stored chunk."""

import random

import pytest
import torch

from kvblend.store import ChunkKey, ChunkKV, open_store
from kvblend.vllm.config import ConnectorConfig
from kvblend.vllm.metadata import BlendJob
from kvblend.vllm.scheduler import SchedulerSide

FP = "request-modes-model-0001"
LAYERS, HEADS, HEAD_DIM = 2, 2, 8


def random_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 49152) for _ in range(n)]


@pytest.fixture
def stored_chunk(tmp_path):
    """A store holding one 48-token chunk (alone, default namespace), and a prompt holding it mid-prompt."""
    store_dir = str(tmp_path / "store")
    ids = random_ids(1, 48)
    with open_store(ConnectorConfig(store_dir=store_dir).store_config()) as store:
        key = ChunkKey.alone(FP, ids, "default")
        g = torch.Generator().manual_seed(7)
        shape = (LAYERS, len(ids), HEADS, HEAD_DIM)
        store.put(key, ChunkKV(key, torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                               torch.tensor(ids)))
        store.flush()
    return store_dir, ids, random_ids(2, 9) + ids + random_ids(3, 6)


def scheduler_for(store_dir: str, **settings):
    config = ConnectorConfig(store_dir=store_dir, self_check=False, extract=False, **settings)
    store = open_store(config.store_config())
    return SchedulerSide(config, FP, store), store


def blended(scheduler: SchedulerSide, prompt: list[int], kv_transfer_params: dict | None, req_id: str) -> bool:
    matched = scheduler.matched_tokens(req_id, prompt, kv_transfer_params, 0)
    job = scheduler._matched.get(req_id)
    return matched == len(prompt) - 1 and isinstance(job, BlendJob)


def test_requests_without_kvblend_parameters_are_exact_unless_discover_blend(stored_chunk):
    store_dir, _, prompt = stored_chunk
    scheduler, store = scheduler_for(store_dir)
    with store:
        assert not blended(scheduler, prompt, None, "plain-client")
        assert not blended(scheduler, prompt, {"other_connector": {}}, "foreign-params")
        assert blended(scheduler, prompt, {"kvblend": {}}, "asked"), "a kvblend client asks by sending the key"
        assert blended(scheduler, prompt, {"kvblend": {"mode": "blend"}}, "asked-mode")
    scheduler, store = scheduler_for(store_dir, discover_blend=True)
    with store:
        assert blended(scheduler, prompt, None, "plain-client")
        assert not blended(scheduler, prompt, {"kvblend": {"mode": "storage"}}, "storage")
    with pytest.raises(ValueError, match="needs discover"):
        ConnectorConfig(store_dir=store_dir, discover=False, discover_blend=True)
    assert ConnectorConfig.from_extra({"discover_blend": True}).discover_blend


def test_a_store_request_is_never_blended_even_when_it_holds_a_stored_chunk(stored_chunk):
    store_dir, _, prompt = stored_chunk
    scheduler, store = scheduler_for(store_dir, discover_blend=True)
    with store:
        for params in ({"kvblend": {"store_prompt": True}}, {"kvblend": {"store_prompt": True, "mode": "blend"}}):
            assert scheduler.matched_tokens("store", prompt, params, 0) == 0
            assert "store" not in scheduler._matched


def report_of(scheduler: SchedulerSide, prompt: list[int], kvblend: dict | None, req_id: str,
              num_computed: int = 0) -> dict | None:
    """The request's `kvblend` report as its response carries it (matched, allocated if claimed, finished)."""
    params = None if kvblend is None else {"kvblend": kvblend}
    matched = scheduler.matched_tokens(req_id, prompt, params, num_computed)
    if matched:
        scheduler.after_alloc(req_id, list(range(len(prompt) // 16 + 1)), matched)
    finished = scheduler.finished(req_id)
    return None if finished is None else finished["kvblend"]


def test_every_request_that_asked_is_told_why_nothing_was_reused(stored_chunk):
    store_dir, ids, prompt = stored_chunk
    stranger = random_ids(4, 40)  # in no prompt, in no store
    unstored = random_ids(5, 7) + stranger + random_ids(6, 3)
    tenant = "tenant-secret-0123456789"
    scheduler, store = scheduler_for(store_dir)
    with store:
        cases = [  # (kvblend parameters, prompt, reason)
            ({"mode": "sideways"}, prompt, "bad_params"),
            ({"store_prompt": True}, prompt, "store_prompt"),
            ({}, prompt[:1], "short_prompt"),
            ({"documents": [stranger]}, prompt, "not_located"),
            ({"documents": [stranger]}, unstored, "not_stored"),
            ({"chunks": [[7, 40]]}, unstored, "not_stored"),
            ({}, unstored, "not_found"),
            ({"mode": "storage"}, prompt, "not_stored"),
            ({"tenant_secret": tenant}, prompt, "not_found"),  # discovery looks in the tenant's namespace
            ({"tenant_secret": tenant, "documents": [ids]}, prompt, "tenant"),
        ]
        for i, (kvblend, text, reason) in enumerate(cases):
            report = report_of(scheduler, text, kvblend, f"r{i}")
            assert report is not None and (report["reason"], report["mode"]) == (reason, "none"), (kvblend, report)
            assert report["matched_tokens"] == 0 and report["detail"], report
        named = report_of(scheduler, prompt, {"documents": [stranger, ids]}, "named")
        assert named["mode"] == "blend" and (named["documents"], named["documents_found"]) == (2, 1), named
        assert "reason" not in named and named["chunks"] == 1 and named["matched_tokens"] == len(prompt) - 1
        computed = report_of(scheduler, prompt, {"chunks": [[9, 48]]}, "cached", num_computed=len(prompt) - 2)
        assert computed["reason"] == "prefix_cached", computed
        assert report_of(scheduler, unstored, None, "plain-client") is None, "no kvblend key, no report"
        assert report_of(scheduler, prompt, {"mode": "off"}, "plain-comparison") is None, "kvblend asked to stay out"
        scheduler.blend_ready, scheduler.blend_off_reason = None, ""
        assert report_of(scheduler, prompt, {}, "early")["reason"] == "blend_not_ready"
        scheduler.blend_ready, scheduler.blend_off_reason = False, "the self-check failed"
        off = report_of(scheduler, prompt, {}, "off-server")
        assert (off["reason"], off["blend_off"]) == ("blend_off", "the self-check failed"), off


def test_storing_joins_a_report_but_never_starts_one(stored_chunk):
    from kvblend.vllm.metadata import KVBlendWorkerMeta

    store_dir, _, prompt = stored_chunk
    scheduler, store = scheduler_for(store_dir)
    with store:
        unstored = random_ids(8, 30)
        for req_id, params in (("asked", {"kvblend": {"mode": "storage"}}), ("plain-client", None)):
            scheduler.matched_tokens(req_id, unstored, params, 0)
        stored = {"stored_spans": 1, "store_ms": 0.4}
        scheduler.on_worker_meta(KVBlendWorkerMeta(reports={"asked": dict(stored), "plain-client": dict(stored)}))
        asked = scheduler.finished("asked")["kvblend"]
        assert asked["reason"] == "not_stored" and asked["store_ms"] == 0.4 and asked["stored_spans"] == 1
        assert scheduler.finished("plain-client") is None, "no kvblend key and nothing supplied: no report"
