"""The generation engine: one base model, many LoRA adapters, batched, with no Ray Serve in sight.

`Engine(cfg, model_ref)` loads the base model (`lorag.models`), wraps it for per-row adapters
(`lorag.multilora`) and serves `generate(prompt, params, adapter)` and `stream(...)` to any asyncio
caller: the Serve deployments (`lorag.deployments`), tests and evaluation use this same object.

Concurrent calls are gathered into batches (`lorag.batcher.Batcher`); rows of one batch may use
different adapters, and different grammars or none (structured output: `lorag.grammar`); a row
may ask for its tokens' log-probabilities (`SamplingParams.logprobs`). Every row ends on its own: at its end-of-sequence token, its first stop
sequence, its own `max_tokens`, or when its caller has gone; an ended row is answered at once,
while longer rows of its batch go on. Adapters live in one place, the model's slots, managed by
`AdapterCache` (least recently used out, never one the running batch needs). All torch work runs on
one thread (`torch_thread`), so no lock is needed around the model.

Errors a caller can cause (an unknown or incompatible adapter, a prompt past the context) are
`APIError`s with an HTTP status, as every caller reports them to a person. A failure ends only the
rows it concerns: an adapter that cannot be loaded answers its own rows (and is retried after a
back-off), a row whose scores turn NaN ends alone, and an error of one `generate` pass answers that
pass's rows with a 5xx while the batch's other passes run. `check_progress` is the replica's health:
it fails while requests wait on a model thread that has stopped making progress.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from lorag.adapters import AdapterNotFoundError, AdapterStore, parse_model_id
from lorag.batcher import AdapterCache, Batcher, CacheFull
from lorag.completion import Completion, Row
from lorag.config import LoragConfig
from lorag.models import PromptEncoder, serving_device
from lorag.schemas import MIN_TEMPERATURE, APIError

log = logging.getLogger("lorag.engine")

Prompt = list[dict[str, str]] | str  # chat messages (the model's chat template applies) or raw text


@dataclass(frozen=True)
class SamplingParams:
    """How one completion is generated."""

    max_tokens: int
    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE, which becomes 0): greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    seed: int | None = None  # sampling only; a seeded request runs in a batch of its own
    frequency_penalty: float = 0.0  # OpenAI's: lowers a token's logit per time this answer has used it
    presence_penalty: float = 0.0  # OpenAI's: lowers a token's logit once this answer has used it
    grammar: str | None = None  # the tokens follow this grammar (`lorag.grammar.Grammars.compile`: structured output)
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives (None: none)

    def __post_init__(self):
        if self.temperature < MIN_TEMPERATURE:  # decoded greedily, so batched with the greedy rows
            object.__setattr__(self, "temperature", 0.0)

    def batch_key(self, row: int) -> tuple[Any, ...]:
        """Rows with equal keys can share one `generate` call (its sampling settings are per call)."""
        penalties = (self.frequency_penalty, self.presence_penalty)
        if self.temperature == 0:
            return ("greedy", *penalties)
        return ("sample", self.temperature, self.top_p, *penalties, row if self.seed is not None else None)


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

    LOAD_RETRY_S = 1.0  # an adapter that failed to load is tried again after this, doubled per failure in a row ...
    LOAD_RETRY_MAX_S = 60.0  # ... up to this; meanwhile its requests get the failure's error at once

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
        self._broken: dict[str, tuple[float, int, APIError]] = {}  # adapter id -> (retry at, failures in a row, error); torch thread
        self._waiting = 0  # callers waiting for the batcher (event loop)
        self._progress = time.monotonic()  # the last answer or token of the model thread, or the start of work on an idle engine
        self._grammars = None  # `grammars`, made on first use

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
        self._enter()
        try:
            result = await self.batcher.submit(row)
        finally:
            self._waiting -= 1
        if isinstance(result, Exception):
            raise result
        return result

    async def stream(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> AsyncIterator[str | Completion]:
        """The same completion, as text pieces (`lorag.completion.Piece`) while they are decoded, then its `Completion`.

        Leaving the iteration early (a client that hung up) ends the row at its next token.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        row = await self._row(prompt, params, adapter, emit=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        self._enter()
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
            self._waiting -= 1

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

    def check_progress(self) -> None:
        """The replica's health: raise while callers wait and the model thread has produced no
        token and answered no row for `serve.request_timeout_s` (a hung device or a wedged loop;
        every one of those callers times out anyway), so that Serve replaces the replica.

        Raises:
            RuntimeError: saying for how long, how many callers wait, and the limit's field.
        """
        stalled, limit = time.monotonic() - self._progress, self.cfg.serve.request_timeout_s
        if self._waiting and stalled > limit:
            raise RuntimeError(f"the model thread has made no progress for {stalled:.0f} s while {self._waiting} requests wait "
                               f"(limit: serve.request_timeout_s = {limit:g} s)")

    def retire(self, keep: Callable[[str], bool]) -> list[str]:
        """Unload every adapter version in the slots that `keep(id)` rejects and no running row holds
        (a version nothing points at any more: `lorag.releases.Registry.referenced`), and forget its
        local copy; returns their ids. Runs on the model thread, between batches."""

        def run() -> list[str]:
            gone = [a for a, pins in self.cache.entries.items() if pins == 0 and not keep(a)]
            for adapter in gone:
                self.mm.unload(adapter)
                self.cache.drop(adapter)
            for adapter in [a for a in self._paths if not keep(a) and a not in self.cache]:
                self._paths.pop(adapter, None)
            return gone

        return self.torch.submit(run).result()

    def close(self) -> None:
        self.torch.shutdown(wait=False, cancel_futures=True)

    def _enter(self) -> None:
        """A caller starts waiting; on an idle engine the stall clock starts now, not at the last answer."""
        if not self._waiting:
            self._progress = time.monotonic()
        self._waiting += 1

    # -- request preparation (event loop side) --------------------------------------------------------

    async def _row(self, prompt: Prompt, params: SamplingParams, adapter: str | None, emit: Callable[[str], None] | None) -> Row:
        adapter, path = await self.prepare_adapter(adapter) if adapter else (None, None)
        ids = await asyncio.to_thread(self.prompts.encode, prompt)
        self.prompts.check(len(ids), params.max_tokens)
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", code="invalid_request")
        matcher = await asyncio.to_thread(self._matcher, params.grammar) if params.grammar else None
        return Row(adapter, path, ids, params, emit, matcher=matcher, logprobs=[] if params.logprobs is not None else None)

    @property
    def grammars(self):
        """Structured output for this tokenizer (`lorag.grammar.Grammars`), made on first use (about 0.5 s)."""
        if self._grammars is None:
            from lorag.grammar import Grammars

            self._grammars = Grammars(self.tokenizer)
        return self._grammars

    def _matcher(self, grammar: str):
        """A row's matcher for `grammar` (checked against this tokenizer: 400 if it cannot be followed)."""
        return self.grammars.matcher(self.grammars.check(grammar))

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
        adapters and grammars (a seeded row runs alone, so a seed gives the same answer whatever
        else is in flight). Rows whose adapters find no free slot wait for a later pass of this call.

        Failures stay with their rows: a row whose adapter cannot be loaded gets that error
        (`_place`), a row whose scores turn NaN or infinite gets a 500 while its pass goes on,
        and a pass that raises answers its unfinished rows with a 500 (503 out of memory) while
        the other passes run. Every answer and token counts as progress (`check_progress`).
        """

        def answer(i: int, result: Any) -> None:
            self._progress = time.monotonic()
            if isinstance(result, Exception):
                rows[i].ended = "error"
            finish(i, result)

        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.params.batch_key(i), []).append(i)
        for members in groups.values():
            while members:
                members, running, slots = self._place(rows, members, answer)
                if not running:  # nothing is pinned between passes, so this cannot happen; never spin on it
                    for i in members:
                        answer(i, APIError(503, f"no adapter slot came free for {rows[i].adapter}; retry shortly", type="server_error", code="overloaded"))
                    break
                self._pass(rows, running, slots, gone, answer)
        return [None] * len(rows)

    def _pass(self, rows: list[Row], running: list[int], slots: list[int], gone: Callable[[int], bool], answer: Callable[[int, Any], None]) -> None:
        """One `generate_batch` call for `running` (rows of equal sampling settings, their adapters in `slots`)."""
        from lorag.generation import generate_batch

        def on_token(j: int, token: int, logprob) -> bool:
            i = running[j]
            if rows[i].ended:  # answered with an error (on_error) in this step
                return True
            self._progress = time.monotonic()
            ended = rows[i].step(token, self.tokenizer, self.eos, gone(i), logprob)
            if ended:
                answer(i, rows[i].completion(self.tokenizer))
            return ended

        def on_error(j: int) -> None:
            i = running[j]
            if not rows[i].ended:
                answer(i, APIError(500, f"generation failed: the scores of {rows[i].adapter or 'the base model'} for this request became "
                                        "NaN or infinite (an adapter whose weights overflow the model?)", type="server_error", code="generation_failed"))

        def on_grammar_error(j: int, message: str) -> None:
            i = running[j]
            if not rows[i].ended:
                answer(i, APIError(400, f"response_format: the grammar engine gave up on this schema: {message}", code="invalid_response_format"))

        p = rows[running[0]].params
        grammars = [rows[i].matcher for i in running]
        try:
            generate_batch(self.mm, [rows[i].ids for i in running], slots, max_new_tokens=max(rows[i].params.max_tokens for i in running),
                           pad_id=self.pad_id, eos_ids=sorted(self.eos), temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                           frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty, on_token=on_token, on_error=on_error,
                           grammars=grammars if any(g is not None for g in grammars) else None, on_grammar_error=on_grammar_error,
                           grammar_vocab=self._grammars.vocab if self._grammars else None, logprobs=[rows[i].params.logprobs for i in running])
        except Exception as e:  # this pass only: the batch's other passes still run
            error = self._failure(e, [rows[i].adapter for i in running])
            for i in running:
                if not rows[i].ended:
                    answer(i, error)
        finally:
            for i in running:
                if rows[i].adapter:
                    self.cache.release(rows[i].adapter)
        for i in running:  # a row the model ended without reporting its last token (none expected)
            if not rows[i].ended:
                answer(i, rows[i].completion(self.tokenizer))

    def _place(self, rows: list[Row], members: list[int], answer: Callable[[int, Any], None]) -> tuple[list[int], list[int], list[int]]:
        """Give each row its adapter's slot, loading what is missing: (rows left for the next pass,
        rows to run now, their slots).

        Fails closed: whatever goes wrong loading an adapter (unreadable or malformed files, an
        adapter that does not fit, out of memory), its row is answered with the error and holds no
        pin, and the adapter is forgotten (its slot is free). Its later rows get the same error at
        once until a back-off has passed (`LOAD_RETRY_S`, doubled per failure in a row up to
        `LOAD_RETRY_MAX_S`); then loading is tried again.
        """
        from lorag.lora_weights import LoraWeights

        waiting, running, slots = [], [], []
        for i in members:
            row = rows[i]
            if row.adapter is None:
                running.append(i)
                slots.append(0)
                continue
            broken = self._broken.get(row.adapter)
            if broken is not None and time.monotonic() < broken[0]:
                answer(i, broken[2])
                continue
            try:
                hit, victim = self.cache.acquire(row.adapter)
            except CacheFull:
                waiting.append(i)
                continue
            try:
                if not hit:
                    if victim is not None:
                        self.mm.unload(victim)
                    self.mm.load(row.adapter, LoraWeights.load(row.path))
                slot = self.mm.slots[row.adapter]
            except Exception as e:
                self.cache.drop(row.adapter)  # unpinned and forgotten; the model holds none of it (MultiLoraModel.load)
                failures = broken[1] + 1 if broken is not None else 1
                if len(self._broken) >= 4096:
                    self._broken.clear()
                error = self._load_error(row, e)
                self._broken[row.adapter] = (time.monotonic() + min(self.LOAD_RETRY_MAX_S, self.LOAD_RETRY_S * 2 ** (failures - 1)), failures, error)
                answer(i, error)
                continue
            self._broken.pop(row.adapter, None)
            running.append(i)
            slots.append(slot)
        return waiting, running, slots

    def _load_error(self, row: Row, e: Exception) -> APIError:
        """What the requests of an adapter that failed to load are told: 404 its files are gone, 400
        they are not a servable adapter, 503 anything else (I/O, memory: it may pass)."""
        message = f"adapter {row.adapter} cannot be loaded: {type(e).__name__}: " + self._public(e).replace(str(row.path), row.adapter)
        if isinstance(e, FileNotFoundError):
            return APIError(404, message, code="adapter_unavailable")
        if isinstance(e, ValueError):
            return APIError(400, message, code="adapter_unavailable")
        log.error("loading adapter %s failed", row.adapter, exc_info=e)
        return APIError(503, f"{message}; it is tried again after a back-off", type="server_error", code="adapter_unavailable")

    def _failure(self, e: Exception, adapters: list[str | None]) -> APIError:
        """What the rows of a `generate` pass that raised are told (the traceback goes to the log)."""
        import torch

        log.error("a generate pass failed (adapters %s)", sorted({a or "base" for a in adapters}), exc_info=e)
        if isinstance(e, torch.OutOfMemoryError):
            return APIError(503, "the replica ran out of memory generating this request; retry shortly or ask for fewer tokens", type="server_error", code="overloaded")
        return APIError(500, f"generation failed: {type(e).__name__}: {self._public(e)}", type="server_error", code="generation_failed")
