"""One PEFT LoRA adapter as the batched serving path reads it: `LoraWeights`.

Owns reading a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`; a
pickled `.bin` is never loaded), refusing the config options that cannot differ row by row in a
mixed batch, checking that the tensors are what PEFT writes, and folding PEFT's `alpha / r`
scaling (or rsLoRA's `alpha / sqrt(r)`, per `alpha_pattern`) into B. `lorag.multilora` copies
the result into adapter slots.

    weights = LoraWeights.load(store.resolve("support", 3))
    weights.modules["model.layers.0.self_attn.q_proj"]  # (A [r, in], B [out, r] scaled)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

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
        cfg, patterns = _read_config(path)
        pairs, magnitudes = _read_tensors(path, cfg)
        modules = {name: _scaled(path, name, ab, cfg, patterns) for name, ab in pairs.items()}
        return cls(path, cfg.get("base_model_name_or_path"), modules, magnitudes)


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, its alpha_pattern) once both files exist and the config is one the batched path can serve."""
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
    return cfg, patterns


def _read_tensors(path: Path, cfg: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(module name -> {"A": ..., "B": ...}, module name -> DoRA magnitude) from adapter_model.safetensors, checked."""
    try:
        tensors = load_file(path / "adapter_model.safetensors")
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
    return pairs, magnitudes


def _scaled(path: Path, name: str, ab: dict[str, torch.Tensor], cfg: dict[str, Any], patterns: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B * scaling) of module `name`, its alpha taken from the first matching `alpha_pattern`, else `lora_alpha`."""
    if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
        raise ValueError(f"adapter {path}: {name} has lora_A {_shape(ab.get('A'))} and lora_B {_shape(ab.get('B'))}, not a rank-r pair")
    r = ab["A"].shape[0]
    alpha = cfg.get("lora_alpha", 8)
    for pattern, value in patterns.items():  # PEFT's get_pattern_key rule
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
            break
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pair = (ab["A"], ab["B"] * scale)
    if not bool(torch.isfinite(pair[1]).all()):
        raise ValueError(f"adapter {path}: {name}'s lora_B times its scaling ({alpha} / rank {r}) overflows; lower lora_alpha")
    return pair


def _shape(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else list(t.shape)
