"""Sentence embeddings: a callable class that loads the embedder once and embeds batches.

The same class serves three callers: the Ray Data ingest pipeline (`map_batches(Embedder, ...)`
on an actor pool), the Serve ingress (one query at a time) and tests. Vectors are mean-pooled over
the attention mask and L2-normalised, so cosine similarity is an inner product.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class Embedder:
    """Loads a sentence-transformers style encoder once; `embed(texts)` returns normalised float32 vectors.

    Args:
        model_path: local checkpoint directory (see `lorag.models.resolve_model`).
        max_length: tokens per text; longer texts are truncated.
        device: "cpu", "cuda", or None to use CUDA when available.
        threads: on CPU, torch's intra-op threads for this process (None leaves torch's setting,
            which under Ray is one per CPU the actor reserved).
        cache_dir: the config's `cache_dir` (None: this node's default cache). `model_path` may be
            any model reference (`lorag.models.resolve_model`): it is resolved on the node the
            embedder runs on.
    """

    def __init__(self, model_path: str | Path, max_length: int = 256, device: str | None = None, threads: int | None = None,
                 cache_dir: str | Path | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from lorag.config import node_cache
        from lorag.models import resolve_model

        model_path = resolve_model(str(model_path), node_cache(cache_dir))

        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if threads and self.device == "cpu":
            torch.set_num_threads(min(threads, os.cpu_count() or threads))  # Ray's logical CPUs may exceed the node's cores
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModel.from_pretrained(str(model_path)).to(self.device).eval()
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @classmethod
    def of(cls, cfg, **options) -> "Embedder":
        """The config's embedder (`embedder`, resolved in its `cache_dir`): the one way lorag builds it for a config."""
        return cls(cfg.embedder, cache_dir=cfg.cache_dir, **options)

    def embed(self, texts: list[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        torch = self._torch
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data `map_batches` entry: adds a `vector` column computed from `passage` (the chunk
        under its heading path, from `DocumentChunker`), or from `text` when there is none."""
        batch["vector"] = self.embed([str(t) for t in batch["passage" if "passage" in batch else "text"]])
        return batch
