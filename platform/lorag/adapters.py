"""The adapter store: versioned, immutable PEFT adapter directories with their provenance.

Layout: `<store>/<name>/v<N>/` holds plain PEFT files (`adapter_config.json`,
`adapter_model.safetensors`, loadable by `peft.PeftModel.from_pretrained`) plus `lorag.json`
(base model, knowledge base, metrics, timings, lorag version, and the sha256 of every file) and
`lorag.yaml` (the resolved config that trained it, secrets redacted by `lorag.redaction`).
`lorag.adapter_record.AdapterRecord` is the typed `lorag.json`; keys it does not know (from older or
newer lorag) are kept, so every version loads. Beside the versions, `<store>/<name>/tags.json` maps
tags to version numbers, `history.json` every move of a tag (when, from which version to which, the
report it was decided on, forced or not: `lorag.releases`), and `counter.json` the highest number
ever given out. A new save is a new version; nothing is overwritten, and a number is never
given out twice, even after its version is removed. `NAME` alone means the version tagged `stable`
when there is one, else the newest. Names are validated and every resolved path
is checked to stay inside the store.

The store is a location (`lorag.storage`): a local directory, or a URI such as
`s3://bucket/lorag/adapters` that every node of a cluster reaches. `lorag.json` is written last, so
a version exists once it is whole; on a local disk a version is also written beside the store and
renamed into place. A node that loads an adapter uses `fetch`, which copies the version into the
node's cache and checks every file against the hashes recorded at save time.

Entries lorag did not write (a volume's `lost+found`, a stray file, a directory whose name is not
an adapter name or not `v<N>`, a version without its `lorag.json`) are skipped with one
`AdapterStoreWarning` each, so listing the store never fails on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from lorag import storage
from lorag.adapter_record import AdapterRecord, Binding
from lorag.redaction import redact_secrets, redact_yaml
from lorag.sections import validate_name

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_FILES = ("config.json", "model.safetensors")  # method: full (a whole model, for baselines)
_VERSION = re.compile(r"v?([1-9][0-9]{0,8})")  # always fullmatch: `$` would accept "v3\n"
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,8})")
_TAG = re.compile(r"[a-z][a-z0-9._-]{0,62}")
_OWN_FILES = re.compile(r"(tags|counter|history)\.json(\.tmp-.*)?")  # with their in-flight local writes
STABLE = "stable"  # the tag `NAME` alone resolves to (else the newest version)


class AdapterNotFoundError(LookupError):
    """No adapter (or no such version) in the store."""


class AdapterStoreWarning(UserWarning):
    """An entry in the adapter store that lorag did not write; it is skipped."""


class AdapterStore:
    """Versioned adapters under one root location (a local directory or a filesystem URI)."""

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        self.root = root.rstrip("/") if storage.is_uri(root) else str(Path(root).expanduser().resolve())
        self.fs, self._path = storage.filesystem(self.root)
        self.local = not storage.is_uri(self.root)

    def save(self, name: str, source_dir: str | os.PathLike, metadata: dict[str, Any], config_yaml: str | None = None) -> str:
        """Copy a local PEFT adapter directory into the next version of `name`; returns its location.

        The version number is recorded in `counter.json` before any file of the version is
        written, so a crash at any point skips a number and never reuses one. Locally the copy is
        written beside the store and renamed into place under a file lock, so a crash never
        leaves a half-written version and concurrent saves get different numbers. On an object
        store the files are uploaded first and `lorag.json` last (a version without it is
        invisible); there is no lock there, so saves of one adapter must not run at the same time.
        `metadata` holds the `AdapterRecord` fields but name, version, created_at and files (the
        store sets them) and any others to keep. Secrets in it and in `config_yaml` are redacted.

        Raises:
            ValueError: bad name, `metadata` does not fit `AdapterRecord`, `source_dir` lacks the
                PEFT files, or `config_yaml` is not YAML.
        """
        base = self._name_path(name)
        source_dir = Path(source_dir)
        record = AdapterRecord.model_validate({**redact_secrets(metadata), "name": name, "version": 0, "created_at": ""})
        files = PEFT_FILES if record.method == "lora" else FULL_FILES
        missing = [f for f in files if not (source_dir / f).is_file()]
        if missing:
            raise ValueError(f"{source_dir} is not a {'PEFT adapter' if files == PEFT_FILES else 'model'} directory: missing {missing}")
        if config_yaml is not None:
            config_yaml = redact_yaml(config_yaml)
        if self.local:  # staged beside the versions, so the final rename is atomic
            os.makedirs(base, exist_ok=True)
            staged = Path(base) / f".tmp-{os.getpid()}-{time.time_ns()}"
            staged.mkdir()
        else:
            staged = Path(tempfile.mkdtemp(prefix="lorag-adapter-"))
        try:
            hashes = _stage(source_dir, staged, files, config_yaml)

            def meta(version: int) -> str:
                stamp = {"version": version, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": hashes}
                return record.model_copy(update=stamp).to_json(["name", "version", "created_at", *metadata, "files"])

            if self.local:
                return self._rename_into_place(name, staged, meta)
            version = self._allocate(name)
            target = f"{base}/v{version}"
            storage.upload_dir(staged, self.fs, target)
            storage.write_bytes(self.fs, f"{target}/lorag.json", meta(version).encode())  # last: the version now exists
            return self.location(name, version)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def exists(self, name: str, number: int) -> bool:
        """Whether version `number` of `name` is whole in the store now (one small read)."""
        return storage.exists(self.fs, f"{self._name_path(name)}/v{number}/lorag.json")

    def versions(self, name: str) -> list[int]:
        """Whole versions of `name` (those with their `lorag.json`), oldest first.

        Other entries in the adapter's directory are skipped with an `AdapterStoreWarning`.
        """
        return sorted(n for n, whole in self._version_dirs(name).items() if whole)

    def names(self) -> list[str]:
        """Adapters with at least one whole version, sorted. Other entries are skipped with an `AdapterStoreWarning`."""
        import pyarrow.fs

        found = []
        for info in self.fs.get_file_info(pyarrow.fs.FileSelector(self._path, allow_not_found=True)):
            entry = info.base_name
            if entry.startswith("."):
                continue
            if info.type != pyarrow.fs.FileType.Directory:
                _skip(storage.join(self.root, entry), "a file, not an adapter directory")
            elif not _is_name(entry):
                _skip(storage.join(self.root, entry), "not a valid adapter name")
            elif self.versions(entry):
                found.append(entry)
        return sorted(found)

    def location(self, name: str, number: int) -> str:
        """Where version `number` of `name` lives (a local path or a URI)."""
        self._name_path(name)
        return storage.join(self.root, name, f"v{number}")

    def resolve(self, name: str, version: str | int | None = None) -> str:
        """Location of `name` at `version`: `3`, `"v3"`, a tag, `"latest"` for the newest, or None for
        the version tagged `stable` (the newest when no version is).

        Raises:
            ValueError: invalid name or version syntax.
            AdapterNotFoundError: no such adapter, version or tag, or a tag whose version is gone.
        """
        return self.location(name, self.resolve_number(name, version))

    def resolve_number(self, name: str, version: str | int | None = None, snapshot: tuple[list[int], dict[str, int]] | None = None) -> int:
        """The version number `version` (a number, a tag, "latest", or None: `stable`, else the newest) stands for.

        `snapshot`: `(versions, tags)` already read (`lorag.releases.Registry`), instead of reading them now.

        Raises:
            ValueError: invalid name or version syntax.
            AdapterNotFoundError: no such adapter, version or tag, or a tag whose version is gone.
        """
        versions, tags = snapshot if snapshot is not None else (self.versions(name), self.tags(name))
        if not versions:
            raise AdapterNotFoundError(f"adapter {name!r} is not in the store {self.root} (known: {self.names()})")
        if version is None and tags.get(STABLE) in versions:
            return tags[STABLE]
        if version is None or version == "latest":
            return versions[-1]
        key = str(version)
        if key in tags:
            if tags[key] not in versions:
                raise AdapterNotFoundError(
                    f"tag {key!r} of adapter {name!r} points at v{tags[key]}, which is no longer in the store "
                    f"(versions: {['v%d' % v for v in versions]}); move it with `lorag adapters tag {name}@vN {key}`"
                )
            return tags[key]
        m = _VERSION.fullmatch(key)
        if not m:
            if _TAG.fullmatch(key):
                raise AdapterNotFoundError(f"adapter {name!r} has no tag {key!r} (tags: {sorted(tags) or 'none'})")
            raise ValueError(f"invalid adapter version {version!r}: use a number like 3 or v3, a tag, or 'latest'")
        number = int(m.group(1))
        if number not in versions:
            raise AdapterNotFoundError(f"adapter {name!r} has no version v{number} (versions: {['v%d' % v for v in versions]})")
        return number

    def fetch(self, name: str, version: str | int | None, cache_dir: str | os.PathLike) -> Path:
        """A local directory with version `version` of `name`, for loading its weights.

        The version is copied into this node's cache (`<cache_dir>/fetched/<content hash>/`,
        `storage.fetch_dir`) and every file checked against the sha256 recorded when it was saved,
        from a local store as from a remote one: a file damaged on disk is refused here, not
        loaded. The copy is made once per content; later fetches return it.

        Raises:
            AdapterNotFoundError, ValueError: as `resolve`; AdapterNotFoundError also when the
                version is removed while being fetched; ValueError also for a corrupt copy.
        """
        number = self.resolve_number(name, version)
        location = self.location(name, number)
        expected = self.record(name, number).files
        try:
            return storage.fetch_dir(location, cache_dir, expected)
        except (OSError, ValueError) as e:
            if self._read(f"{self._name_path(name)}/v{number}/lorag.json") is None:
                raise self._gone(name, number) from e
            raise

    def tags(self, name: str) -> dict[str, int]:
        """Tag -> version number for `name` (`latest` is implicit and never stored)."""
        raw = self._read(f"{self._name_path(name)}/tags.json")
        if raw is None:
            return {}
        try:
            tags = json.loads(raw)
        except ValueError:
            tags = None
        if not isinstance(tags, dict):
            _skip(storage.join(self.root, name, "tags.json"), "not a JSON object of tag -> version")
            return {}
        return {t: v for t, v in tags.items() if isinstance(v, int)}

    def tag(self, name: str, version: str | int, tag: str, note: dict[str, Any] | None = None) -> int:
        """Point `tag` at a version of `name` (moving it if it exists) and record the move in the
        adapter's history (`note`: what else to record, e.g. the report it was decided on); returns
        the version number.

        Raises:
            ValueError: the tag is not a valid name, or is `latest` or looks like a version.
            AdapterNotFoundError: as `resolve`.
        """
        if tag == "latest" or _VERSION.fullmatch(tag) or not _TAG.fullmatch(tag):
            raise ValueError(f"invalid tag {tag!r}: use lowercase letters, digits, '.', '-', '_', not 'latest' or a version like v3")
        number = self.resolve_number(name, version)
        with self._lock(name):
            tags = self.tags(name)
            self._write_tags(name, {**tags, tag: number})
            self._log(name, {"tag": tag, "version": number, "previous": tags.get(tag), **(note or {})})
        return number

    def untag(self, name: str, tag: str, note: dict[str, Any] | None = None) -> int | None:
        """Remove `tag` from `name` (recorded in its history); returns the version it pointed at, or None."""
        with self._lock(name):
            tags = self.tags(name)
            if tag not in tags:
                return None
            self._write_tags(name, {t: v for t, v in tags.items() if t != tag})
            self._log(name, {"tag": tag, "version": None, "previous": tags[tag], "action": "untag", **(note or {})})
        return tags[tag]

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every recorded tag move of `name`, oldest first: `{"at", "tag", "version", "previous", ...}` (version None: removed)."""
        raw = self._read(f"{self._name_path(name)}/history.json")
        try:
            moves = json.loads(raw) if raw is not None else []
        except ValueError:
            moves = None
        if not isinstance(moves, list):
            _skip(storage.join(self.root, name, "history.json"), "not a JSON list of tag moves")
            return []
        return [m for m in moves if isinstance(m, dict)]

    def _log(self, name: str, move: dict[str, Any]) -> None:
        """Append a tag move to `history.json` (under the adapter's lock on a local disk)."""
        moves = [*self.history(name), {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **move}]
        storage.write_bytes(self.fs, f"{self._name_path(name)}/history.json", json.dumps(moves, indent=1).encode())

    def remove(self, name: str, version: str | int) -> str:
        """Delete one version (and the tags pointing at it). Other versions keep their numbers, and
        the removed number is never given out again.

        Raises:
            ValueError, AdapterNotFoundError: as `resolve`; AdapterNotFoundError also when the
                version is removed by someone else meanwhile.
        """
        number = self.resolve_number(name, version)
        location = self.location(name, number)
        path = f"{self._name_path(name)}/v{number}"
        with self._lock(name):
            if self._counter(name) < number:  # a store from before the counter: record the number first
                self._write_counter(name, number)
            tags = self.tags(name)
            self._write_tags(name, {t: v for t, v in tags.items() if v != number})
            for t in sorted(t for t, v in tags.items() if v == number):
                self._log(name, {"tag": t, "version": None, "previous": number, "action": "removed with its version"})
            try:
                if self.local:
                    trash = f"{self._name_path(name)}/.rm-v{number}-{time.time_ns()}"
                    os.rename(path, trash)  # atomic: a concurrent reader sees the version or nothing
                    shutil.rmtree(trash)
                else:
                    self.fs.delete_file(f"{path}/lorag.json")  # first: the version is gone for readers at once
                    self.fs.delete_dir(path)
            except FileNotFoundError as e:
                raise self._gone(name, number) from e
        return location

    def add_report(self, name: str, version: str | int, files: list[str | os.PathLike], kind: str = "eval") -> str:
        """Copy report files (an evaluation's eval.json, eval.md, eval.png) into the version, under
        `<name>/v<N>/<kind>/<timestamp>/`, and return that location. The version's own files and
        `lorag.json` are untouched (a fetch copies only the files `lorag.json` lists), and a report
        never replaces another: each has its own timestamped directory.

        Raises:
            ValueError, AdapterNotFoundError: as `resolve`.
        """
        number = self.resolve_number(name, version)
        base, now = f"{self._name_path(name)}/v{number}/{kind}", time.strftime("%Y%m%d-%H%M%S")
        stamp, n = now, 1
        while storage.exists(self.fs, f"{base}/{stamp}"):  # two reports within one second
            n += 1
            stamp = f"{now}-{n}"
        for f in map(Path, files):
            storage.write_bytes(self.fs, f"{base}/{stamp}/{f.name}", f.read_bytes())
        return storage.join(self.location(name, number), kind, stamp)

    def reports(self, name: str, version: str | int | None = None, kind: str = "eval") -> list[str]:
        """The locations of a version's reports (`add_report`), oldest first."""
        import pyarrow.fs

        number = self.resolve_number(name, version)
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(f"{self._name_path(name)}/v{number}/{kind}", allow_not_found=True))
        return [storage.join(self.location(name, number), kind, i.base_name) for i in sorted(infos, key=lambda i: i.base_name)
                if i.type == pyarrow.fs.FileType.Directory]

    def record(self, name: str, version: str | int | None = None) -> AdapterRecord:
        """The `lorag.json` of a version (as `resolve`), typed.

        Raises:
            ValueError, AdapterNotFoundError: as `metadata`; ValueError also when the file does not fit `AdapterRecord`.
        """
        return AdapterRecord.model_validate(self.metadata(name, version))

    def binding(self, cfg, name: str, version: str | int | None = None) -> Binding:
        """What version `version` of `name` (as `resolve`) serves with under config `cfg` (`Binding.of`).

        Raises:
            ValueError, AdapterNotFoundError: as `record`.
        """
        number = self.resolve_number(name, version)
        return Binding.of(cfg, name, number, self.record(name, number))

    def metadata(self, name: str, version: str | int | None = None) -> dict[str, Any]:
        """The `lorag.json` of a version (as `resolve`), as the JSON object on disk (`record` gives it typed).

        Raises:
            ValueError, AdapterNotFoundError: as `resolve`; AdapterNotFoundError also when the
                version is removed while being read.
        """
        number = self.resolve_number(name, version)
        raw = self._read(f"{self._name_path(name)}/v{number}/lorag.json")
        if raw is None:
            raise self._gone(name, number)
        return json.loads(raw)

    # -- helpers ------------------------------------------------------------------------------

    def _version_dirs(self, name: str) -> dict[int, bool]:
        """Number -> whether it is whole (has its lorag.json), for every `v<N>` directory of
        `name`; every other entry it did not write is skipped with a warning."""
        import pyarrow.fs

        base = self._name_path(name)
        try:  # one level only: never descend into a foreign (perhaps unreadable) directory
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        except (PermissionError, NotADirectoryError) as e:
            _skip(storage.join(self.root, name), f"cannot be listed ({e})")
            return {}
        found = {}
        for info in infos:
            entry = info.base_name
            if entry.startswith(".") or (info.type == pyarrow.fs.FileType.File and _OWN_FILES.fullmatch(entry)):
                continue  # saves being staged, removals in progress, the lock, tags and counter
            m = _VERSION_DIR.fullmatch(entry)
            if info.type != pyarrow.fs.FileType.Directory or not m:
                _skip(storage.join(self.root, name, entry), "not a version directory (v<N>)")
                continue
            try:
                whole = self.fs.get_file_info(f"{base}/{entry}/lorag.json").type == pyarrow.fs.FileType.File
            except PermissionError:
                whole = False
            if not whole:
                _skip(storage.join(self.root, name, entry), "no lorag.json: a save still running or one that crashed, or not written by lorag")
            found[int(m.group(1))] = whole
        return found

    def _rename_into_place(self, name: str, staged: Path, meta: Callable[[int], str]) -> str:
        """Number a staged local copy and rename it into place under the lock (`save`); `meta(version)` is its lorag.json."""
        base = self._name_path(name)
        with self._lock(name):
            while True:
                version = self._allocate(name)
                target = f"{base}/v{version}"
                (staged / "lorag.json").write_text(meta(version))
                try:
                    os.rename(staged, target)  # fails if the version appeared meanwhile (a writer without the lock)
                    return target
                except OSError:
                    if os.path.exists(target):
                        continue
                    raise

    def _allocate(self, name: str) -> int:
        """A version number never given out before: above the counter and above every `v<N>`
        directory (whole or not), recorded in the counter before anything of it is written."""
        number = max(self._counter(name), *self._version_dirs(name), 0) + 1
        self._write_counter(name, number)
        return number

    def _counter(self, name: str) -> int:
        """The highest version number given out so far (0 for a store without a counter)."""
        raw = self._read(f"{self._name_path(name)}/counter.json")
        if raw is None:
            return 0
        try:
            number = json.loads(raw)["last_version"]
            if isinstance(number, int) and number >= 0:
                return number
        except (ValueError, KeyError, TypeError):
            pass
        raise ValueError(
            f"{storage.join(self.root, name, 'counter.json')} is corrupt: it must hold {{\"last_version\": N}} with N the highest "
            "version ever saved (at least the newest v<N> there); fix it, or delete it to let numbers of removed versions be reused"
        )

    def _write_counter(self, name: str, number: int) -> None:
        storage.write_bytes(self.fs, f"{self._name_path(name)}/counter.json", json.dumps({"last_version": number}).encode())

    def _write_tags(self, name: str, tags: dict[str, int]) -> None:
        storage.write_bytes(self.fs, f"{self._name_path(name)}/tags.json", json.dumps(tags, indent=2, sort_keys=True).encode())

    def _lock(self, name: str):
        """Serializes one adapter's counter, tags and renames across processes on a local disk.
        An object store has no such lock (see `save`)."""
        if not self.local:
            return contextlib.nullcontext()
        from filelock import FileLock

        base = self._name_path(name)
        os.makedirs(base, exist_ok=True)
        return FileLock(os.path.join(base, ".lock"))

    def _read(self, path: str) -> bytes | None:
        """A file's bytes, or None when it is not there (or was removed while being read)."""
        try:
            return storage.read_bytes(self.fs, path)
        except FileNotFoundError:
            return None
        except OSError:
            if not storage.exists(self.fs, path):
                return None
            raise

    def _gone(self, name: str, number: int) -> AdapterNotFoundError:
        return AdapterNotFoundError(f"adapter {name!r} v{number} was removed from the store {self.root} (versions now: {['v%d' % v for v in self.versions(name)]})")

    def _name_path(self, name: str) -> str:
        """The store-internal path of `name`'s directory (after validating the name)."""
        validate_name("adapter", name)
        path = posixpath.join(self._path, name) if not self.local else os.path.join(self._path, name)
        if (posixpath.dirname(path) if not self.local else os.path.dirname(path)) != self._path.rstrip("/"):
            raise ValueError(f"adapter name {name!r} escapes the store {self.root}")
        return path


def _stage(source_dir: Path, staged: Path, files: tuple[str, ...], config_yaml: str | None) -> dict[str, str]:
    """Copy a version's files and `lorag.yaml` into `staged` (`save`); returns file name -> sha256 of each."""
    for f in source_dir.iterdir():
        if f.is_file() and (f.name in files or f.suffix in (".json", ".safetensors", ".md")) and f.name != "lorag.json":
            shutil.copy2(f, staged / f.name)
    if config_yaml is not None:
        (staged / "lorag.yaml").write_text(config_yaml)
    return {f.name: storage.file_sha256(f) for f in sorted(staged.iterdir())}


def _skip(location: str, why: str) -> None:
    # Issued from this one line, so Python shows each distinct entry once per process, not on every listing.
    warnings.warn(f"adapter store: skipping {location}: {why}", AdapterStoreWarning, stacklevel=1)


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
