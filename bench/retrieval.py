"""Knowledge-base search benchmarks at 100k chunks, Milvus Lite and a Milvus server (see docs/benchmarks.md).

    .venv/bin/python bench/retrieval.py                             # 100k chunks, 200 queries, CPU
    .venv/bin/python bench/retrieval.py --chunks 20000 --queries 50 --out /tmp/retrieval.json

4. Search latency, p50 and p99 of `lorag.retrieval.search` from an embedded query (top 10), for dense, bm25 and hybrid, on
   Milvus Lite and on a Milvus 2.3 standalone server (`lorag.standalone.local_server`).
                                                                              goal p99 < 20 ms
   Recall@10 of dense search against exact brute force (numpy inner products over every
   normalised vector).                                                        goal >= 0.95

Each store is filled as `lorag.data.ingest` fills it (`MilvusStore.upsert` in batches, then
`MilvusStore.settle`) and measured in the states lorag leaves it in:
- "after ingest": in the process that wrote the rows, right after `settle`. For Milvus Lite that
  is the process holding the file, which under Ray is the store's owner actor, so Serve replicas
  search it in this state.
- Lite "reopened": a new process opens the file after the writer closed it cleanly, as a
  restarted `lorag serve` would.
- server "indexed": once the server reports every row indexed (it indexes sealed segments in the
  background after `settle`).
A mode's searches stop after --budget seconds (at least 5 queries), so slow states finish.

The vectors are partly synthetic. The real part: every chunk of the standard library's docstrings
(`stdlib_corpus` in bench/ingest.py, lorag's default 200-token chunks), up to --real of them,
embedded with all-MiniLM-L6-v2. Embedding 100k chunks on 2 CPU cores would take hours, so the rest
are perturbations of real vectors (Gaussian noise scaled so each lands at cosine 0.70-0.95 from its
source, then normalised) that reuse their source chunk's text and fields under a new id; BM25
thus sees each real text many times over. Queries are real: "name: first sentence" of sampled
stdlib docstrings, embedded with the same model (torch.set_num_threads(os.cpu_count())).

Each mode's first query is timed separately (first_query_ms) and left out of the percentiles: on
a Milvus 2.3 server (no BM25 function) it is where lorag builds its in-process BM25 index from
every stored text. Rows are written in batches of 1000; searches are sequential. Each backend runs in its own process (a Lite file admits one process at a time).
"""

import os

# The index as it is: no per-document cap (a knowledge base's default `max_per_source: 1` reorders
# hits by source, and the synthetic rows share their source chunk's, so recall against exact
# search would measure the cap, not the index). The cap's own cost is fetching 4x k candidates.
RAW = {"max_per_source": None}  # the knowledge-base settings `ranked` searches with

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ingest import chunk_corpus, library_fingerprint, print_table, stdlib_corpus, stdlib_docs  # bench/ is on sys.path when run as a script, like bench/train.py

COLLECTION = "stdlib"
K = 10
MODES = ("dense", "bm25", "hybrid")
INSERT_BATCH = 1000
ROW_KEYS = ("id", "text", "source", "title", "section", "chunk_index", "start", "end", "doc_hash", "n_chunks")


# -- data: real chunks, synthetic neighbours, queries, ground truth ---------------------------------


def real_vectors(rows: list[dict], limit: int) -> tuple[list[dict], np.ndarray]:
    """A seeded sample of `limit` real chunks and their embeddings (cached in the temp dir by content)."""
    import torch

    from lorag.embed import Embedder

    if len(rows) > limit:
        rows = [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), limit))]
    rows = [{k: r[k] for k in ROW_KEYS} for r in rows]
    texts = [r["text"] for r in rows]
    key = hashlib.sha256("\0".join(["all-minilm-l6-v2", *texts]).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"lorag-bench-vectors-{key}.npy"
    if cache.is_file():
        return rows, np.load(cache)
    torch.set_num_threads(os.cpu_count())
    emb = Embedder(_embedder_path())
    t0 = time.time()
    vecs = np.concatenate([emb.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    print(f"  embedded {len(texts)} real chunks in {time.time() - t0:.0f} s (cached in {cache})", flush=True)
    np.save(cache, vecs)
    return rows, vecs


def synthesize(vecs: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grow `vecs` to `n` rows: each new one is a real vector plus Gaussian noise, at cosine 0.70-0.95 from it.

    For a unit vector v and noise e ~ N(0, s^2 I_d), cos(v, v + e) is about 1 / sqrt(1 + s^2 d), so
    s = sqrt((1 / c^2 - 1) / d) puts the copy at cosine c.

    Returns:
        (all n vectors, unit length; the real row each synthetic one copies).
    """
    rng = np.random.default_rng(seed)
    real, d = vecs.shape
    src = rng.integers(0, real, n - real)
    cos = rng.uniform(0.70, 0.95, n - real).astype(np.float32)
    scale = np.sqrt((1 / cos**2 - 1) / d)[:, None]
    extra = vecs[src] + rng.standard_normal((n - real, d), dtype=np.float32) * scale
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    return np.concatenate([vecs, extra]).astype(np.float32), src


def all_rows(real: list[dict], src: np.ndarray) -> list[dict]:
    """The real rows, then one row per synthetic vector: its source's fields under a new id."""
    return real + [{**real[s], "id": f"synthetic-{i:07d}"} for i, s in enumerate(src)]


def queries(n: int) -> list[str]:
    """`n` query strings, "name: first sentence", from a seeded sample of stdlib functions and classes."""
    cands = []
    for sections in stdlib_docs().values():
        for heading, text in sections:
            first = re.split(r"(?<=\.)\s|\n\s*\n", text.strip(), maxsplit=1)[0].replace("\n", " ").strip()
            if heading and len(first) >= 20:
                cands.append(f"{heading.split('(')[0]}: {first}")
    return random.Random(1).sample(sorted(set(cands)), n)


def exact_top_k(vecs: np.ndarray, qvecs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest inner products per query: the ground truth (vectors are unit length)."""
    scores = qvecs @ vecs.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)


# -- measurements (each backend in its own process) -------------------------------------------------


def write(store, rows: list[dict], vecs: np.ndarray) -> dict:
    """A fresh collection filled as ingest fills it: `MilvusStore.upsert` in batches, then `settle`."""
    store.drop(COLLECTION)
    store.ensure_collection(COLLECTION, vecs.shape[1])
    t0 = time.time()
    for i in range(0, len(rows), INSERT_BATCH):
        store.upsert(COLLECTION, [{**r, "vector": v.tolist()} for r, v in zip(rows[i : i + INSERT_BATCH], vecs[i : i + INSERT_BATCH])])
    seconds = time.time() - t0
    t0 = time.time()
    store.settle(COLLECTION)
    settle_s = time.time() - t0
    count = store.count(COLLECTION)
    assert count == len(rows), f"{store.uri} holds {count} entities after upserting {len(rows)} rows with distinct ids"
    print(f"  {store.version}: {count} rows upserted in {seconds:.0f} s, settled in {settle_s:.0f} s", flush=True)
    return {"version": store.version, "entities": count, "insert_s": seconds, "settle_s": settle_s}


def ranked(store, text: str, vector, mode: str) -> list[dict]:
    """One search as `lorag.retrieval.search` runs it, from an embedded query (embedding is not timed)."""
    from lorag.retrieval import Query
    from lorag.sections import KnowledgeBaseConfig

    q = Query.of(KnowledgeBaseConfig(name="bench", sources=["-"], milvus_collection=COLLECTION, **RAW), text, K, mode)
    return q.rank(store.candidates(*q.candidates_args(vector.tolist())))


def searches(store, data: dict, budget: float) -> dict:
    """Latency of every mode over the queries (first one apart), and dense recall@10 against `data["truth"]`."""
    qs, qvecs, truth = data["queries"], data["qvecs"], data["truth"]
    out = {}
    for mode in MODES:
        t0 = time.perf_counter()
        ranked(store, qs[0], qvecs[0], mode)
        first_ms = (time.perf_counter() - t0) * 1e3
        lat, recall, start = [], [], time.time()
        for q, v, t in zip(qs, qvecs, truth):
            t0 = time.perf_counter()
            hits = ranked(store, q, v, mode)
            lat.append((time.perf_counter() - t0) * 1e3)
            recall.append(len({h["id"] for h in hits} & t) / K)
            if time.time() - start > budget and len(lat) >= 5:
                break
        m = {"queries": len(lat), "first_query_ms": first_ms, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(np.mean(lat))}
        if mode == "dense":
            m["recall_at_10"] = float(np.mean(recall))
        out[mode] = m
        print(f"    {mode}: p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms over {len(lat)} queries (first {first_ms:.0f} ms)", flush=True)
    return out


def lite_child(work: Path, phase: str, budget: float) -> dict:
    from lorag.milvus import MilvusStore

    data = load_data(work)
    uri = str(work / "lite" / "milvus.db")
    if phase == "write":
        store = MilvusStore(uri)
        res = write(store, data["rows"], data["vecs"])
        print("  state: after ingest", flush=True)
        res["states"] = {"after ingest": searches(store, data, budget)}
        t0 = time.time()
        store.close()
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)  # what exiting does (atexit): Lite flushes its memtable and builds indexes
        res["close_s"] = time.time() - t0
        return res
    t0 = time.time()
    store = MilvusStore(uri)
    store.count(COLLECTION)  # loads the collection (reads or builds its segment indexes)
    res = {"open_s": time.time() - t0}
    print(f"  state: reopened (opened and loaded in {res['open_s']:.0f} s)", flush=True)
    res["states"] = {"reopened": searches(store, data, budget)}
    return res


def server_child(work: Path, budget: float) -> dict:
    from lorag.milvus import MilvusStore
    from lorag.standalone import local_server

    data = load_data(work)
    t0 = time.time()
    with local_server(work / "server") as uri:
        res = {"start_s": time.time() - t0}
        store = MilvusStore(uri)
        res.update(write(store, data["rows"], data["vecs"]))
        print("  state: after ingest", flush=True)
        res["states"] = {"after ingest": searches(store, data, budget)}
        t0 = time.time()
        while True:  # settle sealed the segments; the server indexes them in the background
            idx = store.client.describe_index(COLLECTION, "vector")
            if (idx.get("indexed_rows", 0) >= len(data["rows"]) and not idx.get("pending_index_rows")) or time.time() - t0 > 600:
                break
            time.sleep(2)
        res["index_wait_s"] = time.time() - t0
        print(f"  state: indexed (waited {res['index_wait_s']:.0f} s more: {idx})", flush=True)
        res["states"]["indexed"] = searches(store, data, budget)
        store.close()
    return res


def save_data(work: Path, real: list[dict], src: np.ndarray, vecs: np.ndarray, qs: list[str], qvecs: np.ndarray, truth: np.ndarray) -> None:
    (work / "real_rows.json").write_text(json.dumps(real))
    (work / "queries.json").write_text(json.dumps(qs))
    np.savez(work / "arrays.npz", src=src, vecs=vecs, qvecs=qvecs, truth=truth)


def load_data(work: Path) -> dict:
    arrays = np.load(work / "arrays.npz")
    rows = all_rows(json.loads((work / "real_rows.json").read_text()), arrays["src"])
    truth = [{rows[i]["id"] for i in top} for top in arrays["truth"]]
    return {"rows": rows, "vecs": arrays["vecs"], "queries": json.loads((work / "queries.json").read_text()), "qvecs": arrays["qvecs"], "truth": truth}


def _embedder_path() -> Path:
    from lorag.models import resolve_model

    return resolve_model("all-minilm-l6-v2", Path.home() / ".cache" / "lorag")


def _child(kind: str, work: Path, budget: float, phase: str = "") -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--work", str(work), "--budget", str(budget), "--phase", phase]
    # Progress lines stream through; the result is the last RESULT line.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        else:
            print(line, end="", flush=True)
    err = proc.stderr.read()
    if proc.wait() != 0 or result is None:
        return {"error": err[-1500:]}
    return result


# -- report ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=100_000, help="rows in the collection (real chunks plus synthetic ones)")
    ap.add_argument("--real", type=int, default=3000, help="at most this many real stdlib chunks are embedded")
    ap.add_argument("--queries", type=int, default=200, help="query strings, each searched once per backend, state and mode")
    ap.add_argument("--budget", type=float, default=30, help="seconds of searching per backend, state and mode (at least 5 queries)")
    ap.add_argument("--backends", default="lite,server", help="comma-separated: lite, server")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = lite_child(Path(args.work), args.phase, args.budget) if args.child == "lite" else server_child(Path(args.work), args.budget)
        print("RESULT " + json.dumps(res), flush=True)
        return

    import torch

    from lorag.embed import Embedder

    work = Path(tempfile.mkdtemp(prefix="lorag-bench-retrieval-"))
    library = library_fingerprint()
    stdlib_corpus(work / "corpus")
    real, vecs = real_vectors(chunk_corpus(work / "corpus"), min(args.real, args.chunks))
    vecs, src = synthesize(vecs, args.chunks)
    print(f"bench/retrieval.py: {len(vecs)} chunks ({len(real)} real stdlib chunks embedded, {len(src)} synthetic), "
          f"{args.queries} queries, top {K}, CPU ({os.cpu_count()} cores), lorag sources {library}, in {work}", flush=True)
    qs = queries(args.queries)
    torch.set_num_threads(os.cpu_count())
    qvecs = Embedder(_embedder_path()).embed(qs)
    t0 = time.time()
    truth = exact_top_k(vecs, qvecs, K)
    print(f"  exact top-{K} for {len(qs)} queries by brute force (numpy) in {(time.time() - t0) * 1e3:.0f} ms", flush=True)
    save_data(work, real, src, vecs, qs, qvecs, truth)

    res = {"lorag_sources": library, "chunks": len(vecs), "real_chunks": len(real), "synthetic_chunks": len(src), "queries": len(qs), "k": K, "budget_s": args.budget,
           "cpus": os.cpu_count(), "backends": {}}
    for backend in args.backends.split(","):
        print(f"{backend}:", flush=True)
        if backend == "lite":
            written = _child("lite", work, args.budget, "write")
            reopened = _child("lite", work, args.budget, "reopen") if "error" not in written else {"error": "not run"}
            res["backends"]["lite"] = {**written, **{k: v for k, v in reopened.items() if k != "states"},
                                       "states": {**written.get("states", {}), **reopened.get("states", {})}}
            if "error" in written or "error" in reopened:
                res["backends"]["lite"]["error"] = written.get("error") or reopened.get("error")
        else:
            res["backends"]["server"] = _child("server", work, args.budget)
    print(json.dumps(res, indent=2))
    if library_fingerprint() != library:
        print(f"WARNING: lorag's sources changed during the run (from {library} to {library_fingerprint()}); rerun before quoting")

    rows = []
    for backend, r in res["backends"].items():
        if "error" in r:
            print(f"{backend} failed:\n{r['error']}")
        name = f"{backend} ({r['version']})" if "version" in r else backend
        for state, modes in r.get("states", {}).items():
            for mode, m in modes.items():
                rows.append((name, state, mode, f"{m['p50_ms']:.1f} ms", f"{m['p99_ms']:.1f} ms", str(m["queries"]), f"{m['first_query_ms']:.0f} ms",
                             "p99 < 20 ms", "met" if m["p99_ms"] < 20 else "missed"))
    for backend, r in res["backends"].items():
        for state, modes in r.get("states", {}).items():
            if "dense" in modes:
                rec = modes["dense"]["recall_at_10"]
                rows.append((backend, state, "dense recall@10 vs exact", f"**{rec:.3f}**", "", str(modes["dense"]["queries"]), "", ">= 0.95", "met" if rec >= 0.95 else "missed"))
    res["table"] = rows
    print_table(("backend", "state", "mode", "p50", "p99", "queries", "first query", "goal", "met?"), rows)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
