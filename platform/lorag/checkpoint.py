"""Training checkpoints as safetensors + JSON: what a resumed run needs, verifiable, never unpickled.

`save_state` and `load_state` own the training-state directory inside each Ray Train checkpoint.
They replace DeepSpeed's `save_checkpoint`/`load_checkpoint`, whose loader unpickles (`torch.load`)
files that may come from shared storage. Both are collective: every rank calls them, in step.

A checkpoint directory holds:

- `weights.safetensors`: the trainable parameters (LoRA, or every weight for `method: full`) as
  fp32 master weights, one full (unsharded) tensor per parameter name. Frozen base weights are not
  saved: they come from the base model on resume.
- `optimizer.safetensors`: the optimizer's per-parameter state (AdamW: `exp_avg.<name>` and
  `exp_avg_sq.<name>`), full tensors; its step count is in `state.json`.
- `state.json`: the data position (`step`), the optimizer step and learning rates, the LR
  scheduler's state (LambdaLR: `last_epoch`, `_step_count`, `_last_lr`, `base_lrs`; the caller
  rebuilds the lambdas), DeepSpeed's step counters and loss scale, and the caller's `extra` JSON.
- `rng-rank{r}.safetensors`, one per rank: that rank's torch CPU RNG (`torch_cpu`, uint8), its
  CUDA RNG per visible device (`cuda.{i}`) when there is CUDA, and Python's `random` state as JSON
  in the file's metadata.
- `manifest.json`: format and version, world size, ZeRO stage, the trainable parameters' names and
  shapes, and the sha256 of every other file. Rank 0 writes it after gathering the RNG files'
  hashes, so it is complete even though Ray Train merges the ranks' directories into one.

Under ZeRO-1/2/3 weights and optimizer state are gathered to full tensors through DeepSpeed's
tensor-fragment API; at stage 0 they are read from the torch optimizer's own parameters and state
(`lorag.deepspeed_state` owns where each lives). The files are the same whatever the stage or
sharding. The world size must still match on resume: each rank's data shard and RNG depend on it.

`load_state` checks everything before it changes anything: the manifest, every file's sha256
(each rank checks every file, so all ranks fail alike instead of one hanging in a collective),
the world size, that `state.json` holds only the fields resume restores (it sets engine,
scheduler and loss-scaler attributes from them, never one the file names), and the parameter
names and shapes against the model. A mismatch or a corrupt file raises a `ValueError` that
names the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from lorag.deepspeed_state import (ENGINE_COUNTERS, LOSS_SCALE_FIELDS, base_optimizer, fp32_masters, full_shape, gather_full,
                                   init_optimizer_state, loss_scale, optimizer_layout, restore_counters, set_full,
                                   state_owners, trainable_params)

FORMAT = "lorag-training-state"
VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
_STATE_FIELDS = ("step", "extra", "optimizer", "scheduler", "engine", "loss_scale")  # what state.json holds, and all resume reads


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def save_state(engine, directory: str | Path, rank: int, world: int, *, step: int, extra: dict[str, Any]) -> None:
    """Save `engine`'s training state into `directory` (collective: every rank calls it).

    Rank 0 writes the weights, optimizer state, `state.json` and the manifest; every rank writes its
    own RNG file. `directory` may be a per-rank temporary directory: the file names never collide.

    Args:
        engine: the DeepSpeed engine (its module, optimizer and LR scheduler).
        directory: where to write; created if missing.
        rank: this worker's rank.
        world: the number of workers.
        step: the last completed optimizer step (the data position to resume after).
        extra: JSON-serialisable caller state (loss history, base validation loss), returned by `load_state`.

    Raises:
        ValueError: `extra` is not JSON or uses the key `step`; or the optimizer is one lorag cannot save.
        RuntimeError: the optimizer's parameters disagree on their step count.
    """
    from safetensors.torch import save_file

    if "step" in extra:
        raise ValueError("save_state: extra must not hold 'step' (it is saved as the data position)")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_state: extra must hold only JSON values ({e})") from e
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = trainable_params(engine)
    masters = fp32_masters(engine, params)
    opt_keys, opt_step, without_state = optimizer_layout(engine, params, masters)
    # Every rank joins the gathers (they are collective under ZeRO); only rank 0 keeps the tensors.
    weights, moments = gather_full(engine, params, masters, opt_keys, without_state, rank)
    hashes = _save_rng(directory / _rng_file(rank), world, engine.device)
    if rank != 0:
        return

    save_file(weights, directory / WEIGHTS)
    save_file(moments, directory / OPTIMIZER)
    scheduler = engine.lr_scheduler
    state = {
        "step": step,
        "extra": extra,
        "optimizer": {
            "step": opt_step,
            "keys": opt_keys,
            "without_state": sorted(without_state),
            "lr": [g["lr"] for g in base_optimizer(engine).param_groups],
        },
        "scheduler": None if scheduler is None else {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "engine": {k: int(getattr(engine, k)) for k in ENGINE_COUNTERS},
        "loss_scale": loss_scale(engine),
    }
    (directory / STATE).write_text(json.dumps(state, indent=1))
    _write_manifest(directory, world, int(engine.zero_optimization_stage()), {name: full_shape(p) for name, p in params.items()}, hashes)


def _write_manifest(directory: Path, world: int, zero_stage: int, params: dict[str, list[int]], rng_hashes: list[str]) -> None:
    """Write `manifest.json` last, once every file it hashes is complete (the RNG files' hashes come from their ranks)."""
    files = {STATE: _sha256(directory / STATE), WEIGHTS: _sha256(directory / WEIGHTS), OPTIMIZER: _sha256(directory / OPTIMIZER)}
    files.update({_rng_file(r): h for r, h in enumerate(rng_hashes)})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "world_size": world,
        "zero_stage": zero_stage,
        "params": params,
        "files": files,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def load_state(engine, directory: str | Path, rank: int, world: int) -> dict[str, Any]:
    """Restore what `save_state` saved into a freshly built `engine` (collective: every rank calls it).

    Restores the trainable weights, optimizer state, LR scheduler, DeepSpeed counters and this
    rank's RNG (torch CPU, CUDA, Python `random`). Call it after `deepspeed.initialize` and right
    before the training loop: anything that draws random numbers in between shifts the stream.

    Returns:
        The caller's `extra` dict with `step` (the last completed step) added.

    Raises:
        ValueError: a file is missing, corrupt (sha256 mismatch) or malformed; or the checkpoint
            was saved with another world size or other trainable parameters (names, shapes).
    """
    from safetensors import safe_open

    directory = Path(directory)
    manifest = verify(directory, world)
    params = trainable_params(engine)
    _check_params(directory / MANIFEST, manifest["params"], {name: full_shape(p) for name, p in params.items()})
    state = _read_json(directory / STATE)  # its fields were checked by `verify`
    scheduler_state = _scheduler_state(directory / STATE, state["scheduler"], engine.lr_scheduler)
    opt = state["optimizer"]
    stateful = [name for name in params if name not in opt["without_state"]]
    with safe_open(directory / WEIGHTS, framework="pt") as f:
        _check_tensors(directory / WEIGHTS, f, {name: manifest["params"][name] for name in params})
        weights = {name: f.get_tensor(name) for name in params}
    with safe_open(directory / OPTIMIZER, framework="pt") as f:
        _check_tensors(directory / OPTIMIZER, f, {f"{key}.{name}": manifest["params"][name] for name in stateful for key in opt["keys"]})
        moments = {f"{key}.{name}": f.get_tensor(f"{key}.{name}") for name in stateful for key in opt["keys"]}
    rng = _read_rng(directory / _rng_file(rank))
    base = base_optimizer(engine)
    if len(opt["lr"]) != len(base.param_groups):
        raise ValueError(f"{directory / STATE}: {len(opt['lr'])} optimizer parameter group(s) saved, this optimizer has {len(base.param_groups)}")

    masters = fp32_masters(engine, params)
    if opt["keys"]:
        owners = state_owners(engine) if masters is None else [masters[name] for name in stateful]
        init_optimizer_state(engine, owners, opt["keys"], opt["step"])
    for name, p in params.items():
        set_full(engine, p, None if masters is None else masters[name], weights[name], rank)
    for name in stateful:
        for key in opt["keys"]:
            set_full(engine, params[name], None if masters is None else masters[name], moments[f"{key}.{name}"], rank, key)
    for group, lr in zip(base.param_groups, opt["lr"]):
        group["lr"] = lr  # the scheduler sets it after each step, but the first resumed step reads it before that
    if scheduler_state is not None:
        engine.lr_scheduler.load_state_dict({**engine.lr_scheduler.state_dict(), **scheduler_state})
    restore_counters(engine, state["engine"], state["loss_scale"])
    _restore_rng(directory / _rng_file(rank), *rng)
    return {**state["extra"], "step": state["step"]}


def verify(directory: str | Path, world: int) -> dict[str, Any]:
    """Check a checkpoint directory without loading it: manifest, every file's sha256, world size,
    and that `state.json` holds only the fields resume restores (`_check_state`).

    Returns:
        The manifest.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    directory = Path(directory)
    manifest = _read_json(directory / MANIFEST)
    where = directory / MANIFEST
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: not a lorag training-state manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{where}: format version {manifest.get('version')!r}, this lorag reads version {VERSION}")
    if manifest.get("world_size") != world:
        raise ValueError(
            f"{where}: saved by {manifest.get('world_size')} worker(s), this run has {world}; each worker's data shard and RNG "
            f"depend on the world size, so resume with num_workers: {manifest.get('world_size')} or start a new run"
        )
    files = manifest.get("files")
    expected = {STATE, WEIGHTS, OPTIMIZER, *(_rng_file(r) for r in range(world))}
    if not isinstance(files, dict) or set(files) != expected:
        listed = sorted(files) if isinstance(files, dict) else files
        raise ValueError(f"{where}: lists files {listed}, expected {sorted(expected)}")
    if not isinstance(manifest.get("params"), dict):
        raise ValueError(f"{where}: no parameter table")
    for name in sorted(files):
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {MANIFEST})")
        digest = _sha256(path)
        if digest != files[name]:
            raise ValueError(f"{path}: sha256 {digest} does not match {files[name]} in {MANIFEST}; the file is corrupt or was changed")
    _check_state(directory / STATE, _read_json(directory / STATE))
    return manifest



# -- checks ---------------------------------------------------------------------------------------


def _check_params(where: Path, saved: dict[str, list[int]], model: dict[str, list[int]]) -> None:
    problems = []
    if missing := sorted(set(model) - set(saved)):
        problems.append(f"{len(missing)} trainable parameter(s) of the model are not in the checkpoint, e.g. {missing[:3]}")
    if unexpected := sorted(set(saved) - set(model)):
        problems.append(f"{len(unexpected)} saved parameter(s) are not trainable parameters of the model, e.g. {unexpected[:3]}")
    if shapes := [f"{n}: saved {saved[n]}, model {model[n]}" for n in sorted(set(saved) & set(model)) if list(saved[n]) != list(model[n])]:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
    if problems:
        raise ValueError(f"{where}: the checkpoint does not fit this model (another adapter config or base model?): " + "; ".join(problems))


def _check_tensors(where: Path, f, expected: dict[str, list[int]]) -> None:
    keys = set(f.keys())
    if lacking := sorted(set(expected) - keys):
        raise ValueError(f"{where}: lacks {len(lacking)} tensor(s) the manifest's parameters need, e.g. {lacking[:3]}")
    if unexpected := sorted(keys - set(expected)):
        raise ValueError(f"{where}: holds {len(unexpected)} tensor(s) no trainable parameter needs, e.g. {unexpected[:3]}")
    for name, shape in expected.items():
        sl = f.get_slice(name)
        if list(sl.get_shape()) != list(shape) or sl.get_dtype() != "F32":
            raise ValueError(f"{where}: {name} is {sl.get_dtype()} {sl.get_shape()}, expected F32 {shape}")


def _check_state(where: Path, state: Any) -> None:
    """Refuse a `state.json` holding anything but the fields `save_state` writes, with their JSON
    types: resume sets attributes of the engine, its scheduler and its loss scaler from this file,
    so it applies known fields only (the LR scheduler's keys are checked against the live
    scheduler by `_scheduler_state`)."""
    if not isinstance(state, dict):
        raise ValueError(f"{where}: not a JSON object")
    problems = [f"{k!r} is not a field resume restores" for k in sorted(set(state) - set(_STATE_FIELDS))]
    problems += [f"{k!r} is missing" for k in _STATE_FIELDS if k not in state]
    number = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    integer = (lambda v: isinstance(v, int) and not isinstance(v, bool))  # noqa: E731
    strings = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))  # noqa: E731
    shapes = {  # field -> {key: check}, every key required unless the field is `loss_scale`
        "optimizer": {"step": integer, "keys": strings, "without_state": strings, "lr": lambda v: isinstance(v, list) and all(map(number, v))},
        "engine": {k: integer for k in ENGINE_COUNTERS},
        "loss_scale": {k: number for k in LOSS_SCALE_FIELDS},
    }
    for field, checks in shapes.items():
        value = state.get(field)
        if field == "loss_scale" and value is None:
            continue
        if not isinstance(value, dict):
            problems.append(f"{field} is not an object")
            continue
        problems += [f"{field}.{k} is not a field resume restores (it restores {field}.{{{', '.join(checks)}}})" for k in sorted(set(value) - set(checks))]
        problems += [f"{field}.{k} is missing" for k in checks if k not in value and field != "loss_scale"]
        problems += [f"{field}.{k} has the wrong type ({type(value[k]).__name__})" for k, ok in checks.items() if k in value and not ok(value[k])]
    if "step" in state and not integer(state["step"]):
        problems.append(f"step has the wrong type ({type(state['step']).__name__})")
    if "extra" in state and not isinstance(state["extra"], dict):
        problems.append("extra is not an object")
    if state.get("scheduler") is not None and not isinstance(state["scheduler"], dict):
        problems.append("scheduler is not an object")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems) + " (this lorag did not write it, or it was edited: start a new run, or resume from another checkpoint)")


def _scheduler_state(where: Path, saved: dict[str, Any] | None, scheduler) -> dict[str, Any] | None:
    """The saved LR scheduler state to load into `scheduler`: only keys its own `state_dict` has
    (LambdaLR's `load_state_dict` sets every key it is given as an attribute), each of the same JSON
    kind. None when there is nothing to load.

    Raises:
        ValueError: a key the scheduler does not have, or a value of another kind (names the key).
    """
    if scheduler is None or saved is None:
        return None
    live = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    kind = (lambda v: "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else "list" if isinstance(v, (list, tuple)) else type(v).__name__)  # noqa: E731
    problems = [f"scheduler.{k} is not a field of this LR scheduler ({type(scheduler).__name__}: {sorted(live)})" for k in sorted(set(saved) - set(live))]
    problems += [f"scheduler.{k} is a {kind(saved[k])}, this LR scheduler's is a {kind(live[k])}" for k in sorted(set(saved) & set(live)) if kind(saved[k]) != kind(live[k])]
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return saved


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; not a complete lorag training checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# -- RNG and hashes ---------------------------------------------------------------------------------


def _save_rng(path: Path, world: int, device) -> list[str]:
    """Write this rank's RNG file (torch CPU, CUDA per device, Python `random` in the metadata); return every rank's sha256 of it."""
    import torch
    from safetensors.torch import save_file

    python_state = random.getstate()
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, path, metadata={"python_random": json.dumps([python_state[0], list(python_state[1]), python_state[2]])})
    return _gather_hashes(_sha256(path), world, device)


def _read_rng(path: Path) -> tuple[tuple, Any, list[Any]]:
    """(Python `random` state, torch CPU RNG state, CUDA RNG states by device) from a rank's RNG file."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        version, internal, gauss = json.loads(meta["python_random"])
        python_state = (version, tuple(internal), gauss)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: no valid python_random state in the metadata ({e})") from None
    if "torch_cpu" not in tensors:
        raise ValueError(f"{path}: no torch_cpu RNG state")
    return python_state, tensors["torch_cpu"], [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]


def _restore_rng(path: Path, python_state: tuple, cpu, cuda: list[Any]) -> None:
    import torch

    random.setstate(python_state)
    torch.set_rng_state(cpu)
    if torch.cuda.is_available() or cuda:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible != len(cuda):
            print(f"WARNING: {path} holds the CUDA RNG of {len(cuda)} device(s), this worker sees {visible}; restoring the first {min(visible, len(cuda))}")
        for i in range(min(visible, len(cuda))):
            torch.cuda.set_rng_state(cuda[i], i)


def _gather_hashes(digest: str, world: int, device) -> list[str]:
    """Every rank's sha256 (hex), in rank order; tensors, not pickled objects, cross the wire."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=device)
    if world == 1 and not dist.is_initialized():
        return [digest]
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [bytes(t.cpu().tolist()).hex() for t in out]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
