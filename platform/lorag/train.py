"""LoRA fine-tuning on Ray Train with DeepSpeed, and the instruction dataset it reads.

`train_adapter` is the entry point: it validates the adapter's config and dataset before anything
starts, resolves the base model once on the driver (so workers never race to convert it), runs a
`TorchTrainer` whose workers each wrap the frozen base in a peft LoRA model under a DeepSpeed
ZeRO engine, and saves the rank-0 adapter into the versioned adapter store.

Datasets are JSONL: `{"prompt", "completion"}` or `{"messages": [{"role", "content"}, ...]}`
(the last message is the assistant's answer). Loss is taken on the answer tokens only.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A training file is missing or has a malformed line (message gives file:line and why)."""


@dataclass
class TrainResult:
    adapter: str
    version: int
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def train_adapter(cfg, name: str) -> TrainResult:
    """Train adapter `name` from `cfg` on Ray Train and save it to the adapter store.

    Ray must be initialised by the caller (locally or on a cluster).

    Returns:
        Where the new adapter version lives and its final metrics.

    Raises:
        KeyError: no such adapter in the config.
        DatasetError: the dataset is missing or malformed (checked before any worker starts).
        RuntimeError: the training run failed.
    """
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lorag.adapters import AdapterStore
    from lorag.config import dump_config
    from lorag.models import resolve_model

    ad = cfg.adapter(name)
    examples = load_examples(ad.dataset)
    if len(examples) < ad.train.num_workers:
        raise DatasetError(f"{ad.dataset}: {len(examples)} example(s) for {ad.train.num_workers} workers; each worker needs at least one")
    model_path = resolve_model(cfg.base_model, cfg.model_cache)
    retrieval = ad.knowledge_base is not None and ad.train.with_retrieval
    if retrieval:
        examples = with_retrieved_sources(cfg, ad, examples)

    start = time.time()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "adapter": name, "model_path": str(model_path), "examples": examples},
        scaling_config=ScalingConfig(
            num_workers=ad.train.num_workers,
            use_gpu=ad.train.use_gpu,
            resources_per_worker={"CPU": ad.train.cpus_per_worker, **({"GPU": 1} if ad.train.use_gpu else {})},
        ),
        run_config=RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(Path(cfg.workdir) / "ray_results")),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"training adapter {name!r} failed: {e}") from e
    if result.checkpoint is None:
        raise RuntimeError(f"training adapter {name!r} finished without saving an adapter checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        report = json.loads((Path(ckpt) / "train_report.json").read_text())
        metadata = {
            "base_model": cfg.base_model,
            "base_model_path": str(model_path),
            "knowledge_base": ad.knowledge_base,
            "system_prompt": ad.system_prompt,
            "dataset": ad.dataset,
            "examples": len(examples),
            "trained_with_retrieval": retrieval,
            "metrics": report,
            "wall_time_s": round(time.time() - start, 1),
            "lorag_version": _lorag_version(),
        }
        path = AdapterStore(cfg.adapter_store).save(name, ckpt, metadata, config_yaml=dump_config(cfg))
    return TrainResult(name, int(path.name[1:]), path, report)


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
    from lorag.retrieval import augment

    kb = cfg.knowledge_base(ad.knowledge_base)
    store = open_store(cfg.milvus_uri(kb), kb.token)
    embedder = Embedder(resolve_model(cfg.embedder, cfg.model_cache))
    questions = [next(m["content"] for m in reversed(ex["messages"]) if m["role"] == "user") for ex in examples]
    vectors = embedder.embed(questions)
    out = []
    for ex, vector in zip(examples, vectors):
        hits = store.search(kb.collection, vector.tolist(), kb.top_k)
        out.append({"messages": [*augment(ex["messages"][:-1], hits), ex["messages"][-1]]})
    return out


# -- the worker loop -------------------------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: LoRA on the frozen base under a DeepSpeed ZeRO engine.

    Everything comes through `config` (the resolved `LoragConfig` as JSON, the adapter name, the
    resolved base-model path and the validated examples); nothing is read from globals.
    """
    import ray.train
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from lorag.config import LoragConfig
    from lorag.models import load_causal_lm, load_tokenizer

    cfg = LoragConfig.model_validate(config["config"])
    ad = cfg.adapter(config["adapter"])
    t = ad.train
    if not t.use_gpu:
        # DeepSpeed picks CUDA when it sees it; a CPU run must say so before deepspeed is imported.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    tokenizer = load_tokenizer(Path(config["model_path"]))
    model = load_causal_lm(Path(config["model_path"]))
    model.config.use_cache = False
    model = get_peft_model(
        model,
        PeftLoraConfig(
            r=ad.lora.r,
            lora_alpha=ad.lora.alpha,
            lora_dropout=ad.lora.dropout,
            target_modules=ad.lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    encoded = [encode_example(tokenizer, ex, ad.system_prompt, t.max_seq_len) for ex in config["examples"]]
    truncated = sum(e.truncated for e in encoded)
    shard = encoded[rank::world]

    warmup = max(1, min(10, t.max_steps // 10))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    use_bf16 = t.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ds_config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": t.zero_stage},
        # A torch AdamW (not DeepSpeed's fused CUDA one) keeps the same job runnable on CPU nodes.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 1 << 30,
    }
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    device = engine.device

    if rank == 0:
        print(
            f"lorag train {ad.name}: {len(encoded)} examples ({truncated} truncated to {t.max_seq_len} tokens), "
            f"{world} workers, ZeRO-{t.zero_stage}, trainable {trainable:,}/{total:,} params ({100 * trainable / total:.2f}%)",
            flush=True,
        )
    batches = _batches(shard, t.batch_size, t.seed, tokenizer.pad_token_id)
    losses: list[float] = []
    tokens = 0
    t0 = time.time()
    engine.train()
    for step in range(1, t.max_steps + 1):
        step_loss = torch.zeros((), device=device)
        step_tokens = torch.zeros((), device=device, dtype=torch.long)
        for _ in range(t.gradient_accumulation_steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach() / t.gradient_accumulation_steps
            step_tokens += batch["attention_mask"].sum()
        # Log the mean over ranks, not rank 0's shard alone.
        stats = torch.stack([step_loss.float(), step_tokens.float()]).to(device)
        torch.distributed.all_reduce(stats)
        step_loss = stats[0].item() / world
        tokens += int(stats[1].item())
        losses.append(round(step_loss, 4))
        if rank == 0 and (step % t.log_every == 0 or step == t.max_steps):
            elapsed = time.time() - t0
            bar = "#" * int(20 * step / t.max_steps)
            print(f"  [{bar:<20}] step {step}/{t.max_steps}  loss {step_loss:.4f}  {tokens / elapsed:,.0f} tok/s", flush=True)

    metrics = {
        "steps": t.max_steps,
        "final_loss": losses[-1],
        "loss_curve": losses,
        "tokens": tokens,
        "tokens_per_s": round(tokens / max(time.time() - t0, 1e-9), 1),
        "trainable_params": trainable,
        "total_params": total,
        "truncated_examples": truncated,
        "world_size": world,
        "zero_stage": t.zero_stage,
    }
    # ZeRO 0-2 keep full parameters on every rank, so rank 0 alone writes the adapter.
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            engine.module.save_pretrained(tmp, safe_serialization=True)
            (Path(tmp) / "train_report.json").write_text(json.dumps(metrics))
            ray.train.report({k: v for k, v in metrics.items() if k != "loss_curve"}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report({k: v for k, v in metrics.items() if k != "loss_curve"})


def _batches(examples: list["Encoded"], batch_size: int, seed: int, pad_id: int):
    """Endless padded batches over `examples`, reshuffled each epoch with a seeded RNG."""
    import torch

    rng = random.Random(seed)
    epoch = 0
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            rows = [examples[j % len(examples)] for j in order[i : i + batch_size]]
            while len(rows) < batch_size:  # fewer examples than a batch: repeat
                rows.append(rows[len(rows) % len(rows)])
            width = max(len(r.input_ids) for r in rows)
            ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
            labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for b, r in enumerate(rows):
                n = len(r.input_ids)
                ids[b, :n] = torch.tensor(r.input_ids)
                labels[b, :n] = torch.tensor(r.labels)
                mask[b, :n] = 1
            yield {"input_ids": ids, "labels": labels, "attention_mask": mask}
        epoch += 1


# -- dataset ---------------------------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def load_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL training file into a list of `{"messages": [...]}` records.

    `{"prompt", "completion"}` lines become a user and an assistant message.

    Raises:
        DatasetError: the file is missing or empty, or a line is malformed (`file:line: reason`).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            out.append({"messages": _messages(rec, where)})
    if not out:
        raise DatasetError(f"{path}: no examples")
    return out


def _messages(rec: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DatasetError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise DatasetError(f"{where}: messages[{i}] must be {{'role': one of {_ROLES}, 'content': string}}")
        if msgs[-1]["role"] != "assistant":
            raise DatasetError(f"{where}: the last message must be the assistant's answer (got role {msgs[-1]['role']!r})")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise DatasetError(f"{where}: 'messages' needs a user message before the assistant's answer")
        return msgs
    missing = [k for k in ("prompt", "completion") if not isinstance(rec.get(k), str) or not rec.get(k).strip()]
    if missing:
        raise DatasetError(f"{where}: needs non-empty string fields 'prompt' and 'completion' (or 'messages'); missing or empty: {missing}")
    return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend the adapter's system prompt unless the conversation brings its own."""
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def encode_example(tokenizer, example: dict[str, Any], system_prompt: str | None, max_len: int) -> Encoded:
    """Token ids and labels for one example; only the final assistant answer carries loss.

    Examples longer than `max_len` lose the start of the prompt (and, if the answer alone is
    too long, the end of the answer), so every example keeps supervised tokens.

    The prompt is rendered exactly as serving renders it (chat template with the generation
    prompt), so the adapter learns to continue from what it will see at inference.
    """
    msgs = with_system(example["messages"], system_prompt)
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    # The answer is what the template adds for the last turn, end-of-turn token included.
    answer = full[len(prompt):] if full.startswith(prompt) else msgs[-1]["content"] + (tokenizer.eos_token or "")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    truncated = len(p_ids) + len(a_ids) > max_len
    if truncated:
        # Cutting the end would drop the answer (the only supervised part). Keep the prompt's end
        # (question and assistant header) and the answer's start instead.
        keep = max(max_len - len(a_ids), max_len // 4)
        p_ids, a_ids = p_ids[-keep:], a_ids[: max_len - keep]
    return Encoded(p_ids + a_ids, [IGNORE_INDEX] * len(p_ids) + a_ids, truncated)


def _lorag_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorag")
    except PackageNotFoundError:
        return "unknown"

