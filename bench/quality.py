"""Retrieval quality on real documentation, held out: lorag's search modes vs simple baselines on
several documentation sets (see docs/benchmarks.md, "Retrieval quality").

    .venv/bin/python bench/quality.py --out /tmp/quality.json          # every corpus, ~40 min on 2 cores
    .venv/bin/python bench/quality.py --corpus git-doc                 # one corpus
    .venv/bin/python bench/quality.py --limit-pages 20                 # smoke run: 20 pages per corpus
    .venv/bin/python bench/quality.py --workdir /tmp/qwork             # keep the knowledge bases between runs

Corpora (`CORPORA`): real documentation as Debian ships it, fetched with `apt-get download` into
--cache and unpacked with `dpkg -x` (no root, nothing installed) when it is not there yet; pages
Debian gzips are unpacked next to themselves. Each has its own hand-written questions,
bench/quality/<corpus>.jsonl, one {"question", "pages"} per line, "pages" being every page that
answers it (relative to the corpus root, each checked by reading the page):
- pytest-doc, the tuning corpus: pytest 7.2.1's Sphinx HTML (218 pages, 70 questions). lorag's
  numeric ranking settings (fusion weights, BM25 b, the per-page cap) were chosen on it, on the
  dev half of its questions (`sweep`, run on this corpus only).
- django-doc, held out: Django 3.2's HTML docs (a large Sphinx set with Django's own theme; the
  release notes left out), 260 pages, 60 questions.
- git-doc, held out: Git's HTML documentation (asciidoc man pages, guides, howtos and technical
  notes, and the DocBook user manual: not Sphinx), 239 pages, 60 questions.
- docker-doc, held out: Docker's Markdown reference (the CLI, Dockerfile and run references), 164
  pages, 60 questions.
The Python language's own documentation is not among them: it is kept aside as an independent check.

Methods, all in one run, per corpus:
- baseline bm25: the text of each page's main content (HTML: the corpus's content element, read
  with html.parser, permalink marks dropped; Markdown: the file as it is), whitespace collapsed,
  cut into 1,000-character windows without overlap, ranked by `bm25s` (its default tokenizer and
  English stopwords).
- baseline dense: the same windows embedded with all-MiniLM-L6-v2 (`lorag.embed.Embedder`, which
  truncates each window at 256 tokens), ranked by cosine.
- baseline rrf: reciprocal rank fusion (k = 60) of the two baselines' top 100 windows.
- lorag dense / bm25 / hybrid: the pages ingested by `lorag.data.ingest` with lorag's defaults
  (200-token chunks, 32 overlapping, Milvus Lite, under a local Ray of the machine's cores, as
  `lorag kb ingest` runs), searched with `lorag.retrieval.search(store, kb, question, embedder, 5, mode)`.

Measured, per method, page level: recall@5, the share of questions with a chunk (or window) from
one of its gold pages among the top 5, and MRR@5, the mean of 1 / rank of the first such chunk (0
when there is none in the top 5); the p50 time of one search (the first search of each method is
a warm-up); chunk and window counts and the ingest time. The goal on every held-out corpus:
lorag hybrid >= baseline rrf, lorag dense >= baseline dense and lorag bm25 >= baseline bm25, on
recall@5 and on MRR@5. The baselines' window vectors are cached in --cache (keyed by their text).
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gzip
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "bench" / "quality"
K = 5
WINDOW = 1000  # characters per baseline window, no overlap
FUSE_DEPTH = 100  # baseline RRF fuses each ranking's top 100
RRF_K = 60
LORAG_MODES = ("dense", "bm25", "hybrid")
BASELINE_OF = {"dense": "baseline dense", "bm25": "baseline bm25", "hybrid": "baseline rrf"}


@dataclass(frozen=True)
class Corpus:
    """A documentation set from a Debian package, and which of its files are pages."""

    name: str
    package: str
    version: str  # the version the questions were checked against
    root: str  # the pages' root inside the package
    suffix: str  # ".html" or ".md"
    main: tuple[tuple[str, str, str], ...]  # HTML: where a page's main content is (tag, attribute, value; the first that holds text); Markdown: ()
    role: str  # "tuning" or "held-out"
    skip_dirs: frozenset = field(default_factory=frozenset)  # folders (any depth) that hold no pages
    skip_pages: frozenset = field(default_factory=frozenset)  # pages that are not pages, relative to the root


SPHINX_MACHINERY = dict(skip_dirs=frozenset({"_static", "_sources", "_modules", "_images"}),
                        skip_pages=frozenset({"genindex.html", "search.html", "py-modindex.html", "404.html"}))
CORPORA = {
    c.name: c
    for c in (
        Corpus("pytest-doc", "python-pytest-doc", "7.2.1-2", "usr/share/doc/python-pytest-doc/html", ".html", (("div", "role", "main"),), "tuning",
               **SPHINX_MACHINERY),
        Corpus("django-doc", "python-django-doc", "3:3.2.25-0+deb12u3", "usr/share/doc/python-django-doc/html", ".html", (("div", "class", "yui-g"),),
               "held-out", skip_dirs=SPHINX_MACHINERY["skip_dirs"] | {"releases"}, skip_pages=SPHINX_MACHINERY["skip_pages"]),
        # index.html is a link to git.html; the other two only say where their page moved. The user manual is DocBook, not asciidoc.
        Corpus("git-doc", "git-doc", "1:2.39.5-0+deb12u3", "usr/share/doc/git-doc", ".html", (("div", "id", "content"), ("div", "class", "book")), "held-out",
               skip_pages=frozenset({"index.html", "everyday.html", "git-remote-helpers.html"})),
        # The seven old Engine API references are near copies of each other.
        Corpus("docker-doc", "docker-doc", "20.10.24+dfsg1-1+deb12u1", "usr/share/doc/docker-doc", ".md", (), "held-out",
               skip_pages=frozenset(f"api/v1.{n}.md" for n in range(18, 25))),
    )
}


# -- corpus ---------------------------------------------------------------------------------------


def fetch_corpus(c: Corpus, cache: Path) -> tuple[Path, str]:
    """The page root of corpus `c` under `cache`, downloaded and unpacked if missing.

    Returns:
        (the page root, the .deb file name it came from).

    Raises:
        SystemExit: apt-get or dpkg is missing, or the download failed; the message says what to do.
    """
    unpacked = cache / c.package
    debs = sorted(cache.glob(f"{c.package}_*.deb"))
    if not (unpacked / c.root).is_dir():
        if not debs:
            if not (shutil.which("apt-get") and shutil.which("dpkg")):
                sys.exit(f"bench/quality.py needs apt-get and dpkg to fetch the corpus ({c.package}, a Debian package). On a "
                         f"machine without them, put {c.package}_{c.version}_all.deb (from packages.debian.org, bookworm) in {cache}.")
            cache.mkdir(parents=True, exist_ok=True)
            print(f"  fetching {c.package} with apt-get download into {cache}", flush=True)
            for spec in (f"{c.package}={c.version}", c.package):  # the labelled version first, else whatever apt has
                got = subprocess.run(["apt-get", "download", spec], cwd=cache, capture_output=True, text=True)
                if got.returncode == 0:
                    break
            else:
                sys.exit(f"apt-get download {c.package} failed: {got.stderr.strip()[-500:]}\nCheck that apt has Debian sources "
                         f"(`apt-get update`) and the network, or put {c.package}_{c.version}_all.deb in {cache}.")
            debs = sorted(cache.glob(f"{c.package}_*.deb"))
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(unpacked)], check=True)
    root = unpacked / c.root
    for gz in root.rglob(f"*{c.suffix}.gz"):  # Debian compresses big pages; a browser or a crawler sees them unpacked
        page = gz.with_suffix("")
        if not page.exists():
            page.write_bytes(gzip.decompress(gz.read_bytes()))
    deb = debs[-1].name if debs else "(unpacked copy)"
    if c.version.split(":")[-1] not in deb:
        print(f"WARNING: the questions were checked against {c.package} {c.version}, this corpus comes from {deb}", flush=True)
    return root, deb


def corpus_pages(c: Corpus, root: Path) -> list[str]:
    """Every page of the corpus, relative to `root`, sorted."""
    pages = []
    for path in root.rglob(f"*{c.suffix}"):
        rel = path.relative_to(root)
        if not (c.skip_dirs & set(rel.parts[:-1])) and rel.as_posix() not in c.skip_pages:
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
    """The text of a page's main content: the first element matching `main` (tag, attribute,
    value; a "class" value matches one of the element's classes).

    The pages are generated HTML with well-formed nesting, so counting the matched element's tag
    finds where it ends. Permalink marks (`a.headerlink`, a pilcrow) are dropped; every other text
    node is kept.
    """

    def __init__(self, main: tuple[str, str, str]):
        super().__init__(convert_charrefs=True)
        self.main, self.depth, self.done, self.in_permalink, self.parts = main, 0, False, False, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        want, attr, value = self.main
        if tag == want and self.depth:
            self.depth += 1
        elif tag == want and not self.done and (value in (a.get(attr) or "").split() if attr == "class" else a.get(attr) == value):
            self.depth = 1
        elif tag == "a" and "headerlink" in (a.get("class") or "").split():
            self.in_permalink = True

    def handle_endtag(self, tag):
        if tag == self.main[0] and self.depth:
            self.depth -= 1
            self.done = self.depth == 0
        elif tag == "a":
            self.in_permalink = False

    def handle_data(self, data):
        if self.depth and not self.in_permalink:
            self.parts.append(data)


def main_text(c: Corpus, raw: str) -> str:
    """A page's main text for the baselines, whitespace collapsed (Markdown: the file as it is)."""
    if not c.main:
        return re.sub(r"\s+", " ", raw).strip()
    for selector in c.main:
        parser = MainText(selector)
        parser.feed(raw)
        if text := re.sub(r"\s+", " ", "".join(parser.parts)).strip():
            return text
    return ""


def windows(c: Corpus, root: Path, pages: list[str]) -> tuple[list[str], list[str]]:
    """(window texts, the page of each): each page's main text in WINDOW-character pieces."""
    texts, owners = [], []
    for page in pages:
        text = main_text(c, (root / page).read_text(encoding="utf-8", errors="replace"))
        for i in range(0, len(text), WINDOW):
            texts.append(text[i : i + WINDOW])
            owners.append(page)
    return texts, owners


def window_vectors(texts: list[str], embedder, cache: Path) -> np.ndarray:
    """The windows' embeddings, from `cache` when these exact texts were embedded before."""
    key = hashlib.sha256("\x00".join(["all-minilm-l6-v2", *texts]).encode()).hexdigest()[:20]
    path = cache / "vectors" / f"{key}.npy"
    if path.exists():
        return np.load(path)
    vecs = np.concatenate([embedder.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)]) if texts else np.zeros((0, 384), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    return vecs


def baseline_rankings(texts: list[str], owners: list[str], questions: list[dict], embedder, cache: Path) -> dict[str, dict]:
    """Top-K pages (one per window, duplicates kept) and search times of the three baselines, per question."""
    import bm25s

    t0 = time.time()
    bm25 = bm25s.BM25()
    bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    vecs = window_vectors(texts, embedder, cache)
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


def lorag_rankings(c: Corpus, root: Path, pages: list[str], questions: list[dict], embedder, workdir: Path, model_cache: Path,
                   sweep_candidates: bool) -> tuple[dict, dict, list]:
    """Ingest the pages into a knowledge base (incremental: unchanged pages of an earlier run in
    `workdir` are skipped) and search it in each mode; Ray must be running.

    Returns:
        (per mode: hits and search times; the ingest report as a dict; each question's dense and
        full-text candidates, SWEEP_DEPTH of each, when `sweep_candidates`).
    """
    import yaml

    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.handle import open_store
    from lorag.retrieval import search

    config = {
        "embedder": "all-minilm-l6-v2",
        "workdir": str(workdir / "work"),
        "cache_dir": str(model_cache),
        "knowledge_bases": [{"name": c.name, "sources": [str(root / p) for p in pages]}],
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "lorag.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(workdir / "lorag.yaml")
    kb = cfg.knowledge_base(c.name)
    last = [time.time()]

    def progress(written: int, done: int, total: int) -> None:
        if time.time() - last[0] > 30:
            last[0] = time.time()
            print(f"  lorag ingest: {written} chunks written, {done}/{total} documents", flush=True)

    report = ingest(cfg, c.name, progress)
    print(f"  lorag ingest: {report.entities} chunks from {report.documents} pages in {report.seconds:.0f} s ({report.skipped} unchanged)"
          f"{f', {len(report.failed)} failed' if report.failed else ''}", flush=True)
    store = open_store(cfg.milvus_uri(kb))
    store.candidates(kb.collection, None, "warm up", 1)  # a reopened Milvus Lite file: lorag's BM25 index builds in the background
    while not store.full_text_ready(kb.collection):  # until then Milvus Lite's own BM25 (b = 0.75) would answer
        time.sleep(0.5)

    def page(h: dict) -> str:
        return Path(h["source"]).relative_to(root).as_posix()

    out = {}
    candidates = []  # each question's dense and full-text candidates (no fusion, no cap), for the fusion sweep
    if sweep_candidates:
        for q in questions:
            vector = embedder.embed([q["question"]])[0].tolist()
            dense, lexical = store.candidates(kb.collection, vector, q["question"], SWEEP_DEPTH)
            candidates.append({m: [{**h, "page": page(h)} for h in hits] for m, hits in (("dense", dense), ("bm25", lexical))})
    for mode in LORAG_MODES:
        search(store, kb, questions[0]["question"], embedder, K, mode)  # warm-up
        ranked, times = [], []
        for q in questions:
            t0 = time.perf_counter()
            hits = search(store, kb, q["question"], embedder, K, mode)
            times.append(time.perf_counter() - t0)
            ranked.append([{"page": page(h), "section": h["section"], "text": h["text"][:200]} for h in hits])
        out[f"lorag {mode}"] = {"hits": ranked, "times": times}
    docs = store.documents(kb.collection)
    per_page = sorted((d["count"] for d in docs.values()))
    ing = {k: getattr(report, k) for k in ("documents", "skipped", "chunks_written", "entities", "seconds")}
    ing.update(failed=report.failed, chunks_per_page_median=statistics.median(per_page) if per_page else 0, chunks_per_page_max=max(per_page, default=0))
    return out, ing, candidates


# -- fusion sweep ---------------------------------------------------------------------------------

SWEEP_DEPTH = 50  # candidates per ranking kept for the sweep (lorag.retrieval.SEARCH_DEPTH: what a live search at k = 5 asks for)
SWEEP = {
    "fusion": ("rrf", "scores"),
    "dense_weight": (0.5, 1.0, 1.5, 2.0),
    "lexical_floor": (0.0, 0.5, 0.75),
    "rrf_k": (10, 30, 60),
    "max_per_source": (None, 1, 2),
    "source_weight": (0.0, 0.1, 0.2, 0.3, 0.5),
}
HYBRID_ONLY = ("fusion", "dense_weight", "lexical_floor", "rrf_k")


def sweep(candidates: list[dict], questions: list[dict]) -> dict:
    """lorag's ranking settings, chosen on the dev half of the tuning corpus's questions.

    The dev half is the questions at even positions of the file, the test half the odd ones. Every
    setting of the grid `SWEEP` ranks each question's stored candidates exactly as a live search
    does (`lorag.retrieval.rank`); the best by dev MRR@5 (then recall@5, then the grid's order) is
    reported on both halves, beside lorag's current defaults. Dense and bm25 sweep the settings
    that apply to them (the per-source cap and weight).
    """
    import itertools

    from lorag.retrieval import rank
    from lorag.sections import HybridConfig, KnowledgeBaseConfig

    dev = [i for i in range(len(questions)) if i % 2 == 0]
    test = [i for i in range(len(questions)) if i % 2 == 1]

    def ranked(setting: dict, mode: str) -> list[list[dict]]:
        kb = KnowledgeBaseConfig(name="sweep", sources=["-"], hybrid=HybridConfig(**{k: setting[k] for k in HYBRID_ONLY}),
                                 max_per_source=setting["max_per_source"], source_weight=setting["source_weight"])
        return [rank(c["dense"], c["bm25"], K, mode, kb) if setting["max_per_source"] or mode == "hybrid"
                else c[mode][:K] for c in candidates]

    def on(idx: list[int], hits: list[list[dict]]) -> dict:
        m = score([hits[i] for i in idx], [questions[i] for i in idx])
        return {"recall": m["recall"], "mrr": m["mrr"]}

    defaults = KnowledgeBaseConfig(name="sweep", sources=["-"])
    current = {**defaults.hybrid.model_dump(), "max_per_source": defaults.max_per_source, "source_weight": defaults.source_weight}
    result = {"dev": len(dev), "test": len(test), "current": current, "modes": {}}
    for mode in LORAG_MODES:
        keys = [k for k in SWEEP if mode == "hybrid" or k not in HYBRID_ONLY]
        grid = [dict(zip(keys, values)) for values in itertools.product(*(SWEEP[k] for k in keys))]
        rows = []
        for setting in grid:
            hits = ranked({**current, **setting}, mode)
            rows.append({"setting": setting, "dev": on(dev, hits), "test": on(test, hits), "all": on(list(range(len(questions))), hits)})
        best = max(rows, key=lambda r: (r["dev"]["mrr"], r["dev"]["recall"], -rows.index(r)))
        now = ranked(current, mode)
        result["modes"][mode] = {
            "best": best,
            "current": {"dev": on(dev, now), "test": on(test, now), "all": on(list(range(len(questions))), now)},
            "grid": len(grid),
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


def goals(results: dict) -> list[tuple[str, ...]]:
    """Per corpus and lorag mode: lorag against its baseline, recall@5 and MRR@5, met when neither is lower."""
    rows = []
    for name, res in results.items():
        for mode in LORAG_MODES:
            mine, base = res["methods"][f"lorag {mode}"], res["methods"][BASELINE_OF[mode]]
            met = mine["recall"] >= base["recall"] and mine["mrr"] >= base["mrr"]
            rows.append((f"{name} ({res['role']})", f"lorag {mode} vs {BASELINE_OF[mode]}", f"{mine['recall']:.3f} / {mine['mrr']:.3f}",
                         f"{base['recall']:.3f} / {base['mrr']:.3f}", "met" if met else "missed"))
    return rows


def print_sweep(tuned: dict) -> None:
    print(f"\nsweep: settings chosen on the dev half ({tuned['dev']} questions), scored on the test half ({tuned['test']}); current = lorag's defaults")
    sweep_rows = []
    for mode, r in tuned["modes"].items():
        mine = {k: v for k, v in tuned["current"].items() if mode == "hybrid" or k not in HYBRID_ONLY}
        for label, m in (("current " + json.dumps(mine), r["current"]),
                         (f"best of {r['grid']}: " + json.dumps(r["best"]["setting"]), r["best"])):
            sweep_rows.append((f"lorag {mode}", label, *(f"{m[h]['recall']:.3f} / {m[h]['mrr']:.3f}" for h in ("dev", "test", "all"))))
    print_table(("method", "setting", "dev recall / MRR", "test recall / MRR", "all recall / MRR"), sweep_rows)


def run_corpus(c: Corpus, args, embedder, model_cache: Path, workdir: Path) -> tuple[dict, dict]:
    """Every method on one corpus: (its results, its rankings per method)."""
    root, deb = fetch_corpus(c, args.cache)
    pages = corpus_pages(c, root)
    questions = load_questions(QUESTIONS / f"{c.name}.jsonl", pages)
    if args.limit_pages:
        gold = list(dict.fromkeys(p for q in questions for p in q["pages"]))
        pages = sorted((gold + [p for p in pages if p not in gold])[: args.limit_pages])
        kept = set(pages)
        questions = [{**q, "pages": [p for p in q["pages"] if p in kept]} for q in questions if kept & set(q["pages"])]
    print(f"\n{c.name} ({c.role}): {len(pages)} pages of {deb} ({root}), {len(questions)} questions", flush=True)
    texts, owners = windows(c, root, pages)
    rankings = baseline_rankings(texts, owners, questions, embedder, args.cache)
    lorag, ingest_report, candidates = lorag_rankings(c, root, pages, questions, embedder, workdir / c.name, model_cache, True)
    rankings.update(lorag)
    res = {"corpus": deb, "role": c.role, "pages": len(pages), "questions": len(questions), "windows": len(texts),
           "main_text_chars": sum(len(t) for t in texts), "lorag_ingest": ingest_report, "methods": {}}
    for name, r in rankings.items():
        res["methods"][name] = {**score(r["hits"], questions), "p50_ms": 1000 * statistics.median(r["times"])}
    print_table(("method", "recall@5", "MRR@5", "search p50 (ms)", "indexed"), table(res))
    if c.role == "tuning":
        res["sweep"] = sweep(candidates, questions)
        print_sweep(res["sweep"])
    # every question's dense and full-text candidates, for studies of fusion and page ranking off line
    res["candidates"] = [{m: [{"id": h["id"], "page": h["page"], "score": h["score"], "chunk_index": h["chunk_index"]} for h in hits]
                          for m, hits in cand.items()} for cand in candidates]
    res["per_question"] = [{"question": q["question"], "pages": q["pages"], **{name: r["hits"][i] for name, r in rankings.items()}}
                           for i, q in enumerate(questions)]
    return res, rankings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", action="append", choices=list(CORPORA), help="run only this corpus (repeatable; default: every one)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lorag" / "bench", help="where the .debs are downloaded and unpacked, and window vectors cached")
    ap.add_argument("--limit-pages", type=int, default=None,
                    help="a smoke run: only this many pages per corpus (the questions' gold pages first, in file order, then the rest) and the questions they answer")
    ap.add_argument("--out", help="also write the results (with every question's top-5 hits) as JSON here")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep lorag's knowledge bases here between runs (ingest is incremental: a rerun with unchanged chunking re-indexes nothing); default: a temporary dir")
    args = ap.parse_args()

    import ray
    import torch

    from lorag.embed import Embedder
    from lorag.models import resolve_model

    start, load = time.time(), os.getloadavg()[0]  # the machine's load average before and after: other work slows searches
    model_cache = Path(os.environ.get("LORAG_CACHE", Path.home() / ".cache" / "lorag"))
    print(f"bench/quality.py: corpora {', '.join(args.corpus or CORPORA)}, CPU ({os.cpu_count()} cores), commit {_commit()}", flush=True)
    torch.set_num_threads(os.cpu_count())
    embedder = Embedder(resolve_model("all-minilm-l6-v2", model_cache))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorag-bench-quality-"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)  # as `lorag kb ingest`
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    try:
        for name in args.corpus or CORPORA:
            results[name], _ = run_corpus(CORPORA[name], args, embedder, model_cache, workdir)
    finally:
        ray.shutdown()
    print("\nEvery corpus, every method (recall@5 / MRR@5):")
    methods = list(next(iter(results.values()))["methods"])
    print_table(("corpus", "pages", "questions", *methods),
                [(f"{n} ({r['role']})", str(r["pages"]), str(r["questions"]), *(f"{r['methods'][m]['recall']:.3f} / {r['methods'][m]['mrr']:.3f}" for m in methods))
                 for n, r in results.items()])
    print("\nGoals (recall@5 / MRR@5; met when lorag is not lower on either):")
    print_table(("corpus", "comparison", "lorag", "baseline", "met?"), goals(results))
    out = {"commit": _commit(), "uncommitted_lorag_files": _dirty(), "cpus": os.cpu_count(), "load_1min": [load, os.getloadavg()[0]],
           "query_embed_p50_ms": 1000 * statistics.median(_embed_times(embedder, [{"question": "how do I run one test only?"}] * 20)),
           "seconds": time.time() - start, "corpora": results}
    print(f"query embedding p50 {out['query_embed_p50_ms']:.1f} ms (in every time but bm25's); whole run {out['seconds']:.0f} s; "
          f"load average {load:.1f} before, {out['load_1min'][1]:.1f} after; ingest " +
          ", ".join(f"{n} {r['lorag_ingest']['entities']} chunks in {r['lorag_ingest']['seconds']:.0f} s" for n, r in results.items()), flush=True)
    if out["uncommitted_lorag_files"]:
        print(f"WARNING: lorag's sources differ from commit {out['commit']}: {', '.join(out['uncommitted_lorag_files'])}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
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
