"""Reciprocal rank fusion and the in-process BM25 fallback, as tables of cases (no Milvus, no model)."""

import pytest

from lorag.retrieval import Bm25Index, rrf, tokenize


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
    [("TW-E417", ["tw", "e417"]), ("Hello, World!", ["hello", "world"]), ("", []), ("naïve café", ["naïve", "café"])],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


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
        ("disk", None, ["2", "1", "4"]),  # term frequency saturates but still counts
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


def reference_bm25(rows, query, k1=1.2, b=0.75):
    """Okapi BM25 written out term by term, row by row: what the vectorised index must equal."""
    import math
    from collections import Counter

    docs = [Counter(tokenize(r["text"])) for r in rows]
    avg = sum(sum(d.values()) for d in docs) / len(docs)
    scores = {}
    for term in set(tokenize(query)):
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
