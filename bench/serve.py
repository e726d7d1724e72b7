"""Serving benchmarks for batched multi-LoRA, measured as ratios within one run (see docs/benchmarks.md).

    .venv/bin/python bench/serve.py                          # bundled SmolLM2-135M, CPU, ~12 min on 2 cores
    .venv/bin/python bench/serve.py --rounds 1 --new-tokens 8  # smoke run
    python bench/serve.py --device cuda --random-1b --skip-http  # on a GPU: a random ~1.1B Llama in bfloat16

1. A mixed batch of 4 adapters in one forward pass vs the base model: generated tokens/s, for
   adapters of the shape `lorag finetune` trains by default (lorag.config.LoraConfig: rank 8 on
   q/k/v/o) and for heavy ones (rank 16 on q/k/v/o/gate/up/down).          goal >= 0.9x
   For comparison: peft's own mixed batch (`generate(adapter_names=...)`), and decoding with
   lorag.multilora's "segments" strategy instead of "dense".
   Also: the time of one prefill and one decode-step forward, base vs the mixed batch.
2. One adapter for the whole batch vs the base model (and peft with that adapter active).
                                                                            goal >= 0.95x
3. Cold load of a rank-16 adapter from disk into a slot (median of 10).     goal < 100 ms
   Also: merging it into the weights (what a one-adapter batch pays when its adapter changes).
4. 1 vs 8 vs 32 distinct adapters in a batch of 32, vs the base model (and 8 decoded with
   "segments" instead of "dense"; 32 distinct decode with "segments").
5. The HTTP endpoint vs in-process generation at the same batch: `--batch` concurrent chat
   requests for one adapter through the official `openai` client to `lorag serve`'s app (Ray
   Serve on a local Ray, proxy -> Gateway -> Generator replica, one replica with --threads CPUs),
   vs the replica's own engine (`lorag.engine.Engine.generate`, the same batching, tokenizing
   included) called in this process on the same prompts: completion tokens/s.                         goal >= 0.9x

All variants generate the same prompts (quickstart questions in the chat template, left-padded)
with exactly `--new-tokens` greedy tokens each (lorag's rows sorted by adapter, as
`generate_batch` sorts them; the time includes `set_batch`), and are timed in interleaved rounds so machine
noise hits them alike; each ratio is the median over rounds of (variant / base in the same round).
Adapters are random (rank 16 on all 7 projections unless said otherwise, alpha 2 x rank):
throughput does not depend on what they learned. The batched model's slots are sized as a replica
sizes them with the default serve config (rank `max_lora_rank` = 64, so rank-8 and rank-16 adapters
are zero-padded in their slots, as they are in `lorag serve`).
In 5, the replica waits up to --batch-wait-ms for a batch to fill (the `serve.batch_wait_ms` setting).
6. Structured output: the mixed batch of 8 (4 adapters) where half the rows follow a JSON schema
   (two different schemas, lorag.grammar's per-row masks) vs the same batch with no schema, through
   `lorag.generation.generate_batch` (the engine's own call): generated tokens/s.   goal >= 0.8x
   The schemas need long strings (minLength 1000), so every row decodes exactly --new-tokens tokens
   in both variants; `--only-structured` runs just this comparison.
"""

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "examples" / "quickstart" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapters(model, root: Path, count: int, rank: int, targets=TARGETS, prefix: str = "adapter") -> list[Path]:
    """`count` random PEFT adapter directories (safetensors + adapter_config.json) for `model`."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    linears = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets and isinstance(m, torch.nn.Linear)}
    paths = []
    for k in range(count):
        tensors = {}
        for name, lin in linears.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=gen) / lin.in_features**0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=gen) * 0.01
        path = root / f"{prefix}{k}"
        path.mkdir()
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "base_model_name_or_path": "smollm2-135m-instruct",
        }))
        paths.append(path)
    return paths


def random_llama(root: Path) -> Path:
    """A random-weight Llama of about 1.1B parameters (SmolLM2's vocabulary and shape family:
    2048 wide, 16 layers, 32 heads / 8 KV heads, MLP 8192), saved in bfloat16 under `root`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "llama-1b")
    return root / "llama-1b"


def prompts(tok, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` chat prompts, left-padded: (input_ids, attention_mask); without a tokenizer, random 41-token prompts."""
    if tok is None:
        return torch.randint(3, 49152, (n, 41), generator=torch.Generator().manual_seed(0)), torch.ones(n, 41, dtype=torch.long)
    questions = [json.loads(line)["prompt"] for line in QUESTIONS.read_text().splitlines() if line.strip()]
    ids = [tok.apply_chat_template([{"role": "user", "content": questions[i % len(questions)]}], add_generation_prompt=True) for i in range(n)]
    ids = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in ids]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + list(x) for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return input_ids, mask


def synchronize(device: torch.device | str) -> None:
    """Wait for the GPU's queued work, so a timer stops when the work is done (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, batch, new_tokens: int, **kw) -> None:
    """Generate exactly `new_tokens` greedy tokens for every row."""
    device = next(model.parameters()).device
    input_ids, mask = (t.to(device) for t in batch)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=2, **kw)
    synchronize(device)
    assert out.shape[1] == input_ids.shape[1] + new_tokens, out.shape


def clocked(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call of `fn`."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def rounds(variants: dict, rounds: int) -> dict[str, dict[str, float]]:
    """Run every variant once per round, in a rotating order.

    Per variant: median wall seconds, and the median over rounds of its speed relative to 'base' in
    the same round, by wall time ("ratio") and by this process's CPU time ("cpu_ratio"). On a
    shared machine the CPU-time ratio is the steadier one: time spent descheduled does not count.
    """
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            times[n].append(clocked(variants[n]))
    base = times["base"]
    return {n: {"s": statistics.median(w for w, _ in t),
                "ratio": statistics.median(b[0] / x[0] for b, x in zip(base, t)),
                "cpu_ratio": statistics.median(b[1] / x[1] for b, x in zip(base, t))} for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved repeats per comparison (half as many, at least 2, for 4)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per row")
    ap.add_argument("--batch", type=int, default=8, help="rows in the batch for comparisons 1 and 2")
    ap.add_argument("--big-batch", type=int, default=32, help="rows in the batch for comparison 4")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--skip-big", action="store_true", help="skip comparison 4")
    ap.add_argument("--skip-http", action="store_true", help="skip comparison 5")
    ap.add_argument("--batch-wait-ms", type=float, default=50, help="the replica's batch_wait_ms in comparison 5")
    ap.add_argument("--device", default="cpu", help="cpu (float32), or cuda (bfloat16; comparison 5 needs Ray and is skipped)")
    ap.add_argument("--random-1b", action="store_true", help="a random-weight ~1.1B Llama (see random_llama) instead of SmolLM2-135M, with random prompts")
    ap.add_argument("--only-structured", action="store_true", help="run comparison 6 only")
    args = ap.parse_args()
    args.skip_http = args.skip_http or args.device != "cpu"
    torch.set_num_threads(args.threads)

    from peft import PeftModel

    from lorag.models import load_causal_lm, load_tokenizer, resolve_model
    from lorag.lora_weights import LoraWeights
    from lorag.multilora import MultiLoraModel
    from lorag.sections import LoraConfig, ServeConfig

    tmp = tempfile.TemporaryDirectory(prefix="lorag-bench-serve-")
    if args.random_1b:
        path, tok, name = random_llama(Path(tmp.name)), None, "random Llama-1.1B"
    else:
        path = resolve_model("smollm2-135m-instruct", Path.home() / ".cache" / "lorag")
        tok, name = load_tokenizer(path), "SmolLM2-135M"
    dtype = "float32" if args.device == "cpu" else "bfloat16"

    def load():
        return load_causal_lm(path, dtype).to(args.device)

    base = load()
    n_adapters = 1 if args.skip_big else args.big_batch
    t0 = time.perf_counter()
    dirs = write_adapters(base, Path(tmp.name), max(4, n_adapters), rank=16)
    shape = LoraConfig()  # what `lorag finetune` trains unless told otherwise
    default_dirs = write_adapters(base, Path(tmp.name), 4, rank=shape.r, targets=shape.target_modules, prefix="default")
    print(f"bench/serve.py: {name} {dtype} on {args.device}, {args.threads} threads, batch {args.batch}, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds ({len(dirs)} random rank-16 and 4 rank-{shape.r} adapters written in {time.perf_counter() - t0:.1f}s)", flush=True)

    replica = ServeConfig()  # a replica's slots: max_adapters_per_replica, each of rank max_lora_rank (more here for comparison 4)
    mm = MultiLoraModel(load(), max_adapters=max(replica.max_adapters_per_replica, len(dirs) + 4),
                        max_rank=replica.max_lora_rank)
    slots = [mm.load(f"a{k}", LoraWeights.load(d)) for k, d in enumerate(dirs)]
    default_slots = [mm.load(f"d{k}", LoraWeights.load(d)) for k, d in enumerate(default_dirs)]
    peft = PeftModel.from_pretrained(load(), str(dirs[0]), adapter_name="a0")
    for k in range(1, 4):
        peft.load_adapter(str(dirs[k]), adapter_name=f"a{k}")
    peft.eval()

    # -- 1 and 2: batch of 8 ------------------------------------------------------------------
    batch = prompts(tok, args.batch)
    mixed = [slots[i % 4] for i in range(args.batch)]  # rows interleave the 4 adapters, as requests arrive
    structured = structured_vs_free(mm, tok or load_tokenizer(resolve_model("smollm2-135m-instruct", Path.home() / ".cache" / "lorag")),
                                    batch, mixed, args.new_tokens, args.rounds)
    print(json.dumps({"structured": structured}, indent=2), flush=True)
    if args.only_structured:
        print(f"\n| {args.batch} rows, 4 adapters, half with a JSON schema vs none | **{structured['ratio']:.2f}x** "
              f"({structured['tok_s']:.0f} vs {structured['free_tok_s']:.0f} tok/s) | {structured['cpu_ratio']:.2f}x | >= 0.8x |")
        return

    def ours(rows, strategy="auto"):
        def run():
            mm.strategy = strategy
            with mm.rows(sorted(rows)):
                timed_generate(mm.model, batch, args.new_tokens)
        return run

    variants = {
        "base": lambda: timed_generate(base, batch, args.new_tokens),
        "mixed4_default": ours([default_slots[i % 4] for i in range(args.batch)]),
        "mixed4": ours(mixed),
        "mixed4_segments": ours(mixed, "segments"),
        "peft_mixed4": lambda: timed_generate(peft, batch, args.new_tokens, adapter_names=[f"a{slots.index(s)}" for s in mixed]),
        "single": ours([slots[0]] * args.batch),
        "peft_single": lambda: timed_generate(peft, batch, args.new_tokens),  # peft's active adapter: a0
    }
    # warm-up: first calls pay allocator and kernel-selection costs
    for model in (base, peft):
        timed_generate(model, batch, 2)
    for rows in (sorted(mixed), [slots[0]] * args.batch):  # and the merged copy's first allocation
        with mm.rows(rows):
            timed_generate(mm.model, batch, 2)
    small = rounds(variants, args.rounds)
    print(json.dumps(small, indent=2), flush=True)
    steps = step_times(base, mm, batch, sorted(mixed))
    print(json.dumps({"step_ms": steps}), flush=True)

    # -- 3: cold load --------------------------------------------------------------------------
    mm.unload("a0")
    loads, reads = [], []
    for _ in range(10):
        t = time.perf_counter()
        w = LoraWeights.load(dirs[0])
        reads.append(time.perf_counter() - t)
        mm.load("a0", w)
        synchronize(args.device)
        loads.append(time.perf_counter() - t)
        mm.unload("a0")
    mm.load("a0", dirs[0])
    merges = []  # what the first one-adapter batch after an adapter change also pays: W + BA into the merged copies
    for _ in range(10):
        for layer in mm.layers.values():
            layer.merged_slot = None
        t = time.perf_counter()
        mm.set_batch([mm.slots["a0"]] * args.batch)
        synchronize(args.device)
        merges.append(time.perf_counter() - t)
        mm.set_batch(None)
    cold = {"median_ms": 1000 * statistics.median(loads), "read_ms": 1000 * statistics.median(reads), "merge_ms": 1000 * statistics.median(merges),
            "mb": dirs[0].joinpath("adapter_model.safetensors").stat().st_size / 2**20}
    print(json.dumps({"cold_load": cold}), flush=True)

    # -- 4: batch of 32 with 1, 8, 32 distinct adapters ------------------------------------------
    big = None
    if not args.skip_big:
        batch = prompts(tok, args.big_batch)
        n = args.big_batch
        variants = {"base": lambda: timed_generate(base, batch, args.new_tokens)}
        for k in (1, 8, 32):
            if k <= n:
                variants[f"distinct{k}"] = ours([slots[i % k] for i in range(n)])
        variants["distinct8_segments"] = ours([slots[i % 8] for i in range(n)], "segments")
        big = rounds(variants, max(2, args.rounds // 2))
        print(json.dumps(big, indent=2), flush=True)

    # -- 5: HTTP endpoint vs in-process ----------------------------------------------------------
    http = None
    if not args.skip_http:
        del peft, base  # the replica loads its own copy
        http = http_vs_inprocess(args, dirs[0])
        print(json.dumps(http, indent=2), flush=True)

    # -- table -----------------------------------------------------------------------------------
    def row(label: str, r: dict, rows: int, goal: str = "-") -> None:
        tok_s = rows * args.new_tokens / r["s"]
        bold = "**" if goal != "-" else ""
        print(f"| {label} | {bold}{r['ratio']:.2f}x{bold} ({tok_s:.0f} tok/s) | {r['cpu_ratio']:.2f}x | {goal} |")

    print("\n| measurement | tokens/s vs base, wall clock | same, by CPU time | goal |")
    print("| --- | --- | --- | --- |")
    row(f"base model, batch {args.batch}", small["base"], args.batch)
    row(f"mixed batch of 4 default-shape adapters (rank {shape.r} on {'/'.join(m.removesuffix('_proj') for m in shape.target_modules)}; "
        f"{args.batch // 4} rows each)", small["mixed4_default"], args.batch, ">= 0.9x")
    row(f"mixed batch of 4 heavy adapters (rank 16 on all 7 projections; {args.batch // 4} rows each)", small["mixed4"], args.batch, ">= 0.9x")
    row("same batch, decoded with strategy segments instead of dense", small["mixed4_segments"], args.batch)
    row("same batch through peft `generate(adapter_names=...)`", small["peft_mixed4"], args.batch)
    row("one adapter for the whole batch", small["single"], args.batch, ">= 0.95x")
    row("same, through peft (one active adapter)", small["peft_single"], args.batch)
    if big:
        row(f"base model, batch {args.big_batch}", big["base"], args.big_batch)
        for k in (1, 8, 32):
            if f"distinct{k}" in big:
                row(f"{k} distinct adapter(s) in a batch of {args.big_batch}", big[f"distinct{k}"], args.big_batch)
        row("8 distinct, decoded with strategy segments instead of dense", big["distinct8_segments"], args.big_batch)
    if http:
        print(f"| {args.batch} concurrent requests over HTTP (openai client -> Ray Serve) vs the replica's batch code in-process "
              f"({http['inprocess_tok_s']:.0f} tok/s) | **{http['ratio']:.2f}x** ({http['http_tok_s']:.0f} tok/s) | - | >= 0.9x |")
    print("\nOne forward of the batch of 8, median ms (prefill: the whole prompt; decode: one token a row after it):")
    for name, t in steps.items():
        print(f"  {name}: prefill {t['prefill']:.0f} ms, decode step {t['decode']:.1f} ms")
    print(f"\ncold load of a rank-16 adapter ({cold['mb']:.1f} MB safetensors) from disk into a slot, median of 10: "
          f"**{cold['median_ms']:.0f} ms** (of which reading the file {cold['read_ms']:.0f} ms); goal < 100 ms. "
          f"Merging it into the weights for a one-adapter batch: {cold['merge_ms']:.0f} ms, once per adapter change")


def structured_vs_free(mm, tok, batch, slots: list[int], new_tokens: int, n_rounds: int) -> dict[str, float]:
    """Comparison 6: the batch with a JSON schema on every other row (two schemas) vs no schema, tokens/s."""
    from lorag.generation import generate_batch
    from lorag.grammar import Grammars

    grammars = Grammars(tok)
    grammars.warm()
    long_text = {"type": "string", "minLength": 1000}  # no row can finish its JSON within new_tokens: all rows decode new_tokens
    schemas = [{"type": "object", "properties": {"answer": long_text, "sources": {"type": "array", "items": {"type": "integer"}}}, "required": ["answer"]},
               {"type": "object", "properties": {"steps": {"type": "array", "items": long_text, "minItems": 1}}, "required": ["steps"]}]
    compiled = [grammars.compile({"type": "json_schema", "json_schema": {"schema": s}}) for s in schemas]
    ids, mask = batch
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    never = [len(tok) - 1]  # no end-of-sequence token: every row decodes exactly new_tokens (asserted)
    made: list[int] = []

    def run(constrained: bool):
        def go():
            matchers = [grammars.matcher(compiled[(i // 2) % 2]) if constrained and i % 2 == 0 else None for i in range(len(rows))]
            out = generate_batch(mm, rows, slots, max_new_tokens=new_tokens, pad_id=tok.pad_token_id, eos_ids=never,
                                 grammars=matchers if constrained else None, grammar_vocab=grammars.vocab)
            made.append(sum(map(len, out)))
            assert made[-1] == len(rows) * new_tokens, made[-1]
            if constrained:
                text = tok.decode(out[0])
                assert text.startswith('{"answer":"'), text
        return go

    run(True)(), run(False)()  # warm-up
    r = rounds({"base": run(False), "structured": run(True)}, n_rounds)
    tokens = len(rows) * new_tokens
    return {"ratio": r["structured"]["ratio"], "cpu_ratio": r["structured"]["cpu_ratio"], "tok_s": tokens / r["structured"]["s"],
            "free_tok_s": tokens / r["base"]["s"]}


def step_times(base, mm, batch, mixed: list[int], repeats: int = 5) -> dict[str, dict[str, float]]:
    """Median ms of one prefill forward and one decode-step forward: base, mixed dense, mixed segments."""
    device = next(base.parameters()).device
    input_ids, mask = (t.to(device) for t in batch)
    step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)

    def measure(model) -> tuple[float, float]:
        with torch.inference_mode():
            synchronize(device)
            t = time.perf_counter()
            out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
            synchronize(device)
            prefill = time.perf_counter() - t
            cache = out.past_key_values
            t = time.perf_counter()
            model(input_ids=input_ids[:, -1:], attention_mask=step_mask, past_key_values=cache, use_cache=True)
            synchronize(device)
            return prefill, time.perf_counter() - t

    times: dict[str, list[tuple[float, float]]] = {"base": [], "mixed4 dense": [], "mixed4 segments": []}
    for _ in range(repeats):
        for name in times:
            model = base if name == "base" else mm.model
            mm.strategy = name.split()[-1] if name != "base" else "auto"
            with mm.rows(mixed) if name != "base" else contextlib.nullcontext():
                times[name].append(measure(model))
    mm.strategy = "auto"
    return {n: {"prefill": 1000 * statistics.median(p for p, _ in t), "decode": 1000 * statistics.median(d for _, d in t)} for n, t in times.items()}


def http_vs_inprocess(args, adapter_dir: Path) -> dict[str, float]:
    """Comparison 5: `args.batch` concurrent chat requests over HTTP vs the same `Engine` in this process."""
    import asyncio

    import concurrent.futures
    import openai
    import ray
    import yaml
    from ray import serve

    from lorag.adapters import AdapterStore
    from lorag.config import load_config
    from lorag.standalone import _free_ports  # the free-loopback-port helper local_server uses
    from lorag.engine import Engine, SamplingParams
    from lorag.serving import build_app

    questions = [json.loads(line)["prompt"] for line in QUESTIONS.read_text().splitlines() if line.strip()]
    messages = [[{"role": "user", "content": questions[i % len(questions)]}] for i in range(args.batch)]
    root = Path(tempfile.mkdtemp(prefix="lorag-bench-http-"))
    port = _free_ports(1)[0]
    (root / "lorag.yaml").write_text(yaml.safe_dump({
        "base_model": "smollm2-135m-instruct", "workdir": "work",
        "adapters": [{"name": "bench", "dataset": "unused.jsonl"}],
        "serve": {"port": port, "host": "127.0.0.1", "replicas": 1, "cpus_per_replica": args.threads, "max_batch_size": args.batch,
                  "batch_wait_ms": args.batch_wait_ms, "max_ongoing_requests": 2 * args.batch, "max_tokens": args.new_tokens},
    }))
    cfg = load_config(root / "lorag.yaml")
    AdapterStore(cfg.adapter_store).save("bench", adapter_dir, {"base_model": cfg.base_model})

    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="lorag", route_prefix="/")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    pool = concurrent.futures.ThreadPoolExecutor(args.batch)

    def over_http() -> int:
        def one(m):
            return client.chat.completions.create(model="bench", messages=m, max_tokens=args.new_tokens, temperature=0).usage.completion_tokens
        return sum(pool.map(one, messages))

    engine = Engine(cfg, "smollm2-135m-instruct")
    params = SamplingParams(max_tokens=args.new_tokens)

    def in_process() -> int:  # concurrent calls into the engine a replica runs, batched as it batches them
        async def run():
            return await asyncio.gather(*(engine.generate(m, params, "bench") for m in messages))
        return sum(c.completion_tokens for c in asyncio.run(run()))

    for fn in (over_http, in_process):  # warm-up: adapter load, first batch
        fn()
    times: dict[str, list[float]] = {"http": [], "inprocess": []}
    tokens: dict[str, list[int]] = {"http": [], "inprocess": []}
    for r in range(max(2, args.rounds)):
        for name, fn in sorted({"http": over_http, "inprocess": in_process}.items(), reverse=bool(r % 2)):
            t = time.perf_counter()
            tokens[name].append(fn())
            times[name].append(time.perf_counter() - t)
    serve.shutdown()
    ray.shutdown()
    rate = {n: [k / t for k, t in zip(tokens[n], times[n])] for n in times}
    return {"http_tok_s": statistics.median(rate["http"]), "inprocess_tok_s": statistics.median(rate["inprocess"]),
            "ratio": statistics.median(h / i for h, i in zip(rate["http"], rate["inprocess"])),
            "tokens_http": tokens["http"], "tokens_inprocess": tokens["inprocess"]}


if __name__ == "__main__":
    main()
