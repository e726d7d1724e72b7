"""The quickstart's shape on a two-node Ray cluster with no shared filesystem.

Real parts, all on loopback and started here: an S3 API (moto's server) holding every artifact, a
Milvus standalone server holding the knowledge base, and two Ray nodes with token authentication,
each with its own cache directory (tests/two_nodes_scenario.py starts them in a process of its own).
The config differs from a laptop's only in its storage and Milvus URIs (and in spreading the work
over both nodes).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import QUICKSTART, REPO, free_port


@pytest.mark.slow
def test_ingest_train_and_serve_on_two_nodes_with_artifacts_in_s3(s3, tmp_path, tiny_model, embedder_path):
    import pyarrow.fs

    from lorag.adapters import AdapterStore
    from lorag.config import load_config
    from lorag.milvus import MilvusStore
    from lorag.standalone import local_server

    root = tmp_path / "project"
    root.mkdir()
    (root / "corpus").mkdir()
    for doc in sorted((QUICKSTART / "corpus").iterdir())[:3]:
        (root / "corpus" / doc.name).write_bytes(doc.read_bytes())
    (root / "train.jsonl").write_text((QUICKSTART / "train.jsonl").read_text())
    caches = [tmp_path / "node-a-cache", tmp_path / "node-b-cache"]
    out = tmp_path / "result.json"
    port = free_port()

    with local_server(tmp_path / "milvus") as milvus_uri:
        config = {
            "base_model": str(tiny_model),  # a directory on this machine only: published to storage for the other node
            "embedder": "all-minilm-l6-v2",
            "workdir": "work",
            "storage": f"{s3}/lorag",
            "knowledge_bases": [{"name": "handbook", "sources": ["corpus/"], "uri": milvus_uri, "chunking": {"size": 140, "overlap": 20}, "top_k": 2}],
            "adapters": [{
                "name": "support", "dataset": "train.jsonl", "knowledge_base": "handbook",
                "train": {"max_steps": 2, "batch_size": 1, "max_seq_len": 384, "num_workers": 2, "zero_stage": 2, "placement_strategy": "STRICT_SPREAD"},
            }],
            "serve": {"port": port, "replicas": 2, "max_replicas_per_node": 1, "cpus_per_replica": 1, "max_tokens": 8},
        }
        (root / "lorag.yaml").write_text(yaml.safe_dump(config))
        env = {**__import__("os").environ, "LORAG_API_KEYS": "two-nodes-key", "HF_HUB_OFFLINE": "1"}
        run = subprocess.run(
            [sys.executable, str(REPO / "tests" / "two_nodes_scenario.py"), str(root / "lorag.yaml"), str(out), *map(str, caches)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )
        log = (run.stdout + run.stderr)[-6000:]
        assert run.returncode == 0, log
        result = json.loads(out.read_text())
        collection = load_config(root / "lorag.yaml").knowledge_base("handbook").collection
        kb_rows = MilvusStore(milvus_uri).count(collection)

    assert len(result["nodes"]) == 2, log
    assert result["ingest"]["handbook"]["documents"] == 3 and result["ingest"]["handbook"]["chunks"] == kb_rows > 0, result["ingest"]

    trained = result["train"]["support"]
    assert trained["location"] == f"{s3}/lorag/adapters/support/v1", "the adapter version lives in the bucket"
    assert trained["metrics"]["world_size"] == 2 and trained["metrics"]["nodes"] == 2, "STRICT_SPREAD put one training worker on each node"
    store = AdapterStore(f"{s3}/lorag/adapters")
    assert store.versions("support") == [1] and store.metadata("support")["base_model"] == str(tiny_model)

    fs, bucket = pyarrow.fs.FileSystem.from_uri(s3)
    keys = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(bucket, recursive=True)) if i.type == pyarrow.fs.FileType.File]
    assert any("/models/" in k and k.endswith("model.safetensors") for k in keys), "the driver's base model was published to storage"
    assert not any("/ray_results/support-" in k for k in keys), "the finished run's checkpoints (in S3) were cleared"
    assert not (root / "work").exists(), "nothing was written under the local workdir"

    for cache in caches:
        fetched = [p.parent for p in cache.glob("fetched/*/config.json")]
        assert fetched, f"{cache.name}: the node fetched the base model into its own cache"
    adapters_fetched = [p for c in caches for p in c.glob("fetched/*/adapter_model.safetensors")]
    assert adapters_fetched, "a replica fetched the adapter from S3 into its node's cache"

    assert sorted(set(result["generator_nodes"])) == result["nodes"], "one generator replica on each node"
    assert result["unauthorized"] == 401, "the deployed endpoint requires the API key"
    for answer in result["answers"]:
        assert answer["status"] == 200, answer
        sources = answer["body"]["sources"]
        corpus = {p.name for p in (root / "corpus").iterdir()}
        assert sources and all(s["source"] in corpus for s in sources), "answers cite the knowledge base's documents, relative to its root"
