"""LoRA (or full) fine-tuning on Ray Train with DeepSpeed, resumable, into the adapter store.

`train_adapter` is `prepare` -> `fit` -> `record`. `prepare` does everything that can fail before
a worker starts: it checks that every path the run needs is reachable from every node, validates
the dataset, splits off a validation set, resolves the base model on the driver (and, for a model
directory only the driver has, publishes it to the storage URI) and, for an adapter bound to a
knowledge base, wraps every question in its retrieved sources (`lorag.examples`). `fit` runs
`train_loop` on every worker of a `TorchTrainer`: each resolves the base model into its own node's
cache and wraps it in a peft LoRA model under a DeepSpeed ZeRO engine (`_setup`). Every
`checkpoint_every` steps the ranks save the training state (`lorag.checkpoint`: safetensors and
JSON, verified on load, never unpickled) through `ray.train.report` into `storage_path` (a local
dir or a URI); a worker that dies is restarted by Ray Train (`FailureConfig`) and the run resumes
from the latest checkpoint (weights, optimizer, scheduler, RNG, data position, loss history). The
final checkpoint holds the PEFT adapter, which `record` copies into a new, immutable version in the
adapter store with its provenance (`lorag.adapter_record.AdapterRecord`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorag.examples import (
    DatasetError,
    dataset_hash,
    load_examples,
    split_examples,
    with_retrieved_sources,
)
from lorag.routing import training_questions
from lorag.storage import is_uri
from lorag.worker import EXPORT_DIR, TrainMetrics, read_deepspeed_json, train_loop


@dataclass
class TrainResult:
    adapter: str
    version: int
    path: str  # the version's location in the adapter store (a local path or a URI)
    metrics: TrainMetrics


@dataclass
class TrainPlan:
    """One training run, resolved on the driver before any worker starts (`prepare`)."""

    cfg: Any  # the LoragConfig
    adapter: Any  # its AdapterConfig
    model_path: Path  # the base model, resolved on the driver
    examples: list[dict[str, Any]]  # the dataset as loaded (its questions are saved for routing)
    train_set: list[dict[str, Any]]  # as trained on: wrapped in retrieved sources when `retrieval`
    val_set: list[dict[str, Any]]
    retrieval: bool  # the prompts hold retrieved sources (train.with_retrieval or train.raft, with a knowledge base)
    deepspeed_override: dict[str, Any]  # the raw DeepSpeed JSON of train.deepspeed_config ({} without one)
    storage: str  # Ray Train's storage_path: a local dir or a URI
    run_name: str  # `<adapter>-<run_key>`: the same adapter, data and settings always map to the same run, so a re-run resumes it


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
    plan = prepare(cfg, name)
    started = time.time()
    return record(plan, fit(plan), started)


def prepare(cfg, name: str) -> TrainPlan:
    """Everything before the workers: paths, dataset, split, DeepSpeed override, base model and
    retrieved sources, each checked here so that a mistake fails before Ray Train starts. Unless
    `train.resume`, a previous run with the same key is cleared, so this one trains anew.

    Raises:
        As `train_adapter`, except RuntimeError.
    """
    from lorag.models import resolve_model
    from lorag.storage import check_cluster_paths

    ad = cfg.adapter(name)
    t = ad.train
    retrieval = ad.knowledge_base is not None and (t.with_retrieval or t.raft is not None)
    check_cluster_paths(cfg, [ad.knowledge_base] if retrieval else [], artifacts=True)
    examples = load_examples(ad.dataset)
    train_set, val_set = split_examples(examples, t.val_fraction, t.seed)
    if len(train_set) < t.num_workers:
        raise DatasetError(f"{ad.dataset}: {len(train_set)} training example(s) for {t.num_workers} workers; each worker needs at least one")
    ds_override = read_deepspeed_json(t.deepspeed_config) if t.deepspeed_config else {}
    model_path = resolve_model(cfg.base_model, cfg.model_cache)
    if retrieval:  # one pass over all examples; the seeded split then picks the same partition
        train_set, val_set = split_examples(with_retrieved_sources(cfg, ad, examples), t.val_fraction, t.seed)

    storage = t.storage_path or cfg.train_storage
    run_name = f"{name}-{run_key(ad, model_path, train_set, val_set, ds_override)}"
    if not t.resume:
        forget_run(storage, run_name)
    return TrainPlan(cfg, ad, model_path, examples, train_set, val_set, retrieval, ds_override, storage, run_name)


def fit(plan: TrainPlan):
    """Run `train_loop` on Ray Train's workers; returns the `ray.train.Result`, whose checkpoint is the final one.

    Raises:
        RuntimeError: the run failed, or finished without a checkpoint.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lorag.models import node_ref

    cfg, ad = plan.cfg, plan.adapter
    t = ad.train
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "adapter": ad.name,
            # Workers may run on other nodes: they resolve the model into their own node's cache.
            "model_ref": node_ref(cfg.base_model, cfg.storage_root, cfg.model_cache),
            "train": plan.train_set,
            "val": plan.val_set,
            "deepspeed_override": plan.deepspeed_override,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
            placement_strategy=t.placement_strategy,
        ),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=plan.storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                **({"checkpoint_score_attribute": "val_loss", "checkpoint_score_order": "min"} if plan.val_set else {}),
            ),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"training adapter {ad.name!r} failed: {e}") from e
    if result.checkpoint is None:
        raise RuntimeError(f"training adapter {ad.name!r} finished without saving a checkpoint")
    return result


def record(plan: TrainPlan, result, started: float) -> TrainResult:
    """Copy the final checkpoint's adapter into a new version of the adapter store, with its
    provenance (`lorag.adapter_record.AdapterRecord`), and clear the finished run.

    Args:
        result: `fit`'s `ray.train.Result`.
        started: when the run started (`time.time()`), for the record's wall time.

    Raises:
        RuntimeError: the checkpoint holds no exported model.
    """
    from lorag.adapters import AdapterStore
    from lorag.config import dump_config

    cfg, ad = plan.cfg, plan.adapter
    t = ad.train
    with result.checkpoint.as_directory() as ckpt:
        metrics = TrainMetrics.model_validate(json.loads((Path(ckpt) / "train_report.json").read_text()))
        if not (Path(ckpt) / EXPORT_DIR).is_dir():
            raise RuntimeError(f"the latest checkpoint of {ad.name!r} holds no exported model: {ckpt}")
        metadata = {
            "method": ad.method,
            "base_model": cfg.base_model,
            "base_model_path": str(plan.model_path),
            "base_model_sha256": weights_hash(plan.model_path, cfg.model_cache),
            "knowledge_base": ad.knowledge_base,
            "system_prompt": ad.system_prompt,
            "description": ad.description,
            "answer_style": ad.answer_style,
            "questions": training_questions(plan.examples),  # `model: "auto"` routes by them (lorag.routing)
            "dataset": ad.dataset,
            "dataset_sha256": dataset_hash(ad.dataset),
            "examples": {"train": len(plan.train_set), "val": len(plan.val_set)},
            "trained_with_retrieval": plan.retrieval,
            "raft": t.raft.model_dump() if t.raft and plan.retrieval else None,
            "metrics": metrics.model_dump(),
            "wall_time_s": round(time.time() - started, 1),
            "lorag_version": _lorag_version(),
        }
        location = AdapterStore(cfg.adapter_store).save(ad.name, Path(ckpt) / EXPORT_DIR, metadata, config_yaml=dump_config(cfg))
    # The adapter is safe in the store: the run is finished, so the next run of the same config trains anew.
    forget_run(plan.storage, plan.run_name)
    return TrainResult(ad.name, int(location.rstrip("/").rsplit("/", 1)[-1][1:]), location, metrics)


def train_summary(name: str, version: int, path: str | Path, m: TrainMetrics) -> str:
    """One line: loss curve ends, validation loss against the base model's, and where it was saved."""
    curve = m.history["train_loss"]
    line = f"{name} v{version}: train loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f} in {m.steps} steps"
    if m.val_loss is not None:
        line += f"; validation loss {m.val_loss:.3f}"
        if m.base_val_loss is not None:
            line += f" (base model {m.base_val_loss:.3f})"
    if m.resumed_from_step is not None:
        line += f"; resumed from step {m.resumed_from_step}"
    return f"{line}\nsaved to {path}"


def run_key(ad, model_path: Path, train_set: list, val_set: list, ds_override: dict) -> str:
    """A short hash of everything that shapes a training run: adapter settings, base model, the
    prepared examples and any DeepSpeed override. Equal keys mean a re-run may resume the run."""
    settings = ad.model_dump(mode="json", exclude={"train": {"resume", "log_every", "max_failures", "storage_path"}})
    blob = json.dumps([settings, str(model_path), train_set, val_set, ds_override], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def forget_run(storage: str, run_name: str) -> None:
    """Delete a run's Ray Train folder (checkpoints, snapshot) from local disk or a pyarrow filesystem."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage if is_uri(storage) else str(Path(storage).resolve()))
    run = f"{root.rstrip('/')}/{run_name}"
    if fs.get_file_info(run).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(run)


# -- the worker loop -------------------------------------------------------------------------


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
