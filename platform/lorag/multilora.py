"""Batched multi-LoRA: many adapters on one base model, mixed row by row in one forward pass.

Owns the Punica / S-LoRA / LoRAX-style serving path: `LoraWeights` (a PEFT adapter directory read
from safetensors only), `MultiLoraModel` (wraps a HF causal LM in place: every target `nn.Linear`
becomes a `BatchedLoraLinear` with preallocated adapter slots), `find_segments` (how a batch's rows
group by adapter) and `generate_batch` (left-padded greedy or shared-parameter sampling, in which
a row whose scores turn NaN ends alone).

    mm = MultiLoraModel(model, max_adapters=8, max_rank=16)
    a = mm.load("support@v3", LoraWeights.load(store.resolve("support", 3)))
    out = generate_batch(mm, [ids1, ids2], slots=[a, 0], max_new_tokens=32, pad_id=tok.pad_token_id)

Slot 0 is the base model; slots 1..max_adapters hold adapters. Each slot's LoRA pair lives in two
stacked buffers per layer, `lora_A [max_adapters * max_rank, in]` and `lora_B` (B transposed,
`[max_adapters * max_rank, out]`, so any run of slots is one contiguous block of rows), zero-padded
to `max_rank`, with PEFT's `alpha / r` scaling folded into B at load.
DoRA adapters also keep, per layer, `m / ||W + BA||_row` (computed at load); a batch with DoRA rows
multiplies each output row by its adapter's scale (1 for other rows) and adds the bias after it,
and a merged DoRA weight is row-scaled.
Rows of slot 0 get exactly the base model's output: their LoRA term is never added, or is an exact
zero (only where a DoRA row shares the batch and the layer has a bias can the later bias add differ
in the last bit). The row -> slot mapping is set once per batch (`set_batch` / `rows`) and holds for the whole
`model.generate` call, so the per-layer work (views, masks) is planned once, not per step.

How the LoRA term is computed. A prompt (prefill) runs one matmul pair per run of rows with the
same adapter (`find_segments`), so its FLOPs are exact and the per-op overhead is amortised over
the prompt's tokens. A decode step (one token a row) is where the op count matters, so it has its
own plan, chosen by `strategy`:
- every row on one adapter: the merged weight `W + B_s A_s` (`merge_single`, the default; kept in
  a second copy of each wrapped weight and recomputed only when the batch's adapter changes), so
  prefill and decode cost exactly the base model's; without it `h = x A_s^T`, `y.addmm_(h, B_s^T)`;
- "dense" (auto up to `dense_max_slots` adapters): one matmul against the A's of the adapters the
  batch uses, back to back at their own ranks (`pack`: a view of the slot buffers, or a cached
  copy without the zero padding when slots are sized for a larger rank), a mask that zeroes each
  row's other adapters, one addmm: 3 ops a layer, K times the LoRA FLOPs for K adapters;
- "segments" (auto beyond): the prefill plan, 2 matmuls per run per layer, exact FLOPs.
Measured (SmolLM2-135M, 30 layers x 7 wrapped Linears, batch 8, 4 rank-16 adapters on all 7;
1 thread, CPU time of one decode-shaped forward, median of 20 interleaved; base = 1.00): one
adapter 1.09, dense 1.20, segments 1.31, a padded gather/`bmm`/`index_add_` grouping 1.28, and
per-row gathered A/B with 2 `bmm`s ~1.26 plus ~290 ms per `set_batch` for the per-row copies
(dropped, as was the grouping). bf16 slot buffers upcast per step did not help (1.20 vs 1.23):
on this CPU the extra time tracks the adapter weights read per step, which for 4 rank-16
adapters are already 14% of the base model's bytes. Nor did (later, 2 threads, decode step vs
base) LoRA matmuls in bf16 on an AVX512-BF16 CPU (0.79x vs 0.86x in fp32) or one A-matmul shared
by the layers that read the same input (q/k/v, gate/up: 0.83x vs 0.84x). In whole `generate` calls (bench/serve.py,
2 threads) 8 adapters in a batch of 32 decoded dense ran at 0.90x of base against 0.80x with
segments, hence `dense_max_slots=8`. End-to-end ratios: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TemperatureLogitsWarper,
                          TopPLogitsWarper)

from lorag.schemas import MIN_TEMPERATURE

MERGED = "merged"  # a layer plan: run on the layer's merged weight
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
_MAGNITUDE = re.compile(r"^base_model\.model\.(.+)\.lora_magnitude_vector(?:\.weight)?$")  # DoRA
# Config fields whose effect the batched path cannot reproduce row by row.
_UNSUPPORTED = {
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
    """One PEFT LoRA adapter: base-model module name -> (A `[r, in]`, B `[out, r]` with the scaling folded in).

    A DoRA adapter also has `magnitudes`: module name -> the learned magnitude `m` `[out]`. Its layer
    computes `m / ||W + BA||_row * (W + BA) x + bias` (peft's DoRA at inference, norm per output row).
    """

    path: Path
    base_model: str | None
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)

    @classmethod
    def load(cls, path: str | Path) -> LoraWeights:
        """Read `adapter_config.json` and `adapter_model.safetensors` from a PEFT adapter directory.

        Raises:
            ValueError: no safetensors file (a `.bin` is never unpickled), a config option the
                batched path cannot serve (biases, modules_to_save, ...), or files that are not
                what PEFT writes: a config that is no JSON object, a safetensors file that does
                not parse, unexpected tensors, a pair that is not two matrices of one rank, or
                weights that are NaN or infinite.
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
        try:
            cfg = json.loads(config.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"adapter {path}: adapter_config.json is not JSON ({e})") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"adapter {path}: adapter_config.json must hold a JSON object (PEFT's LoraConfig), not {type(cfg).__name__}")
        problems = [f"{k}={cfg[k]!r}: {why}" for k, why in _UNSUPPORTED.items() if cfg.get(k)]
        if cfg.get("peft_type", "LORA") != "LORA":
            problems.append(f"peft_type={cfg['peft_type']!r}: only LORA adapters can be batched")
        if cfg.get("bias", "none") != "none":
            problems.append(f"bias={cfg['bias']!r}: trained base biases cannot differ per row")
        patterns = cfg.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            problems.append(f"alpha_pattern={patterns!r}: not a JSON object of module pattern -> alpha")
            patterns = {}
        for key, alpha in {"lora_alpha": cfg.get("lora_alpha", 8), **{f"alpha_pattern[{k!r}]": v for k, v in patterns.items()}}.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                problems.append(f"{key}={alpha!r}: not a finite number")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"alpha_pattern[{pattern!r}]: not a regular expression ({e})")
        if problems:
            raise ValueError(f"adapter {path} cannot be served by the batched LoRA path: " + "; ".join(problems))
        try:
            tensors = load_file(weights)
        except SafetensorError as e:
            raise ValueError(f"adapter {path}: adapter_model.safetensors is not a readable safetensors file ({e})") from e

        pairs: dict[str, dict[str, torch.Tensor]] = {}
        magnitudes: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"adapter {path}: tensor {key!r} is {'NaN or infinite in places' if tensor.is_floating_point() else 'not floating point'}: "
                                 "not a usable adapter (a diverged training run?)")
            if (m := _MAGNITUDE.match(key)) and cfg.get("use_dora"):
                magnitudes[m[1]] = tensor
                continue
            m = _KEY.match(key)
            if m is None:
                raise ValueError(f"adapter {path}: unexpected tensor {key!r}; only Linear LoRA pairs (...lora_A.weight, ...lora_B.weight) "
                                 "and DoRA magnitudes are supported")
            if tensor.ndim != 2 or 0 in tensor.shape:
                raise ValueError(f"adapter {path}: {key} has shape {_shape(tensor)}, not a matrix (LoRA's A is [r, in], B is [out, r])")
            pairs.setdefault(m[1], {})[m[2]] = tensor
        for name, m in magnitudes.items():
            if "B" not in pairs.get(name, {}) or m.shape != (pairs[name]["B"].shape[0],):
                raise ValueError(f"adapter {path}: DoRA magnitude of {name} has shape {_shape(m)}, which matches no lora_B of that module")
        if cfg.get("use_dora") and set(magnitudes) != set(pairs):
            raise ValueError(f"adapter {path}: use_dora is set but {sorted(set(pairs) - set(magnitudes))} have no lora_magnitude_vector")
        modules = {}
        for name, ab in pairs.items():
            if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
                raise ValueError(f"adapter {path}: {name} has lora_A {_shape(ab.get('A'))} and lora_B {_shape(ab.get('B'))}, not a rank-r pair")
            r = ab["A"].shape[0]
            alpha = cfg.get("lora_alpha", 8)
            for pattern, value in patterns.items():  # PEFT's get_pattern_key rule
                if re.match(rf"(.*\.)?({pattern})$", name):
                    alpha = value
                    break
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            modules[name] = (ab["A"], ab["B"] * scale)
            if not bool(torch.isfinite(modules[name][1]).all()):
                raise ValueError(f"adapter {path}: {name}'s lora_B times its scaling ({alpha} / rank {r}) overflows; lower lora_alpha")
        return cls(path, cfg.get("base_model_name_or_path"), modules, magnitudes)


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
        self.register_buffer("lora_B", w.new_zeros(max_adapters * max_rank, self.out_features), persistent=False)  # B^T
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A_s [r, in], B_s^T [r, out]) views
        self.merged: torch.Tensor | None = None  # W + B_s A_s for `merged_slot` (allocated on first use)
        self.merged_slot: int | None = None
        self.packed: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None  # (slots, A, B^T) from `pack`
        self.scales: dict[int, torch.Tensor] = {}  # DoRA slots: m / ||W + B_s A_s||_row, [out]
        # (rows, decode plan, prefill plan, row scales) from MultiLoraModel.set_batch; a plan is
        # MERGED, (A, B^T, mask) or a list of (first row, end row, A_s, B_s^T) runs; row scales
        # ([rows, 1, out], 1 for non-DoRA rows) or None when no row of the batch uses DoRA here
        self.plan: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            return F.linear(x, self.weight, self.bias)
        rows, decode, prefill, scale = self.plan
        assert x.shape[0] == rows, f"the batch has {x.shape[0]} rows but set_batch was given {rows}"
        plan = decode if x.shape[1] == 1 else prefill
        if plan is MERGED:
            return F.linear(x, self.merged, self.bias)
        y = F.linear(x, self.weight, self.bias if scale is None else None)
        if isinstance(plan, list):
            for lo, hi, a, bt in plan:
                h = F.linear(x[lo:hi], a)
                y[lo:hi].view(-1, self.out_features).addmm_(h.view(-1, h.shape[-1]), bt)
        else:
            a, bt, mask = plan
            h = F.linear(x, a)
            if mask is not None:
                h.mul_(mask)
            y.view(-1, self.out_features).addmm_(h.view(-1, h.shape[-1]), bt)
        if scale is not None:  # DoRA rows: m / ||W + BA|| * (W + BA) x, then the bias
            y.mul_(scale)
            if self.bias is not None:
                y.add_(self.bias)
        return y

    def merge(self, slot: int) -> None:
        """Make `merged` = W + B_s A_s (row-scaled for DoRA; the base weight itself is never modified); kept until the slot changes."""
        if self.merged_slot == slot:
            return
        a, bt = self.pairs[slot]
        with torch.no_grad():
            if self.merged is None:
                self.merged = torch.empty_like(self.weight, requires_grad=False)
            torch.addmm(self.weight.detach(), bt.t(), a, out=self.merged)
            if slot in self.scales:
                self.merged.mul_(self.scales[slot][:, None])
        self.merged_slot = slot

    def pack(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B^T of `slots` (sorted, all loaded here) back to back, each at its own rank.

        A view of the slot buffers when they already lie so (consecutive slots, each at max_rank);
        otherwise a copy without the zero padding, kept until the slots asked for or their contents
        change. A replica sized for rank 64 serving rank-8 adapters would else read and multiply
        eight times the adapters' bytes on every decode step.
        """
        r = self.max_rank
        if slots[-1] - slots[0] + 1 == len(slots) and all(self.pairs[s][0].shape[0] == r for s in slots):
            span = slice((slots[0] - 1) * r, slots[-1] * r)
            return self.lora_A[span], self.lora_B[span]
        if self.packed is None or self.packed[0] != slots:
            with torch.no_grad():
                self.packed = (slots, torch.cat([self.pairs[s][0] for s in slots]), torch.cat([self.pairs[s][1] for s in slots]))
        return self.packed[1], self.packed[2]

    def write_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
        if self.merged_slot == slot:
            self.merged_slot = None
        self.packed = None
        lo, r = (slot - 1) * self.max_rank, a.shape[0]
        self.lora_A[lo : lo + r].copy_(a)
        self.lora_B[lo : lo + r].copy_(b.t())
        self.pairs[slot] = (self.lora_A[lo : lo + r], self.lora_B[lo : lo + r])
        if magnitude is not None:  # peft's DoRA: the norm of W + BA per output row, a constant at inference
            norm = torch.linalg.norm(torch.addmm(self.weight.detach(), self.lora_B[lo : lo + r].t(), self.lora_A[lo : lo + r]), dim=1)
            self.scales[slot] = (magnitude.to(norm) / norm).to(self.weight.dtype)

    def clear_slot(self, slot: int, wipe: bool = False) -> None:
        """Empty `slot`; its rows are zeroed if they held a pair, or always with `wipe` (after a failed write)."""
        if self.merged_slot == slot:
            self.merged_slot = None
        self.packed = None
        self.scales.pop(slot, None)
        if self.pairs.pop(slot, None) is not None or wipe:
            lo = (slot - 1) * self.max_rank
            self.lora_A[lo : lo + self.max_rank].zero_()
            self.lora_B[lo : lo + self.max_rank].zero_()


class MultiLoraModel:
    """A HF causal LM wrapped in place so that each batch row can use its own LoRA adapter.

    Not thread-safe: `set_batch` configures the whole model, so hold a lock from `set_batch` (or
    `rows`) through the forward passes or `generate` call it is for.
    """

    def __init__(self, model: nn.Module, max_adapters: int = 8, max_rank: int = 16, target_modules: Sequence[str] = TARGETS,
                 strategy: str = "auto", dense_max_slots: int = 8, merge_single: bool = True):
        """Wrap every `nn.Linear` named in `target_modules` (the decoder layers' projections by default).

        Args:
            model: the base model; modified in place (its state_dict keys do not change).
            max_adapters: slots 1..max_adapters; each costs one rank-`max_rank` copy of every target layer.
            max_rank: largest adapter rank accepted; smaller ranks are zero-padded.
            target_modules: names of the Linear layers to wrap; an adapter may target a subset.
            strategy: how mixed batches decode (see the module docstring): "auto" is "dense" when
                a batch uses at most `dense_max_slots` adapters, else "segments".
            merge_single: a batch whose rows all use one adapter runs on merged weights W + BA
                (computed once per adapter change into a second copy of each wrapped weight, so the
                base weights stay exact): base-model speed for the price of that copy's memory.
        """
        if any(isinstance(m, BatchedLoraLinear) for m in model.modules()):
            raise ValueError("the model is already wrapped by a MultiLoraModel")
        assert strategy in ("auto", "dense", "segments"), f"unknown strategy {strategy!r}: use auto, dense or segments"
        self.model, self.max_adapters, self.max_rank = model, max_adapters, max_rank
        self.strategy, self.dense_max_slots, self.merge_single = strategy, dense_max_slots, merge_single
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

        A load that fails for any reason (an out-of-memory error while copying included) leaves
        the slot empty and `name` not loaded: a slot never holds half an adapter.

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
        self.slots.pop(name, None)
        try:
            with torch.no_grad():
                for layer in self.layers.values():
                    layer.clear_slot(slot)
                for module, (a, b) in weights.modules.items():
                    self.layers[module].write_slot(slot, a, b, weights.magnitudes.get(module))
        except BaseException:
            with torch.no_grad():
                for layer in self.layers.values():
                    layer.clear_slot(slot, wipe=True)
            self._replan()
            raise
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
        """Use slot `rows[i]` (0: no adapter) for row i of every following forward pass; None: all base.

        Rows sorted by slot run fastest (one run per adapter in prefill); `generate_batch` sorts them.
        """
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
        """Precompute each layer's work for the current rows, once per batch rather than per step."""
        rows = self._rows
        if not rows or not any(rows):
            for layer in self.layers.values():
                layer.plan = None
            return
        bounds, adapters = find_segments(rows)
        used = sorted(set(adapters) - {0})
        n = len(rows)
        masks: dict[tuple[tuple[int, int], ...], torch.Tensor] = {}
        for layer in self.layers.values():
            live = [s for s in used if s in layer.pairs]
            if not live:
                layer.plan = None
                continue
            if len(adapters) == 1 and self.merge_single:  # every row uses one adapter: merged weights (DoRA's scale included)
                layer.merge(live[0])
                layer.plan = (n, MERGED, MERGED, None)
                continue
            scale = None
            if any(s in layer.scales for s in live):
                scale = layer.weight.new_ones(n, 1, layer.out_features)
                for i, s in enumerate(rows):
                    if s in layer.scales:
                        scale[i, 0] = layer.scales[s]
            if len(adapters) == 1:  # one adapter, unmerged: no mask, its exact rank
                single = (*layer.pairs[live[0]], None)
                layer.plan = (n, single, single, scale)
                continue
            # prefill: one matmul pair per run of rows, exact FLOPs; the ops' overhead is amortised over the prompt
            runs = [(bounds[i], bounds[i + 1], *layer.pairs[s]) for i, s in enumerate(adapters) if s in layer.pairs]
            decode = runs
            if self.strategy == "dense" or (self.strategy == "auto" and len(live) <= self.dense_max_slots):
                a, bt = layer.pack(tuple(live))
                layout = tuple((s, layer.pairs[s][0].shape[0]) for s in live)  # the columns of `a`, slot by slot
                if layout not in masks:
                    masks[layout] = _mask(rows, layout, layer.lora_A)
                decode = (a, bt, masks[layout])
            layer.plan = (n, decode, runs, scale)


def _mask(rows: list[int], layout: tuple[tuple[int, int], ...], like: torch.Tensor) -> torch.Tensor:
    """[rows, 1, sum of ranks]: ones on the columns of each row's slot in `layout` ((slot, rank) back to back), zeros elsewhere."""
    mask = like.new_zeros(len(rows), 1, sum(r for _, r in layout))
    start, lo = {}, 0
    for s, r in layout:
        start[s], lo = (lo, r), lo + r
    for i, s in enumerate(rows):
        if s in start:
            mask[i, 0, start[s][0] : start[s][0] + start[s][1]] = 1
    return mask


def generate_batch(mm: MultiLoraModel, prompts: Sequence[Sequence[int]], slots: Sequence[int], *, max_new_tokens: int,
                   pad_id: int, eos_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                   gone: Callable[[int], bool] | None = None, on_token: Callable[[int, int], bool] | None = None,
                   on_error: Callable[[int], None] | None = None) -> list[list[int]]:
    """Generate for a batch whose rows use different adapters, in one `model.generate` call.

    Prompts are left-padded with `pad_id`. Sampling parameters are shared by the whole batch
    (temperature 0, or below `MIN_TEMPERATURE`: greedy); group requests by parameters before calling.
    No sampling parameter can make the scores NaN; a row whose scores still stop being a
    distribution (NaN or infinite: an adapter whose weights overflow the model) ends alone (`Finite`).

    Args:
        mm: the wrapped model; `slots[i]` must be loaded (0: the base model).
        prompts: token ids of each prompt (chat template already applied).
        eos_ids: stop tokens (default: the model's generation_config eos).
        seed: seeds torch's global RNG first (sampling only).
        frequency_penalty, presence_penalty: OpenAI's penalties on tokens the row has generated
            (`Penalties`); 0: none.
        gone: `gone(i)` is true once nobody waits for row i any more (a client that disconnected or
            timed out); checked after every token, such a row stops, and the call ends as soon as
            every row has stopped, instead of decoding for nobody up to `max_new_tokens`.
        on_token: `on_token(i, token)` is called with each new token of row i (on this thread);
            True ends row i there (its own length limit or stop sequence). Rows that ended stop
            being reported, and the call ends once every row has ended.
        on_error: `on_error(i)` is called (on this thread) once row i's scores are NaN or
            infinite; the row is then given a stop token and ends, and the other rows go on.

    Returns:
        The new tokens of each row, up to and including the first stop token (a row that was gone
        or failed: whatever it had, padded).

    Raises:
        ValueError: a sampling parameter that is not finite or out of its range.
        FloatingPointError: some rows got non-finite scores and no `on_error` was given (after
            the other rows are done).
    """
    if len(prompts) != len(slots):
        raise ValueError(f"{len(prompts)} prompts but {len(slots)} slots")
    problems = [f"{name}={value!r}: must be a finite number{bound}" for name, value, ok, bound in (
        ("temperature", temperature, temperature >= 0, " >= 0"), ("top_p", top_p, 0 < top_p <= 1, " in (0, 1]"),
        ("frequency_penalty", frequency_penalty, True, ""), ("presence_penalty", presence_penalty, True, ""),
    ) if not (math.isfinite(value) and ok)]
    if problems:
        raise ValueError("; ".join(problems))
    if not prompts:
        return []
    if not all(prompts):
        raise ValueError("every prompt needs at least one token")
    eos = list(eos_ids) or _as_list(mm.model.generation_config.eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: slots[i])  # one run per adapter (see set_batch)
    width = max(len(p) for p in prompts)
    device = next(mm.model.parameters()).device
    ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + list(prompts[i]) for i in order], device=device)
    attention = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in order], device=device)
    sample = temperature >= MIN_TEMPERATURE
    # The warpers are ours, not generate()'s (it is told 1.0), so that `Finite` runs after them, last.
    processors = [Penalties(frequency_penalty, presence_penalty, width)] if frequency_penalty or presence_penalty else []
    if sample:
        processors += [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        processors += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    guard = Finite(order, eos[0] if eos else pad_id, on_error)
    kwargs = {"do_sample": sample, "temperature": 1.0 if sample else None, "top_p": 1.0 if sample else None, "top_k": None,
              "logits_processor": LogitsProcessorList([*processors, guard])}
    if sample and seed is not None:
        torch.manual_seed(seed)
    criteria = ([CallerGone(gone, order)] if gone is not None else []) + ([TokenWatch(on_token, order)] if on_token is not None else [])
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    with mm.rows([slots[i] for i in order]), torch.inference_mode():
        out = mm.model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                pad_token_id=pad_id, eos_token_id=eos or None, **kwargs)
    if guard.failed and on_error is None:
        raise FloatingPointError(f"rows {sorted(guard.failed)} got NaN or infinite scores (an adapter whose weights overflow the model?)")
    result: list[list[int]] = [[] for _ in prompts]
    for i, row in zip(order, out[:, width:].tolist()):
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        result[i] = row if stop is None else row[: stop + 1]
    return result


class Penalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties: each token's logit is lowered by
    `frequency * (times the row has generated it) + presence * (1 if it has at all)`; the prompt
    (columns before `start`) does not count. Negative values favour repetition instead."""

    def __init__(self, frequency: float, presence: float, start: int):
        self.frequency, self.presence, self.start = frequency, presence, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.start :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class Finite(LogitsProcessor):
    """The last logits processor: a row whose scores are no distribution (NaN, +inf, or every
    token -inf), which would make sampling raise for the whole batch or greedy decoding pick
    garbage, is given a certain `stop` token instead, so it ends and the batch goes on. Its caller
    row (`order[j]` for batch row j) is added to `failed` and reported once to `on_error`."""

    def __init__(self, order: list[int], stop: int, on_error: Callable[[int], None] | None):
        self.order, self.stop, self.on_error, self.failed = order, stop, on_error, set()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(scores.amax(dim=-1))  # NaN propagates through amax; +inf and all -inf are not finite
        if bool(bad.any()):  # one device sync per step
            scores[bad] = -math.inf
            scores[bad, self.stop] = 0.0
            for j in bad.nonzero().flatten().tolist():
                if self.order[j] not in self.failed:
                    self.failed.add(self.order[j])
                    if self.on_error is not None:
                        self.on_error(self.order[j])
        return scores


class CallerGone(StoppingCriteria):
    """Stops the rows whose caller is gone: `gone(i)` for the caller's row i, where batch row j is caller row `order[j]`."""

    def __init__(self, gone: Callable[[int], bool], order: list[int]):
        self.gone, self.order = gone, order

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([self.gone(i) for i in self.order], dtype=torch.bool, device=input_ids.device)


class TokenWatch(StoppingCriteria):
    """Hands each row's newest token to `on_token(i, token)` (caller row i = batch row j's `order[j]`)
    and stops the rows for which it returned True; an ended row is not reported again."""

    def __init__(self, on_token: Callable[[int, int], bool], order: list[int]):
        self.on_token, self.order, self.ended = on_token, order, [False] * len(order)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for j, token in enumerate(input_ids[:, -1].tolist()):  # one device sync per step
            if not self.ended[j]:
                self.ended[j] = bool(self.on_token(self.order[j], token))
        return torch.tensor(self.ended, dtype=torch.bool, device=input_ids.device)


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _shape(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else list(t.shape)


def _summary(layers: dict[str, BatchedLoraLinear]) -> str:
    names = sorted({name.rsplit(".", 1)[-1] for name in layers})
    return f"{len(layers)} layers named {names}"
