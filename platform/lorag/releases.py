"""Adapter releases: which version `model: NAME` means now, how a version gets there, and how it leaves.

The adapter store is the registry (`lorag.adapters`): `NAME` is the version tagged `stable` (else
the newest), a canary (`adapters[].canary`) takes a sticky share of `NAME`'s requests, and every
tag move is recorded in the adapter's history. This module owns

- `Registry`: what a replica serves for `NAME`, read from the store at most every
  `serve.registry_refresh_s` seconds (a moved tag reaches every replica within that bound, with no
  restart; a removed version is never chosen: the one version a request resolves to is checked to
  exist, one small read); `choose` picks stable or canary per request, sticky per API key or `user`;
  `referenced` says which versions something points at (the others leave the replicas' slots).
- `compare` and `promote`: a candidate against the version a tag holds, on one evaluation set,
  with paired bootstrap intervals per metric the adapter's config names (`release_metrics`); the
  tag moves only if no metric is worse beyond noise, or with `force` (recorded as forced).
- `rollback`: the tag back to the version it held before its last move, in one step.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from lorag.adapter_record import Binding
from lorag.adapters import STABLE, AdapterNotFoundError, AdapterStore


def bucket(name: str, sticky: str) -> float:
    """Where a client falls in [0, 1) for adapter `name`: the same client, the same side."""
    return int.from_bytes(hashlib.sha256(f"{name}\0{sticky}".encode()).digest()[:8], "big") / 2**64


class Registry:
    """The adapter store as one replica sees it: tags and versions cached per adapter for
    `refresh_s` seconds; a version's record is read once (versions are immutable).

    Args:
        store: the adapter store.
        cfg: the config (each adapter's `canary`, and bindings: config over record).
        refresh_s: the longest a replica serves a tag's old target after it moved.
    """

    def __init__(self, store: AdapterStore, cfg, refresh_s: float | None = None):
        self.store, self.cfg = store, cfg
        self.refresh_s = cfg.serve.registry_refresh_s if refresh_s is None else refresh_s
        self._known: dict[str, tuple[float, list[int], dict[str, int]]] = {}  # name -> (read at, versions, tags)
        self._records: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def snapshot(self, name: str) -> tuple[list[int], dict[str, int]]:
        """(versions, tags) of `name`, at most `refresh_s` old."""
        now = time.monotonic()
        with self._lock:
            known = self._known.get(name)
        if known is None or now - known[0] >= self.refresh_s:
            known = (now, self.store.versions(name), self.store.tags(name))
            with self._lock:
                self._known[name] = known
                if len(self._known) > 4096:
                    self._known.clear()
        return known[1], known[2]

    def binding(self, name: str, version: str | None = None, sticky: str | None = None) -> Binding:
        """How `name` at `version` serves now; for a bare `name`, stable or the canary (`choose`).

        Raises:
            AdapterNotFoundError, ValueError: as `AdapterStore.resolve_number`.
        """
        def resolve() -> int:
            snapshot = self.snapshot(name)
            return self.choose(name, sticky, snapshot) if version is None else self.store.resolve_number(name, version, snapshot)

        try:
            number = resolve()
            stale = not self.store.exists(name, number)  # removed since the snapshot: never answer with it
        except AdapterNotFoundError:  # perhaps saved or tagged since the snapshot: look again before saying no
            stale = True
        if stale:
            with self._lock:
                self._known.pop(name, None)
            number = resolve()
        key = (name, number)
        record = self._records.get(key)
        if record is None:
            record = self.store.record(name, number)
            self._records[key] = record
        return Binding.of(self.cfg, name, number, record)

    def choose(self, name: str, sticky: str | None, snapshot: tuple[list[int], dict[str, int]] | None = None) -> int:
        """The version a plain `model: NAME` request gets: the canary's for its share of clients
        (`sticky`: the API key or the request's `user`; None: a random side), else `stable` (else the newest)."""
        versions, tags = snapshot or self.snapshot(name)
        canary = self.canary(name, (versions, tags))
        if canary is not None:
            weight = self.cfg.adapter(name).canary.weight
            if (bucket(name, sticky) if sticky is not None else random.random()) < weight:
                return canary
        return self.store.resolve_number(name, None, (versions, tags))

    def canary(self, name: str, snapshot: tuple[list[int], dict[str, int]] | None = None) -> int | None:
        """The canary version of `name` now (None: no canary configured, its tag unset or its version gone)."""
        ad = next((a for a in self.cfg.adapters if a.name == name), None)
        if ad is None or ad.canary is None:
            return None
        versions, tags = snapshot or self.snapshot(name)
        number = tags.get(ad.canary.tag) if ad.canary.tag else ad.canary.version
        return number if number in versions else None

    def referenced(self, name: str) -> set[int]:
        """The versions of `name` something points at: its tags, its newest, its canary."""
        versions, tags = self.snapshot(name)
        pointed = {v for v in tags.values() if v in versions} | ({versions[-1]} if versions else set())
        canary = self.canary(name, (versions, tags))
        return pointed | ({canary} if canary is not None else set())

    def forget(self, name: str, number: int) -> None:
        self._records.pop((name, number), None)


def rollback(store: AdapterStore, name: str, tag: str = STABLE) -> tuple[int, int]:
    """Move `tag` back to the version it held before its last move; returns (from, to).

    Raises:
        AdapterNotFoundError: the tag is unset, has no earlier version, or that version is gone.
    """
    tags = store.tags(name)
    if tag not in tags:
        raise AdapterNotFoundError(f"adapter {name!r} has no tag {tag!r} to roll back (tags: {sorted(tags) or 'none'})")
    moves = [m for m in store.history(name) if m.get("tag") == tag and m.get("version") == tags[tag]]
    previous = moves[-1].get("previous") if moves else None
    if previous is None:
        raise AdapterNotFoundError(f"{name}@{tag} (v{tags[tag]}) has no earlier version in its history (`lorag adapters history {name}`)")
    if previous not in store.versions(name):
        raise AdapterNotFoundError(f"{name}@{tag} was v{previous} before v{tags[tag]}, but v{previous} is no longer in the store")
    store.tag(name, previous, tag, {"action": "rollback"})
    return tags[tag], previous


@dataclass(frozen=True)
class MetricDelta:
    """One metric, candidate minus current, over the questions both were scored on."""

    metric: str
    candidate: float
    current: float
    delta: float
    low: float
    high: float
    n: int

    @property
    def worse(self) -> bool:
        """Worse beyond noise: the whole 95% interval of the difference is below zero."""
        return self.high < 0


@dataclass(frozen=True)
class Comparison:
    """A candidate against the version a tag holds, on one evaluation set."""

    deltas: list[MetricDelta]
    source: str  # where the answers came from: the stored reports, or a run of `lorag eval`

    @property
    def worse(self) -> list[str]:
        return [d.metric for d in self.deltas if d.worse]


def compare(candidate: dict[str, list[float | None]], current: dict[str, list[float | None]], metrics: list[str], source: str) -> Comparison:
    """Paired comparison per metric of per-question scores (None where a metric does not apply to a question).

    Raises:
        ValueError: a named metric that neither scored on any question both answered.
    """
    from lorag.metrics import paired_bootstrap

    deltas = []
    for m in metrics:
        pairs = [(a, b) for a, b in zip(candidate.get(m, []), current.get(m, [])) if a is not None and b is not None]
        if not pairs:
            raise ValueError(f"metric {m!r} applies to no question of this evaluation set (release_metrics names it): "
                             "use a set that has it (e.g. gold sources for citation_accuracy) or drop it from release_metrics")
        a, b = [x for x, _ in pairs], [y for _, y in pairs]
        delta, low, high = paired_bootstrap(a, b)
        deltas.append(MetricDelta(m, sum(a) / len(a), sum(b) / len(b), delta, low, high, len(pairs)))
    return Comparison(deltas, source)


@dataclass(frozen=True)
class Promotion:
    """What `promote` decided: the candidate, the version the tag held, the comparison (None when
    nothing held the tag), whether the tag moved, and the reports it was decided on."""

    candidate: int
    current: int | None
    comparison: Comparison | None
    moved: bool
    forced: bool
    reports: list[str]


def promote(cfg, store: AdapterStore, name: str, version: str | int | None, tag: str = STABLE, dataset: str | None = None,
            force: bool = False, max_tokens: int = 64, workdir: str | None = None, progress=None) -> Promotion:
    """Move `tag` to the candidate version only if it is not worse beyond noise than the version the
    tag holds on any of the adapter's `release_metrics`, on one evaluation set: the versions' stored
    `lorag eval` reports when both have one for the same questions (of `dataset`, when given),
    else a fresh evaluation of both on `dataset` (stored with each version, as `lorag eval` does).
    `force` moves the tag anyway (recorded as forced). The move is recorded in the history.

    Raises:
        ValueError: no stored reports to compare and no `dataset`; a metric no question has; the
            candidate already holds the tag.
        AdapterNotFoundError: no such adapter or version.
    """
    from lorag.evaluation import load_eval_set

    candidate = store.resolve_number(name, version if version is not None else "latest")
    current = store.tags(name).get(tag)
    if current == candidate:
        raise ValueError(f"{name}@v{candidate} already holds {tag!r}")
    if current is None or current not in store.versions(name):  # nothing to compare with: the first release
        store.tag(name, candidate, tag, {"action": "promote", "forced": False, "report": None})
        return Promotion(candidate, None, None, True, False, [])
    items = load_eval_set(dataset) if dataset else None
    questions = [it.question for it in items] if items else None
    stored = [_stored_result(store, name, n, questions) for n in (candidate, current)]
    if all(stored):
        results, reports, source = [r for r, _ in stored], [loc for _, loc in stored], "the stored lorag eval reports"
    elif dataset:
        results, reports = _evaluate_both(cfg, store, name, (candidate, current), dataset, max_tokens, workdir, progress)
        source = f"lorag eval of {dataset}"
    else:
        raise ValueError(f"no stored evaluation covers both {name}@v{candidate} and {name}@v{current} on the same questions: "
                         f"give --dataset FILE to evaluate them")
    scores = [version_scores(cfg, store, result, name, n, items) for result, n in zip(results, (candidate, current))]
    comparison = compare(scores[0], scores[1], list(cfg.adapter(name).release_metrics) if _named(cfg, name) else ["f1"], source)
    moved = force or not comparison.worse
    forced = moved and bool(comparison.worse)
    if moved:
        store.tag(name, candidate, tag, {"action": "promote", "forced": forced, "report": reports[0], "compared_with": reports[1],
                                         "metrics": {d.metric: [round(d.delta, 4), round(d.low, 4), round(d.high, 4)] for d in comparison.deltas}})
    return Promotion(candidate, current, comparison, moved, forced, reports)


def version_scores(cfg, store: AdapterStore, result, name: str, number: int, items=None) -> dict[str, list[float | None]]:
    """Per metric, the per-question scores of `name@vN` in an evaluation result: its variant with
    retrieval when it has one (as it serves), else its plain one. `items`: the evaluation set, for
    what a report does not keep (multiple-choice options)."""
    from lorag.evaluation import Answer, EvalItem, per_question

    ref = f"{name}@v{number}"
    mine = [v for v in result.variants if v.adapter == ref]
    if not mine:
        raise ValueError(f"the evaluation has no answers of {ref}")
    variant = next((v for v in mine if v.kb), mine[0])
    k = next((kb.top_k for kb in cfg.knowledge_bases if kb.name == variant.kb), 0)
    style = store.binding(cfg, name, number).answer_style
    by_question = {it.question: it for it in items or []}
    scores: dict[str, list[float | None]] = {}
    for q in result.answers:
        a = q.by_variant[variant.name]
        item = by_question.get(q.question) or EvalItem(q.question, q.reference, q.sources)
        for metric, value in per_question(item, Answer(a.text, a.retrieved, a.cited, 0, 0.0), k, style).items():
            scores.setdefault(metric, []).append(value)
    return scores


def _named(cfg, name: str) -> bool:
    return any(a.name == name for a in cfg.adapters)


def _stored_result(store: AdapterStore, name: str, number: int, questions: list[str] | None):
    """(the newest stored evaluation of `name@vN` with these questions (any, when None), its location), or None."""
    from lorag import storage
    from lorag.evaluation import EvalResult

    for location in reversed(store.reports(name, number)):
        fs, path = storage.filesystem(storage.join(location, "eval.json"))
        try:
            result = EvalResult.model_validate_json(storage.read_bytes(fs, path))
        except (OSError, ValueError):
            continue
        if any(v.adapter == f"{name}@v{number}" for v in result.variants) and (questions is None or [q.question for q in result.answers] == questions):
            return result, storage.join(location, "eval.json")
    return None


def _evaluate_both(cfg, store: AdapterStore, name: str, numbers: tuple[int, int], dataset: str, max_tokens: int, workdir, progress):
    """Evaluate each version on `dataset` (one run each: both are named `name`), store the reports with
    the versions as `lorag eval` does; returns (results, their eval.json locations)."""
    from pathlib import Path

    from lorag import storage
    from lorag.evaluation import evaluate
    from lorag.report import store_reports, write_report

    results, reports = [], []
    for n in numbers:
        result = evaluate(cfg, dataset, [f"{name}@v{n}"], max_tokens, progress=progress)
        out = Path(workdir or cfg.workdir) / "promote" / f"{name}-v{n}-{time.strftime('%Y%m%d-%H%M%S')}"
        written = write_report(result, out)
        location = next(loc for loc in store_reports(cfg, result, written) if f"/v{n}/" in loc.replace("\\", "/"))
        results.append(result)
        reports.append(storage.join(location, "eval.json"))
    return results, reports
