"""The Serve app over real HTTP: OpenAI-shaped chat completions with citations, errors as 4xx bodies."""

import httpx
import pytest

pytestmark = pytest.mark.slow


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
        "serve": {"port": port, "cpus_per_replica": 0, "max_tokens": 8},
    }))
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
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_adapter_answer_cites_its_knowledge_base(served):
    url, cfg = served
    r = chat(url, model="support", max_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "support"
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
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
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
        ({"model": "support", "n": 2}, 400, "n"),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(served, body, status, fragment):
    url, _ = served
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"], err


def test_non_json_body_is_a_400_and_server_stays_healthy(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/chat/completions", content=b"not json", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_official_openai_client(served):
    from openai import OpenAI

    url, _ = served
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    resp = client.chat.completions.create(model="support", messages=[{"role": "user", "content": "How long is the warranty?"}], max_tokens=3, temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.model_extra["sources"][0]["source"].endswith(".md")
