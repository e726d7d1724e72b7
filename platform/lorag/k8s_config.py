"""The lorag config as the pods see it, and the two objects that carry it: the ConfigMap and the Secret.

`cluster_config` differs from the laptop's config only where it must: Milvus Lite files become the
in-cluster Milvus Service, local storage becomes `k8s.storage` (a URI every pod reaches; there is
no default bucket), paths under the project root move to where k8s/Dockerfile copies the project
(APP_DIR), and Serve binds 0.0.0.0 with API keys required. It refuses, listing every problem, a
config that would put a secret in plain text into a manifest: a Milvus token, a password in a URI,
an API keys file (it would be baked into the image) and `cluster.env_vars` named like credentials
(those belong in `k8s.storage_secret`).

`config_map` holds that config as lorag.yaml (mounted in every Ray pod at CONFIG_PATH, no token in
it); `secret` is the Secret with placeholders for the Ray token, the API keys and Milvus's root
password, which is created with kubectl and never applied as rendered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from lorag.config import ConfigError, LoragConfig, parse_config
from lorag.k8s_layout import (
    API_KEYS_KEY,
    APP_DIR,
    CONFIG_MAP,
    MILVUS_PASSWORD_KEY,
    MILVUS_TOKEN_ENV,
    PLACEHOLDER,
    POD_WORKDIR,
    SECRET,
    TOKEN_KEY,
    meta,
    milvus_uri,
)
from lorag.storage import is_uri


def cluster_config(cfg: LoragConfig, root: str | os.PathLike = ".") -> LoragConfig:
    """`cfg` as the pods see it (the ConfigMap's lorag.yaml).

    Knowledge bases on a Milvus Lite file use the in-cluster Milvus Service; `storage` becomes
    `k8s.storage` unless it is a URI already; paths under `root` move under APP_DIR (and so does
    `k8s.eval_dataset`, given relative to `root`); node-local paths (workdir, model cache, a local
    Ray Train storage_path) are left to the pods; Serve binds 0.0.0.0 and requires API keys unless
    the config says `auth: none`. Knowledge bases have no token: the pods read MILVUS_TOKEN_ENV,
    which they get from the Secret.

    Raises:
        ConfigError: naming each field whose path lies outside `root` (or, for `k8s.eval_dataset`,
            is no file there), `k8s.storage` when the pods would have no storage URI, and each
            secret that would be rendered in plain text (a token written in the config rather than
            taken from $LORAG_MILVUS_TOKEN, a password in a URI, `serve.api_keys_file`,
            `cluster.env_vars` named like a credential); and the fix.
    """
    root = Path(root).resolve()
    data = cfg.model_dump(mode="json")
    problems: list[str] = []  # in the order of the config's fields, so the message reads like the file
    data["workdir"] = POD_WORKDIR
    _check_env_vars(cfg, problems)
    _move_storage(cfg, data, problems)
    for key in ("base_model", "embedder"):
        if os.path.isabs(data[key]):  # a local model directory; names and hub ids stay as they are
            data[key] = _rebase(key, data[key], root, problems)
    _move_knowledge_bases(data["knowledge_bases"], milvus_uri(cfg.k8s.namespace), root, problems)
    _move_adapters(data["adapters"], root, problems)
    _move_serve(data["serve"], problems)
    if dataset := cfg.k8s.eval_dataset:
        path = Path(dataset) if os.path.isabs(dataset) else root / dataset
        if path.is_file():
            data["k8s"]["eval_dataset"] = _rebase("k8s.eval_dataset", str(path), root, problems)
        else:
            problems.append(
                f"  k8s.eval_dataset: {path} is not a file: give the evaluation set (JSONL) as a path inside the project, "
                f"relative to the project root {root}"
            )
    if problems:
        raise ConfigError("the config cannot run in the cluster as it is:\n" + "\n".join(problems))
    return parse_config(data, source="cluster config")


def config_map(in_cluster: LoragConfig, ns: str, ann: dict[str, str], config_path: str) -> dict:
    """ConfigMap CONFIG_MAP: `in_cluster` (`cluster_config`) as lorag.yaml, with a header saying what changed."""
    # Only what differs from the defaults, so the file reads like a hand-written lorag.yaml.
    body = in_cluster.model_dump(mode="json", exclude_defaults=True, exclude={"k8s", "cluster"})
    for kb in body.get("knowledge_bases", []):
        kb.pop("token", None)  # absent, not null: the pods take their $LORAG_MILVUS_TOKEN
    text = (
        f"# {config_path} as the cluster sees it (rendered by `lorag k8s render`): Milvus is the in-cluster\n"
        f"# Service, storage a URI every pod reaches, paths where k8s/Dockerfile puts the project ({APP_DIR}).\n"
        f"# Knowledge bases take their Milvus token from ${MILVUS_TOKEN_ENV}, set in every Ray pod from Secret {SECRET}.\n"
        + yaml.safe_dump(body, sort_keys=False, width=1000)
    )
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(CONFIG_MAP, ns, "config", ann), "data": {"lorag.yaml": text}}


def secret(cfg: LoragConfig, ann: dict[str, str]) -> dict:
    """Secret SECRET with a placeholder in each key and an annotation saying what each one holds."""
    note = (
        f"Placeholders: replace every value before use. {TOKEN_KEY}: the Ray cluster token (any long random string, "
        f"e.g. `openssl rand -hex 32`); {API_KEYS_KEY}: comma-separated API keys clients send as `Authorization: Bearer <key>`; "
        f"{MILVUS_PASSWORD_KEY}: Milvus's root password, set when its volume is first initialised (e.g. `openssl rand -hex 16`)."
    )
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(SECRET, cfg.k8s.namespace, "secret", {**ann, "lorag.io/replace-before-use": note}),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: PLACEHOLDER, API_KEYS_KEY: PLACEHOLDER, MILVUS_PASSWORD_KEY: PLACEHOLDER},
    }


# -- the steps of cluster_config: each edits `data` (the config as a dict) and appends to `problems` --


def _rebase(where: str, path: str, root: Path, problems: list[str]) -> str:
    """`path` where the image has it (under APP_DIR); a URI stays as it is, a path outside `root` is a problem."""
    if is_uri(path):
        return path
    try:
        rel = Path(path).resolve().relative_to(root).as_posix()
        return APP_DIR if rel == "." else f"{APP_DIR}/{rel}"
    except ValueError:
        problems.append(
            f"  {where}: {path} is outside the project root {root}, which k8s/Dockerfile copies to {APP_DIR}: "
            "move it under the project (or render from a root that holds it), or use a storage URI"
        )
        return path


def _check_password(where: str, uri: str | None, problems: list[str]) -> None:
    if uri and is_uri(uri) and urlsplit(uri).password:
        problems.append(f"  {where}: the URI holds a password, which would be written in plain text into ConfigMap {CONFIG_MAP}: "
                        "remove it from the URI (a Milvus token comes from the Secret, storage credentials from k8s.storage_secret)")


def _check_env_vars(cfg: LoragConfig, problems: list[str]) -> None:
    """`cluster.env_vars` go into every Ray pod spec in plain text: none may be named like a credential."""
    from lorag.upload import SECRET_NAME

    storage_secret = cfg.k8s.storage_secret or "lorag-storage"
    for name in sorted(cfg.cluster.env_vars):
        if SECRET_NAME.search(name):
            problems.append(
                f"  cluster.env_vars.{name}: its value would be written in plain text into every Ray pod spec: remove it from the "
                f"config and put it into the Secret of k8s.storage_secret, whose keys every Ray pod gets as environment variables "
                f"(kubectl create secret generic {storage_secret} -n {cfg.k8s.namespace} --from-literal={name}=..."
                + (")" if cfg.k8s.storage_secret else f", and set k8s.storage_secret: {storage_secret})")
            )


def _move_storage(cfg: LoragConfig, data: dict[str, Any], problems: list[str]) -> None:
    """Artifacts go to a URI every pod reaches (`storage` if it is one, else `k8s.storage`); no node-local model cache."""
    _check_password("storage", data["storage"], problems)
    _check_password("k8s.storage", cfg.k8s.storage, problems)
    data["cache_dir"] = None
    if not (data["storage"] and is_uri(data["storage"])):
        if cfg.k8s.storage is None:
            problems.append(
                f"  k8s.storage: not set, and storage ({data['storage'] or 'default: the workdir'}) is not a URI, so the pods would "
                "have nowhere to keep adapters and checkpoints: set k8s.storage to a bucket every pod reaches, e.g. "
                "`k8s: {storage: s3://my-bucket/lorag}` in the config or --set k8s.storage=s3://my-bucket/lorag"
            )
        data["storage"] = cfg.k8s.storage


def _move_knowledge_bases(kbs: list[dict[str, Any]], milvus: str, root: Path, problems: list[str]) -> None:
    """Sources under APP_DIR, no token (the pods have theirs), Milvus Lite files replaced by the in-cluster `milvus`."""
    for i, kb in enumerate(kbs):
        kb["sources"] = [_rebase(f"knowledge_bases.{i}.sources.{j}", s, root, problems) for j, s in enumerate(kb["sources"])]
        if kb["token"]:  # written in the config or --set (the environment's stays there)
            problems.append(
                f"  knowledge_bases.{i}.token: would be written in plain text into ConfigMap {CONFIG_MAP}: remove it from the config; "
                f"the pods read ${MILVUS_TOKEN_ENV}, which they get from Secret {SECRET} (root:<{MILVUS_PASSWORD_KEY}>)"
            )
        kb["token"] = None  # the pods' own $LORAG_MILVUS_TOKEN, never this machine's
        _check_password(f"knowledge_bases.{i}.uri", kb["uri"], problems)
        if not (kb["uri"] and is_uri(kb["uri"])):  # a Milvus Lite file works on one node only
            kb["uri"] = milvus


def _move_adapters(adapters: list[dict[str, Any]], root: Path, problems: list[str]) -> None:
    """Datasets and DeepSpeed configs under APP_DIR; a local Ray Train storage_path left to the default."""
    for i, ad in enumerate(adapters):
        ad["dataset"] = _rebase(f"adapters.{i}.dataset", ad["dataset"], root, problems)
        train = ad["train"]
        if train["deepspeed_config"]:
            train["deepspeed_config"] = _rebase(f"adapters.{i}.train.deepspeed_config", train["deepspeed_config"], root, problems)
        if train["storage_path"] and not is_uri(train["storage_path"]):
            train["storage_path"] = None  # the default, <storage>/ray_results, is reachable from every pod


def _move_serve(serve: dict[str, Any], problems: list[str]) -> None:
    """Serve answers on the pod IP and takes its API keys from the Secret, never from a file in the image."""
    serve["host"] = "0.0.0.0"  # the Serve proxy must answer on the pod IP behind KubeRay's serve Service
    if serve["api_keys_file"]:
        problems.append(
            f"  serve.api_keys_file: {serve['api_keys_file']} would be copied into the image with the project, keys in plain text: "
            f"leave it unset; the endpoint takes its keys from Secret {SECRET} (key {API_KEYS_KEY}, comma-separated)"
        )
    if serve.get("auth") is None:
        serve["auth"] = "api_keys"  # the Secret supplies them; refuse to start rather than serve openly
