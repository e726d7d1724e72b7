"""The HTTP API's request bodies and its errors, in OpenAI's shapes.

Requests are parsed strictly where OpenAI is strict (`"stream": "yes"` is a 400, as is a string
where a number belongs), fields lorag cannot honour are refused rather than silently dropped, and
every limit that protects a replica (stop strings, `max_tokens`) is checked here, before any work.
Errors leave as `{"error": {"message", "type", "param", "code"}}` bodies, never tracebacks.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 128  # per stop string: matching cost grows with it, on the replica's model thread
MAX_STOP_TOTAL = 256  # all stop strings of one request together

# OpenAI request fields lorag cannot honour: set (truthy), they are a 400 rather than silently dropped.
UNSUPPORTED_FIELDS = {
    "logprobs": "log probabilities", "top_logprobs": "log probabilities", "logit_bias": "logit bias",
    "tools": "tool calls", "functions": "function calls", "tool_choice": "tool calls", "function_call": "function calls",
    "response_format": "structured output (only {\"type\": \"text\"})", "best_of": "best_of",
}


class APIError(Exception):
    """An error returned to the client in OpenAI's shape (status, message, type, code)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(status, message, type, code)  # all of them in args: the error pickles across Ray
        self.status, self.message, self.type, self.code = status, message, type, code

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def validation_message(e: ValidationError) -> str:
    """Pydantic errors as one line: `field.path: reason; ...` (invalid JSON says so)."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        msg = "body is not valid JSON" if err["type"] == "json_invalid" else err["msg"]
        parts.append(f"{loc or 'body'}: {msg}")
    return "; ".join(parts)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions. Other OpenAI fields (user, ...) are ignored;
    those lorag cannot honour (`UNSUPPORTED_FIELDS`) are refused when set."""

    # strict: JSON types as OpenAI takes them (no "yes" for true, no "5" for 5; an integer is a valid number)
    model_config = ConfigDict(extra="ignore", strict=True)

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
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Lowers a token's logit by this much per time the answer has used it (OpenAI's).")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Lowers a token's logit by this much once the answer has used it (OpenAI's).")
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    retrieval: bool = Field(True, description="lorag: retrieve from the adapter's knowledge base (false: answer without sources).")
    k: int | None = Field(None, ge=1, le=50, description="lorag: chunks to retrieve (default: the knowledge base's top_k).")
    kb: str | None = Field(None, description="lorag: retrieve from this knowledge base instead of the adapter's own (when serve.allow_kb_override).")

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence may have at most {MAX_STOP_CHARS} characters")
        if sum(len(s) for s in stops) > MAX_STOP_TOTAL:
            raise ValueError(f"the stop sequences may have at most {MAX_STOP_TOTAL} characters together")
        return v

    def stops(self) -> tuple[str, ...]:
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else (self.stop or [])) if s)

    def completion_tokens(self) -> int | None:
        return self.max_tokens


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

    def completion_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


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
