"""Two small pieces of a generation engine that hold no model: the request batcher and the adapter cache.

`Batcher` gathers concurrent calls into batches for one blocking `run` on the model's thread, and
lets `run` hand each caller its result as soon as that caller's row is done. `AdapterCache`
decides which adapters hold the model's slots: least recently used out, never one the running
batch needs. Both are pure Python and tested by table (`tests/test_engine.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import OrderedDict
from typing import Any, Callable


class Batcher:
    """Collects concurrent calls into batches of up to `max_size`.

    A batch closes when it is full, when no call has arrived for `wait_s`, or `MAX_WAIT_FACTOR *
    wait_s` after its first call, whichever comes first: a burst whose calls trickle in (through
    the proxy and the gateway, on a busy machine) still shares one pass, and a lone call waits only
    `wait_s`. `await submit(item)` returns item's result. `run(items, gone, finish)` (blocking)
    executes on `executor` (default: asyncio's thread pool) while the next batch gathers; it may
    poll `gone(i)` (true once item i's caller was cancelled: its client disconnected or timed out),
    may call `finish(i, result)` from its thread to answer caller i at once, and returns the results
    of the callers it has not finished (a list, one per item; entries of finished items are ignored).
    """

    MAX_WAIT_FACTOR = 8

    def __init__(self, run: Callable[..., list[Any] | None], max_size: int, wait_s: float, executor: concurrent.futures.Executor | None = None):
        self.run, self.max_size, self.wait_s, self.executor = run, max_size, wait_s, executor
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        if self.task is None or self.task.done():  # started lazily, inside the caller's event loop
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            now = loop.time()
            last_call = now + self.MAX_WAIT_FACTOR * self.wait_s
            deadline = min(now + self.wait_s, last_call)
            while len(batch) < self.max_size:
                try:
                    batch.append(self.queue.get_nowait() if loop.time() >= deadline else await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                deadline = min(loop.time() + self.wait_s, last_call)  # each arrival extends the wait, up to the cap
            batch = [(item, f) for item, f in batch if not f.done()]  # skip callers that gave up
            if not batch:
                continue
            futures = [f for _, f in batch]

            def finish(i: int, result: Any, futures=futures) -> None:  # from run's thread
                loop.call_soon_threadsafe(_resolve, futures[i], result)

            try:
                results = await loop.run_in_executor(self.executor, self.run, [item for item, _ in batch], lambda i: futures[i].cancelled(), finish)
            except Exception as e:
                for f in futures:
                    if not f.done():
                        f.set_exception(e)
                continue
            await asyncio.sleep(0)  # let the early answers queued by finish() land first
            for f, r in zip(futures, results or [None] * len(futures)):
                _resolve(f, r)


def _resolve(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


class CacheFull(RuntimeError):
    """Every slot holds an adapter the running batch needs."""


class AdapterCache:
    """Which adapters hold the `capacity` slots of a model, least recently used first.

    `acquire(id)` pins an adapter for a batch and says what to do: `(True, None)` it is loaded;
    `(False, None)` load it into a free slot; `(False, victim)` unload `victim` first. `release(id)`
    unpins it. Only unpinned adapters are evicted; with every slot pinned `acquire` raises
    `CacheFull` (the batch then leaves that row for its next pass). `drop(id)` forgets an adapter
    whose load failed.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.entries: OrderedDict[str, int] = OrderedDict()  # adapter id -> pins, least recently used first

    def acquire(self, adapter_id: str) -> tuple[bool, str | None]:
        if adapter_id in self.entries:
            self.entries[adapter_id] += 1
            self.entries.move_to_end(adapter_id)
            return True, None
        victim = None
        if len(self.entries) >= self.capacity:
            victim = next((a for a, pins in self.entries.items() if pins == 0), None)
            if victim is None:
                raise CacheFull(f"all {self.capacity} adapter slots are in use by the running batch")
            del self.entries[victim]
        self.entries[adapter_id] = 1
        return False, victim

    def release(self, adapter_id: str) -> None:
        if self.entries.get(adapter_id, 0) > 0:
            self.entries[adapter_id] -= 1

    def drop(self, adapter_id: str) -> None:
        self.entries.pop(adapter_id, None)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self.entries

    def loaded(self) -> list[str]:
        return list(self.entries)
