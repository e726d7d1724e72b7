"""Chunking (a table of cases) and the Ray Data ingest pipeline into a real Milvus Lite file."""

from pathlib import Path

import pytest

from lorag.data import chunk_id, chunk_text, document_title, find_documents


@pytest.mark.parametrize(
    "text, size, overlap, expected",
    [
        ("", 100, 10, []),
        ("   \n\n  ", 100, 10, []),
        ("short text", 100, 10, ["short text"]),
        # paragraph break preferred over a mid-paragraph cut
        ("a" * 60 + "\n\n" + "b" * 60, 100, 0, ["a" * 60, "b" * 60]),
        # a heading starts a new chunk when it falls past half the size
        ("intro " * 10 + "\n## Next\nbody " * 1, 70, 0, ["intro " * 10, "## Next\nbody"]),
        # no whitespace at all: hard cut at size
        ("x" * 250, 100, 0, ["x" * 100, "x" * 100, "x" * 50]),
    ],
)
def test_chunk_text_table(text, size, overlap, expected):
    got = [c.text for c in chunk_text(text, size, overlap)]
    assert got == [e.strip() for e in expected]


def test_chunks_respect_size_offsets_and_overlap():
    words = " ".join(f"w{i}" for i in range(400))
    chunks = chunk_text(words, 120, 30)
    assert all(len(c.text) <= 120 for c in chunks)
    assert all(words[c.start : c.end] == c.text for c in chunks), "offsets must index the original text"
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end, "consecutive chunks overlap"
        assert not b.text[0].isdigit() or words[b.start - 1] == " ", "a chunk never starts mid-word"
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert covered >= {i for i, ch in enumerate(words) if ch != " "}, "every character is in some chunk"


def test_chunk_ids_are_deterministic_and_distinct():
    a = chunk_id("kb", "/d/a.md", 0, "text")
    assert a == chunk_id("kb", "/d/a.md", 0, "text") and len(a) == 32
    assert len({a, chunk_id("kb", "/d/b.md", 0, "text"), chunk_id("kb", "/d/a.md", 1, "text"), chunk_id("kb2", "/d/a.md", 0, "text"), chunk_id("kb", "/d/a.md", 0, "text!")}) == 5


def test_document_title():
    assert document_title("intro\n# The Title\n## Sub", "/x/y.md") == "The Title"
    assert document_title("no heading", "/x/notes.txt") == "notes"


def test_find_documents(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.md", "d/sub/b.txt", "d/ignored.bin", "c.md"):
        (tmp_path / name).write_text("x")
    assert find_documents([str(tmp_path / "d")]) == [str(tmp_path / "d/a.md"), str(tmp_path / "d/sub/b.txt")]
    assert find_documents([str(tmp_path / "*.md")]) == [str(tmp_path / "c.md")]
    with pytest.raises(FileNotFoundError, match="match no file"):
        find_documents([str(tmp_path / "missing")])


@pytest.mark.slow
def test_ingest_into_milvus_lite_then_query_returns_the_right_source(ray_session, make_config, embedder_path):
    from lorag.data import ingest
    from lorag.embed import Embedder
    from lorag.milvus import open_store
    from lorag.retrieval import retrieve

    cfg = make_config()
    first = ingest(cfg, "handbook")
    assert first.documents == 8 and first.entities == first.chunks_written > 8
    again = ingest(cfg, "handbook")
    assert again.entities == first.entities, "re-ingesting unchanged documents must not add entities (ids are deterministic, writes are upserts)"

    kb = cfg.knowledge_base("handbook")
    corpus = Path(kb.sources[0])
    expected = lambda: sum(len(chunk_text(p.read_text(), kb.chunking.size, kb.chunking.overlap)) for p in corpus.glob("*.md"))  # noqa: E731
    assert first.entities == expected()

    # A changed document replaces its chunks; a deleted one loses them.
    (corpus / "08-firmware.md").unlink()
    overview = corpus / "01-overview.md"
    overview.write_text(overview.read_text() + "\n\n## Added later\n\n" + "The T4 ships in a recycled cardboard box. " * 30)
    third = ingest(cfg, "handbook")
    assert third.entities == expected(), "after an edit and a delete, the collection holds exactly the current documents' chunks"
    assert third.chunks_removed > 0

    store = open_store(cfg.milvus_uri(kb))
    emb = Embedder(embedder_path)
    cases = {  # question -> a fact only the right passages contain
        "How long do I hold the reset button to factory-reset the Tidewell T4?": "12 seconds",
        "How long is the Tidewell T4 warranty?": "39",
        "What colour does the status LED pulse during a backup?": "amber",
    }
    for question, fact in cases.items():
        hits = retrieve(store, emb, kb.collection, question, 3)
        assert fact in hits[0]["text"], f"{question!r}: the top hit ({hits[0]['source']}) lacks {fact!r}: {hits[0]['text'][:200]!r}"
        assert hits[0]["source"].startswith(str(cfg.knowledge_bases[0].sources[0]))
        assert hits[0]["score"] >= hits[-1]["score"]
        h = hits[0]
        original = open(h["source"]).read()
        assert original[h["start"] : h["end"]] == h["text"], "citation offsets point at the chunk in the source file"


@pytest.mark.parametrize(
    "messages, hits, changed_index",
    [
        ([{"role": "user", "content": "q"}], [], None),
        ([{"role": "system", "content": "s"}], [{"title": "t", "text": "x"}], None),
        ([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}], [{"title": "T", "text": "fact"}], 2),
    ],
)
def test_augment_wraps_only_the_last_user_turn(messages, hits, changed_index):
    from lorag.retrieval import augment

    out = augment(messages, hits)
    assert len(out) == len(messages)
    for i, (a, b) in enumerate(zip(messages, out)):
        if i == changed_index:
            assert b["content"].endswith("Question: " + a["content"]) and "[1] T\nfact" in b["content"]
        else:
            assert a == b
