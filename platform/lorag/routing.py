"""`model: "auto"`: pick the adapter (and so its knowledge base) for a request without asking the generator.

Each servable adapter has a profile: its `description` (config, or the one saved with the adapter)
and the questions it was trained on (saved with the adapter at training time, so a replica on
another node needs no dataset file). A query is embedded once with the knowledge bases' embedder
and scored against each profile: the best of its cosine similarity to the description and to the
centroid (the normalised mean) of the training questions. The best-scoring adapter answers when
its score reaches the threshold; below it no adapter fits and the base model answers.

The embedder and threshold come from the config (`embedder`, `serve.route_threshold`);
`lorag eval --routing` measures both on a labelled set before they are trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

AUTO = "auto"  # the `model` that asks lorag to route
MAX_QUESTIONS = 512  # training questions kept per adapter for its profile


@dataclass(frozen=True)
class Profile:
    """What an adapter is for: a description and/or example questions (at least one)."""

    name: str
    description: str | None = None
    questions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Route:
    """A routing decision: the adapter name (None: the base model), its score and every adapter's."""

    adapter: str | None
    score: float
    scores: dict[str, float]


class Router:
    """Scores queries against adapter profiles (see the module docstring).

    Args:
        embed: `list[str] -> array (n, d)` of L2-normalised embeddings (`Embedder.embed`).
        profiles: one per candidate adapter; one with neither description nor questions is skipped.
        threshold: the least score that routes to an adapter.
    """

    def __init__(self, embed, profiles: list[Profile], threshold: float):
        self.embed, self.threshold = embed, threshold
        self.names: list[str] = []
        vectors: list[np.ndarray] = []
        for p in profiles:
            rows = []
            if p.description:
                rows.append(_unit(np.asarray(embed([p.description]))[0]))
            if p.questions:
                rows.append(_unit(np.asarray(embed(p.questions)).mean(axis=0)))
            if rows:
                self.names.append(p.name)
                vectors.append(np.stack(rows))
        self._vectors = vectors

    def route(self, query: str, allowed: set[str] | frozenset[str] | None = None) -> Route:
        """The adapter for `query`, or None (base model) when none scores `threshold` or more.

        Args:
            allowed: only these adapters are candidates (an API key's models); None: every one.
        """
        names = [(name, v) for name, v in zip(self.names, self._vectors) if allowed is None or name in allowed]
        if not names:
            return Route(None, 0.0, {})
        q = _unit(np.asarray(self.embed([query]))[0])
        scores = {name: float((v @ q).max()) for name, v in names}
        best = max(scores, key=scores.get)
        return Route(best if scores[best] >= self.threshold else None, scores[best], scores)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n else v


def training_questions(examples: list[dict]) -> list[str]:
    """The last user turn of each training example (`lorag.examples.load_examples` records), at most
    `MAX_QUESTIONS`, each clipped to 1,000 characters: what is saved with an adapter for its
    routing profile."""
    out = []
    for ex in examples:
        text = next((m["content"] for m in reversed(ex["messages"]) if m["role"] == "user"), None)
        if text and text.strip():
            out.append(text.strip()[:1000])
    return out[:MAX_QUESTIONS]


def adapter_profiles(cfg, store, names: list[str] | None = None) -> tuple[list[Profile], tuple]:
    """The routing profile of each adapter in the store (or of `names`), from its newest version.

    The config's `description` wins over the one saved with the adapter; the questions are those
    saved at training time. Returns (profiles, a key that changes when a new version is saved).
    """
    from lorag.adapters import AdapterNotFoundError

    profiles, key = [], []
    for name in names if names is not None else store.names():
        try:
            bound = store.binding(cfg, name)
        except (AdapterNotFoundError, ValueError):
            continue
        profiles.append(Profile(name, bound.description, bound.questions))
        key.append((name, bound.number, bound.description))
    return profiles, tuple(key)
