"""The adapter store: versioned, immutable PEFT adapter directories with their provenance.

Layout: `<store>/<name>/v<N>/` holds plain PEFT files (`adapter_config.json`,
`adapter_model.safetensors`, loadable by `peft.PeftModel.from_pretrained`) plus `lorag.json`
(base model, knowledge base, metrics, timings, lorag version) and `lorag.yaml` (the resolved
config that trained it). A new save is a new version; nothing is overwritten. Names are validated
and every resolved path is checked to stay inside the store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from lorag.config import validate_name

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_FILES = ("config.json", "model.safetensors")  # method: full (a whole model, for baselines)
_VERSION = re.compile(r"^v?([1-9][0-9]{0,8})$")
_TAG = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")


class AdapterNotFoundError(LookupError):
    """No adapter (or no such version) in the store."""


class AdapterStore:
    """Versioned adapters under one root directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def save(self, name: str, source_dir: str | os.PathLike, metadata: dict[str, Any], config_yaml: str | None = None) -> Path:
        """Copy a PEFT adapter directory into the next version of `name` and return its path.

        The copy is written beside the store and renamed into place, so a crash never leaves a
        half-written version, and two concurrent saves get different version numbers.

        Raises:
            ValueError: bad name, or `source_dir` lacks the PEFT files.
        """
        base = self._name_dir(name)
        source_dir = Path(source_dir)
        files = PEFT_FILES if metadata.get("method", "lora") == "lora" else FULL_FILES
        missing = [f for f in files if not (source_dir / f).is_file()]
        if missing:
            raise ValueError(f"{source_dir} is not a {'PEFT adapter' if files == PEFT_FILES else 'model'} directory: missing {missing}")
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".tmp-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        for f in source_dir.iterdir():
            if f.is_file() and (f.name in files or f.suffix in (".json", ".safetensors", ".md")):
                shutil.copy2(f, tmp / f.name)
        if config_yaml is not None:
            (tmp / "lorag.yaml").write_text(config_yaml)
        while True:
            version = max(self.versions(name), default=0) + 1
            meta = {"name": name, "version": version, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metadata}
            (tmp / "lorag.json").write_text(json.dumps(meta, indent=2, default=str))
            try:
                os.rename(tmp, base / f"v{version}")  # fails if the version appeared meanwhile
                return base / f"v{version}"
            except OSError:
                if (base / f"v{version}").exists():
                    continue
                raise

    def versions(self, name: str) -> list[int]:
        base = self._name_dir(name)
        if not base.is_dir():
            return []
        return sorted(int(m.group(1)) for p in base.iterdir() if p.is_dir() and (m := _VERSION.match(p.name)))

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and self.versions(p.name))

    def resolve(self, name: str, version: str | int | None = None) -> Path:
        """Directory of `name` at `version`: `3`, `"v3"`, a tag, or None / `"latest"` for the newest.

        Raises:
            ValueError: invalid name or version syntax.
            AdapterNotFoundError: no such adapter, version or tag.
        """
        versions = self.versions(name)
        if not versions:
            raise AdapterNotFoundError(f"adapter {name!r} is not in the store {self.root} (known: {self.names()})")
        tags = self.tags(name)
        if version is None or version == "latest":
            number = versions[-1]
        elif str(version) in tags:
            number = tags[str(version)]
        else:
            m = _VERSION.match(str(version))
            if not m:
                if _TAG.match(str(version)):
                    raise AdapterNotFoundError(f"adapter {name!r} has no tag {version!r} (tags: {sorted(tags) or 'none'})")
                raise ValueError(f"invalid adapter version {version!r}: use a number like 3 or v3, a tag, or 'latest'")
            number = int(m.group(1))
            if number not in versions:
                raise AdapterNotFoundError(f"adapter {name!r} has no version v{number} (versions: {['v%d' % v for v in versions]})")
        path = (self._name_dir(name) / f"v{number}").resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"adapter path {path} escapes the store {self.root}")
        return path

    def tags(self, name: str) -> dict[str, int]:
        """Tag -> version number for `name` (`latest` is implicit and never stored)."""
        path = self._name_dir(name) / "tags.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def tag(self, name: str, version: str | int, tag: str) -> int:
        """Point `tag` at a version of `name` (moving it if it exists); returns the version number.

        Raises:
            ValueError: the tag is not a valid name, or is `latest` or looks like a version.
        """
        if tag == "latest" or _VERSION.match(tag) or not _TAG.match(tag):
            raise ValueError(f"invalid tag {tag!r}: use lowercase letters, digits, '.', '-', '_', not 'latest' or a version like v3")
        number = int(self.resolve(name, version).name[1:])
        self._write_tags(name, {**self.tags(name), tag: number})
        return number

    def remove(self, name: str, version: str | int) -> Path:
        """Delete one version (and the tags pointing at it). Other versions keep their numbers."""
        path = self.resolve(name, version)
        number = int(path.name[1:])
        self._write_tags(name, {t: v for t, v in self.tags(name).items() if v != number})
        trash = path.with_name(f".rm-{path.name}-{time.time_ns()}")
        os.rename(path, trash)  # atomic: a concurrent reader sees the version or nothing
        shutil.rmtree(trash)
        return path

    def _write_tags(self, name: str, tags: dict[str, int]) -> None:
        path = self._name_dir(name) / "tags.json"
        tmp = path.with_name(f".tags-{os.getpid()}.json")
        tmp.write_text(json.dumps(tags, indent=2, sort_keys=True))
        os.replace(tmp, path)

    def metadata(self, name: str, version: str | int | None = None) -> dict[str, Any]:
        return json.loads((self.resolve(name, version) / "lorag.json").read_text())

    def _name_dir(self, name: str) -> Path:
        validate_name("adapter", name)
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise ValueError(f"adapter name {name!r} escapes the store {self.root}")
        return path


def parse_model_id(model: str) -> tuple[str, str | None]:
    """Split a request's `model` into (adapter name, version): `name`, `name@3`, `name@v3`."""
    name, _, version = model.partition("@")
    return name, (version or None)
