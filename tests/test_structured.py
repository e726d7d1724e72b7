"""Structured output, n, log-probabilities and seeds through the official `openai` client, against
the HTTP app (`lorag.gateway.build_api`) over an in-process `Engine` on the tiny model (random
weights: only the grammar makes its answers JSON, so every valid answer here is the grammar's work).

    .venv/bin/python -m pytest -q tests/test_structured.py
"""

import json
import math
import threading
import time
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from test_gateway import Server, save_adapter, sha

KEY = "sk-structured"
TICKET = {"type": "object", "properties": {"severity": {"enum": ["low", "medium", "high"]}, "code": {"type": "integer", "minimum": 100, "maximum": 999},
                                           "urgent": {"type": "boolean"}}, "required": ["severity", "code", "urgent"], "additionalProperties": False}
STEPS = {"type": "object", "properties": {"steps": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}},
         "required": ["steps"], "additionalProperties": False}
NAMED = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^TW-[A-Z][0-9]{3}$"}, "score": {"type": "number", "minimum": 0, "maximum": 1}},
         "required": ["name", "score"], "additionalProperties": False}


class Answer(BaseModel):
    severity: Literal["low", "medium", "high"]
    summary: str = Field(max_length=24)
    sources: list[int] = Field(max_length=3)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, tiny_model, model_cache):
    """The app with two adapters (`alpha`, `beta`) and the base model, one engine, batches of up to 16."""
    import yaml

    from lorag.adapters import AdapterStore
    from lorag.config import load_config
    from lorag.engine import Engine
    from lorag.gateway import Gateway, build_api

    root = tmp_path_factory.mktemp("structured")
    (root / "lorag.yaml").write_text(yaml.safe_dump({
        "base_model": str(tiny_model), "workdir": "work", "cache_dir": str(model_cache),
        "adapters": [{"name": "alpha", "dataset": "unused.jsonl"}, {"name": "beta", "dataset": "unused.jsonl"}],
        "serve": {"max_tokens": 64, "max_batch_size": 16, "batch_wait_ms": 200, "api_keys": [{"sha256": sha(KEY)}], "max_choices": 4},
    }))
    cfg = load_config(root / "lorag.yaml")
    store = AdapterStore(cfg.adapter_store)
    save_adapter(store, "alpha", tiny_model, root, 1, cfg.base_model)
    save_adapter(store, "beta", tiny_model, root, 2, cfg.base_model)
    engine = Engine(cfg, str(tiny_model))
    server = Server(build_api(Gateway(cfg, engine, engine.prompts)))
    yield server.url, engine, cfg
    server.close()
    engine.close()


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


ASK = [{"role": "user", "content": "What does error TW-E417 mean? Answer in JSON."}]


def test_parse_with_a_pydantic_model_gives_a_parsed_object(endpoint):
    url, _, _ = endpoint
    done = client(url).beta.chat.completions.parse(model="alpha", messages=ASK, response_format=Answer, max_tokens=120)
    choice = done.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Answer) and len(choice.message.parsed.summary) <= 24, choice.message


def test_a_batch_mixing_three_schemas_two_adapters_the_base_model_and_free_text_shares_one_pass(endpoint, monkeypatch):
    """8 concurrent requests (the official client, one thread each): every schema row validates, free rows are free, and all 8 went through one forward pass."""
    import lorag.generation
    from lorag.gateway import base_name

    url, _, cfg = endpoint
    passes: list[int] = []
    real = lorag.generation.generate_batch

    def counted(mm, prompts, *args, **kwargs):
        passes.append(len(prompts))
        return real(mm, prompts, *args, **kwargs)

    monkeypatch.setattr(lorag.generation, "generate_batch", counted)
    base = base_name(cfg)
    rows = [("alpha", TICKET), ("beta", TICKET), ("alpha", STEPS), (base, STEPS), ("beta", NAMED), (base, NAMED),
            ("alpha", None), ("beta", None)]
    results: list = [None] * len(rows)

    def ask(i: int) -> None:
        model, schema = rows[i]
        extra = {"response_format": schema_format(f"s{i}", schema)} if schema else {}
        results[i] = client(url).chat.completions.create(model=model, messages=ASK, max_tokens=60, **extra).choices[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert passes == [8], f"one forward pass for the whole batch: {passes}"
    for (model, schema), choice in zip(rows, results):
        if schema is not None:
            assert choice.finish_reason == "stop", (model, schema, choice)
            jsonschema.validate(json.loads(choice.message.content), schema)
    free = [choice.message.content for (_, s), choice in zip(rows, results) if s is None]
    assert not all(text.startswith("{") for text in free), f"free rows are not constrained: {free}"


def test_streaming_with_a_schema_gives_the_unstreamed_answer(endpoint):
    url, _, _ = endpoint
    c = client(url)
    fmt = schema_format("ticket", TICKET)
    whole = c.chat.completions.create(model="beta", messages=ASK, max_tokens=60, response_format=fmt).choices[0].message.content
    chunks = list(c.chat.completions.create(model="beta", messages=ASK, max_tokens=60, response_format=fmt, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed.strip() == whole and jsonschema.validate(json.loads(streamed), TICKET) is None


def test_json_object_answers_parse_and_max_tokens_ends_with_length(endpoint):
    url, _, _ = endpoint
    c = client(url)
    done = c.chat.completions.create(model="alpha", messages=ASK, max_tokens=64, response_format={"type": "json_object"})
    choice = done.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # a random model may write one long string: cut at max_tokens, which says so
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    short = c.chat.completions.create(model="alpha", messages=ASK, max_tokens=3, response_format=schema_format("ticket", TICKET)).choices[0]
    assert short.finish_reason == "length" and short.message.content.startswith('{"severity"'[: len(short.message.content)]), short


@pytest.mark.parametrize("schema, fragment", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "object", "if": {"type": "object"}, "then": {}}, "if"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/remote.json"}}}, "example.com"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200} for i in range(400)}}, "over the limit"),
])
def test_schemas_the_engine_cannot_follow_are_400s_that_say_why_and_quickly(endpoint, schema, fragment):
    import openai

    url, _, _ = endpoint
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="alpha", messages=ASK, max_tokens=8, response_format=schema_format("bad", schema))
    assert fragment in e.value.body["message"] and e.value.body["code"] == "invalid_response_format", e.value.body
    assert time.monotonic() - start < 10


def test_a_hostile_schema_compiles_in_bounded_time(endpoint):
    """200 properties of nested alternations: a DFA-based engine takes seconds to build it; this one
    answers at once (lazily built lexer) and every answer still validates or ends at max_tokens."""
    url, _, _ = endpoint
    hostile = {"type": "object", "properties": {f"f{i}": {"type": "string", "pattern": "^(a|b|c){1,40}(d|e){1,40}$"} for i in range(200)},
               "required": ["f0"], "additionalProperties": False}
    start = time.monotonic()
    choice = client(url).chat.completions.create(model="alpha", messages=ASK, max_tokens=40, response_format=schema_format("h", hostile)).choices[0]
    assert time.monotonic() - start < 30
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), hostile)


def test_n_choices_and_a_seed_repeat_on_one_replica(endpoint):
    import openai

    url, _, _ = endpoint
    c = client(url)
    ask = dict(model="alpha", messages=ASK, max_tokens=12, temperature=1.0, n=3, seed=1234)
    first, again = c.chat.completions.create(**ask), c.chat.completions.create(**ask)
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in first.choices]
    assert texts == [ch.message.content for ch in again.choices], "a seed makes sampled answers repeatable"
    assert len(set(texts)) > 1, f"choice i samples with seed + i: {texts}"
    single = c.chat.completions.create(model="alpha", messages=ASK, max_tokens=12)
    assert first.usage.prompt_tokens == single.usage.prompt_tokens and first.usage.completion_tokens >= 3, "one prompt, three answers"
    with pytest.raises(openai.BadRequestError, match="serve.max_choices"):
        c.chat.completions.create(model="alpha", messages=ASK, max_tokens=2, n=5)
    streamed = list(c.chat.completions.create(**ask, stream=True))
    by_choice = {i: "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices and ch.choices[0].index == i) for i in range(3)}
    assert [by_choice[i].strip() for i in range(3)] == texts, "streamed choices, merged by index, are the same answers"


def test_chat_logprobs_are_the_models_own_and_sum_sanely(endpoint):
    url, _, _ = endpoint
    c = client(url)
    done = c.chat.completions.create(model="beta", messages=ASK, max_tokens=10, logprobs=True, top_logprobs=3)
    choice = done.choices[0]
    content = choice.logprobs.content
    assert len(content) == done.usage.completion_tokens - (choice.finish_reason == "stop"), "one entry per token (the end token has none)"
    assert "".join(bytes(x.bytes).decode("utf-8", errors="replace") for x in content).strip() == choice.message.content
    for x in content:
        top = [t.logprob for t in x.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and x.logprob <= 0
        assert sum(math.exp(t) for t in top) <= 1 + 1e-5
        assert x.token == x.top_logprobs[0].token and x.logprob == pytest.approx(top[0]), "greedy: the chosen token is the most likely"
    chunks = list(c.chat.completions.create(model="beta", messages=ASK, max_tokens=10, logprobs=True, top_logprobs=3, stream=True))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert [(x.token, round(x.logprob, 4)) for x in streamed] == [(x.token, round(x.logprob, 4)) for x in content]


def test_completions_logprobs_in_the_legacy_shape(endpoint):
    url, _, _ = endpoint
    done = client(url).completions.create(model="alpha", prompt="The Tidewell T4 warranty lasts", max_tokens=6, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 and max(top.values()) >= x - 1e-6 for top, x in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = list(client(url).completions.create(model="alpha", prompt="The Tidewell T4 warranty lasts", max_tokens=6, logprobs=2, stream=True))
    parts = [ch.choices[0].logprobs for ch in streamed if ch.choices and ch.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens and [o for p in parts for o in p.text_offset] == lp.text_offset
