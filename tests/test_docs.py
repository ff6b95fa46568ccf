"""The docs' python snippets: each compiles, each is run by a named test (doc_snippets.RUN_BY), and the store
snippet runs here against a private Redis; every relative link of the docs reaches a file and heading. Paths given
as str or Path both work."""

import re
from pathlib import Path

import pytest
from doc_snippets import DOCS, ROOT, RUN_BY, blocks_run_by, python_blocks

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


def test_store_snippet_runs(redis_url, tmp_path):
    ((doc, code),) = blocks_run_by("test_store_snippet_runs")
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


LINKED_DOCS = [*DOCS, *(["benchmarks/README.md"] if (ROOT / "benchmarks" / "README.md").exists() else [])]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """A markdown file without its fenced code blocks and inline code (neither holds links or headings)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces as hyphens, a repeated
    heading suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        seen[f"{slug}-{seen[slug]}" if seen[slug] else slug] = 0
    return set(seen)


def test_every_relative_link_of_the_docs_reaches_a_file_and_heading():
    broken = []
    for doc in LINKED_DOCS:
        source = ROOT / doc
        for target in LINK.findall(prose(source)):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, fragment = target.partition("#")
            path = (source.parent / file).resolve() if file else source
            if not path.exists():
                broken.append(f"{doc}: {target} (no such file)")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                broken.append(f"{doc}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_links_every_docs_page_and_the_results():
    linked = {target.partition("#")[0] for target in LINK.findall(prose(ROOT / "README.md"))}
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
    assert "benchmarks/RESULTS.md" in linked
