"""schemathesis against the endpoint's own OpenAPI document (/openapi.json), on the real app: the
gateway's FastAPI app over an `Engine` with the tiny model, a knowledge base in Milvus Lite and an
adapter bound to it, served by uvicorn on a free loopback port (as tests/test_gateway.py runs it;
under Serve the same `build_api` app answers). schemathesis's engine runs its examples, coverage
and fuzzing phases, valid and invalid requests, a bounded number per operation and each under a
request deadline: no 5xx, every answer's status, content type and body (streamed events too) as
the document says, the key enforced, valid requests answered and invalid ones refused, and the app
healthy after. The hand-written fuzz over every field's odd values stays in tests/test_serving.py
(`test_odd_values_in_every_request_field_never_cost_a_5xx`).

    .venv/bin/python -m pytest -q tests/test_fuzz.py
"""

import collections
import copy
import shutil

import httpx
import pytest
import schemathesis

from lorag.schemas import MAX_STOP_TOTAL
from test_gateway import save_adapter, start

pytestmark = pytest.mark.slow
KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS_LIMIT = 8  # the endpoint's serve.max_tokens_limit: every generation the fuzzer asks for stays short
MAX_EXAMPLES = 50  # per operation in the fuzzing phase (the coverage phase adds its own few hundred boundary cases)
DEADLINE_S = 60  # per request: one that hangs fails the run instead of stalling it (generous: 2 busy cores)
SEED = 2025  # the same cases every run; change it to fuzz elsewhere


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory, tiny_model, model_cache):
    """The app on a free loopback port, with API keys; yields (url, published document, base model name)."""
    import yaml

    from conftest import QUICKSTART
    from lorag.adapters import AdapterStore
    from lorag.config import load_config
    from lorag.data import ingest

    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(QUICKSTART / "corpus", root / "corpus")
    (root / "keys.txt").write_text(KEY + "\n")
    (root / "lorag.yaml").write_text(yaml.safe_dump({
        "base_model": str(tiny_model), "workdir": "work", "cache_dir": str(model_cache),
        "knowledge_bases": [{"name": "handbook", "sources": ["corpus/"], "top_k": 2}],
        "adapters": [{"name": "support", "dataset": "unused.jsonl", "knowledge_base": "handbook"}],
        "serve": {"max_tokens": 2, "max_tokens_limit": MAX_TOKENS_LIMIT, "api_keys_file": "keys.txt", "allow_kb_override": True, "batch_wait_ms": 0},
    }))
    cfg = load_config(root / "lorag.yaml")
    ingest(cfg, "handbook")
    save_adapter(AdapterStore(cfg.adapter_store), "support", tiny_model, root, 1, cfg.base_model, "handbook")
    engine, server = start(cfg, tiny_model)
    doc = httpx.get(f"{server.url}/openapi.json").json()
    yield server.url, doc, tiny_model.name
    server.close()
    engine.close()


def test_the_document_declares_the_bodies_the_key_and_openai_errors(served):
    """What the handlers read themselves (the raw body, the Authorization header) is in the document."""
    _, doc, _ = served
    schemas = doc["components"]["schemas"]
    for path, body in (("/v1/chat/completions", "ChatRequest"), ("/v1/completions", "CompletionRequest")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{body}"}, op
        assert op["security"] == [{"bearer": []}]
        assert {"400", "401", "403", "404", "413"} <= set(op["responses"]) and "422" not in op["responses"], op["responses"]
        errors = [r["content"]["application/json"]["schema"] for status, r in op["responses"].items() if status >= "400"]
        assert errors and all(e == {"$ref": "#/components/schemas/ErrorResponse"} for e in errors), "4xx bodies are {'error': {...}}"
        assert {"text/event-stream", "application/json"} == set(op["responses"]["200"]["content"])
        assert {"retrieval", "k", "kb", "logprobs", "tools"} <= set(schemas[body]["properties"]), "lorag's fields, and the OpenAI ones it refuses"
    assert schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == MAX_TOKENS_LIMIT, "the endpoint's own limit"
    assert schemas["ErrorResponse"]["required"] == ["error"] and set(schemas["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}
    assert {k: doc["components"]["securitySchemes"]["bearer"][k] for k in ("type", "scheme")} == {"type": "http", "scheme": "bearer"}
    assert "422" not in str(doc) and "HTTPValidationError" not in schemas, "validation errors are 400s in OpenAI's shape here"


@pytest.mark.parametrize("body, status", [
    ({"temperature": 5e-324}, 200),  # the fuzzer's first find: a subnormal temperature made the sampler's probabilities NaN, a 500
    ({"best_of": True}, 400),  # was accepted (`True == 1`, best_of's "off" value)
    ({"best_of": 1, "tool_choice": "none", "response_format": {"type": "text"}, "logprobs": False, "tools": {}}, 200),  # unsupported or off
    ({"logprobs": 0}, 400),  # chat's logprobs is a boolean (completions' a number)
    ({"response_format": {"type": "json_schema"}}, 400),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}, "n": 2, "logprobs": True, "top_logprobs": 2}, 200),
    ({"messages": [{"role": "user", "content": "\u3000\x1c\x85"}]}, 400),  # blank to str.strip
    ({"messages": [{"role": "user", "content": "\ufeff"}]}, 200),  # not blank to str.strip (blank to ECMA's \s)
    ({"max_tokens": MAX_TOKENS_LIMIT + 1}, 400),
    ({"max_tokens": MAX_TOKENS_LIMIT + 1, "max_completion_tokens": 2}, 200),  # chat's max_tokens is not read then
    ({"stop": ["x" * 128] * 2}, 200),
    ({"stop": "x" * 129}, 400),
])
def test_the_document_and_the_gateway_agree_on_what_the_fuzzer_found(served, body, status):
    """Inputs the fuzzer found or that sit on a documented edge: the gateway's answer, and whether
    the published schema calls the body valid, say the same."""
    import jsonschema

    url, doc, base = served
    body = {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "retrieval": False, **body}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    valid = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/ChatRequest", "components": doc["components"]}).is_valid(body)
    assert (r.status_code, valid) == (status, status < 400), r.text


def for_the_fuzzer(doc: dict, models: list[str]) -> dict:
    """The published document with `model` narrowed to `models` (for embeddings: the embedder, a knowledge
    base, an unknown name), so most generated requests reach retrieval and generation (the embedder)
    rather than a 404, and a streamed and a plain example request per
    completion route (generated requests seldom set `stream`). The responses are the published ones."""
    doc = copy.deepcopy(doc)
    for body in ("ChatRequest", "CompletionRequest"):
        doc["components"]["schemas"][body]["properties"]["model"] = {"type": "string", "enum": models}
    doc["components"]["schemas"]["EmbeddingRequest"]["properties"]["model"] = {"type": "string", "enum": ["all-minilm-l6-v2", "handbook", "ghost"]}
    asks = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "How long is the warranty?"}]}, "/v1/completions": {"prompt": "The warranty lasts"}}
    for path, ask in asks.items():
        doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"] = {
            "streamed": {"value": {"model": "support", **ask, "stream": True, "stream_options": {"include_usage": True}}},
            "plain": {"value": {"model": "support", **ask, "k": 3}},
        }
    return doc


@schemathesis.check
def valid_requests_are_accepted(ctx, response, case):
    """schemathesis's positive_data_acceptance, but a 400 may answer what a JSON schema cannot state:
    a prompt past the model's context (tokens), stop sequences past MAX_STOP_TOTAL characters
    together, a response_format schema the grammar engine cannot follow, or 5.0 for an integer (JSON Schema's integer includes it; the gateway, like OpenAI, takes 5)."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 400:
        return None
    error = response.json()["error"]
    if error["code"] in ("context_length_exceeded", "invalid_response_format") or f"at most {MAX_STOP_TOTAL} characters together" in error["message"]:
        return None
    decimals = {k for k, v in case.body.items() if isinstance(v, float) and v.is_integer()} if isinstance(case.body, dict) else set()
    reasons = [part.partition(": ") for part in error["message"].split("; ")]
    decimal_only = all(field in decimals and why == "Input should be a valid integer" for field, _, why in reasons)
    assert decimal_only, f"a request valid by the document got a 400: {error['message']}"
    return None


def fuzz(doc: dict, url: str) -> tuple[list[str], dict[str, collections.Counter], set[str]]:
    """schemathesis's engine (as its CLI runs it) over `doc` against `url`, the bearer key on every
    request unless a check removes it. Returns (failures as text, answers per operation by status
    and content type, the checks that ran)."""
    from schemathesis.engine import Status, events, from_schema

    config = schemathesis.config.SchemathesisConfig.from_dict({
        "base-url": url, "request-timeout": DEADLINE_S, "seed": SEED,
        "auth": {"openapi": {"bearer": {"bearer": KEY}}},
        # no extra headers (a malformed Content-Length only tests uvicorn's 400), no generated keys (a
        # negative case is then about its body; `ignored_auth` still sends each operation without the key)
        "generation": {"max-examples": MAX_EXAMPLES, "database": "none", "allow-extra-parameters": False,
                       "with-security-parameters": False},
        "phases": {"stateful": {"enabled": False}},  # no links between operations
        "checks": {"positive_data_acceptance": {"enabled": False}},  # valid_requests_are_accepted instead
    })
    failures, answers, ran = [], {}, set()
    for event in from_schema(schemathesis.openapi.from_dict(doc, config=config)).execute():
        if isinstance(event, events.ScenarioFinished):
            for case_id, interaction in event.recorder.interactions.items():  # cumulative: keyed by case
                if interaction.response is not None:
                    kind = interaction.response.headers.get("content-type", ["?"])[0].split(";")[0]
                    answers.setdefault(event.recorder.label, {})[(event.phase.value, case_id)] = (interaction.response.status_code, kind)
            for checks in event.recorder.checks.values():
                ran |= {c.name for c in checks}
                if event.status in (Status.FAILURE, Status.ERROR):
                    failures += [f"{event.recorder.label}: {c.name}: {c.failure_info.failure.title}\n"
                                 f"{c.failure_info.failure.message}\n{c.failure_info.code_sample}" for c in checks if c.failure_info is not None]
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"{type(event).__name__}: {getattr(event, 'value', None) or getattr(event, 'exception', None)!r}")
    return list(dict.fromkeys(failures)), {op: collections.Counter(a.values()) for op, a in answers.items()}, ran


def test_every_operation_answers_as_its_document_says(served):
    url, doc, base = served
    failures, answers, ran = fuzz(for_the_fuzzer(doc, [base, "support", "support@v1", "auto", "ghost"]), url)
    assert not failures, "\n\n".join(failures)
    checks = {"not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
              "negative_data_rejection", "valid_requests_are_accepted", "ignored_auth"}
    assert checks <= ran, f"checks that never ran: {checks - ran}"
    for op in ("POST /v1/chat/completions", "POST /v1/completions"):  # the fuzzer reached generation, streamed and not, and was refused too
        seen = answers[op]
        refused = sum(n for (status, _), n in seen.items() if 400 <= status < 500)
        assert seen[(200, "application/json")] >= 10 and seen[(200, "text/event-stream")] >= 1 and refused >= 50, (op, seen)
    seen = answers["POST /v1/embeddings"]
    assert seen[(200, "application/json")] >= 10 and sum(n for (status, _), n in seen.items() if 400 <= status < 500) >= 50, seen
    # healthy after: /health, and a request that retrieves and generates
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    body = {"model": "support", "messages": [{"role": "user", "content": "How long is the warranty?"}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["sources"], r.text
