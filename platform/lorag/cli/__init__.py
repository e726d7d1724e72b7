"""The `lorag` command line (Typer). Every command reads the one `lorag.yaml` plus `--set` overrides.

    lorag quickstart                 # the whole loop on this machine: ingest, train, serve, ask
    lorag ingest -c lorag.yaml       # build the knowledge bases (Ray Data -> Milvus); same as `lorag kb ingest`
    lorag kb search "query" --kb KB  # search a knowledge base (dense, bm25 or hybrid), with citations
    lorag train  -c lorag.yaml       # train the adapters (Ray Train + DeepSpeed)
    lorag serve  -c lorag.yaml       # run the OpenAI-compatible endpoint (Ray Serve)
    lorag ask "question" -m adapter  # ask a running endpoint
    lorag eval -d qa.jsonl           # LoRA, RAG or both: every variant scored on an evaluation set

This module holds the app, its command list and `main`; each group of commands lives in the module of
its noun: kb (ingest, `lorag kb`), adapters (train, `lorag adapters`), endpoint (serve, ask), evaluation
(eval), quickstart, cluster (submit, `lorag jobs`, deploy) and k8s. The options they share, and the
options that mirror a config field (bounds and help from the field), are in options; the console, the
`error:` line and Ray in this process in console. Importing it loads neither Ray nor torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from lorag.cli import adapters, cluster, endpoint, evaluation, k8s, kb, quickstart
from lorag.cli.console import Terminated, console, fail, set_verbose
from lorag.cli.options import SetOpt, load

app = typer.Typer(
    help="lorag: teach a model your domain with LoRA adapters (behaviour) and Milvus knowledge bases (facts), "
    "and serve both behind one OpenAI-compatible endpoint on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's own logs (Ray Data, Ray Train workers, Serve replicas) here; by default they go to Ray's log files only, whose path is printed.")) -> None:
    set_verbose(verbose)


def config_(
    check: Optional[Path] = typer.Option(None, "--check", metavar="FILE", help="Validate FILE (with any --set) as every command loads it: one line and exit 0 if valid, else each problem by field path and exit 2."),
    set_: Optional[list[str]] = SetOpt,
    markdown: bool = typer.Option(False, "--markdown", help="Print the reference as Markdown: `lorag config --markdown > docs/config.md` regenerates the docs."),
) -> None:
    """Every lorag.yaml field with its path, type, default and description; or --check FILE to validate a config.

    `knowledge_bases[].chunking.size` is `size` under `chunking` of each knowledge base; --set names the item instead: --set knowledge_bases.handbook.chunking.size=256 (or its index).
    """
    import textwrap

    from rich.text import Text

    from lorag.reference import reference, reference_markdown

    if check is not None:
        if markdown:
            fail("--check and --markdown do not combine", 2)
        cfg = load(check, set_)
        console.print(f"{check}: valid ({len(cfg.knowledge_bases)} knowledge bases, {len(cfg.adapters)} adapters)", markup=False)
        return
    if set_:
        fail("--set applies to a config: use it with --check FILE", 2)
    if markdown:
        typer.echo(reference_markdown(), nl=False)
        return
    for section in reference():
        console.print(Text.assemble("\n", (section.path or "top level", "bold"), f"  {section.doc}"))
        for f in section.fields:
            console.print(Text.assemble("  ", (f.path, "cyan"), f"  {f.type}  ", ("required", "bold") if f.default == "required" else f"= {f.default}"))
            console.print(Text(textwrap.fill(f.description, max(console.width, 60), initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False), style="dim"))


# The command list, in the order `lorag --help` shows it (commands first, then the groups).
app.command()(kb.ingest)
app.command()(adapters.train)
app.command()(endpoint.serve)
app.command()(endpoint.ask)
app.command("eval")(evaluation.eval_)
app.command()(quickstart.quickstart)
app.command("config")(config_)
app.command()(cluster.submit)
app.command()(cluster.deploy)
app.add_typer(kb.app, name="kb")
app.add_typer(adapters.app, name="adapters")
app.add_typer(k8s.app, name="k8s")
app.add_typer(cluster.jobs_app, name="jobs")


def main() -> None:
    """The `lorag` command: a mistake a user can fix is one `error:` line (lorag.errors), never a traceback."""
    from rich.markup import escape

    from lorag.errors import exit_if_known

    try:
        app()
    except Terminated:
        sys.exit(0)  # stopped as asked (SIGTERM), after the command's own cleanup
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        exit_if_known(e, lambda line: console.print(f"[red]error:[/red] {escape(line)}"))
