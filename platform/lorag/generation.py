"""Batched generation over a `MultiLoraModel`: one `model.generate` call for rows on different adapters.

Owns `generate_batch` (left-padded prompts, rows sorted by slot so that each adapter is one run,
greedy or shared-parameter sampling) and the hooks it installs into `generate`: OpenAI's
frequency/presence `Penalties`, the `Finite` guard (a row whose scores turn NaN or infinite ends
alone, the batch goes on), and the stopping criteria for callers that are gone (`CallerGone`) or
that end a row themselves from its streamed tokens (`TokenWatch`).

    out = generate_batch(mm, [ids1, ids2], slots=[a, 0], max_new_tokens=32, pad_id=tok.pad_token_id)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TemperatureLogitsWarper,
                          TopPLogitsWarper)

from lorag.schemas import MIN_TEMPERATURE

if TYPE_CHECKING:
    from lorag.multilora import MultiLoraModel


def generate_batch(mm: MultiLoraModel, prompts: Sequence[Sequence[int]], slots: Sequence[int], *, max_new_tokens: int,
                   pad_id: int, eos_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                   gone: Callable[[int], bool] | None = None, on_token: Callable[[int, int, TokenLogprob | None], bool] | None = None,
                   on_error: Callable[[int], None] | None = None, grammars: Sequence[Any | None] | None = None,
                   on_grammar_error: Callable[[int, str], None] | None = None, grammar_vocab: int | None = None, logprobs: Sequence[int | None] | None = None) -> list[list[int]]:
    """Generate for a batch whose rows use different adapters, in one `model.generate` call.

    Prompts are left-padded with `pad_id`. Sampling parameters are shared by the whole batch
    (temperature 0, or below `MIN_TEMPERATURE`: greedy); group requests by parameters before calling.
    No sampling parameter can make the scores NaN; a row whose scores still stop being a
    distribution (NaN or infinite: an adapter whose weights overflow the model) ends alone (`Finite`).

    Args:
        mm: the wrapped model; `slots[i]` must be loaded (0: the base model).
        prompts: token ids of each prompt (chat template already applied).
        eos_ids: stop tokens (default: the model's generation_config eos).
        seed: seeds torch's global RNG first (sampling only).
        frequency_penalty, presence_penalty: OpenAI's penalties on tokens the row has generated
            (`Penalties`); 0: none.
        gone: `gone(i)` is true once nobody waits for row i any more (a client that disconnected or
            timed out); checked after every token, such a row stops, and the call ends as soon as
            every row has stopped, instead of decoding for nobody up to `max_new_tokens`.
        on_token: `on_token(i, token, logprob)` is called with each new token of row i (on this
            thread; `logprob` as `logprobs` asks, else None); True ends row i there (its own length
            limit or stop sequence). Rows that ended stop being reported, and the call ends once
            every row has ended.
        on_error: `on_error(i)` is called (on this thread) once row i's scores are NaN or
            infinite; the row is then given a stop token and ends, and the other rows go on.
        grammars: row i's llguidance matcher (`lorag.grammar`), or None for a free row; the row's
            tokens then follow its grammar (`GrammarMask`).
        on_grammar_error: `on_grammar_error(i, message)` once row i's grammar fails (a limit of
            the grammar engine); the row ends, the others go on.
        grammar_vocab: the grammars' tokenizer's vocabulary size (`Grammars.vocab`; default: the model's).
        logprobs: for row i, None (no log-probabilities) or how many top alternatives to report
            with each token (0: only the chosen token's); passed to `on_token` (`Logprobs`).

    Returns:
        The new tokens of each row, up to and including the first stop token (a row that was gone
        or failed: whatever it had, padded).

    Raises:
        ValueError: a sampling parameter that is not finite or out of its range.
        FloatingPointError: some rows got non-finite scores and no `on_error` was given (after
            the other rows are done).
    """
    _check_sampling(len(prompts), len(slots), temperature, top_p, frequency_penalty, presence_penalty)
    if not prompts:
        return []
    if not all(prompts):
        raise ValueError("every prompt needs at least one token")
    eos = list(eos_ids) or _as_list(mm.model.generation_config.eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: slots[i])  # one run per adapter (see set_batch)
    ids, attention, width = _left_pad([prompts[i] for i in order], pad_id, next(mm.model.parameters()).device)
    sample = temperature >= MIN_TEMPERATURE
    guard = Finite(order, eos[0] if eos else pad_id, on_error)
    capture = Logprobs([logprobs[i] for i in order]) if logprobs is not None and any(k is not None for k in logprobs) else None
    mask = None
    if grammars is not None and any(g is not None for g in grammars):
        from lorag.grammar import GrammarMask

        mask = GrammarMask([grammars[i] for i in order], width, grammar_vocab or mm.model.config.vocab_size, eos[0] if eos else pad_id,
                           (lambda j, message: on_grammar_error(order[j], message)) if on_grammar_error else None)
    extra = [x for x in (capture, mask) if x is not None]
    kwargs = {"do_sample": sample, "temperature": 1.0 if sample else None, "top_p": 1.0 if sample else None, "top_k": None,
              "logits_processor": _processors(sample, temperature, top_p, frequency_penalty, presence_penalty, width, guard, extra)}
    if sample and seed is not None:
        torch.manual_seed(seed)
    criteria = ([CallerGone(gone, order)] if gone is not None else []) + ([TokenWatch(on_token, order, capture)] if on_token is not None else [])
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    with mm.rows([slots[i] for i in order]), torch.inference_mode():
        out = mm.model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                pad_token_id=pad_id, eos_token_id=eos or None, **kwargs)
    if guard.failed and on_error is None:
        raise FloatingPointError(f"rows {sorted(guard.failed)} got NaN or infinite scores (an adapter whose weights overflow the model?)")
    return _until_stop(out[:, width:].tolist(), order, eos)


def _check_sampling(n_prompts: int, n_slots: int, temperature: float, top_p: float, frequency_penalty: float,
                    presence_penalty: float) -> None:
    """Raise one ValueError naming every sampling parameter that is not finite or out of its range."""
    if n_prompts != n_slots:
        raise ValueError(f"{n_prompts} prompts but {n_slots} slots")
    problems = [f"{name}={value!r}: must be a finite number{bound}" for name, value, ok, bound in (
        ("temperature", temperature, temperature >= 0, " >= 0"), ("top_p", top_p, 0 < top_p <= 1, " in (0, 1]"),
        ("frequency_penalty", frequency_penalty, True, ""), ("presence_penalty", presence_penalty, True, ""),
    ) if not (math.isfinite(value) and ok)]
    if problems:
        raise ValueError("; ".join(problems))


def _left_pad(prompts: list[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input ids, attention mask, width): each prompt left-padded with `pad_id` to the longest one's length."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, attention, width


def _processors(sample: bool, temperature: float, top_p: float, frequency_penalty: float, presence_penalty: float,
                width: int, guard: Finite, first: Sequence[LogitsProcessor] = ()) -> LogitsProcessorList:
    """`first` (the log-probability capture, then the grammar mask), penalties, the sampling warpers, then `guard`.

    The warpers are ours, not generate()'s (it is told 1.0), so that `Finite` runs after them, last.
    """
    processors = list(first) + ([Penalties(frequency_penalty, presence_penalty, width)] if frequency_penalty or presence_penalty else [])
    if sample:
        processors += [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        processors += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    return LogitsProcessorList([*processors, guard])


def _until_stop(rows: list[list[int]], order: list[int], eos: list[int]) -> list[list[int]]:
    """Batch row j's new tokens (caller row `order[j]`) up to and including its first stop token, in the caller's order."""
    result: list[list[int]] = [[] for _ in order]
    for i, row in zip(order, rows):
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        result[i] = row if stop is None else row[: stop + 1]
    return result


class Penalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties: each token's logit is lowered by
    `frequency * (times the row has generated it) + presence * (1 if it has at all)`; the prompt
    (columns before `start`) does not count. Negative values favour repetition instead."""

    def __init__(self, frequency: float, presence: float, start: int):
        self.frequency, self.presence, self.start = frequency, presence, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.start :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class Finite(LogitsProcessor):
    """The last logits processor: a row whose scores are no distribution (NaN, +inf, or every
    token -inf), which would make sampling raise for the whole batch or greedy decoding pick
    garbage, is given a certain `stop` token instead, so it ends and the batch goes on. Its caller
    row (`order[j]` for batch row j) is added to `failed` and reported once to `on_error`."""

    def __init__(self, order: list[int], stop: int, on_error: Callable[[int], None] | None):
        self.order, self.stop, self.on_error, self.failed = order, stop, on_error, set()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(scores.amax(dim=-1))  # NaN propagates through amax; +inf and all -inf are not finite
        if bool(bad.any()):  # one device sync per step
            scores[bad] = -math.inf
            scores[bad, self.stop] = 0.0
            for j in bad.nonzero().flatten().tolist():
                if self.order[j] not in self.failed:
                    self.failed.add(self.order[j])
                    if self.on_error is not None:
                        self.on_error(self.order[j])
        return scores


class CallerGone(StoppingCriteria):
    """Stops the rows whose caller is gone: `gone(i)` for the caller's row i, where batch row j is caller row `order[j]`."""

    def __init__(self, gone: Callable[[int], bool], order: list[int]):
        self.gone, self.order = gone, order

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([self.gone(i) for i in self.order], dtype=torch.bool, device=input_ids.device)


class TokenWatch(StoppingCriteria):
    """Hands each row's newest token to `on_token(i, token, logprob)` (caller row i = batch row j's
    `order[j]`; `logprob` from `capture`, or None) and stops the rows for which it returned True;
    an ended row is not reported again."""

    def __init__(self, on_token: Callable[[int, int, TokenLogprob | None], bool], order: list[int], capture: Logprobs | None = None):
        self.on_token, self.order, self.capture, self.ended = on_token, order, capture, [False] * len(order)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for j, token in enumerate(input_ids[:, -1].tolist()):  # one device sync per step
            if not self.ended[j]:
                lp = self.capture.of(j, token) if self.capture is not None else None
                self.ended[j] = bool(self.on_token(self.order[j], token, lp))
        return torch.tensor(self.ended, dtype=torch.bool, device=input_ids.device)


TokenLogprob = tuple[float, list[tuple[int, float]]]  # (the chosen token's log-probability, [(token, log-probability)] of the top ones)
UNLIKELY = -9999.0  # what a log-probability that is not finite is reported as (OpenAI's value for "never")


class Logprobs(LogitsProcessor):
    """Keeps the model's own log-probabilities at each step (before penalties, grammars and
    sampling warpers: what the model thinks, as vLLM reports by default) for the batch rows that
    ask (`wanted[j]`: None, or how many top alternatives); `of(j, token)` reads them after the
    step chose `token`."""

    def __init__(self, wanted: Sequence[int | None]):
        self.wanted = list(wanted)
        self.rows = [j for j, k in enumerate(self.wanted) if k is not None]
        self.position = {j: r for r, j in enumerate(self.rows)}
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.last = scores[self.rows].float().log_softmax(dim=-1)
        return scores

    def of(self, j: int, token: int) -> TokenLogprob | None:
        k = self.wanted[j]
        if k is None or self.last is None:
            return None
        row = self.last[self.position[j]]
        top = torch.topk(row, k) if k else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return _finite(row[token].item()), [(t, _finite(x)) for t, x in pairs]


def _finite(x: float) -> float:
    return x if math.isfinite(x) else UNLIKELY


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)
