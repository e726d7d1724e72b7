"""Batched multi-LoRA: many adapters on one base model, mixed row by row in one forward pass.

Owns the Punica / S-LoRA / LoRAX-style adapter slots: `MultiLoraModel` (wraps a HF causal LM in
place: every target `nn.Linear` becomes a `BatchedLoraLinear` with preallocated adapter slots),
loading adapters into slots and unloading them, and `find_segments` (how a batch's rows group by
adapter). An adapter comes in as `lorag.lora_weights.LoraWeights`; `lorag.generation.generate_batch`
runs a mixed batch through `model.generate`.

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
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorag.lora_weights import LoraWeights

MERGED = "merged"  # a layer plan: run on the layer's merged weight
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def _summary(layers: dict[str, BatchedLoraLinear]) -> str:
    names = sorted({name.rsplit(".", 1)[-1] for name in layers})
    return f"{len(layers)} layers named {names}"
