"""Evaluation sets and metrics as tables of cases (no model): answers, choices, citations, confidence."""

import json

import pytest

from lorag.evaluation import (
    EvalItem,
    bootstrap,
    choice,
    choice_correct,
    citation_hit,
    exact_match,
    load_eval_set,
    normalize,
    paired_bootstrap,
    recall_at_k,
    token_f1,
)


@pytest.mark.parametrize(
    "text, expected",
    [("The Tidewell T4!", "tidewell t4"), ("  an   amber  light. ", "amber light"), ("", ""), ("39-month", "39month")],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    "prediction, references, em, f1",
    [
        ("amber", ["Amber."], 1.0, 1.0),
        ("It pulses amber", ["amber"], 0.0, 0.5),  # 1 common of 3 predicted, 1 reference word: P 1/3, R 1, F1 0.5
        ("39 months", ["39 months", "three years"], 1.0, 1.0),
        ("three years and three months", ["39 months", "three years"], 0.0, 2 * (2 / 5) * 1 / (2 / 5 + 1)),  # the best reference counts
        ("blue", ["amber"], 0.0, 0.0),
        ("", ["amber"], 0.0, 0.0),
        ("the", ["a"], 1.0, 1.0),  # both normalise to nothing
    ],
)
def test_exact_match_and_token_f1(prediction, references, em, f1):
    assert exact_match(prediction, references) == em
    assert token_f1(prediction, references) == pytest.approx(f1)


OPTIONS = ["12 seconds", "5 seconds", "30 seconds"]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("A", 0), ("(b)", 1), ("C. 30 seconds", 2), ("B) five", 1),
        ("Hold it for 12 seconds.", 0),  # names one option's text
        ("A fixture holds it for 30 seconds", 2),  # a sentence starting with the article "A" is not the letter A
        ("12 seconds or 5 seconds", None),  # names two
        ("no idea", None), ("D", None),  # no option D
    ],
)
def test_choice(answer, expected):
    assert choice(answer, OPTIONS) == expected


def test_choice_correct_compares_with_the_reference_option():
    item = EvalItem("How long?", ["A"], options=OPTIONS)
    assert choice_correct("12 seconds", item) == 1.0 and choice_correct("(B)", item) == 0.0 and choice_correct("dunno", item) == 0.0


@pytest.mark.parametrize(
    "cited, gold, hit",
    [
        (["07-warranty.md"], ["07-warranty.md"], 1.0),
        (["corpus/07-warranty.md"], ["07-warranty.md"], 1.0),  # a bare gold name matches the cited file's name
        (["a/07-warranty.md"], ["b/07-warranty.md"], 0.0),  # gold with a folder must match whole
        (["01-overview.md", "07-warranty.md"], ["07-warranty.md"], 1.0),
        ([], ["07-warranty.md"], 0.0),
        (["07-warranty.md"], [], 0.0),
    ],
)
def test_citation_hit(cited, gold, hit):
    assert citation_hit(cited, gold) == hit


def test_recall_at_k_looks_at_the_first_k_only():
    assert recall_at_k(["a.md", "b.md", "gold.md"], ["gold.md"], 3) == 1.0
    assert recall_at_k(["a.md", "b.md", "gold.md"], ["gold.md"], 2) == 0.0


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_questions():
    few = [1.0, 0.0] * 5
    many = [1.0, 0.0] * 200
    mean, lo, hi = bootstrap(few)
    assert mean == 0.5 and lo < 0.5 < hi
    _, lo2, hi2 = bootstrap(many)
    assert lo < lo2 < 0.5 < hi2 < hi, "400 questions give a narrower interval than 10"
    assert bootstrap([1.0] * 7) == (1.0, 1.0, 1.0)
    assert bootstrap(few, seed=3) == bootstrap(few, seed=3), "seeded: the same interval every run"
    with pytest.raises(ValueError):
        bootstrap([])


def test_paired_bootstrap_tells_a_real_win_from_noise():
    rag = [1.0] * 18 + [0.0] * 2
    base = [0.0] * 16 + [1.0] * 4
    diff, lo, hi = paired_bootstrap(rag, base)
    assert diff == pytest.approx(0.7) and lo > 0, "a large, consistent difference: the interval excludes 0"
    noisy_a = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    noisy_b = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    _, lo, hi = paired_bootstrap(noisy_a, noisy_b)
    assert lo <= 0 <= hi, "one question's difference on six is not a win"
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_load_eval_set_reads_every_shape(tmp_path):
    path = tmp_path / "qa.jsonl"
    lines = [
        {"question": "How long is the warranty?", "answer": "39 months", "sources": ["07-warranty-and-support.md"]},
        {"question": "Reset?", "answers": ["12 seconds", "twelve seconds"]},
        {"question": "Hold time?", "answer": "A", "options": OPTIONS},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = load_eval_set(path)
    assert [i.answers for i in items] == [["39 months"], ["12 seconds", "twelve seconds"], ["A"]]
    assert items[0].sources == ["07-warranty-and-support.md"] and items[2].options == OPTIONS and items[2].line == 3


def test_load_eval_set_names_every_bad_line_at_once(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join([
        json.dumps({"question": "ok", "answer": "yes"}),
        "{oops",
        json.dumps({"question": "", "answer": "x"}),
        json.dumps({"question": "q"}),
        json.dumps({"question": "q", "answer": "maybe", "options": ["yes", "no"]}),
        json.dumps(["not", "an", "object"]),
    ]))
    with pytest.raises(ValueError) as e:
        load_eval_set(path)
    msg = str(e.value)
    for expected in ("line 2: invalid JSON", "line 3: `question`", "line 4: `answer`", "line 5: the answer 'maybe' is not one of its options", "line 6: expected a JSON object"):
        assert expected in msg, msg
    with pytest.raises(FileNotFoundError):
        load_eval_set(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        load_eval_set(tmp_path / "empty.jsonl")
