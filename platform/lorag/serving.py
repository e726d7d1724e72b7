"""The HTTP endpoint: an OpenAI-style API on Ray Serve that routes each request to its adapter.

Two deployments:
- `Gateway` (FastAPI ingress): validates requests, resolves `model` (`<adapter>`,
  `<adapter>@<version>` or the base model's name) against the adapter store, retrieves from the
  adapter's knowledge base, and returns the answer with numbered `sources`.
- `Generator`: holds the base model; adapters are loaded per id with `serve.multiplexed` (LRU
  eviction), so Serve routes requests for an adapter to replicas that already hold it.

`build_app(cfg)` binds both from one `LoragConfig`; `serve/app.py` only calls it.
"""


import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pymilvus.exceptions import MilvusException
from ray import serve
from ray.exceptions import RayActorError

from lorag.adapters import AdapterNotFoundError, AdapterStore, parse_model_id
from lorag.config import LoragConfig
from lorag.retrieval import augment, citations, question


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


class ChatRequest(BaseModel):
    """`POST /v1/chat/completions` body. Unknown OpenAI fields are ignored; lorag adds `retrieval` and `k`."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 or omitted: greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    retrieval: bool = Field(True, description="lorag: retrieve from the adapter's knowledge base (false: answer without sources).")
    k: int | None = Field(None, ge=1, le=50, description="lorag: chunks to retrieve (default: the knowledge base's top_k).")

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.content.strip() for m in v):
            raise ValueError("messages must contain a user message with non-empty content")
        return v


# -- the API -----------------------------------------------------------------------------------

api = FastAPI(title="lorag", description="OpenAI-compatible LoRA + RAG endpoint")


@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.code), status_code=e.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        parts.append(f"{loc or 'body'}: {err['msg']}")
    return JSONResponse(error_body("; ".join(parts), "invalid_request_error", "invalid_request"), status_code=400)


def base_name(cfg: LoragConfig) -> str:
    """The `model` name clients use for the base model without an adapter."""
    return Path(cfg.base_model).name if "/" in cfg.base_model and Path(cfg.base_model).exists() else cfg.base_model


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Gateway:
    """OpenAI-style front door: validation, adapter resolution, retrieval, response shaping."""

    def __init__(self, config: dict[str, Any], generator):
        from lorag.embed import Embedder
        from lorag.milvus import open_store
        from lorag.models import resolve_model

        self.cfg = LoragConfig.model_validate(config)
        self.generator = generator
        self.store = AdapterStore(self.cfg.adapter_store)
        self.base = base_name(self.cfg)
        self.embedder = Embedder(resolve_model(self.cfg.embedder, self.cfg.model_cache)) if self.cfg.knowledge_bases else None
        self.kb_stores = {kb.name: open_store(self.cfg.milvus_uri(kb), kb.token) for kb in self.cfg.knowledge_bases}

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": self.base, "object": "model", "created": now, "owned_by": "lorag"}]
        for name in self.store.names():
            versions = self.store.versions(name)
            data.append({"id": name, "object": "model", "created": now, "owned_by": "lorag", "root": self.base})
            data += [{"id": f"{name}@v{v}", "object": "model", "created": now, "owned_by": "lorag", "root": self.base} for v in versions]
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest) -> JSONResponse:
        if req.stream:
            raise APIError(400, "stream=true is not supported yet; send stream=false", code="unsupported_parameter")
        adapter_id, kb_name, system_prompt = self._resolve(req.model)
        messages = [m.model_dump() for m in req.messages]
        hits: list[dict[str, Any]] = []
        if kb_name and req.retrieval:
            hits = await self._retrieve(kb_name, messages, req.k)
        from lorag.data import with_system

        prompt = with_system(augment(messages, hits), system_prompt)
        params = {
            "max_tokens": req.max_completion_tokens or req.max_tokens or self.cfg.serve.max_tokens,
            "temperature": req.temperature or 0.0,
            "top_p": req.top_p,
            "stop": [req.stop] if isinstance(req.stop, str) else (req.stop or []),
            "seed": req.seed,
        }
        handle = self.generator.options(multiplexed_model_id=adapter_id) if adapter_id else self.generator
        out = await handle.generate.remote(prompt, params)
        if "error" in out:
            raise APIError(out["status"], out["error"], code=out.get("code"))
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": out["finish_reason"]}],
            "usage": {
                "prompt_tokens": out["prompt_tokens"],
                "completion_tokens": out["completion_tokens"],
                "total_tokens": out["prompt_tokens"] + out["completion_tokens"],
            },
        }
        if hits:
            body["sources"] = citations(hits)
        return JSONResponse(body)

    def _resolve(self, model: str) -> tuple[str | None, str | None, str | None]:
        """(multiplexed adapter id or None for the base, knowledge base, system prompt)."""
        if model == self.base:
            return None, None, None
        name, version = parse_model_id(model)
        try:
            path = self.store.resolve(name, version)
        except (AdapterNotFoundError, ValueError) as e:
            known = [self.base, *self.store.names()]
            raise APIError(404, f"model {model!r} not found: {e}. Available: {known}", code="model_not_found") from None
        meta = self.store.metadata(name, path.name)
        # The config's binding wins, so a knowledge base can be re-bound without retraining.
        in_cfg = next((a for a in self.cfg.adapters if a.name == name), None)
        kb = in_cfg.knowledge_base if in_cfg else meta.get("knowledge_base")
        system_prompt = in_cfg.system_prompt if in_cfg else meta.get("system_prompt")
        if kb is not None and kb not in self.kb_stores:
            kb = None
        return f"{name}@{path.name}", kb, system_prompt

    async def _retrieve(self, kb_name: str, messages: list[dict[str, str]], k: int | None) -> list[dict[str, Any]]:
        kb = self.cfg.knowledge_base(kb_name)
        query = question(messages)
        vector = None if kb.search == "bm25" else (await asyncio.to_thread(self.embedder.embed, [query]))[0].tolist()
        try:
            return await self.kb_stores[kb_name].acall("search", kb.collection, vector, query, k or kb.top_k, kb.search)
        except (LookupError, MilvusException, RayActorError) as e:
            raise APIError(503, f"knowledge base {kb_name!r} is not built: {e}", type="server_error", code="kb_unavailable") from None


@serve.deployment
class Generator:
    """Base model plus LRU-cached LoRA adapters; one generation at a time per replica."""

    def __init__(self, config: dict[str, Any]):
        from lorag.models import load_causal_lm, load_tokenizer, resolve_model

        self.cfg = LoragConfig.model_validate(config)
        path = resolve_model(self.cfg.base_model, self.cfg.model_cache)
        self.tokenizer = load_tokenizer(path)
        self.model = load_causal_lm(path)
        self.store = AdapterStore(self.cfg.adapter_store)
        self.lock = threading.Lock()
        # Wrapped here, not with a decorator, because the cache size comes from the config; Serve
        # keeps its LRU on the wrapped function object, so it must be a plain function, not a bound method.
        async def load(adapter_id: str) -> LoadedAdapter:
            return await self._load_adapter(adapter_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.serve.max_adapters_per_replica)(load)

    async def _load_adapter(self, adapter_id: str) -> "LoadedAdapter":
        name, version = parse_model_id(adapter_id)
        path = self.store.resolve(name, version)
        meta = self.store.metadata(name, version)
        if meta.get("base_model") not in (None, self.cfg.base_model):
            raise ValueError(f"adapter {adapter_id} was trained on {meta['base_model']!r}, but this endpoint serves {self.cfg.base_model!r}")
        await asyncio.to_thread(self._attach, adapter_id, path)
        return LoadedAdapter(self, adapter_id)

    def _attach(self, adapter_id: str, path: Path) -> None:
        from peft import PeftModel

        with self.lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=adapter_id)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=adapter_id)
            self.model.eval()

    def _detach(self, adapter_id: str) -> None:
        with self.lock:
            if adapter_id in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(adapter_id)

    async def generate(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        adapter_id = serve.get_multiplexed_model_id() or None
        if adapter_id:
            try:
                await self.get_adapter(adapter_id)
            except (AdapterNotFoundError, ValueError) as e:
                return {"error": str(e), "status": 404 if isinstance(e, AdapterNotFoundError) else 400, "code": "adapter_unavailable"}
        return await asyncio.to_thread(self._generate, adapter_id, messages, params)

    def _generate(self, adapter_id: str | None, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        import contextlib

        import torch

        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        n_prompt = int(enc["input_ids"].shape[1])
        limit = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        if n_prompt + params["max_tokens"] > limit:
            return {
                "error": f"prompt ({n_prompt} tokens) plus max_tokens ({params['max_tokens']}) exceeds the model's context of {limit} tokens",
                "status": 400,
                "code": "context_length_exceeded",
            }
        sample = params["temperature"] > 0
        kwargs = {"max_new_tokens": params["max_tokens"], "do_sample": sample, "pad_token_id": self.tokenizer.pad_token_id}
        if sample:
            kwargs.update(temperature=params["temperature"], top_p=params["top_p"])
        with self.lock:
            if params["seed"] is not None:
                torch.manual_seed(params["seed"])
            if adapter_id:
                self.model.set_adapter(adapter_id)
                ctx = contextlib.nullcontext()
            else:
                ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config") else contextlib.nullcontext()
            with ctx, torch.inference_mode():
                out = self.model.generate(**enc, **kwargs)
        new = out[0, n_prompt:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        finish = "stop" if len(new) < params["max_tokens"] or (len(new) and int(new[-1]) == self.tokenizer.eos_token_id) else "length"
        for s in params["stop"]:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return {"text": text.strip(), "finish_reason": finish, "prompt_tokens": n_prompt, "completion_tokens": int(len(new))}


class LoadedAdapter:
    """What the multiplexed loader returns; Serve calls `__del__` when it evicts the adapter."""

    def __init__(self, generator: Generator, adapter_id: str):
        self.generator, self.adapter_id = generator, adapter_id

    def __del__(self) -> None:
        gen, self.generator = self.generator, None
        if gen is not None:
            gen._detach(self.adapter_id)


def build_app(cfg: LoragConfig):
    """The Serve application for `cfg`: `Gateway` in front of `Generator` replicas."""
    data = cfg.model_dump(mode="json")
    generator = Generator.options(
        num_replicas=cfg.serve.replicas,
        ray_actor_options={"num_cpus": cfg.serve.cpus_per_replica},
    ).bind(data)
    return Gateway.bind(data, generator)
