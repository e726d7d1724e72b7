"""Query-time retrieval: search a knowledge base and shape what it found into citations.

`retrieve` embeds the question and asks the knowledge base's Milvus collection for the top-k
chunks (dense, BM25 or hybrid); `citations` shapes them for the API response (the prompt that
carries them is built by `lorag.prompts`).

Hybrid search fuses the dense and BM25 rankings with reciprocal rank fusion (`rrf`), computed
here rather than in Milvus so every backend fuses the same way. `Bm25Index` is the full-text
fallback for Milvus servers older than 2.5, which have no BM25 function.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from typing import Any

import numpy as np

RRF_K = 60  # the constant of Cormack et al.; damps the weight of the very top ranks
_TOKEN = re.compile(r"\w+", re.UNICODE)


def retrieve(store, embedder, kb, query: str, k: int | None = None, mode: str | None = None, source_prefix: str | None = None) -> list[dict[str, Any]]:
    """Top-k chunks of knowledge base `kb` (a `KnowledgeBaseConfig`) for `query`, best first.

    `k` and `mode` default to the knowledge base's `top_k` and `search`; see `MilvusStore.search`
    for the fields of each hit.
    """
    mode = mode or kb.search
    vector = embedder.embed([query])[0].tolist() if mode != "bm25" else None
    return store.search(kb.collection, vector, query, k or kb.top_k, mode, source_prefix)


def rrf(rankings: list[list[dict[str, Any]]], k: int, c: int = RRF_K) -> list[dict[str, Any]]:
    """Reciprocal rank fusion: each hit scores sum(1 / (c + rank)) over the rankings it is in.

    Args:
        rankings: lists of hits (dicts with an "id"), each best first.
        k: how many fused hits to return.
        c: the RRF constant.

    Returns:
        The top-k hits by fused score, best first; `score` is the fused score. Ties keep the
        order of first appearance (earlier ranking, higher rank).
    """
    fused: dict[str, float] = {}
    first: dict[str, dict[str, Any]] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, 1):
            fused[hit["id"]] = fused.get(hit["id"], 0.0) + 1.0 / (c + rank)
            first.setdefault(hit["id"], hit)
    order = sorted(fused, key=lambda i: -fused[i])  # stable: ties keep first-appearance order
    return [{**first[i], "score": fused[i]} for i in order[:k]]


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; "TW-E417" becomes ["tw", "e417"]."""
    return _TOKEN.findall(text.lower())


class Bm25Index:
    """Okapi BM25 over a fixed set of chunk rows (each with "id", "text", "source"), in memory.

    Postings are numpy arrays of (row, precomputed tf-length weight), so a query costs one
    vectorised add per query term: milliseconds at 100k chunks, where a Python loop over the
    postings of a common word took most of a second.

    Args:
        rows: the chunks; every other field is returned with the hit.
        k1, b: the usual BM25 parameters.
    """

    def __init__(self, rows: list[dict[str, Any]], k1: float = 1.2, b: float = 0.75):
        self.rows, self.k1, self.b = rows, k1, b
        docs: dict[str, list[int]] = {}
        freqs: dict[str, list[int]] = {}
        lengths = np.zeros(len(rows), dtype=np.float64)
        for i, row in enumerate(rows):
            terms = Counter(tokenize(row["text"]))
            lengths[i] = sum(terms.values())
            for term, tf in terms.items():
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
        for term in set(tokenize(query)):
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
        return [{**self.rows[i], "score": float(scores[i])} for i in order]

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


def relative_source(source: str, roots: list[str]) -> str:
    """`source` relative to the first of `roots` it lies under (a file root: its name); otherwise
    its file name only, never a full path of the machine that ingested it."""
    for root in roots:
        base = root.rstrip("/")
        if source == base:
            return base.rsplit("/", 1)[-1]
        if base and source.startswith(base + "/"):
            return source[len(base) + 1 :]
    return source.rsplit("/", 1)[-1]


def display_path(path: str) -> str:
    """A source path relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
