"""The generation engine: one base model, many LoRA adapters, batched, with no Ray Serve in sight.

`Engine(cfg, model_ref)` loads the base model (`lorag.models`), wraps it for per-row adapters
(`lorag.multilora`) and serves `generate(prompt, params, adapter)` and `stream(...)` to any asyncio
caller: the Serve deployments (`lorag.deployments`), tests and evaluation use this same object.

Concurrent calls are gathered into batches (`lorag.batcher.Batcher`); rows of one batch may use
different adapters. Every row ends on its own: at its end-of-sequence token, its first stop
sequence, its own `max_tokens`, or when its caller has gone; an ended row is answered at once,
while longer rows of its batch go on. Adapters live in one place, the model's slots, managed by
`AdapterCache` (least recently used out, never one the running batch needs). All torch work runs on
one thread (`torch_thread`), so no lock is needed around the model.

Errors a caller can cause (an unknown or incompatible adapter, a prompt past the context) are
`APIError`s with an HTTP status, as every caller reports them to a person.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from lorag.adapters import AdapterNotFoundError, AdapterStore, parse_model_id
from lorag.batcher import AdapterCache, Batcher, CacheFull
from lorag.config import LoragConfig
from lorag.models import PromptEncoder, serving_device
from lorag.schemas import APIError

Prompt = list[dict[str, str]] | str  # chat messages (the model's chat template applies) or raw text


@dataclass(frozen=True)
class SamplingParams:
    """How one completion is generated."""

    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    seed: int | None = None  # sampling only; a seeded request runs in a batch of its own
    frequency_penalty: float = 0.0  # OpenAI's: lowers a token's logit per time this answer has used it
    presence_penalty: float = 0.0  # OpenAI's: lowers a token's logit once this answer has used it

    def batch_key(self, row: int) -> tuple[Any, ...]:
        """Rows with equal keys can share one `generate` call (its sampling settings are per call)."""
        penalties = (self.frequency_penalty, self.presence_penalty)
        if self.temperature == 0:
            return ("greedy", *penalties)
        return ("sample", self.temperature, self.top_p, *penalties, row if self.seed is not None else None)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


def torch_thread(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """The one thread a replica runs its model on: loading it, and every forward pass after.

    Measured (SmolLM2-135M, a batch of 8, 2 cores): a model loaded on one thread and run from
    another, as asyncio's thread pool would run it, generated at 0.7-0.8x the speed of the same
    model loaded and run on one thread (likely because OpenMP keeps a thread team per calling
    thread), so all torch work stays on this single worker.
    """
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


class Engine:
    """A base model with adapter slots, generating for many callers at once. See the module docstring."""

    def __init__(self, cfg: LoragConfig, model_ref: str, store: AdapterStore | None = None):
        """Load the model (on its own thread, on the GPU when `serve.gpus_per_replica` is set).

        Args:
            cfg: the config (`serve` sizes the batches and the adapter slots).
            model_ref: the base model (a bundled name, local dir, URI or hub id), resolved on this node.
            store: the adapter store (default: the config's).
        """
        from lorag.models import load_causal_lm, resolve_model
        from lorag.multilora import MultiLoraModel

        sv = cfg.serve
        self.cfg = cfg
        path = resolve_model(model_ref, cfg.model_cache)
        self.prompts = PromptEncoder(path)
        self.tokenizer = self.prompts.tokenizer
        self.torch = torch_thread("lorag-generate")
        device, dtype = serving_device(sv)
        self.model = self.torch.submit(lambda: load_causal_lm(path, dtype).to(device).eval()).result()
        self.mm = MultiLoraModel(self.model, max_adapters=sv.max_adapters_per_replica, max_rank=sv.max_lora_rank, merge_single=sv.merge_single_adapter)
        self.cache = AdapterCache(sv.max_adapters_per_replica)
        self.store = store or AdapterStore(cfg.adapter_store)
        self.batcher = Batcher(self._run_batch, sv.max_batch_size, sv.batch_wait_ms / 1000, executor=self.torch)
        gen_eos = self.model.generation_config.eos_token_id
        self.eos = {self.tokenizer.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))} - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self._paths: dict[str, Path] = {}  # adapter id -> its verified local copy (versions are immutable)

    # -- the API -----------------------------------------------------------------------------------

    async def generate(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> Completion:
        """One completion, batched with whatever else is in flight.

        Args:
            prompt: chat messages or raw text.
            params: sampling settings and limits.
            adapter: `name@vN` (or `name`, or `name@tag`), None for the base model.

        Raises:
            APIError: 404 unknown adapter, 400 incompatible adapter or prompt past the context.
        """
        row = await self._row(prompt, params, adapter, emit=None)
        result = await self.batcher.submit(row)
        if isinstance(result, Exception):
            raise result
        return result

    async def stream(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> AsyncIterator[str | Completion]:
        """The same completion, as text pieces while they are decoded, then its `Completion`.

        Leaving the iteration early (a client that hung up) ends the row at its next token.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        row = await self._row(prompt, params, adapter, emit=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        task = asyncio.ensure_future(self.batcher.submit(row))
        try:
            while not task.done():
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not pieces.empty():
                yield pieces.get_nowait()
            result = task.result()
            if isinstance(result, Exception):
                raise result
            yield result
        finally:
            task.cancel()  # no-op once done; otherwise the caller left and the row stops

    async def prepare_adapter(self, adapter: str) -> tuple[str, Path]:
        """Resolve an adapter id (`name`, `name@tag`, `name@vN`), check it was trained on this base
        model, and bring its files to this node (verified). Returns its canonical id `name@vN` and
        its local directory; a version id is resolved once (versions are immutable, never reused).

        Raises:
            APIError: 404 no such adapter or version, 400 trained on another base model.
        """
        if adapter in self._paths:
            return adapter, self._paths[adapter]
        canonical, path = await asyncio.to_thread(self._fetch, adapter)
        if len(self._paths) >= 4096:
            self._paths.clear()
        self._paths[canonical] = path
        return canonical, path

    def close(self) -> None:
        self.torch.shutdown(wait=False, cancel_futures=True)

    # -- request preparation (event loop side) --------------------------------------------------------

    async def _row(self, prompt: Prompt, params: SamplingParams, adapter: str | None, emit: Callable[[str], None] | None) -> Row:
        adapter, path = await self.prepare_adapter(adapter) if adapter else (None, None)
        ids = await asyncio.to_thread(self.prompts.encode, prompt)
        self.prompts.check(len(ids), params.max_tokens)
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", code="invalid_request")
        return Row(adapter, path, ids, params, emit)

    def _fetch(self, adapter: str) -> tuple[str, Path]:
        name, version = parse_model_id(adapter)
        try:
            meta = self.store.metadata(name, version)
            if meta.get("base_model") not in (None, self.cfg.base_model):
                raise APIError(400, f"adapter {adapter} was trained on {meta['base_model']!r}, but this endpoint serves {self.cfg.base_model!r}",
                               code="adapter_unavailable")
            number = int(meta["version"])
            return f"{name}@v{number}", self.store.fetch(name, number, self.cfg.model_cache)
        except (AdapterNotFoundError, FileNotFoundError) as e:
            raise APIError(404, f"adapter {adapter} is not available: {self._public(e)}", code="adapter_unavailable") from None
        except ValueError as e:
            raise APIError(400, f"adapter {adapter}: {self._public(e)}", code="adapter_unavailable") from None

    def _public(self, e: Exception) -> str:
        """An error's message without this machine's paths (clients see it)."""
        return str(e).replace(self.store.root, "the adapter store").replace(str(self.cfg.model_cache), "the model cache")

    # -- generation (the torch thread) ----------------------------------------------------------------

    def _run_batch(self, rows: list[Row], gone: Callable[[int], bool], finish: Callable[[int, Any], None]) -> list[Any]:
        """Generate for a batch: rows with equal sampling settings share one pass whatever their
        adapters (a seeded row runs alone, so a seed gives the same answer whatever else is in
        flight). Rows whose adapters find no free slot wait for a later pass of this call."""
        from lorag.multilora import generate_batch

        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.params.batch_key(i), []).append(i)
        for members in groups.values():
            while members:
                members, running, slots = self._place(rows, members, finish)
                if not running:
                    continue
                p = rows[running[0]].params

                def on_token(j: int, token: int, running=running) -> bool:
                    i = running[j]
                    ended = rows[i].step(token, self.tokenizer, self.eos, gone(i))
                    if ended:
                        finish(i, rows[i].completion(self.tokenizer))
                    return ended

                try:
                    generate_batch(self.mm, [rows[i].ids for i in running], slots, max_new_tokens=max(rows[i].params.max_tokens for i in running),
                                   pad_id=self.pad_id, eos_ids=sorted(self.eos), temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                                   frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty, on_token=on_token)
                finally:
                    for i in running:
                        if rows[i].adapter:
                            self.cache.release(rows[i].adapter)
                for i in running:  # a row the model ended without reporting its last token (none expected)
                    if not rows[i].ended:
                        finish(i, rows[i].completion(self.tokenizer))
        return [None] * len(rows)

    def _place(self, rows: list[Row], members: list[int], finish) -> tuple[list[int], list[int], list[int]]:
        """Give each row its adapter's slot, loading what is missing: (rows left for the next pass,
        rows to run now, their slots). A row whose adapter fails to load is answered with the error."""
        from lorag.multilora import LoraWeights

        waiting, running, slots = [], [], []
        for i in members:
            row = rows[i]
            if row.adapter is None:
                running.append(i)
                slots.append(0)
                continue
            try:
                hit, victim = self.cache.acquire(row.adapter)
            except CacheFull:
                waiting.append(i)
                continue
            if not hit:
                try:
                    if victim is not None:
                        self.mm.unload(victim)
                    self.mm.load(row.adapter, LoraWeights.load(row.path))
                except (ValueError, OSError) as e:
                    self.cache.drop(row.adapter)
                    status = 404 if isinstance(e, FileNotFoundError) else 400
                    message = self._public(e).replace(str(row.path), row.adapter)
                    finish(i, APIError(status, f"adapter {row.adapter} cannot be loaded: {type(e).__name__}: {message}", code="adapter_unavailable"))
                    continue
            running.append(i)
            slots.append(self.mm.slots[row.adapter])
        return waiting, running, slots


@dataclass
class Row:
    """One request inside the engine: its prompt, limits and (on the torch thread) its progress."""

    adapter: str | None
    path: Path | None
    ids: list[int]
    params: SamplingParams
    emit: Callable[[str], None] | None  # streaming: where decoded text goes
    tokens: list[int] = field(default_factory=list)
    ended: str | None = None  # "stop", "length" or "gone"
    shown: str = ""  # text decoded so far (streaming)
    hold: StopHold | None = None

    def step(self, token: int, tokenizer, eos: set[int], gone: bool) -> bool:
        """Take the row's next token; True once the row has ended."""
        if self.ended:
            return True
        self.tokens.append(token)
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
            self.emit(piece)

    def completion(self, tokenizer) -> Completion:
        """The answer: decoded, cut before the first stop sequence, with why it ended."""
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((text.index(s) for s in self.params.stop if s in text), default=None)
        if cut is not None:
            text = text[:cut]
        finish = "length" if self.ended == "length" and cut is None else "stop"
        return Completion(text.strip(), finish, len(self.ids), len(self.tokens))


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
