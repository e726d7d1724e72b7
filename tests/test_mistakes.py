"""Every common mistake is one line through the real CLI: exit code, no traceback, and the message names
the field or variable to fix (lorag.errors is the one place that maps them).

A wrong or missing Ray auth token against a real head is in tests/test_cluster.py
(test_token_missing_or_wrong_is_one_clear_line); a config that cannot run on a cluster is refused
there too, before anything is uploaded.
"""

import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port, write_config

# What each row runs after `lorag`; {cfg} is a test config (tiny model, the quickstart corpus, a
# Milvus Lite file and a local store in its own directory, nothing ingested or trained yet).
DEAD = f"http://127.0.0.1:{free_port()}"  # nothing listens there
ROWS = [
    # (id, args, extra environment, exit code, what the one line must name)
    ("unknown key", ["ingest", "-c", "{cfg}", "--set", "knowledge_bases.handbook.chunkin.size=3"], {}, 2, ["knowledge_bases.handbook.chunkin", "unknown key"]),
    ("missing config", ["train", "-c", "{tmp}/nope.yaml"], {}, 2, ["nope.yaml", "not found"]),
    ("missing api_keys_file", ["serve", "-c", "{cfg}", "--set", "serve.api_keys_file={tmp}/no-keys.txt", "--set", "serve.host=0.0.0.0"], {}, 2,
     ["serve.api_keys_file", "no-keys.txt"]),
    ("S3 unreachable: adapters", ["adapters", "list", "-c", "{cfg}", "--store", "s3://lorag-bucket/adapters"], {"AWS_ENDPOINT_URL": DEAD}, 1,
     ["lorag-bucket", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL"]),
    ("S3 unreachable: serve", ["serve", "-c", "{cfg}", "--set", "storage=s3://lorag-bucket/lorag"], {"AWS_ENDPOINT_URL": DEAD}, 1,
     ["`storage`", "lorag-bucket", "AWS_ACCESS_KEY_ID"]),
    ("Milvus unreachable: serve", ["serve", "-c", "{cfg}", "--set", f"knowledge_bases.handbook.uri={DEAD}"], {}, 1, [DEAD, "uri"]),
    ("Milvus unreachable: search", ["kb", "search", "warranty", "--kb", "handbook", "--mode", "bm25", "-c", "{cfg}", "--set", f"knowledge_bases.handbook.uri={DEAD}"], {}, 1,
     [DEAD, "Milvus"]),
    ("Milvus unreachable: eval", ["eval", "-c", "{cfg}", "-d", str(REPO / "examples/quickstart/eval.jsonl"), "--set", f"knowledge_bases.handbook.uri={DEAD}"], {}, 1,
     [DEAD, "uri"]),
    ("dashboard URL to a local command", ["train", "-c", "{cfg}", "--address", "http://127.0.0.1:8265"], {}, 2,
     ["lorag submit train", "--address http://127.0.0.1:8265", "RAY_ADDRESS=auto"]),
    ("ask without a server", ["ask", "hello", "-m", "support", "--url", DEAD], {}, 1, [DEAD, "lorag serve"]),
    # These start a local Ray in the command's process (about 15 s each).
    ("Milvus unreachable: ingest", ["ingest", "-c", "{cfg}", "--set", f"knowledge_bases.handbook.uri={DEAD}"], {}, 1, [DEAD, "uri"]),
    ("model not found", ["train", "-c", "{cfg}", "--set", "base_model={tmp}/no-such-model"], {}, 1, ["no-such-model", "base_model"]),
    # RAY_ADDRESS set to a dashboard URL (as the README's cluster block exports it) runs locally with a note.
    ("train before ingest", ["train", "-c", "{cfg}"], {"RAY_ADDRESS": "http://127.0.0.1:8265"}, 1, ["lorag kb ingest", "does not exist"]),
    ("Milvus unreachable: train", ["train", "-c", "{cfg}", "--set", f"knowledge_bases.handbook.uri={DEAD}"], {}, 1, [DEAD, "uri"]),
]


@pytest.fixture(scope="module")
def mistakes_config(tmp_path_factory, tiny_model, model_cache):
    root = tmp_path_factory.mktemp("mistakes")
    write_config(root, tiny_model, model_cache)
    return root


STARTS_RAY = {"Milvus unreachable: ingest", "model not found", "train before ingest", "Milvus unreachable: train"}  # the rows above that start a local Ray


@pytest.mark.parametrize("name,args,env,code,names", [pytest.param(*r, id=r[0], marks=[pytest.mark.cluster] if r[0] in STARTS_RAY else []) for r in ROWS])
def test_a_mistake_is_one_line_that_names_the_fix(mistakes_config, tmp_path, name, args, env, code, names):
    args = [a.format(cfg=mistakes_config / "lorag.yaml", tmp=tmp_path) for a in args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "LORAG_API_KEYS"))}
    # No credentials anywhere, and never the cloud's metadata service: S3 goes to `DEAD` or nowhere.
    environ.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                   COLUMNS="300", **env)
    r = subprocess.run([sys.executable, "-m", "lorag.cli", *args], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, f"{name}: a traceback instead of one line:\n{out[-3000:]}"
    assert r.returncode == code, f"{name}: exit {r.returncode}, expected {code}:\n{out[-3000:]}"
    errors = [line for line in r.stdout.splitlines() if line.startswith("error:")]
    assert errors, f"{name}: no `error:` line:\n{out[-3000:]}"
    message = r.stdout[r.stdout.index("error:"):]
    for needle in names:
        assert needle in message, f"{name}: the message does not name {needle!r}:\n{message}"
    if env.get("RAY_ADDRESS", "").startswith("http"):
        assert "is a Ray dashboard URL" in out and "local Ray" in out, out[-3000:]
