"""What every Ray Train worker runs: `train_loop`, from its config dict to the final checkpoint.

`fit` (`lorag.train`) starts `train_loop` on each worker of a `TorchTrainer`. `_setup` resolves the
base model into the worker's own node cache, wraps it in a peft LoRA model (or leaves it whole for
a full fine-tune) under a DeepSpeed ZeRO engine, encodes the examples, and restores the latest
checkpoint when Ray Train restarts the group (`_restore`: weights, optimizer, scheduler, RNG, data
position, loss history). The loop then trains, validates and reports a checkpoint every
`checkpoint_every` steps (`_save_checkpoint`: `lorag.checkpoint`'s safetensors + JSON state, plus
the PEFT export and `TrainMetrics` in the last one).
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

from pydantic import BaseModel

from lorag.config import ConfigError
from lorag.examples import IGNORE_INDEX, Encoded, encode_example

STATE_DIR = "state"  # the training state (lorag.checkpoint: safetensors + JSON) inside each Ray Train checkpoint
EXPORT_DIR = "export"  # the adapter (PEFT) or full model, in the final checkpoint


class TrainMetrics(BaseModel):
    """How a run went: what the last step reports (`train_report.json` in the final checkpoint,
    `metrics` in the version's `lorag.json`)."""

    steps: int
    final_train_loss: float  # the last step's loss, averaged over the ranks
    val_loss: float | None  # None without a validation set
    base_val_loss: float | None  # the base model's validation loss (LoRA only), to compare against
    history: dict[str, list[tuple[int, float]]]  # "train_loss" (every step) and "val_loss" (every checkpoint): [(step, loss)]
    tokens_per_s: float  # over all ranks, after the first (warm-up) step of this process
    trainable_params: int
    total_params: int
    truncated_examples: int  # cut to train.max_seq_len
    world_size: int
    nodes: int  # Ray nodes the workers ran on
    zero_stage: int
    resumed_from_step: int | None  # the checkpoint this process resumed from, None for a run from the start


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: LoRA on the frozen base (or full fine-tuning) under DeepSpeed ZeRO.

    Everything comes through `config` (the resolved `LoragConfig` as JSON, the adapter name, the
    base model's reference for this node to resolve, the prepared train/val examples and any raw
    DeepSpeed override); nothing is read from globals or from the driver's disk. `_setup` builds
    the engine and data and restores the latest checkpoint; this is the loop.
    """
    w = _setup(config)
    t, engine = w.ad.train, w.engine
    if w.rank == 0:
        what = f"resuming at step {w.start_step}" if w.resumed_from is not None else "starting"
        print(
            f"lorag train {w.ad.name}: {what}; {len(w.train_set)} train / {len(w.val_set)} val examples ({w.truncated} truncated to "
            f"{t.max_seq_len} tokens), {w.world} workers, ZeRO-{t.zero_stage}, {w.ad.method}, trainable {w.trainable:,}/{w.total:,} "
            f"params ({100 * w.trainable / w.total:.2f}%)",
            flush=True,
        )
    batches = _batches(w.train_set[w.rank::w.world], t.batch_size, t.seed, w.pad_id)
    for _ in range(w.start_step * t.gradient_accumulation_steps):  # skip what the checkpoint already trained on
        next(batches)

    tokens, t0 = 0, time.time()
    engine.train()
    for step in range(w.start_step + 1, t.max_steps + 1):
        step_loss, step_tokens = _train_step(w, batches)
        if step == w.start_step + 1 and step < t.max_steps:
            t0 = time.time()  # the first step warms caches and allocators: rate the steady state
        else:
            tokens += step_tokens
        w.history["train_loss"].append([step, step_loss])
        if w.rank == 0 and (step % t.log_every == 0 or step == t.max_steps):
            rate = tokens / max(time.time() - t0, 1e-9)
            eta = (t.max_steps - step) * (time.time() - t0) / max(step - w.start_step - 1, 1)
            bar = "#" * int(20 * step / t.max_steps)
            print(f"  [{bar:<20}] step {step}/{t.max_steps}  loss {step_loss:.4f}  {rate:,.0f} tok/s  eta {eta:.0f}s", flush=True)

        final = step == t.max_steps
        if final or (t.checkpoint_every and step % t.checkpoint_every == 0):
            val = _evaluate(engine, w.val_set, w.rank, w.world, w.pad_id) if w.val_set else None
            if val is not None:
                w.history["val_loss"].append([step, round(val, 4)])
            metrics = {"step": step, "train_loss": step_loss, "val_loss": val, "base_val_loss": w.base_val}
            report = _final_metrics(w, step_loss, val, round(tokens / max(time.time() - t0, 1e-9), 1)) if final else None
            _save_checkpoint(engine, w.ad, step, w.history, w.base_val, metrics, report, w.rank, w.world)
            engine.train()


@dataclass
class _Worker:
    """One Ray Train worker's run: its engine and data (`_setup`) and where it starts (`_restore`)."""

    ad: Any  # the AdapterConfig
    engine: Any  # the DeepSpeed engine around the (peft) model
    rank: int
    world: int
    pad_id: int
    train_set: list[Encoded]
    val_set: list[Encoded]
    trainable: int
    total: int
    truncated: int
    nodes: int
    start_step: int = 0
    history: dict[str, list] = field(default_factory=lambda: {"train_loss": [], "val_loss": []})
    base_val: float | None = None
    resumed_from: int | None = None


def _setup(config: dict[str, Any]) -> _Worker:
    """Build this worker's model, engine and encoded examples, then resume from the latest checkpoint, if any."""
    import ray.train
    import torch

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

    warmup = max(1, t.max_steps // 10)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ds_config = deepspeed_config(t, _bf16_ok(t), config["deepspeed_override"])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    w = _Worker(ad, engine, rank, world, tokenizer.pad_token_id, train_set, val_set, trainable, total,
                truncated=sum(e.truncated for e in train_set + val_set), nodes=_count_nodes(engine, world))
    _restore(w)
    return w


def _restore(w: _Worker) -> None:
    """Resume: the latest checkpoint restores weights, optimizer, scheduler, history and data position.
    A run from the start measures the base model's validation loss instead (LoRA only)."""
    import ray.train

    from lorag.checkpoint import load_state

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            # Verified (sha256, world size, parameter shapes) and never unpickled. This also restores
            # this rank's RNG, so nothing after it may draw random numbers before the loop starts.
            state = load_state(w.engine, Path(d) / STATE_DIR, w.rank, w.world)
        w.start_step, w.history, w.base_val = state["step"], state["history"], state["base_val_loss"]
        w.resumed_from = w.start_step
    elif w.val_set and w.ad.method == "lora":
        with w.engine.module.disable_adapter():
            w.base_val = _evaluate(w.engine, w.val_set, w.rank, w.world, w.pad_id)


def _count_nodes(engine, world: int) -> int:
    """How many Ray nodes the workers span, for the report (by node id: nodes may share an IP)."""
    import ray
    import torch

    node = torch.tensor(int(ray.get_runtime_context().get_node_id()[:12], 16), device=engine.device)
    gathered = [torch.zeros_like(node) for _ in range(world)]
    torch.distributed.all_gather(gathered, node)
    return len({int(t.item()) for t in gathered})


def _train_step(w: _Worker, batches) -> tuple[float, int]:
    """One optimizer step (its micro-batches); returns the loss averaged over ranks and the tokens all ranks trained on."""
    import torch

    t, engine = w.ad.train, w.engine
    loss_sum = torch.zeros((), device=engine.device)
    n_tokens = torch.zeros((), device=engine.device, dtype=torch.long)
    for _ in range(t.gradient_accumulation_steps):
        batch = {k: v.to(engine.device) for k, v in next(batches).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float() / t.gradient_accumulation_steps
        n_tokens += batch["attention_mask"].sum()
    # Log the mean over ranks, not rank 0's shard alone.
    stats = torch.stack([loss_sum.float(), n_tokens.float()])
    torch.distributed.all_reduce(stats)
    return round(stats[0].item() / w.world, 4), int(stats[1].item())


def _final_metrics(w: _Worker, train_loss: float, val_loss: float | None, tokens_per_s: float) -> TrainMetrics:
    """What the final checkpoint reports (`train_report.json`)."""
    t = w.ad.train
    return TrainMetrics(
        steps=t.max_steps,
        final_train_loss=train_loss,
        val_loss=val_loss,
        base_val_loss=w.base_val,
        history=w.history,
        tokens_per_s=tokens_per_s,
        trainable_params=w.trainable,
        total_params=w.total,
        truncated_examples=w.truncated,
        world_size=w.world,
        nodes=w.nodes,
        zero_stage=t.zero_stage,
        resumed_from_step=w.resumed_from,
    )


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


def _save_checkpoint(engine, ad, step, history, base_val, metrics, report: TrainMetrics | None, rank, world) -> None:
    """Every rank writes its part of the training state into its own dir; Ray Train merges them into one
    checkpoint. The final one (`report` given) also holds the exported model and `train_report.json`."""
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
            (Path(tmp) / "train_report.json").write_text(json.dumps(report.model_dump()))
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


def read_deepspeed_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed_config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed_config {path}: must be a JSON object")
    return data
