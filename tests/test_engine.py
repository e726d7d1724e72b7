"""The generation engine without Ray Serve: the batcher, the adapter cache (by table), and the
Engine on a tiny model (rows end on their own, stops, per-row limits, adapters).

    .venv/bin/python -m pytest -q tests/test_engine.py
"""

import asyncio
import threading
import time

import pytest

from lorag.batcher import AdapterCache, Batcher, CacheFull


def run_batcher(wait_s: float, gaps: list[float], max_size: int = 64, fail: bool = False):
    """Submit one call after each gap (seconds); return the batches `run` saw and each call's result."""
    seen = []

    def run(items, gone, finish):
        seen.append(list(items))
        if fail:
            raise RuntimeError("boom")
        return [i * 10 for i in items]

    async def main():
        batcher = Batcher(run, max_size, wait_s)
        calls = []
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            calls.append(asyncio.create_task(batcher.submit(i)))
        return await asyncio.gather(*calls, return_exceptions=True)

    return seen, asyncio.run(main())


def test_batcher_keeps_a_trickling_burst_together_and_splits_on_a_pause():
    # five calls 150 ms apart (600 ms in all, past the 500 ms wait) share one batch;
    # after a 2 s pause the next ones start a new batch
    seen, results = run_batcher(0.5, [0, 0.15, 0.15, 0.15, 0.15, 2.0, 0.01])
    assert seen == [[0, 1, 2, 3, 4], [5, 6]]
    assert results == [0, 10, 20, 30, 40, 50, 60]


def test_batcher_closes_a_full_batch_and_caps_the_wait_of_a_steady_stream():
    seen, _ = run_batcher(10.0, [0] * 5, max_size=2)
    assert [len(b) for b in seen] == [2, 2, 1]
    # calls every 30 ms never leave a 100 ms gap, but a batch closes 8 x 100 ms after its first call
    seen, results = run_batcher(0.1, [0.03] * 60)
    assert len(seen) >= 2 and sorted(i for b in seen for i in b) == list(range(60))
    assert results == [i * 10 for i in range(60)]


def test_batcher_gives_every_caller_the_error_and_keeps_running():
    seen, results = run_batcher(0.3, [0, 0.01, 1.5], fail=True)
    assert seen == [[0, 1], [2]]
    assert all(isinstance(r, RuntimeError) for r in results)


def test_batcher_tells_run_which_callers_are_gone_and_answers_finished_callers_at_once():
    """A caller cancelled while its batch runs shows as gone(i) inside run; a caller that run
    finishes early gets its answer while run is still working for the others."""
    started, release, seen = threading.Event(), threading.Event(), {}

    def run(items, gone, finish):
        started.set()
        finish(2, "early")
        release.wait(5)
        for _ in range(500):  # up to 5 s for the cancellation to arrive
            if gone(0):
                break
            time.sleep(0.01)
        seen["gone"] = [gone(i) for i in range(len(items))]
        return list(items)

    async def main():
        batcher = Batcher(run, 8, 0.05)
        leaving, staying, early = (asyncio.create_task(batcher.submit(x)) for x in "abc")
        await asyncio.to_thread(started.wait, 5)
        early_answer = await asyncio.wait_for(early, 5)  # while run is still blocked
        leaving.cancel()
        release.set()
        return early_answer, await staying, leaving.cancelled()

    assert asyncio.run(main()) == ("early", "b", True)
    assert seen["gone"] == [True, False, False]


# Each step: (op, adapter) -> expected outcome. acquire outcomes: "hit", "load", "evict:<victim>", "full".
CACHE_TABLE = [
    ("empty cache loads", 2, [("acquire", "a", "load")], ["a"]),
    ("a second acquire is a hit", 2, [("acquire", "a", "load"), ("release", "a", None), ("acquire", "a", "hit")], ["a"]),
    ("the least recently used idle adapter goes",
     2, [("acquire", "a", "load"), ("release", "a", None), ("acquire", "b", "load"), ("release", "b", None),
         ("acquire", "a", "hit"), ("release", "a", None), ("acquire", "c", "evict:b")], ["a", "c"]),
    ("a pinned adapter is never evicted",
     2, [("acquire", "a", "load"), ("acquire", "b", "load"), ("release", "b", None), ("acquire", "c", "evict:b")], ["a", "c"]),
    ("every slot pinned: full, nothing changes",
     1, [("acquire", "a", "load"), ("acquire", "b", "full")], ["a"]),
    ("pinned twice needs two releases",
     1, [("acquire", "a", "load"), ("acquire", "a", "hit"), ("release", "a", None), ("acquire", "b", "full"),
         ("release", "a", None), ("acquire", "b", "evict:a")], ["b"]),
    ("a dropped adapter frees its slot", 1, [("acquire", "a", "load"), ("drop", "a", None), ("acquire", "b", "load")], ["b"]),
    ("release of an unknown adapter is harmless", 1, [("release", "x", None), ("acquire", "a", "load")], ["a"]),
]


@pytest.mark.parametrize("why, capacity, steps, loaded", CACHE_TABLE, ids=[c[0] for c in CACHE_TABLE])
def test_adapter_cache(why, capacity, steps, loaded):
    cache = AdapterCache(capacity)
    for op, adapter, want in steps:
        if op == "acquire":
            try:
                hit, victim = cache.acquire(adapter)
                got = "hit" if hit else (f"evict:{victim}" if victim else "load")
            except CacheFull:
                got = "full"
            assert got == want, f"{why}: acquire({adapter}) gave {got}, want {want}"
        else:
            getattr(cache, op)(adapter)
    assert sorted(cache.loaded()) == sorted(loaded), why


def test_adapter_cache_needs_a_slot():
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        AdapterCache(0)


# pieces fed in order -> what is sent, and whether the stream stopped
STOP_HOLD_TABLE = [
    ("no stops: everything passes", [], ["ab", "cd"], "abcd", False),
    ("a stop inside one piece", ["##"], ["ab##cd"], "ab", True),
    ("a stop split across pieces is never sent", ["END"], ["abE", "N", "Dxyz"], "ab", True),
    ("a false start is released", ["END"], ["abE", "Nx"], "abENx", False),
    ("the earliest of several stops wins", ["c", "b"], ["abc"], "a", True),
    ("held text is flushed at the end", ["END"], ["abEN"], "abEN", False),
    ("an empty stop string is ignored", [""], ["ab"], "ab", False),
]


@pytest.mark.parametrize("why, stops, pieces, sent, stopped", STOP_HOLD_TABLE, ids=[c[0] for c in STOP_HOLD_TABLE])
def test_stop_hold(why, stops, pieces, sent, stopped):
    from lorag.engine import StopHold

    hold = StopHold(stops)
    out = "".join(hold.feed(p) for p in pieces) + hold.flush()
    assert (out, hold.stopped) == (sent, stopped), why


# -- the Engine on a tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model, model_cache):
    """An Engine (no Serve) on the tiny model with two adapters in a local store."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorag.adapters import AdapterStore
    from lorag.config import parse_config
    from lorag.engine import Engine

    root = tmp_path_factory.mktemp("engine")
    cfg = parse_config({"base_model": str(tiny_model), "workdir": str(root), "cache_dir": str(model_cache),
                        "serve": {"max_adapters_per_replica": 1, "max_batch_size": 8, "batch_wait_ms": 50}})
    store = AdapterStore(cfg.adapter_store)
    for name, seed in (("one", 1), ("two", 2)):
        torch.manual_seed(seed)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft.save_pretrained(root / name)
        store.save(name, root / name, {"base_model": cfg.base_model})
    eng = Engine(cfg, str(tiny_model))
    yield eng
    eng.close()


def gather(*calls):
    async def main():
        return await asyncio.gather(*calls, return_exceptions=True)
    return asyncio.run(main())


def test_rows_of_one_batch_end_on_their_own_and_equal_their_solo_runs(engine):
    """A batch mixing the base model and two adapters (one slot: they take turns) gives each row
    what it gives alone, and each row stops at its own max_tokens."""
    from lorag.engine import SamplingParams

    asks = [(None, 3), ("one", 9), ("two", 5), ("one", 1)]
    prompt = [{"role": "user", "content": "Tell me about the warranty."}]
    solo = [gather(engine.generate(prompt, SamplingParams(max_tokens=n), a))[0] for a, n in asks]
    together = gather(*(engine.generate(prompt, SamplingParams(max_tokens=n), a) for a, n in asks))
    assert [c.text for c in together] == [c.text for c in solo]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in solo]
    assert all(c.completion_tokens <= n for (_, n), c in zip(asks, together)), "each row ends at its own max_tokens"
    assert len({c.text for c in solo[:3]}) == 3, "base, one and two answer differently (the adapters are live)"


def test_a_short_row_returns_before_the_long_row_of_its_batch(engine):
    from lorag.engine import SamplingParams

    prompt = "Once upon a time"
    done = {}

    async def timed(name, n):
        out = await engine.generate(prompt, SamplingParams(max_tokens=n, temperature=1.0, top_p=1.0))
        done[name] = time.perf_counter()
        return out

    short, long = gather(timed("short", 2), timed("long", 400))
    assert short.completion_tokens <= 2 and long.completion_tokens > 100, (short, long.completion_tokens)
    assert done["short"] < done["long"], "the short row was answered while the long one was still decoding"


def test_stops_end_the_row_early_and_cut_the_text_streamed_or_not(engine):
    from lorag.engine import Completion, SamplingParams

    prompt = "The capital of France"
    free = gather(engine.generate(prompt, SamplingParams(max_tokens=24)))[0]
    assert len(free.text) > 8, free
    stop = free.text[4:7]
    cut = gather(engine.generate(prompt, SamplingParams(max_tokens=24, stop=(stop,))))[0]
    assert cut.text == free.text[: free.text.index(stop)].strip() and cut.finish_reason == "stop"
    assert cut.completion_tokens < free.completion_tokens, "the row stopped decoding at the stop, not at max_tokens"

    async def streamed():
        return [item async for item in engine.stream(prompt, SamplingParams(max_tokens=24, stop=(stop,)))]

    items = asyncio.run(streamed())
    assert isinstance(items[-1], Completion) and "".join(items[:-1]).strip() == cut.text and stop not in "".join(items[:-1])


def test_engine_errors_are_api_errors(engine):
    from lorag.engine import SamplingParams
    from lorag.schemas import APIError

    ghost, too_long, removed = gather(
        engine.generate("hi", SamplingParams(max_tokens=2), "ghost"),
        engine.generate("hi " * 5000, SamplingParams(max_tokens=2)),
        engine.generate("hi", SamplingParams(max_tokens=2), "one@v9"),
    )
    assert isinstance(ghost, APIError) and ghost.status == 404
    assert isinstance(too_long, APIError) and too_long.status == 400 and too_long.code == "context_length_exceeded"
    assert isinstance(removed, APIError) and removed.status == 404 and "no version v9" in removed.message, removed.message


def test_the_engine_gateway_and_serve_config_builder_import_without_ray():
    """Evaluation, tests and `lorag serve --export` use these without Ray Serve."""
    import subprocess
    import sys

    code = "import sys, lorag.engine, lorag.gateway, lorag.serving, lorag.prompts; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing the serving layers pulled in {out}"
