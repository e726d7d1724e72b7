"""Ray Jobs on a running cluster: `lorag submit` uploads the project and runs `python -m jobs.<kind>`
in it (`submit_job`, `job_entrypoint`), then streams the job's logs and waits for its end
(`follow_job`, `wait_job`). The client comes from `lorag.cluster`, the upload from `lorag.upload`."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lorag.cluster import Cluster, ClusterError, cluster_errors, retry_later
from lorag.upload import project_paths, project_runtime_env

if TYPE_CHECKING:
    from lorag.config import LoragConfig

# `lorag submit KIND` runs `python -m <module>` in the uploaded project.
JOB_MODULES = {"train": "jobs.finetune", "ingest": "jobs.ingest", "eval": "jobs.evaluate"}


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


def submit_job(
    client, target: Cluster, kind: str, cfg: LoragConfig, config_path: Path,
    names: list[str] | None = None, overrides: list[str] | None = None, dataset: Path | None = None,
    response_format: Path | None = None,
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
        response_format: eval: the JSON file every answer follows (`--response-format`); inside the project too.

    Returns:
        The job's id, its entrypoint and the uploaded project root.

    Raises:
        ClusterError: the config, dataset or response format is outside the project or excluded
            from the upload, or the cluster refused the job.
    """
    root, rel = project_paths(config_path)
    data_rel = _inside(root, dataset) if dataset is not None else None
    format_rel = _inside(root, response_format) if response_format is not None else None
    entrypoint = job_entrypoint(kind, rel, names, overrides, data_rel, format_rel)
    job_id = f"lorag-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    with cluster_errors(target):
        retry_later(lambda: client.submit_job(
            entrypoint=entrypoint, submission_id=job_id, runtime_env=project_runtime_env(cfg, root),
            metadata={"lorag": kind, "config": rel},
        ))
    return Submission(job_id, entrypoint, root)


def _inside(root: Path, path: Path) -> str:
    """`path` relative to the project `root`, which is what the job gets."""
    path_root, rel = project_paths(path)
    if path_root != root:
        raise ClusterError(f"{path} is not inside the project {root}, which is what the job gets: move it there")
    return rel


def job_entrypoint(kind: str, config_rel: str, names: list[str] | None = None, overrides: list[str] | None = None, dataset_rel: str | None = None,
                   response_format_rel: str | None = None) -> str:
    """The shell command a `kind` job runs in the uploaded project."""
    import shlex

    if kind not in JOB_MODULES:
        raise ValueError(f"job kind must be one of {sorted(JOB_MODULES)}, not {kind!r}")
    if (kind == "eval") != (dataset_rel is not None):
        raise ValueError("an eval job needs an evaluation set, and only an eval job takes one")
    if response_format_rel is not None and kind != "eval":
        raise ValueError("only an eval job takes a response format")
    flag = "--kb" if kind == "ingest" else "--adapter"
    args = ["python", "-m", JOB_MODULES[kind], "--config", config_rel, *(["--dataset", dataset_rel] if dataset_rel else []),
            *(["--response-format", response_format_rel] if response_format_rel else [])]
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
