"""`lorag ingest` and `lorag kb`: knowledge bases built from the config's sources into Milvus, listed,
searched with citations, dropped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from lorag.cli.console import connect, console, fail
from lorag.cli.options import AddressOpt, ConfigOpt, SetOpt, check_names, field_option, load
from lorag.config import LoragConfig
from lorag.sections import KnowledgeBaseConfig, SearchMode

app = typer.Typer(help="Knowledge bases: ingest documents into Milvus, list them, search them, drop them.", no_args_is_help=True)
KbArg = typer.Argument(..., help="Knowledge-base name (under `knowledge_bases:` in the config).")
OnlyKbOpt = typer.Option(None, "--kb", help="Only this knowledge base (repeatable; default: all).")


def ingest(
    config: Path = ConfigOpt,
    kb: Optional[list[str]] = OnlyKbOpt,
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = AddressOpt,
) -> None:
    """Build or refresh knowledge bases: read, chunk, embed (Ray Data) and upsert into Milvus. Re-running adds nothing new."""
    cfg = load(config, set_)
    check_names(cfg.knowledge_base, kb)
    connect("ingest", address)
    ingest_all(cfg, kb)


@app.command("ingest")
def kb_ingest(
    config: Path = ConfigOpt,
    kb: Optional[list[str]] = OnlyKbOpt,
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = AddressOpt,
) -> None:
    """Read, parse, chunk, embed (Ray Data) and upsert into Milvus. Unchanged documents are skipped, changed ones replaced, deleted ones removed."""
    cfg = load(config, set_)
    check_names(cfg.knowledge_base, kb)
    connect("kb ingest", address)
    ingest_all(cfg, kb)


@app.command("list")
def kb_list(config: Path = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Every knowledge base of the config: where it lives, documents and chunks stored, search mode."""
    from rich.table import Table

    from lorag.milvus import MilvusStore, is_lite

    cfg = load(config, set_)
    table = Table("knowledge base", "milvus", "documents", "chunks", "search", "full text")
    for kb in cfg.knowledge_bases:
        try:
            store = MilvusStore(cfg.milvus_uri(kb), kb.token)
        except (ConnectionError, ValueError) as e:
            table.add_row(kb.name, cfg.milvus_uri(kb), "-", "-", kb.search, f"unreachable: {e}")
            continue
        docs = store.documents(kb.collection)
        full_text = ("BM25 in lorag (Milvus Lite's is slower)" if is_lite(store.uri) else f"BM25 in Milvus ({store.version})" if store.native_bm25
                     else f"BM25 in lorag ({store.version} has none)")
        table.add_row(kb.name, store.uri, str(len(docs)) if docs else "not ingested", str(store.count(kb.collection)), kb.search, full_text)
        store.close()
    if not cfg.knowledge_bases:
        console.print("no knowledge bases in the config")
        return
    console.print(table)


@app.command("search")
def kb_search(
    query: str = typer.Argument(..., help="What to look for."),
    kb: str = typer.Option(..., "--kb", help="Knowledge-base name."),
    k: Optional[int] = field_option(KnowledgeBaseConfig, "top_k", "-k", default=None, note="Default: the knowledge base's `top_k`."),
    mode: Optional[SearchMode] = field_option(KnowledgeBaseConfig, "search", "--mode", default=None, note="Default: the knowledge base's `search`."),
    source_prefix: Optional[str] = typer.Option(None, "--source-prefix", help="Only chunks whose source path starts with this."),
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Search a knowledge base and print each hit with its score and citation (source, section, offsets)."""
    from lorag.embed import Embedder
    from lorag.milvus import MilvusStore
    from lorag.retrieval import display_path, search

    cfg = load(config, set_)
    check_names(cfg.knowledge_base, [kb])
    kbc = cfg.knowledge_base(kb)
    prefix = source_prefix
    if prefix and not os.path.isabs(prefix):  # sources are stored as absolute paths
        prefix = os.path.abspath(prefix) + (os.sep if prefix.endswith(("/", os.sep)) else "")
    try:
        store = MilvusStore(cfg.milvus_uri(kbc), kbc.token)
        embedder = Embedder.of(cfg) if (mode or kbc.search) != "bm25" else None
        hits = search(store, kbc, query, embedder, k, mode, prefix)
    except (LookupError, ConnectionError, ValueError) as e:
        fail(str(e))
    if not hits:
        console.print("no hits")
    for n, h in enumerate(hits, 1):
        where = f"{display_path(h['source'])}:{h['start']}-{h['end']}" + (f"  ({h['section']})" if h.get("section") else "")
        console.print(f"[bold][{n}][/bold] {h['score']:.4f}  {where}")
        text = " ".join(h["text"].split())
        console.print(f"    {text[:300]}{'...' if len(text) > 300 else ''}")


@app.command("drop")
def kb_drop(
    kb: str = KbArg,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Delete a knowledge base's Milvus collection (its documents stay on disk; ingest rebuilds it)."""
    from lorag.milvus import MilvusStore

    cfg = load(config, set_)
    check_names(cfg.knowledge_base, [kb])
    kbc = cfg.knowledge_base(kb)
    try:
        store = MilvusStore(cfg.milvus_uri(kbc), kbc.token)
    except (ConnectionError, ValueError) as e:
        fail(str(e))
    try:
        store.owner(kbc.collection)  # a collection lorag did not create is never dropped
        n = store.count(kbc.collection)
        if not yes and not typer.confirm(f"drop {kb} ({n} chunks) from {store.uri}?"):
            raise typer.Exit(1)
        store.drop(kbc.collection, kbc.name)
    except ValueError as e:
        fail(str(e))
    console.print(f"dropped {kb}: {n} chunks removed from {store.uri}")


def ingest_all(cfg: LoragConfig, only: Optional[list[str]]) -> None:
    """Ingest each knowledge base (or `only` these) with a progress bar and a summary line; Ray is running."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lorag.data import ingest
    from lorag.milvus import StoreLocked
    from lorag.retrieval import display_path

    names = only or [kb.name for kb in cfg.knowledge_bases]
    if not names:
        console.print("no knowledge bases in the config: nothing to ingest")
    for name in names:
        console.rule(f"ingest knowledge base [bold]{name}[/bold]")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("documents, {task.fields[chunks]} chunks written"), TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(name, total=None, chunks=0)
            try:
                r = ingest(cfg, name, progress=lambda chunks, done, total: bar.update(task, completed=done, total=total, chunks=chunks))
            except (FileNotFoundError, ValueError, ConnectionError, TimeoutError, StoreLocked) as e:
                fail(str(e))
        if r.rebuilt:
            console.print(f"[yellow]rebuilt[/yellow] {name} from scratch: {r.rebuilt}")
        for path, reason in r.failed:
            console.print(f"[yellow]skipped[/yellow] {display_path(path)}: {reason}")
        console.print(
            f"{r.knowledge_base}: {r.documents} documents ({r.skipped} unchanged, {r.documents - r.skipped - len(r.failed)} indexed, {len(r.failed)} failed) -> "
            f"{r.chunks_written} chunks upserted, {r.chunks_removed} stale removed; {r.entities} in {r.uri} ({r.seconds:.1f} s)"
        )
