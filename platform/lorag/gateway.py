"""The OpenAI-compatible front door: auth, validation, model routing, retrieval, response shaping.

`Gateway(cfg, backend, ...)` is a plain object and `build_api(gateway)` its FastAPI app: under
Ray Serve the backend is the Generator deployment (`lorag.deployments`); in tests and evaluation
it is an `Engine` in the same process. A request goes: key -> body (bytes counted as they arrive)
-> schema (`lorag.schemas`) -> model and scope -> length check -> retrieval (off the event loop)
-> prompt (`lorag.prompts`) -> backend -> OpenAI-shaped response with numbered `sources`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorag.adapters import AdapterNotFoundError, AdapterStore, parse_model_id
from lorag.auth import Scope, authorize, digest, key_scopes
from lorag.completion import Completion
from lorag.config import LoragConfig
from lorag import responses
from lorag.embeddings import EmbeddingList, EmbeddingRequest, Embeddings
from lorag.engine import SamplingParams, torch_thread
from lorag.models import PromptEncoder
from lorag.prompts import augment_text, chat_prompt, question
from lorag.releases import Registry
from lorag.retrieval import Hit, asearch, citations
from lorag.routing import AUTO, Route, Router, adapter_profiles
from lorag.schemas import (APIError, ChatCompletion, ChatCompletionChunk, ChatRequest, CompletionRequest, ErrorResponse, Health, ModelCard, ModelList,
                           SamplingRequest, TextCompletion, TextCompletionChunk, error_body, validation_message)

PROFILES_TTL = 5.0  # seconds: `model: "auto"` sees an adapter saved or removed within this

log = logging.getLogger("lorag.gateway")


def base_name(cfg: LoragConfig) -> str:
    """The `model` name clients use for the base model without an adapter."""
    return Path(cfg.base_model).name if "/" in cfg.base_model and Path(cfg.base_model).exists() else cfg.base_model


class Gateway:
    """Everything between an HTTP request and the generation backend.

    Args:
        cfg: the config.
        backend: has `async generate(prompt, params, adapter) -> Completion` and `stream(...)`
            yielding text pieces then the `Completion` (an `Engine`, or the Serve handle wrapper).
        prompts: the base model's tokenizer and context (the length check before retrieval).
        embedder_ref: the embedder, resolved on this node (when there are knowledge bases).

    Raises:
        RuntimeError: the config requires API keys and none were found (first, before any loading).
    """

    def __init__(self, cfg: LoragConfig, backend, prompts: PromptEncoder, embedder_ref: str | None = None):
        from lorag.handle import open_store

        self.cfg, self.backend, self.prompts = cfg, backend, prompts
        self.scopes = key_scopes(cfg)
        self.store = AdapterStore(cfg.adapter_store)
        self.base = base_name(cfg)
        self.metrics = None  # set by the Serve deployment: request, token and retrieval counters
        self.embedder = None
        self.embed_thread = torch_thread("lorag-embed")
        self.embedder_ref = embedder_ref or cfg.embedder
        self.router: tuple[tuple, Router] | None = None  # (profiles' key, router) for `model: "auto"`
        self._profiles_at = 0.0  # when the router's profiles were last read from the store
        self._grammars = None  # `grammars`, made on first use
        self.registry = Registry(self.store, cfg)  # what `model: NAME` means now: stable, canary (lorag.releases)
        if cfg.knowledge_bases:
            self.embed_thread.submit(self._embedder).result()
        self.embeddings = Embeddings(cfg, self.embedder, self.embed_thread)  # /v1/embeddings and retrieval queries, batched
        self.kb_stores = {kb.name: open_store(cfg.milvus_uri(kb), kb.token) for kb in cfg.knowledge_bases}

    # -- routes --------------------------------------------------------------------------------------

    def models(self, scope: Scope) -> list[dict[str, Any]]:
        """The base model, each adapter, and each adapter version the key may use."""
        now = int(time.time())
        allowed = (lambda m: scope.models is None or m in scope.models)
        data = [{"id": self.base, "object": "model", "created": now, "owned_by": "lorag"}] if allowed(self.base) else []
        if allowed(AUTO):  # routes each request to an adapter the key may use, or to the base model (lorag.routing)
            data.append({"id": AUTO, "object": "model", "created": now, "owned_by": "lorag", "root": self.base})
        for name in self.store.names():
            if not allowed(name):
                continue
            data.append({"id": name, "object": "model", "created": now, "owned_by": "lorag", "root": self.base})
            data += [{"id": f"{name}@v{v}", "object": "model", "created": now, "owned_by": "lorag", "root": self.base} for v in self.store.versions(name)]
        return data

    async def chat(self, req: ChatRequest, scope: Scope, client: str | None = None):
        """A chat completion; `client` identifies the caller (its key's digest) for a sticky canary side (`lorag.releases`)."""
        messages = [m.model_dump() for m in req.messages]
        max_tokens = self._max_tokens(req)
        await self._grammar(req)  # a schema that cannot be followed is refused before any retrieval (then cached)
        route = await self._auto(question(messages), scope) if req.model == AUTO else None
        adapter, kb_name, system_prompt = await self._route(req, scope, route, client)
        client_system = self.cfg.serve.client_system_message  # whether the client's system message may replace the adapter's
        await self._check_length(chat_prompt(messages, [], system_prompt, client_system), max_tokens)
        hits = await self._retrieve(kb_name, question(messages), req.k) if kb_name else []
        prompt = chat_prompt(messages, hits, system_prompt, client_system)
        return await self._complete(req, adapter, prompt, max_tokens, hits, kb_name, chat=True, route=route)

    async def completions(self, req: CompletionRequest, scope: Scope, client: str | None = None):
        max_tokens = self._max_tokens(req)
        await self._grammar(req)
        route = await self._auto(req.prompt, scope) if req.model == AUTO else None
        adapter, kb_name, _ = await self._route(req, scope, route, client)
        await self._check_length(req.prompt, max_tokens)
        hits = await self._retrieve(kb_name, req.prompt, req.k) if kb_name else []
        return await self._complete(req, adapter, augment_text(req.prompt, hits), max_tokens, hits, kb_name, chat=False, route=route)

    # -- steps ---------------------------------------------------------------------------------------

    def _embedder(self):
        """The embedder, loaded on first use; call on `embed_thread` (all torch work of the embedder runs there)."""
        if self.embedder is None:
            from lorag.embed import Embedder

            self.embedder = Embedder(self.embedder_ref, cache_dir=self.cfg.cache_dir)
        return self.embedder

    async def _auto(self, query: str, scope: Scope) -> Route:
        """`model: "auto"`: the adapter whose profile is nearest the query among those the key may
        use (`lorag.routing`), or the base model when none reaches `serve.route_threshold`."""

        scope.check_model(AUTO)  # a key limited to some models uses `auto` only when its list names it

        def decide() -> Route:
            # The store's profiles are read at most every PROFILES_TTL seconds (a listing and a metadata
            # read per adapter, a round trip each on a remote store); one router serves every key.
            now = time.monotonic()
            if self.router is None or now - self._profiles_at > PROFILES_TTL:
                profiles, key = adapter_profiles(self.cfg, self.store)
                self._profiles_at = now
                if self.router is None or self.router[0] != key:
                    self.router = (key, Router(self._embedder().embed, profiles, self.cfg.serve.route_threshold))
            return self.router[1].route(query, scope.models)

        return await asyncio.get_running_loop().run_in_executor(self.embed_thread, decide)

    async def _route(self, req: SamplingRequest, scope: Scope, route: Route | None = None, client: str | None = None) -> tuple[str | None, str | None, str | None]:
        """(adapter id `name@vN` or None for the base, knowledge base to retrieve from or None,
        system prompt), after checking the key may use them. `route`: the decision for `model: "auto"`;
        a bare adapter name is its stable version or its canary (sticky by `user`, else `client`)."""
        model = req.model if route is None else (route.adapter or self.base)
        name, version = parse_model_id(model)
        if route is not None and route.adapter is None and scope.models is not None and self.base not in scope.models:
            raise APIError(403, f"model auto: no adapter this API key may use fits the request (best score {route.score:.2f}, "
                           f"serve.route_threshold {self.cfg.serve.route_threshold}), and the key may not use the base model {self.base!r}",
                           type="permission_error", code="model_not_allowed")
        scope.check_model(self.base if model == self.base else name)
        if req.kb is not None:
            if not self.cfg.serve.allow_kb_override:
                raise APIError(403, "the kb field is disabled on this endpoint (serve.allow_kb_override)", type="permission_error", code="kb_override_disabled")
            scope.check_kb(req.kb)  # first: a key that may not read it gets one answer whether it exists or not
            if req.kb not in self.kb_stores:
                raise APIError(404, f"knowledge base {req.kb!r} not found", code="kb_not_found")
        adapter, kb, system_prompt = (None, None, None) if model == self.base else await asyncio.to_thread(self._adapter, model, name, version, scope, req.user or client)
        kb = req.kb or kb
        if kb is not None and req.retrieval:
            scope.check_kb(kb)
        return adapter, (kb if req.retrieval else None), system_prompt

    def _adapter(self, model: str, name: str, version: str | None, scope: Scope, sticky: str | None) -> tuple[str, str | None, str | None]:
        try:
            bound = self.registry.binding(name, version, sticky)
        except (AdapterNotFoundError, ValueError) as e:
            reason = str(e).replace(self.store.root, "the adapter store")
            names = self.store.names()
            if scope.models is not None and name not in names:  # the store's own message lists every adapter
                reason = f"adapter {name!r} is not in the adapter store"
            available = [m for m in [self.base, *names] if scope.models is None or m in scope.models]  # only what this key may see
            raise APIError(404, f"model {model!r} not found: {reason}. Available: {available}", code="model_not_found") from None
        kb = bound.knowledge_base
        return f"{name}@v{bound.number}", (kb if kb in self.kb_stores else None), bound.system_prompt

    def _max_tokens(self, req: SamplingRequest) -> int:
        """The request's max_tokens (400 past the limit); also checks `n` against serve.max_choices."""
        if req.n > self.cfg.serve.max_choices:
            raise APIError(400, f"n {req.n} is above this endpoint's limit of {self.cfg.serve.max_choices} (serve.max_choices)", code="n_too_large")
        n = req.completion_tokens() or self.cfg.serve.max_tokens
        if n > self.cfg.serve.max_tokens_limit:
            raise APIError(400, f"max_tokens {n} is above this endpoint's limit of {self.cfg.serve.max_tokens_limit}", code="max_tokens_too_large")
        return n

    async def _check_length(self, prompt, max_tokens: int) -> None:
        """Refuse a prompt that cannot fit before spending any retrieval on it."""
        self.prompts.check(len(await asyncio.to_thread(self.prompts.encode, prompt)), max_tokens)

    async def _embed(self, query: str) -> list[float]:
        """The query's vector, embedded on the gateway's one embedding thread (off the event loop), in a pass
        shared with concurrent queries and embedding requests (`lorag.embeddings`)."""
        return (await self.embeddings.embed([query]))[0][0].tolist()

    async def _retrieve(self, kb_name: str, query: str, k: int | None) -> list[Hit]:
        from pymilvus.exceptions import MilvusException
        from ray.exceptions import RayActorError

        kb = self.cfg.knowledge_base(kb_name)
        start = time.perf_counter()
        try:
            hits = await asearch(self.kb_stores[kb_name], kb, query, self._embed, k)
        except (LookupError, MilvusException, RayActorError) as e:
            log.warning("knowledge base %s: search failed: %s", kb_name, e)
            raise APIError(503, f"knowledge base {kb_name!r} is not available (not built yet, or its Milvus is down)", type="server_error", code="kb_unavailable") from None
        if self.metrics:
            self.metrics.retrieval(kb_name, (time.perf_counter() - start) * 1000)
        return hits

    async def _complete(self, req: SamplingRequest, adapter: str | None, prompt, max_tokens: int, hits: list, kb_name: str | None, chat: bool,
                        route: Route | None = None):
        """Generate `req.n` choices (choice i with seed + i when seeded) and answer in OpenAI's shape (`lorag.responses`)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature or 0.0, top_p=req.top_p, stop=req.stops(), seed=req.seed,
                                frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                                grammar=await self._grammar(req), logprobs=req.logprob_count())
        choices = [params if params.seed is None else replace(params, seed=params.seed + i) for i in range(req.n)]
        tag = adapter or self.base
        # Every answer names the model that answered: the exact version (`name@vN`), or the base model's name.
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": tag}
        sources = citations(hits, self.cfg.knowledge_base(kb_name).sources) if hits else None
        token_bytes = self.grammars.token_bytes if params.logprobs is not None else _no_bytes
        start = time.perf_counter()
        try:
            if req.stream:
                streams = [self.backend.stream(prompt, p, adapter) for p in choices]
                try:  # errors before the first token are HTTP statuses, not in-band
                    firsts = await _all_or_none([anext(s) for s in streams])
                except BaseException:
                    for stream in streams:
                        await stream.aclose()
                    raise
                include_usage = bool((req.stream_options or {}).get("include_usage"))
                return StreamingResponse(responses.events(meta, streams, firsts, chat, include_usage, token_bytes, sources,
                                                          lambda out: self._count(tag, "ok", out, start)), media_type="text/event-stream")
            outs = await _all_or_none([self.backend.generate(prompt, p, adapter) for p in choices])
        except APIError as e:
            self._count(tag, "overloaded" if e.status == 503 else "error")
            raise
        for out in outs:
            self._count(tag, "ok", out, start)
        answer = responses.body(meta, outs, chat, token_bytes)
        if sources:
            answer["sources"] = sources
        if route is not None:
            answer["route"] = {"model": tag, "score": round(route.score, 4), "scores": {k: round(v, 4) for k, v in route.scores.items()}}
        return JSONResponse(answer)

    async def _grammar(self, req: SamplingRequest) -> str | None:
        """The request's `response_format` as a grammar (None: free text); 400 if it cannot be followed."""
        if req.response_format is None or req.response_format.type == "text":
            return None
        return await asyncio.to_thread(lambda: self.grammars.compile(req.response_format.spec()))

    @property
    def grammars(self):
        """Structured output for the base model's tokenizer (`lorag.grammar`), made on first use: the
        gateway checks a schema before any retrieval, the generator follows it."""
        if self._grammars is None:
            from lorag.grammar import Grammars

            self._grammars = Grammars(self.prompts.tokenizer)
        return self._grammars

    def _count(self, tag: str, status: str, out: Completion | None = None, start: float | None = None) -> None:
        """Count a request by the model that answered (`name@vN`): its status, tokens and (`start`) generation latency."""
        if self.metrics:
            self.metrics.request(tag, status, out, None if start is None else (time.perf_counter() - start) * 1000)


async def _all_or_none(calls: list) -> list:
    """Every call's result, in order; if one fails, the others are cancelled (a choice whose sibling
    failed is not generated for nobody) and the first error is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _no_bytes(token: int) -> bytes:
    raise AssertionError("token bytes are only read for log-probabilities")


# -- the HTTP app -------------------------------------------------------------------------------------


ERRORS = {400: "invalid request (the message names the field), or a prompt past the model's context", 401: "missing or invalid API key",
          403: "the API key may not use this model or knowledge base, or the kb field is off", 404: "no such model, version, tag or knowledge base",
          413: "body over serve.max_body_bytes", 503: "over capacity, or the knowledge base is unavailable"}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """An operation's OpenAPI `requestBody`: `model`, which the handler validates itself (`parse`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


def _answers(model: type[BaseModel], *errors: int, stream: type[BaseModel] | None = None) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI `responses`: `model` for 200 (`stream`: its server-sent events), `ErrorResponse` for `errors`."""
    ok: dict[str, Any] = {"model": model}
    if stream:  # OpenAPI 3.1: the schema of one event; its data is a chunk, an error mid-stream, or the final [DONE]
        data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [_ref(stream), _ref(ErrorResponse)]}}
        ok["content"] = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data]}}, "required": ["data"]}}}
    return {200: ok, **{status: {"model": ErrorResponse, "description": ERRORS[status]} for status in errors}}


def build_api(gateway: Gateway) -> FastAPI:
    """The FastAPI app serving `gateway`: /health, /v1/models, /v1/chat/completions, /v1/completions,
    /v1/embeddings, and /openapi.json describing them as the handlers read them (`_openapi`)."""
    api = FastAPI(title="lorag", description="OpenAI-compatible LoRA + RAG endpoint")
    # The handlers read the key and the body themselves (`authorize`, `parse`): the document names both.
    secured = {"security": [{"bearer": []}]} if gateway.scopes else {}
    api.openapi = lambda: _openapi(api, gateway, secured)
    _add_error_handlers(api)
    _add_routes(api, gateway, secured)
    return api


def _openapi(api: FastAPI, gateway: Gateway, secured: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document plus the request bodies (with this endpoint's limits on max_tokens and n, and its
    embedding dimension), the streamed chunks and the bearer key; no 422s (this app answers validation errors with 400)."""
    max_tokens_limit, embedding_dim = gateway.cfg.serve.max_tokens_limit, gateway.embedder.dim if gateway.embedder else None
    if api.openapi_schema is None:
        doc = FastAPI.openapi(api)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        added = [(ChatRequest, "validation"), (CompletionRequest, "validation"), (EmbeddingRequest, "validation"),
                 (ChatCompletionChunk, "serialization"), (TextCompletionChunk, "serialization")]
        schemas.update(models_json_schema(added, ref_template="#/components/schemas/{model}")[1]["$defs"])
        limit = [{"type": "integer", "minimum": 1, "maximum": max_tokens_limit}, {"type": "null"}]
        schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"] = limit
        schemas["ChatRequest"]["properties"]["max_completion_tokens"]["anyOf"] = limit
        # chat's max_tokens is read (and limited) only without max_completion_tokens
        schemas["ChatRequest"]["if"] = {"properties": {"max_completion_tokens": {"type": "integer"}}, "required": ["max_completion_tokens"]}
        schemas["ChatRequest"]["else"] = {"properties": {"max_tokens": {"anyOf": limit}}}
        for body in ("ChatRequest", "CompletionRequest"):
            schemas[body]["properties"]["n"]["maximum"] = gateway.cfg.serve.max_choices
        if embedding_dim:  # the embedder's own dimension is the only one it answers
            schemas["EmbeddingRequest"]["properties"]["dimensions"]["anyOf"] = [{"const": embedding_dim}, {"type": "null"}]
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for operation in (op for path in doc["paths"].values() for op in path.values()):
            operation["responses"].pop("422", None)
        if secured:
            key = "an API key of serve.api_keys_env, api_keys_file or api_keys"
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "description": key}}
    return api.openapi_schema


def _add_error_handlers(api: FastAPI) -> None:
    """Every error the app answers, in OpenAI's error shape: lorag's own, unknown routes and
    methods, and bodies FastAPI fails to validate (400, not 422)."""

    @api.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        """Unknown routes (404) and wrong methods (405) in OpenAI's error shape too."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", code), status_code=e.status_code, headers=getattr(e, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(validation_message(e), "invalid_request_error", "invalid_request"), status_code=400)


def _add_routes(api: FastAPI, gateway: Gateway, secured: dict[str, Any]) -> None:
    """/health, /v1/models, /v1/models/{model}, /v1/chat/completions, /v1/completions and /v1/embeddings over `gateway`."""

    @api.get("/health", response_model=None, responses=_answers(Health))
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models", response_model=None, responses=_answers(ModelList, 401), openapi_extra=secured)
    async def models(request: Request) -> dict[str, Any]:
        scope = authorize(gateway.scopes, request.headers.get("authorization"))
        return {"object": "list", "data": await asyncio.to_thread(gateway.models, scope)}

    @api.get("/v1/models/{model:path}", response_model=None, responses=_answers(ModelCard, 401, 404), openapi_extra=secured)
    async def model(model: str, request: Request) -> dict[str, Any]:
        """One model by id (the official client's `models.retrieve`): the base, an adapter or `adapter@vN`."""
        scope = authorize(gateway.scopes, request.headers.get("authorization"))
        found = next((m for m in await asyncio.to_thread(gateway.models, scope) if m["id"] == model), None)
        if found is None:
            raise APIError(404, f"model {model!r} not found", code="model_not_found")
        return found

    @api.post("/v1/chat/completions", responses=_answers(ChatCompletion, 400, 401, 403, 404, 413, 503, stream=ChatCompletionChunk),
              openapi_extra={**_body(ChatRequest), **secured})
    async def chat(request: Request):
        scope = authorize(gateway.scopes, request.headers.get("authorization"))
        return await gateway.chat(await parse(request, ChatRequest, gateway.cfg.serve.max_body_bytes), scope, _client(request))

    @api.post("/v1/completions", responses=_answers(TextCompletion, 400, 401, 403, 404, 413, 503, stream=TextCompletionChunk),
              openapi_extra={**_body(CompletionRequest), **secured})
    async def completions(request: Request):
        scope = authorize(gateway.scopes, request.headers.get("authorization"))
        return await gateway.completions(await parse(request, CompletionRequest, gateway.cfg.serve.max_body_bytes), scope, _client(request))

    @api.post("/v1/embeddings", responses=_answers(EmbeddingList, 400, 401, 403, 404, 413), openapi_extra={**_body(EmbeddingRequest), **secured})
    async def embeddings(request: Request) -> dict[str, Any]:
        """The knowledge bases' embedder, in OpenAI's shape (`lorag.embeddings`)."""
        scope = authorize(gateway.scopes, request.headers.get("authorization"))
        return await gateway.embeddings.create(await parse(request, EmbeddingRequest, gateway.cfg.serve.max_body_bytes), scope)


def _client(request: Request) -> str | None:
    """Who is asking, for a sticky canary side: the digest of the request's key (None without one)."""
    header = request.headers.get("authorization")
    return digest(header) if header else None


async def parse(request: Request, schema: type[BaseModel], limit: int):
    """The body, counted as it arrives (413 past `limit`, chunked uploads too), validated (400 with field paths)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as e:
        raise APIError(400, validation_message(e), code="invalid_request") from None
