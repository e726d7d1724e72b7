"""Milvus access for knowledge bases: the collection schema, upserts, counts and vector search.

`MilvusStore` wraps one `pymilvus.MilvusClient`. Milvus Lite (a local `*.db` file) may be opened by
one process at a time, so `open_store` routes Lite access through a single named Ray actor per
file when Ray is running (ingest jobs, Serve replicas and the CLI then share one owner), and opens
the file in-process otherwise. A Milvus server URI (`http://host:19530`) is opened directly by
every caller.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

ACTOR_NAMESPACE = "lorag"
TEXT_MAX = 16384
SOURCE_MAX = 2048


def is_lite(uri: str) -> bool:
    """Milvus Lite URIs are local file paths; servers are reached over a scheme (http, https, tcp)."""
    return "://" not in uri


class MilvusStore:
    """One Milvus client and the knowledge-base collection schema.

    Args:
        uri: Milvus Lite file path (`*.db`) or server URI.
        token: server credentials (`user:password`), if any.
    """

    def __init__(self, uri: str, token: str | None = None):
        from pymilvus import MilvusClient

        if is_lite(uri):
            if not uri.endswith(".db"):
                raise ValueError(f"Milvus Lite URI {uri!r} must be a file path ending in .db")
            os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        self.uri = uri
        self.client = MilvusClient(uri=uri, token=token or "")
        self._loaded: set[str] = set()

    def ensure_collection(self, collection: str, dim: int) -> None:
        """Create the collection with lorag's schema, or check an existing one has the same vector size."""
        from pymilvus import DataType, MilvusClient

        if self.client.has_collection(collection):
            existing = self.dim(collection)
            if existing != dim:
                raise ValueError(
                    f"collection {collection!r} at {self.uri} stores {existing}-d vectors but the embedder makes {dim}-d ones: "
                    f"drop it (`lorag kb drop`) or use the embedder it was built with"
                )
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX)
        schema.add_field("source", DataType.VARCHAR, max_length=SOURCE_MAX)
        schema.add_field("title", DataType.VARCHAR, max_length=512)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("start", DataType.INT64)
        schema.add_field("end", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type="AUTOINDEX", metric_type="COSINE")
        self.client.create_collection(collection, schema=schema, index_params=index)

    def dim(self, collection: str) -> int:
        desc = self.client.describe_collection(collection)
        for field in desc["fields"]:
            if field["name"] == "vector":
                return int(field["params"]["dim"])
        raise ValueError(f"collection {collection!r} has no 'vector' field: it was not made by lorag")

    def _load(self, collection: str) -> None:
        # A reopened database lists its collections as released; searches need them loaded.
        if collection not in self._loaded:
            self.client.load_collection(collection)
            self._loaded.add(collection)

    def upsert(self, collection: str, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        return int(self.client.upsert(collection, rows)["upsert_count"])

    def prune(self, collection: str, keep: dict[str, list[str]]) -> int:
        """Delete chunks that are no longer current: a kept source's chunks whose ids are not in
        `keep[source]` (the document changed), and every chunk of a source not in `keep` (the
        document is gone). Returns how many entities were deleted."""
        before = self.count(collection)
        for source, ids in keep.items():
            self.client.delete(collection, filter=f"source == {json.dumps(source)} and id not in {json.dumps(ids)}")
        self.client.delete(collection, filter=f"source not in {json.dumps(sorted(keep))}")
        return before - self.count(collection)

    def count(self, collection: str) -> int:
        if not self.client.has_collection(collection):
            return 0
        self._load(collection)
        res = self.client.query(collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def search(self, collection: str, vector: list[float], k: int) -> list[dict[str, Any]]:
        """Top-k chunks by cosine similarity, best first, each with its citation fields and `score`."""
        if not self.client.has_collection(collection):
            raise LookupError(f"knowledge base collection {collection!r} does not exist at {self.uri}: run `lorag ingest` first")
        self._load(collection)
        res = self.client.search(
            collection,
            data=[list(map(float, vector))],
            limit=k,
            output_fields=["text", "source", "title", "chunk_index", "start", "end"],
        )
        return [{"id": hit["id"], "score": float(hit["distance"]), **hit["entity"]} for hit in res[0]]

    def list_collections(self) -> list[str]:
        return list(self.client.list_collections())

    def drop(self, collection: str) -> None:
        if self.client.has_collection(collection):
            self.client.drop_collection(collection)
        self._loaded.discard(collection)

    def close(self) -> None:
        self.client.close()


class StoreHandle:
    """Synchronous calls to a `MilvusStore`, in this process or in its owner actor.

    Every method of `MilvusStore` is available; `await handle.acall(name, ...)` is the async form
    for event-loop callers such as Serve replicas.
    """

    def __init__(self, store: MilvusStore | None = None, actor: Any = None):
        self._store, self._actor = store, actor

    def call(self, method: str, *args: Any) -> Any:
        import ray

        if self._actor is not None:
            return ray.get(self._actor.call.remote(method, *args))
        return getattr(self._store, method)(*args)

    async def acall(self, method: str, *args: Any) -> Any:
        if self._actor is not None:
            return await self._actor.call.remote(method, *args)
        return getattr(self._store, method)(*args)

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args: self.call(method, *args)


class _StoreOwner:
    """The one process that opens a Milvus Lite file (a Ray actor, `max_concurrency=1`)."""

    def __init__(self, uri: str, token: str | None):
        self.store = MilvusStore(uri, token)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.store, method)(*args)


def open_store(uri: str, token: str | None = None) -> StoreHandle:
    """Open a knowledge-base store, through the file's single owner actor for Milvus Lite under Ray.

    The actor is named after the file, so every driver, job task and Serve replica on the cluster
    finds the same one; it lives as long as the process that created it.
    """
    import ray

    if not is_lite(uri) or not ray.is_initialized():
        return StoreHandle(store=MilvusStore(uri, token))
    uri = os.path.abspath(uri)
    name = "milvus-lite-" + hashlib.sha256(uri.encode()).hexdigest()[:16]
    owner = (
        ray.remote(_StoreOwner)
        .options(name=name, namespace=ACTOR_NAMESPACE, get_if_exists=True, num_cpus=0, max_concurrency=1)
        .remote(uri, token)
    )
    return StoreHandle(actor=owner)
