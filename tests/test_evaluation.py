"""Evaluation sets and metrics as tables of cases (no model): answers, choices, citations, confidence."""

import json
from pathlib import Path

import pytest

from lorag.evaluation import EvalItem, load_eval_set
from lorag.metrics import (
    bootstrap,
    choice,
    choice_correct,
    citation_hit,
    contains_answer,
    exact_match,
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


@pytest.mark.parametrize(
    "prediction, references, hit",
    [
        ("Use functools.lru_cache() for that.", ["lru_cache"], 1.0),  # punctuation is a word break, on both sides
        ("The LRU_CACHE decorator", ["lru_cache"], 1.0),  # case aside
        ("It lasts 39 months [1].", ["three years", "39 months"], 1.0),  # any reference
        ("Use cache", ["lru_cache"], 0.0),  # part of the reference is not the reference
        ("Set --no-ff on the merge", ["ff"], 1.0),
        ("the offset", ["set"], 0.0),  # whole words only: "set" is not in "offset"
        ("amber", ["An amber light"], 0.0),  # the reference must be inside the answer, not the other way round
        ("anything", [""], 0.0),  # an empty reference is contained nowhere
    ],
)
def test_contains_answer_finds_a_short_reference_inside_an_open_answer(prediction, references, hit):
    assert contains_answer(prediction, references) == hit
    if hit:
        assert exact_match(prediction, references) == 0.0 or prediction.lower() == references[0].lower()


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


@pytest.mark.parametrize(
    "text, retrieved, cited",
    [
        ("Amber [2].", ["a.md", "b.md"], ["b.md"]),
        ("[1][2] and again [1]", ["a.md", "b.md"], ["a.md", "b.md"]),
        ("see [3] and [0]", ["a.md", "b.md"], []),  # numbers naming no source
        ("[1] [2]", ["a.md", "a.md"], ["a.md"]),  # one source, two chunks: cited once
        ("no citation", ["a.md"], []),
    ],
)
def test_cited_sources(text, retrieved, cited):
    from lorag.evaluation import cited_sources

    assert cited_sources(text, retrieved) == cited


def test_plan_variants_pairs_each_adapter_with_and_without_its_knowledge_base():
    from lorag.evaluation import plan_variants

    names = lambda vs: [(v.name, v.adapter, v.kb) for v in vs]  # noqa: E731
    assert names(plan_variants(None, [("support@v2", "handbook", "Be brief.")])) == [
        ("base", None, None), ("base+rag", None, "handbook"), ("support", "support@v2", None), ("support+rag", "support@v2", "handbook"),
    ]
    assert names(plan_variants(None, [("a@v1", None, None)])) == [("base", None, None), ("a", "a@v1", None)]
    two = names(plan_variants(None, [("med@v1", "papers", None), ("law@v1", "cases", None)]))
    assert ("base+rag:papers", None, "papers") in two and ("base+rag:cases", None, "cases") in two and ("law+rag", "law@v1", "cases") in two
    styled = plan_variants(None, [("support@v2", "handbook", None)], {"support@v2": "^Support:"})
    assert [v.style for v in styled] == ["^Support:"] * 4, "the base variants are held to the one style, to show what the adapter changed"
    mixed = plan_variants(None, [("a@v1", None, None), ("b@v1", None, None)], {"a@v1": "^A:", "b@v1": "^B:"})
    assert [(v.name, v.style) for v in mixed] == [("base", None), ("a", "^A:"), ("b", "^B:")]


def test_style_adherence_reads_the_answer_as_written():
    from lorag.evaluation import Answer, per_question

    item = EvalItem("q", ["39 months"])
    assert per_question(item, Answer(" Tidewell Support: 39 months [1]", [], [], 5, 0.1), 3, "^Tidewell Support:")["style_adherence"] == 1.0
    assert per_question(item, Answer("39 months", [], [], 2, 0.1), 3, "^Tidewell Support:")["style_adherence"] == 0.0
    assert per_question(item, Answer("39 months", [], [], 2, 0.1), 3)["style_adherence"] is None


def test_summarize_scores_each_variant_on_the_questions_each_metric_applies_to():
    from lorag.evaluation import Answer, summarize
    from lorag.metrics import Interval

    items = [
        EvalItem("How long is the warranty?", ["39 months"], sources=["07-warranty.md"]),
        EvalItem("Hold time?", ["A"], options=OPTIONS),
    ]
    answers = {
        "base": [Answer("Two years.", [], [], 3, 0.1), Answer("B", [], [], 1, 0.1)],
        "base+rag": [Answer("39 months [1]", ["07-warranty.md", "01-overview.md"], ["07-warranty.md"], 4, 0.2),
                     Answer("12 seconds", ["03-leds.md"], [], 2, 0.2)],
    }
    got = summarize(items, answers, k=3)
    assert got["base"].exact_match.mean == 0.0 and got["base+rag"].exact_match.mean == 0.5
    assert got["base"].choice_accuracy == Interval(mean=0.0, low=0.0, high=0.0, n=1)
    assert got["base+rag"].choice_accuracy.mean == 1.0
    assert got["base"].citation_accuracy.mean == 0.0 and got["base+rag"].citation_accuracy.mean == 1.0
    assert got["base"].retrieval_recall is None and "retrieval_recall" not in got["base"].model_dump(), "nothing retrieved: no recall to report"
    assert got["base+rag"].retrieval_recall.n == 1, "only questions with gold sources count"
    assert got["base+rag"].completion_tokens.mean == 3.0
    assert got["base+rag"].contains == Interval(mean=1.0, low=1.0, high=1.0, n=1), "open questions only, not multiple choice"
    assert got["base"].contains.mean == 0.0


def test_report_says_which_variant_wins_and_whether_it_is_noise(tmp_path):
    from lorag.evaluation import EvalResult
    from lorag.report import report_markdown, verdict, write_report

    clear = {"mean": 0.9, "low": 0.8, "high": 1.0, "n": 40}
    weak = {"mean": 0.2, "low": 0.1, "high": 0.3, "n": 40}
    close = {"mean": 0.25, "low": 0.1, "high": 0.4, "n": 40}
    summary = {"base": {"f1": weak, "contains": weak, "citation_accuracy": weak}, "base+rag": {"f1": close, "contains": clear, "citation_accuracy": clear}}
    result = EvalResult.model_validate({"dataset": "qa.jsonl", "questions": 40, "variants": [], "summary": summary, "answers": []})
    lines = verdict(result.summary)
    assert any("contains answer: **base+rag** wins" in line for line in lines), lines
    assert any("citation accuracy: **base+rag** wins" in line for line in lines), lines
    assert any("token F1: base+rag leads" in line and "within noise" in line for line in lines), lines
    md = report_markdown(result)
    assert "| variant | token F1 | contains answer | citation accuracy |" in md, md
    assert "| base+rag | 0.250 [0.10, 0.40] | 0.900 [0.80, 1.00] | 0.900 [0.80, 1.00] |" in md, md
    written = write_report(result, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["questions"] == 40
    assert (tmp_path / "out" / "eval.md").read_text() == md and [p.name for p in written] == ["eval.json", "eval.md", "eval.png"]
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["summary"] == summary, "eval.json holds the summary as it was given"
    assert EvalResult.model_validate_json((tmp_path / "out" / "eval.json").read_text()) == result, "eval.json reads back as the result"


def test_the_chart_is_a_png_with_one_bar_per_variant_and_metric_at_its_height(tmp_path):
    """Read back as an image: each variant's bars in its colour (matplotlib's first two), their
    heights in the ratio of the scores."""
    import numpy as np
    from PIL import Image

    from lorag.evaluation import EvalResult
    from lorag.report import write_report

    at = lambda v: {"mean": v, "low": v, "high": v, "n": 10}  # noqa: E731
    summary = {"base": {"f1": at(0.25), "citation_accuracy": at(0.5)}, "base+rag": {"f1": at(0.75), "citation_accuracy": at(1.0)}}
    write_report(EvalResult.model_validate({"dataset": "qa.jsonl", "questions": 10, "variants": [], "summary": summary, "answers": []}), tmp_path)
    with Image.open(tmp_path / "eval.png") as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 200
        px = np.asarray(im.convert("RGB")).astype(int)

    def bars(rgb):
        """Heights of the bars painted in `rgb`, left to right: per column, its longest vertical run
        of that colour (the legend's patch is a short separate run)."""
        mask = np.abs(px - rgb).sum(axis=2) < 30
        hit = np.zeros(mask.shape[1], dtype=int)
        for x in range(mask.shape[1]):
            run = 0
            for on in mask[:, x]:
                run = run + 1 if on else 0
                hit[x] = max(hit[x], run)
        cols = [x for x in range(px.shape[1]) if hit[x] > 20]
        runs = [[cols[0]]] if cols else []
        for x in cols[1:]:
            runs[-1].append(x) if x == runs[-1][-1] + 1 else runs.append([x])
        return [max(hit[x] for x in r) for r in runs]

    blue, orange = bars((31, 119, 180)), bars((255, 127, 14))  # matplotlib's C0 and C1
    assert len(blue) == 2 and len(orange) == 2, (blue, orange)
    for got, want in ((blue[1] / blue[0], 2.0), (orange[0] / blue[0], 3.0), (orange[1] / blue[0], 4.0)):
        assert abs(got - want) < 0.1, (blue, orange)


@pytest.mark.slow
def test_evaluate_answers_with_every_variant_through_the_engine_and_writes_the_report(ray_session, tmp_path, tiny_model, model_cache):
    """The whole `lorag eval` path on a tiny model: a real knowledge base in Milvus Lite, an adapter in the
    store, the endpoint's prompt builder and Engine. The model is random, so only the shape is checked."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import write_config
    from lorag.adapters import AdapterStore
    from lorag.data import ingest
    from lorag.evaluation import EvalResult, evaluate
    from lorag.report import store_reports, write_report

    cfg = write_config(tmp_path, tiny_model, model_cache)
    ingest(cfg, "handbook")
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "support")
    AdapterStore(cfg.adapter_store).save("support", tmp_path / "support", {"base_model": cfg.base_model, "knowledge_base": "handbook"})
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(x) for x in [
        {"question": "How long is the Tidewell T4 warranty?", "answer": "39 months", "sources": ["07-warranty-and-support.md"]},
        {"question": "What colour does the status LED pulse during a backup?", "answer": "amber", "sources": ["03-leds-and-buttons.md"]},
        {"question": "Which button starts a backup?", "answer": "A", "options": ["The Tide button", "The power button"]},
    ]))

    result = evaluate(cfg, qa, None, max_tokens=4)
    assert [v.name for v in result.variants] == ["base", "base+rag", "support", "support+rag"]
    assert [v.adapter for v in result.variants] == [None, None, "support@v1", "support@v1"]
    first = result.answers[0].by_variant
    assert first["base"].retrieved == [] and first["support"].retrieved == [], "no-RAG variants retrieve nothing"
    assert first["base+rag"].retrieved == first["support+rag"].retrieved and len(first["base+rag"].retrieved) == 2, "top_k 2, retrieved once"
    assert all("/" not in s for s in first["base+rag"].retrieved), "sources named as citations name them, relative to the corpus"
    summary = result.summary
    assert summary["base+rag"].retrieval_recall.n == 2 and summary["base"].retrieval_recall is None
    assert summary["support"].choice_accuracy.n == 1 and summary["support"].f1.n == 3
    written = write_report(result, tmp_path / "report")
    md = (tmp_path / "report" / "eval.md").read_text()
    assert all(f"| {name} |" in md for name in ("base", "base+rag", "support", "support+rag")), md
    assert written[0].name == "eval.json"
    saved = json.loads(written[0].read_text())
    assert list(saved) == ["dataset", "questions", "variants", "summary", "answers"] and "retrieval_recall" not in saved["summary"]["base"]
    assert list(saved["answers"][0]) == ["question", "reference", "sources", "base", "base+rag", "support", "support+rag"], "one flat object per question"
    assert EvalResult.model_validate(saved) == result, "eval.json reads back as the result"
    (location,) = store_reports(cfg, result, written)
    assert AdapterStore(cfg.adapter_store).reports("support", 1) == [location], "one report, in the compared adapter's version"
    assert sorted(p.name for p in Path(location).iterdir()) == ["eval.json", "eval.md", "eval.png"]
    assert json.loads((Path(location) / "eval.json").read_text())["summary"] == json.loads(written[0].read_text())["summary"]


@pytest.mark.slow
def test_a_glob_source_cites_paths_below_its_static_root_and_eval_matches_them(ray_session, tmp_path, tiny_model, model_cache):
    """Three pages named index.md in different folders, ingested through a glob: citations name them
    by their path below the glob's fixed part ("b/index.md"), all different, and `lorag eval`
    scores retrieval against gold pages given that way."""
    import yaml

    from conftest import write_config
    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.evaluation import evaluate

    write_config(tmp_path, tiny_model, model_cache)
    pages = {"a/index.md": "The lighthouse keeper polishes the brass lamp every dawn.",
             "b/index.md": "The Tidewell T4 warranty lasts 39 months from the day of purchase.",
             "c/deep/index.md": "Sourdough starter needs rye flour and warm water twice a day."}
    for rel, text in pages.items():
        (tmp_path / "site" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "site" / rel).write_text(f"# {rel}\n\n{text}\n")
    data = yaml.safe_load((tmp_path / "lorag.yaml").read_text())
    data["knowledge_bases"][0]["sources"] = ["site/**/*.md"]
    data["knowledge_bases"][0]["top_k"] = 3
    data["adapters"] = []
    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "lorag.yaml")
    assert ingest(cfg, "handbook").entities == 3

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "How long is the Tidewell T4 warranty?", "answer": "39 months", "sources": ["b/index.md"]}) + "\n")
    result = evaluate(cfg, qa, None, max_tokens=2)
    retrieved = result.answers[0].by_variant["base+rag"].retrieved
    assert sorted(retrieved) == sorted(pages), f"each page by its path below site/, none by its bare name: {retrieved}"
    assert retrieved[0] == "b/index.md"
    assert result.summary["base+rag"].retrieval_recall.mean == 1.0


# -- JSON answers (structured output: `lorag eval --response-format`) ----------------------------


@pytest.mark.parametrize(
    "text, said, numbers",
    [
        ('{"answer":"39 months [2]","citations":[1]}', "39 months", [2, 1]),  # the answer field, its marks, then the array
        ('{"reason":"the handbook [1]","detail":{"months":"39","notes":["from purchase"]}}', "the handbook 39 from purchase", [1]),  # no answer field: every string
        ('{"answer":39,"unit":"months"}', "months", []),  # an answer that is not a string: the strings
        ('{"answer":"x","citations":[3,true,"2",1.5,0],"steps":[2]}', "x", [3, 0]),  # integers of the top-level array only; a JSON [2] is no mark
        ('{"answer":"x","more":{"citations":[1]}}', "x", []),  # a nested citations array is not the answer's
        ("It lasts 39 months [1].", "It lasts 39 months .", [1]),  # not JSON: as before
        ('["39 months [1]"]', '["39 months "]', [1]),  # JSON but not an object: as before
        ('{"answer":"39 mon', '{"answer":"39 mon', []),  # cut at max tokens: as before
    ],
)
def test_read_answer_reads_json_answers_and_plain_text(text, said, numbers):
    from lorag.metrics import read_answer

    assert read_answer(text) == (said, numbers)


def test_json_answers_are_scored_by_their_answer_and_cite_by_marks_and_array():
    from lorag.evaluation import Answer, cited_sources, per_question

    retrieved = ["01-overview.md", "07-warranty.md", "03-leds.md"]
    assert cited_sources('{"answer":"39 months [2]","citations":[3,2,9,0]}', retrieved) == ["07-warranty.md", "03-leds.md"], "out of range ignored"
    assert cited_sources('{"citations":[1],"answer":"x"}', retrieved) == ["01-overview.md"]
    assert cited_sources("Amber [2] [7]", retrieved) == ["07-warranty.md"], "plain text: as before"
    item = EvalItem("How long is the warranty?", ["39 months"], sources=["07-warranty.md"])
    scores = per_question(item, Answer('{"answer":"39 months [2]","citations":[2]}', retrieved, ["07-warranty.md"], 9, 0.1), 2, "^Tidewell")
    assert (scores["exact_match"], scores["f1"], scores["contains"], scores["citation_accuracy"]) == (1.0, 1.0, 1.0, 1.0)
    assert scores["style_adherence"] == 0.0, "answer style reads the raw text, braces and all"
    picked = per_question(EvalItem("Hold time?", ["B"], options=OPTIONS), Answer('{"answer":"(b)"}', [], [], 4, 0.1), 2)
    assert picked["choice_accuracy"] == 1.0


def test_load_response_format_takes_a_response_format_or_a_bare_schema(tmp_path):
    from lorag.evaluation import load_response_format

    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    assert load_response_format(tmp_path / "schema.json") == {"type": "json_schema", "json_schema": {"name": "eval", "schema": schema}}
    (tmp_path / "format.json").write_text(json.dumps({"type": "json_object"}))
    assert load_response_format(tmp_path / "format.json") == {"type": "json_object"}
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "broken.json").write_text("{oops")
    for name, message in (("list.json", "expected a JSON object"), ("broken.json", "invalid JSON")):
        with pytest.raises(ValueError, match=f"response format .*{name}: {message}"):
            load_response_format(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_response_format(tmp_path / "missing.json")


def test_the_shipped_answer_schema_compiles_for_the_model(smollm2_path):
    """examples/quickstart/answer_schema.json, which README's `lorag eval --response-format` uses, is one the engine follows."""
    from lorag.evaluation import load_response_format
    from lorag.grammar import Grammars
    from lorag.models import load_tokenizer

    assert Grammars(load_tokenizer(smollm2_path)).compile(load_response_format(QUICKSTART_SCHEMA))


QUICKSTART_SCHEMA = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "answer_schema.json"


def test_readme_shows_the_shipped_answer_schema():
    readme = (QUICKSTART_SCHEMA.parents[2] / "README.md").read_text()
    section = readme[readme.index("**JSON answers.**"):]
    block = section[section.index("```json\n") + 8:]
    assert json.loads(block[:block.index("```")]) == json.loads(QUICKSTART_SCHEMA.read_text())
    assert f"--response-format {QUICKSTART_SCHEMA.relative_to(QUICKSTART_SCHEMA.parents[2]).as_posix()}" in section


def test_submit_eval_and_the_job_take_the_response_format():
    import subprocess
    import sys

    from lorag.submission import job_entrypoint

    assert job_entrypoint("eval", "c.yaml", None, None, "qa.jsonl", "s.json") == (
        "python -m jobs.evaluate --config c.yaml --dataset qa.jsonl --response-format s.json")
    with pytest.raises(ValueError, match="only an eval job"):
        job_entrypoint("train", "c.yaml", None, None, None, "s.json")
    r = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--help"], cwd=QUICKSTART_SCHEMA.parents[2], capture_output=True, text=True)
    assert r.returncode == 0 and "--response-format" in r.stdout, r.stderr
SHORT_ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40},
                                                 "citations": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 3}, "maxItems": 2}},
                "required": ["answer", "citations"], "additionalProperties": False}


def test_lorag_eval_with_a_response_format_stores_json_answers_and_refuses_a_schema_it_cannot_follow(tmp_path, tiny_model, model_cache):
    """The base model alone (no knowledge base, no adapter: no Ray, no Milvus), random weights: only the grammar
    makes its answers JSON. Every answer that ended before max_tokens validates against the schema."""
    import jsonschema
    import yaml
    from typer.testing import CliRunner

    from lorag.cli import app
    from lorag.models import load_tokenizer

    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump({"base_model": str(tiny_model), "workdir": "work", "cache_dir": str(model_cache)}))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(x) for x in [
        {"question": "How long is the Tidewell T4 warranty?", "answer": "39 months"},
        {"question": "What colour does the status LED pulse during a backup?", "answer": "amber"},
    ]))
    (tmp_path / "schema.json").write_text(json.dumps(SHORT_ANSWER))
    max_tokens = 48
    args = ["eval", "-c", str(tmp_path / "lorag.yaml"), "-d", str(qa), "--max-tokens", str(max_tokens)]
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "out"), "--response-format", str(tmp_path / "schema.json")])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    tok, valid = load_tokenizer(tiny_model), 0
    for text in (q["base"]["text"] for q in saved["answers"]):
        try:
            jsonschema.validate(json.loads(text), SHORT_ANSWER)
            valid += 1
        except json.JSONDecodeError:
            assert len(tok(text, add_special_tokens=False).input_ids) >= max_tokens - 2, f"not JSON, yet not cut at max tokens: {text!r}"
    assert valid, "free text from a random model would be cut at max tokens too: one whole JSON answer shows the grammar at work"
    assert saved["summary"]["base"]["f1"]["n"] == 2

    (tmp_path / "bad.json").write_text(json.dumps({"not": {}}))
    bad = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "bad-out"), "--response-format", str(tmp_path / "bad.json")])
    assert bad.exit_code == 1, bad.output
    errors = [line for line in bad.output.splitlines() if "error" in line.lower() or "Traceback" in line]  # besides transformers' loading bar
    assert len(errors) == 1 and errors[0].startswith("error: response format ") and "bad.json" in errors[0] and '["not"]' in errors[0], bad.output
    assert not (tmp_path / "bad-out").exists(), "no report for an evaluation that never ran"
