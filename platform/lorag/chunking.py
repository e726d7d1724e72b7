"""Chunking: a parsed document's text split into the chunks a knowledge base embeds and indexes.

`chunk_text` splits a unit's text (`lorag.documents.Unit`) into `Chunk`s that follow its sections,
measured in characters or in tokens of the embedder, and `DocumentChunker` is the Ray Data
`flat_map` stage that parses (`lorag.documents.parse_document`) and chunks one file row and never
raises: a file that cannot be parsed becomes a single row whose `error` says why.

Chunk offsets index the unit's parsed text (for Markdown and text files, the decoded file), and
each chunk carries its section: the Markdown heading path, or "page N" for a PDF. The chunker
also gives each chunk the `passage` it is embedded as and the `terms` it is full-text indexed by
(`lorag.text.passage` and `terms`: its heading path above its text), and an id (`chunk_id`) that
is the same for the same chunk of the same document on every run.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from lorag.documents import DocumentError, document_hash, markdown_headings, parse_document
from lorag.text import passage, terms

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_MAX_ERROR = 300


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int
    text: str
    section: str


def chunk_text(text: str, size: int, overlap: int, tokenizer=None) -> list[Chunk]:
    """Split `text` into chunks that follow its Markdown sections, each at most `size` units.

    A section runs from a heading to the next heading of any level (text before the first heading
    is a section of its own). A section that fits in `size` is one chunk; a longer one is split
    into pieces with about `overlap` units shared, and every piece carries the section's heading
    path. A heading with no text of its own before the next heading (a title straight above its
    first subsection) joins the section that follows, so no chunk is only a heading.

    Units are characters, or tokens of `tokenizer` (a Hugging Face fast tokenizer, counted without
    special tokens). Splits inside a section prefer a paragraph break, then whitespace, then any
    character (a token boundary in token mode), and never cut before half the window. The overlap
    starts on a word boundary, so no chunk opens mid-word unless a word is longer than the window.

    Args:
        text: the unit's text.
        size: maximum chunk length in characters, or in tokens when `tokenizer` is given.
        overlap: characters (or tokens) repeated from the end of one piece of a section at the
            start of the next (sections never overlap each other).
        tokenizer: optional fast tokenizer to measure in tokens.

    Returns:
        Chunks in text order, stripped (`text[c.start:c.end] == c.text`), whitespace-only ones
        dropped, each with its section's heading path ("A > B") as `section`.
    """
    assert 0 <= overlap < size, f"overlap {overlap} must be in [0, size={size})"
    ruler = _Ruler(text, tokenizer)
    chunks: list[Chunk] = []
    for lo, hi, path in _sections(text):
        chunks += _split_section(text, lo, hi, path, size, overlap, ruler)
    return chunks


def chunk_id(kb: str, source: str, index: int, text: str) -> str:
    """Deterministic chunk id: the same chunk of the same document always gets the same id."""
    return hashlib.sha256(f"{kb}\0{source}\0{index}\0{text}".encode()).hexdigest()[:32]


class DocumentChunker:
    """Ray Data `flat_map` stage (a callable class, run on an actor pool): a file row in, chunk rows out.

    A file row is `{"path", "bytes"}`, with an `error` when reading the file failed (too large, not
    a regular file: `lorag.data.read_sources`). Every output row has the same keys and types: id,
    text, source, title, section, chunk_index, start, end, doc_hash, n_chunks, error. A file that
    fails becomes one row with `error` set.

    Args:
        kb: knowledge-base name (part of each chunk id).
        size: chunk size, in characters, or in tokens when `tokenizer_path` is given.
        overlap: overlap between consecutive chunks, in the same unit.
        tokenizer_path: the embedder (any model reference, resolved on the node this stage runs
            on), to measure chunks in its tokens.
        fingerprint: indexing parameters folded into `doc_hash` (see `document_hash`).
        text_field: JSONL field holding a record's text.
        title_field: JSONL field holding a record's title.
        cache_dir: the config's `cache_dir` (None: this node's default cache), to resolve `tokenizer_path`.
    """

    def __init__(self, kb: str, size: int, overlap: int, tokenizer_path: str | None = None, fingerprint: str = "",
                 text_field: str = "text", title_field: str = "title", cache_dir: str | None = None):
        self.kb, self.size, self.overlap, self.fingerprint = kb, size, overlap, fingerprint
        self.text_field, self.title_field = text_field, title_field
        self.tokenizer = None
        if tokenizer_path is not None:
            from transformers import AutoTokenizer

            from lorag.config import node_cache
            from lorag.models import resolve_model

            tokenizer_path = str(resolve_model(str(tokenizer_path), node_cache(cache_dir)))
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
            if not self.tokenizer.is_fast:
                raise ValueError(f"token chunking needs a fast tokenizer (offset mapping); {tokenizer_path} has none")

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        path, doc_hash = str(row.get("path", "")), ""
        try:
            if row.get("error"):
                raise DocumentError(row["error"])
            data = bytes(row["bytes"])
            doc_hash = document_hash(data, self.fingerprint)
            return self._chunk_rows(path, data, doc_hash)
        except Exception as e:  # one bad file must not fail a whole ingest: it becomes an error row
            return [{"id": "", "text": "", "source": path, "title": "", "section": "", "chunk_index": -1, "start": 0,
                     "end": 0, "doc_hash": doc_hash, "n_chunks": 0, "error": f"{type(e).__name__}: {e}"[:_MAX_ERROR], "passage": "", "terms": ""}]

    def _chunk_rows(self, path: str, data: bytes, doc_hash: str) -> list[dict[str, Any]]:
        pieces = []
        for unit in parse_document(path, data, self.text_field, self.title_field):
            for c in chunk_text(unit.text, self.size, self.overlap, self.tokenizer):
                if unit.page_starts:
                    section = f"page {bisect.bisect_right(unit.page_starts, c.start)}"
                else:
                    section = " > ".join(s for s in (unit.section, c.section) if s)
                pieces.append((unit.title, section, c))
        if not pieces:
            raise DocumentError("no text to index")
        rows = []
        for i, (title, section, c) in enumerate(pieces):
            searched = passage(title, section, c.text)  # what the embedder and full-text search see
            rows.append({"id": chunk_id(self.kb, path, i, c.text), "text": c.text, "source": path, "title": title, "section": section,
                         "chunk_index": i, "start": c.start, "end": c.end, "doc_hash": doc_hash, "n_chunks": len(pieces), "error": "",
                         "passage": searched, "terms": terms(searched)})
        return rows


# ---- chunking helpers -------------------------------------------------------------------------


class _Ruler:
    """Measures `text` in characters, or in tokens of a fast tokenizer (offsets computed once)."""

    def __init__(self, text: str, tokenizer):
        self.n, self.tokenizer = len(text), tokenizer
        if tokenizer is not None:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            self.starts = [s for s, _ in enc["offset_mapping"]]
            self.ends = [e for _, e in enc["offset_mapping"]]

    def limit(self, start: int, size: int) -> int:
        """The furthest end of a chunk that begins at `start` and holds at most `size` units."""
        if self.tokenizer is None:
            return start + size
        i = bisect.bisect_right(self.ends, start)  # first token that ends after `start`
        return self.starts[i + size] if i + size < len(self.starts) else self.n

    def shrink(self, start: int, limit: int) -> int:
        """A limit one token shorter than `limit` (never at or before `start`)."""
        k = bisect.bisect_left(self.starts, limit) - 1  # last token that starts before `limit`
        return max(self.starts[k] if k >= 0 else start + 1, start + 1)

    def back(self, end: int, overlap: int) -> int:
        """Where the last `overlap` units before `end` begin."""
        if self.tokenizer is None:
            return end - overlap
        j = bisect.bisect_left(self.starts, end)  # tokens that start before `end`
        return self.starts[max(j - overlap, 0)] if overlap and j else end

    def count(self, piece: str) -> int:
        if self.tokenizer is None:
            return len(piece)
        return len(self.tokenizer(piece.strip(), add_special_tokens=False, verbose=False)["input_ids"])


def _split_section(text: str, lo: int, hi: int, path: str, size: int, overlap: int, ruler: _Ruler) -> list[Chunk]:
    """Chunks of the section `text[lo:hi]`: one if it fits, else overlapping windows."""
    chunks = []
    start = prev_end = lo
    while start < hi:
        limit = min(ruler.limit(start, size), hi)
        end = hi if limit >= hi else _split_point(text, start, limit, prev_end)
        # Token windows come from the whole-text tokenization; a piece can tokenize differently on
        # its own (a cut inside a word), so re-check and shrink the window until it fits.
        while end > start + 1 and ruler.count(text[start:end]) > size:
            limit = ruler.shrink(start, limit)
            end = _split_point(text, start, limit, prev_end)
        piece = text[start:end]
        if piece.strip():
            s = start + len(piece) - len(piece.lstrip())
            e = end - (len(piece) - len(piece.rstrip()))
            chunks.append(Chunk(s, e, text[s:e], path))
        if end >= hi:
            break
        if overlap:
            nxt = max(ruler.back(end, overlap), start + 1)
            # Start the overlap on a word boundary (the next one, so it never exceeds `overlap`).
            cands = [c + 1 for c in (text.find(" ", nxt, end), text.find("\n", nxt, end)) if c != -1]
            start = min(cands, default=nxt)
        else:
            start = end
        prev_end = end
    return chunks


def _split_point(text: str, start: int, limit: int, prev_end: int) -> int:
    # Never cut before half the window, nor at or before the previous chunk's end (with a large
    # overlap that would make chunks that add nothing new).
    floor = min(max(start + (limit - start) // 2, prev_end + 1), limit)
    best = -1
    for m in _PARAGRAPH_BREAK.finditer(text, floor, limit):
        best = m.end()
    if best > floor:
        return best
    for ws in (text.rfind("\n", floor, limit), text.rfind(" ", floor, limit)):
        if ws > floor:
            return ws + 1
    return limit


def _sections(text: str) -> list[tuple[int, int, str]]:
    """(start, end, heading path) of each section of `text`, covering all of it in order.

    A heading replaces those at its level and deeper in the path. A section with no text between
    its heading line and the next heading joins the next section, which keeps the start of the
    first and the path of the last.
    """
    heads = [(0, 0, "")]  # the preamble: text before the first heading, under no heading
    stack: list[tuple[int, str]] = []
    for h in markdown_headings(text):
        stack = [s for s in stack if s[0] < h.level] + [(h.level, h.title)]
        heads.append((h.start, h.line_end, " > ".join(t for _, t in stack)))
    sections = []
    start = None
    for i, (head_start, line_end, path) in enumerate(heads):
        end = heads[i + 1][0] if i + 1 < len(heads) else len(text)
        start = head_start if start is None else start
        if i + 1 < len(heads) and not text[line_end:end].strip():
            continue
        sections.append((start, end, path))
        start = None
    return sections
