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


def check_text(text: str, what: str) -> str:
    """`text` if it can be indexed: not empty, and no NUL character anywhere in it (binary data)."""
    nul = text.find("\x00")
    if nul >= 0:
        raise CorpusError(f"{what} looks binary (NUL at character {nul}); only text is indexed")
    if not text.strip():
        raise CorpusError(f"{what} is empty")
    return text


def read_document(path: str | os.PathLike) -> Document:
    """One UTF-8 text file; empty, binary (a NUL byte anywhere) or non-UTF-8 files are refused with the reason."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from exc
    nul = raw.find(b"\x00")  # before decoding, so binary data is named as such rather than as bad UTF-8
    if nul >= 0:
        raise CorpusError(f"{path} looks binary (NUL byte at offset {nul}); only UTF-8 text files are indexed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    return Document(source=str(path), text=check_text(text, str(path)), title=path.stem)


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
