"""The shipped examples run as they are, in subprocesses, against a temporary KVBLEND_CACHE_DIR.

The temporary cache links `models/` to the already converted embedded model, so the examples find it without
converting the GGUF again, and write their index and store only under the temporary directory.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def example_env(model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("kvblend-cache")
    (cache / "models").mkdir()
    (cache / "models" / model_dir.name).symlink_to(model_dir, target_is_directory=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", KVBLEND_CACHE_DIR=str(cache))
    for name in ("TRITON_INTERPRET", "VLLM_CPU_KVCACHE_SPACE", "KVBLEND_TENANT_SECRET"):  # the pipeline sizes vLLM's KV
        env.pop(name, None)
    env.pop("KVBLEND_REDIS_URL", None)
    return env, cache


def run_example(env, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, check=False,
                          env=env, timeout=900)


@pytest.mark.slow
def test_quickstart_runs(example_env):
    env, cache = example_env
    run = run_example(env, "quickstart.py")
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 texts, 4 new chunks indexed, 4 chunk KV computed through vLLM" in out
    assert "[kvblend] TTFT" in out and "[plain vLLM] TTFT" in out and "mode blend)" in out
    assert (cache / "examples" / "quickstart" / "index" / "manifest.json").is_file()


@pytest.mark.slow
def test_langchain_and_llama_index_example_runs(example_env):
    run = run_example(example_env[0], "frameworks.py")
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sources ['manual/descaling'" in out and "as a LangChain chain:" in out
    assert out.count("  batched:") == 2 and "  parallel:" in out and "LlamaIndex query engine:" in out
    assert out.count("mode blend") == 3


def test_precompute_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(EXAMPLES / "precompute_corpus.sh")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def run_snippet(env, cwd: Path, code: str) -> subprocess.CompletedProcess:
    script = cwd / "snippet.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False, env=env,
                          cwd=cwd, timeout=900)


@pytest.mark.slow
def test_readme_pipeline_snippet_runs(example_env, tmp_path):
    """The README's Python section as written, in a directory holding `docs/`."""
    from doc_snippets import blocks_run_by

    from kvblend.retrieval.corpus import pydoc_topics

    ((_, code),) = blocks_run_by("test_readme_pipeline_snippet_runs")
    (tmp_path / "docs").mkdir()
    for doc in pydoc_topics(["pass", "while"]):
        (tmp_path / "docs" / f"{doc.title}.txt").write_text(doc.text, encoding="utf-8")
    run = run_snippet(example_env[0], tmp_path, code)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Source(" in run.stdout and len(run.stdout.strip()) > 40, run.stdout


@pytest.mark.slow
def test_readme_vllm_snippet_runs(example_env, model_dir, tmp_path):
    """The README's `LLM(...)` with the connector, then a prompt, on a temporary store and a tiny random-weight Llama
    with the embedded model's tokenizer: the snippet leaves vLLM's torch.compile on, whose time on CPU grows with
    the layers (4 here, 30 in SmolLM2: minutes on 2 cores)."""
    from doc_snippets import blocks_run_by
    from tiny_models import save_tiny_model

    ((_, code),) = blocks_run_by("test_readme_vllm_snippet_runs")
    tiny = save_tiny_model("LlamaForCausalLM", tmp_path / "tiny-llama", model_dir)
    code = code.replace("/path/to/hf-model-dir", str(tiny)).replace("/var/cache/kvblend", str(tmp_path / "store"))
    code += ('\n    out = llm.generate(["The Python pass statement"], SamplingParams(max_tokens=4, temperature=0.0))\n'
             '    print("generated:", repr(out[0].outputs[0].text))\n')
    env = dict(example_env[0], VLLM_CPU_KVCACHE_SPACE="1")  # vLLM's own default on CPU is most of the host
    run = run_snippet(env, tmp_path, code)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generated: '" in run.stdout
