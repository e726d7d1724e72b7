"""Evaluation sets and their metrics: is an answer right, did it cite the right source, and how sure is a difference.

An evaluation set is JSONL, one question per line:

    {"question": "...", "answer": "..." | "answers": [...], "sources": ["07-warranty.md"], "options": ["A text", "B text"]}

`answer`/`answers` are the reference answers; `sources` (optional) the documents that answer the
question, as citations name them (relative to the knowledge base's root); `options` (optional)
make it a multiple-choice question whose reference answer is one of them (or its letter).

The metrics are the usual ones of extractive QA (SQuAD's normalisation, exact match and token F1
against the best reference), multiple-choice accuracy, citation accuracy (a gold source among the
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation set {path} does not exist")
    items, problems = [], []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            items.append(_item(json.loads(raw), n))
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
