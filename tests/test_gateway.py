"""The HTTP app (`lorag.gateway.build_api`) in this process over an `Engine`, served by uvicorn on
a free loopback port: the requests and store states that must never hurt a replica, and who may
read what. The same app runs under Serve in tests/test_serving.py.

    .venv/bin/python -m pytest -q tests/test_gateway.py
"""

import hashlib
import os
import shutil
import signal
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
KEY, SCOPED, NO_KB, KITCHEN = "sk-all", "sk-fresh-only", "sk-support-no-kb", "sk-kitchen-auto"
AUTH = {"Authorization": f"Bearer {KEY}"}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def save_adapter(store, name: str, tiny_model, where, seed: int, base_model: str, kb: str | None = None, **metadata) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(where / f"{name}-{seed}")
    return store.save(name, where / f"{name}-{seed}", {"base_model": base_model, **({"knowledge_base": kb} if kb else {}), **metadata})


class Server:
    """uvicorn running an ASGI app on a free loopback port, in a thread; stopped by `close`."""

    def __init__(self, app):
        import uvicorn

        from conftest import free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


def start(cfg, tiny_model):
    from lorag.engine import Engine
    from lorag.gateway import Gateway, build_api

    engine = Engine(cfg, str(tiny_model))
    return engine, Server(build_api(Gateway(cfg, engine, engine.prompts)))


@pytest.fixture(scope="module")
def app(ray_session, tmp_path_factory, tiny_model, model_cache):
    import yaml

    from conftest import QUICKSTART
    from lorag.adapters import AdapterStore
    from lorag.config import load_config
    from lorag.data import ingest

    root = tmp_path_factory.mktemp("gateway")
    shutil.copytree(QUICKSTART / "corpus", root / "corpus")
    (root / "keys.txt").write_text(KEY + "\n")
    (root / "lorag.yaml").write_text(yaml.safe_dump({
        "base_model": str(tiny_model), "workdir": "work", "cache_dir": str(model_cache),
        "knowledge_bases": [{"name": "handbook", "sources": ["corpus/"], "top_k": 2, "token": "milvus-secret-token"}],
        "adapters": [{"name": "support", "dataset": "unused.jsonl", "knowledge_base": "handbook"}],
        "serve": {"max_tokens": 4, "max_tokens_limit": 1000, "api_keys_file": "keys.txt", "max_body_bytes": 500_000, "batch_wait_ms": 30,
                  "api_keys": [{"sha256": sha(SCOPED), "models": ["fresh"]},
                               {"sha256": sha(NO_KB), "models": ["support"], "knowledge_bases": []},
                               {"sha256": sha(KITCHEN), "models": ["auto", "kitchen"]}]},
    }))
    cfg = load_config(root / "lorag.yaml")
    ingest(cfg, "handbook")
    store = AdapterStore(cfg.adapter_store)
    save_adapter(store, "support", tiny_model, root, 1, cfg.base_model, "handbook")
    save_adapter(store, "fresh", tiny_model, root, 2, cfg.base_model)
    engine, server = start(cfg, tiny_model)
    yield server.url, cfg, root, store
    server.close()
    engine.close()


def chat(url, key=KEY, **body):
    body.setdefault("messages", [{"role": "user", "content": "How long is the Tidewell T4 warranty?"}])
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_citations_are_relative_to_the_knowledge_base_and_no_error_shows_a_server_path(app):
    url, cfg, root, _ = app
    r = chat(url, model="support")
    assert r.status_code == 200, r.text
    assert [s["source"] for s in r.json()["sources"]][0] == "07-warranty-and-support.md", r.json()["sources"]
    answers = [r.text]
    for model in ("ghost", "support@v9", "support@nosuchtag", "../x", "support@latest@v1"):
        answers.append(chat(url, model=model).text)
    answers.append(chat(url, model="support", messages=[{"role": "user", "content": "hi " * 3000}]).text)
    leaked = [a for a in answers if str(root) in a or str(cfg.cache_dir) in a or "milvus-secret-token" in a]
    assert not leaked, leaked


def test_a_huge_stop_is_refused_at_once_and_the_replica_keeps_serving(app):
    url, *_ = app
    body = {"model": "support", "messages": [{"role": "user", "content": "hi"}], "stream": True, "stop": ["x" * 60_000] * 4}
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "stop" in r.json()["error"]["message"] and time.perf_counter() - start < 1.0, r.text[:300]
    for stops in (["y" * 129], ["z" * 100] * 3):  # one over the per-string cap; several over the total
        assert chat(url, model="support", stop=stops).status_code == 400
    assert chat(url, model="support", stop=["\n\n", "Question:"]).status_code == 200


def test_a_chunked_upload_past_the_limit_is_413(app):
    url, *_ = app

    def twenty_mb():
        yield b'{"model": "support", "prompt": "'
        for _ in range(20 * 16):
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(f"{url}/v1/completions", content=twenty_mb(), headers={"content-type": "application/json", **AUTH}, timeout=60)
    assert "content-length" not in r.request.headers, "premise: a chunked upload"
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert chat(url, model="support").status_code == 200


def test_strict_json_types_and_the_max_tokens_ceiling(app):
    url, *_ = app
    for bad in ({"stream": "yes"}, {"stream": 1}, {"max_tokens": "5"}, {"max_tokens": 5.5}, {"retrieval": "false"}, {"max_tokens": 1001}):
        r = chat(url, model="support", **bad)
        assert r.status_code == 400 and r.json()["error"]["message"], (bad, r.text)
    assert chat(url, model="support", temperature=1, top_p=1, max_tokens=2).status_code == 200, "integers are valid numbers"


def test_frequency_and_presence_penalties_reach_the_model(app):
    """OpenAI's penalties change a greedy answer (the tiny model repeats itself without them), and
    requests with different penalties sent together each get what they get alone."""
    import concurrent.futures

    url, *_ = app
    ask = lambda **p: chat(url, model="support", max_tokens=24, retrieval=False, **p).json()["choices"][0]["message"]["content"]  # noqa: E731
    plain, penalised = ask(), ask(frequency_penalty=2.0, presence_penalty=1.0)
    assert len(set(plain.split())) < len(plain.split()) / 2, f"premise: greedy repeats itself: {plain!r}"
    assert len(set(penalised.split())) > len(set(plain.split())), (plain, penalised)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: ask(**p), [{}, {"frequency_penalty": 2.0, "presence_penalty": 1.0}] * 2))
    assert together == [plain, penalised] * 2


def test_a_short_request_is_answered_before_a_long_one_in_its_batch(app):
    """Two requests sent at once share a batch (30 ms window) unless the machine delays one past
    it, which the test cannot control: each attempt is a fresh pair, and one pair in which the short
    answer came first shows it did not wait. Greedy, so the long row's length is deterministic."""
    import concurrent.futures

    url, *_ = app
    for _attempt in range(3):
        done, start = {}, threading.Barrier(2)

        def ask(name, n):
            start.wait()
            r = chat(url, model="support", retrieval=False, max_tokens=n, temperature=0.0)
            done[name] = time.perf_counter()
            return r.json()["usage"]["completion_tokens"]

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long, short = pool.submit(ask, "long", 900), pool.submit(ask, "short", 2)
            assert short.result() <= 2 and long.result() > 200
        if done["short"] < done["long"]:
            break
    assert done["short"] < done["long"], "in 3 pairs the short row always waited for the long row"


def test_keys_scoped_to_models_and_knowledge_bases(app):
    url, cfg, *_ = app
    assert chat(url, SCOPED, model="support").status_code == 403
    r = chat(url, SCOPED, model="fresh", retrieval=False)
    assert r.status_code == 200, r.text
    assert chat(url, SCOPED, model=cfg.base_model.rsplit("/", 1)[-1]).status_code == 403
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {SCOPED}"}).json()["data"]]
    assert ids and all(i.startswith("fresh") for i in ids), ids
    # a key for `support` but for no knowledge base: its adapter's own KB is refused, answering without it is not
    r = chat(url, NO_KB, model="support")
    assert r.status_code == 403 and r.json()["error"]["code"] == "kb_not_allowed" and r.json()["error"]["type"] == "permission_error", r.text
    assert chat(url, NO_KB, model="support", retrieval=False).status_code == 200
    assert chat(url, "sk-wrong", model="support").status_code == 401


def test_the_kb_field_is_off_unless_the_config_allows_it(app):
    url, *_ = app
    r = chat(url, model="fresh", kb="handbook")
    assert r.status_code == 403 and r.json()["error"]["code"] == "kb_override_disabled", r.text


def test_store_states_give_404s_never_500s_and_numbers_are_never_reused(app, tiny_model):
    url, cfg, root, store = app
    store_dir = cfg.adapter_store
    os.makedirs(os.path.join(store_dir, "lost+found"), exist_ok=True)
    open(os.path.join(store_dir, "README"), "w").close()
    r = httpx.get(f"{url}/v1/models", headers=AUTH)
    assert r.status_code == 200 and "lost+found" not in r.text, r.text
    assert chat(url, model="ghost").status_code == 404

    # a tag whose version was removed
    save_adapter(store, "temp", tiny_model, root, 3, cfg.base_model)
    store.tag("temp", 1, "prod")
    first = chat(url, model="temp@prod", retrieval=False, max_tokens=6).json()["choices"][0]["message"]["content"]
    shutil.rmtree(os.path.join(store_dir, "temp", "v1"))  # removed behind the store's back
    assert chat(url, model="temp@prod").status_code == 404
    assert chat(url, model="temp@v1").status_code == 404
    # the next version gets a new number, so a warm replica can never serve old weights under it
    save_adapter(store, "temp", tiny_model, root, 4, cfg.base_model)
    assert store.versions("temp") == [2]
    r = chat(url, model="temp", retrieval=False, max_tokens=6)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] != first, "new weights, new answer"


def test_a_stalled_milvus_server_stalls_neither_health_nor_other_requests(ray_session, tmp_path, tiny_model, model_cache):
    """Retrieval against a Milvus server runs off the event loop: with the server frozen (SIGSTOP),
    /health and requests without retrieval answer at once, a prompt past the context is refused
    before any retrieval, and the stalled request completes once the server resumes."""
    import concurrent.futures

    import psutil
    import yaml

    from conftest import QUICKSTART
    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.standalone import local_server

    shutil.copytree(QUICKSTART / "corpus", tmp_path / "corpus")
    with local_server(tmp_path / "milvus") as uri:
        (tmp_path / "lorag.yaml").write_text(yaml.safe_dump({
            "base_model": str(tiny_model), "workdir": "work", "cache_dir": str(model_cache), "serve": {"max_tokens": 2, "allow_kb_override": True},
            "knowledge_bases": [{"name": "handbook", "sources": ["corpus/"], "uri": uri, "top_k": 2}],
        }))
        cfg = load_config(tmp_path / "lorag.yaml")
        ingest(cfg, "handbook")
        engine, server = start(cfg, tiny_model)
        url = server.url
        base = tiny_model.name
        try:
            assert chat(url, model=base, kb="handbook").status_code == 200  # warm: embedder, search
            milvus = [p for p in psutil.Process().children(recursive=True) if str(tmp_path / "milvus") in " ".join(p.cmdline())]
            assert milvus, "the milvus-server process"
            pgid = os.getpgid(milvus[0].pid)
            os.killpg(pgid, signal.SIGSTOP)
            try:
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    stalled = pool.submit(lambda: httpx.post(f"{url}/v1/completions", json={"model": base, "prompt": "warranty", "kb": "handbook"}, timeout=120))
                    time.sleep(1.0)
                    start_t = time.perf_counter()
                    assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
                    assert httpx.post(f"{url}/v1/completions", json={"model": base, "prompt": "hello", "retrieval": False}, timeout=10).status_code == 200
                    r = httpx.post(f"{url}/v1/completions", json={"model": base, "prompt": "hi " * 3000, "kb": "handbook"}, timeout=10)
                    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
                    assert time.perf_counter() - start_t < 5, "answered while Milvus was frozen"
                    assert not stalled.done(), "premise: the retrieving request waits on the frozen server"
                    os.killpg(pgid, signal.SIGCONT)
                    assert stalled.result(timeout=120).status_code == 200
            finally:
                os.killpg(pgid, signal.SIGCONT)
        finally:
            server.close()
            engine.close()


def test_model_auto_routes_to_the_nearest_adapter_and_its_knowledge_base_or_the_base_model(app, tiny_model):
    """Profiles travel with the adapters (description and training questions in their metadata);
    the response says which model answered and retrieves from that adapter's knowledge base."""
    url, cfg, root, store = app
    save_adapter(store, "tidewell", tiny_model, root, 5, cfg.base_model, "handbook",
                 description="Support for the Tidewell T4 home backup appliance: LEDs, error codes, warranty.",
                 questions=["What does error TW-E417 mean?", "How long is the T4 warranty?", "Why is the status LED red?"])
    save_adapter(store, "kitchen", tiny_model, root, 6, cfg.base_model,
                 description="Cooking and baking help.", questions=["How do I poach an egg?", "How long do I knead bread dough?"])
    ask = lambda q, key=KEY: chat(url, key, model="auto", messages=[{"role": "user", "content": q}])  # noqa: E731
    r = ask("My Tidewell T4 status LED blinks red, which error is it?")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"].startswith("tidewell@v") and body["route"]["model"] == body["model"], body
    assert body["sources"] and all(s["source"].endswith(".md") for s in body["sources"]), "the routed adapter's knowledge base was searched"
    body = ask("What is a good way to bake bread at home?").json()
    assert body["model"].startswith("kitchen@v") and "sources" not in body, body
    body = ask("Who wrote Pride and Prejudice?").json()
    assert body["model"] == tiny_model.name and body["route"]["score"] < cfg.serve.route_threshold, body
    assert "auto" in [m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]]
    r = ask("How do I poach an egg?", SCOPED)
    assert r.status_code == 403 and "auto" in r.json()["error"]["message"], "a key limited to some models must name auto to use it"
    r = ask("My Tidewell T4 status LED blinks red, which error is it?", KITCHEN)  # the key may use kitchen, not tidewell nor the base
    assert r.status_code == 403 and "no adapter this API key may use fits" in r.json()["error"]["message"], r.text
    assert ask("What is a good way to bake bread at home?", KITCHEN).json()["model"].startswith("kitchen@v"), "auto picks among the key's adapters"


GHOSTLY = "sk-fresh-and-ghost"  # may use `fresh` and a `ghost` that is not in the store, and no knowledge base
PIRATE_PROMPT = "Talk like a pirate."


@pytest.fixture(scope="module")
def twins(app, tiny_model):
    """Two gateways over one engine, one store (`fresh` and `pirate`, whose system prompt is
    PIRATE_PROMPT) and the handbook of `app`: the `kb` field allowed, a key that may see no
    knowledge base, and `serve.client_system_message` follow (the default) and replace.
    Yields (follow url, replace url)."""
    import yaml

    from lorag.adapters import AdapterStore
    from lorag.config import load_config
    from lorag.engine import Engine
    from lorag.gateway import Gateway, build_api

    _, cfg, root, _ = app
    data = yaml.safe_load((root / "lorag.yaml").read_text())
    data["storage"] = str(root / "twins-store")
    data["knowledge_bases"][0]["uri"] = cfg.milvus_uri(cfg.knowledge_bases[0])  # the handbook `app` ingested
    data["serve"].update(allow_kb_override=True, api_keys=[{"sha256": sha(GHOSTLY), "models": ["fresh", "ghost"], "knowledge_bases": []}])
    (root / "twins-follow.yaml").write_text(yaml.safe_dump(data))
    data["serve"]["client_system_message"] = "replace"
    (root / "twins-replace.yaml").write_text(yaml.safe_dump(data))
    follow, replace = load_config(root / "twins-follow.yaml"), load_config(root / "twins-replace.yaml")
    assert follow.serve.client_system_message == "follow", "the default keeps the adapter's system prompt first"
    store = AdapterStore(follow.adapter_store)
    save_adapter(store, "fresh", tiny_model, root, 7, follow.base_model)
    save_adapter(store, "pirate", tiny_model, root, 8, follow.base_model, system_prompt=PIRATE_PROMPT)
    engine = Engine(follow, str(tiny_model))
    servers = [Server(build_api(Gateway(c, engine, engine.prompts))) for c in (follow, replace)]
    yield servers[0].url, servers[1].url
    for s in servers:
        s.close()
    engine.close()


def test_a_scoped_keys_404_names_only_the_models_it_may_use(app, twins):
    url, *_ = app
    r = chat(url, SCOPED, model="fresh@v9")
    assert r.status_code == 404 and r.json()["error"]["message"].endswith("Available: ['fresh']"), r.text
    assert "support" in chat(url, KEY, model="fresh@v9").json()["error"]["message"], "an unscoped key still sees every model"
    r = chat(twins[0], GHOSTLY, model="ghost")  # in the key's scope, not in the store
    message = r.json()["error"]["message"]
    assert r.status_code == 404 and "pirate" not in message and message.endswith("Available: ['fresh']"), r.text


def test_an_unknown_and_a_forbidden_knowledge_base_look_alike_to_a_key_that_may_not_read_them(twins):
    url, _ = twins
    forbidden, unknown = (chat(url, GHOSTLY, model="fresh", kb=kb) for kb in ("handbook", "no-such-kb"))
    assert forbidden.status_code == unknown.status_code == 403, (forbidden.text, unknown.text)
    assert forbidden.json()["error"] == {**unknown.json()["error"], "message": unknown.json()["error"]["message"].replace("no-such-kb", "handbook")}
    r = chat(url, GHOSTLY, model="fresh", kb="handbook", retrieval=False)
    assert r.status_code == 403, "naming a knowledge base the key may not read is refused, retrieval or not"
    assert chat(url, KEY, model="fresh", kb="no-such-kb").json()["error"]["code"] == "kb_not_found", "a key that may read everything learns it is missing"
    assert chat(url, KEY, model="fresh", kb="handbook", max_tokens=1).status_code == 200


def test_a_client_system_message_follows_the_adapters_unless_the_config_lets_it_replace_it(twins, tiny_model):
    """The prompt's length in tokens (`usage.prompt_tokens`) shows which system message the model got."""
    from lorag.models import PromptEncoder

    encoder = PromptEncoder(tiny_model)
    user = {"role": "user", "content": "Where is the treasure?"}
    client = {"role": "system", "content": "Answer in one short sentence, politely."}

    def prompt_tokens(url, messages):
        r = chat(url, KEY, model="pirate", messages=messages, retrieval=False, max_tokens=1)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    expect = lambda *msgs: len(encoder.encode(list(msgs)))  # noqa: E731
    adapter_first = expect({"role": "system", "content": f"{PIRATE_PROMPT}\n\n{client['content']}"}, user)
    follow, replace = twins
    assert prompt_tokens(follow, [client, user]) == adapter_first, "follow: the adapter's system prompt first, the client's after it"
    assert prompt_tokens(replace, [client, user]) == expect(client, user), "replace: the client's system message alone"
    for url in twins:  # no system message of its own: the adapter's, either way
        assert prompt_tokens(url, [user]) == expect({"role": "system", "content": PIRATE_PROMPT}, user)
