"""Query-time retrieval: search a knowledge base and shape what it found into citations.

`search` (and `asearch`, its form for an event loop) is the one retrieval call: the endpoint,
training, evaluation, `lorag kb search` and the benchmarks all use it. It embeds the question,
asks the store for each ranking's candidates (`MilvusStore.candidates`: dense and full text,
`search_depth` long) and ranks them here (`rank`), so every backend ranks the same way and the
store only stores. `citations` shapes the hits for the API response (the prompt that carries
them is built by `lorag.prompts`).

Hybrid search fuses the dense and BM25 rankings by weighted reciprocal rank (`rrf`, the default)
or by their normalised scores (`score_fusion`); every mode then ranks documents by their best
chunk and the next two (`per_source`), one chunk per document before a second of any. The
settings are a knowledge base's `hybrid`, `max_per_source` and `source_weight`
(`lorag.sections.KnowledgeBaseConfig`, whose defaults are the tuned ones). Text analysis (terms,
stems, BM25) is `lorag.text`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from lorag.chunks import Hit
from lorag.sections import HybridConfig, KnowledgeBaseConfig

SOURCE_CHUNKS = 2  # how many of a document's next chunks count towards its rank (`per_source`)
SEARCH_DEPTH = 50  # candidates each ranking gives a fused or per-source search (`search_depth`)
_HYBRID = HybridConfig()  # the tuned defaults, for the fusion functions called on their own


@dataclass(frozen=True)
class Query:
    """One search, resolved against its knowledge base: what to ask the store and how to rank it."""

    kb: KnowledgeBaseConfig
    text: str
    k: int
    mode: str
    source_prefix: str | None = None

    @classmethod
    def of(cls, kb: KnowledgeBaseConfig, text: str, k: int | None = None, mode: str | None = None, source_prefix: str | None = None) -> "Query":
        mode = mode or kb.search
        if mode not in ("dense", "bm25", "hybrid"):
            raise ValueError(f"search mode must be dense, bm25 or hybrid, not {mode!r}")
        return cls(kb, text, k or kb.top_k, mode, source_prefix)

    @property
    def needs_vector(self) -> bool:
        return self.mode != "bm25"

    def candidates_args(self, vector: list[float] | None) -> tuple:
        """The arguments of `MilvusStore.candidates` for this search."""
        depth = search_depth(self.k, self.mode, self.kb)
        return (self.kb.collection, vector, self.text if self.mode != "dense" else None, depth, self.source_prefix)

    def rank(self, candidates: tuple[list[Hit], list[Hit]]) -> list[Hit]:
        dense, lexical = candidates
        return rank(dense, lexical, self.k, self.mode, self.kb)


def search(store, kb: KnowledgeBaseConfig, query: str, embedder, k: int | None = None, mode: str | None = None,
           source_prefix: str | None = None) -> list[Hit]:
    """Top-k chunks of knowledge base `kb` for `query`, best first.

    Args:
        store: the knowledge base's store (`lorag.handle.open_store`).
        embedder: the knowledge base's embedder (`lorag.embed.Embedder`); unused for bm25.
        k, mode: default to the knowledge base's `top_k` and `search`.
        source_prefix: only chunks whose source path starts with this.
    """
    q = Query.of(kb, query, k, mode, source_prefix)
    vector = embedder.embed([query])[0].tolist() if q.needs_vector else None
    return q.rank(store.candidates(*q.candidates_args(vector)))


async def asearch(store, kb: KnowledgeBaseConfig, query: str, embed: Callable[[str], Awaitable[list[float]]], k: int | None = None,
                  mode: str | None = None, source_prefix: str | None = None) -> list[Hit]:
    """`search` for an event loop (a Serve replica): `embed` is awaited for the query's vector and the
    store is asked without blocking the loop (`StoreHandle.acandidates`)."""
    q = Query.of(kb, query, k, mode, source_prefix)
    vector = await embed(query) if q.needs_vector else None
    return q.rank(await store.acandidates(*q.candidates_args(vector)))


def rrf(rankings: list[list[dict[str, Any]]], k: int, c: int = _HYBRID.rrf_k, weights: list[float] | None = None) -> list[dict[str, Any]]:
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


def fuse(dense: list[dict[str, Any]], lexical: list[dict[str, Any]], k: int, dense_weight: float = _HYBRID.dense_weight,
         lexical_floor: float = _HYBRID.lexical_floor, c: int = _HYBRID.rrf_k, fusion: str = _HYBRID.fusion) -> list[dict[str, Any]]:
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


def search_depth(k: int, mode: str, kb: KnowledgeBaseConfig) -> int:
    """How many candidates each ranking gives a search for `k` hits: k when nothing reorders them,
    else at least `SEARCH_DEPTH` (the fusion and the per-source ranking need candidates beyond k)."""
    if mode != "hybrid" and not kb.max_per_source:
        return k
    return max(SEARCH_DEPTH, 4 * k)


def rank(dense: list[Hit], lexical: list[Hit], k: int, mode: str, kb: KnowledgeBaseConfig) -> list[Hit]:
    """A search's top k from its candidates (each ranking best first, `search_depth` long): the
    dense or full-text ranking, or both fused by the knowledge base's `hybrid` settings (`fuse`),
    then ranked by source (`per_source`, by its `max_per_source` and `source_weight`)."""
    if mode == "dense":
        hits = dense
    elif mode == "bm25":
        hits = lexical
    else:
        h = kb.hybrid
        hits = fuse(dense, lexical, len(dense) + len(lexical), h.dense_weight, h.lexical_floor, h.rrf_k, h.fusion)
    return per_source(hits, k, kb.max_per_source, kb.source_weight)


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
