"""The python code blocks of the docs (README.md, docs/*.md, examples/*.md) and the test that runs each of them.

Each block is named by a line only it contains; `tests/test_docs.py` checks that every block of the docs is
named exactly once here, so a new snippet without a test that runs it fails the fast suite."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for folder in ("docs", "examples") for p in (ROOT / folder).glob("*.md"))]
DOC_SERVER_URL = "http://127.0.0.1:8000/v1"  # what the snippets talk to; the tests put their own server there

# (doc, a line only that block contains) -> the test that runs the block
RUN_BY = {
    ("README.md", "with RAGPipeline.from_defaults() as rag:"): "test_examples.py::test_readme_pipeline_snippet_runs",
    ("docs/connector.md", "llm = LLM("): "test_examples.py::test_readme_vllm_snippet_runs",
    ("docs/multi-instance.md", 'directory_url="redis://cache:6379/0"'): "test_docs.py::test_store_snippet_runs",
    ("README.md", "store_documents(client, model, docs)  "): "test_server.py::test_doc_snippets_run_against_the_server",
    ("examples/serve.md", "from kvblend.client import store_documents"):
        "test_server.py::test_doc_snippets_run_against_the_server",
    ("examples/serve.md", "reply = client.chat.completions.create("):
        "test_server.py::test_doc_snippets_run_against_the_server",
    ("README.md", "model = KVBlendChatModel("): "test_server.py::test_doc_snippets_run_against_the_server",
}


def python_blocks(doc: str) -> list[str]:
    """The ```python blocks of a doc, in order."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def block(doc: str, marker: str) -> str:
    """The one python block of `doc` containing `marker`."""
    found = [b for b in python_blocks(doc) if marker in b]
    if len(found) != 1:
        raise AssertionError(f"{doc}: {len(found)} python blocks contain {marker!r}, expected 1")
    return found[0]


def blocks_run_by(test: str) -> list[tuple[str, str]]:
    """(doc, code) of the blocks `test` runs, in RUN_BY's order."""
    return [(doc, block(doc, marker)) for (doc, marker), runner in RUN_BY.items() if runner.endswith("::" + test)]
