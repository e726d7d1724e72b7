"""Query-time retrieval: search a knowledge base and put numbered sources into the prompt.

`retrieve` embeds the question and asks the knowledge base's Milvus collection for the top-k
chunks; `augment` rewrites the last user message to carry them as numbered sources the model is
asked to cite as [n]; `citations` shapes them for the API response.
"""

from __future__ import annotations

import os
from typing import Any

INSTRUCTION = (
    "Answer the question using the numbered sources below. Cite the sources you use with their "
    "number in brackets, like [1]. If the sources do not contain the answer, say so."
)


def retrieve(store, embedder, collection: str, query: str, k: int) -> list[dict[str, Any]]:
    """Top-k chunks for `query`, best first (see `MilvusStore.search` for the fields)."""
    vector = embedder.embed([query])[0].tolist()
    return store.search(collection, vector, k)


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
    context = "\n\n".join(f"[{n}] {h['title']}\n{h['text']}" for n, h in enumerate(hits, 1))
    content = f"{INSTRUCTION}\n\nSources:\n{context}\n\nQuestion: {messages[last]['content']}"
    return [*messages[:last], {"role": "user", "content": content}, *messages[last + 1 :]]


def citations(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `sources` list of a response: one entry per numbered source, in prompt order."""
    return [
        {
            "index": n,
            "source": h["source"],
            "title": h["title"],
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
