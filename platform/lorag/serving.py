"""The HTTP endpoint: an OpenAI-style API on Ray Serve that routes each request to its adapter.

Two deployments:
- `Gateway` (FastAPI ingress): validates requests, resolves `model` (`<adapter>`,
  `<adapter>@<version>` or the base model's name) against the adapter store, retrieves from the
  adapter's knowledge base, and returns the answer with numbered `sources`.
- `Generator`: holds the base model with adapter slots (`lorag.multilora`); adapters are loaded
  per id with `serve.multiplexed` (LRU), so Serve routes requests for an adapter to replicas that
  already hold it, and concurrent requests for different adapters share one batched forward pass.

`build_app(cfg)` binds both from one `LoragConfig`; `serve/app.py` only calls it, and
`serve_config(cfg)` writes the same deployment as a `serve deploy` config file.

Over capacity (a generator's queue past `max_queued_requests`) requests get 503 at once; API keys
(`Authorization: Bearer`) guard every /v1 route when configured; bodies past `max_body_bytes` get
413. Per-adapter request and token counters and retrieval latency go to Ray's Prometheus metrics.
"""


import asyncio
import concurrent.futures
import hmac
import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pymilvus.exceptions import MilvusException
from ray import serve
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorag.adapters import AdapterNotFoundError, AdapterStore, parse_model_id
from lorag.config import LoragConfig
from lorag.retrieval import augment, augment_text, citations, question


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code


def error_body(message: str, type: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


# -- request schema ------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


# OpenAI request fields lorag cannot honour: set (truthy), they are a 400 rather than silently dropped.
UNSUPPORTED_FIELDS = {
    "logprobs": "log probabilities", "top_logprobs": "log probabilities", "logit_bias": "logit bias",
    "tools": "tool calls", "functions": "function calls", "tool_choice": "tool calls", "function_call": "function calls",
    "response_format": "structured output (only {\"type\": \"text\"})", "best_of": "best_of",
}


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions. Other OpenAI fields (user, penalties of 0, ...)
    are ignored; those lorag cannot honour (`UNSUPPORTED_FIELDS`) are refused when set."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            off = {"response_format": {"type": "text"}, "best_of": 1, "tool_choice": "none"}  # set, but asking for nothing
            asked = [f"{k} ({why})" for k, why in UNSUPPORTED_FIELDS.items() if data.get(k) and (k not in off or data[k] != off[k])]
            if asked:
                raise ValueError(f"not supported by lorag: {', '.join(asked)}")
        return data

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 or omitted: greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="Sampling seed (the range torch.manual_seed takes).")
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    retrieval: bool = Field(True, description="lorag: retrieve from the adapter's knowledge base (false: answer without sources).")
    k: int | None = Field(None, ge=1, le=50, description="lorag: chunks to retrieve (default: the knowledge base's top_k).")
    kb: str | None = Field(None, description="lorag: retrieve from this knowledge base instead of the adapter's own.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stops(self) -> list[str]:
        return [s for s in ([self.stop] if isinstance(self.stop, str) else (self.stop or [])) if s]


class ChatRequest(SamplingRequest):
    """`POST /v1/chat/completions` body; lorag adds `retrieval`, `k` and `kb`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.content.strip() for m in v):
            raise ValueError("messages must contain a user message with non-empty content")
        return v


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions` body: raw text in, no chat template; retrieval puts the sources before the prompt."""

    prompt: str = Field(min_length=1)
    echo: bool = Field(False, le=False, description="Not supported.")
    suffix: str | None = Field(None, max_length=0, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v


# -- the API -----------------------------------------------------------------------------------

api = FastAPI(title="lorag", description="OpenAI-compatible LoRA + RAG endpoint")


@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.code), status_code=e.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404) and wrong methods (405) in OpenAI's error shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), "invalid_request_error", code), status_code=e.status_code, headers=getattr(e, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(validation_message(e), "invalid_request_error", "invalid_request"), status_code=400)


def validation_message(e: ValidationError | RequestValidationError) -> str:
    """Pydantic errors as one line: `field.path: reason; ...` (invalid JSON says so)."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        msg = "body is not valid JSON" if err["type"] == "json_invalid" else err["msg"]
        parts.append(f"{loc or 'body'}: {msg}")
    return "; ".join(parts)


def base_name(cfg: LoragConfig) -> str:
    """The `model` name clients use for the base model without an adapter."""
    return Path(cfg.base_model).name if "/" in cfg.base_model and Path(cfg.base_model).exists() else cfg.base_model


def api_keys(cfg: LoragConfig) -> frozenset[str]:
    """Keys from the `api_keys_env` variable (comma-separated) and `api_keys_file` (one per line),
    as this process sees them (a replica gets them through its deployment's environment).

    Raises:
        RuntimeError: keys are missing where the config requires them (`auth_problem`).
    """
    if cfg.serve.auth == "none":
        return frozenset()
    keys = [k for k in os.environ.get(cfg.serve.api_keys_env, "").split(",")]
    if cfg.serve.api_keys_file:
        keys += Path(cfg.serve.api_keys_file).read_text().splitlines()
    found = frozenset(k.strip() for k in keys if k.strip() and not k.strip().startswith("#"))
    if problem := auth_problem(cfg, found):
        raise RuntimeError(problem)
    return found


def auth_problem(cfg: LoragConfig, keys: frozenset[str]) -> str | None:
    """Why the endpoint must not start with these keys, or None: `auth: api_keys` with no key, or a
    host beyond loopback with no key and no explicit `auth: none`."""
    sv = cfg.serve
    if keys or sv.auth == "none":
        return None
    where = f"${sv.api_keys_env}" + (f" or {sv.api_keys_file}" if sv.api_keys_file else "")
    if sv.auth == "api_keys":
        return f"serve.auth is api_keys but no API key was found in {where} (as this replica sees it): set {sv.api_keys_env}"
    if not _loopback(sv.host):
        return (f"serve.host {sv.host} exposes the endpoint beyond this machine, but no API key was found in {where}: "
                f"set {sv.api_keys_env} (lorag deploy passes it to the replicas), or say `serve.auth: none` to serve without keys")
    return None


def _loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


def serving_device(sv) -> tuple[str, str]:
    """(device, dtype name) for a generator replica: the GPU Ray assigned it when `gpus_per_replica`
    is set (bfloat16 where supported, with dtype auto), else the CPU (float32 with dtype auto)."""
    import torch

    if sv.gpus_per_replica:
        if not torch.cuda.is_available():
            raise RuntimeError(f"serve.gpus_per_replica is {sv.gpus_per_replica} but this replica sees no CUDA device "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}): "
                               "install a CUDA build of torch on the GPU nodes, or set gpus_per_replica: 0 to serve on CPUs")
        return "cuda", ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if sv.dtype == "auto" else sv.dtype
    return "cpu", "float32" if sv.dtype == "auto" else sv.dtype


def torch_thread(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """The one thread a replica runs its model on: loading it, and every forward pass after.

    Measured (SmolLM2-135M, a batch of 8, 2 cores): a model loaded on one thread and run from
    another, as asyncio's thread pool would run it, generated at 0.7-0.8x the speed of the same
    model loaded and run on one thread (likely because OpenMP keeps a thread team per calling
    thread), so the deployments keep all of their torch work on this single worker.
    """
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Gateway:
    """OpenAI-style front door: validation, adapter resolution, retrieval, response shaping."""

    def __init__(self, config: dict[str, Any], generator, embedder_ref: str):
        from ray.serve.metrics import Counter, Histogram

        from lorag.embed import Embedder
        from lorag.milvus import open_store

        self.cfg = LoragConfig.model_validate(config)
        self.api_keys = api_keys(self.cfg)  # first: a replica that must not serve without keys fails at once
        self.generator = generator
        self.store = AdapterStore(self.cfg.adapter_store)
        self.base = base_name(self.cfg)
        self.torch = torch_thread("lorag-embed")
        self.embedder = self.torch.submit(Embedder, embedder_ref, cache_dir=self.cfg.cache_dir).result() if self.cfg.knowledge_bases else None
        self.kb_stores = {kb.name: open_store(self.cfg.milvus_uri(kb), kb.token) for kb in self.cfg.knowledge_bases}
        self.requests = Counter("lorag_requests", description="Completion requests per model.", tag_keys=("model", "status"))
        self.tokens = Counter("lorag_tokens", description="Prompt and completion tokens per model.", tag_keys=("model", "kind"))
        self.retrieval_ms = Histogram("lorag_retrieval_ms", description="Knowledge-base search latency.", boundaries=[2, 5, 10, 20, 50, 100, 250, 1000], tag_keys=("kb",))

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": self._models()}

    @api.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request) -> dict[str, Any]:
        """One model by id (the official client's `models.retrieve`): the base, an adapter or `adapter@vN`."""
        self._authorize(request)
        found = next((m for m in self._models() if m["id"] == model), None)
        if found is None:
            raise APIError(404, f"model {model!r} not found. Available: {[self.base, *self.store.names()]}", code="model_not_found")
        return found

    def _models(self) -> list[dict[str, Any]]:
        now = int(time.time())
        data = [{"id": self.base, "object": "model", "created": now, "owned_by": "lorag"}]
        for name in self.store.names():
            versions = self.store.versions(name)
            data.append({"id": name, "object": "model", "created": now, "owned_by": "lorag", "root": self.base})
            data += [{"id": f"{name}@v{v}", "object": "model", "created": now, "owned_by": "lorag", "root": self.base} for v in versions]
        return data

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        from lorag.data import with_system

        req = await self._parse(request, ChatRequest)
        adapter_id, kb_name, system_prompt = self._resolve(req.model, req.kb)
        messages = [m.model_dump() for m in req.messages]
        hits = await self._retrieve(kb_name, question(messages), req.k) if kb_name and req.retrieval else []
        prompt = with_system(augment(messages, hits), system_prompt)
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await self._complete(req, adapter_id, prompt, max_tokens, hits, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self._parse(request, CompletionRequest)
        adapter_id, kb_name, _ = self._resolve(req.model, req.kb)
        hits = await self._retrieve(kb_name, req.prompt, req.k) if kb_name and req.retrieval else []
        return await self._complete(req, adapter_id, augment_text(req.prompt, hits), req.max_tokens, hits, chat=False)

    def _authorize(self, request: Request) -> None:
        """With API keys configured, every /v1 request needs `Authorization: Bearer <key>` (401 otherwise)."""
        if not self.api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in self.api_keys):
            raise APIError(401, "missing or invalid API key: send Authorization: Bearer <key>", code="invalid_api_key")

    async def _parse(self, request: Request, model: type[BaseModel]):
        """Authorize, bound the body size (413), then parse and validate the JSON body (400 with field paths)."""
        self._authorize(request)
        limit = self.cfg.serve.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
        body = await request.body()
        if len(body) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            raise APIError(400, validation_message(e), code="invalid_request") from None

    async def _complete(self, req: SamplingRequest, adapter_id: str | None, prompt, max_tokens: int | None, hits: list, chat: bool):
        params = {
            "max_tokens": max_tokens or self.cfg.serve.max_tokens,
            "temperature": req.temperature or 0.0,
            "top_p": req.top_p,
            "stop": req.stops(),
            "seed": req.seed,
        }
        handle = self.generator.options(multiplexed_model_id=adapter_id) if adapter_id else self.generator
        tag = adapter_id or self.base
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": req.model,
        }
        if req.stream:
            stream = handle.options(stream=True).generate_stream.remote(prompt, params)
            first = await self._call(anext(stream, None), tag)
            if first is None or "error" in first:
                self.requests.inc(tags={"model": tag, "status": "error"})
                raise APIError(first["status"], first["error"], code=first.get("code")) if first else APIError(500, "empty stream", type="server_error")
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._sse(meta, first, stream, hits, chat, include_usage, tag), media_type="text/event-stream")
        out = await self._call(handle.generate.remote(prompt, params), tag)
        if "error" in out:
            self.requests.inc(tags={"model": tag, "status": "error"})
            raise APIError(out["status"], out["error"], code=out.get("code"))
        self._count(tag, out)
        usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"], "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": out["finish_reason"]}
        else:
            choice = {"index": 0, "text": out["text"], "logprobs": None, "finish_reason": out["finish_reason"]}
        body = {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": usage}
        if hits:
            body["sources"] = citations(hits)
        return JSONResponse(body)

    async def _sse(self, meta, first, stream, hits, chat: bool, include_usage: bool, tag: str) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format; `sources` ride on the first chunk."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                return {**meta, "object": obj, "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}
            return {**meta, "object": obj, "choices": [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]}

        head = chunk(None, None, role=True)
        if hits:
            head["sources"] = citations(hits)
        yield f"data: {json.dumps(head)}\n\n"
        item = first
        try:
            while item is not None:
                if "finish_reason" in item:
                    self._count(tag, item)
                    yield f"data: {json.dumps(chunk(None, item['finish_reason']))}\n\n"
                    if include_usage:
                        usage = {"prompt_tokens": item["prompt_tokens"], "completion_tokens": item["completion_tokens"], "total_tokens": item["prompt_tokens"] + item["completion_tokens"]}
                        yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
                    break
                if item.get("text"):
                    yield f"data: {json.dumps(chunk(item['text'], None))}\n\n"
                item = await anext(stream, None)
        except Exception as e:  # the stream already started: report in-band, as OpenAI does
            yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'server_error', None))}\n\n"
        yield "data: [DONE]\n\n"

    async def _call(self, awaitable, tag: str):
        """Await a generator call; a full queue is a 503 for the client, never a crash."""
        from ray.serve.exceptions import BackPressureError

        try:
            return await awaitable
        except BackPressureError:
            self.requests.inc(tags={"model": tag, "status": "overloaded"})
            raise APIError(503, "the endpoint is over capacity; retry shortly", type="server_error", code="overloaded") from None

    def _count(self, tag: str, out: dict[str, Any]) -> None:
        self.requests.inc(tags={"model": tag, "status": "ok"})
        self.tokens.inc(out["prompt_tokens"], tags={"model": tag, "kind": "prompt"})
        self.tokens.inc(out["completion_tokens"], tags={"model": tag, "kind": "completion"})

    def _resolve(self, model: str, kb_override: str | None = None) -> tuple[str | None, str | None, str | None]:
        """(multiplexed adapter id or None for the base, knowledge base, system prompt)."""
        if kb_override is not None and kb_override not in self.kb_stores:
            raise APIError(404, f"knowledge base {kb_override!r} not found. Available: {sorted(self.kb_stores)}", code="kb_not_found")
        if model == self.base:
            return None, kb_override, None
        name, version = parse_model_id(model)
        try:
            number = self.store.resolve_number(name, version)
        except (AdapterNotFoundError, ValueError) as e:
            known = [self.base, *self.store.names()]
            raise APIError(404, f"model {model!r} not found: {e}. Available: {known}", code="model_not_found") from None
        meta = self.store.metadata(name, number)
        # The config's binding wins, so a knowledge base can be re-bound without retraining.
        in_cfg = next((a for a in self.cfg.adapters if a.name == name), None)
        kb = in_cfg.knowledge_base if in_cfg else meta.get("knowledge_base")
        system_prompt = in_cfg.system_prompt if in_cfg else meta.get("system_prompt")
        if kb is not None and kb not in self.kb_stores:
            kb = None
        return f"{name}@v{number}", kb_override or kb, system_prompt

    async def _retrieve(self, kb_name: str, query: str, k: int | None) -> list[dict[str, Any]]:
        kb = self.cfg.knowledge_base(kb_name)
        start = time.perf_counter()
        vector = None if kb.search == "bm25" else (await asyncio.get_running_loop().run_in_executor(self.torch, self.embedder.embed, [query]))[0].tolist()
        try:
            hits = await self.kb_stores[kb_name].acall("search", kb.collection, vector, query, k or kb.top_k, kb.search)
        except (LookupError, MilvusException, RayActorError) as e:
            raise APIError(503, f"knowledge base {kb_name!r} is not built: {e}", type="server_error", code="kb_unavailable") from None
        self.retrieval_ms.observe((time.perf_counter() - start) * 1000, tags={"kb": kb_name})
        return hits


@serve.deployment
class Generator:
    """The base model with adapter slots (batched LoRA): requests for different adapters share one forward pass.

    Serve's multiplexing routes each adapter's requests to replicas that already hold it; inside a
    replica a small batcher collects concurrent requests (whatever their adapters) into one
    `generate` call whose rows each use their own adapter (`lorag.multilora`). `serve.batch` is
    not used because it splits batches by multiplexed model id. Streamed requests run alone.
    """

    def __init__(self, config: dict[str, Any], model_ref: str):
        from lorag.models import load_causal_lm, load_tokenizer, resolve_model
        from lorag.multilora import MultiLoraModel

        self.cfg = LoragConfig.model_validate(config)
        sv = self.cfg.serve
        path = resolve_model(model_ref, self.cfg.model_cache)  # on this replica's node, into its cache
        self.tokenizer = load_tokenizer(path)
        self.torch = torch_thread("lorag-generate")  # loads the model and runs every forward pass
        device, dtype = serving_device(sv)
        self.model = self.torch.submit(lambda: load_causal_lm(path, dtype).to(device).eval()).result()
        # Slots beyond Serve's LRU size: a batch may still need adapters Serve has just evicted.
        self.mm = MultiLoraModel(self.model, max_adapters=sv.max_adapters_per_replica + sv.max_batch_size, max_rank=sv.max_lora_rank,
                                 merge_single=sv.merge_single_adapter)
        self.store = AdapterStore(self.cfg.adapter_store)
        self.lock = threading.Lock()  # one forward pass at a time; guards the adapter slots
        self.recent: OrderedDict[str, None] = OrderedDict()  # loaded adapters, least recently used first
        self.batcher = Batcher(self._run_batch, sv.max_batch_size, sv.batch_wait_ms / 1000, executor=self.torch)
        # Wrapped here, not with a decorator, because the cache size comes from the config; Serve
        # keeps its LRU on the wrapped function object, so it must be a plain function, not a bound method.
        async def load(adapter_id: str) -> str:
            await asyncio.get_running_loop().run_in_executor(self.torch, self._load_adapter, adapter_id)
            return adapter_id

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=sv.max_adapters_per_replica)(load)

    # -- adapters ------------------------------------------------------------------------------

    def _load_adapter(self, adapter_id: str) -> None:
        """Validate an adapter against this base model and put it in a slot (its cold load)."""
        with self.lock:
            self._slot(adapter_id, busy=set())

    def _slot(self, adapter_id: str, busy: set[str]) -> int:
        """The adapter's slot, loading it (evicting the least recently used idle one) if needed. Hold `self.lock`."""
        from lorag.multilora import LoraWeights

        if adapter_id in self.mm.slots:
            self.recent.move_to_end(adapter_id)
            return self.mm.slots[adapter_id]
        name, version = parse_model_id(adapter_id)
        meta = self.store.metadata(name, version)
        if meta.get("base_model") not in (None, self.cfg.base_model):
            raise ValueError(f"adapter {adapter_id} was trained on {meta['base_model']!r}, but this endpoint serves {self.cfg.base_model!r}")
        weights = LoraWeights.load(self.store.fetch(name, version, self.cfg.model_cache))
        if len(self.mm.slots) >= self.mm.max_adapters:
            idle = next(a for a in self.recent if a not in busy)
            self.mm.unload(idle)
            del self.recent[idle]
        slot = self.mm.load(adapter_id, weights)
        self.recent[adapter_id] = None
        return slot

    # -- requests ------------------------------------------------------------------------------

    async def generate(self, prompt: list[dict[str, str]] | str, params: dict[str, Any]) -> dict[str, Any]:
        """One completion: chat messages (rendered with the chat template) or raw text; batched with others."""
        adapter_id = serve.get_multiplexed_model_id() or None
        error = await self._ensure_adapter(adapter_id)
        if error:
            return error
        ids = await asyncio.to_thread(self._encode, prompt)
        if error := self._too_long(len(ids), params):
            return error
        return await self.batcher.submit((adapter_id, ids, params))

    async def generate_stream(self, prompt: list[dict[str, str]] | str, params: dict[str, Any]):
        """The same, streamed: text pieces as they are decoded, then the finish record (or one error record)."""
        from transformers import TextIteratorStreamer

        adapter_id = serve.get_multiplexed_model_id() or None
        error = await self._ensure_adapter(adapter_id)
        if error:
            yield error
            return
        ids = await asyncio.to_thread(self._encode, prompt)
        if error := self._too_long(len(ids), params):
            yield error
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        gone = threading.Event()  # set when the client stops reading: generation ends at its next token
        job = asyncio.get_running_loop().run_in_executor(self.torch, self._run_stream, adapter_id, ids, params, streamer, gone)
        held = StopHold(params["stop"])
        try:
            while True:
                piece = await asyncio.to_thread(next, streamer, None)
                if piece is None or held.stopped:
                    break
                if piece := held.feed(piece):
                    yield {"text": piece}
        finally:
            if not job.done():
                gone.set()
        out = await job
        if tail := held.flush():
            yield {"text": tail}
        yield {"finish_reason": "stop" if held.stopped else out["finish_reason"], "prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"]}

    async def _ensure_adapter(self, adapter_id: str | None) -> dict[str, Any] | None:
        if adapter_id:
            try:
                await self.get_adapter(adapter_id)
            except (AdapterNotFoundError, ValueError) as e:
                return {"error": str(e), "status": 404 if isinstance(e, AdapterNotFoundError) else 400, "code": "adapter_unavailable"}
        return None

    def _encode(self, prompt: list[dict[str, str]] | str) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    def _too_long(self, n_prompt: int, params: dict[str, Any]) -> dict[str, Any] | None:
        limit = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        if n_prompt + params["max_tokens"] <= limit:
            return None
        return {
            "error": f"prompt ({n_prompt} tokens) plus max_tokens ({params['max_tokens']}) exceeds the model's context of {limit} tokens",
            "status": 400,
            "code": "context_length_exceeded",
        }

    # -- generation (worker threads, under the lock) ---------------------------------------------

    def _run_batch(self, items: list[tuple[str | None, list[int], dict[str, Any]]], gone=lambda i: False) -> list[dict[str, Any]]:
        """Generate for a batch of requests. Greedy requests share one pass whatever their adapters;
        sampled ones share a pass when their sampling settings match; a seeded one runs alone, so
        the same seed gives the same answer whatever else is in flight. A request whose caller is
        gone (`gone(i)`: disconnected, timed out) stops decoding at its next token."""
        from lorag.multilora import generate_batch

        groups: dict[Any, list[int]] = {}
        for i, (_, _, p) in enumerate(items):
            key = "greedy" if p["temperature"] == 0 else ("sample", p["temperature"], p["top_p"], i if p["seed"] is not None else None)
            groups.setdefault(key, []).append(i)
        results: list[dict[str, Any]] = [{} for _ in items]
        with self.lock:
            for rows in groups.values():
                busy = {items[i][0] for i in rows if items[i][0]}
                slots = [self._slot(items[i][0], busy) if items[i][0] else 0 for i in rows]
                p = items[rows[0]][2]
                out = generate_batch(
                    self.mm, [items[i][1] for i in rows], slots,
                    max_new_tokens=max(items[i][2]["max_tokens"] for i in rows), pad_id=self._pad_id(),
                    temperature=p["temperature"], top_p=p["top_p"], seed=p["seed"], gone=lambda j, rows=rows: gone(rows[j]),
                )
                for i, new in zip(rows, out):
                    results[i] = self._finish(new[: items[i][2]["max_tokens"]], len(items[i][1]), items[i][2])
        return results

    def _run_stream(self, adapter_id: str | None, ids: list[int], params: dict[str, Any], streamer, gone: threading.Event) -> dict[str, Any]:
        import torch
        from transformers import StoppingCriteriaList

        from lorag.multilora import CallerGone

        sample = params["temperature"] > 0
        kwargs: dict[str, Any] = {"max_new_tokens": params["max_tokens"], "do_sample": sample, "pad_token_id": self._pad_id(), "streamer": streamer,
                                  "stopping_criteria": StoppingCriteriaList([CallerGone(lambda _: gone.is_set(), [0])])}
        if sample:
            kwargs.update(temperature=params["temperature"], top_p=params["top_p"])
        if params["stop"]:
            kwargs.update(stop_strings=params["stop"], tokenizer=self.tokenizer)
        try:
            with self.lock:
                slot = self._slot(adapter_id, {adapter_id}) if adapter_id else 0
                if sample and params["seed"] is not None:
                    torch.manual_seed(params["seed"])
                with self.mm.rows([slot]), torch.inference_mode():
                    out = self.model.generate(input_ids=torch.tensor([ids], device=self.model.device),
                                              attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.model.device), **kwargs)
        except BaseException:
            streamer.end()
            raise
        return self._finish(out[0, len(ids):].tolist(), len(ids), params)

    def _finish(self, new: list[int], n_prompt: int, params: dict[str, Any]) -> dict[str, Any]:
        """Decode, cut at the first stop sequence, and say why the completion ended."""
        eos = self.tokenizer.eos_token_id
        ended = bool(new) and new[-1] == eos
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        finish = "stop" if ended or len(new) < params["max_tokens"] else "length"
        cut = min((text.index(s) for s in params["stop"] if s in text), default=None)
        if cut is not None:
            text, finish = text[:cut], "stop"
        return {"text": text.strip(), "finish_reason": finish, "prompt_tokens": n_prompt, "completion_tokens": len(new)}

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id


class Batcher:
    """Collects concurrent calls into batches of up to `max_size`.

    A batch closes when it is full, when no call has arrived for `wait_s`, or `MAX_WAIT_FACTOR *
    wait_s` after its first call, whichever comes first: a burst whose calls trickle in (through
    the proxy and the gateway, on a busy machine) still shares one pass, and a lone call waits only
    `wait_s`. `await submit(item)` returns `run(items, gone)[i]` for its item; `run` (blocking)
    executes on `executor` (default: asyncio's thread pool) while the next batch gathers, and may
    poll `gone(i)`: true once item i's caller was cancelled (its client disconnected or timed out).
    """

    MAX_WAIT_FACTOR = 8

    def __init__(self, run, max_size: int, wait_s: float, executor: concurrent.futures.Executor | None = None):
        self.run, self.max_size, self.wait_s, self.executor = run, max_size, wait_s, executor
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        if self.task is None or self.task.done():  # started lazily, inside the replica's event loop
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            now = loop.time()
            last_call = now + self.MAX_WAIT_FACTOR * self.wait_s
            deadline = min(now + self.wait_s, last_call)
            while len(batch) < self.max_size:
                try:
                    batch.append(self.queue.get_nowait() if loop.time() >= deadline else await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                deadline = min(loop.time() + self.wait_s, last_call)  # each arrival extends the wait, up to the cap
            batch = [(item, f) for item, f in batch if not f.done()]  # skip callers that gave up
            if not batch:
                continue
            try:
                futures = [f for _, f in batch]
                results = await loop.run_in_executor(self.executor, self.run, [item for item, _ in batch], lambda i: futures[i].cancelled())
            except Exception as e:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)


class StopHold:
    """Streams text while holding back what could be the start of a stop sequence.

    `feed(piece)` returns the text safe to send; once a stop sequence appears, `stopped` turns
    true and nothing from the stop sequence on is ever returned; `flush()` returns what is held.
    """

    def __init__(self, stops: list[str]):
        self.stops, self.buffer, self.stopped = [s for s in stops if s], "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        cut = min((self.buffer.index(s) for s in self.stops if s in self.buffer), default=None)
        if cut is not None:
            out, self.buffer, self.stopped = self.buffer[:cut], "", True
            return out
        keep = max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if self.buffer.endswith(s[:n])), default=0)
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def generator_options(cfg: LoragConfig) -> dict[str, Any]:
    """Serve deployment options of the generator replicas, from `cfg.serve`."""
    sv = cfg.serve
    opts: dict[str, Any] = {
        "max_ongoing_requests": sv.max_ongoing_requests,
        "max_queued_requests": sv.max_queued_requests,
        "ray_actor_options": {"num_cpus": sv.cpus_per_replica, **({"num_gpus": sv.gpus_per_replica} if sv.gpus_per_replica else {})},
    }
    if sv.max_replicas_per_node:
        opts["max_replicas_per_node"] = sv.max_replicas_per_node
    if sv.autoscaling:
        a = sv.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": max(a.min_replicas, 1),
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        }
    else:
        opts["num_replicas"] = sv.replicas
    return opts


def build_app(cfg: LoragConfig):
    """The Serve application for `cfg`: `Gateway` in front of `Generator` replicas.

    Raises:
        ConfigError: the app would read paths that other nodes of the cluster do not have.
    """
    from lorag.models import node_ref
    from lorag.storage import check_cluster_paths

    check_cluster_paths(cfg, [kb.name for kb in cfg.knowledge_bases], artifacts=True)
    data = cfg.model_dump(mode="json")
    # Replicas may run on any node: they resolve the models themselves, from URIs where needed.
    generator = Generator.options(**generator_options(cfg)).bind(data, node_ref(cfg.base_model, cfg.storage_root, cfg.model_cache))
    # The gateway only validates, retrieves and forwards; its queue bounds what the proxy holds.
    gateway = Gateway.options(max_ongoing_requests=max(64, 4 * cfg.serve.max_ongoing_requests), max_queued_requests=4 * max(cfg.serve.max_queued_requests, 1))
    return gateway.bind(data, generator, node_ref(cfg.embedder, cfg.storage_root, cfg.model_cache))


def serve_config(cfg: LoragConfig, config_path: str) -> dict[str, Any]:
    """A `serve deploy` / `serve run` config file for `cfg`, as a dict (see `lorag serve --export`).

    Args:
        cfg: the loaded config (for the HTTP and deployment options).
        config_path: how the deployed app finds the lorag.yaml: a path relative to the
            working_dir (repository root) or absolute.
    """
    gen = generator_options(cfg)
    gen_entry: dict[str, Any] = {"name": "Generator", **{k: v for k, v in gen.items()}}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port, "request_timeout_s": cfg.serve.request_timeout_s},
        "applications": [
            {
                "name": "lorag",
                "route_prefix": "/",
                "import_path": "serve.app:app",
                "args": {"config": config_path},
                "deployments": [gen_entry],
            }
        ],
    }
