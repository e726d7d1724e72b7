"""The adapter store: versioned, immutable PEFT adapter directories with their provenance.

Layout: `<store>/<name>/v<N>/` holds plain PEFT files (`adapter_config.json`,
`adapter_model.safetensors`, loadable by `peft.PeftModel.from_pretrained`) plus `lorag.json`
(base model, knowledge base, metrics, timings, lorag version, and the sha256 of every file) and
`lorag.yaml` (the resolved config that trained it). A new save is a new version; nothing is
overwritten. Names are validated and every resolved path is checked to stay inside the store.

The store is a location (`lorag.storage`): a local directory, or a URI such as
`s3://bucket/lorag/adapters` that every node of a cluster reaches. `lorag.json` is written last, so
a version exists once it is whole; on a local disk a version is also written beside the store and
renamed into place. A node that loads an adapter uses `fetch`, which copies the version into the
node's cache and checks every file against the hashes recorded at save time.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lorag import storage
from lorag.config import validate_name

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_FILES = ("config.json", "model.safetensors")  # method: full (a whole model, for baselines)
_VERSION = re.compile(r"^v?([1-9][0-9]{0,8})$")
_TAG = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")


class AdapterNotFoundError(LookupError):
    """No adapter (or no such version) in the store."""


class AdapterStore:
    """Versioned adapters under one root location (a local directory or a filesystem URI)."""

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        self.root = root.rstrip("/") if storage.is_uri(root) else str(Path(root).expanduser().resolve())
        self.fs, self._path = storage.filesystem(self.root)
        self.local = not storage.is_uri(self.root)

    def save(self, name: str, source_dir: str | os.PathLike, metadata: dict[str, Any], config_yaml: str | None = None) -> str:
        """Copy a local PEFT adapter directory into the next version of `name`; returns its location.

        Locally the copy is written beside the store and renamed into place, so a crash never
        leaves a half-written version and two concurrent saves get different version numbers. On
        an object store the files are uploaded first and `lorag.json` last: a version without it
        is invisible, and a crashed upload is overwritten by the next save.

        Raises:
            ValueError: bad name, or `source_dir` lacks the PEFT files.
        """
        self._name_path(name)
        source_dir = Path(source_dir)
        files = PEFT_FILES if metadata.get("method", "lora") == "lora" else FULL_FILES
        missing = [f for f in files if not (source_dir / f).is_file()]
        if missing:
            raise ValueError(f"{source_dir} is not a {'PEFT adapter' if files == PEFT_FILES else 'model'} directory: missing {missing}")
        base = self._name_path(name)
        if self.local:  # staged beside the versions, so the final rename is atomic
            os.makedirs(base, exist_ok=True)
            staged = Path(base) / f".tmp-{os.getpid()}-{time.time_ns()}"
            staged.mkdir()
        else:
            staged = Path(tempfile.mkdtemp(prefix="lorag-adapter-"))
        try:
            for f in source_dir.iterdir():
                if f.is_file() and (f.name in files or f.suffix in (".json", ".safetensors", ".md")) and f.name != "lorag.json":
                    shutil.copy2(f, staged / f.name)
            if config_yaml is not None:
                (staged / "lorag.yaml").write_text(config_yaml)
            metadata = {**metadata, "files": {f.name: storage.file_sha256(f) for f in sorted(staged.iterdir())}}
            while True:
                version = max(self.versions(name), default=0) + 1
                meta = json.dumps({"name": name, "version": version, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metadata}, indent=2, default=str)
                target = f"{base}/v{version}"
                if not self.local:
                    storage.upload_dir(staged, self.fs, target)
                    storage.write_bytes(self.fs, f"{target}/lorag.json", meta.encode())  # last: the version now exists
                    return self.location(name, version)
                (staged / "lorag.json").write_text(meta)
                try:
                    os.rename(staged, target)  # fails if the version appeared meanwhile
                    return target
                except OSError:
                    if os.path.exists(target):
                        continue
                    raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def versions(self, name: str) -> list[int]:
        """Whole versions of `name` (those with their `lorag.json`), oldest first."""
        base = self._name_path(name)
        found = set()
        for rel, _, _ in storage.list_files(self.fs, base):
            parts = rel.split("/")
            if len(parts) == 2 and parts[1] == "lorag.json" and (m := _VERSION.match(parts[0])) and parts[0].startswith("v"):
                found.add(int(m.group(1)))
        return sorted(found)

    def names(self) -> list[str]:
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path, allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory and not i.base_name.startswith(".")]
        return sorted(n for n in names if _is_name(n) and self.versions(n))

    def location(self, name: str, number: int) -> str:
        """Where version `number` of `name` lives (a local path or a URI)."""
        self._name_path(name)
        return storage.join(self.root, name, f"v{number}")

    def resolve(self, name: str, version: str | int | None = None) -> str:
        """Location of `name` at `version`: `3`, `"v3"`, a tag, or None / `"latest"` for the newest.

        Raises:
            ValueError: invalid name or version syntax.
            AdapterNotFoundError: no such adapter, version or tag.
        """
        return self.location(name, self.resolve_number(name, version))

    def resolve_number(self, name: str, version: str | int | None = None) -> int:
        """The version number `version` (a number, a tag, None / "latest") stands for."""
        versions = self.versions(name)
        if not versions:
            raise AdapterNotFoundError(f"adapter {name!r} is not in the store {self.root} (known: {self.names()})")
        tags = self.tags(name)
        if version is None or version == "latest":
            return versions[-1]
        if str(version) in tags:
            return tags[str(version)]
        m = _VERSION.match(str(version))
        if not m:
            if _TAG.match(str(version)):
                raise AdapterNotFoundError(f"adapter {name!r} has no tag {version!r} (tags: {sorted(tags) or 'none'})")
            raise ValueError(f"invalid adapter version {version!r}: use a number like 3 or v3, a tag, or 'latest'")
        number = int(m.group(1))
        if number not in versions:
            raise AdapterNotFoundError(f"adapter {name!r} has no version v{number} (versions: {['v%d' % v for v in versions]})")
        return number

    def fetch(self, name: str, version: str | int | None, cache_dir: str | os.PathLike) -> Path:
        """A local directory with version `version` of `name`, for loading its weights.

        A local store is read in place. From a remote store the version is copied into this
        node's cache (`<cache_dir>/fetched/<content hash>/`) and every file checked against the
        sha256 recorded when it was saved.

        Raises:
            AdapterNotFoundError, ValueError: as `resolve`; ValueError also for a corrupt copy.
        """
        number = self.resolve_number(name, version)
        location = self.location(name, number)
        if self.local:
            return Path(location)
        expected = self.metadata(name, number).get("files")
        return storage.fetch_dir(location, cache_dir, expected)

    def tags(self, name: str) -> dict[str, int]:
        """Tag -> version number for `name` (`latest` is implicit and never stored)."""
        path = f"{self._name_path(name)}/tags.json"
        return json.loads(storage.read_bytes(self.fs, path)) if storage.exists(self.fs, path) else {}

    def tag(self, name: str, version: str | int, tag: str) -> int:
        """Point `tag` at a version of `name` (moving it if it exists); returns the version number.

        Raises:
            ValueError: the tag is not a valid name, or is `latest` or looks like a version.
        """
        if tag == "latest" or _VERSION.match(tag) or not _TAG.match(tag):
            raise ValueError(f"invalid tag {tag!r}: use lowercase letters, digits, '.', '-', '_', not 'latest' or a version like v3")
        number = self.resolve_number(name, version)
        self._write_tags(name, {**self.tags(name), tag: number})
        return number

    def remove(self, name: str, version: str | int) -> str:
        """Delete one version (and the tags pointing at it). Other versions keep their numbers."""
        number = self.resolve_number(name, version)
        location = self.location(name, number)
        self._write_tags(name, {t: v for t, v in self.tags(name).items() if v != number})
        path = f"{self._name_path(name)}/v{number}"
        if self.local:
            trash = f"{self._name_path(name)}/.rm-v{number}-{time.time_ns()}"
            os.rename(path, trash)  # atomic: a concurrent reader sees the version or nothing
            shutil.rmtree(trash)
        else:
            self.fs.delete_file(f"{path}/lorag.json")  # first: the version is gone for readers at once
            self.fs.delete_dir(path)
        return location

    def _write_tags(self, name: str, tags: dict[str, int]) -> None:
        storage.write_bytes(self.fs, f"{self._name_path(name)}/tags.json", json.dumps(tags, indent=2, sort_keys=True).encode())

    def metadata(self, name: str, version: str | int | None = None) -> dict[str, Any]:
        number = self.resolve_number(name, version)
        return json.loads(storage.read_bytes(self.fs, f"{self._name_path(name)}/v{number}/lorag.json"))

    def _name_path(self, name: str) -> str:
        """The store-internal path of `name`'s directory (after validating the name)."""
        validate_name("adapter", name)
        path = posixpath.join(self._path, name) if not self.local else os.path.join(self._path, name)
        if (posixpath.dirname(path) if not self.local else os.path.dirname(path)) != self._path.rstrip("/"):
            raise ValueError(f"adapter name {name!r} escapes the store {self.root}")
        return path


def _is_name(name: str) -> bool:
    try:
        validate_name("adapter", name)
        return True
    except ValueError:
        return False


def parse_model_id(model: str) -> tuple[str, str | None]:
    """Split a request's `model` into (adapter name, version): `name`, `name@3`, `name@v3`."""
    name, _, version = model.partition("@")
    return name, (version or None)
