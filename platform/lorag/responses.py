"""OpenAI-shaped answers: completion bodies, their streamed chunks, usage and log-probabilities.

`Gateway` (lorag.gateway) decides what to generate; this module writes what comes back, for
one choice or `n` of them: `body` for a whole answer, `events` for server-sent events (the
choices' streams merged as their pieces arrive, each chunk naming its choice's `index`), and the
two shapes of `logprobs` (chat's `content` list, completions' legacy parallel lists). Token
text and bytes come from `token_bytes` (the grammar engine's exact byte decoding), so that a
client can reassemble characters split across tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Callable

from lorag.completion import Completion, TokenLogprob
from lorag.schemas import error_body

log = logging.getLogger("lorag.gateway")

TokenBytes = Callable[[int], bytes]


def usage(outs: list[Completion]) -> dict[str, int]:
    """One prompt, `len(outs)` completions of it."""
    prompt, completion = outs[0].prompt_tokens, sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(entries: list[TokenLogprob] | None, token_bytes: TokenBytes) -> dict[str, Any] | None:
    """Chat's `logprobs`: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}`."""
    if entries is None:
        return None

    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in top]} for t, lp, top in entries], "refusal": None}


def text_logprobs(entries: list[TokenLogprob] | None, token_bytes: TokenBytes, offset: int = 0) -> dict[str, Any] | None:
    """Completions' `logprobs`: parallel `tokens`, `token_logprobs`, `top_logprobs` (dicts) and
    `text_offset` (characters from the first token of the answer, from `offset` on)."""
    if entries is None:
        return None
    text = lambda t: token_bytes(t).decode("utf-8", errors="replace")  # noqa: E731
    tokens = [text(t) for t, _, _ in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": [{text(a): alp for a, alp in top} for _, _, top in entries],
            "text_offset": offsets}


def body(meta: dict[str, Any], outs: list[Completion], chat: bool, token_bytes: TokenBytes) -> dict[str, Any]:
    """A whole answer with one choice per completion (`choices[i].index == i`)."""
    choices = []
    for i, out in enumerate(outs):
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": out.text}, "logprobs": chat_logprobs(out.logprobs, token_bytes),
                            "finish_reason": out.finish_reason})
        else:
            choices.append({"index": i, "text": out.text, "logprobs": text_logprobs(out.logprobs, token_bytes), "finish_reason": out.finish_reason})
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage(outs)}


async def events(meta: dict[str, Any], streams: list[AsyncIterator], firsts: list[Any], chat: bool, include_usage: bool,
                 token_bytes: TokenBytes, sources: list | None, done: Callable[[Completion], None]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format for `len(streams)` choices: an opening chunk per
    choice (chat: its role; `sources` ride on the very first chunk); then each choice's pieces as they come,
    its finish reason, and (`include_usage`) one last chunk with no choices and the usage.

    `firsts[i]` is stream i's first item, already taken (errors before it are HTTP statuses).
    `done(completion)` is called once per finished choice. An error mid-stream is reported in-band, as OpenAI does.
    """
    obj = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * len(streams)

    def chunk(i: int, piece: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        lps = getattr(piece, "logprobs", None) or None
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece is not None else {})
            choice = {"index": i, "delta": delta, "logprobs": chat_logprobs(lps, token_bytes) if lps else None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": piece or "", "logprobs": text_logprobs(lps, token_bytes, offsets[i]) if lps else None, "finish_reason": finish}
            offsets[i] += sum(len(token_bytes(t).decode("utf-8", errors="replace")) for t, _, _ in lps or [])
        return {**meta, "object": obj, "choices": [choice]}

    for i in range(len(streams)):
        head = chunk(i, None, None, role=True)
        if sources and i == 0:
            head["sources"] = sources
        yield f"data: {json.dumps(head)}\n\n"
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.ensure_future(_pump(i, first, stream, queue)) for i, (first, stream) in enumerate(zip(firsts, streams))]
    finished: list[Completion] = []
    try:
        while len(finished) < len(streams):
            i, item = await queue.get()
            if isinstance(item, BaseException):
                log.error("generation failed mid-stream", exc_info=item)
                yield f"data: {json.dumps(error_body(f'generation failed: {type(item).__name__}', 'server_error', None))}\n\n"
                break
            if isinstance(item, Completion):
                done(item)
                finished.append(item)
                yield f"data: {json.dumps(chunk(i, None, item.finish_reason))}\n\n"
            elif item:
                yield f"data: {json.dumps(chunk(i, item, None))}\n\n"
        else:
            if include_usage:
                yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': usage(finished)})}\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()  # a client that left ends its rows at the next token
    yield "data: [DONE]\n\n"


async def _pump(i: int, first: Any, stream: AsyncIterator, queue: asyncio.Queue) -> None:
    """Stream i's items, from `first` to its `Completion`, onto `queue` as (i, item); an error as (i, exception)."""
    item = first
    try:
        while item is not None:
            await queue.put((i, item))
            if isinstance(item, Completion):
                return
            item = await anext(stream, None)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        await queue.put((i, e))
