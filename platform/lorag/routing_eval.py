"""Routing evaluation (`lorag eval --routing`): how often `model: "auto"` picks the labelled adapter.

A routing set is JSONL of {"question", "adapter": name or null (the base model)}. Each question is
routed as the endpoint routes it (`lorag.routing.Router` over each adapter's profile), and the
result is the accuracy with its 95% interval and a confusion table (`RoutingResult`, what
routing.json holds; `routing_markdown` is routing.md).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from lorag.evaluation import read_jsonl
from lorag.metrics import Interval, interval

BASE = "(base)"  # the routing label of "no adapter: the base model answers"


class RoutedQuestion(BaseModel):
    """One question of a routing set: where it should go and where it went."""

    question: str
    expected: str  # the labelled adapter, or BASE
    routed: str  # the adapter the router picked, or BASE
    score: float  # the best adapter's score
    scores: dict[str, float]  # every adapter's score


class RoutingResult(BaseModel):
    """What `evaluate_routing` returns; `model_dump()` is routing.json."""

    dataset: str
    questions: int
    threshold: float  # the least score that routes to an adapter
    accuracy: Interval
    labels: list[str]  # the adapters of the config, then BASE
    confusion: dict[str, dict[str, int]]  # labelled -> routed -> count
    rows: list[RoutedQuestion]


def load_routing_set(path: str | Path) -> list[tuple[str, str | None]]:
    """A labelled routing set: JSONL of {"question", "adapter": name or null (the base model)}.

    Raises:
        FileNotFoundError, ValueError: as `lorag.evaluation.load_eval_set` (every bad line named at once).
    """
    return read_jsonl(path, "routing set", _route_row)


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
    from lorag.examples import load_examples
    from lorag.routing import Profile, adapter_profiles, training_questions

    store = AdapterStore(cfg.adapter_store)
    trained = {p.name: p for p in adapter_profiles(cfg, store, [a.name for a in cfg.adapters])[0]}
    return [trained.get(a.name) or Profile(a.name, a.description, training_questions(load_examples(a.dataset))) for a in cfg.adapters]


def evaluate_routing(cfg, dataset: str | Path, threshold: float | None = None) -> RoutingResult:
    """Route every question of a labelled set as `model: "auto"` does, and score it.

    Args:
        cfg: the `LoragConfig`.
        dataset: the JSONL routing set (`load_routing_set`).
        threshold: the route threshold to try (default: `serve.route_threshold`).

    Raises:
        ValueError: the set names an adapter the config does not have.
    """
    from lorag.embed import Embedder
    from lorag.routing import Router

    rows = load_routing_set(dataset)
    names = {a.name for a in cfg.adapters}
    unknown = sorted({a for _, a in rows if a is not None and a not in names})
    if unknown:
        raise ValueError(f"{dataset}: adapters {unknown} are not in the config (it has {sorted(names)})")
    threshold = cfg.serve.route_threshold if threshold is None else threshold
    router = Router(Embedder.of(cfg).embed, routing_profiles(cfg), threshold)
    labels = [*(a.name for a in cfg.adapters), BASE]
    confusion = {e: {r: 0 for r in labels} for e in labels}
    out, hits = [], []
    for q, expected in rows:
        route = router.route(q)
        e, r = expected or BASE, route.adapter or BASE
        confusion[e][r] += 1
        hits.append(float(e == r))
        out.append(RoutedQuestion(question=q, expected=e, routed=r, score=route.score, scores=route.scores))
    return RoutingResult(dataset=str(dataset), questions=len(rows), threshold=threshold, accuracy=interval(hits),
                         labels=labels, confusion=confusion, rows=out)


def routing_markdown(result: RoutingResult) -> str:
    """Routing accuracy and the confusion table (rows: the labelled adapter; columns: where it was routed)."""
    a, labels = result.accuracy, result.labels
    lines = [f"# lorag eval --routing: {result.questions} questions from {result.dataset}", "",
             f"Routing accuracy {a.mean:.3f} [95% interval {a.low:.2f}, {a.high:.2f}] at threshold {result.threshold}.", "",
             "| labelled \\ routed | " + " | ".join(labels) + " |", "|" + " --- |" * (len(labels) + 1)]
    for e in labels:
        lines.append(f"| {e} | " + " | ".join(str(result.confusion[e][r]) for r in labels) + " |")
    wrong = [r for r in result.rows if r.expected != r.routed]
    if wrong:
        lines += ["", "Misrouted:", *(f"- {r.question!r}: {r.expected} -> {r.routed} (score {r.score:.3f})" for r in wrong)]
    return "\n".join(lines) + "\n"
