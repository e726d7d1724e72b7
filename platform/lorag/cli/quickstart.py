"""`lorag quickstart`: the whole loop on this machine, from the bundled example to the evaluation table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lorag.cli.adapters import train_all
from lorag.cli.console import connect, console, fail
from lorag.cli.endpoint import ask_endpoint, print_answer, start_serve, stop_serve
from lorag.cli.evaluation import run_eval
from lorag.cli.kb import ingest_all
from lorag.cli.options import SetOpt, load
from lorag.config import LoragConfig

QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "quickstart" / "lorag.yaml"


def quickstart(
    config: Path = typer.Option(QUICKSTART, "--config", "-c", help="The lorag.yaml to run (default: the bundled example)."),
    questions: Optional[Path] = typer.Option(None, "--questions", help="One question per line (default: questions.txt beside the config)."),
    eval_set: Optional[Path] = typer.Option(None, "--eval", help="Held-out evaluation set scored at the end (default: eval.jsonl beside the config, when there is one)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """The whole loop on this machine: build the knowledge base, train the adapter, serve both, ask
    questions over HTTP, shut down, then score base / base + RAG / adapter / adapter + RAG on the
    held-out evaluation set (`lorag eval`) and print the table and the chart's path."""
    cfg = load(config, set_)
    qfile = questions or config.parent / "questions.txt"
    if not qfile.is_file():
        fail(f"no questions file {qfile}: pass --questions FILE")
    qs = [q.strip() for q in qfile.read_text().splitlines() if q.strip()]
    if eval_set is None and (config.parent / "eval.jsonl").is_file():
        eval_set = config.parent / "eval.jsonl"
    if eval_set is not None and not eval_set.is_file():
        fail(f"no evaluation set {eval_set}")
    if not cfg.adapters:
        fail(f"{config} defines no adapters")
    console.rule("[bold]lorag quickstart[/bold]")
    connect()
    ingest_all(cfg, None)
    train_all(cfg, None)
    url = start_serve(cfg)
    try:
        console.rule("[bold]asking over HTTP[/bold]")
        _ask_each(cfg, url, qs)
    finally:
        stop_serve()
    if eval_set is not None:
        console.rule(f"[bold]LoRA, RAG or both? {eval_set.name}[/bold]")
        run_eval(cfg, eval_set, None, None)
    console.rule("[bold green]done[/bold green]")


def _ask_each(cfg: LoragConfig, url: str, questions: list[str]) -> None:
    """Each question to the base model without retrieval, then to each adapter with its knowledge base."""
    from lorag.gateway import base_name

    base = base_name(cfg)
    for q in questions:
        console.print(f"\n[bold]Q: {q}[/bold]")
        for ad in cfg.adapters:
            body = ask_endpoint(url, base, q, cfg.serve.max_tokens, retrieval=False)
            console.print(f"[dim]base model, no retrieval ({base}):[/dim]")
            print_answer(body, indent="  ")
            body = ask_endpoint(url, ad.name, q, cfg.serve.max_tokens, retrieval=True)
            label = f"adapter {ad.name}" + (f" + knowledge base {ad.knowledge_base}" if ad.knowledge_base else "")
            console.print(f"[dim]{label}:[/dim]")
            print_answer(body, indent="  ")
            if "error" in body:
                fail(body["error"]["message"])
