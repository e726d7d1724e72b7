"""Adapter releases (lorag.releases): `model: NAME` is the `stable` version, replicas follow a moved tag
within `serve.registry_refresh_s`, promotion is gated by a paired evaluation, a canary takes a sticky
share of traffic, rollback is one step, and every move is in the history. On the tiny model, with
real adapter stores, engines, the HTTP app and the `lorag` CLI.

    .venv/bin/python -m pytest -q tests/test_releases.py
"""

import concurrent.futures
import json
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from test_gateway import Server, save_adapter, sha

KEY = "sk-releases"
QUESTIONS = ["What does error TW-E417 mean?", "How long is the T4 warranty?", "What does a solid teal LED mean?", "How much is Harbor 5?",
             "How do I reset the Mooring app?", "Which firmware fixes the fan?", "Can the T4 run off-grid?", "Where is the serial number?",
             "What voids the warranty?", "How loud is the fan?", "How do I update TideOS?", "What does error TW-E101 mean?"]


def write_config(root, tiny_model, model_cache, **adapter) -> "object":
    from lorag.config import load_config

    (root / "lorag.yaml").write_text(yaml.safe_dump({
        "base_model": str(tiny_model), "workdir": "work", "cache_dir": str(model_cache),
        "adapters": [{"name": "support", "dataset": "unused.jsonl", "release_metrics": ["f1", "contains"], **adapter}],
        "serve": {"max_tokens": 6, "max_batch_size": 16, "batch_wait_ms": 5, "api_keys": [{"sha256": sha(KEY)}], "registry_refresh_s": 0.5},
    }))
    return load_config(root / "lorag.yaml")


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, tiny_model, model_cache):
    """A store with support v1 and v2 (different random adapters)."""
    from lorag.adapters import AdapterStore

    root = tmp_path_factory.mktemp("releases")
    cfg = write_config(root, tiny_model, model_cache)
    store = AdapterStore(cfg.adapter_store)
    save_adapter(store, "support", tiny_model, root, 1, cfg.base_model)
    save_adapter(store, "support", tiny_model, root, 2, cfg.base_model)
    return root, cfg, store


def test_name_means_stable_else_newest_and_every_move_is_history(tmp_path, tiny_model):
    from lorag.adapters import AdapterStore
    from lorag.releases import rollback

    store = AdapterStore(tmp_path / "store")
    for seed in (1, 2, 3):
        save_adapter(store, "a", tiny_model, tmp_path, seed, "base")
    assert store.resolve_number("a") == 3, "no stable tag: the newest"
    store.tag("a", 1, "stable")
    assert store.resolve_number("a") == 1 and store.resolve_number("a", "latest") == 3
    store.tag("a", 2, "stable", {"action": "promote"})
    assert rollback(store, "a") == (2, 1) and store.resolve_number("a") == 1
    store.tag("a", 3, "canary")
    assert store.untag("a", "canary") == 3 and "canary" not in store.tags("a")
    store.remove("a", 1)  # stable pointed at it: the tag goes, and `a` is the newest again
    assert store.resolve_number("a") == 3
    moves = [(m["tag"], m["previous"], m["version"], m.get("action", "tag")) for m in store.history("a")]
    assert moves == [("stable", None, 1, "tag"), ("stable", 1, 2, "promote"), ("stable", 2, 1, "rollback"), ("canary", None, 3, "tag"),
                     ("canary", 3, None, "untag"), ("stable", 1, None, "removed with its version")], moves
    with pytest.raises(LookupError, match="no tag 'stable'"):
        rollback(store, "a")


def test_two_replicas_follow_a_tag_move_within_the_bound(two_versions):
    from lorag.releases import Registry

    _, cfg, store = two_versions
    store.tag("support", 1, "stable")
    replicas = [Registry(store, cfg, refresh_s=0.5) for _ in range(2)]
    assert [r.binding("support").number for r in replicas] == [1, 1]
    store.tag("support", 2, "stable")
    moved = time.monotonic()
    seen = {}
    while len(seen) < 2 and time.monotonic() - moved < 5:
        for i, r in enumerate(replicas):
            if i not in seen and r.binding("support").number == 2:
                seen[i] = time.monotonic() - moved
        time.sleep(0.05)
    assert len(seen) == 2 and max(seen.values()) <= 0.5 + 0.2, f"each replica sees the move within registry_refresh_s: {seen}"
    store.tag("support", 1, "stable")  # back, for the other tests


def test_no_replica_answers_with_a_removed_version_even_inside_the_bound(tmp_path, tiny_model, model_cache):
    from lorag.adapters import AdapterNotFoundError, AdapterStore
    from lorag.releases import Registry

    cfg = write_config(tmp_path, tiny_model, model_cache)
    store = AdapterStore(cfg.adapter_store)
    for seed in (1, 2, 3):
        save_adapter(store, "support", tiny_model, tmp_path, seed, cfg.base_model)
    store.tag("support", 2, "stable")
    replicas = [Registry(store, cfg, refresh_s=3600) for _ in range(2)]  # a bound far away: only the existence check can help
    assert {r.binding("support").number for r in replicas} == {2} and {r.binding("support", "v1").number for r in replicas} == {1}
    store.remove("support", 2)
    store.remove("support", 1)
    assert {r.binding("support").number for r in replicas} == {3}, "stable's version is gone (and so is the tag): the newest"
    for r in replicas:
        with pytest.raises(AdapterNotFoundError):
            r.binding("support", "v1")


def test_a_canary_takes_its_share_sticky_per_client(two_versions):
    from lorag.releases import Registry
    from lorag.sections import CanaryConfig

    root, cfg, store = two_versions
    store.tag("support", 1, "stable")
    store.tag("support", 2, "canary")
    canaried = cfg.model_copy(deep=True)
    canaried.adapters[0].canary = CanaryConfig(tag="canary", weight=0.1)
    registry = Registry(store, canaried, refresh_s=60)
    sides = [registry.choose("support", f"client-{i}") for i in range(1000)]
    share = sides.count(2) / len(sides)
    assert 0.07 <= share <= 0.13, share
    assert all(registry.choose("support", f"client-{i}") == sides[i] for i in range(0, 1000, 7)), "a client stays on its side"
    assert registry.choose("support", "client-0", None) in (1, 2) and registry.referenced("support") == {1, 2}
    store.untag("support", "canary")
    assert Registry(store, canaried).choose("support", "client-0") == 1 and Registry(store, canaried).referenced("support") == {1, 2}, \
        "no canary tag: everyone on stable (v2 is still the newest)"


def test_over_http_answers_name_their_version_and_a_canary_gets_its_share_of_1000_requests(two_versions, tiny_model):
    """1,000 requests through the HTTP app, each with its own `user`: 7-13% are answered by the canary,
    the same user always by the same version; a moved tag reaches the app without a restart."""
    from lorag.engine import Engine
    from lorag.gateway import Gateway, build_api

    root, cfg, store = two_versions
    store.tag("support", 1, "stable")
    store.tag("support", 2, "canary")
    cfg = write_config(root, tiny_model, cfg.cache_dir, canary={"tag": "canary", "weight": 0.1})
    engine = Engine(cfg, str(tiny_model), store)
    server = Server(build_api(Gateway(cfg, engine, engine.prompts)))
    try:
        def ask(user: str, model: str = "support") -> str:
            r = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                           json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "user": user})
            assert r.status_code == 200, r.text
            return r.json()["model"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answered = list(pool.map(ask, [f"user-{i}" for i in range(1000)]))
        assert set(answered) == {"support@v1", "support@v2"}, set(answered)
        assert 0.07 <= answered.count("support@v2") / 1000 <= 0.13, answered.count("support@v2")
        assert [ask(f"user-{i}") for i in range(0, 1000, 50)] == answered[::50], "sticky per user"

        store.untag("support", "canary")
        store.tag("support", 2, "stable")
        time.sleep(cfg.serve.registry_refresh_s + 0.2)
        assert {ask(f"user-{i}") for i in range(20)} == {"support@v2"}, "the moved tag, with no restart"
        assert ask("x", "support@v1") == "support@v1", "an explicit version still answers"
        gone = engine.retire(lambda adapter: adapter == "support@v2")
        assert gone == ["support@v1"] and engine.cache.loaded() == ["support@v2"], "a version nothing points at leaves the slots"
    finally:
        server.close()
        engine.close()
        store.tag("support", 1, "stable")


def lorag(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_promotion_is_refused_when_worse_beyond_noise_and_accepted_when_not(two_versions, tiny_model):
    """An evaluation set whose references are v1's own answers: v1 is known to be better. Promoting v2
    over v1 is refused (exit 1, table printed, stable stays); forced, it moves and says so; promoting
    v1 back is accepted from the stored reports; rollback undoes it in one step, and a running
    endpoint answers `support` with the rolled-back version's answers; history has it all."""
    from lorag.engine import Engine
    from lorag.evaluation import evaluate
    from lorag.gateway import Gateway, build_api

    root, cfg, store = two_versions
    draft = root / "draft.jsonl"
    draft.write_text("".join(json.dumps({"question": q, "answer": "unknown"}) + "\n" for q in QUESTIONS))
    v1 = evaluate(cfg, draft, ["support@v1"], max_tokens=6)
    v1_answers = [a.by_variant["support"].text for a in v1.answers]
    evalset = root / "known.jsonl"
    evalset.write_text("".join(json.dumps({"question": q, "answer": a or "-"}) + "\n" for q, a in zip(QUESTIONS, v1_answers)))
    for tag in list(store.tags("support")):
        store.untag("support", tag)
    cfg_path = str(root / "lorag.yaml")

    first = lorag("adapters", "promote", "support@v1", "-c", cfg_path, cwd=root)
    assert first.returncode == 0 and "nothing to compare with" in first.stdout, first.stdout + first.stderr

    worse = lorag("adapters", "promote", "support@v2", "--dataset", str(evalset), "--max-tokens", "6", "-c", cfg_path, cwd=root)
    assert worse.returncode == 1 and "not promoted" in worse.stdout and "worse" in worse.stdout, worse.stdout + worse.stderr
    assert "f1" in worse.stdout and "contains" in worse.stdout, "the comparison table, for each release metric"
    assert store.tags("support")["stable"] == 1

    forced = lorag("adapters", "promote", "support@v2", "--dataset", str(evalset), "--force", "-c", cfg_path, cwd=root)
    assert forced.returncode == 0 and "forced" in forced.stdout and store.tags("support")["stable"] == 2, forced.stdout + forced.stderr

    back = lorag("adapters", "promote", "support@v1", "--dataset", str(evalset), "-c", cfg_path, cwd=root)  # both have reports on these questions now
    assert back.returncode == 0 and "stored lorag eval reports" in back.stdout and store.tags("support")["stable"] == 1, back.stdout + back.stderr

    undo = lorag("adapters", "rollback", "support", "-c", cfg_path, cwd=root)
    assert undo.returncode == 0 and store.tags("support")["stable"] == 2, undo.stdout + undo.stderr

    engine = Engine(cfg, str(tiny_model), store)
    server = Server(build_api(Gateway(cfg, engine, engine.prompts)))
    try:
        def answer(question: str) -> tuple[str, str]:
            body = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                              json={"model": "support", "messages": [{"role": "user", "content": question}], "max_tokens": 6}).json()
            return body["model"], body["choices"][0]["message"]["content"]

        assert {answer(q)[0] for q in QUESTIONS[:3]} == {"support@v2"}
        again = lorag("adapters", "rollback", "support", "-c", cfg_path, cwd=root)  # v2 -> v1: the answers the evaluation set holds
        assert again.returncode == 0 and "v2 -> v1" in again.stdout, again.stdout + again.stderr
        time.sleep(cfg.serve.registry_refresh_s + 0.2)
        assert [answer(q) for q in QUESTIONS] == [("support@v1", a) for a in v1_answers], "the rolled-back version answers, as it did"
    finally:
        server.close()
        engine.close()

    history = lorag("adapters", "history", "support", "-c", cfg_path, cwd=root)
    assert history.returncode == 0, history.stderr
    moves = store.history("support")
    assert [(m.get("action"), m.get("previous"), m["version"], bool(m.get("forced"))) for m in moves[-5:]] == [
        ("promote", None, 1, False), ("promote", 1, 2, True), ("promote", 2, 1, False), ("rollback", 1, 2, False), ("rollback", 2, 1, False)], moves
    assert all(m.get("report") for m in moves[-4:-2]), "each gated move names the report it was decided on"
    for word in ("promote", "forced", "rollback"):
        assert word in history.stdout, history.stdout
