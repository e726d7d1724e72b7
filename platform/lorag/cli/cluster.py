"""`lorag submit`, `lorag jobs` and `lorag deploy`: work sent to a running Ray cluster through its dashboard
address (Ray Jobs and the Serve REST API), with this project uploaded as the working_dir."""

from __future__ import annotations

import enum
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from lorag.cli.console import console, fail
from lorag.cli.options import ClusterAddressOpt, ConfigOpt, SetOpt, TokenOpt, check_names, load
from lorag.config import ConfigError

jobs_app = typer.Typer(help="Ray Jobs on a running cluster: list them, read or follow their logs, stop them.", no_args_is_help=True)
JobArg = typer.Argument(..., help="The job's submission id (printed by `lorag submit`, listed by `lorag jobs list`).")
ClusterConfigOpt = typer.Option(None, "--config", "-c", help="A lorag.yaml whose cluster.address to use.")


class JobKind(str, enum.Enum):
    """What `lorag submit` runs: each kind is one module of jobs/."""

    train = "train"
    ingest = "ingest"
    eval = "eval"


def submit(
    kind: JobKind = typer.Argument(..., help="train runs `python -m jobs.finetune`, ingest `python -m jobs.ingest`, eval `python -m jobs.evaluate` (its report is in the job's logs)."),
    config: Path = ConfigOpt,
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help="train, eval: only this adapter (repeatable; default: all)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", "-d", help="eval: the evaluation set (JSONL), inside the project."),
    response_format: Optional[Path] = typer.Option(None, "--response-format", help="eval: a JSON file (a response_format or a bare JSON schema) every answer follows, inside the project."),
    kb: Optional[list[str]] = typer.Option(None, "--kb", help="ingest: only this knowledge base (repeatable; default: all)."),
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = ClusterAddressOpt,
    token: Optional[str] = TokenOpt,
    follow: bool = typer.Option(True, "--follow/--no-follow", help="Stream the job's logs and exit with its status (0 when it SUCCEEDED), or return once it is submitted."),
) -> None:
    """Run a train, ingest or eval job on a running Ray cluster (Ray Jobs), with this project uploaded as its working_dir."""
    from rich.markup import escape

    from lorag.cluster import ClusterError, cluster, cluster_nodes, job_client
    from lorag.submission import submit_job
    from lorag.upload import check_for_cluster, project_paths, secret_problems

    cfg = load(config, set_)
    if problems := secret_problems(cfg, set_):  # --set values and env_vars travel in plain text: refuse before contacting the cluster
        fail("this job would send credentials in plain text (nothing was uploaded):\n  " + "\n  ".join(problems), 2)
    misplaced = adapter if kind is JobKind.ingest else kb
    if misplaced:
        fail("--adapter goes with `submit train` and `submit eval`, --kb with `submit ingest`", 2)
    if (kind is JobKind.eval) != (dataset is not None):
        fail("`submit eval` needs --dataset (and only it takes one)", 2)
    if dataset is not None and not dataset.is_file():
        fail(f"evaluation set {dataset} does not exist", 2)
    if response_format is not None and kind is not JobKind.eval:
        fail("--response-format goes with `submit eval` only", 2)
    if response_format is not None and not response_format.is_file():
        fail(f"response format {response_format} does not exist", 2)
    names = kb if kind is JobKind.ingest else adapter
    check_names(cfg.knowledge_base if kind is JobKind.ingest else cfg.adapter, names)
    try:
        root, _ = project_paths(config)
        target = cluster(address, token, cfg)
        client = job_client(target)
        check_for_cluster(cfg, root, target, kind.value, names, cluster_nodes(target))  # a ConfigError: one line per field, exit 2, nothing uploaded
        console.print(f"uploading {root} to {target.address}")
        sub = submit_job(client, target, kind.value, cfg, config, names, set_, dataset, response_format)
    except ClusterError as e:
        fail(str(e))
    console.print(f"submitted job [bold]{sub.job_id}[/bold]: {escape(sub.entrypoint)}")
    flags = f" --address {target.address}"
    console.print(f"  logs: lorag jobs logs {sub.job_id} --follow{flags}\n  stop: lorag jobs stop {sub.job_id}{flags}")
    if follow:
        _follow_job(client, target, sub.job_id)


@jobs_app.command("list")
def jobs_list(address: Optional[str] = ClusterAddressOpt, token: Optional[str] = TokenOpt, config: Optional[Path] = ClusterConfigOpt) -> None:
    """Every job of the cluster, newest first: id, status, start time, entrypoint."""
    from rich.markup import escape
    from rich.table import Column, Table

    from lorag.cluster import ClusterError, cluster_errors

    target, client = _jobs_client(address, token, config)
    try:
        with cluster_errors(target):
            jobs = client.list_jobs()
    except ClusterError as e:
        fail(str(e))
    if not jobs:
        console.print(f"no jobs on {target.address}")
        return
    table = Table(Column("job", no_wrap=True), "status", "started", "entrypoint")
    for j in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        table.add_row(j.submission_id or j.job_id or "-", j.status.value, started, escape(j.entrypoint))
    console.print(table)


@jobs_app.command("logs")
def jobs_logs(
    job: str = JobArg,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends, then exit with its status (0 when it SUCCEEDED)."),
    address: Optional[str] = ClusterAddressOpt,
    token: Optional[str] = TokenOpt,
    config: Optional[Path] = ClusterConfigOpt,
) -> None:
    """A job's logs so far, or --follow them to the end."""
    from lorag.cluster import ClusterError, cluster_errors

    target, client = _jobs_client(address, token, config)
    if follow:
        _follow_job(client, target, job)
        return
    try:
        with cluster_errors(target):
            sys.stdout.write(client.get_job_logs(job))
    except ClusterError as e:
        fail(str(e))


@jobs_app.command("stop")
def jobs_stop(job: str = JobArg, address: Optional[str] = ClusterAddressOpt, token: Optional[str] = TokenOpt, config: Optional[Path] = ClusterConfigOpt) -> None:
    """Ask a running job to stop (its driver gets SIGTERM, then SIGKILL)."""
    from lorag.cluster import ClusterError, cluster_errors

    target, client = _jobs_client(address, token, config)
    try:
        with cluster_errors(target):
            if client.stop_job(job):
                console.print(f"stopping {job}")
            else:
                console.print(f"{job} has already ended: {client.get_job_status(job).value}")
    except ClusterError as e:
        fail(str(e))


def deploy(
    config: Path = ConfigOpt,
    address: Optional[str] = ClusterAddressOpt,
    token: Optional[str] = TokenOpt,
    timeout: float = typer.Option(900, "--timeout", help="Seconds to wait for the application to be RUNNING."),
) -> None:
    """Deploy the endpoint to a running Ray cluster (Serve REST API) with this project uploaded, and wait until it is RUNNING.

    The replicas read the config file in the upload as it is (so there is no --set), and get the sha256 digests of this machine's API keys (serve.api_keys_env, serve.api_keys_file) through the deployment's environment: never the keys.
    """
    from lorag.cluster import ClusterError, cluster, cluster_nodes
    from lorag.deploy import deploy_app
    from lorag.upload import check_for_cluster, project_paths

    cfg = load(config, None)
    try:
        target = cluster(address, token, cfg)
        check_for_cluster(cfg, project_paths(config)[0], target, "deploy", nodes=cluster_nodes(target))
        r = deploy_app(target, cfg, config, timeout, progress=lambda line: console.print(line))
    except ConfigError as e:  # cluster.env_vars naming a credential: nothing was sent
        fail(str(e), 2)
    except ClusterError as e:
        fail(str(e))
    if r.status == "RUNNING":
        console.print(f"lorag is RUNNING at [bold]{r.url}/v1[/bold] (deployed to {target.address})")
        return
    console.print(f"[red]error:[/red] application lorag is {r.status}" + (f" after {timeout:.0f} s" if r.status not in ("DEPLOY_FAILED", "UNHEALTHY") else ""))
    if r.message:
        console.print(r.message, markup=False)  # Ray's own words: the replica's error or what it still waits for
    raise typer.Exit(1)


def _jobs_client(address: Optional[str], token: Optional[str], config: Optional[Path]):
    from lorag.cluster import ClusterError, cluster, job_client

    cfg = load(config, None) if config else None
    try:
        target = cluster(address, token, cfg)
        return target, job_client(target)
    except ClusterError as e:
        fail(str(e))


def _follow_job(client, target, job_id: str) -> None:
    """Stream the job's logs; exit 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED."""
    from lorag.cluster import ClusterError
    from lorag.submission import follow_job

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    try:
        r = follow_job(client, target, job_id, write)
    except ClusterError as e:
        fail(str(e))
    except KeyboardInterrupt:
        console.print(f"\nstopped following; {job_id} keeps running (lorag jobs stop {job_id} --address {target.address})")
        raise typer.Exit(130) from None
    if r.status == "SUCCEEDED":
        console.print(f"job {job_id} [green]SUCCEEDED[/green]")
        return
    first = r.message.strip().splitlines()[0] if r.message.strip() else ""
    console.print(f"[red]error:[/red] job {job_id} {r.status}" + (f": {first}" if first else ""))
    raise typer.Exit(1)
