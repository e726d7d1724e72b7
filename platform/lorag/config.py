"""The one lorag configuration: `LoragConfig`, loaded from a single `lorag.yaml`.

The CLI, the Ray Job entrypoints, the Serve app builder and the k8s renderer all read a
`LoragConfig`. Its sections (knowledge bases, adapters, serve, cluster, k8s) are the models of
`lorag.sections`; this module owns the top of the tree (cross-section checks, lookups, where
artifacts live) and getting one: `load_config` reads the YAML, applies dotted `key=value`
overrides, validates, and makes paths absolute. Unknown keys are rejected (with the closest
field name) so a typo never silently becomes a default; `lorag config` lists every field
(`lorag.reference`).

Relative paths in the file are resolved against the file's own directory, so a job started from
any working directory (or a Ray worker on another node with the same checkout) sees the same
files.
"""

from __future__ import annotations

import difflib
import os
import types
from pathlib import Path
from typing import Any, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorag.sections import AdapterConfig, ClusterConfig, K8sConfig, KnowledgeBaseConfig, ServeConfig
from lorag.storage import is_uri

FIELDS_HINT = "`lorag config` or docs/config.md lists every field"


class ConfigError(ValueError):
    """A config file or override is invalid. The message lists every problem, one per line."""


class LoragConfig(BaseModel):
    """Everything lorag needs: models, knowledge bases, adapters, and the endpoint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as every section (lorag.sections)

    base_model: str = Field("smollm2-135m-instruct", description="Generator: 'smollm2-135m-instruct' (bundled), a local checkpoint directory, or a Hugging Face id.")
    embedder: str = Field("all-minilm-l6-v2", description="Sentence embedder: 'all-minilm-l6-v2' (bundled), a local directory, or a Hugging Face id.")
    workdir: str = Field(".lorag", description="Where lorag writes: Milvus Lite file, adapter store, Ray Train results. Relative to this file.")
    storage: str | None = Field(
        None,
        description="Where artifacts live: the adapter store and Ray Train checkpoints. A local directory (relative to this file) or a "
        "pyarrow filesystem URI (s3://bucket/prefix, gs://bucket/prefix; endpoint and credentials from the environment, as pyarrow "
        "reads them). Default: <workdir>. A cluster of more than one node needs a URI every node reaches.",
    )
    cache_dir: str | None = Field(None, description="Node-local cache: converted models, and models and adapters fetched from storage URIs (by content hash). Default: $LORAG_CACHE or ~/.cache/lorag.")
    knowledge_bases: list[KnowledgeBaseConfig] = Field(default_factory=list, description="Knowledge bases to build and serve.")
    adapters: list[AdapterConfig] = Field(default_factory=list, description="Adapters to train and serve.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="HTTP endpoint.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="A running Ray cluster to submit jobs and deploy to.")
    k8s: K8sConfig = Field(default_factory=K8sConfig, description="Kubernetes manifests (KubeRay) rendered from this config.")

    @model_validator(mode="after")
    def _cross_check(self) -> "LoragConfig":
        problems = []
        for kind, items in (("knowledge_bases", self.knowledge_bases), ("adapters", self.adapters)):
            seen = set()
            for i, item in enumerate(items):
                if item.name in seen:
                    problems.append(f"{kind}.{i}.name: duplicate name {item.name!r}")
                seen.add(item.name)
        stores: dict[tuple[str | None, str], str] = {}  # (uri, collection) -> first knowledge base there
        for i, kb in enumerate(self.knowledge_bases):
            other = stores.setdefault((kb.uri, kb.collection), kb.name)
            if other != kb.name:
                problems.append(
                    f"knowledge_bases.{i}.milvus_collection: {kb.name!r} and {other!r} would share Milvus collection {kb.collection!r} "
                    f"at {kb.uri or 'the default Milvus Lite file'} (each ingest would delete the other's documents); give one another milvus_collection"
                )
        kb_names = {kb.name for kb in self.knowledge_bases}
        for i, ad in enumerate(self.adapters):
            if ad.knowledge_base is not None and ad.knowledge_base not in kb_names:
                problems.append(
                    f"adapters.{i}.knowledge_base: {ad.knowledge_base!r} is not a knowledge base in this file "
                    f"(known: {sorted(kb_names) or 'none'})"
                )
        for i, key in enumerate(self.serve.api_keys):
            for kb in key.knowledge_bases or []:
                if kb not in kb_names:
                    problems.append(f"serve.api_keys.{i}.knowledge_bases: {kb!r} is not a knowledge base in this file (known: {sorted(kb_names) or 'none'})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # -- lookups ----------------------------------------------------------------------------

    def knowledge_base(self, name: str) -> KnowledgeBaseConfig:
        for kb in self.knowledge_bases:
            if kb.name == name:
                return kb
        raise KeyError(f"no knowledge base {name!r} in the config (known: {[k.name for k in self.knowledge_bases]})")

    def adapter(self, name: str) -> AdapterConfig:
        for ad in self.adapters:
            if ad.name == name:
                return ad
        raise KeyError(f"no adapter {name!r} in the config (known: {[a.name for a in self.adapters]})")

    @property
    def storage_root(self) -> str:
        """Where artifacts live: `storage`, else the workdir (a local path or a filesystem URI)."""
        return self.storage or self.workdir

    @property
    def adapter_store(self) -> str:
        """The adapter store: `<storage>/adapters` (a local path or a URI)."""
        return join_uri(self.storage_root, "adapters")

    @property
    def train_storage(self) -> str:
        """Default Ray Train storage_path: `<storage>/ray_results`."""
        return join_uri(self.storage_root, "ray_results")

    def milvus_uri(self, kb: KnowledgeBaseConfig) -> str:
        return kb.uri or str(Path(self.workdir) / "milvus.db")

    @property
    def model_cache(self) -> Path:
        return node_cache(self.cache_dir)


def node_cache(cache_dir: str | None) -> Path:
    """This node's cache: `cache_dir` when the config sets one, else $LORAG_CACHE, else ~/.cache/lorag.
    Evaluated where it runs, so each node of a cluster uses its own."""
    return Path(cache_dir or os.environ.get("LORAG_CACHE") or Path.home() / ".cache" / "lorag").expanduser()


# -- loading ------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> LoragConfig:
    """Load `lorag.yaml`, apply `key=value` overrides, validate, and make paths absolute.

    Args:
        path: the YAML file.
        overrides: dotted `key=value` strings, e.g. `adapters.support-bot.train.max_steps=2`
            (list items may be addressed by index or by their `name`). Values are parsed as YAML.

    Returns:
        The validated config, with every path absolute.

    Raises:
        ConfigError: the file is missing or not YAML, an override is malformed, or validation
            failed; the message lists each problem as `field.path: reason`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, got {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item)
        parts = item.partition("=")[0].split(".")
        if miss := _first_unknown(parts):
            depth, model = miss
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])}: {_unknown_key(parts[depth], model)} ({FIELDS_HINT})")
    cfg = parse_config(data, source=str(path))
    return resolve_paths(cfg, path.parent.resolve())


def parse_config(data: dict[str, Any], source: str = "config") -> LoragConfig:
    """Validate a plain dict into a `LoragConfig`, turning pydantic errors into one `ConfigError`."""
    try:
        return LoragConfig.model_validate(data)
    except ValidationError as e:
        lines, hint = [f"{source}: {e.error_count()} problem(s):"], False
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                miss = _first_unknown(err["loc"])
                msg = _unknown_key(err["loc"][-1], miss[1] if miss else None)
                hint = True
            elif "input" in err and not isinstance(err["input"], (dict, list)):
                msg = f"{msg} (got {err['input']!r})"
            lines.append(f"  {loc}: {msg}")
        if hint:
            lines.append(f"  ({FIELDS_HINT})")
        raise ConfigError("\n".join(lines)) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set one dotted `key=value` in a raw config dict, in place.

    Raises:
        ConfigError: the override has no '=' or its path does not exist.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.path=value, e.g. serve.port=8001")
    value = yaml.safe_load(raw) if raw else ""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, key)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])} is a value, not a section")


def _first_unknown(path: Sequence[str | int]) -> tuple[int, type[BaseModel]] | None:
    """Where a key path (list items by index or name) leaves the model tree: the index of the first key that is
    no field, and the model it is missing from. None when each key is a field, up to a plain value."""
    model, item_next = LoragConfig, False
    for depth, part in enumerate(path):
        if item_next:  # the index or name of a list item
            item_next = False
            continue
        if part not in model.model_fields:
            return depth, model
        if (sub := submodel(model.model_fields[part].annotation)) is None:
            return None
        model, item_next = sub[0], bool(sub[1])
    return None


def _unknown_key(key: str | int, model: type[BaseModel] | None) -> str:
    """'unknown key', with the closest field name of `model` when one is close."""
    close = difflib.get_close_matches(str(key), list(model.model_fields), n=1) if model else []
    return f"unknown key; did you mean `{close[0]}`?" if close else "unknown key"


def _list_index(items: list, part: str, key: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [it.get("name") for it in items if isinstance(it, dict)]
    raise ConfigError(f"override {key!r}: no list item {part!r} (use an index or one of the names {names})")


def resolve_paths(cfg: LoragConfig, root: Path) -> LoragConfig:
    """Return a copy of `cfg` with relative paths made absolute against `root`."""

    def absolute(p: str) -> str:
        return p if is_uri(p) or os.path.isabs(os.path.expanduser(p)) else str((root / p).resolve())

    def model_ref(ref: str) -> str:
        # A relative path that exists next to the config is a local model; anything else is a name or hub id.
        return str((root / ref).resolve()) if not os.path.isabs(ref) and (root / ref).exists() else ref

    data = cfg.model_dump()
    data["workdir"] = absolute(data["workdir"])
    if data["storage"]:
        data["storage"] = absolute(data["storage"])
    if data["cache_dir"]:
        data["cache_dir"] = absolute(data["cache_dir"])
    data["base_model"] = model_ref(data["base_model"])
    data["embedder"] = model_ref(data["embedder"])
    for kb in data["knowledge_bases"]:
        kb["sources"] = [absolute(s) for s in kb["sources"]]
        if kb["uri"]:
            kb["uri"] = absolute(kb["uri"])
    if data["serve"]["api_keys_file"]:
        data["serve"]["api_keys_file"] = absolute(data["serve"]["api_keys_file"])
    for ad in data["adapters"]:
        ad["dataset"] = absolute(ad["dataset"])
        for key in ("deepspeed_config", "storage_path"):
            if ad["train"][key]:
                ad["train"][key] = absolute(ad["train"][key])
    return LoragConfig.model_validate(data)


def join_uri(root: str, *parts: str) -> str:
    """`root/part/...` for a local path or a URI (never os.sep on a URI)."""
    if is_uri(root):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def dump_config(cfg: LoragConfig) -> str:
    """The resolved config as YAML, as stored next to every artifact."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def submodel(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The model a field holds, and how its items are addressed: "" (one), "[]" (a list), ".<key>" (a dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return next(filter(None, map(submodel, args)), None)
    item = args[-1] if origin in (list, dict) and args else None
    if isinstance(item, type) and issubclass(item, BaseModel):
        return item, "[]" if origin is list else ".<key>"
    return None
