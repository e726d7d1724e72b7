"""Knowledge-base source documents: finding them, parsing them into text, and chunking that text.

A document is a file: Markdown or plain text, HTML, PDF, or JSONL with one record per line.
`parse_document` turns its bytes into citable `Unit`s (one per file, or one per JSONL record),
`chunk_text` splits a unit's text into `Chunk`s that follow its sections, measured in characters
or in tokens of the embedder, and `DocumentChunker` is the Ray Data `flat_map` stage that does both
for one file row and never raises: a file that cannot be parsed becomes a single row whose `error`
says why.

Documents are indexed as a reader sees them. An HTML page becomes Markdown-like text of its main
content only (navigation, headers, footers, sidebars and scripts dropped), with headings from its
heading elements, code blocks as fenced code and permalink marks removed. In Markdown, a line in
fenced code is never a heading.

Chunk offsets index the unit's parsed text (for Markdown and text files, the decoded file), and
each chunk carries its section: the Markdown heading path, or "page N" for a PDF. The chunker
also gives each chunk the `passage` it is embedded as and the `terms` it is full-text indexed by
(`lorag.retrieval.passage` and `terms`: its heading path above its text).
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorag.retrieval import passage, terms

DOC_SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm", ".pdf", ".jsonl")

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_HEADING = re.compile(r"(#{1,6})[ \t]+(.+?)\s*")
_FENCE_OPEN = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")
_MAX_ERROR = 300


class DocumentError(ValueError):
    """A document could not be parsed (message says why)."""


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int
    text: str
    section: str


@dataclass(frozen=True)
class Unit:
    """One parsed, citable unit of text: a whole file, or one JSONL record."""

    text: str
    title: str
    section: str
    page_starts: tuple[int, ...] = ()
    """For a PDF, the offset in `text` where each page begins (page N starts at `page_starts[N-1]`)."""


def find_documents(sources: list[str]) -> list[str]:
    """Expand files, directories (recursively, filtered by `DOC_SUFFIXES`) and glob patterns.

    Args:
        sources: local paths, directories or glob patterns (`**` allowed), or filesystem URIs of
            files, directories or patterns (`s3://bucket/docs/`, `s3://bucket/docs/*.md`).

    Returns:
        Absolute document paths and URIs, sorted.

    Raises:
        FileNotFoundError: a source matches nothing, or nothing at all is found.
    """
    found: set[str] = set()
    missing = []
    for src in sources:
        if "://" in src:
            matches = _find_remote(src)
            if not matches:
                missing.append(src)
            found.update(matches)
            continue
        matches = glob.glob(src, recursive=True) if glob.has_magic(src) else ([src] if os.path.exists(src) else [])
        if not matches:
            missing.append(src)
        for m in matches:
            if os.path.isdir(m):
                for root, _, files in os.walk(m):
                    found.update(os.path.abspath(os.path.join(root, f)) for f in files if f.lower().endswith(DOC_SUFFIXES))
            elif os.path.isfile(m):
                found.add(os.path.abspath(m))
    if missing:
        raise FileNotFoundError(f"knowledge-base sources match no file: {missing}")
    if not found:
        raise FileNotFoundError(f"no documents ({', '.join(DOC_SUFFIXES)}) under {sources}")
    return sorted(found)


def _find_remote(uri: str) -> list[str]:
    """Documents at a filesystem URI: the file itself, every document under a directory, or the
    files under a pattern's fixed prefix that match it (`fnmatch`, where `*` also crosses `/`)."""
    import fnmatch

    import pyarrow.fs

    from lorag import storage

    scheme, _, rest = uri.partition("://")
    fixed = rest
    if glob.has_magic(rest):
        fixed = rest[: min(rest.index(c) for c in "*?[" if c in rest)].rsplit("/", 1)[0]
    fs, path = storage.filesystem(f"{scheme}://{fixed}")
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.File:
        return [uri] if not glob.has_magic(rest) else []
    names = [f"{scheme}://{fixed.rstrip('/')}/{rel}" for rel, _, _ in storage.list_files(fs, path)]
    if glob.has_magic(rest):
        return [n for n in names if fnmatch.fnmatch(n, uri)]
    return [n for n in names if n.lower().endswith(DOC_SUFFIXES)]


def read_document(source: str) -> bytes:
    """A document's bytes, from a local path or a filesystem URI."""
    if "://" not in source:
        return Path(source).read_bytes()
    from lorag import storage

    fs, path = storage.filesystem(source)
    return storage.read_bytes(fs, path)


def parse_document(path: str, data: bytes, text_field: str = "text", title_field: str = "title") -> list[Unit]:
    """Parse one document's bytes into units of text, by file suffix.

    Args:
        path: the file path (its suffix picks the parser; its stem is the fallback title).
        data: the raw file contents.
        text_field: for JSONL, the record field holding the text.
        title_field: for JSONL, the record field holding the title (optional per record).

    Returns:
        One unit, or for JSONL one unit per non-blank line.

    Raises:
        DocumentError: the document is empty, corrupt, encrypted, has no extractable text, or
            (JSONL) a line is malformed; the message says which line and why.
    """
    suffix, stem = Path(path).suffix.lower(), Path(path).stem
    if suffix == ".pdf":
        return [_parse_pdf(data, stem)]
    text = data.decode("utf-8-sig", errors="replace")
    if suffix == ".jsonl":
        return _parse_jsonl(text, stem, text_field, title_field)
    if suffix in (".html", ".htm"):
        from lorag.webpage import parse_html

        text, title = parse_html(text)
    else:
        headings = _headings(text)
        title = headings[0].title if headings else ""
    if not text.strip():
        raise DocumentError("empty document")
    return [Unit(text, title or stem, "")]


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


def document_hash(data: bytes, fingerprint: str) -> str:
    """Hash of a document's bytes and the `fingerprint` of how it is indexed (chunking, embedder).

    Changing the chunking parameters or the embedder changes the fingerprint, so every document
    then counts as changed and is re-indexed.
    """
    return hashlib.sha256(data + b"\0" + fingerprint.encode()).hexdigest()


class DocumentChunker:
    """Ray Data `flat_map` stage (a callable class, run on an actor pool): a file row in, chunk rows out.

    Every output row has the same keys and types: id, text, source, title, section, chunk_index,
    start, end, doc_hash, n_chunks, error. A file that fails becomes one row with `error` set.

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


@dataclass(frozen=True)
class _Heading:
    start: int
    line_end: int
    level: int
    title: str


def _headings(text: str) -> list[_Heading]:
    """The Markdown ATX headings of `text` ("## Title"), leaving out every line inside fenced code.

    Fences follow CommonMark: a line of three or more backticks or tildes (indented or not) opens
    a code block that only a line of at least as many of the same character closes (so a fence of
    four backticks may hold ``` lines), and a fence left open runs to the end of the text, as a
    Markdown renderer shows it. Backticks with more backticks after them on the line are inline
    code, not a fence.
    """
    found = []
    fence = ""  # the open fence's characters ("```", "~~~~", ...), or "" outside code
    for line in re.finditer(r"^.*$", text, re.MULTILINE):
        if fence:
            close = line[0].strip()
            if set(close) == {fence[0]} and len(close) >= len(fence):
                fence = ""
            continue
        opening = _FENCE_OPEN.fullmatch(line[0])
        if opening and not (opening[1][0] == "`" and "`" in opening[2]):
            fence = opening[1]
        elif heading := _HEADING.fullmatch(line[0]):
            # "## Title ##" closes with optional hashes after a space; "## C#" keeps its hash.
            title = re.sub(r"(?:^|[ \t]+)#+$", "", heading[2]).strip()[:500]
            if title:
                found.append(_Heading(line.start(), line.end(), len(heading[1]), title))
    return found


def _sections(text: str) -> list[tuple[int, int, str]]:
    """(start, end, heading path) of each section of `text`, covering all of it in order.

    A heading replaces those at its level and deeper in the path. A section with no text between
    its heading line and the next heading joins the next section, which keeps the start of the
    first and the path of the last.
    """
    heads = [(0, 0, "")]  # the preamble: text before the first heading, under no heading
    stack: list[tuple[int, str]] = []
    for h in _headings(text):
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


# ---- parsers ----------------------------------------------------------------------------------


def _parse_pdf(data: bytes, stem: str) -> Unit:
    import pypdf  # imported here: it pulls in `cryptography`, ~0.1 s that text-only ingests and the CLI skip

    # pypdf raises many exception types on damaged files (its own, but also ValueError, KeyError,
    # zlib and struct errors from deep inside), so any failure here means "unreadable PDF".
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError("encrypted PDF (needs a password)")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = reader.metadata.title if reader.metadata else None
    except DocumentError:
        raise
    except Exception as e:
        raise DocumentError(f"unreadable PDF ({type(e).__name__}: {e})") from e
    if not any(pages):
        raise DocumentError("no extractable text (scanned PDF?)")
    starts, pos = [], 0
    for p in pages:
        starts.append(pos)
        pos += len(p) + 2
    title = title.strip() if isinstance(title, str) else ""
    return Unit("\n\n".join(pages), title or stem, "", tuple(starts))


def _parse_jsonl(text: str, stem: str, text_field: str, title_field: str) -> list[Unit]:
    units = []
    # Split on "\n" only: str.splitlines would also break at U+2028 etc., which JSON strings may hold raw.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DocumentError(f"line {n}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise DocumentError(f"line {n}: expected a JSON object, got {type(record).__name__}")
        body = record.get(text_field)
        if not isinstance(body, str) or not body.strip():
            raise DocumentError(f"line {n}: field {text_field!r} must be a non-empty string")
        title = record.get(title_field)
        units.append(Unit(body, title if isinstance(title, str) and title.strip() else f"{stem} line {n}", f"line {n}"))
    if not units:
        raise DocumentError("empty document")
    return units
