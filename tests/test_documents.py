"""Inputs RAGPipeline.add_documents and `kvblend precompute` accept: binary data is found anywhere in the input."""

import pytest

from kvblend.rag.documents import as_documents
from kvblend.retrieval.corpus import CorpusError, Document, read_corpus

TEXT = "Plain text about the pass statement. " * 400  # about 14 KiB, well past the first 8 KiB


def test_a_nul_byte_anywhere_in_a_file_is_refused(tmp_path):
    late = tmp_path / "late.txt"
    late.write_bytes(TEXT.encode() + b"\x00" + TEXT.encode())
    with pytest.raises(CorpusError, match=f"looks binary \\(NUL byte at offset {len(TEXT)}\\)"):
        read_corpus([late])
    with pytest.raises(CorpusError, match="late.txt looks binary"):
        as_documents([tmp_path])
    good = tmp_path / "good.txt"
    late.unlink()
    good.write_text(TEXT, encoding="utf-8")
    assert [d.text for d in as_documents([good])] == [TEXT]


def test_nul_characters_in_texts_and_documents_are_refused():
    with pytest.raises(CorpusError, match="a text given to add_documents looks binary"):
        as_documents(TEXT + "\x00tail")
    with pytest.raises(CorpusError, match="document 'notes' looks binary"):
        as_documents([Document("notes", TEXT + "\x00", "notes")])
    with pytest.raises(CorpusError, match="document 'notes' is empty"):
        as_documents([Document("notes", " \n", "notes")])
