"""The Serve app over real HTTP: chat and text completions (also streamed) with citations, API keys,
errors as OpenAI-shaped 4xx bodies, 503 over capacity, autoscaling, and the exported Serve config."""

import concurrent.futures
import json
import re

import httpx
import pytest

pytestmark = pytest.mark.slow
KEY = "sk-lorag-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory, tiny_model, model_cache):
    """Ingest the handbook, put a PEFT adapter in the store, and run the app on a free loopback port."""
    import shutil

    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from ray import serve
    from transformers import AutoModelForCausalLM

    from conftest import QUICKSTART, free_port
    from lorag.adapters import AdapterStore
    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.serving import build_app

    root = tmp_path_factory.mktemp("served")
    shutil.copytree(QUICKSTART / "corpus", root / "corpus")
    port = free_port()
    (root / "lorag.yaml").write_text(yaml.safe_dump({
        "base_model": str(tiny_model), "workdir": "work", "cache_dir": str(model_cache),
        "knowledge_bases": [{"name": "handbook", "sources": ["corpus/"], "top_k": 2}],
        "adapters": [{"name": "support", "dataset": "unused.jsonl", "knowledge_base": "handbook"}],
        "serve": {"port": port, "cpus_per_replica": 0, "max_tokens": 8, "api_keys_file": "keys.txt", "max_body_bytes": 20000, "allow_kb_override": True},
    }))
    (root / "keys.txt").write_text(f"# one key per line\n{KEY}\n")
    cfg = load_config(root / "lorag.yaml")
    ingest(cfg, "handbook")

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(root / "peft")
    AdapterStore(cfg.adapter_store).save("support", root / "peft", {"base_model": cfg.base_model, "knowledge_base": "handbook"})

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="lorag", route_prefix="/")
    yield f"http://127.0.0.1:{port}", cfg
    serve.shutdown()


def chat(url, **body):
    body.setdefault("messages", [{"role": "user", "content": "How long is the Tidewell T4 warranty?"}])
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def test_adapter_answer_cites_its_knowledge_base(served):
    url, cfg = served
    r = chat(url, model="support", max_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "support@v1", "the answer names the exact version that answered"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] <= 5 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    sources = body["sources"]
    assert [s["index"] for s in sources] == [1, 2]
    assert sources[0]["source"].endswith("07-warranty-and-support.md"), sources[0]
    assert "39" in sources[0]["text"], "the cited passage holds the fact asked about"


def test_retrieval_off_and_base_model_have_no_sources(served):
    url, cfg = served
    assert "sources" not in chat(url, model="support", retrieval=False, max_tokens=3).json()
    r = chat(url, model=cfg.base_model.rsplit("/", 1)[-1], max_tokens=3)
    assert r.status_code == 200 and "sources" not in r.json(), r.text


def test_versioned_model_id_and_models_listing(served):
    url, _ = served
    assert chat(url, model="support@v1", max_tokens=2).status_code == 200
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]]
    assert "support" in ids and "support@v1" in ids


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"model": "ghost"}, 404, "model 'ghost' not found"),
        ({"model": "support@v7"}, 404, "no version v7"),
        ({"model": "../../etc"}, 404, "invalid adapter name"),
        ({"model": "support", "messages": []}, 400, "messages"),
        ({"model": "support", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ({"model": "support", "messages": [{"role": "user", "content": "  "}]}, 400, "non-empty content"),
        ({"model": "support", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "support", "n": 9}, 400, "serve.max_choices"),
        ({"model": "support", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}, 400, "not"),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(served, body, status, fragment):
    url, _ = served
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body}, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"], err


def test_non_json_body_is_a_400_and_server_stays_healthy(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/chat/completions", content=b"not json", headers={"content-type": "application/json", **AUTH}, timeout=60)
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_official_openai_client(served):
    import openai
    from openai import OpenAI

    url, _ = served
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    resp = client.chat.completions.create(model="support", messages=[{"role": "user", "content": "How long is the warranty?"}], max_tokens=3, temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.model_extra["sources"][0]["source"].endswith(".md")
    done = client.completions.create(model="support", prompt="The Tidewell T4 warranty lasts", max_tokens=3, extra_body={"retrieval": False})
    assert done.object == "text_completion" and isinstance(done.choices[0].text, str) and done.usage.completion_tokens <= 3
    # through Serve (gateway -> generator replica): structured output, n, and streamed log-probabilities
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["ok", "n"],
              "additionalProperties": False}
    shaped = client.chat.completions.create(model="support", messages=[{"role": "user", "content": "Is the warranty 3 years?"}], max_tokens=20, n=2,
                                            response_format={"type": "json_schema", "json_schema": {"name": "yes_no", "schema": schema}})
    assert [c.index for c in shaped.choices] == [0, 1] and all(set(json.loads(c.message.content)) == {"ok", "n"} for c in shaped.choices), shaped
    chunks = list(client.chat.completions.create(model="support", messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True,
                                                 top_logprobs=2, stream=True, stream_options={"include_usage": True}, extra_body={"retrieval": False}))
    entries = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert len(entries) == chunks[-1].usage.completion_tokens - (finish == "stop") and all(len(x.top_logprobs) == 2 for x in entries), chunks
    assert {"support", "support@v1"} <= {m.id for m in client.models.list()}
    assert client.models.retrieve("support@v1").id == "support@v1"
    with pytest.raises(openai.NotFoundError, match="model 'ghost' not found"):
        client.models.retrieve("ghost")


def test_unknown_routes_and_methods_answer_in_openai_error_shape(served):
    url, _ = served
    for method, path, status in [("POST", "/v1/audio/speech", 404), ("GET", "/v2/models", 404), ("GET", "/v1/chat/completions", 405)]:
        r = httpx.request(method, f"{url}{path}", headers=AUTH, timeout=60)
        assert r.status_code == status and r.json()["error"]["message"], (path, r.text)


def test_streaming_chat_and_completions_match_the_unstreamed_answer(served):
    from openai import OpenAI

    url, _ = served
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    msgs = [{"role": "user", "content": "How long is the Tidewell T4 warranty?"}]
    whole = client.chat.completions.create(model="support", messages=msgs, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="support", messages=msgs, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model_extra["sources"], "sources ride on the first chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole.choices[0].message.content, "streaming yields the same greedy answer"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    streamed = "".join(c.choices[0].text for c in client.completions.create(model="support", prompt="Backups run", max_tokens=4, stream=True, extra_body={"retrieval": False}))
    plain = client.completions.create(model="support", prompt="Backups run", max_tokens=4, extra_body={"retrieval": False}).choices[0].text
    assert streamed.strip() == plain


def test_stop_sequences_cut_the_answer_streamed_or_not(served):
    url, _ = served
    free = chat(url, model="support", max_tokens=8, retrieval=False).json()["choices"][0]["message"]["content"]
    assert len(free) >= 6, f"premise: the tiny model says something: {free!r}"
    stop = free[3:6]  # the answer must end just before this text first appears
    cut = chat(url, model="support", max_tokens=8, retrieval=False, stop=[stop]).json()["choices"][0]
    assert cut["message"]["content"] == free[: free.index(stop)].strip() and cut["finish_reason"] == "stop", (free, stop, cut)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"model": "support", "messages": [{"role": "user", "content": "How long is the Tidewell T4 warranty?"}], "max_tokens": 8, "retrieval": False, "stop": stop, "stream": True}, headers=AUTH, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert streamed.strip() == cut["message"]["content"] and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_kb_override_and_seeded_sampling(served):
    url, cfg = served
    base = cfg.base_model.rsplit("/", 1)[-1]
    r = chat(url, model=base, kb="handbook", k=1, max_tokens=2)
    assert r.status_code == 200 and len(r.json()["sources"]) == 1, "the base model retrieves when asked to"
    assert chat(url, model=base, kb="nope", max_tokens=2).status_code == 404
    a, b = (chat(url, model="support", temperature=1.5, top_p=0.9, seed=7, max_tokens=8, retrieval=False).json()["choices"][0]["message"]["content"] for _ in range(2))
    assert a == b, "the same seed samples the same answer"


def test_api_keys_guard_v1_but_not_health(served):
    url, _ = served
    body = {"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models", timeout=60).status_code == 401
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200


MALFORMED = [
    ({"model": "support", "messages": "hi"}, 400),
    ({"model": "support", "messages": [{"role": "user"}]}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": 5}]}, 400),
    ({"model": "support", "messages": [{"content": "hi"}]}, 400),
    ({"model": "support", "messages": [{"role": "assistant", "content": "only me"}]}, 400),
    ({"model": 7, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": "", "messages": [{"role": "user", "content": "hi"}]}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": "1"}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "n": 30}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "k": 0}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "seed": "x"}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "seed": 2**70, "temperature": 0.7}, 400),  # past torch's seed range
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, 400),  # chat's is a boolean
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"50": 100}}, 400),  # unsupported: refused, not dropped
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}, 400),
    ({"model": "support", "messages": [{"role": "user", "content": "hi"}], "stream": "yes please"}, 400),
    ({"model": "/etc/passwd", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"model": "support@latest@v1", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"model": "support@v0", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"model": "support", "messages": [{"role": "user", "content": "hi " * 3000}]}, 400),  # prompt past the context
    ([1, 2, 3], 400),
    ("just a string", 400),
    (None, 400),
]


def test_malformed_requests_all_get_4xx_and_the_server_stays_healthy(served):
    url, _ = served
    for body, status in MALFORMED:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == status, (body if not isinstance(body, dict) else {k: str(v)[:40] for k, v in body.items()}, r.status_code, r.text[:300])
        assert r.json()["error"]["message"], r.text
    completions = [({"model": "support"}, 400), ({"model": "support", "prompt": "   "}, 400), ({"model": "support", "prompt": "x", "echo": True}, 400), ({"model": "ghost", "prompt": "x"}, 404)]
    for body, status in completions:
        r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == status, (body, r.text)
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{" + b" " * 30000 + b"}", headers={"content-type": "application/json", **AUTH}, timeout=60)
    assert r.status_code == 413
    r = httpx.post(f"{url}/v1/chat/completions", content="\xff\xfe garbage".encode("latin-1"), headers={"content-type": "application/json", **AUTH}, timeout=60)
    assert r.status_code == 400
    # what clients send by default is accepted: unsupported features switched off, fields lorag ignores
    defaults = {"logprobs": False, "tools": [], "response_format": {"type": "text"}, "tool_choice": "none", "user": "u1", "presence_penalty": 0}
    assert chat(url, model="support", max_tokens=2, **defaults).status_code == 200
    assert chat(url, model="support", max_tokens=2).status_code == 200, "still answering after all that"


def test_odd_values_in_every_request_field_never_cost_a_5xx(served):
    """Every request field, chat and text completions, given values of every JSON type and edge:
    each answer is a 200 or a 4xx in OpenAI's error shape, and the server answers afterwards."""
    url, _ = served
    odd = [None, True, -1, 0, 1e-30, 1e308, 2**70, -(2**70), "x", "", [], {}, [1], {"a": 1}, "NaN", 0.5, 3, "\x00", "🙂" * 50]
    fields = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stream",
              "frequency_penalty", "presence_penalty", "stream_options", "stop", "k", "kb", "retrieval", "logprobs", "tools", "response_format", "logit_bias", "user"]
    statuses = {}
    with httpx.Client(headers=AUTH, timeout=120) as client:
        for field in fields:
            for value in odd:
                for path, body in (("chat/completions", {"model": "support", "messages": [{"role": "user", "content": "hi"}]}),
                                   ("completions", {"model": "support", "prompt": "hi"})):
                    body = {**body, "max_tokens": 2, "retrieval": False, "temperature": 0.5, field: value}  # sampled: seeds are used
                    r = client.post(f"{url}/v1/{path}", json=body)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    assert r.status_code < 500, (path, field, value, r.status_code, r.text[:300])
                    if r.status_code >= 400:
                        assert r.json()["error"]["message"], (path, field, value, r.text[:300])
    assert statuses.get(200, 0) > 50 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 300, statuses
    assert chat(url, model="support", max_tokens=2).status_code == 200


def test_over_capacity_is_503_never_5xx_and_replicas_scale(ray_session, served, tmp_path):
    """A second app with one small replica, autoscaling to 2: a burst beyond its queue gets only
    200s and 503s, the autoscaler adds a replica under load and removes it when idle."""
    import threading
    import time

    from ray import serve

    from lorag.sections import AutoscalingConfig
    from lorag.serving import build_app

    _, cfg = served
    small = cfg.model_copy(deep=True)
    small.serve.max_ongoing_requests, small.serve.max_queued_requests, small.serve.max_tokens = 1, 2, 24
    small.serve.autoscaling = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0, downscale_delay_s=2)
    serve.run(build_app(small), name="small", route_prefix="/small")
    url = f"http://127.0.0.1:{cfg.serve.port}/small"

    def replicas() -> int:
        return sum(n for state, n in serve.status().applications["small"].deployments["Generator"].replica_states.items() if state == "RUNNING")

    body = {"model": "support", "messages": [{"role": "user", "content": "Tell me everything."}], "retrieval": False}
    post = lambda: httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120).status_code  # noqa: E731
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda _: post(), range(24)))
            # Then steady load until a second replica runs (the autoscaler averages over a few seconds).
            stop, seen = threading.Event(), []

            def load():
                while not stop.is_set():
                    seen.append(post())

            workers = [pool.submit(load) for _ in range(6)]
            deadline, scaled = time.time() + 150, False  # the autoscaler averages over seconds; a busy CI machine is slower
            while time.time() < deadline and not scaled:
                time.sleep(0.5)
                scaled = replicas() == 2
            stop.set()
            for w in workers:
                w.result()
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
        assert set(seen) <= {200, 503}, set(seen)
        assert scaled, "the autoscaler added a replica under load"
        deadline = time.time() + 90
        while time.time() < deadline and replicas() > 1:
            time.sleep(1)
        assert replicas() == 1, "and removed it when idle"
    finally:
        serve.delete("small")


def test_exported_serve_config_is_valid_and_matches_the_shipped_one(tmp_path):
    import subprocess
    import sys

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from conftest import REPO

    out = tmp_path / "config.yaml"
    r = subprocess.run([sys.executable, "-m", "lorag.cli", "serve", "-c", "examples/quickstart/lorag.yaml", "--export", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    exported = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(exported)
    assert exported == yaml.safe_load((REPO / "serve" / "config.yaml").read_text()), "serve/config.yaml is out of date: regenerate it with the command in its header"
    app = exported["applications"][0]
    assert app["import_path"] == "serve.app:app" and app["args"]["config"] == "examples/quickstart/lorag.yaml"


def test_gpu_replicas_reserve_gpus_and_refuse_to_start_without_cuda(tmp_path):
    """gpus_per_replica reaches Ray (Serve's own schema validates the export); a replica that was
    promised a GPU but sees no CUDA says so instead of silently serving on CPU."""
    import torch
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from lorag.config import load_config
    from lorag.models import serving_device
    from lorag.serving import generator_options, serve_config

    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump({"base_model": "smollm2-135m-instruct", "serve": {"gpus_per_replica": 0.5, "cpus_per_replica": 2}}))
    cfg = load_config(tmp_path / "lorag.yaml")
    assert generator_options(cfg)["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    deployment = ServeDeploySchema.model_validate(serve_config(cfg, "lorag.yaml")).applications[0].deployments[0]
    assert deployment.ray_actor_options.num_gpus == 0.5
    cpu = cfg.serve.model_copy(update={"gpus_per_replica": 0})
    assert serving_device(cpu) == ("cpu", "float32")
    assert serving_device(cpu.model_copy(update={"dtype": "bfloat16"})) == ("cpu", "bfloat16")
    if torch.cuda.is_available():
        assert serving_device(cfg.serve)[0] == "cuda"
    else:
        with pytest.raises(RuntimeError, match="gpus_per_replica is 0.5 but this replica sees no CUDA device"):
            serving_device(cfg.serve)


def test_a_new_adapter_is_served_without_a_restart(served, tmp_path, tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorag.adapters import AdapterStore

    url, cfg = served
    assert "fresh" not in [m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]]
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "fresh")
    AdapterStore(cfg.adapter_store).save("fresh", tmp_path / "fresh", {"base_model": cfg.base_model})
    assert {"fresh", "fresh@v1"} <= {m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]}
    fresh = chat(url, model="fresh", max_tokens=6, retrieval=False)
    assert fresh.status_code == 200 and "sources" not in fresh.json(), "an adapter bound to no knowledge base answers without sources"
    support = chat(url, model="support", max_tokens=6, retrieval=False)
    assert fresh.json()["choices"][0]["message"]["content"] != support.json()["choices"][0]["message"]["content"], "two adapters, two answers"
    # Concurrent requests for both adapters share the replica's batches; each answer must equal its sequential one.
    want = {m: r.json()["choices"][0]["message"]["content"] for m, r in (("fresh", fresh), ("support", support))}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda m: (m, chat(url, model=m, max_tokens=6, retrieval=False).json()["choices"][0]["message"]["content"]), ["fresh", "support"] * 4))
    assert all(text == want[m] for m, text in got), (want, got)


def test_a_client_that_leaves_frees_the_replica(served):
    """A request whose client disconnects stops generating at its next token (streamed or not), so
    the next request does not wait behind a long completion nobody will read."""
    import time

    url, _ = served
    long = dict(model="support", max_tokens=900, temperature=1.0, seed=3, retrieval=False)
    start = time.perf_counter()
    assert chat(url, **long).json()["usage"]["completion_tokens"] > 300, "the random tiny model should rarely hit its eos"
    whole = time.perf_counter() - start
    for stream in (False, True):
        body = {"messages": [{"role": "user", "content": "Tell me everything."}], **long, "stream": stream}
        if stream:  # read the first event, then hang up
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
                assert next(r.iter_lines()).startswith("data: ")
        else:  # give up waiting
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=whole / 10)
        start = time.perf_counter()
        assert chat(url, model="support", max_tokens=2).status_code == 200
        assert time.perf_counter() - start < whole / 2, f"the next request waited behind the abandoned one (stream={stream}; a full one takes {whole:.1f}s)"


@pytest.mark.parametrize(
    "serve, keys, problem",
    [
        ({}, "", None),  # loopback, no keys: a laptop
        ({"host": "0.0.0.0"}, "", "exposes the endpoint beyond this machine"),
        ({"host": "10.0.0.5"}, "", "say `serve.auth: none`"),
        ({"host": "0.0.0.0"}, "k1,k2", None),
        ({"host": "0.0.0.0", "auth": "none"}, "", None),
        ({"auth": "api_keys"}, "", "serve.auth is api_keys but no API key"),
        ({"auth": "api_keys"}, " , ", "serve.auth is api_keys but no API key"),
        ({"host": "localhost", "auth": "api_keys"}, "k", None),
    ],
)
def test_an_endpoint_beyond_loopback_needs_keys_or_an_explicit_auth_none(monkeypatch, serve, keys, problem):
    from lorag.config import parse_config
    from lorag.auth import api_keys

    monkeypatch.setenv("LORAG_API_KEYS", keys)
    cfg = parse_config({"serve": serve})
    if problem is None:
        found = api_keys(cfg)
        assert found == (frozenset() if serve.get("auth") == "none" else frozenset(k for k in keys.split(",") if k.strip()))
    else:
        with pytest.raises(RuntimeError, match=re.escape(problem)):
            api_keys(cfg)


def test_a_bad_request_or_adapter_fails_alone_in_its_batch_and_the_replica_stays_healthy(ray_session, served, tmp_path, tiny_model):
    """Four requests in one batch of a replica: a temperature of 1e-40 (NaN after softmax, which
    made torch raise), an adapter whose weights overflow the model (NaN scores), and one whose
    safetensors file is corrupt (it used to escape as SafetensorError and stay pinned) used to
    answer every request of the batch with a 500. Now the tiny temperature is greedy, each bad
    adapter gets its own clear error, the good request beside them its 200, and the replica stays
    healthy and keeps answering."""
    import torch
    from peft import LoraConfig, get_peft_model
    from ray import serve
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lorag.adapters import AdapterStore
    from lorag.serving import build_app

    _, cfg = served
    store = AdapterStore(cfg.adapter_store)
    for name, seed in (("overflow", 11), ("broken", 12)):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(tmp_path / name)
        weights = tmp_path / name / "adapter_model.safetensors"
        if name == "overflow":
            save_file({k: v * 1e25 for k, v in load_file(weights).items()}, weights)
        else:
            weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header" + b"\x00" * 64)
        store.save(name, tmp_path / name, {"base_model": cfg.base_model})
    # One replica whose batch runs when it holds all four requests (or 5 s after the last arrives).
    batched = cfg.model_copy(deep=True)
    batched.serve.max_batch_size, batched.serve.batch_wait_ms = 4, 5000
    serve.run(build_app(batched), name="contained", route_prefix="/contained")
    url = f"http://127.0.0.1:{cfg.serve.port}/contained"
    base = cfg.base_model.rsplit("/", 1)[-1]
    asks = [("support", 0.7), ("overflow", 0.7), ("broken", 0.7), (base, 1e-40)]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
            support, overflow, broken, tiny = pool.map(lambda a: chat(url, model=a[0], temperature=a[1], max_tokens=4, retrieval=False), asks)
        assert support.status_code == 200 and support.json()["choices"][0]["message"]["content"] is not None, support.text
        assert tiny.status_code == 200, f"temperature 1e-40 decodes greedily: {tiny.text}"
        assert overflow.status_code == 500 and overflow.json()["error"]["code"] == "generation_failed", overflow.text
        assert "overflow@v1" in overflow.json()["error"]["message"] and "NaN or infinite" in overflow.json()["error"]["message"], overflow.text
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "adapter_unavailable", broken.text
        assert "broken@v1 cannot be loaded" in broken.json()["error"]["message"] and "not a readable safetensors file" in broken.json()["error"]["message"], broken.text
        assert str(cfg.adapter_store) not in broken.text and str(cfg.model_cache) not in broken.text, "no server path in the error"
        assert serve.status().applications["contained"].deployments["Generator"].status == "HEALTHY"
        again = chat(url, model="support", max_tokens=2, retrieval=False)
        assert again.status_code == 200, f"the replica keeps serving: {again.text}"
    finally:
        serve.delete("contained")
