"""A knowledge base's Milvus collection: its schema, writes, counts, ingest lock, and each ranking's
search candidates (ranking them is `lorag.retrieval`'s; callers reach a store through
`lorag.handle.open_store`).

`MilvusStore` wraps one `pymilvus.MilvusClient`. Safety on a shared Milvus: every collection lorag
creates carries a marker in its properties (`lorag.kb`: the knowledge base it holds,
`lorag.schema`: the row schema). lorag writes into, rebuilds and drops only collections whose
marker names the knowledge base at hand; anything else is somebody else's data and is refused.
Per-document filters and deletes go through `source_hash` (sha256 of the full source path), so no
path needs quoting in a filter expression and a path longer than the `source` field is still one
document. One ingest per collection at a time: `lock` creates a lock collection whose properties
name the holder (creating a collection is atomic in Milvus and Milvus Lite), renewed while the
ingest runs (`lorag.lease`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, get_type_hints

from lorag.chunks import CLIPPED, FIELD_BYTES, FIELDS, OUTPUT, ChunkRow, Hit, clip, source_key
from lorag.errors import MILVUS_HINT
from lorag.storage import is_uri
from lorag.text import BM25_B, BM25_K1, Bm25Index, passage, terms

ACTOR_NAMESPACE = "lorag"
COLLECTION_SCHEMA = "4"  # bump when the collection's fields change: lorag's own collections are then rebuilt
MARKER_KB, MARKER_SCHEMA = "lorag.kb", "lorag.schema"  # collection properties of every collection lorag creates
LOCK_HOLDER, LOCK_RENEWED = "lorag.lock", "lorag.lock.renewed"  # properties of an ingest lock collection


class ForeignCollection(ValueError):
    """A collection exists under a knowledge base's name but lorag did not create it for that knowledge base."""


class StoreLocked(RuntimeError):
    """Another ingest of the same knowledge base holds its lock."""


def lock_collection(collection: str) -> str:
    """The ingest lock's collection name (a leading underscore: never a knowledge base's collection)."""
    return "_lorag_lock_" + hashlib.sha256(collection.encode()).hexdigest()[:24]


def is_lite(uri: str) -> bool:
    """Milvus Lite URIs are local file paths; servers are reached over a scheme (http, https, tcp)."""
    return not is_uri(uri)


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
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # it logs every RPC error it then raises; ours say more
        token = token or os.environ.get("LORAG_MILVUS_TOKEN")  # knowledge_bases[].token's default: never in a config file or a dump
        try:
            self.client = MilvusClient(uri=uri, token=token or "", timeout=30)
        except Exception as e:  # pymilvus raises its own types (and grpc's) for an unreachable server
            raise ConnectionError(f"cannot reach Milvus at {uri}: {e}; {MILVUS_HINT}") from e
        self.version = str(self.client.get_server_version())
        self._loaded: dict[str, set[str]] = {}  # collection -> its field names, once loaded
        # Full text scored in this process (`Bm25Index`): on Milvus Lite, whose own BM25 is pure Python over
        # every row (90 ms at 20,000 chunks, against 1-2 ms here), and on servers without BM25 functions.
        # Dropped on every write: `_bm25_writes` counts them, so a build that a write overtook is discarded.
        self._bm25: dict[str, Any] = {}
        self._bm25_writes: dict[str, int] = {}
        self._bm25_building: set[str] = set()
        self._bm25_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="lorag-dense")  # hybrid search on a server: dense halves (threads start on first use)

    # -- schema ----------------------------------------------------------------------------

    @property
    def native_bm25(self) -> bool:
        """Whether the backend has BM25 functions and sparse vectors (Milvus Lite, Milvus >= 2.5)."""
        if self.version.startswith("milvus_lite"):
            return True
        m = re.match(r"v?(\d+)\.(\d+)", self.version)
        return bool(m) and (int(m.group(1)), int(m.group(2))) >= (2, 5)

    def owner(self, collection: str) -> str | None:
        """The knowledge base an existing collection was created for, from its lorag marker.

        Raises:
            ForeignCollection: the collection exists without a marker (lorag did not create it).
        """
        if not self.client.has_collection(collection):
            return None
        props = self.client.describe_collection(collection).get("properties") or {}
        if MARKER_KB not in props:
            raise ForeignCollection(
                f"collection {collection!r} at {self.uri} was not created by lorag (no {MARKER_KB!r} property): it may be "
                f"somebody else's data, so lorag will neither write into nor drop it; give the knowledge base another "
                f"`collection` (or name), or drop that collection yourself if it is an old lorag one"
            )
        return props[MARKER_KB]

    def incompatible(self, collection: str, dim: int, kb: str | None = None) -> str | None:
        """Why an existing collection of knowledge base `kb` (default: named like the collection)
        cannot take this embedder's chunks and must be rebuilt (None if it can, or is absent).

        Raises:
            ForeignCollection: the collection was not created by lorag, or was created for another knowledge base.
        """
        kb = kb or collection
        owner = self.owner(collection)
        if owner is None:
            return None
        if owner != kb:
            raise ForeignCollection(
                f"collection {collection!r} at {self.uri} holds knowledge base {owner!r}, not {kb!r}: two configs map "
                f"different knowledge bases to one collection; give one of them another `collection`"
            )
        desc = self.client.describe_collection(collection)
        if (desc.get("properties") or {}).get(MARKER_SCHEMA) != COLLECTION_SCHEMA:
            return f"it has lorag collection schema {(desc.get('properties') or {}).get(MARKER_SCHEMA)!r}, this lorag writes {COLLECTION_SCHEMA!r}"
        fields = {f["name"]: f for f in desc["fields"]}
        if not set(FIELDS) <= set(fields):
            return f"it was built by an older lorag (no {sorted(set(FIELDS) - set(fields))} fields)"
        existing = int(fields["vector"]["params"]["dim"])
        if existing != dim:
            return f"it stores {existing}-d vectors but the embedder makes {dim}-d ones"
        return None

    def ensure_collection(self, collection: str, dim: int, kb: str | None = None) -> None:
        """Create the collection with lorag's schema and marker for knowledge base `kb` (default:
        named like the collection), or check an existing one is that knowledge base's and matches.

        Raises:
            ForeignCollection: it exists but lorag did not create it for `kb`.
            ValueError: it is `kb`'s but has another schema or dimension.
        """
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        kb = kb or collection
        if self.client.has_collection(collection):
            reason = self.incompatible(collection, dim, kb)
            if reason:
                raise ValueError(f"collection {collection!r} at {self.uri} cannot be used: {reason}; drop it with `lorag kb drop` and ingest again")
            return
        bm25 = self.native_bm25
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        for name, kind in get_type_hints(ChunkRow).items():
            if kind is str:
                # `terms`: the chunk's English-analysed terms (`lorag.text.terms`); Milvus's standard
                # analyzer splits them back into the same words (Milvus Lite has no whitespace tokenizer).
                extra = {"enable_analyzer": True} if name == "terms" and bm25 else {"is_primary": True} if name == "id" else {}
                schema.add_field(name, DataType.VARCHAR, max_length=FIELD_BYTES[name], **extra)
            elif kind is int:
                schema.add_field(name, DataType.INT64)
            else:
                schema.add_field(name, DataType.FLOAT_VECTOR, dim=dim)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type="AUTOINDEX", metric_type="COSINE")
        if bm25:
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25, input_field_names=["terms"], output_field_names=["sparse"]))
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25", params={"bm25_k1": BM25_K1, "bm25_b": BM25_B})
        self.client.create_collection(
            collection, schema=schema, index_params=index, consistency_level="Strong", properties={MARKER_KB: kb, MARKER_SCHEMA: COLLECTION_SCHEMA}
        )

    def dim(self, collection: str) -> int:
        desc = self.client.describe_collection(collection)
        for field in desc["fields"]:
            if field["name"] == "vector":
                return int(field["params"]["dim"])
        raise ValueError(f"collection {collection!r} has no 'vector' field: it was not made by lorag")

    def _load(self, collection: str) -> set[str]:
        """Load the collection once (a reopened database lists its collections as released;
        searches need them loaded) and return its field names, so searches ask the schema once."""
        if collection not in self._loaded:
            self.client.load_collection(collection)
            self._loaded[collection] = {f["name"] for f in self.client.describe_collection(collection)["fields"]}
        return self._loaded[collection]

    # -- writes ----------------------------------------------------------------------------

    def upsert(self, collection: str, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        self._forget_bm25(collection)
        # source_hash from the full path, before `source` is clipped for display; the ingest
        # pipeline computes `terms` in its chunker actors, other writers get them here.
        rows = [
            {"source_hash": source_key(r["source"]), **r, "terms": r.get("terms") or terms(passage(r["title"], r["section"], r["text"]))}
            for r in rows
        ]
        rows = [{k: clip(r[k], FIELD_BYTES[k]) if k in CLIPPED else r[k] for k in FIELDS} for r in rows]
        return int(self.client.upsert(collection, rows)["upsert_count"])

    def documents(self, collection: str) -> dict[str, dict[str, Any]]:
        """What the collection holds per source, for display: `{source: {"doc_hash", "n_chunks", "count", "source_hash"}}`
        (`source` as stored: clipped to the field's length; `document_index` keys by the full path's hash)."""
        return {d["source"]: d for d in self.document_index(collection).values()}

    def document_index(self, collection: str) -> dict[str, dict[str, Any]]:
        """What the collection holds per document: `{source_hash: {"source", "doc_hash", "n_chunks", "count", "source_hash"}}`.

        A document is complete when all its chunks share one hash and `count == n_chunks`; an
        ingest killed mid-document leaves it incomplete, so the next run redoes it.
        """
        if not self.client.has_collection(collection):
            return {}
        self._load(collection)
        docs: dict[str, dict[str, Any]] = {}
        it = self.client.query_iterator(collection, batch_size=4096, filter="", output_fields=["source", "source_hash", "doc_hash", "n_chunks"])
        try:
            while batch := it.next():
                for row in batch:
                    d = docs.setdefault(
                        row["source_hash"],
                        {"source": row["source"], "source_hash": row["source_hash"], "doc_hash": row["doc_hash"], "n_chunks": row["n_chunks"], "count": 0},
                    )
                    d["count"] += 1
                    if d["doc_hash"] != row["doc_hash"]:
                        d["doc_hash"] = ""  # mixed versions: incomplete
        finally:
            it.close()
        return docs

    def prune(self, collection: str, keep: dict[str, list[str]], gone: list[str]) -> int:
        """Delete stale chunks: those of a re-indexed document whose ids are not in `keep[source_hash]`
        (the document changed), and every chunk of the documents whose `source_hash` is in `gone`
        (deleted documents). Keys are `source_key(path)`: hex, so every filter is plain ASCII.
        Returns how many entities were deleted."""
        before = self.count(collection)
        for key, ids in keep.items():
            self.client.delete(collection, filter=f"source_hash == {_literal(key)} and id not in [{', '.join(map(_literal, ids))}]")
        for i in range(0, len(gone), 500):
            self.client.delete(collection, filter=f"source_hash in [{', '.join(map(_literal, gone[i : i + 500]))}]")
        self._forget_bm25(collection)
        return before - self.count(collection)

    def settle(self, collection: str, timeout: float = 60.0) -> None:
        """After a batch of writes: seal segments (so they get indexed) and wait until searches,
        which read with bounded staleness, see every write."""
        if not self.client.has_collection(collection):
            return
        self.client.flush(collection)
        want = self.count(collection)
        deadline = time.time() + timeout
        while self._count(collection, "Bounded") != want and time.time() < deadline:
            time.sleep(0.2)
        if is_lite(self.uri) and collection not in self._bm25:  # searches after an ingest find the full-text index ready
            self._build_bm25(collection)

    # -- reads -----------------------------------------------------------------------------

    def count(self, collection: str) -> int:
        """Entities in the collection, counting every acknowledged write."""
        if not self.client.has_collection(collection):
            return 0
        self._load(collection)
        return self._count(collection, "Strong")

    def _count(self, collection: str, consistency: str) -> int:
        res = self.client.query(collection, filter="", output_fields=["count(*)"], consistency_level=consistency)
        return int(res[0]["count(*)"])

    def candidates(self, collection: str, vector: list[float] | None, query: str | None, depth: int,
                   source_prefix: str | None = None) -> tuple[list[Hit], list[Hit]]:
        """Each ranking's top `depth` chunks, best first: (dense, full text). `lorag.retrieval.rank` turns them into a search's hits.

        Args:
            vector: the embedded query, for the dense ranking (None: no dense ranking).
            query: the query text, for the full-text ranking (None: no full-text ranking).
            source_prefix: only chunks whose source path starts with this.
        """
        if collection not in self._loaded and not self.client.has_collection(collection):
            raise LookupError(f"knowledge base collection {collection!r} does not exist at {self.uri}: run `lorag kb ingest` first")
        self._load(collection)
        if vector is None or query is None or is_lite(self.uri):  # one ranking, or Milvus Lite (in this process): nothing to overlap
            dense = self._dense(collection, vector, depth, source_prefix) if vector is not None else []
            return dense, (self._full_text(collection, query, depth, source_prefix) if query is not None else [])
        # a server answers the dense search while the full-text one runs (or waits on it too)
        pending = self._pool.submit(self._dense, collection, vector, depth, source_prefix)
        lexical = self._full_text(collection, query, depth, source_prefix)
        return pending.result(), lexical

    def _dense(self, collection: str, vector, k: int, prefix: str | None) -> list[Hit]:
        res = self.client.search(
            collection, data=[list(map(float, vector))], anns_field="vector", limit=k, output_fields=OUTPUT, consistency_level=SEARCH_CONSISTENCY,
            # HNSW's default beam (ef = k) gave recall@10 0.93 on a 100k-chunk server collection; a wider one buys it back.
            search_params={"metric_type": "COSINE", "params": {"ef": max(64, 4 * k)}}, **_prefix_filter(prefix),
        )
        return [{"id": hit["id"], "score": float(hit["distance"]), **hit["entity"]} for hit in res[0]]

    def _full_text(self, collection: str, query: str, k: int, prefix: str | None) -> list[Hit]:
        analysed = terms(query)
        if not analysed:  # nothing but stop words and punctuation
            return []
        fields = self._load(collection)
        index = self._bm25.get(collection)
        if index is None and "sparse" in fields:  # Milvus scores it; Lite only until lorag's index is built
            if is_lite(self.uri):
                self._build_bm25_soon(collection)
            return self._milvus_full_text(collection, analysed, k, prefix)
        # Milvus < 2.5 has no BM25: score in this process over the collection's text (built once, dropped on writes).
        return (index or self._build_bm25(collection)).search(query, k, prefix)

    def full_text_ready(self, collection: str) -> bool:
        """Whether full-text search scores as it will from now on: lorag's index of the collection is
        built (Milvus Lite answers with its own BM25 meanwhile), or a server scores it."""
        with self._bm25_lock:
            return collection in self._bm25 or not is_lite(self.uri)

    def _milvus_full_text(self, collection: str, analysed: str, k: int, prefix: str | None) -> list[dict[str, Any]]:
        res = self.client.search(
            collection, data=[analysed], anns_field="sparse", limit=k, output_fields=OUTPUT, search_params={"metric_type": "BM25"},
            consistency_level=SEARCH_CONSISTENCY, **_prefix_filter(prefix),
        )
        return [{"id": hit["id"], "score": abs(float(hit["distance"])), **hit["entity"]} for hit in res[0]]

    def _build_bm25(self, collection: str) -> Any:
        """Build the collection's in-process full-text index from its stored terms, and keep it unless a write came meanwhile."""
        writes = self._bm25_writes.get(collection, 0)
        fields = ["id", "terms", *OUTPUT]
        if is_lite(self.uri):  # one query: Lite has no limit on its size, and its iterator logs an error for a call it lacks
            n = self.count(collection)
            rows = self.client.query(collection, filter="", limit=n, output_fields=fields, consistency_level="Strong") if n else []
        else:
            rows = []
            it = self.client.query_iterator(collection, batch_size=4096, filter="", output_fields=fields)
            try:
                while batch := it.next():
                    rows.extend(batch)
            finally:
                it.close()
        index = Bm25Index(rows)  # BM25_K1 and BM25_B, as the collection's BM25 index was created with
        with self._bm25_lock:
            if self._bm25_writes.get(collection, 0) == writes:
                self._bm25[collection] = index
        return index

    def _build_bm25_soon(self, collection: str) -> None:
        """Build the index in a background thread (once at a time), so a reopened Lite file answers its first
        searches with Milvus's own BM25 instead of waiting seconds for the build."""
        with self._bm25_lock:
            if collection in self._bm25_building:
                return
            self._bm25_building.add(collection)

        def build() -> None:
            try:
                self._build_bm25(collection)
            except Exception as e:  # dropped or closed meanwhile: the next search tries again
                logging.getLogger(__name__).debug("full-text index of %s not built: %s", collection, e)
            finally:
                with self._bm25_lock:
                    self._bm25_building.discard(collection)

        # A daemon thread, not the pool: a one-shot `lorag kb search` must not wait for it at exit.
        threading.Thread(target=build, name=f"lorag-bm25-{collection}", daemon=True).start()

    def _forget_bm25(self, collection: str) -> None:
        with self._bm25_lock:
            self._bm25.pop(collection, None)
            self._bm25_writes[collection] = self._bm25_writes.get(collection, 0) + 1

    def list_collections(self) -> list[str]:
        return list(self.client.list_collections())

    def drop(self, collection: str, kb: str | None = None) -> None:
        """Drop knowledge base `kb`'s collection (default: named like the collection).

        Raises:
            ForeignCollection: lorag did not create it for `kb`; it is left untouched.
        """
        owner = self.owner(collection)
        if owner is not None and owner != (kb or collection):
            raise ForeignCollection(f"collection {collection!r} at {self.uri} holds knowledge base {owner!r}, not {kb or collection!r}: not dropped")
        if owner is not None:
            self.client.drop_collection(collection)
        self._loaded.pop(collection, None)
        self._forget_bm25(collection)

    # -- ingest lock ------------------------------------------------------------------------

    def lock(self, collection: str, holder: dict[str, Any]) -> dict[str, Any] | None:
        """Try to take `collection`'s ingest lock for `holder` (a dict with a unique `token`).

        Returns None when taken, else the current holder (its dict plus `renewed`, the time of its
        last renewal; `{}` when the lock vanished while being read: try again).
        """
        from pymilvus import DataType, MilvusClient
        from pymilvus.exceptions import MilvusException

        name = lock_collection(collection)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=8)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs one; the lock holds no rows
        with contextlib.suppress(MilvusException):  # it exists: Lite refuses any duplicate, a server one with other properties
            self.client.create_collection(name, schema=schema, properties={LOCK_HOLDER: json.dumps(holder), LOCK_RENEWED: str(time.time())})
        current = self._lock_holder(name)
        return None if current.get("token") == holder["token"] else current

    def renew_lock(self, collection: str, token: str) -> bool:
        """Mark the lock as still held; False if `token` no longer holds it."""
        name = lock_collection(collection)
        if self._lock_holder(name).get("token") != token:
            return False
        self.client.alter_collection_properties(name, properties={LOCK_RENEWED: str(time.time())})
        return True

    def unlock(self, collection: str, token: str) -> None:
        """Release the lock if `token` holds it (a lock another ingest took over is left alone)."""
        name = lock_collection(collection)
        if self._lock_holder(name).get("token") == token:
            self.client.drop_collection(name)

    def _lock_holder(self, name: str) -> dict[str, Any]:
        from pymilvus.exceptions import MilvusException

        try:
            props = self.client.describe_collection(name).get("properties") or {}
        except MilvusException:  # released meanwhile
            return {}
        if LOCK_HOLDER not in props:
            return {}
        return {**json.loads(props[LOCK_HOLDER]), "renewed": float(props.get(LOCK_RENEWED, 0))}

    def close(self) -> None:
        self._pool.shutdown()
        self.client.close()


# Searches read with bounded staleness: a strong read waits for the next time tick (~200 ms on a
# server). Ingest ends with `settle`, so a finished ingest is fully visible to them.
SEARCH_CONSISTENCY = "Bounded"


def _literal(value: str) -> str:
    """A string literal for a Milvus filter expression. Characters stay as they are (Milvus Lite's
    parser has no `\\u` escapes, so `json.dumps`'s ASCII escaping breaks on `café`); quotes and
    backslashes are escaped."""
    return json.dumps(value, ensure_ascii=False)


def _prefix_filter(prefix: str | None) -> dict[str, str]:
    if not prefix:
        return {}
    # `like` treats % and _ as wildcards; escape them so the prefix matches literally.
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return {"filter": f"source like {_literal(escaped + '%')}"}


