"""What `RAGPipeline.add_documents` accepts, turned into kvblend Documents before anything is indexed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from kvblend.retrieval.corpus import CorpusError, Document, check_text, read_corpus

DocumentInput = Document | str | os.PathLike


def text_document(text: str) -> Document:
    """A Document of a text given inline; its source names the text by content, so re-adding it is a no-op."""
    check_text(text, "a text given to add_documents")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return Document(source=f"text:{digest}", text=text, title=text.strip().splitlines()[0][:60])


def as_documents(items: DocumentInput | Iterable[DocumentInput]) -> list[Document]:
    """Documents from kvblend Documents, inline texts (str) and files or directories (pathlib.Path / os.PathLike).

    Every item is read and checked in whole first (empty, binary, not UTF-8), so one bad input stops the call
    before anything is indexed.
    """
    if isinstance(items, (Document, str, os.PathLike)):
        items = [items]
    docs: list[Document] = []
    for item in items:
        if isinstance(item, Document):
            check_text(item.text, f"document {item.source!r}")
            docs.append(item)
        elif isinstance(item, str):
            docs.append(text_document(item))
        elif isinstance(item, os.PathLike):
            docs.extend(read_corpus([item]))
        else:
            raise TypeError(f"add_documents takes Documents, texts (str) or paths, not {type(item).__name__}")
    if not docs:
        raise CorpusError("no documents given")
    return docs
