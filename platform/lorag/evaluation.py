"""Evaluation sets and their metrics: is an answer right, did it cite the right source, and how sure is a difference.

An evaluation set is JSONL, one question per line:

    {"question": "...", "answer": "..." | "answers": [...], "sources": ["07-warranty.md"], "options": ["A text", "B text"]}

`answer`/`answers` are the reference answers; `sources` (optional) the documents that answer the
question, as citations name them (relative to the knowledge base's root); `options` (optional)
make it a multiple-choice question whose reference answer is one of them (or its letter).

The metrics are the usual ones of extractive QA (SQuAD's normalisation, exact match and token F1
against the best reference), whether the answer contains a reference (for short references inside
open answers), multiple-choice accuracy, citation accuracy (a gold source among the
cited ones) and retrieval recall@k; `bootstrap` gives a confidence interval of a mean and
`paired_bootstrap` of a difference between two variants on the same questions, so a difference on
a small set is not sold as a win.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_LETTER = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[).:]|$)")  # "B", "(b)", "C." or "D)": not "A fixture ..."


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
    return _read_jsonl(path, "evaluation set", _item)


def _read_jsonl(path: str | Path, what: str, parse) -> list:
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


# -- answer metrics ----------------------------------------------------------------------------


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    p = normalize(prediction)
    return float(any(p == normalize(r) for r in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """The best token-overlap F1 between the prediction and any reference (normalised words)."""
    best = 0.0
    p = normalize(prediction).split()
    for ref in references:
        r = normalize(ref).split()
        if not p or not r:
            best = max(best, float(p == r))
            continue
        common = sum((Counter(p) & Counter(r)).values())
        if common:
            precision, recall = common / len(p), common / len(r)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _spaced(text: str) -> str:
    """`normalize`, with punctuation as word breaks: "functools.lru_cache()" -> "functools lru cache"."""
    return " ".join(_ARTICLES.sub(" ", re.sub(r"[\W_]+", " ", text.lower())).split())


def contains_answer(prediction: str, references: list[str]) -> float:
    """1.0 when the prediction contains a reference as whole words, case and punctuation aside
    ("Use functools.lru_cache." contains "lru_cache"): the metric for short references (a name, a
    number, a flag) inside an open answer, where exact match is 0 and token F1 near it."""
    p = f" {_spaced(prediction)} "
    return float(any(r and f" {r} " in p for r in map(_spaced, references)))


def choice(answer: str, options: list[str]) -> int | None:
    """Which option an answer picks: a letter ("B", "(b)", "C. ...", "D) ..."), else the one option
    whose normalised text it contains (None when it names none, or more than one)."""
    m = _LETTER.match(answer)
    if m and ord(m.group(1).upper()) - 65 < len(options):
        return ord(m.group(1).upper()) - 65
    a = normalize(answer)
    named = [i for i, o in enumerate(options) if normalize(o) and normalize(o) in a]
    return named[0] if len(named) == 1 else None


def choice_correct(prediction: str, item: EvalItem) -> float:
    """1.0 when a multiple-choice prediction picks the reference's option."""
    picked = choice(prediction, item.options)
    return float(picked is not None and picked == choice(item.answers[0], item.options))


# -- sources ---------------------------------------------------------------------------------


def citation_hit(cited: list[str], gold: list[str]) -> float:
    """1.0 when a cited source is a gold one. Sources compare as paths relative to the knowledge
    base's root; a gold name without a folder also matches a cited path ending in it."""
    return float(any(_same_source(c, g) for c in cited for g in gold))


def recall_at_k(retrieved: list[str], gold: list[str], k: int) -> float:
    """1.0 when one of the first k retrieved sources is a gold one."""
    return citation_hit(retrieved[:k], gold)


def _same_source(cited: str, gold: str) -> bool:
    cited, gold = cited.replace("\\", "/").strip("/"), gold.replace("\\", "/").strip("/")
    return cited == gold or ("/" not in gold and cited.rsplit("/", 1)[-1] == gold)


# -- confidence ------------------------------------------------------------------------------


def bootstrap(values: list[float], samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and a percentile bootstrap interval over questions."""
    if not values:
        raise ValueError("no values to bootstrap")
    rnd, n = random.Random(seed), len(values)
    means = sorted(sum(values[rnd.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    tail = (1 - confidence) / 2
    return sum(values) / n, means[int(tail * samples)], means[min(samples - 1, int((1 - tail) * samples))]


def paired_bootstrap(a: list[float], b: list[float], samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, low, high) with questions resampled in pairs: a difference whose interval
    holds 0 is not a win for either side."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length ({len(a)} and {len(b)})")
    return bootstrap([x - y for x, y in zip(a, b)], samples, confidence, seed)


# -- running the variants ----------------------------------------------------------------------

_CITE = re.compile(r"\[(\d{1,2})\]")


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
    cited: list[str]  # sources the answer cites with [n]
    completion_tokens: int
    seconds: float


def cited_sources(text: str, retrieved: list[str]) -> list[str]:
    """The sources an answer cites as [n] (1-based into `retrieved`), in order, each once;
    numbers that name no retrieved source are ignored."""
    out: list[str] = []
    for m in _CITE.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= len(retrieved) and retrieved[n - 1] not in out:
            out.append(retrieved[n - 1])
    return out


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
                     max_tokens: int, progress=None) -> dict[str, list[Answer]]:
    """Every variant's answer to every question, through the endpoint's prompt builder and engine.

    All requests go to the engine at once, so base and adapter rows share batches as they do on
    the endpoint; each question is retrieved once per knowledge base.

    Args:
        engine: a `lorag.engine.Engine` (or anything with its `generate`).
        retrieve: `(kb name, question) -> hits`, as the endpoint retrieves (`lorag.retrieval.search`).
        roots: each knowledge base's source roots, to name sources as citations do.
        max_tokens: per answer; answers are greedy.
        progress: optional `(done, total)` callback.
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
    params = SamplingParams(max_tokens=max_tokens)
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


METRICS = ("exact_match", "f1", "contains", "choice_accuracy", "citation_accuracy", "retrieval_recall", "style_adherence", "completion_tokens", "seconds")


def per_question(item: EvalItem, a: Answer, k: int, style: str | None = None) -> dict[str, float | None]:
    """The metrics of one answer (None where they do not apply: no options, no gold sources, no
    retrieval, no answer style). Answer metrics read the text without its [n] citation marks;
    style adherence (`re.search(style, answer)`) reads it as it was written."""
    text = " ".join(_CITE.sub(" ", a.text).split())
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
              styles: dict[str, str | None] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and metric: mean, 95% bootstrap interval and the number of questions it covers.
    `styles`: variant name -> the answer style its answers are held to."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, rows in answers.items():
        scores = [per_question(item, a, k, (styles or {}).get(name)) for item, a in zip(items, rows)]
        out[name] = {}
        for metric in METRICS:
            values = [s[metric] for s in scores if s[metric] is not None]
            if values:
                mean, lo, hi = bootstrap(values, seed=seed)
                out[name][metric] = {"mean": mean, "low": lo, "high": hi, "n": len(values)}
    return out


# -- the whole evaluation ----------------------------------------------------------------------


def evaluate(cfg, dataset: str | Path, adapters: list[str] | None = None, max_tokens: int = 64, progress=None) -> dict:
    """Answer an evaluation set with every variant and score it; Ray need not run.

    Args:
        cfg: the `LoragConfig`.
        dataset: the JSONL evaluation set (`load_eval_set`).
        adapters: adapter names (optionally `name@vN`) to compare; default: every adapter of the
            config that has a trained version. With none (`[]`, or none trained), the base
            model is compared with the base model + RAG on each knowledge base of the config.
        max_tokens: per answer (greedy).
        progress: optional `(done, total)` callback.

    Returns:
        {"dataset", "questions", "variants": [{name, adapter, kb}], "summary": summarize(...),
         "answers": per question, each variant's answer, cited and retrieved sources}.

    Raises:
        ValueError: an adapter has no trained version or is not in the config.
    """
    import asyncio

    from lorag.adapters import AdapterNotFoundError, AdapterStore
    from lorag.embed import Embedder
    from lorag.engine import Engine
    from lorag.milvus import open_store
    from lorag.retrieval import search as retrieval_search

    items = load_eval_set(dataset)
    store = AdapterStore(cfg.adapter_store)
    chosen, styles = [], {}
    names = adapters if adapters is not None else [a.name for a in cfg.adapters if store.versions(a.name)]
    for ref in names:
        name, _, version = ref.partition("@")
        in_cfg = next((a for a in cfg.adapters if a.name == name), None)
        try:
            number = store.resolve_number(name, version or None)
            meta = store.metadata(name, number)
        except (AdapterNotFoundError, ValueError) as e:
            raise ValueError(f"adapter {ref!r}: {e}; train it first (`lorag train -a {name}`)") from None
        kb = in_cfg.knowledge_base if in_cfg else meta.get("knowledge_base")
        chosen.append((f"{name}@v{number}", kb if kb in {k.name for k in cfg.knowledge_bases} else None,
                       in_cfg.system_prompt if in_cfg else meta.get("system_prompt")))
        style = in_cfg.answer_style if in_cfg else meta.get("answer_style")
        if style:
            styles[f"{name}@v{number}"] = style
    # base + RAG with every knowledge base the compared adapters are bound to; with no adapter to
    # compare (none trained yet), with every knowledge base of the config: RAG alone vs the base.
    kbs = [kb for _, kb, _ in chosen if kb] if chosen else [kb.name for kb in cfg.knowledge_bases]
    variants = plan_variants(cfg, chosen, styles, kbs)

    kbs = {v.kb for v in variants if v.kb}
    embedder = Embedder(cfg.embedder, cache_dir=cfg.cache_dir) if kbs else None
    stores = {kb: open_store(cfg.milvus_uri(cfg.knowledge_base(kb)), cfg.knowledge_base(kb).token) for kb in kbs}
    k = max((cfg.knowledge_base(kb).top_k for kb in kbs), default=0)

    def search(kb: str, q: str):
        return retrieval_search(stores[kb], cfg.knowledge_base(kb), q, embedder)

    engine = Engine(cfg, cfg.base_model, store)
    try:
        roots = {kb: cfg.knowledge_base(kb).sources for kb in kbs}
        answers = asyncio.run(answer_all(engine, items, variants, search, roots, max_tokens, progress))
    finally:
        engine.close()
    return {
        "dataset": str(dataset),
        "questions": len(items),
        "variants": [{"name": v.name, "adapter": v.adapter, "kb": v.kb} for v in variants],
        "summary": summarize(items, answers, k, styles={v.name: v.style for v in variants}),
        "answers": [
            {"question": it.question, "reference": it.answers, "sources": it.sources,
             **{name: {"text": rows[i].text, "cited": rows[i].cited, "retrieved": rows[i].retrieved} for name, rows in answers.items()}}
            for i, it in enumerate(items)
        ],
    }


LABELS = {
    "exact_match": "exact match", "f1": "token F1", "contains": "contains answer", "choice_accuracy": "choice accuracy", "citation_accuracy": "citation accuracy",
    "retrieval_recall": "retrieval recall@k", "style_adherence": "answer style", "completion_tokens": "answer tokens", "seconds": "seconds per answer",
}


def report_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(column headers, one row per variant): mean [95% interval] per metric; tokens and seconds as means."""
    summary = result["summary"]
    metrics = [m for m in METRICS if any(m in s for s in summary.values())]
    rows = []
    for name, s in summary.items():
        rows.append([name, *(f"{s[m]['mean']:.3f} [{s[m]['low']:.2f}, {s[m]['high']:.2f}]" if m in s and m not in ("completion_tokens", "seconds")
                              else (f"{s[m]['mean']:.1f}" if m in s else "-") for m in metrics)])
    return ["variant", *(LABELS[m] for m in metrics)], rows


def report_markdown(result: dict) -> str:
    """The evaluation as a Markdown table (mean [95% interval] per variant and metric) and a verdict."""
    header, rows = report_table(result)
    lines = [f"# lorag eval: {result['questions']} questions from {result['dataset']}", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *verdict(result["summary"])]
    return "\n".join(lines) + "\n"


def verdict(summary: dict) -> list[str]:
    """One line per quality metric: the best variant, and whether its lead over the runner-up is
    clear (their 95% intervals do not overlap) or within noise."""
    out = []
    for m in ("f1", "contains", "choice_accuracy", "citation_accuracy", "style_adherence"):
        ranked = sorted(((s[m]["mean"], name, s[m]) for name, s in summary.items() if m in s), key=lambda t: -t[0])
        if len(ranked) < 2:
            continue
        (best, name, b), (second, other, o) = ranked[0], ranked[1]
        if best == second:
            out.append(f"- {LABELS[m]}: {name} and {other} tie at {best:.3f}.")
        elif b["low"] > o["high"]:
            out.append(f"- {LABELS[m]}: **{name}** wins ({best:.3f} against {other}'s {second:.3f}; the intervals do not overlap).")
        else:
            out.append(f"- {LABELS[m]}: {name} leads ({best:.3f} against {other}'s {second:.3f}), within noise on {b['n']} questions: "
                       f"the 95% intervals overlap.")
    return out


def write_report(result: dict, out_dir: str | Path) -> list[Path]:
    """eval.json, eval.md and eval.png (a bar chart of the quality metrics with their 95% intervals) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "eval.json", out / "eval.md"]
    written[0].write_text(json.dumps(result, indent=2))
    written[1].write_text(report_markdown(result))
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    summary = result["summary"]
    metrics = [m for m in METRICS if m not in ("completion_tokens", "seconds") and any(m in s for s in summary.values())]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(metrics), 4))
    width = 0.8 / max(1, len(summary))
    for j, (name, s) in enumerate(summary.items()):
        xs = [i + j * width for i, m in enumerate(metrics) if m in s]
        ms = [m for m in metrics if m in s]
        means = [s[m]["mean"] for m in ms]
        err = [[s[m]["mean"] - s[m]["low"] for m in ms], [s[m]["high"] - s[m]["mean"] for m in ms]]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], [LABELS[m] for m in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"lorag eval: {result['questions']} questions (95% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=100)
    plt.close(fig)
    return [*written, out / "eval.png"]


def store_reports(cfg, result: dict, written: list[Path]) -> list[str]:
    """Copy the report files into the version directory of every adapter the evaluation compared
    (`AdapterStore.add_report`: `<store>/<name>/v<N>/eval/<timestamp>/`), so the results travel
    with the adapter, also when the store is a URI and the job's own disk is gone; returns the locations."""
    from lorag.adapters import AdapterStore

    store = AdapterStore(cfg.adapter_store)
    refs = dict.fromkeys(v["adapter"] for v in result["variants"] if v["adapter"])
    return [store.add_report(name, number, written) for name, _, number in (ref.partition("@v") for ref in refs)]


# -- routing (`model: "auto"`) -------------------------------------------------------------------

BASE = "(base)"  # the routing label of "no adapter: the base model answers"


def load_routing_set(path: str | Path) -> list[tuple[str, str | None]]:
    """A labelled routing set: JSONL of {"question", "adapter": name or null (the base model)}.

    Raises:
        FileNotFoundError, ValueError: as `load_eval_set` (every bad line named at once).
    """
    return _read_jsonl(path, "routing set", _route_row)


def _route_row(rec, n: int) -> tuple[str, str | None]:
    if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not rec["question"].strip():
        raise ValueError("expected an object with a non-empty `question`")
    if "adapter" not in rec or not (rec["adapter"] is None or isinstance(rec["adapter"], str)):
        raise ValueError("`adapter` must be an adapter name, or null for the base model")
    return rec["question"], rec["adapter"]


def routing_profiles(cfg) -> list:
    """Each config adapter's routing profile: as the endpoint builds it for a trained adapter (its
    newest version's saved questions), else from the config's description and dataset."""
    from lorag.adapters import AdapterStore
    from lorag.data import load_examples
    from lorag.routing import Profile, adapter_profiles, training_questions

    store = AdapterStore(cfg.adapter_store)
    trained = {p.name: p for p in adapter_profiles(cfg, store, [a.name for a in cfg.adapters])[0]}
    return [trained.get(a.name) or Profile(a.name, a.description, training_questions(load_examples(a.dataset))) for a in cfg.adapters]


def evaluate_routing(cfg, dataset: str | Path, threshold: float | None = None) -> dict:
    """Route every question of a labelled set as `model: "auto"` does, and score it.

    Returns:
        {"dataset", "questions", "threshold", "accuracy": {mean, low, high, n}, "labels",
         "confusion": {expected: {routed: count}}, "rows": [{question, expected, routed, score, scores}]}.
    """
    from lorag.embed import Embedder
    from lorag.routing import Router

    rows = load_routing_set(dataset)
    names = {a.name for a in cfg.adapters}
    unknown = sorted({a for _, a in rows if a is not None and a not in names})
    if unknown:
        raise ValueError(f"{dataset}: adapters {unknown} are not in the config (it has {sorted(names)})")
    threshold = cfg.serve.route_threshold if threshold is None else threshold
    router = Router(Embedder(cfg.embedder, cache_dir=cfg.cache_dir).embed, routing_profiles(cfg), threshold)
    labels = [*(a.name for a in cfg.adapters), BASE]
    confusion = {e: {r: 0 for r in labels} for e in labels}
    out, hits = [], []
    for q, expected in rows:
        route = router.route(q)
        e, r = expected or BASE, route.adapter or BASE
        confusion[e][r] += 1
        hits.append(float(e == r))
        out.append({"question": q, "expected": e, "routed": r, "score": route.score, "scores": route.scores})
    mean, lo, hi = bootstrap(hits)
    return {"dataset": str(dataset), "questions": len(rows), "threshold": threshold, "accuracy": {"mean": mean, "low": lo, "high": hi, "n": len(hits)},
            "labels": labels, "confusion": confusion, "rows": out}


def routing_markdown(result: dict) -> str:
    """Routing accuracy and the confusion table (rows: the labelled adapter; columns: where it was routed)."""
    a, labels = result["accuracy"], result["labels"]
    lines = [f"# lorag eval --routing: {result['questions']} questions from {result['dataset']}", "",
             f"Routing accuracy {a['mean']:.3f} [95% interval {a['low']:.2f}, {a['high']:.2f}] at threshold {result['threshold']}.", "",
             "| labelled \\ routed | " + " | ".join(labels) + " |", "|" + " --- |" * (len(labels) + 1)]
    for e in labels:
        lines.append(f"| {e} | " + " | ".join(str(result["confusion"][e][r]) for r in labels) + " |")
    wrong = [r for r in result["rows"] if r["expected"] != r["routed"]]
    if wrong:
        lines += ["", "Misrouted:", *(f"- {r['question']!r}: {r['expected']} -> {r['routed']} (score {r['score']:.3f})" for r in wrong)]
    return "\n".join(lines) + "\n"
