"""Files into rows: documents into knowledge-base chunks, and JSONL into training examples.

Knowledge bases: find files, chunk them, and the Ray Data ingest pipeline.

The pipeline is read (Ray Data `read_binary_files`) -> chunk (`flat_map`) -> embed
(`map_batches(Embedder)` on an actor pool) -> upsert into Milvus, streamed so that writing
overlaps embedding. Chunk ids are a hash of knowledge base, source, chunk index and content, and
writes are upserts, so re-running an ingest leaves the same entity count.

`chunk_text` is the pure heart of it and is tested with a table.

Training examples: JSONL `{"prompt", "completion"}` or `{"messages": [{"role", "content"}, ...]}`
(the last message is the assistant's answer), rendered with the base model's chat template; loss
is taken on the answer tokens only (`encode_example`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOC_SUFFIXES = (".md", ".markdown", ".txt")
IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A training file is missing or has a malformed line (the message gives file:line and why)."""

_BOUNDARY = re.compile(r"\n\s*\n|\n(?=#{1,6} )")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int
    text: str


def chunk_text(text: str, size: int, overlap: int) -> list[Chunk]:
    """Split `text` into chunks of at most `size` characters with about `overlap` shared.

    Splits prefer a paragraph break or a Markdown heading, then whitespace, then any character,
    and never cut before half of `size`. Offsets index into `text`, so `text[c.start:c.end]`
    is the chunk before stripping; chunks that are only whitespace are dropped.

    Args:
        text: the document.
        size: maximum chunk length in characters.
        overlap: characters repeated from the end of one chunk at the start of the next.

    Returns:
        Chunks in document order.
    """
    assert 0 <= overlap < size, f"overlap {overlap} must be in [0, size={size})"
    n = len(text)
    chunks: list[Chunk] = []
    start = 0
    while start < n:
        end = n if n - start <= size else _split_point(text, start, start + size)
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            trail = len(piece) - len(piece.rstrip())
            chunks.append(Chunk(start + lead, end - trail, piece.strip()))
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        # Start the overlap on a word boundary so no chunk opens mid-word.
        space = text.find(" ", nxt, end)
        nl = text.find("\n", nxt, end)
        cands = [c + 1 for c in (space, nl) if c != -1]
        start = min(cands) if overlap and cands else (nxt if overlap else end)
    return chunks


def _split_point(text: str, start: int, limit: int) -> int:
    floor = start + (limit - start) // 2
    best = -1
    for m in _BOUNDARY.finditer(text, floor, limit):
        best = m.end()
    if best > floor:
        return best
    ws = max(text.rfind(" ", floor, limit), text.rfind("\n", floor, limit))
    return ws + 1 if ws > floor else limit


def chunk_id(kb: str, source: str, index: int, text: str) -> str:
    """Deterministic chunk id: the same chunk of the same document always gets the same id."""
    return hashlib.sha256(f"{kb}\0{source}\0{index}\0{text}".encode()).hexdigest()[:32]


def document_title(text: str, path: str) -> str:
    """The first Markdown heading, else the file name without suffix."""
    m = _HEADING.search(text)
    return m.group(2)[:500] if m else Path(path).stem


def find_documents(sources: list[str]) -> list[str]:
    """Expand files, directories (recursively) and glob patterns into a sorted list of document paths.

    Raises:
        FileNotFoundError: a source matches nothing, or nothing at all is found.
    """
    found: set[str] = set()
    missing = []
    for src in sources:
        matches = glob.glob(src, recursive=True) if glob.has_magic(src) else ([src] if os.path.exists(src) else [])
        if not matches:
            missing.append(src)
        for m in matches:
            if os.path.isdir(m):
                for root, _, files in os.walk(m):
                    found.update(os.path.join(root, f) for f in files if f.lower().endswith(DOC_SUFFIXES))
            elif os.path.isfile(m):
                found.add(os.path.abspath(m))
    if missing:
        raise FileNotFoundError(f"knowledge-base sources match no file: {missing}")
    if not found:
        raise FileNotFoundError(f"no documents ({', '.join(DOC_SUFFIXES)}) under {sources}")
    return sorted(os.path.abspath(p) for p in found)


class DocumentChunker:
    """Ray Data `flat_map` stage: one file row (`bytes`, `path`) in, its chunk rows out."""

    def __init__(self, kb: str, size: int, overlap: int):
        self.kb, self.size, self.overlap = kb, size, overlap

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        path = row["path"]
        text = row["bytes"].decode("utf-8", errors="replace")
        title = document_title(text, path)
        return [
            {
                "id": chunk_id(self.kb, path, i, c.text),
                "text": c.text,
                "source": path,
                "title": title,
                "chunk_index": i,
                "start": c.start,
                "end": c.end,
            }
            for i, c in enumerate(chunk_text(text, self.size, self.overlap))
        ]


@dataclass
class IngestReport:
    knowledge_base: str
    uri: str
    documents: int
    chunks_written: int
    chunks_removed: int
    entities: int
    seconds: float


def ingest(cfg, kb_name: str) -> IngestReport:
    """Build or refresh one knowledge base with Ray Data; Ray must be initialised by the caller.

    Args:
        cfg: the `LoragConfig`.
        kb_name: which of `cfg.knowledge_bases`.

    Returns:
        Counts of documents, chunks written and entities now in the collection.
    """
    import ray

    from lorag.embed import Embedder
    from lorag.milvus import open_store
    from lorag.models import resolve_model

    start = time.time()
    kb = cfg.knowledge_base(kb_name)
    files = find_documents(kb.sources)
    embedder_path = resolve_model(cfg.embedder, cfg.model_cache)
    dim = int(json.loads((embedder_path / "config.json").read_text())["hidden_size"])
    uri = cfg.milvus_uri(kb)
    store = open_store(uri, kb.token)
    store.ensure_collection(kb.collection, dim)

    ds = (
        ray.data.read_binary_files(files, include_paths=True)
        .flat_map(DocumentChunker(kb.name, kb.chunking.size, kb.chunking.overlap))
        .map_batches(
            Embedder,
            fn_constructor_kwargs={"model_path": str(embedder_path)},
            batch_size=kb.embed_batch_size,
            compute=ray.data.ActorPoolStrategy(size=kb.embed_actors),
            batch_format="numpy",
        )
    )
    written = 0
    keep: dict[str, list[str]] = {path: [] for path in files}
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        rows = [
            {
                "id": str(batch["id"][i]),
                "text": str(batch["text"][i]),
                "source": str(batch["source"][i]),
                "title": str(batch["title"][i]),
                "chunk_index": int(batch["chunk_index"][i]),
                "start": int(batch["start"][i]),
                "end": int(batch["end"][i]),
                "vector": batch["vector"][i].tolist(),
            }
            for i in range(len(batch["id"]))
        ]
        written += store.upsert(kb.collection, rows)
        for row in rows:
            keep[row["source"]].append(row["id"])
    # Only after every current chunk is written: drop chunks of changed and deleted documents.
    removed = store.prune(kb.collection, keep)
    return IngestReport(kb.name, uri, len(files), written, removed, store.count(kb.collection), time.time() - start)


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


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend the adapter's system prompt unless the conversation brings its own."""
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def encode_example(tokenizer, example: dict[str, Any], system_prompt: str | None, max_len: int) -> Encoded:
    """Token ids and labels for one example; only the final assistant answer carries loss.

    Examples longer than `max_len` lose the start of the prompt (and, if the answer alone is
    too long, the end of the answer), so every example keeps supervised tokens.

    The prompt is rendered exactly as serving renders it (chat template with the generation
    prompt), so the adapter learns to continue from what it will see at inference.
    """
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
