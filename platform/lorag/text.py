"""Text analysis for full-text search: what a chunk is searched by, its English terms, and BM25.

What a chunk is searched by (`passage`, `terms`): its heading path ("Title > Section") above its
text, so a chunk deep in a section still matches the words of its headings. Full-text search
uses English analysis done here (`analyze`: lower case, stop words dropped, Snowball stems), on
the chunk and on the query alike, because Milvus Lite's analyzers have no English stemmer: Milvus
then indexes the analysed terms with its plain tokenizer, and every backend scores the same terms.

`Bm25Index` scores full text in the store's process: on Milvus Lite, whose BM25 is pure Python
over every row (about 90 ms a query at 20,000 chunks, against 1-2 ms here), and on Milvus
servers older than 2.5, which have no BM25 function. Milvus servers from 2.5 score it themselves,
with the same `BM25_K1` and `BM25_B`.

This module is the ground floor of retrieval: the ingest pipeline (`lorag.documents`), the store
(`lorag.milvus`) and the search (`lorag.retrieval`) import it, and it imports none of them.
"""

from __future__ import annotations

import functools
import math
import re
import sys
import threading
from collections import Counter
from typing import Any

import numpy as np

# BM25's parameters, for Milvus's BM25 index and lorag's alike: k1 as Milvus Lite's default, b
# chosen on bench/quality.py's dev half (0.5 against the usual 0.75: chunks follow sections, so
# their length says little about how much of them is on topic; docs/benchmarks.md).
BM25_K1, BM25_B = 1.5, 0.5

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

