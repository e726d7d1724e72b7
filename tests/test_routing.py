"""`model: "auto"`: routing by description and training questions, measured on a labelled set."""

import json

import numpy as np
import pytest

from conftest import REPO
from lorag.routing import Profile, Router, training_questions

ROUTING = REPO / "examples" / "routing"


def toy_embed(texts):
    """Unit vectors over three made-up topics, by keyword: enough to check the router's arithmetic."""
    out = []
    for t in texts:
        v = np.array([t.count("disk"), t.count("cake"), 0.1])
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


@pytest.mark.parametrize(
    "query, threshold, adapter",
    [
        ("disk disk", 0.5, "backup"),
        ("cake", 0.5, "baking"),
        ("weather", 0.5, None),  # near neither profile: the base model answers
        ("weather", -1.0, "backup"),  # no threshold: the best profile, whatever its score
    ],
)
def test_router_picks_the_nearest_profile_or_none_below_the_threshold(query, threshold, adapter):
    profiles = [Profile("backup", "disk", ["disk", "disk disk"]), Profile("baking", None, ["cake"]), Profile("empty")]
    route = Router(toy_embed, profiles, threshold).route(query)
    assert route.adapter == adapter
    assert set(route.scores) == {"backup", "baking"}, "a profile with neither description nor questions is not a candidate"
    assert route.score == max(route.scores.values())


def test_a_router_without_profiles_sends_everything_to_the_base_model():
    assert Router(toy_embed, [], 0.0).route("disk").adapter is None


def test_training_questions_are_the_last_user_turns():
    examples = [
        {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": " second "}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "c"}]},
    ]
    assert training_questions(examples) == ["second", "x" * 1000]


def test_routing_on_two_domains_is_accurate_and_falls_back_to_the_base_model(tmp_path, model_cache):
    """The shipped example: Tidewell support vs cooking, and questions for neither, with the
    bundled embedder and the default threshold. Untrained adapters are profiled from the config."""
    from lorag.config import load_config
    from lorag.routing_eval import BASE, evaluate_routing, routing_markdown

    cfg = load_config(ROUTING / "lorag.yaml", [f"workdir={tmp_path}", f"cache_dir={model_cache}"])
    result = evaluate_routing(cfg, ROUTING / "routes.jsonl")
    assert result.questions == 38 and result.accuracy.mean >= 0.9, routing_markdown(result)
    c = result.confusion
    assert c["tidewell-support"]["kitchen"] == 0 and c["kitchen"]["tidewell-support"] == 0, "the two domains are never confused"
    assert c[BASE][BASE] >= 7, "questions for neither adapter go to the base model"
    low = evaluate_routing(cfg, ROUTING / "routes.jsonl", threshold=-1.0)
    assert low.confusion[BASE][BASE] == 0, "with no threshold every question goes to some adapter"
    assert "| kitchen | 0 | 15 | 0 |" in routing_markdown(result)


def test_routing_sets_name_every_bad_line(tmp_path):
    from lorag.routing_eval import load_routing_set

    bad = tmp_path / "r.jsonl"
    bad.write_text('{"question": "q", "adapter": null}\n[1]\n{"question": "q"}\n{"question": "", "adapter": "a"}\nnot json\n')
    with pytest.raises(ValueError) as e:
        load_routing_set(bad)
    assert all(f"line {n}" in str(e.value) for n in (2, 3, 4, 5)) and "line 1" not in str(e.value)
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"question": "q", "adapter": "a"}) + "\n\n" + json.dumps({"question": "r", "adapter": None}) + "\n")
    assert load_routing_set(good) == [("q", "a"), ("r", None)]


def test_lorag_eval_routing_prints_the_confusion_table_and_writes_the_report(tmp_path, model_cache):
    from typer.testing import CliRunner

    from lorag.cli import app

    r = CliRunner().invoke(app, ["eval", "--routing", "-c", str(ROUTING / "lorag.yaml"), "-d", str(ROUTING / "routes.jsonl"), "-o", str(tmp_path / "out"),
                                 "--threshold", "0.9", "--set", f"workdir={tmp_path}", "--set", f"cache_dir={model_cache}"])
    assert r.exit_code == 0, r.output
    assert "Routing accuracy" in r.output and "threshold 0.9" in r.output and "Misrouted" in r.output, r.output
    result = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert result["threshold"] == 0.9 and all(row["routed"] == "(base)" for row in result["rows"]), "nothing scores 0.9: all to the base model"
    assert (tmp_path / "out" / "routing.md").read_text().startswith("# lorag eval --routing: 38 questions")
    bad = CliRunner().invoke(app, ["eval", "--routing", "-c", str(ROUTING / "lorag.yaml"), "-d", str(tmp_path / "none.jsonl"), "--set", f"workdir={tmp_path}"])
    assert bad.exit_code == 1 and "does not exist" in bad.output, bad.output
