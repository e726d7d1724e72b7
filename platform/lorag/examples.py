"""Training examples: JSONL files into chat records, records into token ids and labels, and questions into sourced (RAFT) prompts.

A dataset is a JSONL file (or a directory of them) of `{"prompt", "completion"}` or
`{"messages": [{"role", "content"}, ...]}` lines, the last message the assistant's answer
(`load_examples`). Each record is rendered with the base model's chat template, as serving renders
it, and loss is taken on the answer tokens only (`encode_example`). An adapter bound to a knowledge
base trains on its questions wrapped in their retrieved passages (`with_retrieved_sources`), or,
RAFT-style, on its oracle passage among distractors from other documents (`raft_examples`), its
answer citing the passage that supports it (`support`, `cite_inline`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A training file is missing or has a malformed line (the message gives file:line and why)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


# -- JSONL into records --------------------------------------------------------------------------


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


# -- records into tokens ---------------------------------------------------------------------------


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


# -- questions into sourced prompts (retrieval, RAFT) ----------------------------------------------


def with_retrieved_sources(cfg, ad, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wrap each example's question in its knowledge base's top-k passages, as serving will.

    Training on the same prompt shape the adapter sees at inference teaches it to answer from
    (and cite) the sources instead of guessing.

    Raises:
        LookupError: the knowledge base has not been ingested.
    """
    from lorag.embed import Embedder
    from lorag.handle import open_store
    from lorag.prompts import augment, question
    from lorag.retrieval import search

    if not examples:
        return []
    kb = cfg.knowledge_base(ad.knowledge_base)
    raft = ad.train.raft
    store = open_store(cfg.milvus_uri(kb), kb.token)
    embedder = Embedder.of(cfg)
    questions = [question(ex["messages"]) for ex in examples]
    # RAFT needs the oracle and distractors from other documents: search deeper, without the per-document cap.
    k, searched = (4 * (raft.distractors + 2), kb.model_copy(update={"max_per_source": None})) if raft else (kb.top_k, kb)
    found = [search(store, searched, q, embedder, k) for q in questions]
    if raft:
        return [ex for ex, _ in raft_examples(examples, found, raft.distractors, raft.oracle_fraction, raft.cite, ad.train.seed)]
    return [{"messages": [*augment(ex["messages"][:-1], hits), ex["messages"][-1]]} for ex, hits in zip(examples, found)]


GROUNDED = 0.5  # share of a sentence's terms a passage must hold to be cited as its source
CLAIM_TERMS = 3  # sentences with fewer terms ("Just ask.") support nothing, unless the answer has no longer one
_SENTENCE = re.compile(r"((?<=[.!?])\s+)")  # split keeping the spaces between sentences


def raft_examples(examples: list[dict[str, Any]], found: list[list[dict[str, Any]]], distractors: int, oracle_fraction: float,
                  cite: bool, seed: int) -> list[tuple[dict[str, Any], int | None]]:
    """RAFT-style training examples (Zhang et al. 2024): each question's prompt holds its oracle
    passage among `distractors` passages from other documents, in a seeded random order; exactly
    round(oracle_fraction * n) examples, chosen at random, hold the oracle, the others one more
    distractor in its place (so the adapter also learns to answer when the sources miss).

    The oracle is the search hit that supports the example's answer best (`support`, at least
    `GROUNDED`; the first such on a tie), else its top hit: the search ranks by the question, but
    the passage that holds the answer is what the adapter must learn to find. With `cite`, an
    answer whose prompt holds a supporting oracle cites it as [n] after the sentence it supports
    (`cite_inline`); an answer from general knowledge cites nothing.

    Args:
        examples: `{"messages": [...]}` records ending with the assistant's answer.
        found: per example, its search hits best first (deep enough for the distractors).

    Returns:
        (the example as trained on, the oracle's 1-based position in its sources or None).
    """
    from lorag.prompts import augment

    rnd = random.Random(seed)
    n_oracle = round(oracle_fraction * len(examples))
    with_oracle = set(rnd.sample(range(len(examples)), n_oracle))
    out = []
    for i, (ex, hits) in enumerate(zip(examples, found)):
        if not hits:
            out.append((ex, None))
            continue
        answer = ex["messages"][-1]
        supports = [support(answer["content"], h) for h in hits]
        best = max(range(len(hits)), key=lambda j: (supports[j][0], -j))
        grounded = supports[best][0] >= GROUNDED
        oracle = hits[best] if grounded else hits[0]
        rest = [h for h in hits if h is not oracle]
        others = [h for h in rest if h["source"] != oracle["source"]]
        pool = (others + [h for h in rest if h["source"] == oracle["source"]])[: distractors + 1]
        passages = ([oracle] + pool[:distractors]) if i in with_oracle else pool[: distractors + 1]
        rnd.shuffle(passages)
        at = next((n for n, h in enumerate(passages, 1) if h is oracle), None)
        if at is not None and cite and grounded:
            answer = {**answer, "content": cite_inline(answer["content"], supports[best][1], at)}
        out.append(({"messages": [*augment(ex["messages"][:-1], passages), answer]}, at))
    return out


def support(answer: str, hit: dict[str, Any]) -> tuple[float, int]:
    """How well a passage supports an answer: the largest share of one sentence's distinct terms
    (`lorag.text.analyze`) that occur in the passage's heading path and text, and that
    sentence's index (in `_SENTENCE.split(answer)[::2]`). Sentences are judged one by one so a
    house style's greeting or sign-off does not hide the claim; sentences of fewer than
    `CLAIM_TERMS` terms count only when no sentence is longer. On the quickstart's training set a
    supporting passage holds 0.5-1.0 of its claim, a passage that misses 0.0-0.35."""
    from lorag.text import analyze

    passage = set(analyze(f"{hit.get('section', '')} {hit['text']}"))
    terms = [set(analyze(sentence)) for sentence in _SENTENCE.split(answer)[::2]]
    floor = CLAIM_TERMS if any(len(t) >= CLAIM_TERMS for t in terms) else 1
    shares = [(len(t & passage) / len(t), -i) for i, t in enumerate(terms) if len(t) >= floor]
    share, at = max(shares, default=(0.0, 0))
    return share, -at


def cite_inline(answer: str, sentence: int, n: int) -> str:
    """`answer` with `[n]` after its `sentence`-th sentence, before the final stop ("... 39 months
    [2]. Anything else?"): citing right after the claim, not after a sign-off, teaches the model
    to cite while it states the fact rather than as an afterthought it learns to stop before."""
    parts = _SENTENCE.split(answer)  # sentence, space, sentence, ...
    claim = parts[2 * sentence].rstrip()
    end = len(claim) if claim.endswith("...") else len(claim.rstrip(".!?"))
    parts[2 * sentence] = f"{claim[:end]} [{n}]{parts[2 * sentence][end:]}"
    return "".join(parts)
