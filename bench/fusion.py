"""Hybrid fusion on the quickstart's handbook: reciprocal rank fusion vs score fusion (see docs/benchmarks.md).

    .venv/bin/python bench/fusion.py          # about 2 minutes on 2 cores (ingest, then 20 questions x 4 settings)

The second corpus behind lorag's fusion default (bench/quality.py is the first): the Tidewell T4
handbook of examples/quickstart (8 Markdown files), ingested with the quickstart's knowledge-base
settings into a temporary Milvus Lite file under a local Ray. Questions: the 16 held-out questions
of examples/quickstart/eval.jsonl (their `sources`), plus 4 error-code lookups a user types
("TW-E450", "I'm getting TW-E450.", ...) whose answer is the error-code page. Both fusions are run
at dense weights 0.5 to 1.0 over the same stored candidates. Document level:
recall@k at the knowledge base's top_k (2) and MRR@5, and for the error-code questions whether the
chunk that holds the code itself ranks first.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import subprocess
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
CODES = [("TW-E450", "TW-E450"), ("I'm getting TW-E450.", "TW-E450"), ("TW-E417", "TW-E417"), ("What does error TW-E417 mean?", "TW-E417")]
SETTINGS = [(None, None), ("rrf", 0.75), ("rrf", 1.0), ("rrf", 1.5), ("scores", 0.5), ("scores", 0.75), ("scores", 1.0)]  # (None, None): the knowledge base's settings


def main() -> None:
    import ray

    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.embed import Embedder
    from lorag.handle import open_store
    from lorag.retrieval import search

    raw = yaml.safe_load((QUICKSTART / "lorag.yaml").read_text())
    work = Path(tempfile.mkdtemp(prefix="lorag-bench-fusion-"))
    kb_raw = {**raw["knowledge_bases"][0], "sources": [str((QUICKSTART / s).resolve()) for s in raw["knowledge_bases"][0]["sources"]]}
    kb_raw.pop("uri", None)
    (work / "lorag.yaml").write_text(yaml.safe_dump({"embedder": raw.get("embedder", "all-minilm-l6-v2"), "workdir": str(work / "work"),
                                                      "knowledge_bases": [kb_raw]}))
    cfg = load_config(work / "lorag.yaml")
    kb = cfg.knowledge_bases[0]
    questions = [json.loads(line) for line in (QUICKSTART / "eval.jsonl").read_text().splitlines() if line.strip()]
    questions += [{"question": q, "sources": ["05-error-codes.md"], "code": code} for q, code in CODES]

    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        ingest(cfg, kb.name)
        store = open_store(cfg.milvus_uri(kb), kb.token)
        embedder = Embedder.of(cfg)
        rows = []
        for fusion, weight in SETTINGS:
            recall = mrr = first = 0.0
            chosen = {"fusion": fusion, "dense_weight": weight} if fusion else {}
            setting = kb.model_copy(update={"hybrid": kb.hybrid.model_copy(update=chosen)})
            for q in questions:
                hits = search(store, setting, q["question"], embedder, 5, "hybrid")
                ranks = [i for i, h in enumerate(hits, 1) if any(Path(h["source"]).name == Path(s).name for s in q["sources"])]
                recall += bool(ranks and ranks[0] <= kb.top_k)
                mrr += 1 / ranks[0] if ranks else 0.0
                first += bool("code" in q and hits and f"{q['code']}:" in hits[0]["text"])
            n = len(questions)
            rows.append((fusion or "the knowledge base's own (quickstart: scores, 0.5, floor 0.75)", f"{weight:g}" if weight else "-", f"{recall / n:.3f}", f"{mrr / n:.3f}", f"{first:.0f} of {len(CODES)}"))
    finally:
        ray.shutdown()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"bench/fusion.py: {len(questions)} questions over the quickstart handbook, commit {commit}\n")
    print(f"| fusion | dense weight | recall@{kb.top_k} | MRR@5 | error-code chunk first |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
