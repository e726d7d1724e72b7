"""Knowledge-base source documents: finding them, reading them, and parsing them into text.

A document is a file: Markdown or plain text, HTML, PDF, or JSONL with one record per line.
`find_documents` expands a knowledge base's sources into files, `read_document` reads one (from a
local path or a filesystem URI), and `parse_document` turns its bytes into citable `Unit`s (one
per file, or one per JSONL record). Chunking those units is `lorag.chunking`'s; `document_hash`
names a document's bytes and how they are indexed, so an ingest re-indexes only what changed.

Documents are indexed as a reader sees them. An HTML page becomes Markdown-like text of its main
content only (navigation, headers, footers, sidebars and scripts dropped), with headings from its
heading elements, code blocks as fenced code and permalink marks removed. In Markdown, a line in
fenced code is never a heading (`markdown_headings`, which the chunker's sections follow too).

Every step takes time linear in the document (no pattern that backtracks over a long run of
spaces, no scan repeated per tag, titles cut at 500 characters), and only bounded, regular files
are read: `find_documents` leaves out what is not a regular file inside its source root, and
`read_document` stops at a size limit (the knowledge base's `max_source_bytes`).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from lorag.storage import is_uri

DOC_SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm", ".pdf", ".jsonl")

_HEADING_MARK = re.compile(r"(#{1,6})[ \t]+")
_FENCE_OPEN = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")
_MAX_TITLE = 500  # characters of a heading's or a document's title


class DocumentError(ValueError):
    """A document could not be parsed (message says why)."""


@dataclass(frozen=True)
class Unit:
    """One parsed, citable unit of text: a whole file, or one JSONL record."""

    text: str
    title: str
    section: str
    page_starts: tuple[int, ...] = ()
    """For a PDF, the offset in `text` where each page begins (page N starts at `page_starts[N-1]`)."""


def find_documents(sources: list[str], refused: list[tuple[str, str]] | None = None) -> list[str]:
    """Expand files, directories (recursively, filtered by `DOC_SUFFIXES`) and glob patterns.

    Only regular files inside a source's root are documents: the directory a source names, the
    fixed directories at the head of a pattern (`docs/` of `docs/**/*.md`), or a file's own
    directory. A symlink may point anywhere inside its root; one that resolves outside it (a
    `leak.txt` -> `/proc/self/environ`), a broken one, and anything that is not a regular file (a
    FIFO, a device such as `/dev/zero`, or a link to one) is left out, and named in `refused`.

    Args:
        sources: local paths, directories or glob patterns (`**` allowed), or filesystem URIs of
            files, directories or patterns (`s3://bucket/docs/`, `s3://bucket/docs/*.md`).
        refused: a list that gets `(path, reason)` for each file left out, if given.

    Returns:
        Absolute document paths and URIs, sorted.

    Raises:
        FileNotFoundError: a source matches nothing, or nothing at all is found (the message
            names the files left out, if any).
    """
    found: set[str] = set()
    missing = []
    left_out: list[tuple[str, str]] = []
    for src in sources:
        if is_uri(src):
            matches = _find_remote(src, left_out)
            if not matches:
                missing.append(src)
            found.update(matches)
            continue
        matches = glob.glob(src, recursive=True) if glob.has_magic(src) else ([src] if os.path.exists(src) else [])
        if not matches:
            missing.append(src)
        root = os.path.realpath(_source_root(src))
        for m in matches:
            if os.path.isdir(m):
                for parent, _, files in os.walk(m):
                    names = [os.path.join(parent, f) for f in files if f.lower().endswith(DOC_SUFFIXES)]
                    _admit(names, root, found, left_out)
            else:
                _admit([m], root, found, left_out)
    if refused is not None:
        refused.extend(sorted(left_out))
    if missing:
        raise FileNotFoundError(f"knowledge-base sources match no file: {missing}")
    if not found:
        why = f"; left out: {'; '.join(f'{p} ({r})' for p, r in sorted(left_out))}" if left_out else ""
        raise FileNotFoundError(f"no documents ({', '.join(DOC_SUFFIXES)}) under {sources}{why}")
    return sorted(found)


def _source_root(src: str) -> str:
    """The directory a local source may reach: itself, a pattern's fixed head, or a file's directory."""
    if glob.has_magic(src):
        head = []
        for part in Path(src).parts:
            if glob.has_magic(part):
                break
            head.append(part)
        return os.path.join(*head) if head else "."
    return src if os.path.isdir(src) else os.path.dirname(src) or "."


def _admit(paths: list[str], root: str, found: set[str], left_out: list[tuple[str, str]]) -> None:
    """Put each of `paths` in `found` if it is a document of the source root `root` (a resolved
    directory), else in `left_out` with the reason."""
    for path in paths:
        path = os.path.abspath(path)
        reason = _refusal(path, root)
        if reason:
            left_out.append((path, reason))
        else:
            found.add(path)


def _refusal(path: str, root: str) -> str | None:
    """Why the local file `path` is not read as a document of the source root `root`, or None."""
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        return f"resolves to {real}, outside its source root {root} (a symlink): not read; name the target in sources to index it"
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        return f"not read: {e.strerror} (a broken symlink?)"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device): not read"
    return None


def _find_remote(uri: str, left_out: list[tuple[str, str]]) -> list[str]:
    """Documents at a filesystem URI: the file itself, every document under a directory, or the
    files under a pattern's fixed prefix that match it (`fnmatch`, where `*` also crosses `/`).
    Files of a `file://` URI are checked as local ones (see `find_documents`)."""
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
        names = [uri] if not glob.has_magic(rest) else []
        fixed = fixed.rsplit("/", 1)[0]  # a file's root is its directory
    else:
        names = [f"{scheme}://{fixed.rstrip('/')}/{rel}" for rel, _, _ in storage.list_files(fs, path)]
        if glob.has_magic(rest):
            names = [n for n in names if fnmatch.fnmatch(n, uri)]
        else:
            names = [n for n in names if n.lower().endswith(DOC_SUFFIXES)]
    if scheme != "file":
        return names
    root = os.path.realpath(fixed or "/")
    refusals = [(n, _refusal(n[len("file://"):], root)) for n in names]
    left_out += [(n, r) for n, r in refusals if r]
    return [n for n, r in refusals if not r]


def read_document(source: str, max_bytes: int | None = None) -> bytes:
    """A document's bytes, from a local path or a filesystem URI.

    Args:
        source: the path or URI.
        max_bytes: the most bytes to read (None: no limit).

    Raises:
        DocumentError: the source holds more than `max_bytes` bytes (only `max_bytes + 1` are
            read), or a local one is not a regular file (checked before anything is read).
    """
    n = -1 if max_bytes is None else max_bytes + 1
    if not is_uri(source):
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DocumentError("not a regular file (a FIFO, socket or device): not read")
            data = f.read(n)
    else:
        from lorag import storage

        fs, path = storage.filesystem(source)
        with fs.open_input_stream(path) as f:
            data = f.read(None if n < 0 else n)
    if max_bytes is not None and len(data) > max_bytes:
        raise DocumentError(f"larger than {max_bytes} bytes: not read (raise the knowledge base's max_source_bytes to index it)")
    return data


def parse_document(path: str, data: bytes, text_field: str = "text", title_field: str = "title") -> list[Unit]:
    """Parse one document's bytes into units of text, by file suffix.

    Args:
        path: the file path (its suffix picks the parser; its stem is the fallback title).
        data: the raw file contents.
        text_field: for JSONL, the record field holding the text.
        title_field: for JSONL, the record field holding the title (optional per record).

    Returns:
        One unit, or for JSONL one unit per non-blank line; titles are cut at 500 characters.

    Raises:
        DocumentError: the document is empty, corrupt, encrypted, has no extractable text, or
            (JSONL) a line is malformed; the message says which line and why.
    """
    suffix, stem = Path(path).suffix.lower(), Path(path).stem
    if suffix == ".pdf":
        units = [_parse_pdf(data, stem)]
    elif suffix == ".jsonl":
        units = _parse_jsonl(data.decode("utf-8-sig", errors="replace"), stem, text_field, title_field)
    else:
        text = data.decode("utf-8-sig", errors="replace")
        if suffix in (".html", ".htm"):
            from lorag.webpage import parse_html

            text, title = parse_html(text)
        else:
            headings = markdown_headings(text)
            title = headings[0].title if headings else ""
        if not text.strip():
            raise DocumentError("empty document")
        units = [Unit(text, title or stem, "")]
    # Every chunk's passage repeats its unit's title: one as long as the document (a page whose
    # first heading holds all of it) would make chunking take time quadratic in the document.
    return [u if len(u.title) <= _MAX_TITLE else replace(u, title=u.title[:_MAX_TITLE]) for u in units]


def document_hash(data: bytes, fingerprint: str) -> str:
    """Hash of a document's bytes and the `fingerprint` of how it is indexed (chunking, embedder).

    Changing the chunking parameters or the embedder changes the fingerprint, so every document
    then counts as changed and is re-indexed.
    """
    return hashlib.sha256(data + b"\0" + fingerprint.encode()).hexdigest()


# ---- Markdown headings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    """A Markdown ATX heading: where its line starts and ends, its level (1-6) and its title."""

    start: int
    line_end: int
    level: int
    title: str


def markdown_headings(text: str) -> list[Heading]:
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
        elif heading := _heading(line[0]):
            found.append(Heading(line.start(), line.end(), *heading))
    return found


def _heading(line: str) -> tuple[int, str] | None:
    """(level, title) of an ATX heading line ("## Title"), else None (also for an empty title).

    The title is found with string operations, in time linear in the line: a pattern with a lazy
    title before trailing whitespace takes time quadratic in a run of spaces inside the line.
    """
    mark = _HEADING_MARK.match(line)
    if not mark:
        return None
    title = line[mark.end():].rstrip()
    # "## Title ##" closes with optional hashes after a space; "## C#" keeps its hash.
    bare = title.rstrip("#")
    if bare != title and (not bare or bare[-1] in " \t"):
        title = bare
    title = title.strip()[:_MAX_TITLE]
    return (len(mark[1]), title) if title else None


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
