"""Knowledge-base ingest benchmarks, measured as ratios within one run (see docs/benchmarks.md).

    .venv/bin/python bench/ingest.py                          # all 861 stdlib documents, CPU, ~16 min on 2 cores
    .venv/bin/python bench/ingest.py --docs 60 --out /tmp/ingest.json

Corpus: the docstrings of the Python standard library, read from its .py sources with `ast`
(nothing is imported), one Markdown document per module and one per documented class
(`stdlib_corpus`); `--docs` takes a seeded sample. The knowledge base uses lorag's defaults:
200-token chunks with 32 overlapping, all-MiniLM-L6-v2, embedding batches of 64, Milvus Lite.

1. lorag's ingest (Ray Data read -> chunk -> embed -> upsert), end-to-end chunks/s, vs the bare
   embedder's batched rate over the same chunk texts and batch size.          goal >= 0.9x
2. The same ingest vs a single-process loop doing the same work (read, DocumentChunker,
   Embedder.embed, MilvusStore.upsert into a fresh Milvus Lite file), with 1 and 2
   embedding actors.                                                          goal >= 1.0x
3. Re-ingesting the unchanged corpus vs the first ingest, wall time.          goal <= 0.1x

Threads: the pipeline runs as `lorag kb ingest` runs it: a local Ray with the machine's cores
(os.cpu_count()) and the knowledge base's defaults, which size the pool (`lorag.data.plan_stages`:
on 2 cores, two embedding actors of one torch thread each beside a quarter-CPU chunker); a second
run sets `embed_actors: 1` (one actor with every core's threads). The bare embedder and the
single-process loop get torch.set_num_threads(os.cpu_count()). Each measurement runs in its own
process, with a fresh workdir under /tmp.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import ast
import hashlib
import json
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KB = "stdlib"
CHUNK_SIZE, CHUNK_OVERLAP, EMBED_BATCH = 200, 32, 64
WRITE_BATCH = 256  # rows per upsert, as lorag.data.ingest writes them
STDLIB_SKIP = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "dist-packages", "__pycache__"}
MIN_DOC_CHARS = 200
LIBRARY_MODULES = ("chunking.py", "config.py", "data.py", "documents.py", "embed.py", "milvus.py", "models.py", "retrieval.py")


# -- corpus -------------------------------------------------------------------------------------


def stdlib_docs() -> dict[str, list[tuple[str, str]]]:
    """The standard library's docstrings as documents: name -> [(heading, text)], in source order.

    A module gives one document (its own docstring, then its functions and its small classes),
    and every class with at least MIN_DOC_CHARS of docstrings gives its own (`module.Class`).
    The first entry's heading is "" (the module's or class's own docstring). Documents with less
    than MIN_DOC_CHARS of text are left out. Sources that do not parse are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, list[tuple[str, str]]] = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP and not d.startswith((".", "config-")))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(dirpath) / name
            parts = path.relative_to(root).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):  # a few sources are templates or other Pythons' syntax
                continue
            own = [("", ast.get_docstring(tree) or "")]
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    sections = _class_sections(node, node.name)
                    if _chars(sections) >= MIN_DOC_CHARS:
                        docs.setdefault(f"{module}.{node.name}", []).extend([("", sections[0][1]), *sections[1:]])
                    else:
                        own += sections
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
                    own.append((_signature(node, node.name), ast.get_docstring(node)))
            if _chars(own) >= MIN_DOC_CHARS:
                docs.setdefault(module, []).extend(own)
    return docs


def stdlib_corpus(out_dir: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Write the standard library's docstrings as Markdown files, one per document of `stdlib_docs`.

    Each file is `# name`, the module's or class's docstring, then a `## Class.method(args)`
    section per documented function, method or small class.

    Args:
        out_dir: where to write `<name>.md` files (created).
        limit: at most this many documents, a seeded sample (the same for the same limit).

    Returns:
        The written paths, sorted.
    """
    docs = stdlib_docs()
    names = sorted(docs)
    if limit is not None and limit < len(names):
        names = sorted(random.Random(0).sample(names, limit))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        parts = [f"# {name}"]
        for heading, text in docs[name]:
            parts += [f"## {heading}", text] if heading else [text]
        path = out / f"{name}.md"
        path.write_text("\n\n".join(p for p in parts if p.strip()) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _class_sections(node: ast.ClassDef, qualname: str) -> list[tuple[str, str]]:
    sections = [(qualname, ast.get_docstring(node) or "")]
    for child in node.body:
        if isinstance(child, ast.ClassDef):
            sections += _class_sections(child, f"{qualname}.{child.name}")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(child):
            sections.append((_signature(child, f"{qualname}.{child.name}"), ast.get_docstring(child)))
    return sections


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, qualname: str) -> str:
    return f"{qualname}({ast.unparse(node.args)})"


def _chars(sections: list[tuple[str, str]]) -> int:
    return sum(len(text) for _, text in sections)


# -- measurements (each in its own process) -------------------------------------------------------


def library_fingerprint() -> str:
    """A hash of the lorag modules these benchmarks run, so results name the code they measured."""
    import lorag

    h = hashlib.sha256()
    for name in LIBRARY_MODULES:
        h.update(name.encode() + b"\0" + (Path(lorag.__file__).parent / name).read_bytes())
    return h.hexdigest()[:12]


def chunk_corpus(corpus: Path) -> list[dict]:
    """Every chunk row of the corpus, as the pipeline's DocumentChunker makes them (untimed helper)."""
    from lorag.chunking import DocumentChunker
    from lorag.documents import find_documents

    chunker = DocumentChunker(KB, CHUNK_SIZE, CHUNK_OVERLAP, str(_embedder_path()))
    rows = []
    for path in find_documents([str(corpus)]):
        rows += [r for r in chunker({"path": path, "bytes": Path(path).read_bytes()}) if not r["error"]]
    return rows


def bare_embedder(corpus: Path, threads: int) -> dict:
    """The ceiling: Embedder.embed over every chunk text in batches, model loaded, nothing else."""
    import torch

    from lorag.embed import Embedder

    torch.set_num_threads(threads)
    texts = [r["text"] for r in chunk_corpus(corpus)]
    emb = Embedder(_embedder_path())
    emb.embed(texts[:EMBED_BATCH])  # warm-up: first-call allocations and kernel selection
    t0 = time.time()
    for i in range(0, len(texts), EMBED_BATCH):
        emb.embed(texts[i : i + EMBED_BATCH])
    seconds = time.time() - t0
    return {"chunks": len(texts), "seconds": seconds, "chunks_per_s": len(texts) / seconds, "threads": threads}


def single_process(corpus: Path, workdir: Path) -> dict:
    """The baseline: one process reads, chunks, embeds and upserts into a fresh Milvus Lite file, in turn."""
    import torch

    from lorag.chunking import DocumentChunker
    from lorag.config import LoragConfig
    from lorag.data import ROW_KEYS, fingerprint
    from lorag.documents import find_documents
    from lorag.embed import Embedder
    from lorag.milvus import MilvusStore

    torch.set_num_threads(os.cpu_count())
    cfg = LoragConfig.model_validate(_config(corpus, workdir, actors=1))
    kb = cfg.knowledge_base(KB)
    t0 = time.time()  # timed like ingest(): model loads and opening the store count
    path = _embedder_path()
    chunker = DocumentChunker(KB, CHUNK_SIZE, CHUNK_OVERLAP, str(path), fingerprint(cfg, kb))
    emb = Embedder(path)
    store = MilvusStore(cfg.milvus_uri(kb))
    store.ensure_collection(kb.collection, emb.dim)
    written, pending, queue = 0, [], []
    for file in find_documents(kb.sources):
        queue += [r for r in chunker({"path": file, "bytes": Path(file).read_bytes()}) if not r["error"]]
        while len(queue) >= EMBED_BATCH:
            batch, queue = queue[:EMBED_BATCH], queue[EMBED_BATCH:]
            pending += _with_vectors(batch, emb.embed([r["text"] for r in batch]), ROW_KEYS)
            if len(pending) >= WRITE_BATCH:
                written += store.upsert(kb.collection, pending)
                pending = []
    if queue:
        pending += _with_vectors(queue, emb.embed([r["text"] for r in queue]), ROW_KEYS)
    written += store.upsert(kb.collection, pending)
    entities = store.count(kb.collection)
    seconds = time.time() - t0
    store.close()
    return {"chunks": written, "entities": entities, "seconds": seconds, "chunks_per_s": written / seconds, "threads": os.cpu_count()}


def pipeline(corpus: Path, workdir: Path, actors: int | None, runs: int, threads: int | None) -> dict:
    """lorag's ingest on a fresh local Ray, `runs` times on the same workdir (the first builds, later ones find nothing changed)."""
    import ray

    from lorag.config import LoragConfig
    from lorag.data import ingest

    cfg = LoragConfig.model_validate(_config(corpus, workdir, actors, threads))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)  # as `lorag kb ingest`
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = []
    try:
        for _ in range(runs):
            r = ingest(cfg, KB)
            res = {k: getattr(r, k) for k in ("documents", "skipped", "chunks_written", "chunks_removed", "entities", "seconds")}
            res["failed"] = len(r.failed)
            res["chunks_per_s"] = r.chunks_written / r.seconds
            out.append(res)
    finally:
        ray.shutdown()
    return {"actors": actors, "embed_threads": threads, "runs": out}


def _with_vectors(rows: list[dict], vectors, keys: tuple[str, ...]) -> list[dict]:
    return [{**{k: r[k] for k in keys}, "vector": v.tolist()} for r, v in zip(rows, vectors)]


def _embedder_path() -> Path:
    from lorag.models import resolve_model

    return resolve_model("all-minilm-l6-v2", Path.home() / ".cache" / "lorag")


def _config(corpus: Path, workdir: Path, actors: int | None, threads: int | None = None) -> dict:
    return {
        "embedder": "all-minilm-l6-v2",
        "workdir": str(workdir),
        "knowledge_bases": [
            {
                "name": KB, "sources": [str(corpus)], "chunking": {"size": CHUNK_SIZE, "overlap": CHUNK_OVERLAP},
                "embed_batch_size": EMBED_BATCH, "embed_actors": actors, "embed_threads": threads,
            }
        ],
    }


def _child(kind: str, corpus: Path, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--corpus", str(corpus)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr or out.stdout)[-1500:]}
    return json.loads(lines[-1][7:])


# -- report ---------------------------------------------------------------------------------------


def table(res: dict) -> list[tuple[str, str, str, str]]:
    """(measurement, measured, goal, met) rows from the children's results."""
    rows = []

    def ok(cond: bool) -> str:
        return "met" if cond else "missed"

    p1, p2, loop, bare = res["pipeline_default"], res["pipeline_1actor"], res["single_process"], res["bare"]
    def versus(p: dict, ref: dict, label: str, failed: str, goal: float) -> None:
        """A row comparing the pipeline's first run `p` with the reference result `ref`, chunks/s."""
        if "error" in p or "error" in ref:
            rows.append((failed, "failed: " + (p.get("error") or ref.get("error")).strip().splitlines()[-1], f">= {goal}x", "-"))
            return
        first = p["runs"][0]
        r = first["chunks_per_s"] / ref["chunks_per_s"]
        rows.append((label, f"**{r:.2f}x** ({first['chunks_per_s']:.1f} vs {ref['chunks_per_s']:.1f})", f">= {goal}x", ok(r >= goal)))

    for p, label in ((p1, "defaults"), (p2, "embed_actors: 1")):
        versus(p, bare, f"ingest end-to-end ({label}) vs bare embedder ({bare.get('threads')} torch threads), chunks/s",
               f"ingest ({label}) vs bare embedder", 0.9)
    for p, label in ((p1, "defaults"), (p2, "embed_actors: 1")):
        versus(p, loop, f"ingest ({label}) vs single-process loop ({loop.get('threads')} torch threads), chunks/s end-to-end",
               f"ingest ({label}) vs single-process loop", 1.0)
    if "error" not in p1:
        first, again = p1["runs"][0], p1["runs"][1]
        r = again["seconds"] / first["seconds"]
        rows.append((
            "re-ingest of the unchanged corpus / first ingest, wall time (same Ray session)",
            f"**{r:.3f}x** ({again['seconds']:.2f} vs {first['seconds']:.1f} s; {again['skipped']}/{again['documents']} skipped)", "<= 0.1x", ok(r <= 0.1),
        ))
        fresh = res.get("reingest_new_process", {})
        if "runs" in fresh:
            f = fresh["runs"][0]
            r = f["seconds"] / first["seconds"]
            rows.append((
                "re-ingest / first ingest, wall time (new process and Ray, as a re-run job)",
                f"**{r:.3f}x** ({f['seconds']:.2f} vs {first['seconds']:.1f} s; {f['skipped']}/{f['documents']} skipped)", "<= 0.1x", ok(r <= 0.1),
            ))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=None, help="a seeded sample of this many stdlib documents (default: all of them, 861 on Python 3.11: ~3300 chunks, ~16 min on 2 cores)")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--actors", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        corpus, workdir = Path(args.corpus), Path(args.workdir) if args.workdir else None
        load = os.getloadavg()[0]
        if args.child == "bare":
            res = bare_embedder(corpus, args.threads)
        elif args.child == "loop":
            res = single_process(corpus, workdir)
        else:
            res = pipeline(corpus, workdir, args.actors or None, args.runs, args.threads or None)
        res["load_1min"] = [load, os.getloadavg()[0]]  # the machine's load average before and after: other work skews rates
        print("RESULT " + json.dumps(res), flush=True)
        return

    corpus = Path(tempfile.mkdtemp(prefix="lorag-bench-corpus-"))
    library = library_fingerprint()
    files = stdlib_corpus(corpus, args.docs)
    chars = sum(f.stat().st_size for f in files)
    print(f"bench/ingest.py: {len(files)} stdlib documents ({chars / 1e6:.2f} MB) in {corpus}, "
          f"chunks of {CHUNK_SIZE} tokens ({CHUNK_OVERLAP} overlap), embed batch {EMBED_BATCH}, Milvus Lite, CPU ({os.cpu_count()} cores), "
          f"lorag sources {library}", flush=True)
    work1 = Path(tempfile.mkdtemp(prefix="lorag-bench-"))
    cores = os.cpu_count()
    res = {"lorag_sources": library, "docs": len(files), "corpus_bytes": chars, "cpus": os.cpu_count()}
    steps = [
        ("bare", lambda: _child("bare", corpus, threads=cores)),
        ("single_process", lambda: _child("loop", corpus, workdir=tempfile.mkdtemp(prefix="lorag-bench-"))),
        ("pipeline_default", lambda: _child("ray", corpus, workdir=work1, runs=2)),
        ("reingest_new_process", lambda: _child("ray", corpus, workdir=work1, runs=1)),
        ("pipeline_1actor", lambda: _child("ray", corpus, workdir=tempfile.mkdtemp(prefix="lorag-bench-"), actors=1, runs=1)),
    ]
    for name, run in steps:
        t0 = time.time()
        res[name] = run()
        print(f"  {name}: {'failed' if 'error' in res[name] else 'done'} in {time.time() - t0:.0f} s", flush=True)
    print(json.dumps(res, indent=2))
    if library_fingerprint() != library:
        print(f"WARNING: lorag's sources changed during the run (from {library} to {library_fingerprint()}); rerun before quoting")
    rows = table(res)
    res["table"] = [dict(zip(("measurement", "measured", "goal", "met"), r)) for r in rows]
    print_table(("measurement", "measured", "goal", "met?"), rows)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A Markdown table on stdout, ready for docs/benchmarks.md."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
