"""The chunk row: what a knowledge base's Milvus collection stores per chunk, and what a search returns.

`ChunkRow` is the one definition of a stored chunk's fields: `lorag.milvus` builds the collection's
schema and every write from it, the ingest pipeline (`lorag.chunking`, `lorag.data`) fills it.
`Hit` is a chunk as searches return it (its citation fields and a score).
"""

from __future__ import annotations

import hashlib
from typing import TypedDict

TEXT_MAX = 16384
SOURCE_MAX = 2048


def source_key(source: str) -> str:
    """The `source_hash` of a chunk row: sha256 of the full source path, what every per-document
    filter compares (a path may hold any character and be longer than the `source` field)."""
    return hashlib.sha256(source.encode()).hexdigest()


class ChunkRow(TypedDict):
    """One chunk as a knowledge base's collection stores it: the one definition of its fields, from
    which the collection's schema (`MilvusStore.ensure_collection`) and every write are built."""

    id: str  # the chunk's primary key: a hash of its document, position and text (`lorag.chunking.chunk_id`)
    text: str  # the chunk's text, as cited
    terms: str  # its passage's English-analysed terms, for full-text search (`lorag.text.terms`)
    source: str  # the document's path or URI (clipped to SOURCE_MAX bytes for display)
    source_hash: str  # sha256 of the full source path (`source_key`): per-document filters and deletes
    title: str
    section: str  # the heading path inside the document ("Title > Heading > Subheading")
    chunk_index: int
    start: int  # character offsets of the chunk in the document's text
    end: int
    doc_hash: str  # the document's content and indexing parameters: unchanged documents are skipped
    n_chunks: int  # chunks of the document: a document is complete when it holds them all
    vector: list[float]  # the passage's embedding


class Hit(TypedDict):
    """A search candidate or result: a chunk's citation fields (`OUTPUT`) and its `score`."""

    id: str
    text: str
    source: str
    title: str
    section: str
    chunk_index: int
    start: int
    end: int
    score: float  # cosine, BM25, or (after `lorag.retrieval.rank`) the fused score


FIELDS = tuple(ChunkRow.__annotations__)
OUTPUT = [f for f in Hit.__annotations__ if f not in ("id", "score")]  # what searches return beside the id
FIELD_BYTES = {"id": 64, "text": TEXT_MAX, "terms": TEXT_MAX, "source": SOURCE_MAX, "source_hash": 64, "title": 512, "section": 512, "doc_hash": 64}
CLIPPED = ("text", "terms", "source", "title", "section")  # clipped to their field's bytes on write (ids and hashes always fit)


def clip(value: str, max_bytes: int) -> str:
    """Cut a string to a VARCHAR field's byte limit (a runaway heading must not fail the batch)."""
    data = value.encode()
    return value if len(data) <= max_bytes else data[:max_bytes].decode(errors="ignore")
