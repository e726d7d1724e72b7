"""OpenAI's `POST /v1/embeddings` on the knowledge bases' embedder: the request, its answer, and the batching.

The endpoint embeds with the one embedder every knowledge base of the config shares (`embedder`),
so a client gets exactly the vectors ingest stored for a chunk's passage (`lorag.text.passage`):
the same `Embedder` (mean-pooled, L2-normalised float32), the same truncation at its `max_length`
tokens. `model` is the embedder's name or the name of a knowledge base ("the embedder of that
knowledge base"); a key limited to some knowledge bases may embed only through one it may read.

`Embeddings` owns the batching: every text, of an embeddings request or of a retrieval query
(`Gateway._embed`), is one call of a `lorag.batcher.Batcher` on the gateway's embedding thread,
so concurrent requests share one forward pass of at most `BATCH_SIZE` texts. A batch takes what
is queued when the thread is free and waits for nothing more: a lone query runs at once, and
texts that arrive during a pass share the next one.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorag.auth import Scope
from lorag.batcher import Batcher
from lorag.schemas import APIError

MAX_INPUTS = 256  # strings in one request (OpenAI's cap is 2048; a request here costs at most MAX_INPUTS / BATCH_SIZE passes)
BATCH_SIZE = 32  # texts in one forward pass: a retrieval query waits for at most one such pass


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings` body (OpenAI's); `user` is accepted and ignored, other fields too."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, description="The embedder's name (the config's `embedder`), or a knowledge base's name: its embedder.")
    input: str | list[str] = Field(
        description=f"A string or a list of at most {MAX_INPUTS} strings, none empty; token arrays are not supported. Each is embedded "
        "as ingest embeds a chunk's passage: a text past the embedder's max_length tokens is truncated.",
        json_schema_extra={"anyOf": [{"type": "string", "minLength": 1},
                                     {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_INPUTS}]})
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: each vector's little-endian float32 bytes, base64-encoded.")
    dimensions: int | None = Field(None, ge=1, description="Only the embedder's own dimension (vectors are not shortened).")
    user: str | None = Field(None, description="Ignored.")

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_arrays(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(x, (int, float, list)) for x in v):
            raise ValueError("token arrays are not supported by lorag: send the text, a string or a list of strings")
        return v

    @field_validator("input")
    @classmethod
    def _limits(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if not texts:
            raise ValueError("must hold at least one string")
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} strings per request, got {len(texts)}")
        empty = [i for i, t in enumerate(texts) if not t]
        if empty:
            raise ValueError("strings must not be empty" + ("" if isinstance(v, str) else f" (empty at index {', '.join(map(str, empty[:8]))})"))
        return v

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embeddings:
    """The gateway's embeddings: `create` answers `POST /v1/embeddings`, `embed` batches texts.

    Args:
        cfg: the config (its knowledge bases and `embedder`).
        embedder: the loaded `lorag.embed.Embedder` (None when the config has no knowledge base).
        thread: the one thread all of the embedder's torch work runs on (`Gateway.embed_thread`).
    """

    def __init__(self, cfg, embedder, thread: concurrent.futures.Executor):
        self.cfg, self.embedder = cfg, embedder
        self.name = embedder_name(cfg)
        self.batcher = Batcher(self._run, BATCH_SIZE, 0.0, executor=thread)

    async def create(self, req: EmbeddingRequest, scope: Scope) -> dict[str, Any]:
        """The OpenAI-shaped answer to `req`.

        Raises:
            APIError: 404 unknown model or no embedder here, 403 outside the key's knowledge
                bases, 400 `dimensions` other than the embedder's.
        """
        self.check_model(req.model, scope)
        if req.dimensions is not None and req.dimensions != self.embedder.dim:
            raise APIError(400, f"dimensions: {self.name!r} embeds into {self.embedder.dim} dimensions and lorag does not shorten vectors: "
                           f"omit dimensions or send {self.embedder.dim}", code="invalid_request")
        vectors, tokens = await self.embed(req.texts())
        encode = (lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if req.encoding_format == "base64" else (lambda v: v.tolist())
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def embed(self, texts: list[str]) -> tuple[list[np.ndarray], int]:
        """(each text's vector, the tokens the embedder read for them all), in batches shared with concurrent callers."""
        rows = await asyncio.gather(*(self.batcher.submit(t) for t in texts))
        return [v for v, _ in rows], sum(n for _, n in rows)

    def check_model(self, model: str, scope: Scope) -> None:
        """Raises APIError unless `model` names the embedder or a knowledge base, through a knowledge base the key may read.

        A key limited to some knowledge bases is refused (403) any other name, known or not, as
        the `kb` field refuses it: what it may not read it cannot tell from what does not exist.
        """
        kbs = [kb.name for kb in self.cfg.knowledge_bases]
        if not kbs:
            raise APIError(404, f"model {model!r} not found: this endpoint has no embedder (its config has no knowledge base)", code="model_not_found")
        allowed = allowed_models(self.cfg, scope)
        if model in allowed or (model == self.cfg.embedder and self.name in allowed):
            return
        if scope.knowledge_bases is not None and model not in scope.knowledge_bases:
            what = f"it may use: {allowed}" if allowed else "it may read no knowledge base"
            raise APIError(403, f"this API key may embed only through the knowledge bases it may read ({what})", type="permission_error", code="kb_not_allowed")
        raise APIError(404, f"model {model!r} not found: embeddings come from the knowledge bases' embedder. Available: {allowed}", code="model_not_found")

    def _run(self, texts: list[str], gone, finish) -> list[tuple[np.ndarray, int]]:
        """One forward pass (`Batcher.run`, on the embedding thread): each text's vector and its token count."""
        vectors = self.embedder.embed(texts)
        # The tokenizer runs here too, on the embedding thread: a fast tokenizer is not safe to share across threads.
        ids = self.embedder.tokenizer(texts, truncation=True, max_length=self.embedder.max_length)["input_ids"]
        return [(v, len(i)) for v, i in zip(vectors, ids)]


def embedder_name(cfg) -> str:
    """The `model` name clients use for the embedder: the config's `embedder`, or its directory's name for a local one."""
    return Path(cfg.embedder).name if "/" in cfg.embedder and Path(cfg.embedder).exists() else cfg.embedder


def allowed_models(cfg, scope: Scope) -> list[str]:
    """What `model` may name for this key: the embedder (when the key may read a knowledge base) and each knowledge base it may read."""
    kbs = [kb.name for kb in cfg.knowledge_bases if scope.knowledge_bases is None or kb.name in scope.knowledge_bases]
    return ([embedder_name(cfg)] if kbs else []) + kbs


# -- responses, for the OpenAPI document (`Embeddings.create` writes them as dicts) --


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="The vector (unit length), or with encoding_format base64 its little-endian float32 bytes.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens the embedder read, its special tokens included (at most its max_length per input).")
    total_tokens: int


class EmbeddingList(BaseModel):
    """`POST /v1/embeddings` answer: one embedding per input, in input order."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
