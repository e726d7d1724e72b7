"""Query-time retrieval: search a knowledge base and shape what it found into citations.

`retrieve` embeds the question and asks the knowledge base's Milvus collection for the top-k
chunks (dense, BM25 or hybrid); `citations` shapes them for the API response (the prompt that
carries them is built by `lorag.prompts`).

Hybrid search fuses the dense and BM25 rankings by weighted reciprocal rank (`rrf`, the default)
or by their normalised scores (`score_fusion`), computed here rather than in Milvus so every
backend fuses the same way (`rank`); every mode then ranks documents by their best chunk and the
next two (`per_source`), one chunk per document before a second of any. `Bm25Index` scores full
text in the store's process: on Milvus Lite, whose BM25 is pure Python over every row (about 90
ms a query at 20,000 chunks, against 1-2 ms here), and on Milvus servers older than 2.5, which
have no BM25 function. Milvus servers from 2.5 score it themselves.

What a chunk is searched by (`passage`, `terms`): its heading path ("Title > Section") above its
text, so a chunk deep in a section still matches the words of its headings. Full-text search
uses English analysis done here (`analyze`: lower case, stop words dropped, Snowball stems), on
the chunk and on the query alike, because Milvus Lite's analyzers have no English stemmer: Milvus
then indexes the analysed terms with its plain tokenizer, and every backend scores the same terms.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import threading
from collections import Counter
from typing import Any

import numpy as np

# Ranking settings: the best of a sweep on bench/quality.py's tuning corpus (the dev half of its
# questions), then reported on held-out documentation sets (docs/benchmarks.md, "Retrieval quality").
RRF_K = 30  # hybrid with rrf: the RRF constant; it damps the weight of the very top ranks
DENSE_WEIGHT = 1.5  # hybrid: the dense ranking's weight in the fusion (full text: 1)
LEXICAL_FLOOR = 0.5  # hybrid: keep full-text hits scoring at least this share of the best one
FUSION = "rrf"  # hybrid: "rrf" (reciprocal ranks) or "scores" (normalised scores, `score_fusion`)
# BM25's parameters, for Milvus's BM25 index and lorag's alike: k1 as Milvus Lite's default, b
# chosen on bench/quality.py's dev half (0.5 against the usual 0.75: chunks follow sections, so
# their length says little about how much of them is on topic; docs/benchmarks.md).
BM25_K1, BM25_B = 1.5, 0.5
MAX_PER_SOURCE: int | None = 1  # every mode: one chunk per document before a second of any (see `per_source`)
SOURCE_WEIGHT = 0.1  # every mode: what a document's next chunks add to its best one's score when documents are ranked (`per_source`)
SOURCE_CHUNKS = 2  # how many of a document's next chunks count towards its rank
SEARCH_DEPTH = 50  # candidates each ranking gives a fused or per-source search (`search_depth`)
# A dotted number ("3.6", "7.2.1") is one token, or Milvus's tokenizer and ours would split it into
# digits that match every number; other tokens are runs of word characters.
_TOKEN = re.compile(r"\d+(?:\.\d+)+|\w+", re.UNICODE)
# Lucene's English stop words plus the words a question is made of ("how do I ...?"): they match
# everywhere, so in BM25 they only add noise to the ranking.
STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they this to was "
    "will with i me my we our you your he she him her his its what which who whom whose how why when where do does did "
    "done doing can could should would may might must shall am were been being has have had having so than too very just "
    "about also any some all each other own same only both more most from up out over under again further once here".split()
)


def retrieve(store, embedder, kb, query: str, k: int | None = None, mode: str | None = None, source_prefix: str | None = None) -> list[dict[str, Any]]:
    """Top-k chunks of knowledge base `kb` (a `KnowledgeBaseConfig`) for `query`, best first.

    `k` and `mode` default to the knowledge base's `top_k` and `search`; see `MilvusStore.search`
    for the fields of each hit.
    """
    mode = mode or kb.search
    vector = embedder.embed([query])[0].tolist() if mode != "bm25" else None
    return store.search(kb.collection, vector, query, k or kb.top_k, mode, source_prefix, kb.ranking_options())


def passage(title: str, section: str, text: str) -> str:
    """What a chunk is embedded and full-text indexed as: its heading path above its text.

    The path is `section` ("Title > Heading > Subheading" from the chunker), led by `title` when
    the section does not already start with it; a PDF's "page N" section is not a heading.
    """
    if re.fullmatch(r"page \d+", section or ""):
        section = ""
    head = section if (section and (not title or section.startswith(title))) else " > ".join(p for p in (title, section) if p)
    return f"{head}\n{text}" if head else text


STEM_CACHE_BYTES = 32 << 20  # what the stem cache may hold, in bytes of words and stems (`StemCache`)


class StemCache:
    """Snowball (Porter 2) stems of the words seen before, holding at most `max_bytes`.

    Analysis stems every token of every chunk and query, and most tokens repeat, so stems are
    cached. The bound is in bytes (Python's size of the word and the stem, plus a dict entry), not
    entries: one token can be a megabyte long. When the next stem would not fit, the cache starts
    over, cheaper than LRU bookkeeping on every hit; the frequent words are back within a chunk.
    The stemmer itself keeps state while it works, so misses take a lock.
    """

    ENTRY_BYTES = 100  # what a dict entry costs beside its two strings (hash, pointers, table slack)

    def __init__(self, max_bytes: int = STEM_CACHE_BYTES):
        import snowballstemmer

        self.max_bytes, self.size, self.stems = max_bytes, 0, {}
        self._stem = snowballstemmer.stemmer("english").stemWord
        self._lock = threading.Lock()

    def __call__(self, word: str) -> str:
        return self.stems.get(word) or self.miss(word)

    def miss(self, word: str) -> str:
        """Stem `word` and remember it (unless it alone is over the bound)."""
        with self._lock:
            if word in self.stems:
                return self.stems[word]
            stem = self._stem(word)
            cost = sys.getsizeof(word) + sys.getsizeof(stem) + self.ENTRY_BYTES
            if cost <= self.max_bytes:
                if self.size + cost > self.max_bytes:
                    self.stems, self.size = {}, 0  # a new dict: readers holding the old one still get right stems
                self.stems[word] = stem
                self.size += cost
            return stem


@functools.lru_cache(maxsize=1)
def _stemmer() -> StemCache:
    return StemCache()


def analyze(text: str) -> list[str]:
    """English analysis for full-text search: lower-cased word tokens, stop words dropped, each
    reduced to its Snowball (Porter 2) stem. "Running the fixtures" -> ["run", "fixtur"].

    A version number stays one term, joined by "_" (Milvus keeps "3_6" whole and splits "3.6"):
    "Python 3.6" -> ["python", "3_6"], which "3.6.2" does not match."""
    cache = _stemmer()
    stems = cache.stems  # hits are a dict lookup; `miss` stems the rest
    return [t.replace(".", "_") if "." in t else (stems.get(t) or cache.miss(t)) for t in _TOKEN.findall(text.lower()) if t not in STOP_WORDS]


def terms(text: str) -> str:
    """`analyze(text)` as one space-separated string: what Milvus's BM25 function indexes and searches."""
    return " ".join(analyze(text))


def rrf(rankings: list[list[dict[str, Any]]], k: int, c: int = RRF_K, weights: list[float] | None = None) -> list[dict[str, Any]]:
    """Reciprocal rank fusion: each hit scores sum(weight / (c + rank)) over the rankings it is in.

    Args:
        rankings: lists of hits (dicts with an "id"), each best first.
        k: how many fused hits to return.
        c: the RRF constant.
        weights: one per ranking (default: all 1).

    Returns:
        The top-k hits by fused score, best first; `score` is the fused score. Ties keep the
        order of first appearance (earlier ranking, higher rank).
    """
    fused: dict[str, float] = {}
    first: dict[str, dict[str, Any]] = {}
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings)):
        for rank, hit in enumerate(ranking, 1):
            fused[hit["id"]] = fused.get(hit["id"], 0.0) + weight / (c + rank)
            first.setdefault(hit["id"], hit)
    order = sorted(fused, key=lambda i: -fused[i])  # stable: ties keep first-appearance order
    return [{**first[i], "score": fused[i]} for i in order[:k]]


def fuse(dense: list[dict[str, Any]], lexical: list[dict[str, Any]], k: int, dense_weight: float = DENSE_WEIGHT,
         lexical_floor: float = LEXICAL_FLOOR, c: int = RRF_K, fusion: str = FUSION) -> list[dict[str, Any]]:
    """Hybrid search's ranking: the dense and full-text rankings fused by weighted RRF (`fusion`
    "rrf") or by their scores (`fusion` "scores", see `score_fusion`).

    Full-text hits scoring under `lexical_floor` times the best one match only common words; in
    a fused ranking they would outvote the one chunk that holds a rare, exact term, so they are
    dropped first. The defaults (docs/benchmarks.md, "Retrieval quality"): weighted RRF (k 30, dense
    weight 1.5, floor 0.5), the best of the sweep on bench/quality.py's tuning corpus (pytest's
    docs, with lorag's page ranking and per-page cap), which also holds on the held-out sets
    (Django, Git, Docker), where score fusion tuned on one corpus did not. A knowledge base's
    `hybrid` settings override them; `fusion: scores` stays for knowledge bases of exact codes
    (bench/fusion.py: the one chunk holding an error code, far ahead in full text, stays first).
    """
    if lexical:
        lexical = [h for h in lexical if h["score"] >= lexical_floor * lexical[0]["score"]]
    if fusion == "scores":
        return score_fusion([dense, lexical], k, [dense_weight, 1.0])
    return rrf([dense, lexical], k, c, [dense_weight, 1.0])


def score_fusion(rankings: list[list[dict[str, Any]]], k: int, weights: list[float] | None = None) -> list[dict[str, Any]]:
    """Relative score fusion: each ranking's scores min-max normalised to [0, 1] over its own hits,
    then a weighted mean (a hit missing from a ranking scores 0 there).

    Unlike RRF it keeps how far ahead a hit is: a chunk whose rare exact term puts it far above
    every other full-text hit stays ahead of chunks that rank merely well in both lists.

    Returns:
        The top-k hits by fused score (in [0, 1]), best first; ties keep first-appearance order.
    """
    weights = weights or [1.0] * len(rankings)
    fused: dict[str, float] = {}
    first: dict[str, dict[str, Any]] = {}
    for ranking, weight in zip(rankings, weights):
        if not ranking:
            continue
        scores = [float(h["score"]) for h in ranking]
        low, high = min(scores), max(scores)
        for hit, score in zip(ranking, scores):
            norm = (score - low) / (high - low) if high > low else 1.0
            fused[hit["id"]] = fused.get(hit["id"], 0.0) + weight * norm / sum(weights)
            first.setdefault(hit["id"], hit)
    order = sorted(fused, key=lambda i: -fused[i])
    return [{**first[i], "score": fused[i]} for i in order[:k]]


def per_source(hits: list[dict[str, Any]], k: int, most: int | None, source_weight: float = 0.0) -> list[dict[str, Any]]:
    """The top `k` of `hits` with at most `most` chunks of any one source ahead of other sources'
    chunks (None: the order as it is), so near-duplicate chunks of one page cannot fill every slot.

    With `source_weight`, sources are ranked first: by their best chunk's score plus
    `source_weight` times the scores of their next `SOURCE_CHUNKS` chunks among `hits` (a page
    that several chunks match is more likely about the question than one with a single lucky
    chunk), and each source's chunks then come in that order.

    The cap only reorders: a source's chunks beyond `most` follow the others' in their own order,
    so a knowledge base of one document still returns k chunks.
    """
    if not most:
        return hits[:k]
    if source_weight:
        scores: dict[str, list[float]] = {}
        for h in hits:
            scores.setdefault(h["source"], []).append(float(h["score"]))
        rank = {src: s[0] + source_weight * sum(s[1 : 1 + SOURCE_CHUNKS]) for src, s in scores.items()}
        hits = sorted(hits, key=lambda h: -rank[h["source"]])  # stable: a source's chunks keep their order
    first, later, seen = [], [], Counter()
    for h in hits:
        seen[h["source"]] += 1
        (first if seen[h["source"]] <= most else later).append(h)
        if len(first) == k:
            break
    return (first + later)[:k]


def search_depth(k: int, mode: str, options: dict[str, Any]) -> int:
    """How many candidates each ranking gives a search for `k` hits: k when nothing reorders them,
    else at least `SEARCH_DEPTH` (the fusion and the per-source ranking need candidates beyond k)."""
    if mode != "hybrid" and not options["max_per_source"]:
        return k
    return max(SEARCH_DEPTH, 4 * k)


def rank(dense: list[dict[str, Any]], lexical: list[dict[str, Any]], k: int, mode: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """A search's top k from its candidates (each ranking best first, `search_depth` long): the
    dense or full-text ranking, or both fused (`fuse`), then ranked by source (`per_source`).

    Args:
        options: every key of `ranking_defaults()`, e.g. a knowledge base's `ranking_options()` over them.
    """
    if mode == "dense":
        hits = dense
    elif mode == "bm25":
        hits = lexical
    else:
        hits = fuse(dense, lexical, len(dense) + len(lexical), options["dense_weight"], options["lexical_floor"], options["rrf_k"], options["fusion"])
    return per_source(hits, k, options["max_per_source"], options["source_weight"])


def ranking_defaults() -> dict[str, Any]:
    """lorag's ranking settings, which a knowledge base's `hybrid`, `max_per_source` and `source_weight` override."""
    return {"dense_weight": DENSE_WEIGHT, "lexical_floor": LEXICAL_FLOOR, "rrf_k": RRF_K, "fusion": FUSION,
            "max_per_source": MAX_PER_SOURCE, "source_weight": SOURCE_WEIGHT}


class Bm25Index:
    """Okapi BM25 over a fixed set of chunk rows (each with "id", "terms", "source"), in memory.

    Rows are scored by their `terms` (see `terms`; rows without them: `analyze` of their "text"),
    queries by `analyze`, so this fallback ranks like Milvus's own BM25 function.

    Postings are numpy arrays of (row, precomputed tf-length weight), so a query costs one
    vectorised add per query term: milliseconds at 100k chunks, where a Python loop over the
    postings of a common word took most of a second.

    Args:
        rows: the chunks; every other field is returned with the hit.
        k1, b: the usual BM25 parameters.
    """

    def __init__(self, rows: list[dict[str, Any]], k1: float = BM25_K1, b: float = BM25_B):
        self.rows, self.k1, self.b = rows, k1, b
        docs: dict[str, list[int]] = {}
        freqs: dict[str, list[int]] = {}
        lengths = np.zeros(len(rows), dtype=np.float64)
        for i, row in enumerate(rows):
            counts = Counter(row["terms"].split() if row.get("terms") is not None else analyze(row["text"]))
            lengths[i] = sum(counts.values())
            for term, tf in counts.items():
                docs.setdefault(term, []).append(i)
                freqs.setdefault(term, []).append(tf)
        self.avg = float(lengths.mean()) if len(rows) else 0.0
        norm = k1 * (1 - b + b * lengths / (self.avg or 1.0))  # per row
        self.postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for term, ids in docs.items():
            rows_ = np.asarray(ids, dtype=np.int32)
            tf = np.asarray(freqs[term], dtype=np.float64)
            self.postings[term] = (rows_, (tf * (k1 + 1) / (tf + norm[rows_])).astype(np.float32))
        self._prefixes: dict[str, np.ndarray] = {}  # source prefix -> row mask, for repeated filters

    def search(self, query: str, k: int, source_prefix: str | None = None) -> list[dict[str, Any]]:
        n = len(self.rows)
        scores = np.zeros(n, dtype=np.float64)
        for term in set(analyze(query)):
            if term in self.postings:
                rows, weight = self.postings[term]
                idf = math.log(1 + (n - len(rows) + 0.5) / (len(rows) + 0.5))  # > 0, so every matching row scores > 0
                scores[rows] += idf * weight
        if source_prefix:
            scores[~self._prefix_mask(source_prefix)] = 0.0
        found = np.flatnonzero(scores > 0)
        if len(found) > k:  # keep the top k (and rows tied with the k-th), then order only those
            kth = np.partition(scores[found], len(found) - k)[len(found) - k]
            found = found[scores[found] >= kth]
        order = found[np.argsort(-scores[found], kind="stable")][:k]  # ties: earlier row first
        return [{**{f: v for f, v in self.rows[i].items() if f != "terms"}, "score": float(scores[i])} for i in order]

    def _prefix_mask(self, prefix: str) -> np.ndarray:
        if prefix not in self._prefixes:
            if len(self._prefixes) >= 64:
                self._prefixes.clear()
            self._prefixes[prefix] = np.fromiter((r["source"].startswith(prefix) for r in self.rows), dtype=bool, count=len(self.rows))
        return self._prefixes[prefix]


def citations(hits: list[dict[str, Any]], roots: list[str] = ()) -> list[dict[str, Any]]:
    """The `sources` list of a response: one entry per numbered source, in prompt order.

    Args:
        hits: the retrieved chunks, as given to the prompt.
        roots: the knowledge base's source roots (`sources` of its config); a chunk's `source` is
            shown relative to the root it lies under, so responses never reveal the server's paths.
    """
    return [
        {
            "index": n,
            "source": relative_source(h["source"], roots),
            "title": h["title"],
            "section": h.get("section", ""),
            "chunk_index": int(h["chunk_index"]),
            "start": int(h["start"]),
            "end": int(h["end"]),
            "score": round(float(h["score"]), 4),
            "text": h["text"],
        }
        for n, h in enumerate(hits, 1)
    ]


def static_root(spec: str) -> str:
    """The fixed part of a source spec: a glob up to its first component with a wildcard
    ("/docs/html/**/*.html" -> "/docs/html"), anything else as it is (a directory or a file)."""
    parts = spec.replace("\\", "/").split("/")
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), None)
    return "/".join(parts[:fixed]) if fixed is not None else spec


def root_labels(roots: list[str]) -> list[str]:
    """What names each source root's documents in citations: nothing with one root (paths are
    relative to it), else the shortest path suffix of its static root that no other root shares,
    so two roots holding `index.html` still cite two different paths."""
    bases = [static_root(r).replace("\\", "/").rstrip("/") for r in roots]
    if len(bases) < 2:
        return [""] * len(bases)
    parts = [b.split("/") for b in bases]
    labels = []
    for i, mine in enumerate(parts):
        for n in range(1, len(mine) + 1):
            label = "/".join(mine[-n:])
            if all(j == i or "/".join(other[-n:]) != label for j, other in enumerate(parts)):
                break
        labels.append(label.lstrip("/"))
    return labels


def relative_source(source: str, roots: list[str]) -> str:
    """How citations name `source`: its path relative to the static root of the source it came
    from (`static_root`: a directory, or a glob's part before its first wildcard), led by that
    root's label when the knowledge base has several (`root_labels`); a file source by its name.
    Unique within a knowledge base, and never a full path of the machine that ingested it (a
    source under no root: its file name)."""
    for root, label in zip(roots, root_labels(roots)):
        base = static_root(root).rstrip("/")
        if source == base:
            return label or base.rsplit("/", 1)[-1]
        if base and source.startswith(base + "/"):
            rel = source[len(base) + 1 :]
            return f"{label}/{rel}" if label else rel
    return source.rsplit("/", 1)[-1]


def display_path(path: str) -> str:
    """A source path relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
