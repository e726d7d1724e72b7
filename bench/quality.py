"""Retrieval quality on real documentation: lorag's search modes vs simple baselines (see docs/benchmarks.md).

    .venv/bin/python bench/quality.py                        # pytest 7.2.1 docs, 218 pages, 70 questions, CPU, ~8 min on 2 cores
    .venv/bin/python bench/quality.py --limit-pages 20       # smoke run: 20 pages, the questions they answer
    .venv/bin/python bench/quality.py --out /tmp/quality.json

Corpus: the HTML documentation of pytest 7.2.1 as Debian ships it (package python-pytest-doc,
Sphinx output), fetched with `apt-get download` into --cache and unpacked with `dpkg -x` (no
root, nothing installed) when it is not there yet. Every page is used except Sphinx's machinery:
genindex, search, py-modindex and 404 pages and the _static, _sources, _modules and _images
folders. Debian gzips its largest page (changelog.html.gz); it is unpacked next to itself and
used as changelog.html.

Questions: bench/quality/pytest-doc.jsonl, one {"question", "pages"} per line, written by hand the
way a user asks; "pages" are the pages that answer it, relative to the HTML root, each checked by
reading the page. lorag's fusion settings and per-page cap are swept on half of them (the dev
half, even positions) and judged on the other half (`sweep`); nothing else is tuned on them.

Methods, all in this run:
- baseline bm25: the text of each page's main content (`div[role=main]`, Sphinx's `div.body`, read
  with html.parser; permalink marks dropped, whitespace collapsed) cut into 1,000-character
  windows without overlap, ranked by `bm25s` (its default tokenizer and English stopwords).
- baseline dense: the same windows embedded with all-MiniLM-L6-v2 (`lorag.embed.Embedder`, which
  truncates each window at 256 tokens), ranked by cosine.
- baseline rrf: reciprocal rank fusion (k = 60) of the two baselines' top 100 windows.
- lorag dense / bm25 / hybrid: the pages ingested by `lorag.data.ingest` with lorag's defaults
  (200-token chunks, 32 overlapping, Milvus Lite, under a local Ray), searched with
  `lorag.retrieval.retrieve(store, embedder, kb, question, 5, mode)`.

Measured, per method, page level: recall@5, the share of questions with a chunk (or window) from
one of its gold pages among the top 5, and MRR@5, the mean of 1 / rank of the first such chunk (0
when there is none in the top 5). Also the p50 time of one search: for lorag, a `retrieve` call
from this driver (embedding the question, then the store's owner actor searching Milvus Lite);
for the baselines, embedding plus a numpy product, or a bm25s query, in this process. The first
search of each method is a warm-up and is not timed. Embedding one question is timed on its own
too (query_embed_p50_ms): it is part of every dense, rrf and hybrid time, and it is most of it
on a CPU. Also chunk and window counts and the ingest
time. torch uses every core (os.cpu_count()) for embedding, in the baselines and in lorag's
ingest (`embed_threads`).
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gzip
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "bench" / "quality" / "pytest-doc.jsonl"
PACKAGE, VERSION = "python-pytest-doc", "7.2.1-2"  # the version the questions were checked against
HTML_ROOT = Path("usr/share/doc/python-pytest-doc/html")
SKIP_DIRS = {"_static", "_sources", "_modules", "_images"}
SKIP_PAGES = {"genindex.html", "search.html", "py-modindex.html", "404.html"}
K = 5
WINDOW = 1000  # characters per baseline window, no overlap
FUSE_DEPTH = 100  # baseline RRF fuses each ranking's top 100
RRF_K = 60
KB = "pytest-doc"
LORAG_MODES = ("dense", "bm25", "hybrid")


# -- corpus ---------------------------------------------------------------------------------------


def fetch_corpus(cache: Path) -> tuple[Path, str]:
    """The HTML root of python-pytest-doc under `cache`, downloaded and unpacked if missing.

    Returns:
        (the HTML root, the .deb file name it came from).

    Raises:
        SystemExit: apt-get or dpkg is missing, or the download failed; the message says what to do.
    """
    unpacked = cache / PACKAGE
    debs = sorted(cache.glob(f"{PACKAGE}_*.deb"))
    if not (unpacked / HTML_ROOT).is_dir():
        if not debs:
            if not (shutil.which("apt-get") and shutil.which("dpkg")):
                sys.exit(f"bench/quality.py needs apt-get and dpkg to fetch the corpus ({PACKAGE}, a Debian package). On a "
                         f"machine without them, put {PACKAGE}_{VERSION}_all.deb (from packages.debian.org, bookworm) in {cache}.")
            cache.mkdir(parents=True, exist_ok=True)
            print(f"  fetching {PACKAGE} with apt-get download into {cache}", flush=True)
            for spec in (f"{PACKAGE}={VERSION}", PACKAGE):  # the labelled version first, else whatever apt has
                got = subprocess.run(["apt-get", "download", spec], cwd=cache, capture_output=True, text=True)
                if got.returncode == 0:
                    break
            else:
                sys.exit(f"apt-get download {PACKAGE} failed: {got.stderr.strip()[-500:]}\nCheck that apt has Debian sources "
                         f"(`apt-get update`) and the network, or put {PACKAGE}_{VERSION}_all.deb in {cache}.")
            debs = sorted(cache.glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(unpacked)], check=True)
    root = unpacked / HTML_ROOT
    for gz in root.rglob("*.html.gz"):  # Debian compresses big pages; a browser or a crawler sees them unpacked
        page = gz.with_suffix("")
        if not page.exists():
            page.write_bytes(gzip.decompress(gz.read_bytes()))
    deb = debs[-1].name if debs else "(unpacked copy)"
    if VERSION not in deb:
        print(f"WARNING: the questions were checked against {PACKAGE} {VERSION}, this corpus comes from {deb}", flush=True)
    return root, deb


def corpus_pages(root: Path) -> list[str]:
    """Every page of the documentation, relative to `root`, sorted; Sphinx's machinery left out."""
    pages = []
    for path in root.rglob("*.html"):
        rel = path.relative_to(root)
        if rel.name not in SKIP_PAGES and not SKIP_DIRS & set(rel.parts[:-1]):
            pages.append(rel.as_posix())
    return sorted(pages)


def load_questions(path: Path, pages: list[str]) -> list[dict]:
    """The labelled questions; every gold page must be a corpus page."""
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    known = set(pages)
    unknown = sorted({p for q in questions for p in q["pages"]} - known)
    assert not unknown, f"{path} names pages the corpus does not have: {unknown}"
    return questions


# -- baselines ------------------------------------------------------------------------------------


class MainText(HTMLParser):
    """The text of a Sphinx page's main content: the first `div` with role="main" or class "body".

    Sphinx writes well-formed nested divs, so counting div tags finds where it ends. Permalink
    marks (`a.headerlink`, a pilcrow) are dropped; every other text node is kept.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth, self.done, self.in_permalink, self.parts = 0, False, False, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and self.depth:
            self.depth += 1
        elif tag == "div" and not self.done and (a.get("role") == "main" or "body" in (a.get("class") or "").split()):
            self.depth = 1
        elif tag == "a" and "headerlink" in (a.get("class") or "").split():
            self.in_permalink = True

    def handle_endtag(self, tag):
        if tag == "div" and self.depth:
            self.depth -= 1
            self.done = self.depth == 0
        elif tag == "a":
            self.in_permalink = False

    def handle_data(self, data):
        if self.depth and not self.in_permalink:
            self.parts.append(data)


def main_text(html: str) -> str:
    parser = MainText()
    parser.feed(html)
    return re.sub(r"\s+", " ", "".join(parser.parts)).strip()


def windows(root: Path, pages: list[str]) -> tuple[list[str], list[str]]:
    """(window texts, the page of each): each page's main text in WINDOW-character pieces."""
    texts, owners = [], []
    for page in pages:
        text = main_text((root / page).read_text(encoding="utf-8", errors="replace"))
        for i in range(0, len(text), WINDOW):
            texts.append(text[i : i + WINDOW])
            owners.append(page)
    return texts, owners


def baseline_rankings(texts: list[str], owners: list[str], questions: list[dict], embedder) -> dict[str, dict]:
    """Top-K pages (one per window, duplicates kept) and search times of the three baselines, per question."""
    import bm25s

    t0 = time.time()
    bm25 = bm25s.BM25()
    bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    vecs = np.concatenate([embedder.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    print(f"  baselines: {len(texts)} windows indexed and embedded in {time.time() - t0:.0f} s", flush=True)
    depth = min(FUSE_DEPTH, len(texts))

    def lexical(q: str) -> list[int]:
        docs, scores = bm25.retrieve(bm25s.tokenize([q], stopwords="en", show_progress=False), k=depth, show_progress=False)
        return [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]  # a window without a query word is no match

    def dense(q: str) -> list[int]:
        scores = vecs @ embedder.embed([q])[0]
        top = np.argpartition(-scores, depth - 1)[:depth]
        return top[np.argsort(-scores[top])].tolist()

    def fused(q: str) -> list[int]:
        score: dict[int, float] = {}
        for ranking in (dense(q), lexical(q)):
            for rank, w in enumerate(ranking, 1):
                score[w] = score.get(w, 0.0) + 1.0 / (RRF_K + rank)
        return sorted(score, key=lambda w: -score[w])

    out = {}
    for name, search in (("baseline bm25", lexical), ("baseline dense", dense), ("baseline rrf", fused)):
        search(questions[0]["question"])  # warm-up
        ranked, times = [], []
        for q in questions:
            t0 = time.perf_counter()
            top = search(q["question"])[:K]
            times.append(time.perf_counter() - t0)
            ranked.append([{"page": owners[w], "text": texts[w][:200]} for w in top])
        out[name] = {"hits": ranked, "times": times}
    return out


# -- lorag ----------------------------------------------------------------------------------------


def lorag_rankings(root: Path, pages: list[str], questions: list[dict], embedder, workdir: Path, model_cache: Path) -> tuple[dict, dict]:
    """Ingest the pages into a fresh knowledge base and search it in each mode.

    Returns:
        (per mode: hits and search times; the ingest report as a dict).
    """
    import ray
    import yaml

    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.milvus import open_store
    from lorag.retrieval import retrieve

    config = {
        "embedder": "all-minilm-l6-v2",
        "workdir": str(workdir / "work"),
        "cache_dir": str(model_cache),
        "knowledge_bases": [{"name": KB, "sources": [str(root / p) for p in pages], "embed_threads": os.cpu_count()}],
    }
    (workdir / "lorag.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(workdir / "lorag.yaml")
    kb = cfg.knowledge_base(KB)

    # Logical CPUs: the chunker actor, the embedding actor and a read task each hold one.
    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        last = [0.0]

        def progress(written: int, done: int, total: int) -> None:
            if time.time() - last[0] > 30:
                last[0] = time.time()
                print(f"  lorag ingest: {written} chunks written, {done}/{total} documents", flush=True)

        report = ingest(cfg, KB, progress)
        print(f"  lorag ingest: {report.entities} chunks from {report.documents} pages in {report.seconds:.0f} s"
              f"{f', {len(report.failed)} failed' if report.failed else ''}", flush=True)
        store = open_store(cfg.milvus_uri(kb))
        out = {}
        # Each question's dense and full-text candidates (no fusion, no cap), for the fusion sweep.
        candidates = []
        for q in questions:
            vector = embedder.embed([q["question"]])[0].tolist()
            candidates.append({m: store.search(kb.collection, vector, q["question"], SWEEP_DEPTH, m, None, {"max_per_source": None}) for m in ("dense", "bm25")})
        for mode in LORAG_MODES:
            retrieve(store, embedder, kb, questions[0]["question"], K, mode)  # warm-up
            ranked, times = [], []
            for q in questions:
                t0 = time.perf_counter()
                hits = retrieve(store, embedder, kb, q["question"], K, mode)
                times.append(time.perf_counter() - t0)
                ranked.append([{"page": Path(h["source"]).relative_to(root).as_posix(), "section": h["section"], "text": h["text"][:200]} for h in hits])
            out[f"lorag {mode}"] = {"hits": ranked, "times": times}
        docs = store.call("documents", kb.collection)
    finally:
        ray.shutdown()
    per_page = sorted((d["count"] for d in docs.values()))
    ing = {k: getattr(report, k) for k in ("documents", "chunks_written", "entities", "seconds")}
    ing.update(failed=report.failed, chunks_per_page_median=statistics.median(per_page) if per_page else 0, chunks_per_page_max=max(per_page, default=0))
    for c in candidates:
        for hits in c.values():
            for h in hits:
                h["page"] = Path(h["source"]).relative_to(root).as_posix()
    return out, ing, candidates


# -- fusion sweep ---------------------------------------------------------------------------------

SWEEP_DEPTH = 50  # candidates per ranking kept for the sweep (a live search asks for 20 at k = 5)
SWEEP = {
    "fusion": ("rrf", "scores"),
    "dense_weight": (0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
    "lexical_floor": (0.0, 0.25, 0.5, 0.75),
    "rrf_k": (10, 30, 60, 100),
    "max_per_source": (None, 1, 2, 3),
}


def sweep(candidates: list[dict], questions: list[dict]) -> dict:
    """Hybrid's fusion settings and the per-source cap, chosen on the dev half of the questions.

    The dev half is the questions at even positions of the file, the test half the odd ones. Every
    setting of the grid `SWEEP` fuses each question's stored candidates exactly as a live search
    does (`lorag.retrieval.fuse` then `per_source`, at the live depth of 20); the best by dev MRR@5
    (then recall@5, then the grid's order) is reported on both halves, beside lorag's current
    defaults. The cap is also swept for dense and bm25 alone.
    """
    import itertools

    from lorag.retrieval import DENSE_WEIGHT, FUSION, LEXICAL_FLOOR, MAX_PER_SOURCE, RRF_K, fuse, per_source

    dev = [i for i in range(len(questions)) if i % 2 == 0]
    test = [i for i in range(len(questions)) if i % 2 == 1]
    depth = max(4 * K, 20)

    def ranked(setting: dict, mode: str) -> list[list[dict]]:
        out = []
        for c in candidates:
            if mode == "hybrid":
                hits = fuse(c["dense"][:depth], c["bm25"][:depth], depth, setting["dense_weight"], setting["lexical_floor"], setting["rrf_k"], setting["fusion"])
            else:
                hits = c[mode][: 4 * K if setting["max_per_source"] else K]
            out.append(per_source(hits, K, setting["max_per_source"]))
        return out

    def on(idx: list[int], hits: list[list[dict]]) -> dict:
        m = score([hits[i] for i in idx], [questions[i] for i in idx])
        return {"recall": m["recall"], "mrr": m["mrr"]}

    current = {"fusion": FUSION, "dense_weight": DENSE_WEIGHT, "lexical_floor": LEXICAL_FLOOR, "rrf_k": RRF_K, "max_per_source": MAX_PER_SOURCE}
    result = {"dev": len(dev), "test": len(test), "current": current, "modes": {}}
    for mode in LORAG_MODES:
        keys = list(SWEEP) if mode == "hybrid" else ["max_per_source"]
        grid = [dict(zip(keys, values)) for values in itertools.product(*(SWEEP[k] for k in keys))]
        rows = []
        for setting in grid:
            hits = ranked({**current, **setting}, mode)
            rows.append({"setting": setting, "dev": on(dev, hits), "test": on(test, hits), "all": on(list(range(len(questions))), hits)})
        best = max(rows, key=lambda r: (r["dev"]["mrr"], r["dev"]["recall"], -rows.index(r)))
        now = ranked(current, mode)
        # the cap alone, every other setting as lorag has it
        caps = {str(cap): next(r for r in rows if r["setting"]["max_per_source"] == cap and all(r["setting"][k] == current[k] for k in keys if k != "max_per_source"))
                for cap in SWEEP["max_per_source"]} if mode != "hybrid" or all(current[k] in SWEEP[k] for k in keys) else {}
        result["modes"][mode] = {
            "best": best,
            "current": {"dev": on(dev, now), "test": on(test, now), "all": on(list(range(len(questions))), now)},
            "caps": caps,
            "grid": len(grid),
            "rows": rows,
        }
    return result


# -- metrics and report ---------------------------------------------------------------------------


def score(ranked: list[list[dict]], questions: list[dict]) -> dict:
    """Page-level recall@K (a gold page among the top K) and MRR@K, and the rank of the first gold hit per question."""
    firsts = []
    for hits, q in zip(ranked, questions):
        gold = set(q["pages"])
        firsts.append(next((i for i, h in enumerate(hits[:K], 1) if h["page"] in gold), None))
    n = len(questions)
    return {"recall": sum(r is not None for r in firsts) / n, "mrr": sum(1 / r for r in firsts if r) / n, "first_gold_rank": firsts}


def table(res: dict) -> list[tuple[str, ...]]:
    rows = []
    for name, m in res["methods"].items():
        units = f"{res['lorag_ingest']['entities']} chunks" if name.startswith("lorag") else f"{res['windows']} windows"
        rows.append((name, f"{m['recall']:.3f}", f"{m['mrr']:.3f}", f"{m['p50_ms']:.1f}", units))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=Path, default=QUESTIONS, help="the labelled questions (JSONL of {question, pages})")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lorag" / "bench", help="where the .deb is downloaded and unpacked")
    ap.add_argument("--limit-pages", type=int, default=None,
                    help="a smoke run: only this many pages (the questions' gold pages first, in file order, then the rest) and the questions they answer")
    ap.add_argument("--out", help="also write the results (with every question's top-5 hits) as JSON here")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep lorag's knowledge base here between runs (ingest is incremental: a rerun with unchanged chunking re-indexes nothing); default: a temporary dir")
    args = ap.parse_args()

    import torch

    from lorag.embed import Embedder
    from lorag.models import resolve_model

    start, load = time.time(), os.getloadavg()[0]  # the machine's load average before and after: other work slows searches
    model_cache = Path(os.environ.get("LORAG_CACHE", Path.home() / ".cache" / "lorag"))
    root, deb = fetch_corpus(args.cache)
    pages = corpus_pages(root)
    questions = load_questions(args.questions, pages)
    if args.limit_pages:
        gold = list(dict.fromkeys(p for q in questions for p in q["pages"]))
        pages = sorted((gold + [p for p in pages if p not in gold])[: args.limit_pages])
        kept = set(pages)
        questions = [{**q, "pages": [p for p in q["pages"] if p in kept]} for q in questions if kept & set(q["pages"])]
    print(f"bench/quality.py: {len(pages)} pages of {deb} ({root}), {len(questions)} questions from {args.questions}, "
          f"CPU ({os.cpu_count()} cores), commit {_commit()}", flush=True)

    torch.set_num_threads(os.cpu_count())
    embedder = Embedder(resolve_model("all-minilm-l6-v2", model_cache))
    texts, owners = windows(root, pages)
    rankings = baseline_rankings(texts, owners, questions, embedder)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorag-bench-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    lorag, ingest_report, candidates = lorag_rankings(root, pages, questions, embedder, workdir, model_cache)
    rankings.update(lorag)
    tuned = sweep(candidates, questions)

    res = {
        "corpus": deb, "pages": len(pages), "questions": len(questions), "windows": len(texts), "lorag_ingest": ingest_report,
        "commit": _commit(), "uncommitted_lorag_files": _dirty(), "cpus": os.cpu_count(), "load_1min": [load, os.getloadavg()[0]],
        "query_embed_p50_ms": 1000 * statistics.median(_embed_times(embedder, questions)), "methods": {}, "sweep": tuned,
    }
    for name, r in rankings.items():
        res["methods"][name] = {**score(r["hits"], questions), "p50_ms": 1000 * statistics.median(r["times"])}
    res["seconds"] = time.time() - start
    rows = table(res)
    print_table(("method", "recall@5", "MRR@5", "search p50 (ms)", "indexed"), rows)
    print(f"\nsweep: settings chosen on the dev half ({tuned['dev']} questions), scored on the test half ({tuned['test']}); current = lorag's defaults")
    sweep_rows = []
    for mode, r in tuned["modes"].items():
        for label, m in (("current " + json.dumps(tuned["current"] if mode == "hybrid" else {"max_per_source": tuned["current"]["max_per_source"]}), r["current"]),
                         (f"best of {r['grid']}: " + json.dumps(r["best"]["setting"]), r["best"])):
            sweep_rows.append((f"lorag {mode}", label, *(f"{m[h]['recall']:.3f} / {m[h]['mrr']:.3f}" for h in ("dev", "test", "all"))))
        for cap, m in r["caps"].items():
            sweep_rows.append((f"lorag {mode}", f"current, max_per_source {cap}", *(f"{m[h]['recall']:.3f} / {m[h]['mrr']:.3f}" for h in ("dev", "test", "all"))))
    print_table(("method", "setting", "dev recall / MRR", "test recall / MRR", "all recall / MRR"), sweep_rows)
    print(f"query embedding p50 {res['query_embed_p50_ms']:.1f} ms (in every time but bm25's); lorag ingest {ingest_report['seconds']:.0f} s; "
          f"whole run {res['seconds']:.0f} s; load average {load:.1f} before, {res['load_1min'][1]:.1f} after", flush=True)
    if res["uncommitted_lorag_files"]:
        print(f"WARNING: lorag's sources differ from commit {res['commit']}: {', '.join(res['uncommitted_lorag_files'])}", flush=True)
    if args.out:
        res["per_question"] = [
            {"question": q["question"], "pages": q["pages"], **{name: r["hits"][i] for name, r in rankings.items()}} for i, q in enumerate(questions)
        ]
        Path(args.out).write_text(json.dumps(res, indent=2))
    else:
        print(json.dumps({k: v for k, v in res.items()}, indent=2))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def _embed_times(embedder, questions: list[dict]) -> list[float]:
    """Seconds to embed each question alone: the share of a dense or hybrid search spent before the index is asked."""
    times = []
    for q in questions:
        t0 = time.perf_counter()
        embedder.embed([q["question"]])
        times.append(time.perf_counter() - t0)
    return times


def _dirty() -> list[str]:
    """lorag's library files that differ from HEAD (the numbers then belong to the working tree, not the commit)."""
    out = subprocess.run(["git", "status", "--porcelain", "platform/lorag"], cwd=REPO, capture_output=True, text=True)
    return [line[3:] for line in out.stdout.splitlines()]


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A Markdown table on stdout, ready for docs/benchmarks.md."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
