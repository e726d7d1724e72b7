"""Artifacts behind a location, and the node-local cache that is the only place a node writes them.

A location is a local path or a pyarrow filesystem URI (`s3://bucket/prefix`, `gs://bucket/prefix`,
`hdfs://...`); endpoints and credentials come from the environment as pyarrow reads them (for S3:
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), the same way Ray
Train reads its `storage_path`. Nothing here assumes that the driver, the train workers, the Ray
Data tasks and the Serve replicas share a disk: what a node needs from a location it copies into
its own cache with `fetch_dir`, keyed by the files' content hash and verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from lorag.errors import AWS_HINT


def is_uri(location: str | os.PathLike) -> bool:
    """A filesystem URI (`s3://...`, `file:///...`) rather than a plain local path."""
    return "://" in str(location)


def is_local(location: str | os.PathLike) -> bool:
    """A path on this machine's disk (a plain path or a `file://` URI)."""
    return not is_uri(location) or str(location).startswith("file://")


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a location.

    Raises:
        ValueError: the URI's scheme is unknown to pyarrow, or its filesystem cannot be set up
            (the message names the location and what pyarrow said).
    """
    import pyarrow.fs

    location = str(location)
    try:
        if not is_uri(location):
            return pyarrow.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
        return pyarrow.fs.FileSystem.from_uri(location)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as e:
        hint = f". {AWS_HINT}" if location.startswith("s3://") else ""
        raise ValueError(f"cannot open storage location {location!r}: {e}{hint}") from e


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a local path or a URI."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return os.path.join(location, *parts)


def read_bytes(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs, path: str, data: bytes) -> None:
    """Write one file whole. Object stores replace an object atomically; on a local disk the file
    is written beside its target and renamed into place, so a reader never sees half of it."""
    import pyarrow.fs

    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{time.time_ns()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_files(fs, path: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every file under directory `path`, sorted; [] if it is absent."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    out = []
    for info in infos:
        if info.type == pyarrow.fs.FileType.File:
            mtime = info.mtime_ns if info.mtime_ns is not None else 0
            out.append((info.path[len(path.rstrip("/")) + 1 :], info.size, mtime))
    return sorted(out)


def exists(fs, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def upload_dir(local_dir: str | os.PathLike, fs, path: str, names: list[str] | None = None) -> None:
    """Copy files of a local directory (all of them, or `names`, which may hold subpaths) to `path` on `fs`."""
    local_dir = Path(local_dir)
    if names is None:
        names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    for name in names:
        target = f"{path}/{name}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(local_dir / name, "rb") as src, fs.open_output_stream(target) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def fetch_dir(location: str, cache_root: str | os.PathLike, expected: dict[str, str] | None = None) -> Path:
    """A verified local copy of the directory at `location`, in this node's cache.

    The copy lives at `<cache_root>/fetched/<content key>/`, where the key hashes the files'
    names and sha256, so two locations with the same bytes share one copy and a changed file is a
    new copy. A copy is written beside its final place and renamed in whole, under a file lock, so
    concurrent fetches on one node (several workers, several replicas) download once.

    What storage lists is not trusted: every file name is checked before anything is written
    (relative, no empty, `.` or `..` component, and resolving inside the copy: `contained`), and
    each file is downloaded to a temporary name beside its own, hashed as it arrives, and renamed
    to its name only once its sha256 matches `expected`, so a corrupt file never appears under
    its name, even inside the unfinished copy.

    Args:
        location: a directory, as a local path or a filesystem URI.
        cache_root: this node's cache directory (`LoragConfig.model_cache`).
        expected: `{relative path: sha256}` every file must match (an adapter version records it
            in its `lorag.json`, a published model in its manifest); None trusts the listing and
            hashes what it downloads.

    Returns:
        The local directory.

    Raises:
        FileNotFoundError: nothing at `location`.
        ValueError: a file name that would land outside the cache (named with `location`); a
            downloaded file does not match `expected` (corrupt or replaced in storage), or one
            it lists is missing.
    """
    fs, path = filesystem(location)
    listing = list_files(fs, path)
    if not listing:
        raise FileNotFoundError(f"no files at {location}")
    root = Path(cache_root) / "fetched"
    root.mkdir(parents=True, exist_ok=True)
    # A listing seen before (same names, sizes and times) maps to the copy made from it.
    index = root / "index" / (hashlib.sha256(json.dumps([location, listing]).encode()).hexdigest()[:32] + ".json")
    cached = _cached_copy(root, index, expected)
    if cached is not None:
        return cached
    listed = [name for name, _, _ in listing]
    names = sorted(set(expected) & set(listed)) if expected is not None else listed  # a missing one fails the check in `_copy`
    with FileLock(str(root / ".lock")):
        key = _copy(fs, path, location, root, names, expected)
        index.parent.mkdir(exist_ok=True)
        index.write_text(json.dumps({"key": key}))
    return root / key


def _cached_copy(root: Path, index: Path, expected: dict[str, str] | None) -> Path | None:
    """The complete copy already in the cache: the one of `expected`'s content key, or (with no
    `expected`) the one `index` recorded for the same listing; None when there is none."""
    if expected is not None:
        key = content_key(expected)
    elif index.is_file():
        key = json.loads(index.read_text())["key"]
    else:
        return None
    return root / key if (root / key / COMPLETE).is_file() else None


def _copy(fs, path: str, location: str, root: Path, names: list[str], expected: dict[str, str] | None) -> str:
    """Download `names` into a temporary directory under `root`, verify them and rename it to
    `root/<content key>`; returns the key. Call under the cache's file lock."""
    tmp = root / f".tmp-{os.getpid()}-{time.time_ns()}"
    targets = {name: contained(tmp, name, location) for name in sorted({*names, *(expected or {})})}  # before any write
    try:
        hashes = {name: _download(fs, f"{path}/{name}", targets[name], (expected or {}).get(name), f"{location}: {name}") for name in names}
        missing = sorted(set(expected or {}) - set(hashes))
        if missing:
            raise ValueError(f"{location}: {missing} listed in the recorded sha256 but missing in storage (deleted or never uploaded)")
        key = content_key(hashes)
        (tmp / COMPLETE).write_text(json.dumps({"location": location, "files": hashes}, indent=1))
        if (root / key / COMPLETE).is_file():
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(root / key, ignore_errors=True)  # an incomplete copy from a crash
            os.replace(tmp, root / key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return key


def contained(directory: Path, name: str, location: str) -> Path:
    """`directory/name` for the file `name` of a listing of `location`, refused if it could land elsewhere.

    Raises:
        ValueError: `name` is absolute, has an empty, `.` or `..` component, or resolves outside
            `directory` (the message names `location` and the file).
    """
    parts = name.split("/")
    if name.startswith("/"):
        why = "is absolute"
    elif any(p in ("", ".", "..") for p in parts):
        why = "has an empty, '.' or '..' component"
    elif not (directory / name).resolve().is_relative_to(directory.resolve()):
        why = "resolves outside the copy"
    else:
        return directory / name
    raise ValueError(f"refusing to fetch {location}: its file {name!r} {why}, so its copy could be written outside the cache "
                     f"directory {directory.parent}; remove or rename that object in storage")


def _download(fs, src: str, target: Path, want: str | None, what: str) -> str:
    """Copy file `src` of `fs` to `target` through a temporary name beside it, renamed only once its
    sha256 is `want` (any, when None); returns the sha256. `what` names the file in errors."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.part-{os.getpid()}-{time.time_ns()}")
    digest = hashlib.sha256()
    with fs.open_input_stream(src) as f, open(part, "wb") as dst:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            dst.write(chunk)
    got = digest.hexdigest()
    if want is not None and got != want:
        part.unlink()
        raise ValueError(f"{what} has sha256 {got}, not the {want} recorded when it was saved (corrupt or overwritten in storage)")
    os.replace(part, target)
    return got


COMPLETE = ".lorag-fetched.json"  # written last into a fetched copy: its presence means the copy is whole


def content_key(hashes: dict[str, str]) -> str:
    """The cache key of a set of files: a hash over their names and sha256."""
    return hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest()[:32]


def check_cluster_paths(cfg, knowledge_bases: list[str] = (), artifacts: bool = False) -> None:
    """Refuse, before any work, a run that would need a path only one node has.

    On a Ray cluster of more than one node, the artifact storage (adapter store, Ray Train
    checkpoints) must be a URI every node reaches, and a knowledge base must live in a Milvus
    server: a Milvus Lite file is on one node's disk. Anywhere, a path inside Ray's copy of a job's
    working_dir is refused, because that copy is deleted with the Ray session.

    Args:
        cfg: the `LoragConfig`.
        knowledge_bases: names of the knowledge bases the run reads or writes.
        artifacts: whether the run reads or writes the adapter store or training checkpoints.

    Raises:
        ConfigError: listing each such path and the fix.
    """
    import ray

    from lorag.config import ConfigError

    nodes = sum(1 for n in ray.nodes() if n.get("Alive")) if ray.is_initialized() else 1
    paths = []  # (what, location, fix)
    if artifacts:
        paths.append(("storage", cfg.storage_root, "set `storage:` to a URI every node reaches, e.g. s3://bucket/lorag"))
        for ad in cfg.adapters:
            if ad.train.storage_path:
                paths.append((f"adapters.{ad.name}.train.storage_path", ad.train.storage_path, "use a URI every node reaches, or leave it unset"))
    for name in knowledge_bases:
        kb = cfg.knowledge_base(name)
        paths.append((f"knowledge_bases.{name}.uri", cfg.milvus_uri(kb), "use a Milvus server URI (uri: http://HOST:19530)"))
    problems = []
    for what, location, fix in paths:
        if not is_local(location):
            continue
        if "/runtime_resources/working_dir_files/" in location.replace(os.sep, "/"):
            problems.append(f"{what}: {location} is inside Ray's copy of the job's working_dir, deleted with the Ray session; {fix} (or an absolute path)")
        elif nodes > 1:
            problems.append(f"{what}: {location} is a local path, but this Ray cluster has {nodes} nodes that do not share a disk; {fix}")
    if problems:
        raise ConfigError("this run would write where other nodes cannot read, or where the data is lost:\n  " + "\n  ".join(problems))
