"""Evaluation runs: LoRA, RAG or both, answered through the endpoint's engine and scored with intervals.

An evaluation set is JSONL, one question per line:

    {"question": "...", "answer": "..." | "answers": [...], "sources": ["07-warranty.md"], "options": ["A text", "B text"]}

`answer`/`answers` are the reference answers; `sources` (optional) the documents that answer the
question, as citations name them (relative to the knowledge base's root); `options` (optional)
make it a multiple-choice question whose reference answer is one of them (or its letter).
With a response format (`load_response_format`) every answer follows its JSON schema, and a JSON
answer is scored by what it says and cites (`read_answer`).

This module owns the evaluation set, the variants (base, base + RAG, each adapter without and with
its knowledge base), answering every question with every variant, the per-question scores and
their summary, and `evaluate`'s typed result (`EvalResult`, what eval.json holds). The metrics
themselves are in `lorag.metrics`, the report files in `lorag.report`, and routing accuracy
(`model: "auto"`) in `lorag.routing_eval`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, model_serializer, model_validator

from lorag.metrics import Interval, choice, choice_correct, citation_hit, contains_answer, exact_match, interval, read_answer, recall_at_k, token_f1


# -- the result ---------------------------------------------------------------------------------


class ComparedVariant(BaseModel):
    """A variant as the report names it."""

    name: str  # "base", "base+rag", "support", "support+rag"
    adapter: str | None  # `name@vN`; None: the base model
    kb: str | None  # the knowledge base it retrieves from; None: no retrieval


class VariantSummary(BaseModel):
    """One variant's scores: per metric, its mean and 95% interval over the questions it applies to.

    None where it applies to none (no options, no gold sources, no retrieval, no answer style);
    those are left out when written, so eval.json names only the metrics a variant has.
    """

    exact_match: Interval | None = None
    f1: Interval | None = None  # token F1
    contains: Interval | None = None  # open questions only
    choice_accuracy: Interval | None = None  # multiple-choice questions only
    citation_accuracy: Interval | None = None  # questions with gold sources
    retrieval_recall: Interval | None = None  # questions with gold sources, answered with retrieval
    style_adherence: Interval | None = None  # variants held to an answer style
    completion_tokens: Interval | None = None
    seconds: Interval | None = None

    def scores(self) -> dict[str, Interval]:
        """The metrics it has, in `METRICS` order."""
        return {m: s for m in METRICS if (s := getattr(self, m)) is not None}

    @model_serializer(mode="wrap")
    def _only_present(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


METRICS = tuple(VariantSummary.model_fields)  # what `per_question` scores, in report order


class VariantAnswer(BaseModel):
    """One variant's answer to one question, as the report keeps it."""

    text: str
    cited: list[str]  # sources the answer cites with [n]
    retrieved: list[str]  # sources of the retrieved chunks, in rank order


class AnsweredQuestion(BaseModel):
    """One question with every variant's answer. Written flat, as eval.json has always held it:
    {"question", "reference", "sources", <variant name>: {"text", "cited", "retrieved"}, ...}."""

    question: str
    reference: list[str]  # the reference answers
    sources: list[str]  # the gold sources
    by_variant: dict[str, VariantAnswer]  # variant name -> its answer

    @model_serializer(mode="wrap")
    def _flat(self, handler) -> dict:
        data = handler(self)
        by_variant = data.pop("by_variant")
        return {**data, **by_variant}

    @model_validator(mode="before")
    @classmethod
    def _nested(cls, data):
        """Read the flat form back (an eval.json): every key but the question's own is a variant."""
        if isinstance(data, dict) and "by_variant" not in data:
            own = ("question", "reference", "sources")
            return {**{k: data[k] for k in own if k in data}, "by_variant": {k: v for k, v in data.items() if k not in own}}
        return data


class EvalResult(BaseModel):
    """What `evaluate` returns; `model_dump()` is eval.json."""

    dataset: str
    questions: int
    variants: list[ComparedVariant]
    summary: dict[str, VariantSummary]  # variant name -> its scores
    answers: list[AnsweredQuestion]  # per question, each variant's answer, cited and retrieved sources


# -- evaluation sets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    """One question of an evaluation set."""

    question: str
    answers: list[str]
    sources: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    line: int = 0


def load_eval_set(path: str | Path) -> list[EvalItem]:
    """The questions of a JSONL evaluation set.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is not a JSON object with a non-empty `question` and `answer` (or
            `answers`), or a multiple-choice answer is not one of its options; every bad line is
            named, with its number, in one error.
    """
    return read_jsonl(path, "evaluation set", _item)


def read_jsonl(path: str | Path, what: str, parse) -> list:
    """`parse(record, line number)` of each non-blank line of a JSONL file; a ValueError it raises
    (or invalid JSON) is collected, and every bad line is named, with its number, in one error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    items, problems = [], []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            items.append(parse(json.loads(raw), n))
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: invalid JSON ({e.msg})")
        except ValueError as e:
            problems.append(f"line {n}: {e}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else ""))
    if not items:
        raise ValueError(f"{path}: no questions")
    return items


def _item(rec, n: int) -> EvalItem:
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object")
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("`question` must be a non-empty string")
    answers = rec.get("answers", [rec["answer"]] if "answer" in rec else None)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError("`answer` (a string) or `answers` (a list of strings) is required")
    sources, options = rec.get("sources", []), rec.get("options", [])
    for name, value in (("sources", sources), ("options", options)):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"`{name}` must be a list of strings")
    if options and choice(answers[0], options) is None:
        raise ValueError(f"the answer {answers[0]!r} is not one of its options (or their letters A-{chr(64 + len(options))})")
    return EvalItem(question, answers, sources, options, n)


# -- running the variants ----------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of answering: a model (the base, or an adapter `name@vN`), with or without its knowledge base."""

    name: str  # "base", "base+rag", "support", "support+rag"
    adapter: str | None
    kb: str | None
    system_prompt: str | None = None
    style: str | None = None  # the adapter's `answer_style` (a regular expression its answers match)


@dataclass
class Answer:
    """One variant's answer to one question."""

    text: str
    retrieved: list[str]  # sources of the retrieved chunks, in rank order, as citations name them
    cited: list[str]  # sources the answer cites (`cited_sources`)
    completion_tokens: int
    seconds: float


def cited_sources(text: str, retrieved: list[str]) -> list[str]:
    """The sources an answer cites (`read_answer`'s numbers, 1-based into `retrieved`), in order,
    each once; numbers that name no retrieved source are ignored."""
    out: list[str] = []
    for n in read_answer(text)[1]:
        if 1 <= n <= len(retrieved) and retrieved[n - 1] not in out:
            out.append(retrieved[n - 1])
    return out


def load_response_format(path: str | Path) -> dict:
    """The OpenAI `response_format` in a JSON file: the whole object (its "type" is text,
    json_object or json_schema), or a bare JSON schema, which means
    `{"type": "json_schema", "json_schema": {"name": "eval", "schema": <the file>}}`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a JSON object (naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"response format {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"response format {path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"response format {path}: expected a JSON object (a response_format, or a JSON schema)")
    # A bare schema has a "type" too ("object"): a response_format's is one of OpenAI's three.
    return data if data.get("type") in ("text", "json_object", "json_schema") else {"type": "json_schema", "json_schema": {"name": "eval", "schema": data}}


def plan_variants(cfg, adapters: list[tuple[str, str | None, str | None]], styles: dict[str, str] | None = None,
                  kbs: list[str] | None = None) -> list[Variant]:
    """base, then base + RAG with each knowledge base, then each adapter without and with its
    knowledge base.

    Args:
        adapters: (adapter id `name@vN`, its knowledge base or None, its system prompt or None).
        kbs: the knowledge bases of the base + RAG variants (default: those the adapters are bound to).
        styles: adapter id -> its `answer_style`. The base variants are held to it too when all
            the adapters that have one share it (to show what the adapter changed).
    """
    styles = styles or {}
    shared = next(iter(set(styles.values()))) if len(set(styles.values())) == 1 else None
    out = [Variant("base", None, None, None, shared)]
    kbs = list(dict.fromkeys(kbs if kbs is not None else [kb for _, kb, _ in adapters if kb]))
    for kb in kbs:
        out.append(Variant("base+rag" if len(kbs) == 1 else f"base+rag:{kb}", None, kb, None, shared))
    for adapter, kb, system_prompt in adapters:
        name = adapter.split("@")[0]
        out.append(Variant(name, adapter, None, system_prompt, styles.get(adapter)))
        if kb:
            out.append(Variant(f"{name}+rag", adapter, kb, system_prompt, styles.get(adapter)))
    return out


async def answer_all(engine, items: list[EvalItem], variants: list[Variant], retrieve, roots: dict[str, list[str]],
                     max_tokens: int, progress=None, grammar: str | None = None) -> dict[str, list[Answer]]:
    """Every variant's answer to every question, through the endpoint's prompt builder and engine.

    All requests go to the engine at once, so base and adapter rows share batches as they do on
    the endpoint; each question is retrieved once per knowledge base.

    Args:
        engine: a `lorag.engine.Engine` (or anything with its `generate`).
        retrieve: `(kb name, question) -> hits`, as the endpoint retrieves (`lorag.retrieval.search`).
        roots: each knowledge base's source roots, to name sources as citations do.
        max_tokens: per answer; answers are greedy.
        progress: optional `(done, total)` callback.
        grammar: every answer follows it (`engine.grammars.compile` of a response format); None: free text.
    """
    import asyncio
    import time

    from lorag.engine import SamplingParams
    from lorag.prompts import chat_prompt
    from lorag.retrieval import relative_source

    hits: dict[tuple[str, int], list] = {}
    for kb in dict.fromkeys(v.kb for v in variants if v.kb):
        for i, item in enumerate(items):
            hits[kb, i] = await asyncio.to_thread(retrieve, kb, item.question)
    params = SamplingParams(max_tokens=max_tokens, grammar=grammar)
    total, done = len(items) * len(variants), [0]

    async def one(v: Variant, i: int) -> Answer:
        found = hits[v.kb, i] if v.kb else []
        retrieved = [relative_source(h["source"], roots.get(v.kb, [])) for h in found]
        start = time.perf_counter()
        c = await engine.generate(chat_prompt([{"role": "user", "content": items[i].question}], found, v.system_prompt), params, v.adapter)
        done[0] += 1
        if progress:
            progress(done[0], total)
        return Answer(c.text, retrieved, cited_sources(c.text, retrieved) if found else [], c.completion_tokens, time.perf_counter() - start)

    results = await asyncio.gather(*(one(v, i) for v in variants for i in range(len(items))))
    return {v.name: results[j * len(items) : (j + 1) * len(items)] for j, v in enumerate(variants)}


def per_question(item: EvalItem, a: Answer, k: int, style: str | None = None) -> dict[str, float | None]:
    """The metrics of one answer (None where they do not apply: no options, no gold sources, no
    retrieval, no answer style). Answer metrics read what it says (`read_answer`: without its [n]
    citation marks; a JSON answer's "answer" field); style adherence (`re.search(style, answer)`)
    reads it as it was written."""
    text = read_answer(a.text)[0]
    return {
        "style_adherence": float(re.search(style, a.text.strip()) is not None) if style else None,
        "exact_match": exact_match(text, item.answers),
        "f1": token_f1(text, item.answers),
        "contains": contains_answer(text, item.answers) if not item.options else None,
        "choice_accuracy": choice_correct(text, item) if item.options else None,
        "citation_accuracy": citation_hit(a.cited, item.sources) if item.sources else None,
        "retrieval_recall": recall_at_k(a.retrieved, item.sources, k) if item.sources and a.retrieved else None,
        "completion_tokens": float(a.completion_tokens),
        "seconds": a.seconds,
    }


def summarize(items: list[EvalItem], answers: dict[str, list[Answer]], k: int, seed: int = 0,
              styles: dict[str, str | None] | None = None) -> dict[str, VariantSummary]:
    """Per variant and metric: mean, 95% bootstrap interval and the number of questions it covers.
    `styles`: variant name -> the answer style its answers are held to."""
    out: dict[str, VariantSummary] = {}
    for name, rows in answers.items():
        scores = [per_question(item, a, k, (styles or {}).get(name)) for item, a in zip(items, rows)]
        applied = {m: [s[m] for s in scores if s[m] is not None] for m in METRICS}
        out[name] = VariantSummary(**{m: interval(values, seed) for m, values in applied.items() if values})
    return out


# -- the whole evaluation ----------------------------------------------------------------------


def evaluate(cfg, dataset: str | Path, adapters: list[str] | None = None, max_tokens: int = 64, progress=None,
             response_format: str | Path | None = None) -> EvalResult:
    """Answer an evaluation set with every variant and score it; Ray need not run.

    Args:
        cfg: the `LoragConfig`.
        dataset: the JSONL evaluation set (`load_eval_set`).
        adapters: adapter names (optionally `name@vN`) to compare; default: every adapter of the
            config that has a trained version. With none (`[]`, or none trained), the base
            model is compared with the base model + RAG on each knowledge base of the config.
        max_tokens: per answer (greedy).
        progress: optional `(done, total)` callback.
        response_format: a JSON file (`load_response_format`) every answer follows; None: free text.

    Returns:
        The variants, their `summarize`d scores and, per question, each variant's answer, cited
        and retrieved sources (`lorag.report` writes it).

    Raises:
        ValueError: an adapter has no trained version or is not in the config, or the response
            format is not one the engine can follow (naming the file and why).
    """
    import asyncio

    from lorag.adapters import AdapterStore
    from lorag.engine import Engine
    from lorag.schemas import APIError

    items = load_eval_set(dataset)
    answer_format = load_response_format(response_format) if response_format is not None else None
    store = AdapterStore(cfg.adapter_store)
    chosen, styles = _compared_adapters(cfg, store, adapters)
    # base + RAG with every knowledge base the compared adapters are bound to; with no adapter to
    # compare (none trained yet), with every knowledge base of the config: RAG alone vs the base.
    kbs = [kb for _, kb, _ in chosen if kb] if chosen else [kb.name for kb in cfg.knowledge_bases]
    variants = plan_variants(cfg, chosen, styles, kbs)
    search, roots, k = _retrieval(cfg, {v.kb for v in variants if v.kb})

    engine = Engine(cfg, cfg.base_model, store)
    try:
        grammar = engine.grammars.compile(answer_format) if answer_format else None  # before any answer: a bad schema fails at once
        answers = asyncio.run(answer_all(engine, items, variants, search, roots, max_tokens, progress, grammar))
    except APIError as e:  # the schema cannot be followed: one line that names the file
        raise ValueError(f"response format {response_format}: {' '.join(e.message.split())}") from None
    finally:
        engine.close()
    return EvalResult(
        dataset=str(dataset),
        questions=len(items),
        variants=[ComparedVariant(name=v.name, adapter=v.adapter, kb=v.kb) for v in variants],
        summary=summarize(items, answers, k, styles={v.name: v.style for v in variants}),
        answers=[AnsweredQuestion(question=it.question, reference=it.answers, sources=it.sources,
                                  by_variant={name: VariantAnswer(text=rows[i].text, cited=rows[i].cited, retrieved=rows[i].retrieved)
                                              for name, rows in answers.items()})
                 for i, it in enumerate(items)],
    )


def _compared_adapters(cfg, store, adapters: list[str] | None) -> tuple[list[tuple[str, str | None, str | None]], dict[str, str]]:
    """The adapters to compare as `plan_variants` takes them ((`name@vN`, knowledge base, system
    prompt), the knowledge base only when the config has it) and their answer styles."""
    from lorag.adapters import AdapterNotFoundError

    chosen, styles = [], {}
    names = adapters if adapters is not None else [a.name for a in cfg.adapters if store.versions(a.name)]
    for ref in names:
        name, _, version = ref.partition("@")
        try:
            bound = store.binding(cfg, name, version or None)
        except (AdapterNotFoundError, ValueError) as e:
            raise ValueError(f"adapter {ref!r}: {e}; train it first (`lorag train -a {name}`)") from None
        kb = bound.knowledge_base
        chosen.append((f"{name}@v{bound.number}", kb if kb in {k.name for k in cfg.knowledge_bases} else None, bound.system_prompt))
        if bound.answer_style:
            styles[f"{name}@v{bound.number}"] = bound.answer_style
    return chosen, styles


def _retrieval(cfg, kbs: set[str]):
    """(`(kb, question) -> hits` as the endpoint retrieves, each knowledge base's source roots, the
    largest top_k) for the knowledge bases the variants retrieve from."""
    from lorag.embed import Embedder
    from lorag.handle import open_store
    from lorag.retrieval import search as retrieval_search

    embedder = Embedder.of(cfg) if kbs else None
    stores = {kb: open_store(cfg.milvus_uri(cfg.knowledge_base(kb)), cfg.knowledge_base(kb).token) for kb in kbs}
    k = max((cfg.knowledge_base(kb).top_k for kb in kbs), default=0)

    def search(kb: str, q: str):
        return retrieval_search(stores[kb], cfg.knowledge_base(kb), q, embedder)

    return search, {kb: cfg.knowledge_base(kb).sources for kb in kbs}, k
