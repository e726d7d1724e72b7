"""Ray, local or remote: `connect` for this process, and the calls `lorag submit`, `lorag jobs` and
`lorag deploy` make to a running cluster's dashboard (Ray Jobs and the Serve REST API).

Ray 2.60 turns token authentication on by default: a local `ray.init()` creates and uses its own
token, and `ray start --head` turns it on when a token exists (`ray get-auth-token --generate`
writes `~/.ray/auth_token`). A client of such a cluster sends the head's token; this module takes it
from `--token`, else `RAY_AUTH_TOKEN`, else the file in `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`,
and sends it as `Authorization: Bearer` itself (Ray's own clients send it only under
`RAY_AUTH_MODE=token`). A 401/403 or an unreachable address becomes a `ClusterError` whose message
says what to set.

A submitted job or a deployed app runs in a copy of the project (the repository root, uploaded as
the runtime_env `working_dir`). Ray puts that copy's root on the path, not its `platform/`, so the
runtime_env also sets `PYTHONPATH=platform` (relative: every worker starts in its node's copy) and
lorag imports from the uploaded copy on every node. For a plain `ray job submit --working-dir .`,
`jobs/__init__.py` does this for the job's driver and `connect` for the workers it starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from lorag.storage import is_uri

if TYPE_CHECKING:
    from lorag.config import LoragConfig

# `lorag submit KIND` runs `python -m <module>` in the uploaded project.
JOB_MODULES = {"train": "jobs.finetune", "ingest": "jobs.ingest", "eval": "jobs.evaluate"}
# Never uploaded (on top of .gitignore, which Ray also honours): environments, VCS, caches, local
# artifacts. Patterns are gitignore-style, relative to the project root.
UPLOAD_EXCLUDES = [
    ".venv", "venv", ".git", ".lorag", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".ipynb_checkpoints", "*.egg-info", "*.db", "/build", "/dist", "/tests/kuberay-crds",
]
# Path components that mean "not in the upload" for the config file itself.
_EXCLUDED_DIRS = {".venv", "venv", ".git", ".lorag", "__pycache__", "build", "dist"}
# In the upload, lorag lives at <copy>/platform/lorag; workers start in <copy>.
PROJECT_PYTHONPATH = "platform"
TOKEN_HELP = "pass --token, set RAY_AUTH_TOKEN, or copy the head's ~/.ray/auth_token to this machine"
_TERMINAL_APP_STATES = {"RUNNING", "DEPLOY_FAILED", "UNHEALTHY"}
# Environment variables by these names hold credentials: never in a runtime_env, entrypoint or pod spec.
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW(OR)?D|CREDENTIAL", re.IGNORECASE)


class ClusterError(RuntimeError):
    """A request to a cluster failed for a reason the user can fix; the message names the fix."""


@dataclass(frozen=True)
class Cluster:
    """Where a running cluster's dashboard answers and the token it expects."""

    address: str
    token: str | None = None
    token_source: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@dataclass(frozen=True)
class Submission:
    job_id: str
    entrypoint: str
    project: Path


@dataclass(frozen=True)
class JobResult:
    job_id: str
    status: str
    message: str


@dataclass(frozen=True)
class DeployResult:
    status: str
    message: str
    url: str


# -- this process -------------------------------------------------------------------------------


def connect(address: str | None = None, num_cpus: int | None = None, quiet: bool = True, log_to_driver: bool = True) -> None:
    """Initialise Ray once for this process.

    A Ray Job's driver running in an uploaded copy of the project (`ray job submit --working-dir .`)
    also gives the job's workers `PYTHONPATH=platform`, so they import lorag from that copy too.

    Args:
        address: a cluster to join (`ray://...`, `host:port`, `auto`); None uses RAY_ADDRESS, else
            starts a private local instance.
        num_cpus: logical CPUs for a local instance (ignored when joining a cluster).
        quiet: hide Ray's startup banner and per-task log prefixing noise.
        log_to_driver: print the output of Ray's workers and actors here (Ray Train workers, Ray
            Data tasks, Serve replicas). Off, it stays in Ray's log files only (`ray_logs_dir`)
            and Ray Data, Train and Serve log warnings and errors only: what an interactive
            command shows by default (`lorag --verbose` turns it back on). Jobs keep it on, so
            `ray job logs` shows everything.

    Raises:
        RuntimeError: joining a cluster with token auth but no token available.
    """
    import ray

    if ray.is_initialized():
        return
    # "local" always starts a private instance: never join another process's Ray by accident
    # (two demos on one machine would otherwise share, and replace, each other's Serve apps).
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address.startswith(("http://", "https://")):
        # A dashboard URL (what `lorag submit`, `jobs` and `deploy` use): ray.init cannot join through it.
        print(f"note: RAY_ADDRESS={address} is a Ray dashboard URL, which `lorag submit`, `lorag jobs` and `lorag deploy` use; "
              "this command runs on a local Ray instead (to send it to that cluster: `lorag submit ...`; to join a cluster "
              "from one of its nodes: RAY_ADDRESS=auto)", file=sys.stderr, flush=True)
        os.environ.pop("RAY_ADDRESS")  # Ray's own libraries read it too
        address = "local"
    if address != "local":
        _check_token()
    kwargs = {"address": address, "ignore_reinit_error": True, "log_to_driver": log_to_driver}
    if address == "local":
        kwargs.update(num_cpus=num_cpus)
    elif env := _uploaded_project_env():
        kwargs["runtime_env"] = env
    if quiet:
        kwargs["logging_level"] = "WARNING" if log_to_driver else "ERROR"
    ray.init(**kwargs)
    if not log_to_driver:
        from ray.data import DataContext

        quiet_ray_loggers()
        DataContext.get_current().enable_progress_bars = False  # lorag's commands show their own


def quiet_ray_loggers() -> None:
    """Ray Data, Train and Serve log errors only in this process (their INFO lines and the warnings
    meant for operators stay in Ray's log files). Serve sets its logger up when it is imported,
    so this runs after that import too."""
    from ray import serve  # noqa: F401  (configures "ray.serve")

    for name in ("ray.data", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)


def ray_logs_dir() -> str | None:
    """Where this process's Ray instance writes its logs (None when Ray is not running here)."""
    import ray

    try:
        return ray._private.worker._global_node.get_logs_dir_path()  # no public API for it in Ray 2.x
    except AttributeError:
        return None


def _check_token() -> None:
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return
    if _find_token(None)[0]:
        return
    raise RuntimeError(
        "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) or copy the head node's ~/.ray/auth_token to this machine"
    )


def _uploaded_project_env() -> dict | None:
    """Inside a Ray Job whose working_dir is this project (`ray job submit --working-dir .`), the
    env that lets the job's workers import lorag from the upload too; None elsewhere, or when the
    job already sets PYTHONPATH (`lorag submit` does; Ray refuses to merge a second one)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    renv = job.get("runtime_env") or {}
    if not renv.get("working_dir") or "PYTHONPATH" in (renv.get("env_vars") or {}):
        return None
    if Path(__file__).resolve().parents[1] != Path.cwd().resolve() / PROJECT_PYTHONPATH:
        return None  # this lorag is not the uploaded copy's (the driver runs in the copy's root)
    return {"env_vars": {"PYTHONPATH": PROJECT_PYTHONPATH}}


# -- a running cluster: address and token -------------------------------------------------------


def cluster(address: str | None = None, token: str | None = None, cfg: LoragConfig | None = None) -> Cluster:
    """The dashboard address and auth token to use, from flags, the config and the environment.

    Args:
        address: `--address` (wins); else `cfg.cluster.address`, `RAY_API_SERVER_ADDRESS`,
            `RAY_ADDRESS`. A bare `host:port` means `http://host:port`.
        token: `--token` (wins); else `RAY_AUTH_TOKEN`, the file in `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`.
        cfg: a loaded config, for `cluster.address`.

    Raises:
        ClusterError: no address anywhere, or a Ray Client (`ray://`) address.
    """
    address = (
        address
        or (cfg.cluster.address if cfg is not None else None)
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
    )
    if not address:
        raise ClusterError("no cluster address: pass --address http://HOST:8265 (the head's dashboard), set cluster.address in the config, or set RAY_ADDRESS")
    if address.startswith("ray://"):
        raise ClusterError(f"{address} is a Ray Client address: use the head's dashboard address instead, e.g. http://HOST:8265")
    if not is_uri(address):
        address = f"http://{address}"
    tok, source = _find_token(token)
    return Cluster(address.rstrip("/"), tok, source)


def _find_token(token: str | None) -> tuple[str | None, str | None]:
    if token:
        return token.strip(), "--token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file() and Path(path).read_text().strip():
            return Path(path).read_text().strip(), str(path)
    return None, None


def job_client(target: Cluster):
    """A `JobSubmissionClient` for `target`, its connection and token checked.

    Raises:
        ClusterError: unreachable, or the token is missing or wrong.
    """
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_client_logs()
    with cluster_errors(target):
        # JobSubmissionClient replaces its address with these when they are set; ours already won.
        with _env_removed("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            return JobSubmissionClient(target.address, headers=target.headers)


def serve_client(target: Cluster):
    """A Serve REST API client (`ServeSubmissionClient`) for `target`, its connection and token checked."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    _quiet_ray_client_logs()
    with cluster_errors(target):
        return ServeSubmissionClient(target.address, headers=target.headers)


@contextmanager
def cluster_errors(target: Cluster) -> Iterator[None]:
    """Turn the failures of a dashboard request into one `ClusterError` line that names the fix."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        raise ClusterError(_auth_message(target, 401 if "Authentication required" in str(e) else 403)) from None
    except aiohttp.WSServerHandshakeError as e:
        if e.status in (401, 403):
            raise ClusterError(_auth_message(target, e.status)) from None
        raise ClusterError(f"{target.address}: log stream refused with HTTP {e.status}: {e.message}") from None
    except (ConnectionError, requests.exceptions.RequestException, aiohttp.ClientConnectionError) as e:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {target.address} ({type(e).__name__}): is the cluster up, and is this its "
            "dashboard address (http://HOST:8265; RAY_ADDRESS may hold the GCS address HOST:6379 instead)?"
        ) from None
    except RuntimeError as e:
        if isinstance(e, ClusterError):
            raise
        raise ClusterError(f"{target.address}: {str(e).strip()}") from None


def _auth_message(target: Cluster, status: int) -> str:
    if status == 401 or not target.token:
        return f"{target.address} requires a Ray auth token (HTTP {status}) and none was sent: {TOKEN_HELP}"
    return f"{target.address} rejected the Ray auth token from {target.token_source} (HTTP {status}): {TOKEN_HELP}"


# -- jobs ----------------------------------------------------------------------------------------


def submit_job(
    client, target: Cluster, kind: str, cfg: LoragConfig, config_path: Path,
    names: list[str] | None = None, overrides: list[str] | None = None, dataset: Path | None = None,
) -> Submission:
    """Upload the project and run `python -m jobs.<kind>` on the cluster.

    Args:
        client: from `job_client`.
        target: the cluster (for error messages).
        kind: `train`, `ingest` or `eval`.
        cfg: the config, already loaded with `overrides` (validated here, before any upload).
        config_path: the lorag.yaml; it must lie inside the project, which is uploaded.
        names: adapters (train, eval) or knowledge bases (ingest) to run; default all.
        overrides: `--set` values, passed on to the job.
        dataset: eval: the evaluation set; like the config, it must lie inside the project.

    Returns:
        The job's id, its entrypoint and the uploaded project root.

    Raises:
        ClusterError: the config is outside the project or excluded from the upload, or the
            cluster refused the job.
    """
    root, rel = project_paths(config_path)
    data_rel = None
    if dataset is not None:
        data_root, data_rel = project_paths(dataset)
        if data_root != root:
            raise ClusterError(f"{dataset} is not inside the project {root}, which is what the job gets: move it there")
    entrypoint = job_entrypoint(kind, rel, names, overrides, data_rel)
    job_id = f"lorag-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    with cluster_errors(target):
        retry_later(lambda: client.submit_job(
            entrypoint=entrypoint, submission_id=job_id, runtime_env=project_runtime_env(cfg, root),
            metadata={"lorag": kind, "config": rel},
        ))
    return Submission(job_id, entrypoint, root)


def retry_later(call: Callable[[], Any], within_s: float = 90, first_wait_s: float = 1.0) -> Any:
    """`call()`, again with backoff (1, 2, 4, ... 10 s) while Ray answers "try again later" (a head
    that has just started has no job agent yet), for at most `within_s`; other errors at once."""
    deadline, wait = time.monotonic() + within_s, first_wait_s
    while True:
        try:
            return call()
        except RuntimeError as e:
            text = str(e).lower()
            if "try again later" not in text and "no available agent" not in text or time.monotonic() + wait > deadline:
                raise
        time.sleep(wait)
        wait = min(wait * 2, 10)


def job_entrypoint(kind: str, config_rel: str, names: list[str] | None = None, overrides: list[str] | None = None, dataset_rel: str | None = None) -> str:
    """The shell command a `kind` job runs in the uploaded project."""
    import shlex

    if kind not in JOB_MODULES:
        raise ValueError(f"job kind must be one of {sorted(JOB_MODULES)}, not {kind!r}")
    if (kind == "eval") != (dataset_rel is not None):
        raise ValueError("an eval job needs an evaluation set, and only an eval job takes one")
    flag = "--kb" if kind == "ingest" else "--adapter"
    args = ["python", "-m", JOB_MODULES[kind], "--config", config_rel, *(["--dataset", dataset_rel] if dataset_rel else [])]
    for name in names or []:
        args += [flag, name]
    for item in overrides or []:
        args += ["--set", item]
    return shlex.join(args)


def follow_job(client, target: Cluster, job_id: str, write: Callable[[str], None]) -> JobResult:
    """Stream a job's logs to `write` until it ends; return its final status and message."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    with cluster_errors(target):
        client.get_job_info(job_id)  # a wrong id fails here, with Ray's "does not exist"
        try:
            asyncio.run(tail())
        except RuntimeError:
            pass  # the log stream dropped (head restart, proxy timeout): the status poll below still ends right
    return wait_job(client, target, job_id)


def wait_job(client, target: Cluster, job_id: str, poll_s: float = 1.0) -> JobResult:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED."""
    with cluster_errors(target):
        while True:
            info = client.get_job_info(job_id)
            if info.status.is_terminal():
                return JobResult(job_id, str(info.status.value), info.message or "")
            time.sleep(poll_s)


# -- the project upload --------------------------------------------------------------------------


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


def deploy_runtime_env(cfg: LoragConfig, root: Path) -> dict[str, Any]:
    """The app's runtime_env: `project_runtime_env`, plus this machine's API keys (`serve.api_keys_env`,
    `serve.api_keys_file`) as their digests under `serve.api_keys_env`, where the replicas read them.

    Only `sha256:<hex>` digests travel (`lorag.auth.as_digest`): the gateway compares digests, so
    it accepts the keys while Ray's Serve config and runtime_env logs hold nothing a client could send.

    Raises:
        ConfigError: as `project_runtime_env`.
        ClusterError: the config requires API keys and this machine has none.
    """
    from lorag.auth import api_keys, as_digest

    renv = project_runtime_env(cfg, root)
    try:
        keys = api_keys(cfg)  # as this machine sees them; refuses here if the config requires keys and there are none
    except (RuntimeError, OSError) as e:
        raise ClusterError(str(e)) from None
    if keys:
        renv["env_vars"][cfg.serve.api_keys_env] = ",".join(sorted(as_digest(k) for k in keys))
    return renv


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


def cluster_nodes(target: Cluster) -> int | None:
    """How many nodes of the cluster are alive (the dashboard's state API), or None if it does not say."""
    import httpx

    try:
        r = httpx.get(f"{target.address}/api/v0/nodes", params={"limit": 1000}, headers=target.headers, timeout=10)
        rows = r.json()["data"]["result"]["result"]
        return sum(1 for n in rows if n.get("state") == "ALIVE")
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


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


# -- the Serve application ----------------------------------------------------------------------


def deploy_app(
    target: Cluster, cfg: LoragConfig, config_path: Path, timeout_s: float = 900,
    progress: Callable[[str], None] = lambda _: None,
) -> DeployResult:
    """Deploy the lorag Serve app to a running cluster and wait until it runs or fails.

    The app is `lorag.serving.serve_config` plus `deploy_runtime_env`: the uploaded project as
    working_dir (a gcs:// URI, as the Serve REST API requires), PYTHONPATH for lorag,
    `cluster.env_vars`, and the sha256 digests of this machine's API keys (`serve.api_keys_env` and
    `serve.api_keys_file`) under `serve.api_keys_env`, which is where the replicas read them.

    Args:
        target: the cluster.
        cfg: the config (loaded from `config_path`; the replicas load the same file in the upload).
        config_path: the lorag.yaml, inside the project.
        timeout_s: how long to wait for RUNNING.
        progress: called with one line per status change.

    Returns:
        The application's final status (RUNNING, DEPLOY_FAILED, UNHEALTHY, or DEPLOYING after a
        timeout), its message, and the endpoint's URL.

    Raises:
        ConfigError: `cluster.env_vars` names a credential (nothing is sent).
        ClusterError: unreachable, auth, a config outside the project, no API key where the config
            requires one, or the deploy refused.
    """
    from lorag.serving import serve_config

    root, rel = project_paths(config_path)
    renv = deploy_runtime_env(cfg, root)  # before contacting the cluster: credentials and missing keys are refused here
    client = serve_client(target)
    sc = serve_config(cfg, rel)
    app = sc["applications"][0]
    with cluster_errors(target):
        before = _app_details(client, app["name"]).get("last_deployed_time_s")
        progress(f"uploading {root} (working_dir)")
        # The Serve REST API takes only remote working_dirs: upload the project as the Jobs API
        # does (content-addressed gcs:// package, re-used when unchanged).
        client._upload_working_dir_if_needed(renv)
        renv.pop("excludes", None)
        app["runtime_env"] = renv
        retry_later(lambda: client.deploy_applications(sc))
        progress(f"deploying application {app['name']!r} ({rel})")
        deadline = time.monotonic() + timeout_s
        seen = None
        while True:
            details = _app_details(client, app["name"])
            status = details.get("status")
            fresh = details and details.get("last_deployed_time_s") != before
            if fresh and status != seen:
                progress(f"{app['name']}: {status}")
                seen = status
            if fresh and status in _TERMINAL_APP_STATES:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(2)
    host = cfg.serve.host if cfg.serve.host not in ("0.0.0.0", "::") else target.address.split("://")[1].rsplit(":", 1)[0]
    return DeployResult(status or "NOT_STARTED", _app_message(details), f"http://{host}:{cfg.serve.port}")


def _app_details(client, name: str) -> dict:
    return (client.get_serve_details().get("applications") or {}).get(name) or {}


def _app_message(details: dict) -> str:
    msgs = [details.get("message") or ""]
    for name, dep in (details.get("deployments") or {}).items():
        if dep.get("status") not in (None, "HEALTHY") and dep.get("message"):
            msgs.append(f"{name}: {dep['message']}")
    return "\n".join(m for m in msgs if m)


# -- helpers -------------------------------------------------------------------------------------


@contextmanager
def _env_removed(*names: str) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _quiet_ray_client_logs() -> None:
    """Ray's SDK logs every package upload (and warns about excludes we set anyway) at INFO/WARNING."""
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk", "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir"):
        logging.getLogger(name).setLevel(logging.ERROR)
