"""Shared fixtures: one local Ray for the session, the bundled models, a tiny generator, temp configs.

Run: `make test` (or `.venv/bin/python -m pytest -q`). Everything runs on CPU with no network.
"""

import os
import shutil
import socket
from pathlib import Path

# A single-node Ray in tests stays on loopback (Ray otherwise advertises the interface address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Fixtures that start a Ray cluster or a server process (a Milvus standalone server, `ray start --head`, Ray in a
# subprocess): every test that uses one, directly or through another fixture, is marked `cluster`, which
# `make test-fast` leaves out. A test that starts one inline carries `@pytest.mark.cluster` (or `slow`) itself.
CLUSTER_FIXTURES = {"ray_session", "milvus_server", "own_ray_runs", "head"}


def pytest_collection_modifyitems(items):
    for item in items:
        if CLUSTER_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The converted-model cache (shared with `make demo`, so the GGUF is converted once per machine)."""
    return Path(os.environ.get("LORAG_CACHE", Path.home() / ".cache" / "lorag"))


@pytest.fixture(scope="session")
def smollm2_path(model_cache) -> Path:
    from lorag.models import resolve_model

    return resolve_model("smollm2-135m-instruct", model_cache)


@pytest.fixture(scope="session")
def embedder_path(model_cache) -> Path:
    from lorag.models import resolve_model

    return resolve_model("all-minilm-l6-v2", model_cache)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_path) -> Path:
    """A 2-layer, width-64 Llama with SmolLM2's tokenizer and chat template (random weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorag.models import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer(smollm2_path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


S3_ENV = {"AWS_ACCESS_KEY_ID": "lorag-test", "AWS_SECRET_ACCESS_KEY": "lorag-test", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """An S3 API on 127.0.0.1 (moto's server mode), for the whole session; yields its endpoint URL.

    Its address and fake credentials go into this process's environment, where pyarrow (and so
    lorag and Ray Train) read them, and where Ray nodes started by a test inherit them.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3(s3_server, request):
    """A fresh, empty bucket on the loopback S3 server; yields `s3://<bucket>`."""
    import re

    import boto3

    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (logical CPUs beyond the 2 real ones, so a Ray Data ingest never waits behind a finishing Train run)."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def write_config(root: Path, tiny_model: Path, model_cache: Path, overrides: list[str] | None = None):
    """Write a lorag.yaml in `root` (corpus + dataset copied from the quickstart) and load it."""
    from lorag.config import load_config

    shutil.copytree(QUICKSTART / "corpus", root / "corpus", dirs_exist_ok=True)
    shutil.copy(QUICKSTART / "train.jsonl", root / "train.jsonl")
    data = {
        "base_model": str(tiny_model),
        "embedder": "all-minilm-l6-v2",
        "workdir": "work",
        "cache_dir": str(model_cache),
        "knowledge_bases": [{"name": "handbook", "sources": ["corpus/"], "chunking": {"size": 140, "overlap": 20}, "top_k": 2,
                             "hybrid": {"fusion": "scores", "dense_weight": 0.5, "lexical_floor": 0.75}}],  # as the quickstart's
        "adapters": [
            {
                "name": "support",
                "dataset": "train.jsonl",
                "knowledge_base": "handbook",
                "train": {"max_steps": 2, "batch_size": 2, "max_seq_len": 512, "num_workers": 2, "zero_stage": 2},
            }
        ],
        "serve": {"port": free_port(), "cpus_per_replica": 0, "max_tokens": 16},
    }
    path = root / "lorag.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, overrides)


@pytest.fixture
def make_config(tmp_path, tiny_model, model_cache):
    """`make_config(overrides)` writes and loads a test lorag.yaml in tmp_path."""
    return lambda overrides=None: write_config(tmp_path, tiny_model, model_cache, overrides)


def readme_block(after: str) -> list[str]:
    """The non-empty lines of the first ```bash block after the line `after` in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(after):]
    block = section[section.index("```bash\n") + 8:]
    return [line for line in block[:block.index("```")].splitlines() if line.strip()]


def project_copy(dest: Path) -> Path:
    """A copy of the project's tracked files at `dest` (the CRD schemas left out), with `.venv` linked to this
    checkout's, so the docs' `.venv/bin/lorag` lines run there as written and anything they write stays there."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for f in files:
        if f and not f.startswith("tests/kuberay-crds/") and (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest
