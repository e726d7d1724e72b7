"""Ray, local or remote: `connect` for this process, and the dashboard of a running cluster that
`lorag submit`, `lorag jobs` and `lorag deploy` talk to: its address and token, the Ray Jobs and
Serve REST clients, Ray's "try again later", and the one `ClusterError` line a failed request becomes.

Ray 2.60 turns token authentication on by default: a local `ray.init()` creates and uses its own
token, and `ray start --head` turns it on when a token exists (`ray get-auth-token --generate`
writes `~/.ray/auth_token`). A client of such a cluster sends the head's token; this module takes it
from `--token`, else `RAY_AUTH_TOKEN`, else the file in `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`,
and sends it as `Authorization: Bearer` itself (Ray's own clients send it only under
`RAY_AUTH_MODE=token`). A 401/403 or an unreachable address becomes a `ClusterError` whose message
says what to set.

What is sent to a cluster lives beside this module: the project upload and the checks made before
it (`lorag.upload`), Ray Jobs (`lorag.submission`) and the Serve app (`lorag.deploy`). A job or app
runs in an uploaded copy of the project with `PYTHONPATH=platform`; for a plain
`ray job submit --working-dir .`, `jobs/__init__.py` sets that path for the job's driver and
`connect` for the workers it starts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from lorag.storage import is_uri

if TYPE_CHECKING:
    from lorag.config import LoragConfig

# In the upload, lorag lives at <copy>/platform/lorag; workers start in <copy>.
PROJECT_PYTHONPATH = "platform"
TOKEN_HELP = "pass --token, set RAY_AUTH_TOKEN, or copy the head's ~/.ray/auth_token to this machine"


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


# -- a running cluster: address, token, clients -------------------------------------------------


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


def cluster_nodes(target: Cluster) -> int | None:
    """How many nodes of the cluster are alive (the dashboard's state API), or None if it does not say."""
    import httpx

    try:
        r = httpx.get(f"{target.address}/api/v0/nodes", params={"limit": 1000}, headers=target.headers, timeout=10)
        rows = r.json()["data"]["result"]["result"]
        return sum(1 for n in rows if n.get("state") == "ALIVE")
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


# -- helpers ------------------------------------------------------------------------------------


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
