"""What every `lorag` command shares at run time: the terminal it prints to, the one `error:` line
that ends it, `--verbose`, and Ray started in this process (its logs in files, SIGTERM as Ctrl-C)."""

from __future__ import annotations

import os
import signal
from typing import NoReturn, Optional

import typer
from rich.console import Console

from lorag.cluster import connect as connect_ray

console = Console(highlight=False, soft_wrap=True)
_verbose = False  # --verbose: Ray's own logs in the terminal too


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so every cleanup path runs the same."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `message` as the command's one `error:` line and exit with `code` (2: the command line or config)."""
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def set_verbose(verbose: bool) -> None:
    """`lorag --verbose`; without it, the libraries' own progress bars and gRPC's log lines stay out of the
    terminal. Runs before any command, so before gRPC is imported (it reads GRPC_VERBOSITY once, at import)."""
    global _verbose
    _verbose = verbose
    if not verbose:  # model-loading progress bars (transformers, huggingface_hub): lorag shows its own
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # gRPC's C core logs to stderr on its own (the Milvus client's "GOAWAY ... too_many_pings" after
        # an idle minute): failures reach lorag as exceptions, so its log lines are noise here.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def connect(command: str = "", address: Optional[str] = None) -> None:
    """Start (or, with RAY_ADDRESS=auto or a GCS address, join) Ray in this process for an interactive
    command: its logs go to files unless --verbose. A cluster's `--address` is refused with the command to use."""
    from lorag.cluster import ray_logs_dir

    if address is not None:
        remote = {"ingest": "submit ingest", "kb ingest": "submit ingest", "train": "submit train", "serve": "deploy"}[command]
        fail(f"`lorag {command}` runs Ray in this process and takes no --address: to run it on the cluster at {address}, use "
             f"`lorag {remote} -c CONFIG --address {address}` (there --address is the dashboard URL, http://HOST:8265); to join a "
             "cluster in-process from one of its nodes, set RAY_ADDRESS=auto", 2)
    connect_ray(None, log_to_driver=_verbose)
    # After ray.init, which installs a handler that dumps a stack on SIGTERM: stop like Ctrl-C instead.
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not _verbose and (logs := ray_logs_dir()):
        console.print(f"[dim]Ray's logs: {logs} (--verbose shows them here)[/dim]")


def _on_sigterm(signum, frame) -> None:
    raise Terminated()
