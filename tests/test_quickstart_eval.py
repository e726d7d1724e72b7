"""The quickstart's question, answered by measurement with the real model: on its 16 held-out
questions, does the knowledge-base-bound adapter cite its sources better than the variants without
retrieval?

This trains the bundled SmolLM2-135M-Instruct RAFT-style with the quickstart's own config (as
`make demo` does) and evaluates base, base + RAG, adapter and adapter + RAG: several minutes on 2
CPU cores, so it is marked `real_model` and left out of `make test` (docs/benchmarks.md records the
same measurement from `make demo`: adapter + RAG cites a gold page in 8 of 16 answers, base + RAG in
1, the others cannot cite). Run it with:

    .venv/bin/python -m pytest -m real_model tests/test_quickstart_eval.py
"""

import shutil
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"


@pytest.mark.real_model
def test_on_the_quickstart_held_out_set_the_kb_bound_adapter_cites_where_no_rag_variant_can(ray_session, tmp_path, model_cache):
    from lorag.adapters import AdapterStore
    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.evaluation import evaluate
    from lorag.report import store_reports, write_report
    from lorag.train import train_adapter

    root = tmp_path / "quickstart"
    shutil.copytree(QUICKSTART, root)  # the shipped config, corpus, training and held-out sets, unchanged
    cfg = load_config(root / "lorag.yaml", [f"workdir={tmp_path / 'work'}", f"cache_dir={model_cache}"])
    (adapter,) = cfg.adapters
    assert adapter.train.raft is not None and adapter.knowledge_base, "premise: the quickstart adapter trains RAFT-style on its knowledge base"

    ingest(cfg, adapter.knowledge_base)
    train_adapter(cfg, adapter.name)
    result = evaluate(cfg, root / "eval.jsonl", None, max_tokens=64)

    s = result.summary
    name = adapter.name
    assert [v.name for v in result.variants] == ["base", "base+rag", name, f"{name}+rag"]
    assert result.questions == 16 and s[f"{name}+rag"].citation_accuracy.n == 16
    cited = {v: s[v].citation_accuracy.mean for v in s}
    assert cited["base"] == cited[name] == 0.0, "without retrieval there is no numbered source to cite"
    assert cited[f"{name}+rag"] > max(cited["base"], cited[name], cited["base+rag"]), cited
    assert s[f"{name}+rag"].retrieval_recall.mean >= 0.9, "the handbook's retrieval finds the gold source"
    written = write_report(result, tmp_path / "report")
    (location,) = store_reports(cfg, result, written)
    assert AdapterStore(cfg.adapter_store).reports(name) == [location]
