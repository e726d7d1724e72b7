"""Reciprocal rank fusion, English analysis, the searched passage and the in-process BM25 fallback, as tables of cases (no Milvus, no model)."""

import random

import pytest

from lorag.retrieval import rrf
from lorag.sections import HybridConfig, KnowledgeBaseConfig
from lorag.text import Bm25Index, analyze, passage, terms


def hits(*ids):
    return [{"id": i, "text": i} for i in ids]


@pytest.mark.parametrize(
    "rankings, k, expected",
    [
        ([], 3, []),
        ([hits()], 3, []),
        ([hits("a", "b", "c")], 2, ["a", "b"]),
        # in both lists beats first in one list
        ([hits("a", "b"), hits("b", "c")], 3, ["b", "a", "c"]),
        # equal fused scores keep first-appearance order
        ([hits("a", "b"), hits("b", "a")], 2, ["a", "b"]),
        # a hit low in both lists still beats a hit found once at the same ranks
        ([hits("x", "y", "z"), hits("q", "r", "z")], 1, ["z"]),
    ],
)
def test_rrf_table(rankings, k, expected):
    assert [h["id"] for h in rrf(rankings, k)] == expected


def test_rrf_scores_are_summed_reciprocal_ranks():
    fused = rrf([hits("a", "b"), hits("b")], 2, c=60)
    assert fused[0]["id"] == "b" and fused[0]["score"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1]["score"] == pytest.approx(1 / 61)


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("TW-E417", ["tw", "e417"]),
        ("Hello, World!", ["hello", "world"]),
        ("", []),
        ("naïve café", ["naïv", "café"]),
        # stop words go; inflections meet at one stem
        ("How do I run the fixtures?", ["run", "fixtur"]),
        ("Running a fixture", ["run", "fixtur"]),
        ("parametrized parametrizing parametrize", ["parametr", "parametr", "parametr"]),
        ("pytest_addoption hooks", ["pytest_addopt", "hook"]),
        ("what is the", []),
        # a version number is one term; a lone number is a plain term
        ("Python 3.6", ["python", "3_6"]),
        ("pytest 7.2.1 (2022)", ["pytest", "7_2_1", "2022"]),
        ("end.", ["end"]),
    ],
)
def test_analyze(text, tokens):
    assert analyze(text) == tokens
    assert terms(text) == " ".join(tokens)


@pytest.mark.parametrize(
    "title, section, text, expected",
    [
        ("Guide", "Guide > Install", "pip install x", "Guide > Install\npip install x"),  # the section path starts with the title
        ("Guide", "Usage > Flags", "-v", "Guide > Usage > Flags\n-v"),
        ("Guide", "", "body", "Guide\nbody"),
        ("", "", "body", "body"),
        ("report.pdf", "page 3", "body", "report.pdf\nbody"),  # a PDF page number is not a heading
    ],
)
def test_passage_puts_the_heading_path_above_the_text(title, section, text, expected):
    assert passage(title, section, text) == expected


ROWS = [
    {"id": "1", "source": "/kb/a.md", "text": "TW-E417: destination disk is write-protected"},
    {"id": "2", "source": "/kb/a.md", "text": "the disk light blinks when the disk is busy, the disk spins"},
    {"id": "3", "source": "/kb/b.md", "text": "warranty lasts 39 months from purchase"},
    {"id": "4", "source": "/kb/b.md", "text": "the warranty covers the disk but not the cable"},
]


@pytest.mark.parametrize(
    "query, prefix, expected",
    [
        ("TW-E417", None, ["1"]),  # rare identifier: only its chunk
        ("e417", None, ["1"]),
        ("warranty months", None, ["3", "4"]),  # more matched rare terms rank first
        ("How long is the warranty?", None, ["4", "3"]),  # only "warranty" matches; the shorter row ranks first
        ("disk", None, ["2", "4", "1"]),  # term frequency counts; then the shorter row (stop words not counted)
        ("disk", "/kb/b", ["4"]),  # source prefix filter
        ("nothing here", None, []),
    ],
)
def test_bm25_table(query, prefix, expected):
    assert [h["id"] for h in Bm25Index(ROWS).search(query, 5, prefix)] == expected


def test_bm25_returns_the_row_fields_with_a_score():
    (hit,) = Bm25Index(ROWS).search("39", 1)
    assert hit["source"] == "/kb/b.md" and hit["score"] > 0
    assert Bm25Index([]).search("x", 3) == []


def test_bm25_scores_rows_by_their_stored_terms():
    """Rows read back from a collection carry `terms` (heading path included): those are scored, not the text,
    and they are not returned with the hit."""
    rows = [{**r, "terms": terms(passage("Handbook", "Storage" if r["id"] == "3" else "", r["text"]))} for r in ROWS]
    (hit,) = Bm25Index(rows).search("storage", 5)
    assert hit["id"] == "3" and "terms" not in hit


def reference_bm25(rows, query, k1=1.5, b=0.5):
    """Okapi BM25 written out term by term, row by row: what the vectorised index must equal."""
    import math
    from collections import Counter

    docs = [Counter(analyze(r["text"])) for r in rows]
    avg = sum(sum(d.values()) for d in docs) / len(docs)
    scores = {}
    for term in set(analyze(query)):
        df = sum(term in d for d in docs)
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for r, d in zip(rows, docs):
            if term in d:
                tf, length = d[term], sum(d.values())
                scores[r["id"]] = scores.get(r["id"], 0.0) + idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avg))
    return scores


def test_bm25_index_equals_the_formula_on_a_random_corpus():
    import random

    rnd = random.Random(7)
    words = [f"w{i}" for i in range(60)]
    rows = [{"id": str(i), "source": f"/kb/{i % 3}.md", "text": " ".join(rnd.choices(words, weights=range(60, 0, -1), k=rnd.randint(1, 40)))} for i in range(300)]
    index = Bm25Index(rows)
    for _ in range(30):
        query = " ".join(rnd.sample(words, rnd.randint(1, 4)))
        expected = reference_bm25(rows, query)
        got = index.search(query, 10)
        best = sorted(expected.values(), reverse=True)[:10]
        assert [h["score"] for h in got] == pytest.approx(best, rel=1e-5)
        assert all(h["score"] == pytest.approx(expected[h["id"]], rel=1e-5) for h in got)
        in_prefix = index.search(query, 300, "/kb/1")
        assert {h["id"] for h in in_prefix} == {i for i in expected if int(i) % 3 == 1}


@pytest.mark.parametrize(
    "dense, lexical, kwargs, expected",
    [
        (["a", "b"], ["b", "c"], {}, ["b", "a", "c"]),
        # the weight of the dense ranking decides between the two rankings' hits
        (["a", "b"], ["c"], {}, ["a", "c", "b"]),  # equal weights: a and c tie, first appearance wins
        (["a", "b"], ["c"], {"dense_weight": 3.0}, ["a", "b", "c"]),
        (["a", "b"], ["c"], {"dense_weight": 0.5}, ["c", "a", "b"]),
        # full-text hits under the floor (share of the best score) are dropped before fusion
        (["a"], [("c", 10.0), ("d", 4.0)], {"lexical_floor": 0.5}, ["a", "c"]),
        (["a"], [("c", 10.0), ("d", 4.0)], {"lexical_floor": 0.0}, ["a", "c", "d"]),
        ([], [], {}, []),
    ],
)
def test_fuse_table(dense, lexical, kwargs, expected):
    """Fusion by reciprocal rank (`fusion: rrf`); score fusion has its own table below."""
    from lorag.retrieval import fuse

    lex = [{"id": h, "score": 1.0} if isinstance(h, str) else {"id": h[0], "score": h[1]} for h in lexical]
    assert [h["id"] for h in fuse(hits(*dense), lex, 10, **{"fusion": "rrf", "dense_weight": 1.0, **kwargs})] == expected


@pytest.mark.parametrize(
    "dense, lexical, weights, expected",
    [
        # scores normalised per ranking to [0, 1] (min-max over its hits), then a weighted mean
        ([("a", 0.9), ("b", 0.5)], [("b", 8.0), ("c", 2.0)], None, [("a", 0.5), ("b", 0.5), ("c", 0.0)]),  # ties: first appearance
        # how far ahead a hit is counts: c, far ahead in full text, beats b, ranked well in both
        ([("a", 0.62), ("b", 0.60), ("c", 0.30)], [("c", 9.0), ("b", 3.0), ("d", 2.8)], None,
         [("a", 0.5), ("c", 0.5), ("b", 0.5 * 0.9375 + 0.5 * 0.2 / 6.2), ("d", 0.0)]),
        ([("a", 0.9), ("b", 0.5)], [("b", 8.0), ("c", 2.0)], [3.0, 1.0], [("a", 0.75), ("b", 0.25), ("c", 0.0)]),
        # one hit, or equal scores: each counts as the best of its ranking
        ([("a", 0.4)], [("a", 5.0), ("b", 5.0)], None, [("a", 1.0), ("b", 0.5)]),
        ([], [("b", 5.0)], None, [("b", 0.5)]),
        ([], [], None, []),
    ],
)
def test_score_fusion_table(dense, lexical, weights, expected):
    from lorag.retrieval import score_fusion

    ranked = lambda pairs: [{"id": i, "score": s} for i, s in pairs]  # noqa: E731
    got = score_fusion([ranked(dense), ranked(lexical)], 10, weights)
    assert [(h["id"], h["score"]) for h in got] == [(i, pytest.approx(s)) for i, s in expected]


def test_fuse_by_scores_keeps_a_far_ahead_full_text_hit_first_where_rrf_buries_it():
    """The handbook's "TW-E417" case in miniature: the code's own chunk leads full text by far but is
    missing from the dense list; chunks ranked well in both lists win under RRF, not by scores."""
    from lorag.retrieval import fuse

    dense = [{"id": i, "score": s} for i, s in [("reading", 0.66), ("led", 0.52), ("bundle", 0.49), ("clearing", 0.47), ("list2", 0.46),
                                                 ("other", 0.45), ("list", 0.44), ("x", 0.40), ("y", 0.35)]]
    lexical = [{"id": i, "score": s} for i, s in [("list", 5.8), ("about", 4.8), ("clearing", 3.9), ("list2", 3.7), ("led", 3.4)]]
    assert [h["id"] for h in fuse(dense, lexical, 3, 1.0, 0.5, fusion="rrf")] == ["led", "clearing", "list"]
    assert [h["id"] for h in fuse(dense, lexical, 3, 1.0, 0.5, fusion="scores")] == ["list", "reading", "clearing"]
    assert fuse(dense, lexical, 3, 0.5, 0.75, fusion="scores")[0]["id"] == "list"


@pytest.mark.parametrize(
    "sources, k, most, expected",
    [
        ("aaab", 3, None, [0, 1, 2]),
        ("aaab", 3, 2, [0, 1, 3]),
        ("aaab", 3, 1, [0, 3, 1]),  # a source's extra chunks follow the others': still k hits
        ("aaaa", 3, 1, [0, 1, 2]),  # one document: its own order
        ("abab", 2, 1, [0, 1]),
        ("aabbc", 3, 1, [0, 2, 4]),
        ("", 3, 2, []),
    ],
)
def test_per_source_table(sources, k, most, expected):
    from lorag.retrieval import per_source

    rows = [{"id": str(i), "source": s} for i, s in enumerate(sources)]
    assert [int(h["id"]) for h in per_source(rows, k, most)] == expected


@pytest.mark.parametrize(
    "hits, weight, expected",
    [
        # (source, score) best first. Page b's best chunk is second to a's, but b has two more that match.
        ([("a", 0.70), ("b", 0.68), ("b", 0.60), ("b", 0.55), ("c", 0.50)], 0.0, ["a", "b", "c"]),  # best chunk only
        ([("a", 0.70), ("b", 0.68), ("b", 0.60), ("b", 0.55), ("c", 0.50)], 0.1, ["b", "a", "c"]),  # 0.68 + 0.1 * 1.15 > 0.70
        ([("a", 0.70), ("b", 0.68), ("b", 0.60), ("b", 0.55), ("b", 0.54), ("c", 0.50)], 0.01, ["a", "b", "c"]),  # only the next 2 count
        ([("a", 0.90), ("b", 0.30), ("b", 0.29), ("b", 0.28)], 0.1, ["a", "b"]),  # far behind: evidence does not outweigh it
    ],
)
def test_per_source_ranks_documents_by_their_best_chunk_and_the_next_two(hits, weight, expected):
    from lorag.retrieval import per_source

    rows = [{"id": str(i), "source": src, "score": score} for i, (src, score) in enumerate(hits)]
    got = per_source(rows, len(expected), 1, weight)
    assert [h["source"] for h in got] == expected
    b = [h for h in got if h["source"] == "b"]
    assert b[0]["score"] == max(score for src, score in hits if src == "b"), "a document is represented by its best chunk, with its own score"


def test_rank_applies_fusion_then_documents_and_the_cap():
    from lorag.retrieval import rank, search_depth

    dense = [{"id": f"d{i}", "source": src, "score": sc} for i, (src, sc) in enumerate([("a", 0.8), ("b", 0.7), ("b", 0.69), ("c", 0.5)])]
    lexical = [{"id": f"l{i}", "source": src, "score": sc} for i, (src, sc) in enumerate([("c", 9.0), ("b", 4.0), ("a", 1.0)])]
    kb = KnowledgeBaseConfig(name="t", sources=["-"], hybrid=HybridConfig(fusion="rrf", rrf_k=60, dense_weight=1.0, lexical_floor=0.0), source_weight=0.0)
    assert [h["source"] for h in rank(dense, lexical, 3, "dense", kb)] == ["a", "b", "c"]
    assert [h["source"] for h in rank(dense, lexical, 3, "bm25", kb)] == ["c", "b", "a"]
    hybrid = rank(dense, lexical, 3, "hybrid", kb)
    assert len({h["source"] for h in hybrid}) == 3 and hybrid[0]["source"] in "abc"
    uncapped = kb.model_copy(update={"max_per_source": None})
    assert [h["id"] for h in rank(dense, lexical, 4, "dense", uncapped)] == ["d0", "d1", "d2", "d3"], "no cap: scores alone"
    assert search_depth(5, "dense", uncapped) == 5, "nothing reorders: k candidates are enough"
    assert search_depth(5, "hybrid", uncapped) >= 20 and search_depth(20, "dense", kb) == 80


def test_milvus_lite_full_text_matches_stems_and_heading_words(tmp_path):
    """In a real Milvus Lite collection: a chunk is found by the words of its heading path and by other
    forms of its words; a query of stop words finds nothing. After `settle` lorag's own index scores
    it; a write drops that index, and the next settle builds it again with the new row."""
    from lorag.milvus import MilvusStore

    store = MilvusStore(str(tmp_path / "kb.db"))
    store.ensure_collection("c", 2)
    texts = [
        ("Guide > Fixtures", "Use them to share setup code between tests."),
        ("Guide > Plugins", "Running tests in parallel needs the xdist plugin."),
        ("Guide > Plugins", "Plugins register hooks at start-up."),
        ("Guide > Changes", "Support for Python 3.6 was dropped in 7.0."),
        ("Guide > Changes", "Release 3 brought 6 new hooks."),
    ]
    rows = [
        {"id": str(i), "text": t, "source": "/kb/guide.md", "title": "Guide", "section": sec, "chunk_index": i, "start": 0, "end": len(t),
         "doc_hash": "h", "n_chunks": len(texts), "vector": [1.0, float(i)]}
        for i, (sec, t) in enumerate(texts)
    ]
    try:
        assert store.upsert("c", rows) == 5
        store.settle("c")
        top = lambda q: [h["id"] for h in store.candidates("c", None, q, 3)[1]]  # noqa: E731
        assert top("fixtures")[:1] == ["0"], "the heading path is searched with the text"
        assert top("run a test in parallel")[:1] == ["1"], "run / Running, test / tests meet at their stems"
        assert top("how do I do what")[:1] == [], "stop words match nothing"
        assert top("python 3.6")[:1] == ["3"] and "4" not in top("3.6"), "a version number is matched whole"
        (hit,) = store.candidates("c", None, "xdist", 1)[1]
        assert hit["text"] == texts[1][1] and "terms" not in hit, "hits carry the chunk's text, not its indexed terms"
        assert "c" in store._bm25, "settle built the in-process index the searches above used"

        store.upsert("c", [{**rows[0], "id": "5", "text": "Quarantine flaky tests with a marker."}])
        assert "c" not in store._bm25, "a write drops the index"
        store.settle("c")
        assert top("quarantine") == ["5"], "the rebuilt index holds the new row"
    finally:
        store.close()


def test_milvus_lite_bm25_and_lorag_index_score_alike(tmp_path):
    """lorag's in-process index stands in for Milvus Lite's BM25 function only if they agree: on a
    random corpus in a real Lite collection, at the parameters Lite scores with (it keeps its
    defaults, k1 1.5 and b 0.75), the same hits in the same order with the same scores, with and
    without a source prefix. The store's own index uses lorag's b."""
    from lorag.chunks import OUTPUT
    from lorag.milvus import MilvusStore
    from lorag.text import BM25_B, terms

    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(60)]
    store = MilvusStore(str(tmp_path / "kb.db"))
    store.ensure_collection("c", 2)
    rows = []
    for i in range(150):
        text = " ".join(rng.choices(vocab, weights=[1 / (j + 1) for j in range(60)], k=rng.randint(3, 40)))
        source = f"/kb/{'a' if i % 3 else 'b'}/{i}.md"
        rows.append({"id": str(i), "text": text, "source": source, "title": "", "section": "", "chunk_index": 0, "start": 0, "end": len(text),
                     "doc_hash": "h", "n_chunks": 1, "vector": [1.0, float(i)]})
    try:
        store.upsert("c", rows)
        store.settle("c")
        assert store._bm25["c"].b == BM25_B
        index = Bm25Index(store.client.query("c", filter="", limit=len(rows), output_fields=["id", "terms", *OUTPUT]), k1=1.5, b=0.75)
        for q in range(25):
            query = " ".join(rng.sample(vocab, rng.randint(1, 4)))
            for prefix in (None, "/kb/b/"):
                native = store._milvus_full_text("c", terms(query), 8, prefix)
                ours = index.search(query, 8, prefix)
                assert [h["score"] for h in ours] == pytest.approx([h["score"] for h in native], rel=1e-4), query
                tied = {round(h["score"], 4) for h in native if sum(round(g["score"], 4) == round(h["score"], 4) for g in native) > 1}
                assert [h["id"] for h in ours if round(h["score"], 4) not in tied] == [h["id"] for h in native if round(h["score"], 4) not in tied], query
    finally:
        store.close()


def test_the_stem_cache_is_bounded_in_bytes_not_entries():
    """Long distinct tokens (a base64 blob, a minified file) are few entries but many bytes: the
    cache holds at most its byte bound of them, measured by Python's allocator, and every stem,
    before and after the cache starts over, is Snowball's."""
    import random
    import string
    import tracemalloc

    import snowballstemmer

    from lorag.text import StemCache

    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=500)) + "ing" for _ in range(300)]  # 165 KB of stems
    words += ["running", "fixtures", "running"]
    bound = 64 << 10
    cache = StemCache(max_bytes=bound)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for w in words:
            cache(w)  # what stays allocated is what the cache keeps
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.size <= bound and held < 1.5 * bound, f"the cache holds {held / 1024:.0f} KiB, over its {bound // 1024} KiB bound"
    reference = snowballstemmer.stemmer("english")
    stems = [cache(w) for w in words]
    assert stems == [reference.stemWord(w) for w in words] and stems[-3:] == ["run", "fixtur", "run"]
    assert StemCache(max_bytes=1000)("x" * 5000) == "x" * 5000, "a word over the whole bound is stemmed, not kept"


@pytest.mark.parametrize(
    "source, roots, cited",
    [
        ("/docs/html/library/functools.html", ["/docs/html/**/*.html"], "library/functools.html"),  # below the glob's fixed part
        ("/docs/html/index.html", ["/docs/html/**/*.html"], "index.html"),
        ("/docs/html/tutorial/index.html", ["/docs/html/*/index.html"], "tutorial/index.html"),
        ("/kb/notes/a.md", ["/kb/notes/"], "a.md"),  # a directory root
        ("/kb/notes/sub/a.md", ["/kb/notes"], "sub/a.md"),
        ("/kb/faq.md", ["/kb/faq.md"], "faq.md"),  # a file root: its name
        ("/x/docs/index.md", ["/x/docs", "/y/docs", "/z/notes"], "x/docs/index.md"),  # several roots: each led by what tells it apart
        ("/z/notes/index.md", ["/x/docs", "/y/docs", "/z/notes"], "notes/index.md"),
        ("/a/faq.md", ["/a/faq.md", "/b/faq.md"], "a/faq.md"),
        ("s3://bucket/docs/x/y.md", ["s3://bucket/docs/**/*.md"], "x/y.md"),
        ("/elsewhere/secret/p.md", ["/kb/notes"], "p.md"),  # under no root: never the machine's full path
    ],
)
def test_citations_name_a_source_below_its_static_root(source, roots, cited):
    from lorag.retrieval import relative_source

    assert relative_source(source, roots) == cited


def test_citation_names_are_unique_within_a_knowledge_base():
    from lorag.retrieval import relative_source

    roots = ["/srv/site/**/*.html", "/srv/other/docs", "/mnt/b/docs/", "/srv/faq.md"]
    sources = ["/srv/site/index.html", "/srv/site/a/index.html", "/srv/site/a/b/index.html", "/srv/other/docs/index.html",
               "/mnt/b/docs/index.html", "/srv/faq.md"]
    names = [relative_source(s, roots) for s in sources]
    assert len(set(names)) == len(names), names
