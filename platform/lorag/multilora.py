"""Batched multi-LoRA: many adapters on one base model, mixed row by row in one forward pass.

Owns the Punica / S-LoRA / LoRAX-style serving path: `LoraWeights` (a PEFT adapter directory read
from safetensors only), `MultiLoraModel` (wraps a HF causal LM in place: every target `nn.Linear`
becomes a `BatchedLoraLinear` with preallocated adapter slots), `find_segments` (how a batch's rows
group by adapter) and `generate_batch` (left-padded greedy or shared-parameter sampling).

    mm = MultiLoraModel(model, max_adapters=8, max_rank=16)
    a = mm.load("support@v3", LoraWeights.load(store.resolve("support", 3)))
    out = generate_batch(mm, [ids1, ids2], slots=[a, 0], max_new_tokens=32, pad_id=tok.pad_token_id)

Slot 0 is the base model; slots 1..max_adapters hold adapters. Each slot's LoRA pair lives in two
stacked buffers per layer, `lora_A [max_adapters * max_rank, in]` and `lora_B [out, max_adapters *
max_rank]`, zero-padded to `max_rank`, with PEFT's `alpha / r` scaling folded into B at load.
Rows of slot 0 get exactly the base model's output: their LoRA term is never added, or is an exact
zero. The row -> slot mapping is set once per batch (`set_batch` / `rows`) and holds for the whole
`model.generate` call, so the per-layer work (views, masks) is planned once, not per step.

How the LoRA term is computed (`strategy`), measured with bench/serve.py on SmolLM2-135M, 2 CPU
threads, batch 8, 32 greedy tokens (tokens/s relative to the base model, one interleaved run):
- one adapter for every row: `x @ A_s^T` then `y.addmm_(h, B_s^T)`, two small matmuls a layer;
- "dense" (default up to `dense_max_slots` distinct adapters): one matmul against the contiguous
  span of slot buffers the batch uses, a row mask that zeroes other slots' columns, one addmm.
  It does K times the LoRA FLOPs for K adapters but only 3 ops a layer, and on CPU the per-op
  overhead of 210 small layers dominates: measured TODO
- "bmm" (more distinct adapters): per-row A and B gathered once per batch, then `bmm`/`baddbmm_`.
  Exact FLOPs, 2 ops a layer, but per-row copies of the weights: measured TODO
- "segments" (LoRAX's loop over runs of equal slots, `find_segments`): 2 matmuls per run per
  layer; the Python/dispatch overhead grows with the number of runs: measured TODO
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
# Config fields whose effect the batched path cannot reproduce row by row.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are served through peft, not the batched path",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D bases such as GPT-2) is not supported",
    "lora_bias": "LoRA biases are not supported",
    "modules_to_save": "fully trained modules (modules_to_save) cannot differ per row",
    "trainable_token_indices": "trained token embeddings cannot differ per row",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
}


def find_segments(indices: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split a batch's per-row adapter indices into runs of equal values.

    Returns:
        (boundaries, adapters): run `i` covers rows `boundaries[i]:boundaries[i + 1]` and uses
        `adapters[i]`. `[1, 1, 0, 2]` gives `([0, 2, 3, 4], [1, 0, 2])`; `[]` gives `([0], [])`.
    """
    bounds, adapters = [0], []
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] != indices[i - 1]:
            bounds.append(i)
            adapters.append(indices[i - 1])
    return bounds, adapters


@dataclass(frozen=True)
class LoraWeights:
    """One PEFT LoRA adapter: base-model module name -> (A `[r, in]`, B `[out, r]` with the scaling folded in)."""

    path: Path
    base_model: str | None
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)

    @classmethod
    def load(cls, path: str | Path) -> LoraWeights:
        """Read `adapter_config.json` and `adapter_model.safetensors` from a PEFT adapter directory.

        Raises:
            ValueError: no safetensors file (a `.bin` is never unpickled), a config option the
                batched path cannot serve (DoRA, biases, modules_to_save, ...), or unexpected tensors.
        """
        path = Path(path)
        weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
        if not weights.is_file():
            if (path / "adapter_model.bin").is_file():
                raise ValueError(f"{path} holds only adapter_model.bin: lorag loads adapters from safetensors only "
                                 "(a .bin is a pickle and can run code); re-save it with save_pretrained(safe_serialization=True)")
            raise ValueError(f"{path} is not a PEFT adapter directory: adapter_model.safetensors is missing")
        if not config.is_file():
            raise ValueError(f"{path} is not a PEFT adapter directory: adapter_config.json is missing")
        cfg = json.loads(config.read_text())
        problems = [f"{k}={cfg[k]!r}: {why}" for k, why in _UNSUPPORTED.items() if cfg.get(k)]
        if cfg.get("peft_type", "LORA") != "LORA":
            problems.append(f"peft_type={cfg['peft_type']!r}: only LORA adapters can be batched")
        if cfg.get("bias", "none") != "none":
            problems.append(f"bias={cfg['bias']!r}: trained base biases cannot differ per row")
        if problems:
            raise ValueError(f"adapter {path} cannot be served by the batched LoRA path: " + "; ".join(problems))

        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(weights).items():
            m = _KEY.match(key)
            if m is None:
                raise ValueError(f"adapter {path}: unexpected tensor {key!r}; only Linear LoRA pairs (...lora_A.weight, ...lora_B.weight) are supported")
            pairs.setdefault(m[1], {})[m[2]] = tensor
        modules = {}
        for name, ab in pairs.items():
            if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
                raise ValueError(f"adapter {path}: {name} has lora_A {_shape(ab.get('A'))} and lora_B {_shape(ab.get('B'))}, not a rank-r pair")
            r = ab["A"].shape[0]
            alpha = cfg.get("lora_alpha", 8)
            for pattern, value in (cfg.get("alpha_pattern") or {}).items():  # PEFT's get_pattern_key rule
                if re.match(rf"(.*\.)?({pattern})$", name):
                    alpha = value
                    break
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            modules[name] = (ab["A"], ab["B"] * scale)
        return cls(path, cfg.get("base_model_name_or_path"), modules)


class BatchedLoraLinear(nn.Module):
    """A frozen `nn.Linear` plus stacked LoRA slots; each batch row adds its own slot's `B_s A_s x`.

    Shares the Linear's `weight` and `bias` parameters, so the model's state_dict keys are unchanged
    (the slot buffers are not persistent).
    """

    def __init__(self, linear: nn.Linear, max_adapters: int, max_rank: int):
        super().__init__()
        self.in_features, self.out_features, self.max_rank = linear.in_features, linear.out_features, max_rank
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        w = linear.weight.detach()
        self.register_buffer("lora_A", w.new_zeros(max_adapters * max_rank, self.in_features), persistent=False)
        self.register_buffer("lora_B", w.new_zeros(self.out_features, max_adapters * max_rank), persistent=False)
        self.ranks = [0] * (max_adapters + 1)  # rank held by each slot (slot 0, the base, is always 0)
        self.plan: tuple | None = None  # set by MultiLoraModel.set_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.plan is None:
            return y
        kind, rows, a, b, mask = self.plan
        assert x.shape[0] == rows, f"the batch has {x.shape[0]} rows but set_batch was given {rows}"
        if kind == "bmm":
            return y.baddbmm_(torch.bmm(x, a), b)
        if kind == "segments":
            for lo, hi, a_s, b_s in a:
                h = F.linear(x[lo:hi], a_s)
                y[lo:hi].view(-1, self.out_features).addmm_(h.view(-1, h.shape[-1]), b_s)
            return y
        h = F.linear(x, a)
        if mask is not None:
            h.mul_(mask)
        y.view(-1, self.out_features).addmm_(h.view(-1, h.shape[-1]), b)
        return y

    def write_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        lo, r = (slot - 1) * self.max_rank, a.shape[0]
        self.lora_A[lo : lo + r].copy_(a)
        self.lora_B[:, lo : lo + r].copy_(b)
        self.ranks[slot] = r

    def clear_slot(self, slot: int) -> None:
        if self.ranks[slot]:
            lo = (slot - 1) * self.max_rank
            self.lora_A[lo : lo + self.max_rank].zero_()
            self.lora_B[:, lo : lo + self.max_rank].zero_()
            self.ranks[slot] = 0


class MultiLoraModel:
    """A HF causal LM wrapped in place so that each batch row can use its own LoRA adapter.

    Not thread-safe: `set_batch` configures the whole model, so hold a lock from `set_batch` (or
    `rows`) through the forward passes or `generate` call it is for.
    """

    def __init__(self, model: nn.Module, max_adapters: int = 8, max_rank: int = 16, target_modules: Sequence[str] = TARGETS,
                 strategy: str = "auto", dense_max_slots: int = 8):
        """Wrap every `nn.Linear` named in `target_modules` (the decoder layers' projections by default).

        Args:
            model: the base model; modified in place (its state_dict keys do not change).
            max_adapters: slots 1..max_adapters; each costs one rank-`max_rank` copy of every target layer.
            max_rank: largest adapter rank accepted; smaller ranks are zero-padded.
            target_modules: names of the Linear layers to wrap; an adapter may target a subset.
            strategy: "auto", "dense", "bmm" or "segments" (see the module docstring); "auto" is
                "dense" up to `dense_max_slots` distinct adapters in a batch, then "bmm".
        """
        if any(isinstance(m, BatchedLoraLinear) for m in model.modules()):
            raise ValueError("the model is already wrapped by a MultiLoraModel")
        assert strategy in ("auto", "dense", "bmm", "segments"), f"unknown strategy {strategy!r}"
        self.model, self.max_adapters, self.max_rank = model, max_adapters, max_rank
        self.strategy, self.dense_max_slots = strategy, dense_max_slots
        self.slots: dict[str, int] = {}
        self.layers: dict[str, BatchedLoraLinear] = {}
        for parent_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                if name in target_modules and type(child) is nn.Linear:
                    layer = BatchedLoraLinear(child, max_adapters, max_rank)
                    setattr(parent, name, layer)
                    self.layers[f"{parent_name}.{name}" if parent_name else name] = layer
        if not self.layers:
            raise ValueError(f"the model has no nn.Linear named {list(target_modules)}: nothing to attach adapters to")
        self._rows: list[int] | None = None

    def load(self, name: str, weights: LoraWeights | str | Path) -> int:
        """Copy an adapter into a free slot (or over its own slot when `name` is loaded) and return the slot.

        Raises:
            ValueError: the adapter targets modules this base lacks or does not wrap, its shapes differ
                from the base model's (the message lists every mismatch), or its rank exceeds max_rank.
            RuntimeError: every slot holds another adapter; `unload` one first.
        """
        if not isinstance(weights, LoraWeights):
            weights = LoraWeights.load(weights)
        problems = []
        if weights.rank > self.max_rank:
            problems.append(f"rank {weights.rank} exceeds max_rank {self.max_rank}")
        for module, (a, b) in weights.modules.items():
            layer = self.layers.get(module)
            if layer is None:
                problems.append(f"{module}: not a wrapped layer of this base model (wrapped: {_summary(self.layers)})")
            elif (b.shape[0], a.shape[1]) != (layer.out_features, layer.in_features):
                problems.append(f"{module}: adapter shape {[b.shape[0], a.shape[1]]} (out, in) != base weight shape {list(layer.weight.shape)}")
        if problems:
            raise ValueError(f"adapter {name!r} from {weights.path} (trained on {weights.base_model!r}) does not fit this base model:\n  - "
                             + "\n  - ".join(problems))
        slot = self.slots.get(name)
        if slot is None:
            free = sorted(set(range(1, self.max_adapters + 1)) - set(self.slots.values()))
            if not free:
                raise RuntimeError(f"all {self.max_adapters} adapter slots are in use ({sorted(self.slots)}): unload one first, or raise max_adapters")
            slot = free[0]
        with torch.no_grad():
            for layer in self.layers.values():
                layer.clear_slot(slot)
            for module, (a, b) in weights.modules.items():
                self.layers[module].write_slot(slot, a, b)
        self.slots[name] = slot
        self._replan()
        return slot

    def unload(self, name: str) -> int:
        """Zero and free `name`'s slot; rows still pointing at it get the base model. Returns the slot."""
        if name not in self.slots:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {sorted(self.slots)})")
        slot = self.slots.pop(name)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.clear_slot(slot)
        self._replan()
        return slot

    def set_batch(self, rows: Sequence[int] | None) -> None:
        """Use slot `rows[i]` (0: no adapter) for row i of every following forward pass; None: all base."""
        if rows is not None:
            empty = sorted({s for s in rows if s} - set(self.slots.values()))
            if empty:
                raise ValueError(f"rows use slots {empty}, which hold no adapter (loaded: {self.slots})")
        self._rows = None if rows is None else list(rows)
        self._replan()

    @contextlib.contextmanager
    def rows(self, rows: Sequence[int]) -> Iterator[None]:
        """`set_batch(rows)` for the `with` block, then back to the base model."""
        self.set_batch(rows)
        try:
            yield
        finally:
            self.set_batch(None)

    def _replan(self) -> None:
        rows = self._rows
        if not rows or not any(rows):
            for layer in self.layers.values():
                layer.plan = None
            return
        bounds, adapters = find_segments(rows)
        index = torch.tensor(rows)
        first = next(iter(self.layers.values())).lora_A
        r, n = self.max_rank, len(rows)
        mask = first.new_zeros(n, 1, self.max_adapters * r)
        for i, s in enumerate(rows):
            if s:
                mask[i, 0, (s - 1) * r : s * r] = 1
        for layer in self.layers.values():
            live = sorted({s for s in adapters if s and layer.ranks[s]})
            if not live:
                layer.plan = None
            elif len(adapters) == 1:  # every row uses the same adapter: no mask, its exact rank
                lo = (live[0] - 1) * r
                rank = layer.ranks[live[0]]
                layer.plan = ("mm", n, layer.lora_A[lo : lo + rank], layer.lora_B[:, lo : lo + rank].t(), None)
            else:
                strategy = self.strategy
                if strategy == "auto":
                    strategy = "dense" if len(live) <= self.dense_max_slots else "bmm"
                layer.plan = _plan(strategy, layer, n, live, bounds, adapters, index, mask)


def _plan(strategy: str, layer: BatchedLoraLinear, n: int, live: list[int], bounds: list[int], adapters: list[int],
          index: torch.Tensor, mask: torch.Tensor) -> tuple:
    r = layer.max_rank
    if strategy == "dense":  # the span of slots in use; other slots' columns are masked to exact zeros
        lo, hi = (live[0] - 1) * r, live[-1] * r
        return ("mm", n, layer.lora_A[lo:hi], layer.lora_B[:, lo:hi].t(), mask[:, :, lo:hi].contiguous())
    if strategy == "segments":
        runs = [(bounds[i], bounds[i + 1], layer.lora_A[(s - 1) * r : (s - 1) * r + layer.ranks[s]],
                 layer.lora_B[:, (s - 1) * r : (s - 1) * r + layer.ranks[s]].t()) for i, s in enumerate(adapters) if s in live]
        return ("segments", n, runs, None, None)
    # bmm: per-row copies of A and B, gathered once per batch; base rows get zeros
    keep = (index > 0).to(layer.lora_A.dtype)[:, None, None]
    at = (index - 1).clamp(min=0)
    a = layer.lora_A.view(-1, r, layer.in_features).index_select(0, at) * keep  # [n, r, in]
    b = layer.lora_B.view(layer.out_features, -1, r).index_select(1, at).permute(1, 2, 0) * keep  # [n, r, out]
    return ("bmm", n, a.transpose(1, 2), b.contiguous(), None)


def generate_batch(mm: MultiLoraModel, prompts: Sequence[Sequence[int]], slots: Sequence[int], *, max_new_tokens: int,
                   pad_id: int, eos_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None) -> list[list[int]]:
    """Generate for a batch whose rows use different adapters, in one `model.generate` call.

    Prompts are left-padded with `pad_id`. Sampling parameters are shared by the whole batch
    (temperature 0: greedy); group requests by parameters before calling.

    Args:
        mm: the wrapped model; `slots[i]` must be loaded (0: the base model).
        prompts: token ids of each prompt (chat template already applied).
        eos_ids: stop tokens (default: the model's generation_config eos).
        seed: seeds torch's global RNG first (sampling only).

    Returns:
        The new tokens of each row, up to and including the first stop token.
    """
    if len(prompts) != len(slots):
        raise ValueError(f"{len(prompts)} prompts but {len(slots)} slots")
    if not prompts:
        return []
    if not all(prompts):
        raise ValueError("every prompt needs at least one token")
    eos = list(eos_ids) or _as_list(mm.model.generation_config.eos_token_id)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    sample = temperature > 0
    kwargs = {"do_sample": sample, "temperature": temperature if sample else None, "top_p": top_p if sample else None, "top_k": None}
    if sample and seed is not None:
        torch.manual_seed(seed)
    with mm.rows(slots), torch.inference_mode():
        out = mm.model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                pad_token_id=pad_id, eos_token_id=eos or None, **kwargs)
    result = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        result.append(row if stop is None else row[: stop + 1])
    return result


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _summary(layers: dict[str, BatchedLoraLinear]) -> str:
    names = sorted({name.rsplit(".", 1)[-1] for name in layers})
    return f"{len(layers)} layers named {names}"
