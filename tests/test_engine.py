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
    from lorag.completion import StopHold

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


# -- failures stay with the rows that caused them ---------------------------------------------------


@pytest.fixture(scope="module")
def fragile(tmp_path_factory, tiny_model):
    """A replica (the Generator deployment's object, no Serve) whose store holds good adapters and
    broken ones, saved with their hashes as they are (so they pass the store's check and fail to
    load), with two adapter slots, and its own node cache (damaged on purpose below)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lorag.adapters import AdapterStore
    from lorag.config import parse_config
    from lorag.deployments import GeneratorDeployment

    root = tmp_path_factory.mktemp("fragile")
    cfg = parse_config({"base_model": str(tiny_model), "workdir": str(root), "cache_dir": str(root / "cache"),
                        "serve": {"max_adapters_per_replica": 2, "max_batch_size": 16, "batch_wait_ms": 50, "request_timeout_s": 1}})
    store = AdapterStore(cfg.adapter_store)
    for name, seed in (("one", 1), ("two", 2), ("huge", 3), ("corrupt", 4), ("flat", 5), ("listed", 6)):
        torch.manual_seed(seed)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft.save_pretrained(root / name)
        weights = load_file(root / name / "adapter_model.safetensors")
        if name == "huge":  # finite, but the model's activations overflow: NaN scores
            save_file({k: v * 1e25 for k, v in weights.items()}, root / name / "adapter_model.safetensors")
        elif name == "corrupt":  # SafetensorError
            (root / name / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header" + b"\x00" * 64)
        elif name == "flat":  # a 1-D LoRA tensor
            key = sorted(k for k in weights if "lora_A" in k)[0]
            save_file({**weights, key: weights[key].flatten()}, root / name / "adapter_model.safetensors")
        elif name == "listed":  # adapter_config.json that is no object
            (root / name / "adapter_config.json").write_text("[]")
        store.save(name, root / name, {"base_model": cfg.base_model})
    replica = GeneratorDeployment.func_or_class(cfg.model_dump(), str(tiny_model))
    yield replica, replica.engine
    replica.engine.close()


PROMPT = [{"role": "user", "content": "Tell me about the warranty."}]


def pins(engine) -> dict:
    """The adapters pinned once the model thread is idle (answers leave before their pass ends)."""
    engine.torch.submit(lambda: None).result(60)
    return {a: n for a, n in engine.cache.entries.items() if n}


def test_an_adapter_that_cannot_be_loaded_fails_alone_frees_its_slot_and_leaks_no_pin(fragile):
    """A corrupt safetensors file, a 1-D LoRA tensor and a config that is no object used to escape
    as SafetensorError/IndexError/AttributeError: every row of the batch got it, the adapter stayed
    pinned, and with both slots pinned the next batch spun forever. Now each is its own request's
    400, co-batched requests are answered as if alone, no pin is left, and the slots still serve."""
    from lorag.engine import Completion, SamplingParams
    from lorag.schemas import APIError

    _, engine = fragile
    p = SamplingParams(max_tokens=4)
    solo = {a: gather(engine.generate(PROMPT, p, a))[0] for a in (None, "one")}

    async def batch():
        return await asyncio.wait_for(asyncio.gather(*(engine.generate(PROMPT, p, a) for a in ("corrupt", "one", "flat", None, "listed")),
                                                     return_exceptions=True), 120)

    for attempt in range(2):  # the second time: answered from the back-off, or tried again; either way alone
        corrupt, one, flat, base, listed = asyncio.run(batch())
        for got, fragment in ((corrupt, "not a readable safetensors file"), (flat, "not a matrix"), (listed, "must hold a JSON object")):
            assert isinstance(got, APIError) and got.status == 400 and got.code == "adapter_unavailable", repr(got)
            assert fragment in got.message and "cannot be loaded" in got.message, got.message
        assert isinstance(one, Completion) and one.text == solo["one"].text, "a co-batched adapter row is answered as if alone"
        assert isinstance(base, Completion) and base.text == solo[None].text, "and so is a base-model row"
        assert pins(engine) == {}, f"no pin outlives its batch: {pins(engine)}"
        assert not {"corrupt@v1", "flat@v1", "listed@v1"} & set(engine.cache.loaded()), "a failed adapter holds no slot"
        assert set(engine.mm.slots) == set(engine.cache.loaded()), "the cache and the model agree on what is loaded"
    two = gather(engine.generate(PROMPT, p, "two"), engine.generate(PROMPT, p, "one"))
    assert all(isinstance(c, Completion) for c in two), two


def test_a_row_whose_scores_turn_nan_fails_alone_and_a_tiny_temperature_is_greedy(fragile):
    """`temperature: 1e-40` used to make torch.multinomial raise for every co-batched request, and
    an overflowing adapter did the same when sampled (or answered garbage when greedy). Now the
    tiny temperature decodes greedily, the overflowing rows get a 500 naming the cause, and every
    other row of their passes is answered as if alone."""
    from lorag.engine import Completion, SamplingParams
    from lorag.schemas import APIError

    _, engine = fragile
    greedy, sampled, tiny = SamplingParams(max_tokens=5), SamplingParams(max_tokens=5, temperature=0.8), SamplingParams(max_tokens=5, temperature=1e-40)
    assert tiny.batch_key(0) == greedy.batch_key(0), "a tiny temperature joins the greedy rows"
    solo = {a: gather(engine.generate(PROMPT, greedy, a))[0].text for a in (None, "one")}
    asks = [("huge", greedy), ("one", greedy), (None, tiny), ("huge", sampled), ("one", sampled), (None, sampled)]

    async def batch():
        return await asyncio.wait_for(asyncio.gather(*(engine.generate(PROMPT, s, a) for a, s in asks), return_exceptions=True), 120)

    got = asyncio.run(batch())
    for i in (0, 3):
        assert isinstance(got[i], APIError) and got[i].status == 500 and got[i].code == "generation_failed", repr(got[i])
        assert "huge@v1" in got[i].message and "NaN or infinite" in got[i].message, got[i].message
    assert [c.text for c in (got[1], got[2])] == [solo["one"], solo[None]], "greedy rows beside the failed one are unchanged"
    assert all(isinstance(c, Completion) and c.completion_tokens > 0 for c in (got[4], got[5])), got[4:]
    assert pins(engine) == {}


def test_a_pass_that_raises_answers_only_its_own_rows(fragile):
    """Rows with other sampling settings run in other passes of the same batch; a pass that raises
    (here sampling settings no HTTP request can send: top_p NaN, which HF's top-p warper refuses)
    answers its own rows with a 500 and the other passes' rows are answered as if alone."""
    from lorag.engine import Completion, SamplingParams
    from lorag.schemas import APIError

    _, engine = fragile
    greedy, broken = SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, temperature=0.7, top_p=float("nan"))
    solo = {a: gather(engine.generate(PROMPT, greedy, a))[0].text for a in (None, "one")}

    async def batch():
        return await asyncio.wait_for(asyncio.gather(engine.generate(PROMPT, broken, "one"), engine.generate(PROMPT, greedy, "one"),
                                                     engine.generate(PROMPT, broken), engine.generate(PROMPT, greedy), return_exceptions=True), 120)

    bad_one, one, bad_base, base = asyncio.run(batch())
    for bad in (bad_one, bad_base):
        assert isinstance(bad, APIError) and bad.status == 500 and bad.code == "generation_failed" and "top_p=nan" in bad.message, repr(bad)
    assert isinstance(one, Completion) and isinstance(base, Completion) and [one.text, base.text] == [solo["one"], solo[None]]
    assert pins(engine) == {}


def test_a_failed_adapter_load_is_answered_at_once_during_its_back_off_then_tried_again(fragile, monkeypatch):
    """A failure that passes (here the node's copy of an adapter, damaged and then repaired) is
    not retried on every request: within the back-off its requests get the error at once, and
    after it the adapter loads and answers."""
    from lorag.engine import Completion, SamplingParams
    from lorag.schemas import APIError

    _, engine = fragile
    monkeypatch.setattr(engine, "LOAD_RETRY_S", 6.0)
    p = SamplingParams(max_tokens=3)
    canonical, path = asyncio.run(engine.prepare_adapter("two@v1"))

    def evict():  # on the model thread, between batches: out of the slots, so the next request loads it from its files
        for name in engine.cache.loaded():
            engine.cache.drop(name)
            engine.mm.unload(name)

    engine.torch.submit(evict).result(60)
    weights = path / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\x00" * 16)
    start = time.monotonic()
    try:
        first = gather(engine.generate("hi", p, canonical))[0]
    finally:
        weights.write_bytes(good)
    assert isinstance(first, APIError) and first.status == 400 and "not a readable safetensors file" in first.message, repr(first)
    again = gather(engine.generate("hi", p, canonical))[0]
    assert again is first, "within the back-off the same error, without loading again"
    deadline = start + 60
    while time.monotonic() < deadline:
        out = gather(engine.generate("hi", p, canonical))[0]
        if isinstance(out, Completion):
            break
        time.sleep(0.5)
    assert isinstance(out, Completion), f"the adapter loads once the back-off has passed: {out!r}"
    assert time.monotonic() - start >= engine.LOAD_RETRY_S, "not before the back-off"


def test_the_health_check_fails_while_requests_wait_on_a_stalled_model_thread(fragile):
    """Serve's health check of a replica (`check_health`) passes while it makes progress and fails
    when its model thread stops (a hung device, a wedged loop) while requests wait, so Serve
    replaces a replica on which every request would time out."""
    from lorag.engine import Completion, SamplingParams

    replica, engine = fragile
    replica.check_health()
    gate = threading.Event()
    engine.torch.submit(gate.wait, 120)  # the model thread hangs

    async def main():
        request = asyncio.ensure_future(engine.generate("hi", SamplingParams(max_tokens=2)))
        error = None
        try:
            await asyncio.sleep(0.05)
            replica.check_health()  # waiting for only a moment: healthy
            for _ in range(600):
                try:
                    replica.check_health()
                except RuntimeError as e:
                    error = e
                    break
                await asyncio.sleep(0.05)
        finally:
            gate.set()
        return error, await asyncio.wait_for(request, 60)

    error, out = asyncio.run(main())
    assert error is not None and "no progress" in str(error) and "1 requests wait" in str(error) and "serve.request_timeout_s" in str(error), error
    assert isinstance(out, Completion), "the request is answered once the thread moves again"
    replica.check_health()
