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
        "knowledge_bases": [{"name": "handbook", "sources": ["corpus/"], "chunking": {"size": 140, "overlap": 20}, "top_k": 2}],
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
