"""Query-time retrieval: search a knowledge base and put numbered sources into the prompt.

`retrieve` embeds the question and asks the knowledge base's Milvus collection for the top-k
chunks (dense, BM25 or hybrid); `augment` rewrites the last user message to carry them as numbered
sources the model is asked to cite as [n]; `citations` shapes them for the API response.

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

RRF_K = 60  # the constant of Cormack et al.; damps the weight of the very top ranks
_TOKEN = re.compile(r"\w+", re.UNICODE)

INSTRUCTION = (
    "Answer the question using the numbered sources below. Cite the sources you use with their "
    "number in brackets, like [1]. If the sources do not contain the answer, say so."
)


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

    Args:
        rows: the chunks; every other field is returned with the hit.
        k1, b: the usual BM25 parameters.
    """

    def __init__(self, rows: list[dict[str, Any]], k1: float = 1.2, b: float = 0.75):
        self.rows, self.k1, self.b = rows, k1, b
        self.postings: dict[str, list[tuple[int, int]]] = {}
        self.lengths = []
        for i, row in enumerate(rows):
            terms = Counter(tokenize(row["text"]))
            self.lengths.append(sum(terms.values()))
            for term, tf in terms.items():
                self.postings.setdefault(term, []).append((i, tf))
        self.avg = sum(self.lengths) / len(self.lengths) if self.lengths else 0.0

    def search(self, query: str, k: int, source_prefix: str | None = None) -> list[dict[str, Any]]:
        n = len(self.rows)
        scores: dict[int, float] = {}
        for term in set(tokenize(query)):
            posting = self.postings.get(term, [])
            idf = math.log(1 + (n - len(posting) + 0.5) / (len(posting) + 0.5))
            for i, tf in posting:
                norm = tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avg))
                scores[i] = scores.get(i, 0.0) + idf * norm
        hits = [i for i in sorted(scores, key=lambda i: -scores[i]) if not source_prefix or self.rows[i]["source"].startswith(source_prefix)]
        return [{**self.rows[i], "score": scores[i]} for i in hits[:k]]


def question(messages: list[dict[str, str]]) -> str:
    """The text retrieval searches for: the last user message ("" if there is none)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def augment(messages: list[dict[str, str]], hits: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Return `messages` with the last user message wrapped in the numbered sources.

    With no hits the messages are returned unchanged.
    """
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not hits or not users:
        return messages
    last = users[-1]
    content = augment_text(messages[last]["content"], hits, "Question: ")
    return [*messages[:last], {"role": "user", "content": content}, *messages[last + 1 :]]


def augment_text(prompt: str, hits: list[dict[str, Any]], lead: str = "") -> str:
    """`prompt` preceded by the instruction and the numbered sources (unchanged with no hits)."""
    if not hits:
        return prompt
    context = "\n\n".join(f"[{n}] {h['title']}\n{h['text']}" for n, h in enumerate(hits, 1))
    return f"{INSTRUCTION}\n\nSources:\n{context}\n\n{lead}{prompt}"


def citations(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `sources` list of a response: one entry per numbered source, in prompt order."""
    return [
        {
            "index": n,
            "source": h["source"],
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


def display_path(path: str) -> str:
    """A source path relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
