"""LoRA (or full) fine-tuning on Ray Train with DeepSpeed, resumable, into the adapter store.

`train_adapter` is the entry point. Before anything starts it checks that every path the run needs
is reachable from every node, validates the dataset, splits off a validation set, resolves the
base model on the driver (and, for a model directory only the driver has, publishes it to the
storage URI) and, for an adapter bound to a knowledge base, wraps every question in its retrieved
sources. Then a `TorchTrainer` runs `train_loop` on every worker: each resolves the base model into
its own node's cache and wraps it in a peft LoRA model under a DeepSpeed ZeRO engine. Every
`checkpoint_every` steps the ranks save the training state (`lorag.checkpoint`: safetensors and
JSON, verified on load, never unpickled) through `ray.train.report` into `storage_path` (a local
dir or a URI); a worker that dies is restarted by Ray Train (`FailureConfig`) and the run resumes
from the latest checkpoint (weights, optimizer, scheduler, RNG, data position, loss history). The
final checkpoint holds the PEFT adapter, which is copied into a new, immutable version in the
adapter store with its provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorag.config import ConfigError
from lorag.data import IGNORE_INDEX, DatasetError, Encoded, dataset_hash, encode_example, load_examples, split_examples
from lorag.routing import training_questions

STATE_DIR = "state"  # the training state (lorag.checkpoint: safetensors + JSON) inside each Ray Train checkpoint
EXPORT_DIR = "export"  # the adapter (PEFT) or full model, in the final checkpoint


@dataclass
class TrainResult:
    adapter: str
    version: int
    path: str  # the version's location in the adapter store (a local path or a URI)
    metrics: dict[str, Any] = field(default_factory=dict)


def train_adapter(cfg, name: str) -> TrainResult:
    """Train adapter `name` from `cfg` on Ray Train and save it to the adapter store.

    Ray must be initialised by the caller (locally or on a cluster).

    Returns:
        Where the new adapter version lives and its final metrics.

    Raises:
        KeyError: no such adapter in the config.
        DatasetError: the dataset is missing or malformed (checked before any worker starts).
        ConfigError: the deepspeed_config file is missing or not a JSON object.
        LookupError: the adapter trains with retrieval but its knowledge base is not ingested.
        RuntimeError: the training run failed.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lorag.adapters import AdapterStore
    from lorag.config import dump_config
    from lorag.models import node_ref, resolve_model
    from lorag.storage import check_cluster_paths

    ad = cfg.adapter(name)
    t = ad.train
    retrieval = ad.knowledge_base is not None and (t.with_retrieval or t.raft is not None)
    check_cluster_paths(cfg, [ad.knowledge_base] if retrieval else [], artifacts=True)
    examples = load_examples(ad.dataset)
    train_set, val_set = split_examples(examples, t.val_fraction, t.seed)
    if len(train_set) < t.num_workers:
        raise DatasetError(f"{ad.dataset}: {len(train_set)} training example(s) for {t.num_workers} workers; each worker needs at least one")
    ds_override = _read_deepspeed_json(t.deepspeed_config) if t.deepspeed_config else {}
    model_path = resolve_model(cfg.base_model, cfg.model_cache)
    if retrieval:  # one pass over all examples; the seeded split then picks the same partition
        train_set, val_set = split_examples(with_retrieved_sources(cfg, ad, examples), t.val_fraction, t.seed)

    storage = t.storage_path or cfg.train_storage
    run_name = f"{name}-{run_key(ad, model_path, train_set, val_set, ds_override)}"
    if not t.resume:
        forget_run(storage, run_name)
    start = time.time()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "adapter": name,
            # Workers may run on other nodes: they resolve the model into their own node's cache.
            "model_ref": node_ref(cfg.base_model, cfg.storage_root, cfg.model_cache),
            "train": train_set,
            "val": val_set,
            "deepspeed_override": ds_override,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
            placement_strategy=t.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,  # the same adapter, data and settings always map to the same run, so a re-run resumes it
            storage_path=storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                **({"checkpoint_score_attribute": "val_loss", "checkpoint_score_order": "min"} if val_set else {}),
            ),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"training adapter {name!r} failed: {e}") from e
    if result.checkpoint is None:
        raise RuntimeError(f"training adapter {name!r} finished without saving a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        report = json.loads((Path(ckpt) / "train_report.json").read_text())
        if not (Path(ckpt) / EXPORT_DIR).is_dir():
            raise RuntimeError(f"the latest checkpoint of {name!r} holds no exported model: {ckpt}")
        metadata = {
            "method": ad.method,
            "base_model": cfg.base_model,
            "base_model_path": str(model_path),
            "base_model_sha256": weights_hash(model_path, cfg.model_cache),
            "knowledge_base": ad.knowledge_base,
            "system_prompt": ad.system_prompt,
            "description": ad.description,
            "answer_style": ad.answer_style,
            "questions": training_questions(examples),  # `model: "auto"` routes by them (lorag.routing)
            "dataset": ad.dataset,
            "dataset_sha256": dataset_hash(ad.dataset),
            "examples": {"train": len(train_set), "val": len(val_set)},
            "trained_with_retrieval": retrieval,
            "raft": t.raft.model_dump() if t.raft and retrieval else None,
            "metrics": report,
            "wall_time_s": round(time.time() - start, 1),
            "lorag_version": _lorag_version(),
        }
        location = AdapterStore(cfg.adapter_store).save(name, Path(ckpt) / EXPORT_DIR, metadata, config_yaml=dump_config(cfg))
    # The adapter is safe in the store: the run is finished, so the next run of the same config trains anew.
    forget_run(storage, run_name)
    return TrainResult(name, int(location.rstrip("/").rsplit("/", 1)[-1][1:]), location, report)


def run_key(ad, model_path: Path, train_set: list, val_set: list, ds_override: dict) -> str:
    """A short hash of everything that shapes a training run: adapter settings, base model, the
    prepared examples and any DeepSpeed override. Equal keys mean a re-run may resume the run."""
    settings = ad.model_dump(mode="json", exclude={"train": {"resume", "log_every", "max_failures", "storage_path"}})
    blob = json.dumps([settings, str(model_path), train_set, val_set, ds_override], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def forget_run(storage: str, run_name: str) -> None:
    """Delete a run's Ray Train folder (checkpoints, snapshot) from local disk or a pyarrow filesystem."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else str(Path(storage).resolve()))
    run = f"{root.rstrip('/')}/{run_name}"
    if fs.get_file_info(run).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(run)


def with_retrieved_sources(cfg, ad, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wrap each example's question in its knowledge base's top-k passages, as serving will.

    Training on the same prompt shape the adapter sees at inference teaches it to answer from
    (and cite) the sources instead of guessing.

    Raises:
        LookupError: the knowledge base has not been ingested.
    """
    from lorag.embed import Embedder
    from lorag.milvus import open_store
    from lorag.models import resolve_model
    from lorag.prompts import augment, question

    if not examples:
        return []
    kb = cfg.knowledge_base(ad.knowledge_base)
    raft = ad.train.raft
    store = open_store(cfg.milvus_uri(kb), kb.token)
    embedder = Embedder(resolve_model(cfg.embedder, cfg.model_cache))
    questions = [question(ex["messages"]) for ex in examples]
    # RAFT needs the oracle and distractors from other documents: search deeper, without the per-document cap.
    k, ranking = (4 * (raft.distractors + 2), {**kb.ranking_options(), "max_per_source": None}) if raft else (kb.top_k, kb.ranking_options())
    found = [store.search(kb.collection, vector.tolist(), q, k, kb.search, None, ranking) for q, vector in zip(questions, embedder.embed(questions))]
    if raft:
        return [ex for ex, _ in raft_examples(examples, found, raft.distractors, raft.oracle_fraction, raft.cite, ad.train.seed)]
    return [{"messages": [*augment(ex["messages"][:-1], hits), ex["messages"][-1]]} for ex, hits in zip(examples, found)]


GROUNDED = 0.5  # share of a sentence's terms a passage must hold to be cited as its source
CLAIM_TERMS = 3  # sentences with fewer terms ("Just ask.") support nothing, unless the answer has no longer one
_SENTENCE = re.compile(r"((?<=[.!?])\s+)")  # split keeping the spaces between sentences


def support(answer: str, hit: dict[str, Any]) -> tuple[float, int]:
    """How well a passage supports an answer: the largest share of one sentence's distinct terms
    (`lorag.retrieval.analyze`) that occur in the passage's heading path and text, and that
    sentence's index (in `_SENTENCE.split(answer)[::2]`). Sentences are judged one by one so a
    house style's greeting or sign-off does not hide the claim; sentences of fewer than
    `CLAIM_TERMS` terms count only when no sentence is longer. On the quickstart's training set a
    supporting passage holds 0.5-1.0 of its claim, a passage that misses 0.0-0.35."""
    from lorag.retrieval import analyze

    passage = set(analyze(f"{hit.get('section', '')} {hit['text']}"))
    terms = [set(analyze(sentence)) for sentence in _SENTENCE.split(answer)[::2]]
    floor = CLAIM_TERMS if any(len(t) >= CLAIM_TERMS for t in terms) else 1
    shares = [(len(t & passage) / len(t), -i) for i, t in enumerate(terms) if len(t) >= floor]
    share, at = max(shares, default=(0.0, 0))
    return share, -at


def cite_inline(answer: str, sentence: int, n: int) -> str:
    """`answer` with `[n]` after its `sentence`-th sentence, before the final stop ("... 39 months
    [2]. Anything else?"): citing right after the claim, not after a sign-off, teaches the model
    to cite while it states the fact rather than as an afterthought it learns to stop before."""
    parts = _SENTENCE.split(answer)  # sentence, space, sentence, ...
    claim = parts[2 * sentence].rstrip()
    end = len(claim) if claim.endswith("...") else len(claim.rstrip(".!?"))
    parts[2 * sentence] = f"{claim[:end]} [{n}]{parts[2 * sentence][end:]}"
    return "".join(parts)


def raft_examples(examples: list[dict[str, Any]], found: list[list[dict[str, Any]]], distractors: int, oracle_fraction: float,
                  cite: bool, seed: int) -> list[tuple[dict[str, Any], int | None]]:
    """RAFT-style training examples (Zhang et al. 2024): each question's prompt holds its oracle
    passage among `distractors` passages from other documents, in a seeded random order; exactly
    round(oracle_fraction * n) examples, chosen at random, hold the oracle, the others one more
    distractor in its place (so the adapter also learns to answer when the sources miss).

    The oracle is the search hit that supports the example's answer best (`support`, at least
    `GROUNDED`; the first such on a tie), else its top hit: the search ranks by the question, but
    the passage that holds the answer is what the adapter must learn to find. With `cite`, an
    answer whose prompt holds a supporting oracle cites it as [n] after the sentence it supports
    (`cite_inline`); an answer from general knowledge cites nothing.

    Args:
        examples: `{"messages": [...]}` records ending with the assistant's answer.
        found: per example, its search hits best first (deep enough for the distractors).

    Returns:
        (the example as trained on, the oracle's 1-based position in its sources or None).
    """
    from lorag.prompts import augment

    rnd = random.Random(seed)
    n_oracle = round(oracle_fraction * len(examples))
    with_oracle = set(rnd.sample(range(len(examples)), n_oracle))
    out = []
    for i, (ex, hits) in enumerate(zip(examples, found)):
        if not hits:
            out.append((ex, None))
            continue
        answer = ex["messages"][-1]
        supports = [support(answer["content"], h) for h in hits]
        best = max(range(len(hits)), key=lambda j: (supports[j][0], -j))
        grounded = supports[best][0] >= GROUNDED
        oracle = hits[best] if grounded else hits[0]
        rest = [h for h in hits if h is not oracle]
        others = [h for h in rest if h["source"] != oracle["source"]]
        pool = (others + [h for h in rest if h["source"] == oracle["source"]])[: distractors + 1]
        passages = ([oracle] + pool[:distractors]) if i in with_oracle else pool[: distractors + 1]
        rnd.shuffle(passages)
        at = next((n for n, h in enumerate(passages, 1) if h is oracle), None)
        if at is not None and cite and grounded:
            answer = {**answer, "content": cite_inline(answer["content"], supports[best][1], at)}
        out.append(({"messages": [*augment(ex["messages"][:-1], passages), answer]}, at))
    return out


# -- the worker loop -------------------------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: LoRA on the frozen base (or full fine-tuning) under DeepSpeed ZeRO.

    Everything comes through `config` (the resolved `LoragConfig` as JSON, the adapter name, the
    base model's reference for this node to resolve, the prepared train/val examples and any raw
    DeepSpeed override); nothing is read from globals or from the driver's disk.
    """
    import ray.train
    import torch

    from lorag.checkpoint import load_state
    from lorag.config import LoragConfig
    from lorag.models import load_tokenizer, resolve_model

    cfg = LoragConfig.model_validate(config["config"])
    ad = cfg.adapter(config["adapter"])
    t = ad.train
    if not t.use_gpu:
        # DeepSpeed picks CUDA when it sees it; a CPU run must say so before deepspeed is imported.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not t.use_gpu:
        skip_shm_comm_build()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    torch.manual_seed(t.seed)
    random.seed(t.seed)

    model_path = resolve_model(config["model_ref"], cfg.model_cache)
    tokenizer = load_tokenizer(model_path)
    model = _build_model(ad, model_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    train_set = [encode_example(tokenizer, ex, ad.system_prompt, t.max_seq_len) for ex in config["train"]]
    val_set = [encode_example(tokenizer, ex, ad.system_prompt, t.max_seq_len) for ex in config["val"]]
    truncated = sum(e.truncated for e in train_set + val_set)

    warmup = max(1, t.max_steps // 10)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ds_config = deepspeed_config(t, _bf16_ok(t), config["deepspeed_override"])
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    device = engine.device
    pad_id = tokenizer.pad_token_id
    # How many Ray nodes the workers span, for the report (by node id: nodes may share an IP).
    node = torch.tensor(int(ray.get_runtime_context().get_node_id()[:12], 16), device=device)
    gathered = [torch.zeros_like(node) for _ in range(world)]
    torch.distributed.all_gather(gathered, node)
    nodes = len({int(t.item()) for t in gathered})

    # Resume: the latest checkpoint restores weights, optimizer, scheduler, history and data position.
    start_step, history, base_val = 0, {"train_loss": [], "val_loss": []}, None
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            # Verified (sha256, world size, parameter shapes) and never unpickled. This also restores
            # this rank's RNG, so nothing below may draw random numbers before the loop starts.
            state = load_state(engine, Path(d) / STATE_DIR, rank, world)
        start_step, history, base_val = state["step"], state["history"], state["base_val_loss"]
        resumed_from = start_step
    elif val_set and ad.method == "lora":
        with engine.module.disable_adapter():
            base_val = _evaluate(engine, val_set, rank, world, pad_id)

    if rank == 0:
        what = f"resuming at step {start_step}" if resumed_from is not None else "starting"
        print(
            f"lorag train {ad.name}: {what}; {len(train_set)} train / {len(val_set)} val examples ({truncated} truncated to "
            f"{t.max_seq_len} tokens), {world} workers, ZeRO-{t.zero_stage}, {ad.method}, trainable {trainable:,}/{total:,} "
            f"params ({100 * trainable / total:.2f}%)",
            flush=True,
        )
    batches = _batches(train_set[rank::world], t.batch_size, t.seed, pad_id)
    for _ in range(start_step * t.gradient_accumulation_steps):  # skip what the checkpoint already trained on
        next(batches)

    tokens, t0 = 0, time.time()
    engine.train()
    for step in range(start_step + 1, t.max_steps + 1):
        loss_sum = torch.zeros((), device=device)
        n_tokens = torch.zeros((), device=device, dtype=torch.long)
        for _ in range(t.gradient_accumulation_steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float() / t.gradient_accumulation_steps
            n_tokens += batch["attention_mask"].sum()
        # Log the mean over ranks, not rank 0's shard alone.
        stats = torch.stack([loss_sum.float(), n_tokens.float()])
        torch.distributed.all_reduce(stats)
        step_loss = round(stats[0].item() / world, 4)
        if step == start_step + 1 and step < t.max_steps:
            t0 = time.time()  # the first step warms caches and allocators: rate the steady state
        else:
            tokens += int(stats[1].item())
        history["train_loss"].append([step, step_loss])
        if rank == 0 and (step % t.log_every == 0 or step == t.max_steps):
            rate = tokens / max(time.time() - t0, 1e-9)
            eta = (t.max_steps - step) * (time.time() - t0) / max(step - start_step - 1, 1)
            bar = "#" * int(20 * step / t.max_steps)
            print(f"  [{bar:<20}] step {step}/{t.max_steps}  loss {step_loss:.4f}  {rate:,.0f} tok/s  eta {eta:.0f}s", flush=True)

        final = step == t.max_steps
        if final or (t.checkpoint_every and step % t.checkpoint_every == 0):
            val = _evaluate(engine, val_set, rank, world, pad_id) if val_set else None
            if val is not None:
                history["val_loss"].append([step, round(val, 4)])
            metrics = {"step": step, "train_loss": step_loss, "val_loss": val, "base_val_loss": base_val}
            report = None
            if final:
                report = {
                    "steps": t.max_steps,
                    "final_train_loss": step_loss,
                    "val_loss": val,
                    "base_val_loss": base_val,
                    "history": history,
                    "tokens_per_s": round(tokens / max(time.time() - t0, 1e-9), 1),
                    "trainable_params": trainable,
                    "total_params": total,
                    "truncated_examples": truncated,
                    "world_size": world,
                    "nodes": nodes,
                    "zero_stage": t.zero_stage,
                    "resumed_from_step": resumed_from,
                }
            _save_checkpoint(engine, ad, step, history, base_val, metrics, report, rank, world)
            engine.train()


def deepspeed_config(t, bf16: bool, override: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config for `TrainConfig` `t`; keys of `override` (a raw DeepSpeed JSON) win."""
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}

    if t.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        # A torch AdamW (not DeepSpeed's fused CUDA one) keeps the same job runnable on CPU nodes;
        # with an offloaded optimizer DeepSpeed refuses it unless told that is meant.
        "zero_allow_untested_optimizer": True,
        **({"zero_force_ds_cpu_optimizer": False} if t.offload_optimizer else {}),
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 1 << 30,
    }
    return _merge(cfg, override)


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from compiling `deepspeed_shm_comm` when it starts.

    On CPU, DeepSpeed's comm backend JIT-builds a shared-memory all-reduce with g++ (45 s to 2 min
    on two cores) on every fresh node, and again whenever the path of the venv changes; only its
    inference all-reduce uses it, and training all-reduces through torch.distributed (gloo) with
    or without it. DeepSpeed looks the op up in `deepspeed.ops.__compatible_ops__`, which keeps
    edits, before it builds; call this after `import deepspeed`, before `deepspeed.initialize`.
    A DeepSpeed without that table builds the op as before.
    """
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _bf16_ok(t) -> bool:
    import torch

    if t.precision == "bf16":
        return True
    return t.precision == "auto" and t.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _build_model(ad, model_path: Path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from lorag.models import load_causal_lm

    model = load_causal_lm(model_path)
    model.config.use_cache = False
    if ad.method == "full":
        model.train()
        return model
    lora = ad.lora
    return get_peft_model(
        model,
        PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, use_dora=lora.use_dora, task_type="CAUSAL_LM"
        ),
    )


def _evaluate(engine, examples: list[Encoded], rank: int, world: int, pad_id: int) -> float:
    """Token-weighted mean loss over `examples`, sharded across ranks and all-reduced."""
    import torch

    engine.eval()
    total = torch.zeros(2, device=engine.device, dtype=torch.float64)
    with torch.no_grad():
        # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively);
        # a rank past the end of its shard repeats example 0 with weight 0.
        for i in range(-(-len(examples) // world)):
            idx = rank + i * world
            batch = {k: v.to(engine.device) for k, v in _collate([examples[idx % len(examples)]], pad_id).items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if idx < len(examples) else 0
            loss = engine(**batch).loss.double()
            if n:
                total[0] += loss * n
                total[1] += n
    torch.distributed.all_reduce(total)
    return round(float(total[0] / total[1]), 4) if total[1] > 0 else float("nan")


def _save_checkpoint(engine, ad, step, history, base_val, metrics, report, rank, world) -> None:
    """Every rank writes its part of the training state into its own dir; Ray Train merges them into one checkpoint."""
    import deepspeed
    import ray.train

    from lorag.checkpoint import save_state

    with tempfile.TemporaryDirectory() as tmp:
        # Trainable weights only: frozen base weights come from the base model on resume.
        save_state(engine, Path(tmp) / STATE_DIR, rank, world, step=step, extra={"history": history, "base_val_loss": base_val})
        if report is not None:
            # Under ZeRO-3 parameters are sharded: gather the ones we export before saving.
            params = [p for p in engine.module.parameters() if p.requires_grad or ad.method == "full"]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
                if rank == 0:
                    engine.module.save_pretrained(Path(tmp) / EXPORT_DIR, safe_serialization=True)
        if rank == 0 and report is not None:
            (Path(tmp) / "train_report.json").write_text(json.dumps(report))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _batches(examples: list[Encoded], batch_size: int, seed: int, pad_id: int):
    """Endless padded batches over `examples`, reshuffled each epoch with a seeded RNG (so resuming can skip ahead)."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, max(len(order) - batch_size + 1, 1), batch_size):
            rows = [examples[j] for j in order[i : i + batch_size]]
            while len(rows) < batch_size:  # fewer examples than a batch: repeat
                rows.append(rows[len(rows) % len(rows)])
            yield _collate(rows, pad_id)


def _collate(rows: list[Encoded], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n] = torch.tensor(r.input_ids)
        labels[b, :n] = torch.tensor(r.labels)
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _read_deepspeed_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed_config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed_config {path}: must be a JSON object")
    return data


def weights_hash(model_dir: Path, cache_dir: Path) -> str:
    """sha256 over a checkpoint's *.safetensors files, cached in `cache_dir` by path, size and mtime."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    key = json.dumps([str(Path(model_dir).resolve()), [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]])
    cache = Path(cache_dir) / "weights-sha256" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "sha256": digest}))
    except OSError:  # an unwritable cache: just don't cache
        pass
    return digest


def _lorag_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorag")
    except PackageNotFoundError:
        return "unknown"
