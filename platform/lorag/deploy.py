"""The lorag Serve app on a running cluster (`lorag deploy`): its runtime_env, which carries the
digests of this machine's API keys, and `deploy_app`, which uploads the project, deploys the app
through the Serve REST API and waits until it runs or fails."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lorag.cluster import Cluster, ClusterError, cluster_errors, retry_later, serve_client
from lorag.upload import project_paths, project_runtime_env

if TYPE_CHECKING:
    from lorag.config import LoragConfig

_TERMINAL_APP_STATES = {"RUNNING", "DEPLOY_FAILED", "UNHEALTHY"}


@dataclass(frozen=True)
class DeployResult:
    status: str
    message: str
    url: str


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
        details = _wait_for_app(client, app["name"], before, timeout_s, progress)
        status = details.get("status")
    host = cfg.serve.host if cfg.serve.host not in ("0.0.0.0", "::") else target.address.split("://")[1].rsplit(":", 1)[0]
    return DeployResult(status or "NOT_STARTED", _app_message(details), f"http://{host}:{cfg.serve.port}")


def _wait_for_app(client, name: str, before: float | None, timeout_s: float, progress: Callable[[str], None]) -> dict:
    """Poll the app `name` until its new deploy (one whose `last_deployed_time_s` is not `before`) is
    RUNNING, DEPLOY_FAILED or UNHEALTHY, or `timeout_s` has passed; report each new status to
    `progress`, and return the app's last details."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while True:
        details = _app_details(client, name)
        status = details.get("status")
        fresh = details and details.get("last_deployed_time_s") != before
        if fresh and status != seen:
            progress(f"{name}: {status}")
            seen = status
        if fresh and status in _TERMINAL_APP_STATES:
            return details
        if time.monotonic() > deadline:
            return details
        time.sleep(2)


def _app_details(client, name: str) -> dict:
    return (client.get_serve_details().get("applications") or {}).get(name) or {}


def _app_message(details: dict) -> str:
    msgs = [details.get("message") or ""]
    for name, dep in (details.get("deployments") or {}).items():
        if dep.get("status") not in (None, "HEALTHY") and dep.get("message"):
            msgs.append(f"{name}: {dep['message']}")
    return "\n".join(m for m in msgs if m)
