"""`lorag eval`: LoRA, RAG or both, scored on an evaluation set (a table here, the report on disk and in
the adapter store), or with --routing how often `model: "auto"` picks the labelled adapter."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from lorag.cli.console import console, fail
from lorag.cli.options import ConfigOpt, SetOpt, field_option, load
from lorag.config import LoragConfig
from lorag.sections import ServeConfig

if TYPE_CHECKING:
    from lorag.evaluation import EvalResult
from lorag.storage import is_uri

EVAL_MAX_TOKENS = 64  # answer length of `lorag eval` and the quickstart's evaluation (as lorag.evaluation.evaluate's default)

# One screen: short headers, each mean above its 95% interval (the report has the long form).
_SHORT = {"exact match": "EM", "token F1": "F1", "choice accuracy": "choice", "citation accuracy": "cited", "retrieval recall@k": "recall",
          "answer style": "style", "answer tokens": "tokens"}


def eval_(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="JSONL evaluation set: one {question, answer (or answers), sources?, options?} per line."),
    config: Path = ConfigOpt,
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help="Compare this adapter, name or name@vN (repeatable; default: every trained adapter of the config)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where eval.json, eval.md and eval.png go (default: <workdir>/eval/<date-time>)."),
    max_tokens: int = field_option(ServeConfig, "max_tokens", "--max-tokens", default=EVAL_MAX_TOKENS, help="Longest answer in tokens (greedy)."),
    response_format: Optional[Path] = typer.Option(None, "--response-format", help="A JSON file: an OpenAI response_format, or a bare JSON schema, that every answer follows. A JSON answer is scored by its \"answer\" field and cites with [n] marks or a \"citations\" array."),
    routing: bool = typer.Option(False, "--routing", help="Score `model: \"auto\"` routing instead: the dataset is {question, adapter (or null: the base model)} lines; prints accuracy and a confusion table."),
    threshold: Optional[float] = field_option(ServeConfig, "route_threshold", "--threshold", default=None,
                                              help="With --routing: the route threshold to try, the least cosine similarity that routes a question to an adapter (default: serve.route_threshold)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """LoRA, RAG or both? Answer an evaluation set with the base model, base + RAG, each adapter and
    each adapter + RAG, through the endpoint's prompt builder and engine, and report exact match,
    token F1, choice and citation accuracy and retrieval recall with 95% bootstrap intervals.
    The report also goes into each compared adapter's version in the adapter store
    (<store>/<name>/v<N>/eval/<date-time>/). With --routing: how often `model: "auto"` picks the labelled adapter."""
    cfg = load(config, set_)
    if routing and response_format is not None:
        fail("--response-format goes with answers, not with --routing", 2)
    if routing:
        _run_routing_eval(cfg, dataset, out, threshold)
    else:
        run_eval(cfg, dataset, adapter, out, max_tokens, response_format)


def _eval_dir(cfg: LoragConfig, out: Optional[Path], prefix: str = "") -> Path:
    if out is not None:
        return out
    if is_uri(cfg.workdir):
        fail("the workdir is a URI: give --out a local directory")
    return Path(cfg.workdir) / "eval" / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"


def run_eval(cfg: LoragConfig, dataset: Path, adapters: Optional[list[str]], out: Optional[Path], max_tokens: int = EVAL_MAX_TOKENS,
             response_format: Optional[Path] = None) -> Path:
    """`lorag eval`'s work (also the quickstart's last stage): answer (under `response_format`, a JSON file, when
    given), score, print the table, write the report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lorag.evaluation import evaluate
    from lorag.report import store_reports, verdict, write_report

    out = _eval_dir(cfg, out)
    try:
        with Progress(TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("answering", total=None)
            result = evaluate(cfg, dataset, adapters, max_tokens, progress=lambda done, total: bar.update(task, completed=done, total=total),
                              response_format=response_format)
    except (FileNotFoundError, ValueError, LookupError) as e:
        fail(str(e))
    written = write_report(result, out)
    console.print(_table(result, dataset))
    for line in verdict(result.summary):
        console.print(line.replace("**", ""))
    for p in written:
        console.print(f"{ {'.png': 'chart', '.md': 'report'}.get(p.suffix, 'results')}: {p}")
    for location in store_reports(cfg, result, written):
        console.print(f"stored with the adapter: {location}")
    return out


def _table(result: EvalResult, dataset: Path):
    """The report's table on one screen: short headers, each mean above its 95% interval, no latency."""
    from rich import box
    from rich.table import Table

    from lorag.report import report_table

    table = Table(title=f"{result.questions} questions of {dataset.name}: mean and 95% interval (report: eval.md)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    header, rows = report_table(result)
    keep = [i for i, h in enumerate(header) if h != "seconds per answer"]  # latency with every request queued at once: in the report only
    for i in keep:
        table.add_column(_SHORT.get(header[i], header[i]), no_wrap=True, justify="left" if i == 0 else "right", min_width=max(len(r[0]) for r in rows) if i == 0 else 7)
    for row in rows:  # "0.231 [0.14, 0.34]" -> "0.231" over ".14-.34" ("1.000 [1.00, 1.00]": "1-1")
        table.add_row(*(re.sub(r" \[0?(\.\d+|1)(?:\.00)?, 0?(\.\d+|1)(?:\.00)?\]", r"\n\1-\2", row[i]) for i in keep))
    return table


def _run_routing_eval(cfg: LoragConfig, dataset: Path, out: Optional[Path], threshold: Optional[float]) -> None:
    import json

    from rich.markdown import Markdown

    from lorag.examples import DatasetError
    from lorag.routing_eval import evaluate_routing, routing_markdown

    out = _eval_dir(cfg, out, "routing-")
    try:
        result = evaluate_routing(cfg, dataset, threshold)
    except (FileNotFoundError, ValueError, LookupError, DatasetError) as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(result.model_dump(), indent=2))
    (out / "routing.md").write_text(routing_markdown(result))
    console.print(Markdown(routing_markdown(result)))
    console.print(f"results: {out / 'routing.json'}\nreport: {out / 'routing.md'}")
