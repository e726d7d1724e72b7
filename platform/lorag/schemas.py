"""The HTTP API's request bodies and its errors, in OpenAI's shapes.

Requests are parsed strictly where OpenAI is strict (`"stream": "yes"` is a 400, as is a string
where a number belongs), fields lorag cannot honour are refused rather than silently dropped, and
every limit that protects a replica (stop strings, `max_tokens`) is checked here, before any work.
Errors leave as `{"error": {"message", "type", "param", "code"}}` bodies, never tracebacks.
The request models, with the response models at the end, are also the endpoint's OpenAPI document
(`/openapi.json`, assembled by `lorag.gateway.build_api`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 128  # per stop string: matching cost grows with it, on the replica's model thread
MAX_STOP_TOTAL = 256  # all stop strings of one request together
# Below this a temperature decodes greedily: the sample is the argmax in all but near-ties anyway,
# and dividing float32 logits by ever smaller temperatures overflows to inf, whose softmax is NaN.
MIN_TEMPERATURE = 1e-2

# OpenAI request fields lorag cannot honour: set (truthy), they are a 400 rather than silently dropped.
UNSUPPORTED_FIELDS = {
    "logit_bias": "logit bias", "tools": "tool calls", "functions": "function calls", "tool_choice": "tool calls", "function_call": "function calls",
    "best_of": "best_of",
}
UNSUPPORTED_OFF = {"best_of": 1, "tool_choice": "none"}  # set, but asking for nothing
MAX_N = 128  # `n`'s bound in the schema; an endpoint's own is `serve.max_choices`
MAX_TOP_LOGPROBS = 20  # OpenAI's, for chat (completions: 5)
# A JSON-schema pattern for "not blank": any character `str.strip` keeps (ECMA's \s differs; U+3000 is the last space).
NOT_BLANK = "[^" + "".join(f"\\u{ord(c):04x}" for c in map(chr, range(0x3001)) if c.isspace()) + "]"


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


def _document_unsupported(schema: dict[str, Any]) -> None:
    """The JSON schema of `UNSUPPORTED_FIELDS`: each is accepted only unset, empty, false or off."""
    unset = [{"type": "null"}, {"const": False}, {"const": 0}, {"const": ""}, {"type": "array", "maxItems": 0}, {"type": "object", "maxProperties": 0}]
    for name, why in UNSUPPORTED_FIELDS.items():
        off = UNSUPPORTED_OFF.get(name)
        off = [] if off is None else [{"const": off}]
        schema["properties"][name] = {"anyOf": unset + off, "description": f"Not supported ({why}): only unset, empty or off."}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="The JSON schema the answer follows.")
    strict: bool | None = Field(None, description="Accepted; lorag always follows the schema exactly.")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text, any JSON object, or a JSON schema (lorag.grammar)."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={
        "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
        "then": {"properties": {"json_schema": {"$ref": "#/components/schemas/JsonSchemaFormat"}}, "required": ["json_schema"]}})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self

    def spec(self) -> dict[str, Any]:
        """The format as `lorag.grammar.Grammars.compile` takes it."""
        return {"type": self.type, **({"json_schema": {"schema": self.json_schema.schema_}} if self.json_schema else {})}


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions. Other OpenAI fields are ignored;
    those lorag cannot honour (`UNSUPPORTED_FIELDS`) are refused when set."""

    # strict: JSON types as OpenAI takes them (no "yes" for true, no "5" for 5; an integer is a valid number)
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_document_unsupported)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            off = UNSUPPORTED_OFF  # `true` is never off (though `true == 1`)
            asked = [f"{k} ({why})" for k, why in UNSUPPORTED_FIELDS.items() if data.get(k) and (k not in off or data[k] != off[k] or data[k] is True)]
            if asked:
                raise ValueError(f"not supported by lorag: {', '.join(asked)}")
        return data

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False,
                                      description=f"0, omitted or below {MIN_TEMPERATURE}: greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, description=f"At most {MAX_STOP_TOTAL} characters together.", json_schema_extra={"anyOf": [
        {"type": "string", "maxLength": MAX_STOP_CHARS},
        {"type": "array", "items": {"type": "string", "maxLength": MAX_STOP_CHARS}, "maxItems": MAX_STOPS}, {"type": "null"}]})
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="Sampling seed (the range torch.manual_seed takes).")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False, description="Lowers a token's logit by this much per time the answer has used it (OpenAI's).")
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False, description="Lowers a token's logit by this much once the answer has used it (OpenAI's).")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices to generate (at most serve.max_choices); with a seed, choice i uses seed + i.")
    response_format: ResponseFormat | None = Field(None, description="Structured output: json_object, or json_schema (constrained decoding).")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    retrieval: bool = Field(True, description="lorag: retrieve from the adapter's knowledge base (false: answer without sources).")
    k: int | None = Field(None, ge=1, le=50, description="lorag: chunks to retrieve (default: the knowledge base's top_k).")
    kb: str | None = Field(None, description="lorag: retrieve from this knowledge base instead of the adapter's own (when serve.allow_kb_override).")
    user: str | None = Field(None, max_length=256, description="The end user (OpenAI's): keeps a client on one side of an adapter's canary, as its API key does without it.")

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

    def logprob_count(self) -> int | None:
        """How many alternatives to report per token (None: no log-probabilities)."""
        return None


class ChatRequest(SamplingRequest):
    """`POST /v1/chat/completions` body; lorag adds `retrieval`, `k` and `kb`."""

    logprobs: bool = Field(False, description="Return each token's log-probability (the model's own, before sampling settings and grammars).")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="This many most likely tokens at each position (read only with logprobs: true).")

    messages: list[ChatMessage] = Field(min_length=1, json_schema_extra={"contains": {
        "type": "object", "properties": {"role": {"const": "user"}, "content": {"type": "string", "pattern": NOT_BLANK}}, "required": ["role", "content"]}})
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.content.strip() for m in v):
            raise ValueError("messages must contain a user message with non-empty content")
        return v

    def completion_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        """How many alternatives to report per token (None: no log-probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions` body: raw text in, no chat template; retrieval puts the sources before the prompt."""

    logprobs: int | None = Field(None, ge=0, le=5, description="Return each token's log-probability and this many most likely tokens at each position.")

    def logprob_count(self) -> int | None:
        return self.logprobs

    prompt: str = Field(min_length=1, json_schema_extra={"pattern": NOT_BLANK})
    echo: bool = Field(False, le=False, description="Not supported.", json_schema_extra=lambda s: s.update(const=s.pop("le")))  # JSON schema's "only false"
    suffix: str | None = Field(None, max_length=0, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v


# -- responses, for the OpenAPI document (the gateway writes them as dicts; tests/test_fuzz.py holds the two together) --


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx body (`error_body`)."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Source(BaseModel):
    """lorag: one retrieved chunk, numbered as the prompt cites it; `source` is relative to the knowledge base's root."""

    index: int
    source: str
    title: str
    section: str
    chunk_index: int
    start: int
    end: int
    score: float
    text: str


class RouteDecision(BaseModel):
    """lorag, `model: "auto"`: the model that answered, its score, and every candidate adapter's score."""

    model: str
    score: float
    scores: dict[str, float]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """Chat `logprobs`: one entry per generated token (the model's own log-probabilities)."""

    content: list[TokenLogprob]
    refusal: None = None


class TextLogprobs(BaseModel):
    """Completions `logprobs` (OpenAI's legacy shape); `text_offset` counts characters of the tokens' text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """`POST /v1/chat/completions` answer (`stream: true`: `chat.completion.chunk` server-sent events)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] = Field(default_factory=list, description="lorag: the retrieved chunks the answer may cite (absent without retrieval).")
    route: RouteDecision | None = Field(None, description="lorag: the routing decision (`model: \"auto\"` only).")


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: Literal["stop", "length"]


class TextCompletion(BaseModel):
    """`POST /v1/completions` answer (`stream: true`: `text_completion` server-sent events)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    sources: list[Source] = Field(default_factory=list, description="lorag: the retrieved chunks the answer may cite (absent without retrieval).")
    route: RouteDecision | None = Field(None, description="lorag: the routing decision (`model: \"auto\"` only).")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion: the role (with `sources`), text pieces, the finish
    reason, then (`stream_options.include_usage`) one with no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    sources: list[Source] = Field(default_factory=list)


class TextChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class TextCompletionChunk(BaseModel):
    """One `data:` event of a streamed text completion (as `ChatCompletionChunk`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChunkChoice]
    usage: Usage | None = None
    sources: list[Source] = Field(default_factory=list)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = Field(None, description="The base model of an adapter (absent for the base model itself).")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
