"""What an adapter version records and how it serves: `AdapterRecord` (its typed `lorag.json`) and `Binding`.

`lorag.adapters.AdapterStore` writes and reads the record (`save`, `record`); `Binding.of` is the one
place that decides between the config's adapter entry and the record (`AdapterStore.binding`).
Training (`lorag.train.record`) fills in the record's provenance; serving and routing read the binding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class AdapterRecord(BaseModel):
    """A version's `lorag.json`: which adapter and version, what trained it, on what, and how it went.

    Written by `AdapterStore.save` (the store sets name, version, created_at and files; training,
    `lorag.train.record`, the rest) and read by `AdapterStore.record`. Every field but the first
    three is optional, so a version saved by hand or by an older lorag loads, and keys this model
    does not name are kept (`model_extra`) and written back as they were.
    """

    model_config = ConfigDict(extra="allow")

    name: str
    version: int
    created_at: str  # local time, ISO 8601 with offset
    method: Literal["lora", "full"] = "lora"  # full: a whole model (for baselines), not a PEFT adapter
    base_model: str | None = None  # as configured (a model id or a path)
    base_model_path: str | None = None  # where the driver resolved it
    base_model_sha256: str | None = None  # over its *.safetensors files
    knowledge_base: str | None = None
    system_prompt: str | None = None
    description: str | None = None  # `model: "auto"` routes by it (lorag.routing)
    answer_style: str | None = None  # a regular expression the answers match when they keep the house style
    questions: list[str] | None = None  # the training questions, for `model: "auto"` routing
    dataset: str | None = None
    dataset_sha256: str | None = None
    examples: dict[str, int] | int | None = None  # {"train": n, "val": n}; versions before the validation split: the total
    trained_with_retrieval: bool | None = None
    raft: dict[str, Any] | None = None  # the adapter's `train.raft` settings when it trained RAFT-style
    metrics: dict[str, Any] | None = None  # the run's `lorag.worker.TrainMetrics` (older versions: other keys)
    wall_time_s: float | None = None
    lorag_version: str | None = None
    files: dict[str, str] | None = None  # file name -> sha256, checked by `fetch` (None: saved before hashes were kept)

    def to_json(self, order: list[str]) -> str:
        """`lorag.json` as it has always been written: only the keys given (no defaults added), those of `order` in that order."""
        data = self.model_dump(exclude_unset=True)
        return json.dumps({k: data[k] for k in dict.fromkeys([*order, *data])}, indent=2, default=str)


@dataclass(frozen=True)
class Binding:
    """How a version serves: its number and what it answers with. The config's adapter entry wins over
    what the version recorded when it was trained (so a knowledge base or prompt can be re-bound
    without retraining); an adapter the config does not name serves as it was trained."""

    number: int
    knowledge_base: str | None
    system_prompt: str | None
    answer_style: str | None
    description: str | None  # the config's, else the recorded one (`model: "auto"` routes by it)
    questions: list[str]  # the training questions (routing profiles)

    @classmethod
    def of(cls, cfg, name: str, number: int, record: AdapterRecord) -> Binding:
        """How version `number` of adapter `name`, which recorded `record`, serves under config `cfg`."""
        ad = next((a for a in cfg.adapters if a.name == name), None)
        own = ad if ad is not None else record
        return cls(number, own.knowledge_base, own.system_prompt, own.answer_style,
                   (ad.description if ad is not None else None) or record.description, list(record.questions or []))
