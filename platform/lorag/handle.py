"""How every caller reaches a knowledge base's store: `open_store` and its `StoreHandle`.

Milvus Lite (a local `*.db` file) may be opened by one process at a time, so `open_store` routes
Lite access through a single named Ray actor per file when Ray is running (ingest jobs, Serve
replicas and the CLI then share one owner), and opens the file in-process otherwise. A Milvus
server URI is opened directly by every caller.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable

from lorag.chunks import Hit
from lorag.milvus import ACTOR_NAMESPACE, ForeignCollection, MilvusStore, StoreLocked, is_lite

class StoreHandle:
    """A `MilvusStore`'s methods, run in this process or in its file's owner actor.

    Each method below is the store's own, with its signature; `acandidates` is the async form of
    `candidates` for event-loop callers such as Serve replicas. An owner actor dies with the last
    handle held by the process that created it, and a handle can meet it dying (a name lookup that
    lands in its teardown, or the ingest job that created it exiting under a Serve replica): the
    call then reopens the owner and retries. Every store method is idempotent (upserts by id,
    deletes by filter), so a retried call leaves the same state.
    """

    def __init__(self, store: MilvusStore | None = None, uri: str | None = None, token: str | None = None):
        self._store, self._uri, self._token = store, uri, token
        self.uri = store.uri if store is not None else uri
        self._actor = None if store is not None else _owner(uri, token)

    def ensure_collection(self, collection: str, dim: int, kb: str | None = None) -> None:
        return self._run(MilvusStore.ensure_collection, collection, dim, kb)

    def incompatible(self, collection: str, dim: int, kb: str | None = None) -> str | None:
        return self._run(MilvusStore.incompatible, collection, dim, kb)

    def owner(self, collection: str) -> str | None:
        return self._run(MilvusStore.owner, collection)

    def dim(self, collection: str) -> int:
        return self._run(MilvusStore.dim, collection)

    def upsert(self, collection: str, rows: list[dict[str, Any]]) -> int:
        return self._run(MilvusStore.upsert, collection, rows)

    def documents(self, collection: str) -> dict[str, dict[str, Any]]:
        return self._run(MilvusStore.documents, collection)

    def document_index(self, collection: str) -> dict[str, dict[str, Any]]:
        return self._run(MilvusStore.document_index, collection)

    def prune(self, collection: str, keep: dict[str, list[str]], gone: list[str]) -> int:
        return self._run(MilvusStore.prune, collection, keep, gone)

    def settle(self, collection: str, timeout: float = 60.0) -> None:
        return self._run(MilvusStore.settle, collection, timeout)

    def count(self, collection: str) -> int:
        return self._run(MilvusStore.count, collection)

    def candidates(self, collection: str, vector: list[float] | None, query: str | None, depth: int,
                   source_prefix: str | None = None) -> tuple[list[Hit], list[Hit]]:
        return self._run(MilvusStore.candidates, collection, vector, query, depth, source_prefix)

    async def acandidates(self, collection: str, vector: list[float] | None, query: str | None, depth: int,
                          source_prefix: str | None = None) -> tuple[list[Hit], list[Hit]]:
        return await self._arun(MilvusStore.candidates, collection, vector, query, depth, source_prefix)

    def full_text_ready(self, collection: str) -> bool:
        return self._run(MilvusStore.full_text_ready, collection)

    def list_collections(self) -> list[str]:
        return self._run(MilvusStore.list_collections)

    def drop(self, collection: str, kb: str | None = None) -> None:
        return self._run(MilvusStore.drop, collection, kb)

    def lock(self, collection: str, holder: dict[str, Any]) -> dict[str, Any] | None:
        return self._run(MilvusStore.lock, collection, holder)

    def renew_lock(self, collection: str, token: str) -> bool:
        return self._run(MilvusStore.renew_lock, collection, token)

    def unlock(self, collection: str, token: str) -> None:
        return self._run(MilvusStore.unlock, collection, token)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def _run(self, method: Callable[..., Any], *args: Any) -> Any:
        import ray

        if self._store is not None:
            return method(self._store, *args)
        try:
            for delay in OWNER_RETRY_DELAYS:
                try:
                    return ray.get(self._actor.call.remote(method, *args))
                except ray.exceptions.ActorDiedError:
                    time.sleep(delay)
                    self._actor = _owner(self._uri, self._token)
            return ray.get(self._actor.call.remote(method, *args))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, (ForeignCollection, StoreLocked)):
                raise e.cause from None  # its message names the fix; the owner actor's traceback adds nothing
            raise

    async def _arun(self, method: Callable[..., Any], *args: Any) -> Any:
        import asyncio

        import ray

        if self._store is not None:  # a blocking client (a Milvus server): never on the caller's event loop
            return await asyncio.to_thread(method, self._store, *args)
        for delay in OWNER_RETRY_DELAYS:
            try:
                return await self._actor.call.remote(method, *args)
            except ray.exceptions.ActorDiedError:
                await asyncio.sleep(delay)
                self._actor = _owner(self._uri, self._token)
        return await self._actor.call.remote(method, *args)


# Pauses before reopening a dead owner: a name lookup can return an actor in teardown until the
# cluster has released its name, and its successor cannot open the file until it is closed.
OWNER_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)


class _StoreOwner:
    """The one process that opens a Milvus Lite file (a Ray actor, `max_concurrency=1`)."""

    def __init__(self, uri: str, token: str | None):
        self.store = MilvusStore(uri, token)

    def call(self, method: Callable[..., Any], *args: Any) -> Any:
        return method(self.store, *args)


def _owner(uri: str, token: str | None) -> Any:
    """The named owner actor of a Milvus Lite file: found if it exists on the cluster, else started."""
    import ray

    name = "milvus-lite-" + hashlib.sha256(uri.encode()).hexdigest()[:16]
    return (
        ray.remote(_StoreOwner)
        .options(name=name, namespace=ACTOR_NAMESPACE, get_if_exists=True, num_cpus=0, max_concurrency=1)
        .remote(uri, token)
    )


def open_store(uri: str, token: str | None = None) -> StoreHandle:
    """Open a knowledge-base store, through the file's single owner actor for Milvus Lite under Ray.

    The actor is named after the file, so every driver, job task and Serve replica on the cluster
    finds the same one; it lives while the process that created it holds a handle to it.
    """
    import ray

    if not is_lite(uri) or not ray.is_initialized():
        return StoreHandle(store=MilvusStore(uri, token))
    return StoreHandle(uri=os.path.abspath(uri), token=token)
