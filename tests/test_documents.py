"""Source documents: finding, parsing (Markdown, HTML, PDF, JSONL) and chunking, as tables of cases.

Run: `.venv/bin/python -m pytest tests/test_documents.py -q`. No Ray; the token tests load only the
bundled embedder's tokenizer.
"""

import json
from pathlib import Path

import pytest

from lorag.documents import (
    DOC_SUFFIXES,
    Chunk,
    DocumentChunker,
    DocumentError,
    Unit,
    chunk_id,
    chunk_text,
    document_hash,
    find_documents,
    parse_document,
)

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
ROW_KEYS = {"id", "text", "source", "title", "section", "chunk_index", "start", "end", "doc_hash", "n_chunks", "error"}
ROW_TYPES = {"id": str, "text": str, "source": str, "title": str, "section": str, "chunk_index": int, "start": int,
             "end": int, "doc_hash": str, "n_chunks": int, "error": str}


def make_pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    """A minimal valid PDF: one Helvetica text line per string, one content stream per page."""
    n = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {n} >>",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"]
    for i, lines in enumerate(pages):
        esc = [s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for s in lines]
        stream = "BT /F1 12 Tf 14 TL 72 720 Td " + " T* ".join(f"({s}) Tj" for s in esc) + " ET"
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>")
        objs.append(f"<< /Length {len(stream.encode('latin-1'))} >>\nstream\n{stream}\nendstream")
    if title is not None:
        objs.append(f"<< /Title ({title}) >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for k, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{k} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    info = f" /Info {len(objs)} 0 R" if title is not None else ""
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# ---- chunk_text in characters -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size, overlap, expected",
    [
        ("", 100, 10, []),
        ("   \n\n  ", 100, 10, []),
        ("short text", 100, 10, ["short text"]),
        ("  padded  ", 100, 10, ["padded"]),
        # paragraph break preferred over a mid-paragraph cut
        ("a" * 60 + "\n\n" + "b" * 60, 100, 0, ["a" * 60, "b" * 60]),
        # a heading starts a new chunk when it falls past half the size
        ("intro " * 10 + "\n## Next\nbody", 70, 0, ["intro " * 10, "## Next\nbody"]),
        # whitespace preferred over a hard cut
        ("alpha beta gamma delta", 12, 0, ["alpha beta", "gamma delta"]),
        # no whitespace at all: hard cut at size
        ("x" * 250, 100, 0, ["x" * 100, "x" * 100, "x" * 50]),
        # overlap starts on a word boundary
        ("one two three four five six", 14, 7, ["one two three", "three four", "four five six"]),
        # the overlap never opens mid-word: it moves forward to the next word, so here none is shared
        ("one two three four five six", 14, 5, ["one two three", "four five six"]),
    ],
)
def test_chunk_text_table(text, size, overlap, expected):
    got = chunk_text(text, size, overlap)
    assert [c.text for c in got] == [e.strip() for e in expected]
    assert all(text[c.start : c.end] == c.text for c in got), "offsets index the original text"


def test_chunks_respect_size_offsets_and_overlap():
    words = " ".join(f"w{i}" for i in range(400))
    chunks = chunk_text(words, 120, 30)
    assert all(len(c.text) <= 120 for c in chunks)
    assert all(words[c.start : c.end] == c.text for c in chunks), "offsets must index the original text"
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end, "consecutive chunks overlap"
        assert words[b.start - 1] == " ", "a chunk never starts mid-word"
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert covered >= {i for i, ch in enumerate(words) if ch != " "}, "every character is in some chunk"


@pytest.mark.parametrize("size, overlap", [(60, 59), (60, 40), (200, 199)])
def test_large_overlap_still_makes_progress(size, overlap):
    words = " ".join(f"word{i}" for i in range(300))
    chunks = chunk_text(words, size, overlap)
    ends = [c.end for c in chunks]
    assert ends == sorted(set(ends)), "every chunk reaches past the previous one (no chunk is a subset of the last)"
    assert chunks[-1].end == len(words) and len(chunks) < len(words) // 4


@pytest.mark.parametrize(
    "text, size, expected",
    [
        ("no headings here", 16, [("no headings here", "")]),
        ("#hashtag is not a heading", 100, [("#hashtag is not a heading", "")]),
        ("# Install\n\nfirst\n\n## Network\n\nsecond", 12,
         [("# Install", "Install"), ("first", "Install"), ("## Network", "Install > Network"), ("second", "Install > Network")]),
        # a sibling replaces the previous heading at its level; the section is the one at the chunk's start
        ("# A\n\n## B\n\nb\n\n## C\n\nc\n\n# D\n\nd", 10, [("# A\n\n## B", "A"), ("b\n\n## C", "A > B"), ("c\n\n# D\n\nd", "A > C")]),
        # text before any heading has no section; closing hashes are not part of the title
        ("intro\n\n### Deep\n\nx\n\n# Top ##\n\ny", 12, [("intro", ""), ("### Deep", "Deep"), ("x\n\n# Top ##", "Deep"), ("y", "Top")]),
        ("# H\n#### Skip levels\n\ntext under h4\n\n## Back", 26, [("# H\n#### Skip levels", "H"), ("text under h4\n\n## Back", "H > Skip levels")]),
        # a shell comment inside a code fence is not a heading
        ("# Shell\n\n```\n# comment\n```\n\nafter", 100, [("# Shell\n\n```\n# comment\n```\n\nafter", "Shell")]),
    ],
)
def test_sections_are_the_heading_path_at_each_chunk_start(text, size, expected):
    assert [(c.text, c.section) for c in chunk_text(text, size, 0)] == expected


def test_code_fence_comment_is_not_a_title():
    assert parse_document("/d/run.md", b"```\n# not a title\n```\n# Real Title\n")[0].title == "Real Title"


# ---- chunk_text in tokens -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(embedder_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedder_path))


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("size, overlap", [(32, 0), (64, 16), (128, 32), (20, 19)])
def test_token_chunks_fit_the_embedder_window(tokenizer, size, overlap):
    text = "\n\n".join(p.read_text() for p in sorted((QUICKSTART / "corpus").glob("*.md")))
    text += "\n\nSupercalifragilisticexpialidocious-antidisestablishmentarianism " * 3 + "z" * 400
    chunks = chunk_text(text, size, overlap, tokenizer)
    counts = [n_tokens(tokenizer, c.text) for c in chunks]
    assert max(counts) <= size, f"a chunk has {max(counts)} tokens > size {size}: the embedder would truncate it"
    assert sum(counts) / len(counts) > size * 0.6, "chunks use most of the window (splits never before half)"
    assert all(text[c.start : c.end] == c.text for c in chunks)
    words = [(a, b) for a, b in zip(chunks, chunks[1:]) if text[b.start - 1].isspace()]
    assert len(words) >= len(chunks) * 0.9, "chunks start on word boundaries"
    if overlap:
        shared = [n_tokens(tokenizer, text[b.start : a.end]) for a, b in zip(chunks, chunks[1:]) if b.start < a.end]
        assert shared and sum(shared) / len(shared) == pytest.approx(overlap, rel=0.35), f"overlaps {shared} are about {overlap} tokens"
    else:
        assert all(b.start >= a.end for a, b in zip(chunks, chunks[1:]))


@pytest.mark.parametrize("size, overlap", [(8, 2), (20, 19), (64, 16)])
def test_token_chunks_fit_a_bpe_window(smollm2_path, size, overlap):
    # Byte-level BPE tokenizes a piece on its own differently from inside the whole text (a leading
    # space joins the next word), so the windows from the whole-text offsets need re-checking.
    from transformers import AutoTokenizer

    bpe = AutoTokenizer.from_pretrained(str(smollm2_path))
    text = (QUICKSTART / "corpus" / "03-leds-and-buttons.md").read_text() + " 日本語のテキストです。" * 20
    chunks = chunk_text(text, size, overlap, bpe)
    assert max(n_tokens(bpe, c.text) for c in chunks) <= size
    assert all(text[c.start : c.end] == c.text for c in chunks) and chunks[-1].end == len(text.rstrip())


def test_token_and_character_modes_agree_on_short_text(tokenizer):
    text = "# Title\n\nA short paragraph."
    assert chunk_text(text, 100, 10, tokenizer) == chunk_text(text, 100, 10) == [Chunk(0, len(text), text, "Title")]


# ---- parse_document -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, data, title",
    [
        ("/d/guide.md", b"intro\n# The Title\n## Sub", "The Title"),
        ("/d/notes.txt", b"no heading", "notes"),
        ("/d/bom.markdown", b"\xef\xbb\xbf# With BOM\n\ntext", "With BOM"),
        ("/d/bad.md", b"caf\xe9 # not a heading", "bad"),
    ],
)
def test_parse_text_documents(name, data, title):
    [unit] = parse_document(name, data)
    assert unit.title == title and unit.section == "" and unit.page_starts == ()
    assert "\ufeff" not in unit.text


@pytest.mark.parametrize("name", ["/d/a.md", "/d/a.txt", "/d/a.html", "/d/a.jsonl"])
@pytest.mark.parametrize("data", [b"", b"  \n\n\t "])
def test_empty_documents_are_errors(name, data):
    with pytest.raises(DocumentError, match="empty document"):
        parse_document(name, data)


HTML = b"""<!doctype html><html><head><title>Tidewell &amp; You</title><style>p {color: red}</style>
<script>var secret = "do not index";</script></head>
<body><nav><a href="/">Home</a> | <a href="/x">Menu</a></nav>
<h1>Manual</h1><p>Intro   text with
  a line break &lt;inside&gt; &eacute;t&eacute;.</p>
<h2>Setup <em>quickly</em></h2><ul><li>Unbox</li><li>Plug in<br>then wait</li></ul>
<div>Table:<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table></div>
<h3>Network</h3><p>Use DHCP.</p></body></html>"""


def test_html_becomes_markdown_like_text():
    [unit] = parse_document("/site/page.html", HTML)
    assert unit.title == "Tidewell & You"
    assert "secret" not in unit.text and "color" not in unit.text and "Menu" not in unit.text, "script/style/nav dropped"
    assert "Intro text with a line break <inside> été." in unit.text, "whitespace collapsed, entities unescaped"
    assert "\n\n## Setup quickly\n\n" in unit.text and unit.text.startswith("# Manual\n\n")
    assert "Unbox\nPlug in\nthen wait" in unit.text
    sections = [c.section for c in chunk_text(unit.text, 25, 0)]
    assert sections == ["Manual"] * 3 + ["Manual > Setup quickly"] * 3 + ["Manual > Setup quickly > Network"]


@pytest.mark.parametrize(
    "html, title",
    [(b"<h1>First</h1><h1>Second</h1>", "First"), (b"<p>just text</p>", "page"), (b"<title> Spaced \n Title </title><p>x</p>", "Spaced Title")],
)
def test_html_title_falls_back_to_h1_then_stem(html, title):
    assert parse_document("/x/page.htm", html)[0].title == title


def test_pdf_pages_become_sections():
    data = make_pdf([["Page one says hello.", "The reset hold is 12 seconds."], ["Page two (second) talks about warranty."]], title="Tidewell Manual")
    [unit] = parse_document("/d/manual.pdf", data)
    assert unit.title == "Tidewell Manual"
    assert "12 seconds" in unit.text and "Page two (second) talks about warranty." in unit.text
    assert len(unit.page_starts) == 2 and unit.text[unit.page_starts[1] :].startswith("Page two")
    rows = DocumentChunker("kb", 60, 0)({"path": "/d/manual.pdf", "bytes": data})
    assert [r["error"] for r in rows] == [""] * len(rows) and len(rows) >= 2
    assert rows[0]["section"] == "page 1" and rows[-1]["section"] == "page 2"
    assert all(unit.text[r["start"] : r["end"]] == r["text"] for r in rows)
    assert parse_document("/d/untitled.pdf", make_pdf([["x"]]))[0].title == "untitled"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"not a pdf at all", "unreadable PDF"),
        (b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog", "unreadable PDF"),
        (make_pdf([["hello"]])[:60], "unreadable PDF"),
        (make_pdf([[]]), r"no extractable text \(scanned PDF\?\)"),
    ],
)
def test_bad_pdfs_are_document_errors(data, reason):
    with pytest.raises(DocumentError, match=reason):
        parse_document("/d/bad.pdf", data)
    [row] = DocumentChunker("kb", 100, 10)({"path": "/d/bad.pdf", "bytes": data})
    assert set(row) == ROW_KEYS and row["error"].startswith("DocumentError: ") and len(row["error"]) <= 300
    assert (row["id"], row["text"], row["chunk_index"], row["n_chunks"], row["start"], row["end"]) == ("", "", -1, 0, 0, 0)
    assert row["source"] == "/d/bad.pdf" and row["doc_hash"] == document_hash(data, "")


def test_jsonl_records_are_units():
    lines = [{"text": "# Reset\n\nHold 12 s.", "title": "Reset FAQ"}, {"text": "Warranty is 39 months.", "title": 7}]
    data = ("\n".join(json.dumps(r) for r in lines[:1]) + "\n\n" + json.dumps(lines[1]) + "\n").encode()
    units = parse_document("/kb/faq.jsonl", data)
    assert units == [Unit("# Reset\n\nHold 12 s.", "Reset FAQ", "line 1"), Unit("Warranty is 39 months.", "faq line 3", "line 3")]
    rows = DocumentChunker("kb", 200, 0)({"path": "/kb/faq.jsonl", "bytes": data})
    assert [(r["section"], r["chunk_index"], r["n_chunks"], r["start"]) for r in rows] == [("line 1 > Reset", 0, 2, 0), ("line 3", 1, 2, 0)]


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"text": "ok"', r"line 2: invalid JSON"),
        ('["text"]', r"line 2: expected a JSON object, got list"),
        ('{"body": "no text field"}', r"line 2: field 'text' must be a non-empty string"),
        ('{"text": "   "}', r"line 2: field 'text' must be a non-empty string"),
        ('{"text": 5}', r"line 2: field 'text' must be a non-empty string"),
    ],
)
def test_malformed_jsonl_line_fails_the_file(line, reason):
    data = ('{"text": "good"}\n' + line + "\n").encode()
    with pytest.raises(DocumentError, match=reason):
        parse_document("/kb/x.jsonl", data)


def test_jsonl_line_numbers_survive_unicode_line_separators():
    data = (json.dumps({"text": "one\u2028still line one"}, ensure_ascii=False) + "\n" + '{"text": "two"}\n').encode()
    assert [(u.text, u.section) for u in parse_document("/kb/u.jsonl", data)] == [("one\u2028still line one", "line 1"), ("two", "line 2")]


def test_jsonl_custom_fields():
    data = b'{"body": "custom text", "name": "Custom"}\n'
    assert parse_document("/kb/x.jsonl", data, text_field="body", title_field="name") == [Unit("custom text", "Custom", "line 1")]
    with pytest.raises(DocumentError, match="field 'text'"):
        parse_document("/kb/x.jsonl", data)


# ---- find_documents, ids, hashes ----------------------------------------------------------------------


def test_find_documents(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    names = ["d/a.md", "d/sub/b.txt", "d/c.HTML", "d/sub/d.pdf", "d/e.jsonl", "d/f.htm", "d/g.markdown", "d/ignored.bin", "d/h.json", "c.md"]
    for name in names:
        (tmp_path / name).write_text("x")
    found = find_documents([str(tmp_path / "d")])
    assert found == sorted(str(tmp_path / n) for n in names if n.startswith("d/") and n.lower().endswith(DOC_SUFFIXES))
    assert len(found) == 7
    assert find_documents([str(tmp_path / "*.md"), str(tmp_path / "c.md")]) == [str(tmp_path / "c.md")]
    assert find_documents([str(tmp_path / "**" / "*.pdf")]) == [str(tmp_path / "d/sub/d.pdf")]
    with pytest.raises(FileNotFoundError, match="match no file"):
        find_documents([str(tmp_path / "missing"), str(tmp_path / "d")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no documents"):
        find_documents([str(tmp_path / "empty")])


def test_chunk_ids_are_deterministic_and_distinct():
    a = chunk_id("kb", "/d/a.md", 0, "text")
    assert a == chunk_id("kb", "/d/a.md", 0, "text") and len(a) == 32
    assert len({a, chunk_id("kb", "/d/b.md", 0, "text"), chunk_id("kb", "/d/a.md", 1, "text"), chunk_id("kb2", "/d/a.md", 0, "text"), chunk_id("kb", "/d/a.md", 0, "text!")}) == 5


def test_document_hash_covers_bytes_and_fingerprint():
    h = document_hash(b"doc", "size=800,overlap=100,embedder=all-minilm-l6-v2")
    assert h == document_hash(b"doc", "size=800,overlap=100,embedder=all-minilm-l6-v2") and len(h) == 64
    assert len({h, document_hash(b"doc", "size=400,overlap=100,embedder=all-minilm-l6-v2"), document_hash(b"doc!", "size=800,overlap=100,embedder=all-minilm-l6-v2")}) == 3


# ---- DocumentChunker --------------------------------------------------------------------------------


def test_chunker_rows_have_one_schema_and_deterministic_ids(embedder_path):
    path = QUICKSTART / "corpus" / "02-setup.md"
    row = {"path": str(path), "bytes": path.read_bytes()}
    for chunker in (DocumentChunker("kb", 300, 50, fingerprint="f1"), DocumentChunker("kb", 64, 16, tokenizer_path=str(embedder_path), fingerprint="f1")):
        rows = chunker(row)
        assert len(rows) > 2
        for i, r in enumerate(rows):
            assert {k: type(v) for k, v in r.items()} == ROW_TYPES, "every row has the same keys and types (Ray Data schema)"
            assert (r["chunk_index"], r["n_chunks"], r["error"], r["source"], r["title"]) == (i, len(rows), "", str(path), "Setting Up Your Tidewell T4")
            assert r["id"] == chunk_id("kb", str(path), i, r["text"]) and r["doc_hash"] == document_hash(row["bytes"], "f1")
        assert [r["id"] for r in chunker(row)] == [r["id"] for r in rows], "same file, same ids"
        assert rows[-1]["section"].startswith("Setting Up Your Tidewell T4 > ")


@pytest.mark.parametrize(
    "path, data, error",
    [
        ("/d/empty.md", b"\n\n", "DocumentError: empty document"),
        ("/d/bad.jsonl", b'{"text": "ok"}\n{oops}\n', "DocumentError: line 2: invalid JSON"),
        ("/d/weird.md", None, "TypeError: "),  # not bytes at all: any failure becomes a row, never a raise
    ],
)
def test_chunker_turns_failures_into_one_error_row(path, data, error):
    row = {"path": path, "bytes": data}
    [out] = DocumentChunker("kb", 100, 10)(row)
    assert {k: type(v) for k, v in out.items()} == ROW_TYPES
    assert out["error"].startswith(error) and out["id"] == "" and out["chunk_index"] == -1 and out["source"] == path


def test_sources_at_s3_uris_are_found_and_read(s3):
    """Knowledge-base sources may live in object storage: a directory, a pattern or one file."""
    import pyarrow.fs

    from lorag.documents import find_documents, read_document

    fs, bucket = pyarrow.fs.FileSystem.from_uri(s3)
    for name, data in {"docs/a.md": b"# A", "docs/sub/b.txt": b"B", "docs/skip.bin": b"x", "other/c.md": b"C"}.items():
        with fs.open_output_stream(f"{bucket}/{name}") as f:
            f.write(data)
    assert find_documents([f"{s3}/docs/"]) == [f"{s3}/docs/a.md", f"{s3}/docs/sub/b.txt"], "a directory: every document under it"
    assert find_documents([f"{s3}/docs/*.md", f"{s3}/other/c.md"]) == [f"{s3}/docs/a.md", f"{s3}/other/c.md"]
    assert read_document(f"{s3}/docs/sub/b.txt") == b"B"
    with pytest.raises(FileNotFoundError, match="match no file"):
        find_documents([f"{s3}/nothing/"])
