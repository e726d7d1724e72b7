"""The `lorag` command line (Typer). Every command reads the one `lorag.yaml` plus `--set` overrides.

    lorag quickstart                 # the whole loop on this machine: ingest, train, serve, ask
    lorag ingest -c lorag.yaml       # build the knowledge bases (Ray Data -> Milvus); same as `lorag kb ingest`
    lorag kb search "query" --kb KB  # search a knowledge base (dense, bm25 or hybrid), with citations
    lorag train  -c lorag.yaml       # train the adapters (Ray Train + DeepSpeed)
    lorag serve  -c lorag.yaml       # run the OpenAI-compatible endpoint (Ray Serve)
    lorag ask "question" -m adapter  # ask a running endpoint
    lorag eval -d qa.jsonl           # LoRA, RAG or both: every variant scored on an evaluation set
"""

from __future__ import annotations

import enum
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lorag.cluster import connect
from lorag.config import ConfigError, LoragConfig, load_config

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "lorag.yaml"

app = typer.Typer(
    help="lorag: teach a model your domain with LoRA adapters (behaviour) and Milvus knowledge bases (facts), "
    "and serve both behind one OpenAI-compatible endpoint on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False, soft_wrap=True)

ConfigOpt = typer.Option(Path("lorag.yaml"), "--config", "-c", help="The lorag.yaml to use.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config value, e.g. --set serve.port=8001 or --set adapters.support-bot.train.max_steps=5 (repeatable).")
# Commands that run Ray in this process (ingest, train, serve) take no cluster address: `--address` is a
# cluster's dashboard URL, for the commands that send work there (submit, jobs, deploy). Given one anyway,
# they say which command to use instead. To join a cluster in-process from one of its nodes: RAY_ADDRESS=auto.
AddressOpt = typer.Option(None, "--address", hidden=True)


VERBOSE = False  # --verbose: Ray's own logs in the terminal too


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's own logs (Ray Data, Ray Train workers, Serve replicas) here; by default they go to Ray's log files only, whose path is printed.")) -> None:
    global VERBOSE
    VERBOSE = verbose
    if not verbose:  # model-loading progress bars (transformers, huggingface_hub): lorag shows its own
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # gRPC's C core logs to stderr on its own (the Milvus client's "GOAWAY ... too_many_pings" after
        # an idle minute): failures reach lorag as exceptions, so its log lines are noise here.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def _connect(command: str = "", address: Optional[str] = None) -> None:
    """Start (or, with RAY_ADDRESS=auto or a GCS address, join) Ray in this process for an interactive
    command: its logs go to files unless --verbose. A cluster's `--address` is refused with the command to use."""
    from lorag.cluster import ray_logs_dir

    if address is not None:
        remote = {"ingest": "submit ingest", "kb ingest": "submit ingest", "train": "submit train", "serve": "deploy"}[command]
        _fail(f"`lorag {command}` runs Ray in this process and takes no --address: to run it on the cluster at {address}, use "
              f"`lorag {remote} -c CONFIG --address {address}` (there --address is the dashboard URL, http://HOST:8265); to join a "
              "cluster in-process from one of its nodes, set RAY_ADDRESS=auto", 2)
    connect(None, log_to_driver=VERBOSE)
    # After ray.init, which installs a handler that dumps a stack on SIGTERM: stop like Ctrl-C instead.
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not VERBOSE and (logs := ray_logs_dir()):
        console.print(f"[dim]Ray's logs: {logs} (--verbose shows them here)[/dim]")


def _load(path: Path, overrides: Optional[list[str]]) -> LoragConfig:
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@app.command()
def ingest(
    config: Path = ConfigOpt,
    kb: Optional[list[str]] = typer.Option(None, "--kb", help="Only this knowledge base (repeatable; default: all)."),
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = AddressOpt,
) -> None:
    """Build or refresh knowledge bases: read, chunk, embed (Ray Data) and upsert into Milvus. Re-running adds nothing new."""
    cfg = _load(config, set_)
    _check_names(cfg.knowledge_base, kb)
    _connect("ingest", address)
    _ingest_all(cfg, kb)


@app.command()
def train(
    config: Path = ConfigOpt,
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help="Only this adapter (repeatable; default: all)."),
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = AddressOpt,
) -> None:
    """Train LoRA adapters on Ray Train with DeepSpeed; each run saves a new version in the adapter store."""
    cfg = _load(config, set_)
    _check_names(cfg.adapter, adapter)
    _connect("train", address)
    _train_all(cfg, adapter)


@app.command()
def serve(
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = AddressOpt,
    export: Optional[Path] = typer.Option(None, "--export", help="Write a Ray Serve config file (for `serve deploy` / `serve run`) for this config to PATH and exit, without serving."),
) -> None:
    """Run the OpenAI-compatible endpoint (Ray Serve) until Ctrl-C or SIGTERM, or --export its Serve config.

    On Ctrl-C or SIGTERM (what systemd, Docker and Kubernetes send) it stops taking requests, lets the
    ones in flight finish (Ray Serve's graceful shutdown, up to 20 s a replica), deletes lorag's Serve app and exits 0."""
    cfg = _load(config, set_)
    if export is not None:
        _export_serve_config(cfg, config, export)
        return
    _check_serving(cfg)
    _connect("serve", address)
    try:
        url = _start_serve(cfg)
        console.print(f"lorag is serving at [bold]{url}/v1[/bold] (models: {url}/v1/models). Ctrl-C stops it.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as e:
        console.print(f"\n{'SIGTERM' if isinstance(e, Terminated) else 'Ctrl-C'}: stopping lorag's endpoint (requests in flight finish first)")
    finally:
        _stop_serve()


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question."),
    model: str = typer.Option(..., "--model", "-m", help="Adapter name (optionally name@vN) or the base model's name."),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="The endpoint's base URL."),
    no_retrieval: bool = typer.Option(False, "--no-retrieval", help="Answer without the adapter's knowledge base."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Longest answer in tokens."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LORAG_API_KEY", help="Bearer token, if the endpoint requires one."),
) -> None:
    """Ask a running lorag endpoint a question and print the answer with its cited sources."""
    import httpx

    try:
        body = _ask(url, model, question, max_tokens, retrieval=not no_retrieval, api_key=api_key)
    except httpx.HTTPError as e:
        _fail(f"could not reach {url}: {e}. Is `lorag serve` running?")
    if "error" in body:
        _fail(body["error"]["message"])
    _print_answer(body)


@app.command("eval")
def eval_(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="JSONL evaluation set: one {question, answer (or answers), sources?, options?} per line."),
    config: Path = ConfigOpt,
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help="Compare this adapter, name or name@vN (repeatable; default: every trained adapter of the config)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where eval.json, eval.md and eval.png go (default: <workdir>/eval/<date-time>)."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Longest answer in tokens (greedy)."),
    routing: bool = typer.Option(False, "--routing", help="Score `model: \"auto\"` routing instead: the dataset is {question, adapter (or null: the base model)} lines; prints accuracy and a confusion table."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="With --routing: the route threshold to try (default: serve.route_threshold)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """LoRA, RAG or both? Answer an evaluation set with the base model, base + RAG, each adapter and
    each adapter + RAG, through the endpoint's prompt builder and engine, and report exact match,
    token F1, choice and citation accuracy and retrieval recall with 95% bootstrap intervals.
    The report also goes into each compared adapter's version in the adapter store
    (<store>/<name>/v<N>/eval/<date-time>/). With --routing: how often `model: "auto"` picks the labelled adapter."""
    cfg = _load(config, set_)
    if routing:
        _run_routing_eval(cfg, dataset, out, threshold)
    else:
        _run_eval(cfg, dataset, adapter, out, max_tokens)


def _eval_dir(cfg: LoragConfig, out: Optional[Path], prefix: str = "") -> Path:
    if out is not None:
        return out
    if "://" in cfg.workdir:
        _fail("the workdir is a URI: give --out a local directory")
    return Path(cfg.workdir) / "eval" / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"


def _run_eval(cfg: LoragConfig, dataset: Path, adapters: Optional[list[str]], out: Optional[Path], max_tokens: int) -> Path:
    """`lorag eval`'s work (also the quickstart's last stage): answer, score, print the table, write the report."""
    from rich import box
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from lorag.evaluation import evaluate, report_table, store_reports, verdict, write_report

    out = _eval_dir(cfg, out)
    try:
        with Progress(TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("answering", total=None)
            result = evaluate(cfg, dataset, adapters, max_tokens, progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (FileNotFoundError, ValueError, LookupError) as e:
        _fail(str(e))
    written = write_report(result, out)
    # One screen: short headers, each mean above its 95% interval (the report has the long form).
    short = {"exact match": "EM", "token F1": "F1", "choice accuracy": "choice", "citation accuracy": "cited", "retrieval recall@k": "recall",
             "answer style": "style", "answer tokens": "tokens"}
    table = Table(title=f"{result['questions']} questions of {dataset.name}: mean and 95% interval (report: eval.md)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    header, rows = report_table(result)
    keep = [i for i, h in enumerate(header) if h != "seconds per answer"]  # latency with every request queued at once: in the report only
    for i in keep:
        table.add_column(short.get(header[i], header[i]), no_wrap=True, justify="left" if i == 0 else "right", min_width=max(len(r[0]) for r in rows) if i == 0 else 7)
    for row in rows:  # "0.231 [0.14, 0.34]" -> "0.231" over ".14-.34" ("1.000 [1.00, 1.00]": "1-1")
        table.add_row(*(re.sub(r" \[0?(\.\d+|1)(?:\.00)?, 0?(\.\d+|1)(?:\.00)?\]", r"\n\1-\2", row[i]) for i in keep))
    console.print(table)
    for line in verdict(result["summary"]):
        console.print(line.replace("**", ""))
    for p in written:
        console.print(f"{ {'.png': 'chart', '.md': 'report'}.get(p.suffix, 'results')}: {p}")
    for location in store_reports(cfg, result, written):
        console.print(f"stored with the adapter: {location}")
    return out


def _run_routing_eval(cfg: LoragConfig, dataset: Path, out: Optional[Path], threshold: Optional[float]) -> None:
    import json

    from rich.markdown import Markdown

    from lorag.data import DatasetError
    from lorag.evaluation import evaluate_routing, routing_markdown

    out = _eval_dir(cfg, out, "routing-")
    try:
        result = evaluate_routing(cfg, dataset, threshold)
    except (FileNotFoundError, ValueError, LookupError, DatasetError) as e:
        _fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(result, indent=2))
    (out / "routing.md").write_text(routing_markdown(result))
    console.print(Markdown(routing_markdown(result)))
    console.print(f"results: {out / 'routing.json'}\nreport: {out / 'routing.md'}")


@app.command()
def quickstart(
    config: Path = typer.Option(QUICKSTART, "--config", "-c", help="The lorag.yaml to run (default: the bundled example)."),
    questions: Optional[Path] = typer.Option(None, "--questions", help="One question per line (default: questions.txt beside the config)."),
    eval_set: Optional[Path] = typer.Option(None, "--eval", help="Held-out evaluation set scored at the end (default: eval.jsonl beside the config, when there is one)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """The whole loop on this machine: build the knowledge base, train the adapter, serve both, ask
    questions over HTTP, shut down, then score base / base + RAG / adapter / adapter + RAG on the
    held-out evaluation set (`lorag eval`) and print the table and the chart's path."""
    cfg = _load(config, set_)
    qfile = questions or config.parent / "questions.txt"
    if not qfile.is_file():
        _fail(f"no questions file {qfile}: pass --questions FILE")
    qs = [q.strip() for q in qfile.read_text().splitlines() if q.strip()]
    if eval_set is None and (config.parent / "eval.jsonl").is_file():
        eval_set = config.parent / "eval.jsonl"
    if eval_set is not None and not eval_set.is_file():
        _fail(f"no evaluation set {eval_set}")
    if not cfg.adapters:
        _fail(f"{config} defines no adapters")
    console.rule("[bold]lorag quickstart[/bold]")
    _connect()
    _ingest_all(cfg, None)
    _train_all(cfg, None)
    url = _start_serve(cfg)
    try:
        console.rule("[bold]asking over HTTP[/bold]")
        from lorag.gateway import base_name

        base = base_name(cfg)
        for q in qs:
            console.print(f"\n[bold]Q: {q}[/bold]")
            for ad in cfg.adapters:
                body = _ask(url, base, q, cfg.serve.max_tokens, retrieval=False)
                console.print(f"[dim]base model, no retrieval ({base}):[/dim]")
                _print_answer(body, indent="  ")
                body = _ask(url, ad.name, q, cfg.serve.max_tokens, retrieval=True)
                label = f"adapter {ad.name}" + (f" + knowledge base {ad.knowledge_base}" if ad.knowledge_base else "")
                console.print(f"[dim]{label}:[/dim]")
                _print_answer(body, indent="  ")
                if "error" in body:
                    _fail(body["error"]["message"])
    finally:
        _stop_serve()
    if eval_set is not None:
        console.rule(f"[bold]LoRA, RAG or both? {eval_set.name}[/bold]")
        _run_eval(cfg, eval_set, None, None, 64)
    console.rule("[bold green]done[/bold green]")


kb_app = typer.Typer(help="Knowledge bases: ingest documents into Milvus, list them, search them, drop them.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")
KbArg = typer.Argument(..., help="Knowledge-base name (under `knowledge_bases:` in the config).")


@kb_app.command("ingest")
def kb_ingest(
    config: Path = ConfigOpt,
    kb: Optional[list[str]] = typer.Option(None, "--kb", help="Only this knowledge base (repeatable; default: all)."),
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = AddressOpt,
) -> None:
    """Read, parse, chunk, embed (Ray Data) and upsert into Milvus. Unchanged documents are skipped, changed ones replaced, deleted ones removed."""
    cfg = _load(config, set_)
    _check_names(cfg.knowledge_base, kb)
    _connect("kb ingest", address)
    _ingest_all(cfg, kb)


@kb_app.command("list")
def kb_list(config: Path = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Every knowledge base of the config: where it lives, documents and chunks stored, search mode."""
    from rich.table import Table

    from lorag.milvus import MilvusStore, is_lite

    cfg = _load(config, set_)
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


@kb_app.command("search")
def kb_search(
    query: str = typer.Argument(..., help="What to look for."),
    kb: str = typer.Option(..., "--kb", help="Knowledge-base name."),
    k: Optional[int] = typer.Option(None, "-k", min=1, max=100, help="Hits to show (default: the knowledge base's top_k)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="dense, bm25 or hybrid (default: the knowledge base's `search`)."),
    source_prefix: Optional[str] = typer.Option(None, "--source-prefix", help="Only chunks whose source path starts with this."),
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Search a knowledge base and print each hit with its score and citation (source, section, offsets)."""
    from lorag.embed import Embedder
    from lorag.milvus import MilvusStore
    from lorag.models import resolve_model
    from lorag.retrieval import display_path, retrieve

    cfg = _load(config, set_)
    _check_names(cfg.knowledge_base, [kb])
    if mode not in (None, "dense", "bm25", "hybrid"):
        _fail(f"--mode must be dense, bm25 or hybrid, not {mode!r}", 2)
    kbc = cfg.knowledge_base(kb)
    prefix = source_prefix
    if prefix and not os.path.isabs(prefix):  # sources are stored as absolute paths
        prefix = os.path.abspath(prefix) + (os.sep if prefix.endswith(("/", os.sep)) else "")
    try:
        store = MilvusStore(cfg.milvus_uri(kbc), kbc.token)
        embedder = Embedder(resolve_model(cfg.embedder, cfg.model_cache)) if (mode or kbc.search) != "bm25" else None
        hits = retrieve(store, embedder, kbc, query, k, mode, prefix)
    except (LookupError, ConnectionError, ValueError) as e:
        _fail(str(e))
    if not hits:
        console.print("no hits")
    for n, h in enumerate(hits, 1):
        where = f"{display_path(h['source'])}:{h['start']}-{h['end']}" + (f"  ({h['section']})" if h.get("section") else "")
        console.print(f"[bold][{n}][/bold] {h['score']:.4f}  {where}")
        text = " ".join(h["text"].split())
        console.print(f"    {text[:300]}{'...' if len(text) > 300 else ''}")


@kb_app.command("drop")
def kb_drop(
    kb: str = KbArg,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    config: Path = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Delete a knowledge base's Milvus collection (its documents stay on disk; ingest rebuilds it)."""
    from lorag.milvus import MilvusStore

    cfg = _load(config, set_)
    _check_names(cfg.knowledge_base, [kb])
    kbc = cfg.knowledge_base(kb)
    try:
        store = MilvusStore(cfg.milvus_uri(kbc), kbc.token)
    except (ConnectionError, ValueError) as e:
        _fail(str(e))
    try:
        store.owner(kbc.collection)  # a collection lorag did not create is never dropped
        n = store.count(kbc.collection)
        if not yes and not typer.confirm(f"drop {kb} ({n} chunks) from {store.uri}?"):
            raise typer.Exit(1)
        store.drop(kbc.collection, kbc.name)
    except ValueError as e:
        _fail(str(e))
    console.print(f"dropped {kb}: {n} chunks removed from {store.uri}")


adapters_app = typer.Typer(help="The adapter store: list, inspect, tag and remove adapter versions.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
StoreOpt = typer.Option(None, "--store", help="Adapter store: a directory or a URI such as s3://bucket/lorag/adapters (default: <storage>/adapters of --config).")


def _store(config: Path, store: Optional[str]):
    from lorag.adapters import AdapterStore

    try:
        return AdapterStore(store if store else _load(config, None).adapter_store)
    except ValueError as e:
        _fail(str(e))


def _split_ref(ref: str) -> tuple[str, Optional[str]]:
    from lorag.adapters import parse_model_id

    return parse_model_id(ref)


@adapters_app.command("list")
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


@adapters_app.command("show")
def adapters_show(ref: str = typer.Argument(..., help="NAME, NAME@vN or NAME@TAG."), config: Path = ConfigOpt, store: Optional[str] = StoreOpt) -> None:
    """An adapter version's path and full provenance (lorag.json)."""
    import json

    from lorag.adapters import AdapterNotFoundError

    st = _store(config, store)
    name, version = _split_ref(ref)
    try:
        path, meta = st.resolve(name, version), st.metadata(name, version)
    except (AdapterNotFoundError, ValueError) as e:
        _fail(str(e))
    console.print(f"[bold]{path}[/bold]")
    console.print_json(json.dumps(meta))


@adapters_app.command("tag")
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
        _fail(str(e))
    console.print(f"{name}@{tag} -> v{number}")


@adapters_app.command("rm")
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
        _fail(f"say which version to delete, e.g. {name}@v1 (versions: {['v%d' % v for v in st.versions(name)]})", 2)
    try:
        path = st.resolve(name, version)
    except (AdapterNotFoundError, ValueError) as e:
        _fail(str(e))
    if not yes and not typer.confirm(f"delete {path}?"):
        raise typer.Exit(1)
    try:
        st.remove(name, version)
    except AdapterNotFoundError as e:  # removed by someone else since it was resolved
        _fail(str(e))
    console.print(f"deleted {path}")


k8s_app = typer.Typer(help="Kubernetes under KubeRay: render the manifests of a config, apply them to a cluster, read their status.", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")
KubeconfigOpt = typer.Option(None, "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).")
ContextOpt = typer.Option(None, "--context", help="kubeconfig context (default: the current one).")


@k8s_app.command("render")
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

    cfg = _load(config, set_)
    try:
        written = k8s.write(k8s.render(cfg, str(config)), out, str(config))
    except ConfigError as e:
        _fail(escape(str(e)), 2)
    for path in written:
        console.print(f"wrote {escape(str(path))}")


@k8s_app.command("apply")
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

    cfg = _load(config, set_)
    try:
        manifests = k8s.render(cfg, str(config))
        if dry_run:
            steps = k8s.plan(manifests, job or (), wait)
        else:
            k8s.apply(manifests, job or (), kubeconfig, context, wait=wait, timeout_s=timeout, echo=lambda line: console.print(escape(line)))
    except (ConfigError, ValueError) as e:
        _fail(escape(str(e)), 2)
    except RuntimeError as e:
        _fail(escape(str(e)))
    if dry_run:
        console.print("dry run: nothing was sent to a cluster. In order:")
        for step in steps:
            console.print(escape(str(step)))


@k8s_app.command("status")
def k8s_status(config: Path = ConfigOpt, set_: Optional[list[str]] = SetOpt, kubeconfig: Optional[str] = KubeconfigOpt, context: Optional[str] = ContextOpt) -> None:
    """The state and conditions of the config's RayCluster, RayJobs and RayService."""
    from rich.markup import escape

    from lorag import k8s

    cfg = _load(config, set_)
    try:
        states = k8s.status(cfg, kubeconfig=kubeconfig, context=context)
    except RuntimeError as e:
        _fail(escape(str(e)))
    for state in states:
        console.print(escape(str(state)))


@app.command("config")
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

    from lorag.config import reference, reference_markdown

    if check is not None:
        if markdown:
            _fail("--check and --markdown do not combine", 2)
        cfg = _load(check, set_)
        console.print(f"{check}: valid ({len(cfg.knowledge_bases)} knowledge bases, {len(cfg.adapters)} adapters)", markup=False)
        return
    if set_:
        _fail("--set applies to a config: use it with --check FILE", 2)
    if markdown:
        typer.echo(reference_markdown(), nl=False)
        return
    for section in reference():
        console.print(Text.assemble("\n", (section.path or "top level", "bold"), f"  {section.doc}"))
        for f in section.fields:
            console.print(Text.assemble("  ", (f.path, "cyan"), f"  {f.type}  ", ("required", "bold") if f.default == "required" else f"= {f.default}"))
            console.print(Text(textwrap.fill(f.description, max(console.width, 60), initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False), style="dim"))


# -- a running Ray cluster: submit jobs, follow them, deploy the endpoint ------------------------

class JobKind(str, enum.Enum):
    train = "train"
    ingest = "ingest"
    eval = "eval"


ClusterAddressOpt = typer.Option(None, "--address", help="The cluster's dashboard address (Ray Jobs and Serve APIs), e.g. http://HOST:8265. Default: cluster.address of the config, else $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS.")
TokenOpt = typer.Option(None, "--token", help="The cluster's Ray auth token. Default: $RAY_AUTH_TOKEN, else the file in $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (copy the head's).")


@app.command()
def submit(
    kind: JobKind = typer.Argument(..., help="train runs `python -m jobs.finetune`, ingest `python -m jobs.ingest`, eval `python -m jobs.evaluate` (its report is in the job's logs)."),
    config: Path = ConfigOpt,
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help="train, eval: only this adapter (repeatable; default: all)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", "-d", help="eval: the evaluation set (JSONL), inside the project."),
    kb: Optional[list[str]] = typer.Option(None, "--kb", help="ingest: only this knowledge base (repeatable; default: all)."),
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = ClusterAddressOpt,
    token: Optional[str] = TokenOpt,
    follow: bool = typer.Option(True, "--follow/--no-follow", help="Stream the job's logs and exit with its status (0 when it SUCCEEDED), or return once it is submitted."),
) -> None:
    """Run a train, ingest or eval job on a running Ray cluster (Ray Jobs), with this project uploaded as its working_dir."""
    from rich.markup import escape

    from lorag.cluster import ClusterError, check_for_cluster, cluster, cluster_nodes, job_client, project_paths, secret_problems, submit_job

    cfg = _load(config, set_)
    if problems := secret_problems(cfg, set_):  # --set values and env_vars travel in plain text: refuse before contacting the cluster
        _fail("this job would send credentials in plain text (nothing was uploaded):\n  " + "\n  ".join(problems), 2)
    misplaced = adapter if kind is JobKind.ingest else kb
    if misplaced:
        _fail("--adapter goes with `submit train` and `submit eval`, --kb with `submit ingest`", 2)
    if (kind is JobKind.eval) != (dataset is not None):
        _fail("`submit eval` needs --dataset (and only it takes one)", 2)
    if dataset is not None and not dataset.is_file():
        _fail(f"evaluation set {dataset} does not exist", 2)
    names = kb if kind is JobKind.ingest else adapter
    _check_names(cfg.knowledge_base if kind is JobKind.ingest else cfg.adapter, names)
    try:
        root, _ = project_paths(config)
        target = cluster(address, token, cfg)
        client = job_client(target)
        check_for_cluster(cfg, root, target, kind.value, names, cluster_nodes(target))  # a ConfigError: one line per field, exit 2, nothing uploaded
        console.print(f"uploading {root} to {target.address}")
        sub = submit_job(client, target, kind.value, cfg, config, names, set_, dataset)
    except ClusterError as e:
        _fail(str(e))
    console.print(f"submitted job [bold]{sub.job_id}[/bold]: {escape(sub.entrypoint)}")
    flags = f" --address {target.address}"
    console.print(f"  logs: lorag jobs logs {sub.job_id} --follow{flags}\n  stop: lorag jobs stop {sub.job_id}{flags}")
    if follow:
        _follow_job(client, target, sub.job_id)


jobs_app = typer.Typer(help="Ray Jobs on a running cluster: list them, read or follow their logs, stop them.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
JobArg = typer.Argument(..., help="The job's submission id (printed by `lorag submit`, listed by `lorag jobs list`).")
ClusterConfigOpt = typer.Option(None, "--config", "-c", help="A lorag.yaml whose cluster.address to use.")


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
        _fail(str(e))
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
        _fail(str(e))


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
        _fail(str(e))


@app.command()
def deploy(
    config: Path = ConfigOpt,
    address: Optional[str] = ClusterAddressOpt,
    token: Optional[str] = TokenOpt,
    timeout: float = typer.Option(900, "--timeout", help="Seconds to wait for the application to be RUNNING."),
) -> None:
    """Deploy the endpoint to a running Ray cluster (Serve REST API) with this project uploaded, and wait until it is RUNNING.

    The replicas read the config file in the upload as it is (so there is no --set), and get the sha256 digests of this machine's API keys (serve.api_keys_env, serve.api_keys_file) through the deployment's environment: never the keys.
    """
    from lorag.cluster import ClusterError, check_for_cluster, cluster, cluster_nodes, deploy_app, project_paths

    cfg = _load(config, None)
    try:
        target = cluster(address, token, cfg)
        check_for_cluster(cfg, project_paths(config)[0], target, "deploy", nodes=cluster_nodes(target))
        r = deploy_app(target, cfg, config, timeout, progress=lambda line: console.print(line))
    except ConfigError as e:  # cluster.env_vars naming a credential: nothing was sent
        _fail(str(e), 2)
    except ClusterError as e:
        _fail(str(e))
    if r.status == "RUNNING":
        console.print(f"lorag is RUNNING at [bold]{r.url}/v1[/bold] (deployed to {target.address})")
        return
    console.print(f"[red]error:[/red] application lorag is {r.status}" + (f" after {timeout:.0f} s" if r.status not in ("DEPLOY_FAILED", "UNHEALTHY") else ""))
    if r.message:
        console.print(r.message, markup=False)  # Ray's own words: the replica's error or what it still waits for
    raise typer.Exit(1)


def _jobs_client(address: Optional[str], token: Optional[str], config: Optional[Path]):
    from lorag.cluster import ClusterError, cluster, job_client

    cfg = _load(config, None) if config else None
    try:
        target = cluster(address, token, cfg)
        return target, job_client(target)
    except ClusterError as e:
        _fail(str(e))


def _follow_job(client, target, job_id: str) -> None:
    """Stream the job's logs; exit 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED."""
    from lorag.cluster import ClusterError, follow_job

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    try:
        r = follow_job(client, target, job_id, write)
    except ClusterError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        console.print(f"\nstopped following; {job_id} keeps running (lorag jobs stop {job_id} --address {target.address})")
        raise typer.Exit(130) from None
    if r.status == "SUCCEEDED":
        console.print(f"job {job_id} [green]SUCCEEDED[/green]")
        return
    first = r.message.strip().splitlines()[0] if r.message.strip() else ""
    console.print(f"[red]error:[/red] job {job_id} {r.status}" + (f": {first}" if first else ""))
    raise typer.Exit(1)


# -- shared steps --------------------------------------------------------------------------------


def _check_names(lookup, names: Optional[list[str]]) -> None:
    """Fail on a wrong --kb/--adapter name before Ray starts."""
    for name in names or []:
        try:
            lookup(name)
        except KeyError as e:
            _fail(str(e.args[0]), 2)


def _ingest_all(cfg: LoragConfig, only: Optional[list[str]]) -> None:
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
                _fail(str(e))
        if r.rebuilt:
            console.print(f"[yellow]rebuilt[/yellow] {name} from scratch: {r.rebuilt}")
        for path, reason in r.failed:
            console.print(f"[yellow]skipped[/yellow] {display_path(path)}: {reason}")
        console.print(
            f"{r.knowledge_base}: {r.documents} documents ({r.skipped} unchanged, {r.documents - r.skipped - len(r.failed)} indexed, {len(r.failed)} failed) -> "
            f"{r.chunks_written} chunks upserted, {r.chunks_removed} stale removed; {r.entities} in {r.uri} ({r.seconds:.1f} s)"
        )


def _train_all(cfg: LoragConfig, only: Optional[list[str]]) -> None:
    from lorag.data import DatasetError
    from lorag.train import train_adapter

    names = only or [a.name for a in cfg.adapters]
    for name in names:
        console.rule(f"train adapter [bold]{name}[/bold]")
        t = cfg.adapter(name).train
        try:
            with console.status(f"training {name}: {t.max_steps} steps on {t.num_workers} Ray Train worker(s), ZeRO-{t.zero_stage}{' (RAFT)' if t.raft else ''} ..."):
                r = train_adapter(cfg, name)
        except (DatasetError, ConfigError, RuntimeError, LookupError) as e:
            _fail(str(e))
        console.print(train_summary(name, r.version, r.path, r.metrics))


def train_summary(name: str, version: int, path: Path, m: dict) -> str:
    """One line: loss curve ends, validation loss against the base model's, and where it was saved."""
    curve = m["history"]["train_loss"]
    line = f"{name} v{version}: train loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f} in {m['steps']} steps"
    if m.get("val_loss") is not None:
        line += f"; validation loss {m['val_loss']:.3f}"
        if m.get("base_val_loss") is not None:
            line += f" (base model {m['base_val_loss']:.3f})"
    if m.get("resumed_from_step") is not None:
        line += f"; resumed from step {m['resumed_from_step']}"
    return f"{line}\nsaved to {path}"


def _export_serve_config(cfg: LoragConfig, config: Path, out: Path) -> None:
    import yaml

    from lorag.serving import serve_config

    # The deployed app reads the lorag.yaml relative to Serve's working_dir: the repository root.
    rel = os.path.relpath(config.resolve(), Path.cwd())
    path = config.resolve().as_posix() if rel.startswith("..") else Path(rel).as_posix()
    header = (
        f"# Ray Serve config for lorag, generated by `lorag serve -c {path} --export {out}`; regenerate it after changing `serve:`.\n"
        "# Local: `serve run <this file>`; cluster: `serve deploy <this file>` (run from the repository root / working_dir).\n"
    )
    out.write_text(header + yaml.safe_dump(serve_config(cfg, path), sort_keys=False))
    console.print(f"wrote {out}")


def _check_serving(cfg: LoragConfig) -> None:
    """What the replicas will need, checked here before Ray starts, so a mistake is one line now and
    not a replica that fails later: the API keys, each Milvus server, the adapter store."""
    from lorag.adapters import AdapterStore
    from lorag.auth import api_keys
    from lorag.milvus import MilvusStore, is_lite

    api_keys(cfg)  # the replicas read the same variables
    for kb in cfg.knowledge_bases:
        if not is_lite(cfg.milvus_uri(kb)):  # a Lite file belongs to one process: its owner actor opens it
            MilvusStore(cfg.milvus_uri(kb), kb.token).close()
    AdapterStore(cfg.adapter_store).names()


def _start_serve(cfg: LoragConfig) -> str:
    from ray import serve

    from lorag.auth import api_keys
    from lorag.serving import build_app

    try:
        api_keys(cfg)  # the replicas read the same variables: refuse here, before loading anything
        app = build_app(cfg)
    except (RuntimeError, ConfigError) as e:
        _fail(str(e))
    console.rule("[bold]serve[/bold]")
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port, "request_timeout_s": cfg.serve.request_timeout_s})
    with console.status("starting Ray Serve deployments (loading models)..."):
        serve.run(app, name="lorag", route_prefix="/", blocking=False)
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def _stop_serve() -> None:
    """Delete lorag's Serve app: its replicas stop and free their CPUs and memory. Serve itself
    (and any other app on a shared cluster) is left as it was; a local Ray ends with this process.
    `serve.shutdown()` would also stop other people's apps, and Ray reports its killing of the
    Serve controller as a failed task in the terminal."""
    from ray import serve

    if "lorag" in serve.status().applications:  # not yet there when stopped while starting
        serve.delete("lorag")


def _ask(url: str, model: str, question: str, max_tokens: int, retrieval: bool, api_key: Optional[str] = None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payload = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0, "retrieval": retrieval}
    r = httpx.post(f"{url.rstrip('/')}/v1/chat/completions", json=payload, headers=headers, timeout=300)
    try:
        return r.json()
    except ValueError:
        return {"error": {"message": f"HTTP {r.status_code}: {r.text[:500]}"}}


def _print_answer(body: dict, indent: str = "") -> None:
    from lorag.retrieval import display_path

    if "error" in body:
        console.print(f"{indent}[red]error:[/red] {body['error']['message']}")
        return
    console.print(f"{indent}{body['choices'][0]['message']['content']}")
    for s in body.get("sources", []):
        console.print(f"{indent}  [{s['index']}] {display_path(s['source'])} (chars {s['start']}-{s['end']}, score {s['score']:.2f}) - {s['title']}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so every cleanup path runs the same."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


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


if __name__ == "__main__":
    main()
