"""The docs' python snippets: each compiles, each is run by a named test (doc_snippets.RUN_BY), and the store
snippet of the README runs here against a private Redis. Paths given as str or Path both work."""

import pytest
from doc_snippets import DOCS, RUN_BY, blocks_run_by, python_blocks

from kvblend.rag.index_updates import index_exists, open_index
from kvblend.store import ChunkKey


def test_every_docs_python_block_compiles_and_is_run_by_a_test():
    markers = {}
    for doc in DOCS:
        for i, code in enumerate(python_blocks(doc)):
            compile(code, f"{doc} python block {i}", "exec")
            named = [m for d, m in RUN_BY if d == doc and m in code]
            assert len(named) == 1, f"{doc} python block {i} is named by {named} in doc_snippets.RUN_BY:\n{code}"
            markers[(doc, named[0])] = i
    assert set(markers) == set(RUN_BY), f"RUN_BY names blocks the docs no longer have: {set(RUN_BY) - set(markers)}"


def test_readme_store_snippet_runs(redis_url, tmp_path):
    ((doc, code),) = blocks_run_by("test_readme_store_snippet_runs")
    code = code.replace("redis://cache:6379/0", redis_url).replace("/var/cache/kvblend", str(tmp_path / "store"))
    namespace = {"key": ChunkKey.alone("docs-test-model", [1, 2, 3])}
    try:
        exec(compile(code, f"{doc} store block", "exec"), namespace)
        assert namespace["kv"] is None, "nothing is stored under that key: a miss, to recompute"
    finally:
        if "store" in namespace:
            namespace["store"].close()


@pytest.mark.parametrize("as_str", [True, False])
def test_index_paths_may_be_str_or_path(tmp_path, as_str):
    where = tmp_path / "no-index"
    path = str(where) if as_str else where
    assert index_exists(path) is False
    with pytest.raises(FileNotFoundError, match="no kvblend index at"):
        open_index(path)
