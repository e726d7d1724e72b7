"""`POST /v1/embeddings` (`lorag.embeddings`) through the official `openai` client: the vectors ingest
stored, both encodings, order, batching, key scopes and every refusal. The gateway runs in this
process (`lorag.gateway.build_api` under uvicorn, as tests/test_gateway.py runs it) with no
generator: embeddings need none. Only the comparison with a real ingest starts Ray.

    .venv/bin/python -m pytest -q tests/test_embeddings.py
"""

import asyncio
import base64
import hashlib

import numpy as np
import pytest

KEY, HANDBOOK, NO_KB = "sk-all", "sk-handbook-only", "sk-no-kb"
EMBEDDER = "all-minilm-l6-v2"
TEXTS = ["How long is the Tidewell T4 warranty?", "The status LED pulses amber during a backup.", "Hold RESET for 12 seconds.",
         "Cloud Harbor keeps 30 daily versions.", "café, naïve, 日本語"]


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def serve(cfg):
    """(the gateway over `cfg` with no generator, uvicorn serving its app)."""
    from lorag.gateway import Gateway, build_api
    from test_gateway import Server

    gateway = Gateway(cfg, None, None)
    return gateway, Server(build_api(gateway))


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_cache):
    """Two knowledge bases (never ingested: embedding reads no store), a key for everything, one
    for the handbook only and one for no knowledge base; yields (url, gateway)."""
    import yaml

    from lorag.config import load_config

    root = tmp_path_factory.mktemp("embeddings")
    for kb in ("handbook", "recipes"):
        (root / kb).mkdir()
        (root / kb / "a.md").write_text(f"# {kb}\n\nSome text.\n")
    (root / "keys.txt").write_text(KEY + "\n")
    (root / "lorag.yaml").write_text(yaml.safe_dump({
        "base_model": "smollm2-135m-instruct", "embedder": EMBEDDER, "workdir": "work", "cache_dir": str(model_cache),
        "knowledge_bases": [{"name": "handbook", "sources": ["handbook/"]}, {"name": "recipes", "sources": ["recipes/"]}],
        "serve": {"api_keys_file": "keys.txt", "api_keys": [{"sha256": sha(HANDBOOK), "knowledge_bases": ["handbook"]},
                                                            {"sha256": sha(NO_KB), "knowledge_bases": []}]},
    }))
    gateway, server = serve(load_config(root / "lorag.yaml"))
    yield server.url, gateway
    server.close()


@pytest.mark.slow
def test_the_vectors_are_the_ones_ingest_stored_for_the_same_passage(ray_session, tmp_path, model_cache):
    """A chunk's vector in the knowledge base's collection, and the endpoint's for its passage (the
    text ingest embeds: its heading path above its text), are the same vector."""
    import shutil

    import yaml

    from conftest import QUICKSTART
    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.handle import open_store
    from lorag.text import passage

    (tmp_path / "corpus").mkdir()
    for name in ("05-error-codes.md", "07-warranty-and-support.md"):
        shutil.copy(QUICKSTART / "corpus" / name, tmp_path / "corpus" / name)
    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump({
        "base_model": "smollm2-135m-instruct", "embedder": EMBEDDER, "workdir": "work", "cache_dir": str(model_cache),
        "knowledge_bases": [{"name": "handbook", "sources": ["corpus/"]}],
    }))
    cfg = load_config(tmp_path / "lorag.yaml")
    kb = cfg.knowledge_base("handbook")
    assert ingest(cfg, "handbook").chunks_written >= 4

    def stored(store, collection):  # a `lorag.milvus.MilvusStore`, in the Lite file's owner actor (pickled by value)
        store.client.load_collection(collection)
        rows = store.client.query(collection, filter="", limit=6, output_fields=["text", "title", "section", "vector"], consistency_level="Strong")
        return [{"text": r["text"], "title": r["title"], "section": r["section"], "vector": [float(x) for x in r["vector"]]} for r in rows]

    rows = open_store(cfg.milvus_uri(kb), kb.token)._run(stored, kb.collection)
    assert len(rows) >= 4, rows
    gateway, server = serve(cfg)
    try:
        got = client(server.url).embeddings.create(model="handbook", input=[passage(r["title"], r["section"], r["text"]) for r in rows])
    finally:
        server.close()
    for row, e in zip(rows, got.data):
        assert np.allclose(e.embedding, row["vector"], atol=1e-5), f"chunk {row['text'][:60]!r}: the endpoint's vector is not the stored one"


def test_base64_is_the_float_vectors_little_endian_float32(served):
    url, gateway = served
    c = client(url)
    floats = c.embeddings.create(model=EMBEDDER, input=TEXTS, encoding_format="float")
    decoded = c.embeddings.create(model=EMBEDDER, input=TEXTS)  # the client asks for base64 and decodes it itself
    raw = c.embeddings.create(model=EMBEDDER, input=TEXTS, encoding_format="base64")
    assert all(isinstance(e.embedding, str) for e in raw.data), "an explicit base64 request gets strings"
    for f, d, r in zip(floats.data, decoded.data, raw.data):
        assert len(f.embedding) == gateway.embedder.dim == 384
        assert d.embedding == f.embedding, "the same float32 values either way"
        assert np.array_equal(np.frombuffer(base64.b64decode(r.embedding), dtype="<f4"), np.array(f.embedding, dtype=np.float32))
        assert abs(np.linalg.norm(f.embedding) - 1) < 1e-5, "unit vectors, as ingest stores them"


def test_a_batch_comes_back_in_input_order_each_as_if_sent_alone(served, embedder_path):
    from transformers import AutoTokenizer

    url, gateway = served
    c = client(url)
    batch = c.embeddings.create(model="handbook", input=TEXTS)
    assert batch.object == "list" and batch.model == "handbook" and [e.index for e in batch.data] == list(range(len(TEXTS)))
    for text, e in zip(TEXTS, batch.data):
        alone = c.embeddings.create(model=EMBEDDER, input=text).data[0].embedding
        assert np.allclose(e.embedding, alone, atol=1e-5), f"{text!r}: its vector depends on the others in its request"
    tok = AutoTokenizer.from_pretrained(embedder_path)
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    long = c.embeddings.create(model=EMBEDDER, input="warranty " * 1000)
    assert long.usage.prompt_tokens == gateway.embedder.max_length, "a text past max_length is truncated, as ingest truncates it"


def test_concurrent_texts_share_one_forward_pass_and_get_what_they_get_alone(served):
    """Texts of concurrent callers (requests and retrieval queries alike) ride one pass, up to
    BATCH_SIZE texts; each row equals the same text embedded alone."""
    from lorag.embeddings import BATCH_SIZE, Embeddings

    _, gateway = served

    class Recording:  # the gateway's embedder, noting the size of every pass
        def __init__(self, embedder):
            self.embedder, self.passes = embedder, []

        def embed(self, texts):
            self.passes.append(len(texts))
            return self.embedder.embed(texts)

        def __getattr__(self, name):
            return getattr(self.embedder, name)

    recording = Recording(gateway.embedder)
    embeddings = Embeddings(gateway.cfg, recording, gateway.embed_thread)

    async def together():
        return await asyncio.gather(*(embeddings.embed([t]) for t in TEXTS[:3]), embeddings.embed(TEXTS[3:]))

    results = asyncio.run(together())
    assert recording.passes == [len(TEXTS)], f"premise: the callers were queued before the thread was free: {recording.passes}"
    rows = [v for vectors, _ in results for v in vectors]
    alone = [gateway.embedder.embed([t])[0] for t in TEXTS]
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(rows, alone)), "a row of a shared pass differs from the text embedded alone"

    recording.passes.clear()
    asyncio.run(embeddings.embed([f"text {i}" for i in range(BATCH_SIZE * 2 + 3)]))
    assert recording.passes == [BATCH_SIZE, BATCH_SIZE, 3], recording.passes


def test_keys_limited_to_knowledge_bases_embed_only_through_one_they_may_read(served):
    import openai

    url, _ = served
    handbook = client(url, HANDBOOK)
    for model in ("handbook", EMBEDDER):
        assert len(handbook.embeddings.create(model=model, input="hi").data[0].embedding) == 384, model
    for key, model in ((HANDBOOK, "recipes"), (NO_KB, EMBEDDER), (NO_KB, "handbook")):
        with pytest.raises(openai.PermissionDeniedError) as e:
            client(url, key).embeddings.create(model=model, input="hi")
        assert e.value.code == "kb_not_allowed", (key, model, e.value.body)
    # a name it may not read and a name that does not exist look alike to such a key
    forbidden, unknown = (_refusal(url, HANDBOOK, model) for model in ("recipes", "no-such-kb"))
    assert forbidden == unknown and forbidden["code"] == "kb_not_allowed" and "['all-minilm-l6-v2', 'handbook']" in forbidden["message"]
    with pytest.raises(openai.AuthenticationError):
        client(url, "sk-wrong").embeddings.create(model=EMBEDDER, input="hi")


def _refusal(url: str, key: str, model: str) -> dict:
    import httpx

    r = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": "hi"}, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 403, r.text
    return r.json()["error"]


def test_an_unknown_model_is_a_404_naming_what_the_key_may_use(served):
    import openai

    url, _ = served
    with pytest.raises(openai.NotFoundError) as e:
        client(url).embeddings.create(model="text-embedding-3-small", input="hi")
    assert e.value.code == "model_not_found" and e.value.body["message"].endswith("Available: ['all-minilm-l6-v2', 'handbook', 'recipes']"), e.value.body


@pytest.mark.parametrize("body, fragment", [
    ({"input": [[101, 7592, 102]]}, "token arrays are not supported"),
    ({"input": [101, 7592, 102]}, "token arrays are not supported"),
    ({"input": ""}, "input: Value error, strings must not be empty"),
    ({"input": ["a", "", "b"]}, "empty at index 1"),
    ({"input": []}, "at least one string"),
    ({"input": ["x"] * 257}, "at most 256 strings per request, got 257"),
    ({"input": "hi", "dimensions": 256}, "dimensions: 'all-minilm-l6-v2' embeds into 384 dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": 5}, "input"),
])
def test_bad_requests_are_openai_shaped_400s_naming_the_field(served, body, fragment):
    import httpx

    url, _ = served
    r = httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDER, **body}, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_the_embedders_own_dimension_and_a_user_are_accepted(served):
    got = client(served[0]).embeddings.create(model=EMBEDDER, input=["a"] * 256, dimensions=384, user="someone")
    assert len(got.data) == 256 and len(got.data[0].embedding) == 384


def test_an_endpoint_without_knowledge_bases_has_no_embedder(tmp_path, model_cache):
    import openai
    import yaml

    from lorag.config import load_config

    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump({"base_model": "smollm2-135m-instruct", "workdir": "work", "cache_dir": str(model_cache)}))
    gateway, server = serve(load_config(tmp_path / "lorag.yaml"))
    try:
        with pytest.raises(openai.NotFoundError, match="this endpoint has no embedder"):
            client(server.url).embeddings.create(model=EMBEDDER, input="hi")
        assert gateway.embedder is None, "nothing was loaded for it"
    finally:
        server.close()
