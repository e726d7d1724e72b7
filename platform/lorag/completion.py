"""One request inside the engine: its progress on the model thread (`Row`), what streams out of it
(`Piece`) and the answer it ends with (`Completion`).

A row takes one token at a time (`Row.step`): it ends at an end-of-sequence token, its first stop
sequence, its `max_tokens`, or when its caller is gone. Streamed text never shows a stop sequence
or any part of one (`StopHold`), and a character split across tokens is sent whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from lorag.engine import SamplingParams

TokenLogprob = tuple[int, float, list[tuple[int, float]]]  # (token id, its log-probability, [(id, log-probability)] of the top ones)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # per generated token, when `SamplingParams.logprobs` asked


class Piece(str):
    """A streamed piece of text; `logprobs`: those of the tokens it completes (when asked), else empty."""

    logprobs: list[TokenLogprob] = []


@dataclass
class Row:
    """One request inside the engine: its prompt, limits and (on the torch thread) its progress."""

    adapter: str | None
    path: Path | None
    ids: list[int]
    params: SamplingParams
    emit: Callable[[str], None] | None  # streaming: where decoded text goes (`Piece`s)
    matcher: Any = None  # the row's grammar state (llguidance), for structured output
    logprobs: list[TokenLogprob] | None = None  # each token's, when asked
    tokens: list[int] = field(default_factory=list)
    streamed_logprobs: int = 0  # how many of `logprobs` went out with a piece
    ended: str | None = None  # "stop", "length", "gone" or "error" (answered with an error)
    shown: str = ""  # text decoded so far (streaming)
    hold: StopHold | None = None

    def step(self, token: int, tokenizer, eos: set[int], gone: bool, logprob=None) -> bool:
        """Take the row's next token (and its log-probabilities, when asked); True once the row has ended."""
        if self.ended:
            return True
        self.tokens.append(token)
        if self.logprobs is not None and logprob is not None and token not in eos:
            self.logprobs.append((token, logprob[0], logprob[1]))
        stops = self.params.stop
        if token in eos:
            self.ended = "stop"
        elif stops and any(s in tokenizer.decode(self.tokens[-4 * max(map(len, stops)) - 4 :], skip_special_tokens=True) for s in stops):
            self.ended = "stop"  # 4 tokens per character at most (byte-level BPE): the window holds any stop ending here
        elif len(self.tokens) >= self.params.max_tokens:
            self.ended = "length"
        elif gone:
            self.ended = "gone"
        if self.emit is not None:
            self._stream(tokenizer)
        return self.ended is not None

    def _stream(self, tokenizer) -> None:
        if self.hold is None:
            self.hold = StopHold(self.params.stop)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and not self.ended:  # a character split across tokens: wait for the rest
            return
        piece = self.hold.feed(text[len(self.shown) :])
        self.shown = text
        if self.ended:
            piece += self.hold.flush()
        if piece:
            out = Piece(piece)
            if self.logprobs is not None:
                out.logprobs, self.streamed_logprobs = self.logprobs[self.streamed_logprobs :], len(self.logprobs)
            self.emit(out)

    def completion(self, tokenizer) -> Completion:
        """The answer: decoded, cut before the first stop sequence, with why it ended."""
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((text.index(s) for s in self.params.stop if s in text), default=None)
        if cut is not None:
            text = text[:cut]
        finish = "length" if self.ended == "length" and cut is None else "stop"
        return Completion(text.strip(), finish, len(self.ids), len(self.tokens), self.logprobs)


class StopHold:
    """Streams text while holding back what could be the start of a stop sequence.

    `feed(piece)` returns the text safe to send; once a stop sequence appears, `stopped` turns
    true and nothing from the stop sequence on is ever returned; `flush()` returns what is held.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]):
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
