"""`lorag k8s`: the config rendered as KubeRay manifests, applied to a cluster (then its RayJobs run in
order), and their state read back."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lorag.cli.console import console, fail
from lorag.cli.options import ConfigOpt, SetOpt, load
from lorag.config import ConfigError

app = typer.Typer(help="Kubernetes under KubeRay: render the manifests of a config, apply them to a cluster, read their status.", no_args_is_help=True)
KubeconfigOpt = typer.Option(None, "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).")
ContextOpt = typer.Option(None, "--context", help="kubeconfig context (default: the current one).")


@app.command("render")
def k8s_render(
    config: Path = ConfigOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the manifests into (an earlier render there is replaced)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Write the KubeRay manifests for CONFIG into DIR: RayCluster, RayJobs for ingest, fine-tuning and evaluation, RayService,
    Milvus standalone, the cluster's lorag.yaml as a ConfigMap, and a Secret template. Run it from the project root (the image's
    contents). Needs a storage URI for the pods: `storage` or `k8s.storage`."""
    from rich.markup import escape

    from lorag import k8s

    cfg = load(config, set_)
    try:
        written = k8s.write(k8s.render(cfg, str(config)), out, str(config))
    except ConfigError as e:
        fail(escape(str(e)), 2)
    for path in written:
        console.print(f"wrote {escape(str(path))}")


@app.command("apply")
def k8s_apply(
    config: Path = ConfigOpt,
    job: Optional[list[str]] = typer.Option(
        None, "--job",
        help="Then run this RayJob: ingest, finetune or eval (repeatable: they run in the order given, each once the one before "
        "SUCCEEDED). A finished or failed RayJob of that name is deleted and run again.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be applied, checked and run, in order, after the same checks, and contact no cluster."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for each --job to end, exit 1 if one failed; --no-wait starts a single job and returns."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=1, help="Seconds to wait for each job to end (default: k8s.job_deadline_s, after which KubeRay fails it, plus 10 minutes)."),
    set_: Optional[list[str]] = SetOpt,
    kubeconfig: Optional[str] = KubeconfigOpt,
    context: Optional[str] = ContextOpt,
) -> None:
    """Server-side apply the rendered manifests to the cluster of the current kube context, then run the --job RayJobs in order.
    The Secrets must already exist (`kubectl create secret ...`, the command is printed if not); RayJobs run only when named with --job."""
    from rich.markup import escape

    from lorag import k8s

    cfg = load(config, set_)
    try:
        manifests = k8s.render(cfg, str(config))
        if dry_run:
            steps = k8s.plan(manifests, job or (), wait)
        else:
            k8s.apply(manifests, job or (), kubeconfig, context, wait=wait, timeout_s=timeout, echo=lambda line: console.print(escape(line)))
    except (ConfigError, ValueError) as e:
        fail(escape(str(e)), 2)
    except RuntimeError as e:
        fail(escape(str(e)))
    if dry_run:
        console.print("dry run: nothing was sent to a cluster. In order:")
        for step in steps:
            console.print(escape(str(step)))


@app.command("status")
def k8s_status(config: Path = ConfigOpt, set_: Optional[list[str]] = SetOpt, kubeconfig: Optional[str] = KubeconfigOpt, context: Optional[str] = ContextOpt) -> None:
    """The state and conditions of the config's RayCluster, RayJobs and RayService."""
    from rich.markup import escape

    from lorag import k8s

    cfg = load(config, set_)
    try:
        states = k8s.status(cfg, kubeconfig=kubeconfig, context=context)
    except RuntimeError as e:
        fail(escape(str(e)))
    for state in states:
        console.print(escape(str(state)))
