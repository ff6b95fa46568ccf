"""Text sources: directories of .txt/.md files, and the stdlib's Python language reference topics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

TEXT_SUFFIXES = (".txt", ".md")


class CorpusError(ValueError):
    """A corpus file or directory cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Document:
    source: str
    text: str
    title: str = ""


def pydoc_topics(names: Sequence[str] | None = None) -> list[Document]:
    """The language reference topics shipped with every Python (`pydoc_data.topics`), sorted by name."""
    from pydoc_data.topics import topics

    chosen = sorted(topics) if names is None else list(names)
    missing = [n for n in chosen if n not in topics]
    if missing:
        raise CorpusError(f"unknown pydoc topics: {missing}")
    return [Document(source=f"pydoc:{n}", text=topics[n], title=n) for n in chosen]


def read_document(path: str | os.PathLike) -> Document:
    """One UTF-8 text file; empty, binary or non-UTF-8 files are refused with the reason."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if b"\x00" in raw[:8192]:
        raise CorpusError(f"{path} looks binary (NUL bytes); only UTF-8 text files are indexed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    if not text.strip():
        raise CorpusError(f"{path} is empty")
    return Document(source=str(path), text=text, title=path.stem)


def read_corpus(paths: Iterable[str | os.PathLike]) -> list[Document]:
    """Documents from files and directories (recursively, .txt and .md), in sorted path order."""
    docs: list[Document] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise CorpusError(f"directory {p} holds no .txt or .md files")
            docs.extend(read_document(f) for f in files)
        elif p.is_file():
            docs.append(read_document(p))
        else:
            raise CorpusError(f"{p} does not exist")
    return docs
