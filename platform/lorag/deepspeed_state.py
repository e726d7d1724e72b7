"""DeepSpeed's training state as full tensors, whatever the ZeRO stage or precision.

Owns where a DeepSpeed engine keeps each trainable parameter's fp32 master weight and optimizer
state, and reading or writing them as full (unsharded) fp32 tensors (`gather_full`, `get_full`,
`set_full`), plus giving a fresh optimizer the state entries to write into (`init_optimizer_state`).
`lorag.checkpoint` decides what goes into which file. Where the masters and state live:
- ZeRO-1/2/3: in fragments of flat fp32 partitions, one per rank, reached through the
  tensor-fragment API (`deepspeed.utils.safe_get_full_*` / `safe_set_full_*`); the torch
  optimizer's state is keyed by those flat partitions.
- stage 0, fp32: the torch optimizer updates the model's parameter itself (its `state[param]`).
- stage 0, bf16/fp16 (FP16_UnfusedOptimizer): the torch optimizer updates an fp32 copy per
  parameter (`fp32_groups`, paired with `fp16_groups`) and DeepSpeed copies it back to the model.
In every case torch's AdamW keeps `exp_avg`/`exp_avg_sq` and a float32 scalar tensor `step`
(FP16_UnfusedOptimizer takes one zero-gradient step at construction, so its count is one ahead).
Also here: the engine's step counters and the dynamic fp16 loss scaler's fields, the only
attributes a resume sets (`restore_counters`).
"""

from __future__ import annotations

from typing import Any

LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")  # dynamic fp16 loss scaling
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def trainable_params(engine) -> dict[str, Any]:
    """Name -> parameter of the engine's model, trainable ones only (what a checkpoint saves)."""
    return {name: p for name, p in engine.module.named_parameters() if p.requires_grad}


def full_shape(p) -> list[int]:
    """`p`'s shape before ZeRO-3 partitioned it."""
    return list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)  # ZeRO-3 parameters are partitioned


def base_optimizer(engine):
    """The torch optimizer that holds the state: DeepSpeed's wrappers keep it as `.optimizer`."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def fp32_masters(engine, params: dict[str, Any]) -> dict[str, Any] | None:
    """None under ZeRO (the fragment API finds the masters); else name -> the fp32 tensor the torch optimizer updates."""
    import torch

    if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params.values()):
        return None
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        owned = {id(q): q for group in opt.param_groups for q in group["params"]}
    elif isinstance(getattr(opt, "fp32_groups", None), list):  # FP16_UnfusedOptimizer
        owned = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
    else:
        owned = {}
    if missing := [name for name, p in params.items() if id(p) not in owned]:
        raise ValueError(
            f"checkpoint: cannot find the fp32 master of {missing[:3]} in DeepSpeed's {type(opt).__name__}; lorag checkpoints "
            "support ZeRO stages 1-3 with any precision and stage 0 with a torch optimizer (not DeepSpeed's fused FP16_Optimizer)"
        )
    return {name: owned[id(p)] for name, p in params.items()}


def state_owners(engine) -> list[Any]:
    """The flat fp32 partitions a ZeRO optimizer keeps its torch optimizer's state under.

    ZeRO-3 empties the torch optimizer's param_groups between steps, so they cannot be read from there.
    """
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):  # ZeRO-3, ZeRO-1/2, bf16
        owners = getattr(engine.optimizer, attr, None)
        if owners is not None:
            return [t for t in owners if t is not None]
    raise ValueError(f"checkpoint: unsupported DeepSpeed optimizer {type(engine.optimizer).__name__}")


def get_full(engine, p, master, key: str | None = None):
    """The full fp32 master weight (key None) or optimizer state `key` of `p`, on CPU. Collective under ZeRO."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if master is None:
        full = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    else:
        full = master if key is None else base_optimizer(engine).state[master][key]
    return full.detach().reshape(full_shape(p)).to("cpu", torch.float32, copy=True).contiguous()


def gather_full(engine, params: dict[str, Any], masters: dict[str, Any] | None, keys: list[str], without_state: set[str],
                rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(name -> fp32 master weight, "<key>.<name>" -> optimizer state) as full CPU tensors on rank 0, empty elsewhere.

    Every rank must call it: the gathers are collective under ZeRO.
    """
    weights: dict[str, Any] = {}
    moments: dict[str, Any] = {}
    for name, p in params.items():
        full = get_full(engine, p, None if masters is None else masters[name])
        if rank == 0:
            weights[name] = full
    for name, p in params.items():
        for key in [] if name in without_state else keys:
            full = get_full(engine, p, None if masters is None else masters[name], key)
            if rank == 0:
                moments[f"{key}.{name}"] = full
    return weights, moments


def set_full(engine, p, master, value, rank: int, key: str | None = None) -> None:
    """Set `p`'s fp32 master weight and its model copy (key None), or its optimizer state `key`."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    with torch.no_grad():
        if master is not None:
            target = master if key is None else base_optimizer(engine).state[master][key]
            target.copy_(value.reshape(target.shape))
            if key is None and master is not p:
                p.data.copy_(value.to(p.dtype))
            return
        value = value.to(p.device)
        if key is not None:
            safe_set_full_optimizer_state(p, value, key)
            return
        safe_set_full_fp32_param(p, value)
        # The fragment API sets the fp32 master only; the model's (possibly bf16) copy follows it, as
        # DeepSpeed does after each step. ZeRO-3 partitions it: gather, set on one rank, re-partition.
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(value.to(p.dtype))
        else:
            p.data.copy_(value.to(p.dtype))


def optimizer_layout(engine, params: dict[str, Any], masters: dict[str, Any] | None) -> tuple[list[str], int, set[str]]:
    """(state keys that hold one value per element, the shared step count, trainable names with no state yet)."""
    base = base_optimizer(engine)
    if masters is None:
        without: set[str] = set()
        states = [base.state[q] for q in state_owners(engine) if len(base.state.get(q, {}))]
    else:
        without = {name for name, m in masters.items() if not len(base.state.get(m, {}))}
        states = [base.state[m] for name, m in masters.items() if name not in without]
    if not states:
        return [], 0, set(params)
    keys = sorted(k for k, v in states[0].items() if hasattr(v, "dim") and v.dim() > 0)
    steps = {int(s["step"]) for s in states if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"checkpoint: the optimizer's parameters are at different steps {sorted(steps)}; cannot save one step count")
    return keys, steps.pop() if steps else 0, without


def init_optimizer_state(engine, owners: list[Any], keys: list[str], step: int) -> None:
    """Give a fresh optimizer the state entries its first step would create, so the saved values can be copied in.

    torch's AdamW creates its state on the first step, and ZeRO-1/2 link their fp32 fragments to
    that state only then; a resumed engine has taken no step yet.
    """
    import torch

    base = base_optimizer(engine)
    group = base.param_groups[0] if base.param_groups else {}
    for q in owners:
        state = base.state[q]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(q, memory_format=torch.preserve_format)
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(step)
        elif "step" in state:
            state["step"] = step
        else:  # as torch's AdamW creates it: float32, on the parameter's device only when fused or capturable
            device = q.device if group.get("fused") or group.get("capturable") else "cpu"
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 and not group.get("fused") else torch.float32
            state["step"] = torch.tensor(float(step), dtype=dtype, device=device)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 and the bf16 optimizer: point each parameter's fragment at the state
        link()


def loss_scaler(engine):
    """The dynamic fp16 loss scaler, if any: ZeRO keeps `loss_scaler`, FP16_UnfusedOptimizer `loss_scale_config`."""
    for attr, dynamic in (("loss_scaler", "dynamic"), ("loss_scale_config", "dynamic_loss_scale")):
        scaler = getattr(engine.optimizer, attr, None)
        if scaler is not None and getattr(scaler, dynamic, False):
            return scaler
    return None


def loss_scale(engine) -> dict[str, Any] | None:
    """The dynamic loss scaler's `LOSS_SCALE_FIELDS` as JSON numbers; None without one."""
    scaler = loss_scaler(engine)
    if scaler is None:
        return None
    return {k: float(v) if k == "cur_scale" else int(v) for k in LOSS_SCALE_FIELDS if (v := getattr(scaler, k, None)) is not None}


def restore_counters(engine, counters: dict[str, int], saved_scale: dict[str, Any] | None) -> None:
    """Set the engine's step counters and the dynamic loss scaler's fields (if it has one) from saved values."""
    for key in ENGINE_COUNTERS:  # known fields only: never an attribute named by the file
        setattr(engine, key, counters[key])
    scaler = loss_scaler(engine)
    saved_scale = saved_scale or {}
    for key in LOSS_SCALE_FIELDS if scaler is not None else ():
        if key in saved_scale:
            setattr(scaler, key, saved_scale[key])
