"""The `kvblend` command line as scripts see it: subprocesses, exit codes, and messages naming the problem."""

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvblend.retrieval.corpus import pydoc_topics

pytestmark = pytest.mark.slow  # runs the kvblend command in subprocesses (and starts vLLM)

TOPICS = ["pass", "break", "continue"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    env = dict(os.environ, HF_HUB_OFFLINE="1", KVBLEND_CACHE_DIR=str(tmp_path_factory.mktemp("kvblend-cache")))
    for name in ("TRITON_INTERPRET", "VLLM_CPU_KVCACHE_SPACE", "KVBLEND_TENANT_SECRET"):  # the CLI sizes vLLM's KV
        env.pop(name, None)
    env.pop("KVBLEND_REDIS_URL", None)
    return env


def kvblend(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvblend.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, env=env, timeout=600)


def kvblend_each(env, commands: list[list]) -> list[subprocess.CompletedProcess]:
    """`kvblend` run once per argument list, two at a time (each mostly imports Python, on one core), in order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: kvblend(env, *args), commands))


@pytest.fixture(scope="module")
def built(cli_env, model_dir, tmp_path_factory):
    """A small corpus precomputed into an index and a store by `kvblend precompute --index`."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    for doc in pydoc_topics(TOPICS):
        (corpus / f"{doc.title}.txt").write_text(doc.text, encoding="utf-8")
    paths = {"corpus": corpus, "index": root / "index", "store": root / "store", "model": model_dir}
    first = kvblend(cli_env, "precompute", corpus, "--index", paths["index"], "--store", paths["store"],
                    "--model", model_dir, "--chunk-tokens", 256)
    return paths, first


def test_precompute_indexes_and_stores_then_resumes(cli_env, built):
    paths, first = built
    assert first.returncode == 0, first.stderr
    assert f"{len(TOPICS)} documents" in first.stdout and "0 already cached" in first.stdout
    again = kvblend(cli_env, "precompute", paths["corpus"], "--index", paths["index"], "--store", paths["store"],
                    "--model", paths["model"], "--chunk-tokens", 256)
    assert again.returncode == 0, again.stderr
    assert "0 chunks added" in again.stdout and "0 chunks computed and stored" in again.stdout


def test_stats_reports_the_index_and_the_store(cli_env, built):
    paths, _ = built
    out = kvblend(cli_env, "stats", "--index", paths["index"], "--store", paths["store"])
    assert out.returncode == 0, out.stderr
    assert f"sources={len(TOPICS)}" in out.stdout and "pass.txt" in out.stdout
    chunks = int(out.stdout.split("chunks=")[1].split()[0])
    assert f"disk     entries={chunks} " in out.stdout


def test_query_blends_the_precomputed_chunks(cli_env, built):
    paths, _ = built
    out = kvblend(cli_env, "query", "What does the pass statement do?", "--index", paths["index"], "--store",
                  paths["store"], "--model", paths["model"], "--top-k", 2, "--max-tokens", 8, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["answer"].strip() and result["sources"][0]["title"] == "pass"
    assert result["stats"]["mode"] == "blend" and result["stats"]["chunks"] == 2
    assert result["stats"]["tokens_reused"] > 0 and result["stats"]["error"] is None


def unreachable_redis_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def test_bad_input_exit_codes_and_messages(cli_env, built, tmp_path):
    paths, _ = built
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02 binary")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    redis_url = unreachable_redis_url()
    cases = [
        (["query", "  ", "--index", paths["index"]], 2, "the question is empty"),
        (["query", "What?", "--index", tmp_path / "missing"], 2, "no kvblend index at"),
        (["query", "What?", "--index", paths["index"], "--top-k", 0], 2, "must be positive"),
        (["precompute", binary, "--index", tmp_path / "idx", "--model", paths["model"]], 2, "looks binary"),
        (["precompute", tmp_path / "nothing-here"], 2, "does not exist"),
        (["precompute"], 2, "give PATH... or --pydoc-topics"),
        (["stats", "--index", foreign], 2, "has no manifest.json"),
        (["stats", "--store", paths["store"], "--redis", redis_url], 1, f"Redis at {redis_url} is unreachable"),
        (["bench", "--index", paths["index"], "-n", 0], 2, "-n must be positive"),
        (["frobnicate"], 2, "invalid choice"),
    ]
    for (args, code, message), out in zip(cases, kvblend_each(cli_env, [args for args, _, _ in cases])):
        assert (out.returncode, message in out.stderr) == (code, True), (args, out.returncode, out.stderr[-2000:])
    assert not (tmp_path / "idx").exists()


def test_every_command_has_help(cli_env):
    commands = [[], ["precompute"], ["query"], ["stats"], ["bench"], ["eval", "fidelity"], ["model-dir"]]
    for command, out in zip(commands, kvblend_each(cli_env, [[*c, "--help"] for c in commands])):
        assert out.returncode == 0 and out.stdout.startswith("usage: kvblend"), (command, out.stderr)
