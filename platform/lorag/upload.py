"""The project a cluster receives, and the checks made before anything is sent: where the project
and the config in it are (`project_paths`), the runtime_env of a job or app (`project_runtime_env`),
credentials that would travel in plain text (`secret_problems`), and a config that cannot work on
the cluster it is sent to (`check_for_cluster`).

A submitted job or a deployed app runs in a copy of the project (the repository root, uploaded as
the runtime_env `working_dir`). Ray puts that copy's root on the path, not its `platform/`, so the
runtime_env also sets `PYTHONPATH=platform` (relative: every worker starts in its node's copy) and
lorag imports from the uploaded copy on every node.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lorag.cluster import PROJECT_PYTHONPATH, Cluster, ClusterError
from lorag.storage import is_uri

if TYPE_CHECKING:
    from lorag.config import LoragConfig

# Never uploaded (on top of .gitignore, which Ray also honours): environments, VCS, caches, local
# artifacts. Patterns are gitignore-style, relative to the project root.
UPLOAD_EXCLUDES = [
    ".venv", "venv", ".git", ".lorag", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".ipynb_checkpoints", "*.egg-info", "*.db", "/build", "/dist", "/tests/kuberay-crds",
]
# Path components that mean "not in the upload" for the config file itself.
_EXCLUDED_DIRS = {".venv", "venv", ".git", ".lorag", "__pycache__", "build", "dist"}
# Environment variables by these names hold credentials: never in a runtime_env, entrypoint or pod spec.
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW(OR)?D|CREDENTIAL", re.IGNORECASE)


def find_project(start: Path) -> Path | None:
    """The nearest directory at or above `start` holding a lorag project (jobs/ and platform/lorag/)."""
    for d in [start, *start.parents]:
        if (d / "jobs" / "__init__.py").is_file() and (d / "platform" / "lorag" / "__init__.py").is_file():
            return d
    return None


def project_paths(config_path: Path) -> tuple[Path, str]:
    """The project root to upload and the config's path inside it (posix, as the job sees it).

    The root is the project above the config, else the one this lorag was installed from.

    Raises:
        ClusterError: the config is not inside a project, or lies where the upload skips it.
    """
    config = Path(config_path).resolve()
    root = find_project(config.parent) or find_project(Path(__file__).resolve().parent)
    if root is None:
        raise ClusterError(
            f"no lorag project found above {config} or this lorag install (a directory with jobs/ and platform/lorag/): "
            "run from a lorag checkout, with the config inside it"
        )
    try:
        rel = config.relative_to(root)
    except ValueError:
        raise ClusterError(
            f"{config} is outside the project {root}, which is what the cluster receives (the job's working_dir): "
            f"move the config and the files it names into {root}"
        ) from None
    skipped = _EXCLUDED_DIRS.intersection(rel.parts[:-1])
    if skipped:
        raise ClusterError(f"{rel} lies under {sorted(skipped)[0]}/, which is not uploaded to the cluster: move the config elsewhere in {root}")
    return root, rel.as_posix()


def project_runtime_env(cfg: LoragConfig, root: Path) -> dict[str, Any]:
    """The runtime_env of a job or app: the project as working_dir (uploaded), lorag on PYTHONPATH,
    `cluster.pip` and `cluster.env_vars`.

    Raises:
        ConfigError: `cluster.env_vars` names a credential (`secret_problems`).
    """
    from lorag.config import ConfigError

    if problems := secret_problems(cfg):
        raise ConfigError("this config would send credentials in plain text (nothing was uploaded):\n  " + "\n  ".join(problems))
    env_vars = dict(cfg.cluster.env_vars)
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_PYTHONPATH, env_vars.get("PYTHONPATH")) if p)
    renv: dict[str, Any] = {"working_dir": str(root), "excludes": list(UPLOAD_EXCLUDES), "env_vars": env_vars}
    if cfg.cluster.pip:
        renv["pip"] = list(cfg.cluster.pip)
    return renv


def secret_problems(cfg: LoragConfig, overrides: list[str] | None = None) -> list[str]:
    """Credentials that would travel in plain text to a cluster, one line per field with the fix.

    `cluster.env_vars` go into every job's and the app's runtime_env, and `--set` values into the
    job's entrypoint: Ray shows both to every holder of the cluster's token and logs them on its
    nodes. A credential is an env var whose name says KEY, SECRET, TOKEN, PASSWORD or CREDENTIAL,
    a `token` or `password` field, or a URL with a password in it. The lines never hold the values.
    """
    from urllib.parse import urlsplit

    import yaml

    fix = "set it in the environment of the cluster's nodes instead (on Kubernetes: a Secret; a Milvus token as LORAG_MILVUS_TOKEN)"

    def secrets(path: list[str], value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield from secrets([*path, str(k)], v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from secrets([*path, str(i)], v)
        elif value is not None and value != "" and not isinstance(value, bool):
            env_var = path[:2] == ["cluster", "env_vars"] and len(path) == 3 and SECRET_NAME.search(path[2])
            url = isinstance(value, str) and is_uri(value) and urlsplit(value).password
            if path[-1] in ("token", "password") or env_var or url:
                yield ".".join(path)

    given = []  # the fields --set gives credentials to
    for item in overrides or []:
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        given += secrets(key.split("."), value)
    problems = [f"--set {field}: a credential on the command line is sent in plain text in the job's entrypoint: remove it, and {fix}" for field in given]
    return problems + [f"cluster.env_vars.{name}: its value would be sent in plain text in the runtime_env: remove it, and {fix}"
                       for name in sorted(cfg.cluster.env_vars) if SECRET_NAME.search(name) and f"cluster.env_vars.{name}" not in given]


def check_for_cluster(cfg: LoragConfig, root: Path, target: Cluster, kind: str, names: list[str] | None = None, nodes: int | None = None) -> None:
    """Refuse, before anything is uploaded, a config that cannot work on the cluster at `target`.

    The job (or app) runs in Ray's copy of `root`, on the cluster's nodes. So: no output inside the
    project (it would land in that copy and vanish with the session); on a cluster that is not this
    machine, no input outside the project (documents, datasets, model directories: only the
    driver's disk has them) and no endpoint bound to loopback; on a cluster of several nodes, no
    local storage or Milvus Lite file (one node's disk).

    Args:
        cfg: the config as the job will load it.
        root: the project that is uploaded.
        target: the cluster (its address tells whether it is this machine).
        kind: `ingest`, `train`, `eval` or `deploy`: what the run reads and writes.
        names: only these knowledge bases (ingest) or adapters (train, eval).
        nodes: the cluster's live nodes (`cluster_nodes`), None if unknown.

    Raises:
        ConfigError: one line per problem, each naming the field to change.
    """
    from lorag.config import ConfigError

    here = _is_loopback(target.address)
    outputs, inputs = _locations(cfg, kind, names)
    problems = []
    for field, location, fix in outputs:
        if is_uri(location):
            continue
        path = Path(location).resolve()
        if path.is_relative_to(root):
            problems.append(f"{field}: {path.relative_to(root)} is inside the project, so on the cluster it is written into Ray's "
                            f"temporary copy of the project and lost with the session: use {fix}")
        elif nodes is not None and nodes > 1:
            problems.append(f"{field}: {location} is on one node's disk, and the cluster at {target.address} has {nodes} nodes: use {fix}")
    for field, location in inputs:
        if not here and not is_uri(str(location)) and not Path(location).resolve().is_relative_to(root):
            problems.append(f"{field}: {location} is on this machine only, outside the project that is uploaded: "
                            f"move it into {root} (or use an s3:// location the cluster reads)")
    if kind == "deploy" and not here and cfg.serve.host in ("127.0.0.1", "localhost", "::1"):
        problems.append(f"serve.host: {cfg.serve.host} would take requests only from inside the head node of {target.address}: "
                        "set serve.host: 0.0.0.0 (API keys are then required)")
    if problems:
        raise ConfigError(f"this config cannot run on the cluster at {target.address} as it is (nothing was uploaded):\n  " + "\n  ".join(problems))


def _locations(cfg: LoragConfig, kind: str, names: list[str] | None) -> tuple[list[tuple[str, str, str]], list[tuple[str, Any]]]:
    """What a `kind` run writes, as (field, location, the fix when it is local), and what it reads,
    as (field, location): the outputs and inputs that `check_for_cluster` checks."""
    ads = [] if kind == "ingest" else [cfg.adapter(n) for n in names] if names else list(cfg.adapters)
    if kind == "ingest":
        kbs = [cfg.knowledge_base(n) for n in names] if names else list(cfg.knowledge_bases)
    elif kind == "train":  # training reads the knowledge bases its adapters are bound to (RAFT, sourced prompts)
        kbs = [cfg.knowledge_base(n) for n in dict.fromkeys(ad.knowledge_base for ad in ads if ad.knowledge_base)]
    else:
        kbs = list(cfg.knowledge_bases)
    outputs = [(f"knowledge_bases.{kb.name}.uri", cfg.milvus_uri(kb), "a Milvus server (uri: http://HOST:19530)") for kb in kbs]
    if kind != "ingest":
        outputs.insert(0, ("storage", cfg.storage_root, "a URI the cluster keeps (storage: s3://BUCKET/lorag)"))
    inputs = [(f"knowledge_bases.{kb.name}.sources", src) for kb in kbs for src in kb.sources]
    inputs += [(f"adapters.{ad.name}.dataset", ad.dataset) for ad in ads if ad.dataset]
    inputs += [(field, ref) for field, ref in (("base_model", cfg.base_model), ("embedder", cfg.embedder)) if os.path.isabs(ref)]
    return outputs, inputs


def _is_loopback(address: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
