"""Documents into a knowledge base: the Ray Data ingest into Milvus.

Knowledge bases: `ingest` is read (Ray Data `read_binary_files`) -> parse and chunk (`flat_map`
of `lorag.chunking.DocumentChunker` on an actor pool) -> embed (`map_batches(Embedder)` on an
actor pool, one GPU each when the cluster has GPUs) -> upsert into Milvus, streamed so that
writing overlaps embedding. It is incremental: chunk ids hash knowledge base, source, chunk index
and content, writes are upserts, documents whose bytes (and indexing settings) are unchanged and
fully stored are skipped, changed documents replace their chunks, deleted documents lose theirs,
and a document that fails to parse, or is larger than `max_source_bytes`, is reported and skipped
(its old chunks stay). Only regular files inside a source's root are read: a symlink that leaves
it, a FIFO or a device is reported and never opened (`lorag.documents.find_documents`; chunks
such a file left in the store are removed, as a deleted document's).

It always finishes or fails: the stages are sized from the CPUs and GPUs Ray has free, so the
chunker and every embedder fit at once (fractions of a CPU on a 1-core machine), and a pipeline
that moves no batch for `stall_timeout_s` fails with the stalled stage named. It never deletes on
doubt: a source root that is present but holds no document is an error, one ingest per
knowledge base runs at a time (`lorag.lease.ingest_lock`), and it writes only into a collection
lorag created for this knowledge base.

Training examples (JSONL, RAFT prompts) are `lorag.examples`'.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lorag.chunking import DocumentChunker
from lorag.chunks import FIELDS, source_key
from lorag.documents import DocumentError, document_hash, find_documents, read_document
from lorag.storage import is_uri

SCHEMA_VERSION = 6  # bump when chunk rows change meaning: every document is then re-indexed


@dataclass
class IngestReport:
    knowledge_base: str
    uri: str
    documents: int
    skipped: int
    chunks_written: int
    chunks_removed: int
    entities: int
    seconds: float
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    rebuilt: str | None = None  # why the existing collection was dropped and rebuilt, if it was


def fingerprint(cfg, kb) -> str:
    """Everything besides a document's bytes that decides its chunks and vectors."""
    return json.dumps([SCHEMA_VERSION, cfg.embedder, kb.chunking.size, kb.chunking.overlap, kb.text_field, kb.title_field])


def ingest(cfg, kb_name: str, progress=None) -> IngestReport:
    """Build or refresh one knowledge base with Ray Data; Ray must be initialised by the caller.

    Args:
        cfg: the `LoragConfig`.
        kb_name: which of `cfg.knowledge_bases`.
        progress: optional callable `(chunks_written, documents_done, documents_total)` called after each write.

    Returns:
        Counts of documents (seen, skipped as unchanged, failed with reasons: unparsable, too
        large, or refused as not a regular file inside its source root), chunks written and
        removed, and the entities now in the collection.

    Raises:
        FileNotFoundError: a source matches nothing, or is present but holds no document.
        lorag.milvus.ForeignCollection: the collection exists but lorag did not create it for this knowledge base.
        lorag.milvus.StoreLocked: another ingest of this knowledge base is running.
        lorag.milvus.LockLost: another ingest took this one's lock over while it ran (it stops before its next write).
        TimeoutError: the pipeline moved no batch for `stall_timeout_s`; the message names the stage.
    """
    from lorag.handle import open_store
    from lorag.lease import ingest_lock
    from lorag.models import resolve_model
    from lorag.storage import check_cluster_paths

    start = time.time()
    kb = cfg.knowledge_base(kb_name)
    check_cluster_paths(cfg, [kb_name])
    refused: list[tuple[str, str]] = []
    files = kb_documents(kb, refused)
    embedder_path = resolve_model(cfg.embedder, cfg.model_cache)
    dim = int(json.loads((embedder_path / "config.json").read_text())["hidden_size"])
    uri = cfg.milvus_uri(kb)
    store = open_store(uri, kb.token)
    with ingest_lock(store, kb.collection, kb.name) as lease:
        rebuilt = _open_collection(store, kb, dim)
        stored = store.document_index(kb.collection)
        fp = fingerprint(cfg, kb)
        todo, gone = _changes(files, stored, fp, kb.max_source_bytes)
        written, failed, keep = _index(cfg, kb, todo, fp, store, uri, progress, lease) if todo else (0, [], {})
        # Only after every current chunk is written: drop chunks of changed and deleted documents.
        # A source the collection did not hold when this run started has no chunks but this run's,
        # so only re-indexed sources that were stored before need a delete (each is a scan on Lite).
        # Deleting on a lock another ingest has taken would delete what it just wrote: ask first.
        lease.check(confirm=True)
        removed = store.prune(kb.collection, {k: ids for k, ids in keep.items() if k in stored}, gone)
        if written or removed:
            store.settle(kb.collection)
        entities = store.count(kb.collection)
    return IngestReport(kb.name, uri, len(files) + len(refused), len(files) - len(todo), written, removed, entities, time.time() - start,
                        refused + failed, rebuilt)


def _open_collection(store, kb, dim: int) -> str | None:
    """Create the knowledge base's collection if missing; returns why an existing one was dropped and rebuilt, if it was.

    A knowledge base is derived data: one built by an older lorag or another embedder is rebuilt
    (only a collection lorag created for this knowledge base: anything else raises, untouched).
    """
    rebuilt = store.incompatible(kb.collection, dim, kb.name)
    if rebuilt:
        store.drop(kb.collection, kb.name)
    store.ensure_collection(kb.collection, dim, kb.name)
    return rebuilt


def _changes(files: list[str], stored: dict[str, dict], fp: str, max_bytes: int) -> tuple[list[str], list[str]]:
    """(documents to index, source keys of stored documents that are gone).

    Documents stored whole with the same hash are skipped; the rest are redone. Documents are
    matched by the hash of their full path (`source` is clipped to its field's length).
    """
    keys = {path: source_key(path) for path in files}
    todo = []
    for path in files:
        have = stored.get(keys[path])
        complete = have is not None and have["doc_hash"] and have["count"] == have["n_chunks"]
        if not (complete and have["doc_hash"] == _current_hash(path, fp, max_bytes)):
            todo.append(path)
    return todo, sorted(set(stored) - set(keys.values()))


def _current_hash(path: str, fp: str, max_bytes: int) -> str | None:
    """The document's hash now, or None when it cannot be read whole (the pipeline then reports why)."""
    try:
        return document_hash(read_document(path, max_bytes), fp)
    except DocumentError:
        return None


def _index(cfg, kb, todo: list[str], fp: str, store, uri: str, progress, lease) -> tuple[int, list[tuple[str, str]], dict[str, list[str]]]:
    """Run the Ray Data pipeline over `todo` and upsert its chunks; returns (chunks written,
    failed documents with reasons, `{source_key: chunk ids}` of the documents written). Stops with
    `LockLost` at the first write after `lease` (the ingest lock) is found lost."""
    from ray.data.exceptions import ExecutionTimeoutError

    from lorag.milvus import is_lite

    ds, plan = _pipeline(cfg, kb, todo, fp)
    written, failed, keep = 0, [], {}
    # A Milvus server takes writes in parallel; Milvus Lite has one writer (its owner actor).
    pool = ThreadPoolExecutor(1 if is_lite(uri) else 4)
    pending = []
    done_docs: set[str] = set()
    try:
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            rows = _rows(batch, failed, keep, done_docs)
            if rows:
                lease.check()
                pending.append(pool.submit(store.upsert, kb.collection, rows))
            while pending and (pending[0].done() or len(pending) > 8):
                written += pending.pop(0).result()
            if progress:
                progress(written, len(done_docs) + len(failed), len(todo))
        written += sum(f.result() for f in pending)
    except ExecutionTimeoutError as e:
        raise TimeoutError(_stall_message(kb, plan, str(e))) from None
    finally:
        pool.shutdown()
    return written, failed, keep


def _pipeline(cfg, kb, todo: list[str], fp: str):
    """(the Ray Dataset that reads, chunks and embeds `todo`, the `StagePlan` it was sized with)."""
    import ray
    from ray._private.state import available_resources_per_node

    from lorag.embed import Embedder
    from lorag.models import node_ref

    # Chunker and embedder actors may run on other nodes: they resolve the embedder themselves.
    embedder_ref, cache = node_ref(cfg.embedder, cfg.storage_root, cfg.model_cache), cfg.cache_dir
    free, total = ray.available_resources(), ray.cluster_resources()
    # What each live node has free now (Ray's DeveloperAPI): an actor must fit on one node, beside Serve replicas and other jobs.
    nodes = [r.get("CPU", 0.0) for r in available_resources_per_node().values()]
    plan = plan_stages(kb.embed_actors, free.get("CPU", 0.0), free.get("GPU", 0.0), use_gpu=total.get("GPU", 0) >= 1,
                       source_bytes=_total_size(todo), node_cpus=max(nodes, default=None))
    ds = (
        read_sources(todo, num_cpus=plan.chunker_cpus, max_bytes=kb.max_source_bytes)
        .flat_map(
            DocumentChunker,
            fn_constructor_kwargs={
                "kb": kb.name, "size": kb.chunking.size, "overlap": kb.chunking.overlap, "tokenizer_path": embedder_ref,
                "fingerprint": fp, "text_field": kb.text_field, "title_field": kb.title_field, "cache_dir": cache,
            },
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=plan.chunker_cpus,
        )
        .map_batches(
            Embedder,
            fn_constructor_kwargs={"model_path": embedder_ref, "threads": kb.embed_threads or plan.embed_threads, "cache_dir": cache},
            batch_size=kb.embed_batch_size,
            compute=ray.data.ActorPoolStrategy(size=plan.embed_actors),
            batch_format="numpy",
            num_cpus=plan.embed_cpus,
            **({"num_gpus": plan.embed_gpus} if plan.embed_gpus else {}),
        )
    )
    # Ray Data's own guard: it fails the execution when no block moves through any stage for this long.
    ds.context.execution_no_progress_timeout_s = kb.stall_timeout_s
    return ds, plan


def _rows(batch: dict[str, Any], failed: list[tuple[str, str]], keep: dict[str, list[str]], done_docs: set[str]) -> list[dict[str, Any]]:
    """A batch's chunk rows for the store; records each failed document in `failed` and each
    written chunk's id in `keep` (by source key) and its document in `done_docs`."""
    rows = []
    for i in range(len(batch["id"])):
        source = str(batch["source"][i])
        if batch["error"][i]:
            failed.append((source, str(batch["error"][i])))
            continue
        row = {k: batch[k][i].item() if hasattr(batch[k][i], "item") else str(batch[k][i]) for k in ROW_KEYS}
        row["vector"] = batch["vector"][i].tolist()
        rows.append(row)
        keep.setdefault(source_key(source), []).append(row["id"])
        done_docs.add(source)
    return rows


@dataclass(frozen=True)
class StagePlan:
    """Ray resources of the ingest's actor stages."""

    chunker_cpus: float
    embed_actors: int
    embed_cpus: float
    embed_gpus: float
    embed_threads: int = 1  # torch threads per CPU embedder: the CPUs it holds, rounded up


CHUNKER_CPUS = 0.25  # what the chunker (and one read task) reserve at most: parsing and tokenizing is a small share of an ingest
AUTO_EMBED_ACTORS = 8  # `embed_actors` unset: one actor per CPU free beside the chunker, at most this many,
AUTO_BYTES_PER_ACTOR = 1 << 20  # and one per MiB of documents to index (a small ingest is not worth more model loads)


def plan_stages(embed_actors: int | None, free_cpus: float, free_gpus: float, use_gpu: bool, source_bytes: int | None = None,
                node_cpus: float | None = None) -> StagePlan:
    """Size the chunker and the embedder pool so that all of them fit in what Ray has free at once.

    A fixed pool whose actors take every CPU starves the other stage (Ray Data then waits forever:
    the embedders wait for chunks no chunker can run to make). Embedding is most of an ingest's
    work, so the chunker actor and the read task each reserve a fraction of a CPU (`CHUNKER_CPUS`,
    less on a machine with little free) and the embedders share the rest: `embed_actors` of them
    (unset: about one per CPU left, at most `AUTO_EMBED_ACTORS` and one per `AUTO_BYTES_PER_ACTOR`
    of documents to index; never more than fit at one CPU each, and at least one), each with as
    many torch threads as the CPUs it holds, rounded up, and never more CPUs than one node has
    beside the chunker (an actor runs on one node: 5.5 CPUs free on two nodes fit on neither). With
    nothing free, the stages ask for one CPU between them (an autoscaler adds it; otherwise
    `stall_timeout_s` ends the wait). With GPUs in the cluster each embedder takes one, up to the
    GPUs free (at least one).

    Args:
        embed_actors: the configured pool size (an upper bound), or None for one per CPU (GPU) free.
        free_cpus: CPUs Ray has available now.
        free_gpus: GPUs Ray has available now.
        use_gpu: whether the cluster has GPUs (embedders then run on them).
        source_bytes: the size of the documents this ingest indexes (None: unknown).
        node_cpus: the CPUs free on the cluster's roomiest node (None: one node holds all of `free_cpus`).
    """
    auto = AUTO_EMBED_ACTORS if source_bytes is None else min(AUTO_EMBED_ACTORS, max(1, math.ceil(source_bytes / AUTO_BYTES_PER_ACTOR)))
    share = free_cpus if free_cpus > 0 else 1.0
    chunker = _floor(min(CHUNKER_CPUS, share / 8))
    rest = share - 2 * chunker  # the chunker actor and one read task at a time
    if use_gpu:
        n = max(1, min(embed_actors or auto, int(free_gpus)))
        cpus = _floor(min(1.0, rest / n))
    else:
        fit = max(1, int(rest + 0.5))  # actors of about one CPU each (a 0.75-CPU actor still runs a whole thread)
        n = max(1, min(embed_actors or auto, fit))
        cpus = _floor(min(rest / n, max(node_cpus - 2 * chunker, 0.01)) if node_cpus else rest / n)
    return StagePlan(chunker, n, cpus, 1.0 if use_gpu else 0.0, max(1, math.ceil(cpus - 0.01)))


def _total_size(paths: list[str]) -> int | None:
    """The documents' size in bytes (a file that cannot be read counts 0: the pipeline reports it),
    or None when one is at a URI (its size is not known here without a round trip)."""

    if any(map(is_uri, paths)):
        return None
    total = 0
    for path in paths:
        try:
            total += os.path.getsize(path)
        except OSError:
            pass
    return total


def _floor(cpus: float) -> float:
    """Ray resource amounts in hundredths, rounded down (so that their sum never exceeds what is free)."""
    return max(0.01, int(cpus * 100) / 100)


def _stall_message(kb, plan: StagePlan, ray_message: str) -> str:
    stages = [line.strip()[2:] for line in ray_message.splitlines() if line.strip().startswith("- ")]
    names = ", ".join(s.split(":")[0] for s in stages) or "unknown"
    return (
        f"knowledge base {kb.name!r}: the ingest pipeline moved no batch for {kb.stall_timeout_s:g} s (stall_timeout_s); "
        f"stalled stage: {names} ({'; '.join(stages)}). The chunker reserved {plan.chunker_cpus:g} CPU and {plan.embed_actors} embedder(s) "
        f"{plan.embed_cpus:g} CPU" + (f" and {plan.embed_gpus:g} GPU" if plan.embed_gpus else "") + " each: free those resources on the "
        f"Ray cluster (other jobs, Serve replicas), or raise knowledge_bases.{kb.name}.stall_timeout_s if a stage is legitimately this slow"
    )


def kb_documents(kb, refused: list[tuple[str, str]] | None = None) -> list[str]:
    """Every document of a knowledge base, sorted.

    A source root that is present but holds no document (an unmounted share, an emptied
    directory) is an error: read as "no documents", it would delete every chunk it held.
    Files that are not regular files inside their source's root are left out and, if `refused`
    is given, added to it as `(path, reason)`, once each.

    Raises:
        FileNotFoundError: a source matches nothing, or is present but holds no document (each named).
    """
    found: set[str] = set()
    left_out: dict[str, str] = {}
    problems = []
    for src in kb.sources:
        src_refused: list[tuple[str, str]] = []
        try:
            found.update(find_documents([src], src_refused))
        except FileNotFoundError as e:
            if not is_uri(src) and os.path.isdir(src) and not src_refused:
                problems.append(
                    f"source {src!r} is present but holds no document (an unmounted share?); refusing to ingest, since that would "
                    f"delete every chunk it held: mount or fill it, or remove it from knowledge_bases.{kb.name}.sources"
                )
            else:
                problems.append(str(e))
        left_out.update(src_refused)
    if problems:
        raise FileNotFoundError(f"knowledge base {kb.name!r}: " + "; ".join(problems))
    if refused is not None:
        refused.extend((path, reason) for path, reason in sorted(left_out.items()) if path not in found)
    return sorted(found)


def read_sources(sources: list[str], num_cpus: float = 1.0, max_bytes: int | None = None):
    """A Ray Dataset of `{"path", "bytes", "error"}` rows, one per document.

    Documents at URIs are read by whichever node runs the task. Local paths exist only on the
    driver's machine (on a cluster, the driver's node), so their reads are pinned to the
    driver's node: nothing assumes the other nodes share its disk.

    Args:
        num_cpus: what each read reserves. `ingest` passes the chunker's, so that Ray Data fuses
            the reads into the chunker's actors (which then run on the driver's node) instead of
            running read tasks that need CPUs of their own beside the actor pools.
        max_bytes: a document larger than this is not read: its row has no bytes and an `error`
            (as has one that is not a regular file), which `DocumentChunker` reports.
    """
    import ray

    ds = ray.data.from_items([{"path": s} for s in sources])
    # Every Ray node carries its id as the label ray.io/node-id: a hard constraint to this node.
    pin = {"ray.io/node-id": ray.get_runtime_context().get_node_id()} if any(not is_uri(s) for s in sources) else None
    return ds.map(_read_row, fn_kwargs={"max_bytes": max_bytes}, num_cpus=num_cpus, label_selector=pin)


def _read_row(row: dict[str, Any], max_bytes: int | None) -> dict[str, Any]:
    try:
        return {"path": row["path"], "bytes": read_document(row["path"], max_bytes), "error": ""}
    except DocumentError as e:
        return {"path": row["path"], "bytes": b"", "error": str(e)}


ROW_KEYS = tuple(f for f in FIELDS if f not in ("source_hash", "vector"))  # what the chunker gives a row (the store adds source_hash, the embedder vector)
