"""Evaluation metrics: is an answer right, did it cite the right source, and how sure is a difference.

The metrics are the usual ones of extractive QA (SQuAD's normalisation, exact match and token F1
against the best reference), whether the answer contains a reference (for short references inside
open answers), multiple-choice accuracy, citation accuracy (a gold source among the cited ones)
and retrieval recall@k. `bootstrap` gives a confidence interval of a mean (`interval`, the typed
form the reports carry) and `paired_bootstrap` of a difference between two variants on the same
questions, so a difference on a small set is not sold as a win. `read_answer` says what an answer
says and cites, from plain text with [n] marks or from a JSON answer (structured output).

Pure functions of strings and numbers: `lorag.evaluation` and `lorag.routing_eval` apply them.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    from lorag.evaluation import EvalItem

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_LETTER = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[).:]|$)")  # "B", "(b)", "C." or "D)": not "A fixture ..."
_CITE = re.compile(r"\[(\d{1,2})\]")  # a citation mark: [n], 1-based into the retrieved sources


# -- reading an answer ------------------------------------------------------------------------


def read_answer(text: str) -> tuple[str, list[int]]:
    """What an answer says, without its [n] marks, and the numbers it cites, in order.

    An answer that parses as a JSON object (structured output) says its `"answer"` field when that
    is a string, else all its string values (depth-first, in order) joined by spaces; it cites the
    [n] marks in its strings, then the integers of a top-level `"citations"` array. Any other
    answer says its whole text and cites its [n] marks. Numbers are 1-based into the retrieved
    sources, as the response's `sources` are; their range is `cited_sources`' to check.
    """
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        return " ".join(_CITE.sub(" ", text).split()), [int(m.group(1)) for m in _CITE.finditer(text)]
    strings = " ".join(_strings(obj))
    said = obj["answer"] if isinstance(obj.get("answer"), str) else strings
    listed = obj.get("citations") if isinstance(obj.get("citations"), list) else []
    numbers = [int(m.group(1)) for m in _CITE.finditer(strings)] + [n for n in listed if isinstance(n, int) and not isinstance(n, bool)]
    return " ".join(_CITE.sub(" ", said).split()), numbers


def _strings(value):
    """The strings of a parsed JSON value, depth-first, in order (object keys aside)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (dict, list)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _strings(v)


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


class Interval(BaseModel):
    """A metric's mean over the questions it applies to, with its 95% bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int  # the questions it covers


def bootstrap(values: list[float], samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and a percentile bootstrap interval over questions."""
    if not values:
        raise ValueError("no values to bootstrap")
    rnd, n = random.Random(seed), len(values)
    means = sorted(sum(values[rnd.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    tail = (1 - confidence) / 2
    return sum(values) / n, means[int(tail * samples)], means[min(samples - 1, int((1 - tail) * samples))]


def interval(values: list[float], seed: int = 0) -> Interval:
    """`bootstrap`'s mean and 95% interval of `values`, with their count."""
    mean, low, high = bootstrap(values, seed=seed)
    return Interval(mean=mean, low=low, high=high, n=len(values))


def paired_bootstrap(a: list[float], b: list[float], samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, low, high) with questions resampled in pairs: a difference whose interval
    holds 0 is not a win for either side."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length ({len(a)} and {len(b)})")
    return bootstrap([x - y for x, y in zip(a, b)], samples, confidence, seed)
