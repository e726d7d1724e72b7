"""`lorag train` and `lorag adapters`: LoRA adapters trained from the config, and the versions in the
adapter store listed, inspected, tagged and removed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lorag.cli.console import connect, console, fail
from lorag.cli.options import AddressOpt, ConfigOpt, SetOpt, check_names, load
from lorag.config import ConfigError, LoragConfig

app = typer.Typer(help="The adapter store: list, inspect, tag and remove adapter versions; promote (eval-gated), roll back and read the history of releases.", no_args_is_help=True)
StoreOpt = typer.Option(None, "--store", help="Adapter store: a directory or a URI such as s3://bucket/lorag/adapters (default: <storage>/adapters of --config).")


def train(
    config: Path = ConfigOpt,
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help="Only this adapter (repeatable; default: all)."),
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = AddressOpt,
) -> None:
    """Train LoRA adapters on Ray Train with DeepSpeed; each run saves a new version in the adapter store."""
    cfg = load(config, set_)
    check_names(cfg.adapter, adapter)
    connect("train", address)
    train_all(cfg, adapter)


def train_all(cfg: LoragConfig, only: Optional[list[str]]) -> None:
    """Train each adapter (or `only` these) in turn and print its summary line; Ray is running."""
    from lorag.examples import DatasetError
    from lorag.train import train_adapter, train_summary

    names = only or [a.name for a in cfg.adapters]
    for name in names:
        console.rule(f"train adapter [bold]{name}[/bold]")
        t = cfg.adapter(name).train
        try:
            with console.status(f"training {name}: {t.max_steps} steps on {t.num_workers} Ray Train worker(s), ZeRO-{t.zero_stage}{' (RAFT)' if t.raft else ''} ..."):
                r = train_adapter(cfg, name)
        except (DatasetError, ConfigError, RuntimeError, LookupError) as e:
            fail(str(e))
        console.print(train_summary(name, r.version, r.path, r.metrics))


def _store(config: Path, store: Optional[str]):
    from lorag.adapters import AdapterStore

    try:
        return AdapterStore(store if store else load(config, None).adapter_store)
    except ValueError as e:
        fail(str(e))


def _split_ref(ref: str) -> tuple[str, Optional[str]]:
    from lorag.adapters import parse_model_id

    return parse_model_id(ref)


@app.command("list")
def adapters_list(config: Path = ConfigOpt, store: Optional[str] = StoreOpt) -> None:
    """Every adapter with its versions, tags and latest validation loss."""
    from rich.table import Table

    from lorag.adapters import AdapterNotFoundError

    st = _store(config, store)
    table = Table("adapter", "versions", "tags", "method", "kb", "val loss", "base val", "created")
    loss = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name in st.names():
        try:
            meta = st.metadata(name)
        except AdapterNotFoundError:  # its last version was removed since the listing
            continue
        m = meta.get("metrics", {})
        tags = ", ".join(f"{t}=v{v}" for t, v in sorted(st.tags(name).items())) or "-"
        versions = ", ".join(f"v{v}" for v in st.versions(name))
        created = str(meta.get("created_at", "-"))[:16].replace("T", " ")
        table.add_row(name, versions, tags, meta.get("method", "lora"), str(meta.get("knowledge_base") or "-"), loss(m.get("val_loss")), loss(m.get("base_val_loss")), created)
    if not st.names():
        console.print(f"no adapters in {st.root}")
        return
    console.print(table)


@app.command("show")
def adapters_show(ref: str = typer.Argument(..., help="NAME, NAME@vN or NAME@TAG."), config: Path = ConfigOpt, store: Optional[str] = StoreOpt) -> None:
    """An adapter version's path and full provenance (lorag.json)."""
    import json

    from lorag.adapters import AdapterNotFoundError

    st = _store(config, store)
    name, version = _split_ref(ref)
    try:
        path, meta = st.resolve(name, version), st.metadata(name, version)
    except (AdapterNotFoundError, ValueError) as e:
        fail(str(e))
    console.print(f"[bold]{path}[/bold]")
    console.print_json(json.dumps(meta))


@app.command("tag")
def adapters_tag(
    ref: str = typer.Argument(..., help="NAME@vN (or NAME for the latest version)."),
    tag: str = typer.Argument(..., help="Tag to set or move, e.g. prod."),
    config: Path = ConfigOpt,
    store: Optional[str] = StoreOpt,
) -> None:
    """Point a tag at a version; clients can then ask for model NAME@TAG."""
    from lorag.adapters import AdapterNotFoundError

    st = _store(config, store)
    name, version = _split_ref(ref)
    try:
        number = st.tag(name, version, tag)
    except (AdapterNotFoundError, ValueError) as e:
        fail(str(e))
    console.print(f"{name}@{tag} -> v{number}")


@app.command("rm")
def adapters_rm(
    ref: str = typer.Argument(..., help="NAME@vN: the version to delete (a bare NAME is refused)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    config: Path = ConfigOpt,
    store: Optional[str] = StoreOpt,
) -> None:
    """Delete one adapter version and the tags pointing at it."""
    from lorag.adapters import AdapterNotFoundError

    st = _store(config, store)
    name, version = _split_ref(ref)
    if version is None:
        fail(f"say which version to delete, e.g. {name}@v1 (versions: {['v%d' % v for v in st.versions(name)]})", 2)
    try:
        path = st.resolve(name, version)
    except (AdapterNotFoundError, ValueError) as e:
        fail(str(e))
    if not yes and not typer.confirm(f"delete {path}?"):
        raise typer.Exit(1)
    try:
        st.remove(name, version)
    except AdapterNotFoundError as e:  # removed by someone else since it was resolved
        fail(str(e))
    console.print(f"deleted {path}")


@app.command("untag")
def adapters_untag(
    name: str = typer.Argument(..., help="The adapter."),
    tag: str = typer.Argument(..., help="The tag to remove, e.g. canary."),
    config: Path = ConfigOpt,
    store: Optional[str] = StoreOpt,
) -> None:
    """Remove a tag (recorded in the history); `untag NAME canary` ends a canary with no redeploy."""
    st = _store(config, store)
    try:
        number = st.untag(name, tag)
    except ValueError as e:
        fail(str(e))
    if number is None:
        fail(f"adapter {name!r} has no tag {tag!r} (tags: {sorted(st.tags(name)) or 'none'})")
    console.print(f"{name}@{tag} removed (it was v{number})")


@app.command("history")
def adapters_history(name: str = typer.Argument(..., help="The adapter."), config: Path = ConfigOpt, store: Optional[str] = StoreOpt) -> None:
    """Every move of the adapter's tags: when, from which version to which, how (tag, promote, forced, rollback) and on which report."""
    from rich.table import Table

    st = _store(config, store)
    try:
        moves = st.history(name)
    except ValueError as e:
        fail(str(e))
    if not moves:
        console.print(f"no tag moves recorded for {name}")
        return
    version = lambda v: "-" if v is None else f"v{v}"  # noqa: E731
    table = Table("when", "tag", "from", "to", "how", "report")
    for m in moves:
        how = m.get("action", "tag") + (" (forced)" if m.get("forced") else "")
        table.add_row(str(m.get("at", "?")), str(m.get("tag")), version(m.get("previous")), version(m.get("version")), how, str(m.get("report") or "-"))
    console.print(table)


@app.command("rollback")
def adapters_rollback(
    name: str = typer.Argument(..., help="The adapter."),
    tag: str = typer.Option("stable", "--tag", help="The tag to move back."),
    config: Path = ConfigOpt,
    store: Optional[str] = StoreOpt,
) -> None:
    """Move a tag (stable) back to the version it held before its last move, in one step."""
    from lorag.adapters import AdapterNotFoundError
    from lorag.releases import rollback

    st = _store(config, store)
    try:
        was, now = rollback(st, name, tag)
    except (AdapterNotFoundError, ValueError) as e:
        fail(str(e))
    console.print(f"{name}@{tag}: v{was} -> v{now} (rolled back; replicas follow within serve.registry_refresh_s)")


@app.command("promote")
def adapters_promote(
    ref: str = typer.Argument(..., help="NAME@vN: the candidate version (NAME alone: the newest)."),
    tag: str = typer.Option("stable", "--tag", help="The tag to move (stable is what `model: NAME` serves)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Evaluation set (JSONL, as `lorag eval` takes) to compare on; "
                                            "default: both versions' stored `lorag eval` reports on the same questions."),
    force: bool = typer.Option(False, "--force", help="Move the tag even if the candidate is worse (recorded as forced)."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, max=4096, help="Per answer, when it evaluates."),
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Move a tag (stable) to a version only if it is not worse than the version the tag holds.

    Compares the two on one evaluation set with paired bootstrap intervals on the adapter's
    `release_metrics` (default: f1), prints the comparison, and moves the tag only when no metric
    is worse beyond noise (exit 1 otherwise). Replicas follow within serve.registry_refresh_s.
    """
    from lorag.adapters import AdapterNotFoundError, AdapterStore
    from lorag.releases import promote

    cfg = load(config, set_)
    name, version = _split_ref(ref)
    try:
        p = promote(cfg, AdapterStore(cfg.adapter_store), name, version, tag, str(dataset) if dataset else None, force, max_tokens)
    except (AdapterNotFoundError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    if p.comparison is None:
        console.print(f"{name}@{tag} -> v{p.candidate} (the first version to hold {tag!r}: nothing to compare with)")
        return
    _comparison_table(name, p)
    if p.moved:
        console.print(f"{name}@{tag}: v{p.current} -> v{p.candidate}" + (" [yellow](forced: worse on " + ", ".join(p.comparison.worse) + ")[/yellow]" if p.forced else ""))
        return
    console.print(f"[red]not promoted:[/red] v{p.candidate} is worse than v{p.current} beyond noise on {', '.join(p.comparison.worse)} "
                  f"({name}@{tag} stays v{p.current}; --force to promote anyway)")
    raise typer.Exit(1)


def _comparison_table(name: str, p) -> None:
    from rich.table import Table

    table = Table("metric", f"v{p.candidate} (candidate)", f"v{p.current} (now)", "difference", "95% interval", "questions", "verdict",
                  title=f"{name}: v{p.candidate} vs v{p.current} on {p.comparison.source}", title_justify="left")
    for d in p.comparison.deltas:
        verdict = "worse" if d.worse else ("better" if d.low > 0 else "within noise")
        table.add_row(d.metric, f"{d.candidate:.3f}", f"{d.current:.3f}", f"{d.delta:+.3f}", f"[{d.low:+.3f}, {d.high:+.3f}]", str(d.n), verdict)
    console.print(table)
