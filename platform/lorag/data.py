"""Files into rows: documents into a knowledge base (the Ray Data ingest), and JSONL into training examples.

Knowledge bases: `ingest` is read (Ray Data `read_binary_files`) -> parse and chunk (`flat_map`
of `lorag.documents.DocumentChunker` on an actor pool) -> embed (`map_batches(Embedder)` on an
actor pool, one GPU each when the cluster has GPUs) -> upsert into Milvus, streamed so that
writing overlaps embedding. It is incremental: chunk ids hash knowledge base, source, chunk index
and content, writes are upserts, documents whose bytes (and indexing settings) are unchanged and
fully stored are skipped, changed documents replace their chunks, deleted documents lose theirs,
and a document that fails to parse is reported and skipped (its old chunks stay).

Training examples: JSONL `{"prompt", "completion"}` or `{"messages": [{"role", "content"}, ...]}`
(the last message is the assistant's answer), rendered with the base model's chat template; loss
is taken on the answer tokens only (`encode_example`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorag.documents import DocumentChunker, document_hash, find_documents, read_document

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")
SCHEMA_VERSION = 2  # bump when chunk rows change meaning: every document is then re-indexed


class DatasetError(ValueError):
    """A training file is missing or has a malformed line (the message gives file:line and why)."""


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
        Counts of documents (seen, skipped as unchanged, failed with reasons), chunks written and
        removed, and the entities now in the collection.
    """
    import ray

    from lorag.embed import Embedder
    from lorag.milvus import is_lite, open_store
    from lorag.models import node_ref, resolve_model
    from lorag.storage import check_cluster_paths

    start = time.time()
    kb = cfg.knowledge_base(kb_name)
    check_cluster_paths(cfg, [kb_name])
    files = find_documents(kb.sources)
    embedder_path = resolve_model(cfg.embedder, cfg.model_cache)
    # Chunker and embedder actors may run on other nodes: they resolve the embedder themselves.
    embedder_ref, cache = node_ref(cfg.embedder, cfg.storage_root, cfg.model_cache), cfg.cache_dir
    dim = int(json.loads((embedder_path / "config.json").read_text())["hidden_size"])
    uri = cfg.milvus_uri(kb)
    store = open_store(uri, kb.token)
    # A knowledge base is derived data: one built by an older lorag or another embedder is rebuilt.
    rebuilt = store.incompatible(kb.collection, dim)
    if rebuilt:
        store.drop(kb.collection)
    store.ensure_collection(kb.collection, dim)

    # Skip documents that are stored whole with the same hash; redo the rest.
    stored = store.documents(kb.collection)
    fp = fingerprint(cfg, kb)
    todo = []
    for path in files:
        have = stored.get(path)
        complete = have is not None and have["doc_hash"] and have["count"] == have["n_chunks"]
        if not (complete and have["doc_hash"] == document_hash(read_document(path), fp)):
            todo.append(path)
    gone = sorted(set(stored) - set(files))

    written, failed = 0, []
    keep: dict[str, list[str]] = {}
    if todo:
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        ds = (
            read_sources(todo)
            .flat_map(
                DocumentChunker,
                fn_constructor_kwargs={
                    "kb": kb.name, "size": kb.chunking.size, "overlap": kb.chunking.overlap, "tokenizer_path": embedder_ref,
                    "fingerprint": fp, "text_field": kb.text_field, "title_field": kb.title_field, "cache_dir": cache,
                },
                compute=ray.data.ActorPoolStrategy(size=1),
            )
            .map_batches(
                Embedder,
                fn_constructor_kwargs={"model_path": embedder_ref, "threads": kb.embed_threads, "cache_dir": cache},
                batch_size=kb.embed_batch_size,
                compute=ray.data.ActorPoolStrategy(size=kb.embed_actors),
                batch_format="numpy",
                **({"num_gpus": 1} if gpus else {}),
            )
        )
        # A Milvus server takes writes in parallel; Milvus Lite has one writer (its owner actor).
        pool = ThreadPoolExecutor(1 if is_lite(uri) else 4)
        pending = []
        done_docs: set[str] = set()
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            rows = []
            for i in range(len(batch["id"])):
                source = str(batch["source"][i])
                if batch["error"][i]:
                    failed.append((source, str(batch["error"][i])))
                    continue
                row = {k: batch[k][i].item() if hasattr(batch[k][i], "item") else str(batch[k][i]) for k in ROW_KEYS}
                row["vector"] = batch["vector"][i].tolist()
                rows.append(row)
                keep.setdefault(source, []).append(row["id"])
                done_docs.add(source)
            if rows:
                pending.append(pool.submit(store.upsert, kb.collection, rows))
            while pending and (pending[0].done() or len(pending) > 8):
                written += pending.pop(0).result()
            if progress:
                progress(written, len(done_docs) + len(failed), len(todo))
        written += sum(f.result() for f in pending)
        pool.shutdown()
    # Only after every current chunk is written: drop chunks of changed and deleted documents.
    # A source the collection did not hold when this run started has no chunks but this run's,
    # so only re-indexed sources that were stored before need a delete (each is a scan on Lite).
    removed = store.prune(kb.collection, {s: ids for s, ids in keep.items() if s in stored}, gone)
    if written or removed:
        store.settle(kb.collection)
    return IngestReport(kb.name, uri, len(files), len(files) - len(todo), written, removed, store.count(kb.collection), time.time() - start, failed, rebuilt)


def read_sources(sources: list[str]):
    """A Ray Dataset of `{"path", "bytes"}` rows, one per document.

    Documents at URIs are read by whichever node runs the task. Local paths exist only on the
    driver's machine (on a cluster, the driver's node), so their reads are pinned to the
    driver's node: nothing assumes the other nodes share its disk.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ds = ray.data.from_items([{"path": s} for s in sources])
    pin = {}
    if any("://" not in s for s in sources):
        pin["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ds.map(_read_row, **pin)


def _read_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"path": row["path"], "bytes": read_document(row["path"])}


ROW_KEYS = ("id", "text", "source", "title", "section", "chunk_index", "start", "end", "doc_hash", "n_chunks")


# -- training examples (JSONL) -----------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def dataset_files(path: str | os.PathLike) -> list[Path]:
    """A JSONL file, or every `*.jsonl` under a directory (sorted).

    Raises:
        DatasetError: nothing there.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.jsonl"))
        if not files:
            raise DatasetError(f"no *.jsonl files under {path}")
        return files
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    return [path]


def load_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL training file (or a directory of them) into `{"messages": [...]}` records.

    `{"prompt", "completion"}` lines become a user and an assistant message.

    Raises:
        DatasetError: the path is missing or empty, or a line is malformed (`file:line: reason`).
    """
    out = []
    for file in dataset_files(path):
        with file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{file}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                out.append({"messages": _messages(rec, where)})
    if not out:
        raise DatasetError(f"{path}: no examples")
    return out


def dataset_hash(path: str | os.PathLike) -> str:
    """sha256 over the dataset's files (names relative to `path` and contents), for provenance."""
    h = hashlib.sha256()
    root = Path(path)
    for file in dataset_files(path):
        h.update(str(file.relative_to(root) if root.is_dir() else file.name).encode() + b"\0")
        h.update(file.read_bytes())
    return h.hexdigest()


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then (train, validation); validation gets at least one example when asked for."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = 0 if val_fraction <= 0 else max(1, round(len(examples) * val_fraction))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def _messages(rec: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DatasetError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise DatasetError(f"{where}: messages[{i}] must be {{'role': one of {_ROLES}, 'content': string}}")
        if msgs[-1]["role"] != "assistant":
            raise DatasetError(f"{where}: the last message must be the assistant's answer (got role {msgs[-1]['role']!r})")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise DatasetError(f"{where}: 'messages' needs a user message before the assistant's answer")
        return msgs
    missing = [k for k in ("prompt", "completion") if not isinstance(rec.get(k), str) or not rec.get(k).strip()]
    if missing:
        raise DatasetError(f"{where}: needs non-empty string fields 'prompt' and 'completion' (or 'messages'); missing or empty: {missing}")
    return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]


def encode_example(tokenizer, example: dict[str, Any], system_prompt: str | None, max_len: int) -> Encoded:
    """Token ids and labels for one example; only the final assistant answer carries loss.

    Examples longer than `max_len` lose the start of the prompt (and, if the answer alone is
    too long, the end of the answer), so every example keeps supervised tokens.

    The prompt is rendered exactly as serving renders it (chat template with the generation
    prompt), so the adapter learns to continue from what it will see at inference.
    """
    from lorag.prompts import with_system

    msgs = with_system(example["messages"], system_prompt)
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    # The answer is what the template adds for the last turn, end-of-turn token included.
    answer = full[len(prompt):] if full.startswith(prompt) else msgs[-1]["content"] + (tokenizer.eos_token or "")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    truncated = len(p_ids) + len(a_ids) > max_len
    if truncated:
        # Cutting the end would drop the answer (the only supervised part). Keep the prompt's end
        # (question and assistant header) and the answer's start instead.
        keep = max(max_len - len(a_ids), max_len // 4)
        p_ids, a_ids = p_ids[-keep:], a_ids[: max_len - keep]
    return Encoded(p_ids + a_ids, [IGNORE_INDEX] * len(p_ids) + a_ids, truncated)
