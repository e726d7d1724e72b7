"""Structured output: OpenAI's `response_format` as a grammar that each row's tokens must follow.

Owns turning a response format (`{"type": "json_object"}`, `{"type": "json_schema", ...}`) into a
grammar (`Grammars.compile`: checked against the tokenizer once per distinct schema, cached; a
schema the engine cannot follow is a 400 naming why) and the logits processor that constrains
the rows of a batch that carry one (`GrammarMask`), so that rows with different schemas, adapters
and none at all share one forward pass.

The engine is llguidance (Microsoft's, used by vLLM and SGLang), chosen by measurement on this
model's 49k-token vocabulary (bench/grammar.py, docs/benchmarks.md): it builds its lexer lazily, so
compiling any schema costs milliseconds (a 200-property schema of nested regexes: 11-15 ms, where
xgrammar took 450-600 ms and outlines-core 6.5 s), the work per token is bounded by fuel limits
(a hostile schema ends in an error, never a hang), per-token masks cost 0.1-0.2 ms like
xgrammar's, and unsupported keywords are errors that name them (`Unimplemented keys: ["not"]`).

    grammars = Grammars(tokenizer)
    grammar = grammars.compile({"type": "json_schema", "json_schema": {"name": "a", "schema": {...}}})
    matcher = grammars.matcher(grammar)   # one per row; generate_batch(..., grammars=[matcher, None])
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from transformers import LogitsProcessor

from lorag.schemas import APIError

MAX_SCHEMA_BYTES = 65_536  # a schema's JSON text; larger ones are refused before any compiling
CACHE_SIZE = 512  # compiled grammars kept per process (least recently used out)
# Compact JSON: no whitespace between tokens (a model cannot pad an answer with spaces until max_tokens).
OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def _limits():
    import llguidance

    # llguidance's defaults (fuel per mask step, lexer states, grammar size), without echoing parser state into errors.
    return llguidance.LLParserLimits(verbose_errors=False)


class Grammars:
    """Response formats compiled for one tokenizer, cached by their canonical JSON.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
    """

    def __init__(self, tokenizer):
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self.vocab = self.tokenizer.vocab_size
        self._cache: OrderedDict[str, str] = OrderedDict()  # canonical schema or grammar text -> grammar (checked)
        self._lock = threading.Lock()  # compiled from the event loop's worker threads and the model thread

    def compile(self, response_format: dict[str, Any] | None) -> str | None:
        """The grammar of a `response_format` (None for text), checked against the tokenizer.

        Raises:
            APIError: 400 naming the problem: an unknown type, a schema that is not an object or is
                over `MAX_SCHEMA_BYTES`, or one the grammar engine cannot follow (unsupported
                keywords, unresolvable `$ref`s, contradictions, past its size limits).
        """
        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            schema: Any = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema", {}) if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format.json_schema.schema must be a JSON schema object", code="invalid_response_format")
        else:
            raise APIError(400, f"response_format.type {kind!r} is not one of text, json_object, json_schema", code="invalid_response_format")
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        if len(key.encode()) > MAX_SCHEMA_BYTES:
            raise APIError(400, f"response_format's schema is {len(key.encode())} bytes of JSON, over the limit of {MAX_SCHEMA_BYTES}",
                           code="invalid_response_format")
        return self._checked(key, lambda: self._from_schema(schema))

    def check(self, grammar: str) -> str:
        """`grammar` (from `compile`, possibly on another process), checked against this tokenizer."""
        return self._checked(grammar, lambda: grammar)

    def matcher(self, grammar: str):
        """A fresh matcher for one row (about 0.4 ms)."""
        import llguidance

        return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_limits())

    def token_bytes(self, token: int) -> bytes:
        """A token's exact bytes (a character split across tokens shows as its part)."""
        return self.tokenizer.decode_bytes([token])

    def warm(self) -> None:
        """Pay llguidance's one-time start (about 2 s on first mask of a tokenizer) now, not in a request."""
        m = self.matcher(self.compile({"type": "json_object"}))
        mask = torch.full((1, (self.vocab + 31) // 32), -1, dtype=torch.int32)
        _fill(m, mask, 0)

    def _from_schema(self, schema: dict[str, Any]) -> str:
        import llguidance

        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=OPTIONS)
        except ValueError as e:
            raise APIError(400, f"response_format's schema: {e}", code="invalid_response_format") from None

    def _checked(self, key: str, build: Callable[[], str]) -> str:
        import llguidance

        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = build()
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer, limits=_limits())
        if failed:
            raise APIError(400, f"response_format's schema is not supported: {messages[0] if messages else 'invalid grammar'}",
                           code="invalid_response_format")
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar


def _fill(matcher, bitmask: torch.Tensor, row: int) -> None:
    """The tokens `matcher` allows next, as bits, into `bitmask[row]` (llguidance.torch's fill, without its asserts)."""
    v = bitmask[row]
    matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())


_BITS = torch.arange(32, dtype=torch.int32)


class GrammarMask(LogitsProcessor):
    """Constrains each row that has a matcher to the tokens its grammar allows next; rows without
    one are untouched. Batch row j's matcher is `matchers[j]`.

    Each call first gives every constrained row's matcher the token chosen at the previous step
    (the last column of `input_ids` past the prompt's `start`). A row whose matcher refuses its
    token (a row that already ended: generate feeds it padding) is unconstrained from then on. A
    row whose matcher fails (llguidance's per-step limits, on a hostile schema) is reported to
    `on_error(j, message)` once and given `stop` as its only token, so it ends and the batch goes on.
    """

    def __init__(self, matchers: Sequence[Any | None], start: int, vocab: int, stop: int, on_error: Callable[[int, str], None] | None = None):
        self.matchers, self.start, self.vocab, self.stop, self.on_error = list(matchers), start, vocab, stop, on_error
        self.bitmask = torch.full((len(self.matchers), (vocab + 31) // 32), -1, dtype=torch.int32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        active = [j for j, m in enumerate(self.matchers) if m is not None]
        if not active:
            return scores
        if input_ids.shape[1] > self.start:
            last = input_ids[:, -1].tolist()
            for j in active:
                m = self.matchers[j]
                if not m.consume_token(last[j]) or m.is_error():
                    self.matchers[j] = None  # the row ended (padding) or took a token it was not given: free from now on
            active = [j for j in active if self.matchers[j] is not None]
        for j in active:
            m = self.matchers[j]
            _fill(m, self.bitmask, j)
            if m.is_error():
                self.matchers[j] = None
                if self.on_error is not None:
                    self.on_error(j, m.get_error())
                scores[j] = -math.inf
                scores[j, self.stop] = 0.0
                continue
            allowed = ((self.bitmask[j].unsqueeze(-1) >> _BITS) & 1).flatten()[: scores.shape[1]].to(scores.device)
            if scores.shape[1] > allowed.shape[0]:  # logits wider than the tokenizer (padded embeddings): those ids are never allowed
                scores[j, allowed.shape[0] :] = -math.inf
            scores[j, : allowed.shape[0]].masked_fill_(allowed == 0, -math.inf)
        return scores
