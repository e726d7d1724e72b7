"""Connecting to Ray: a local instance on a laptop, or the cluster named by RAY_ADDRESS.

Ray 2.60 turns token authentication on by default. A local `ray.init()` creates and uses its own
token; a client of an existing cluster needs `RAY_AUTH_MODE=token` and the token
(`RAY_AUTH_TOKEN` or `~/.ray/auth_token`), which `connect` checks before dialling so a missing
token is a clear error rather than a hang.
"""

from __future__ import annotations

import os
from pathlib import Path


def connect(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Initialise Ray once for this process.

    Args:
        address: a cluster to join (`ray://...`, `host:port`, `auto`); None uses RAY_ADDRESS, else
            starts a private local instance.
        num_cpus: logical CPUs for a local instance (ignored when joining a cluster).
        quiet: hide Ray's startup banner and per-task log prefixing noise.

    Raises:
        RuntimeError: joining a cluster with token auth but no token available.
    """
    import ray

    if ray.is_initialized():
        return
    # "local" always starts a private instance: never join another process's Ray by accident
    # (two demos on one machine would otherwise share, and replace, each other's Serve apps).
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        _check_token()
    kwargs = {"address": address, "ignore_reinit_error": True, "log_to_driver": True}
    if address == "local":
        kwargs.update(num_cpus=num_cpus)
    if quiet:
        kwargs["logging_level"] = "WARNING"
    ray.init(**kwargs)


def _check_token() -> None:
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").is_file():
        return
    raise RuntimeError(
        "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or copy the head node's ~/.ray/auth_token to this machine"
    )
