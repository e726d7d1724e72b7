"""The adapter store: versions never overwrite, names cannot escape, metadata travels with the files."""

import json
from pathlib import Path

import pytest

from lorag.adapters import AdapterNotFoundError, AdapterStore, parse_model_id


@pytest.fixture
def peft_dir(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    return d


def test_each_save_is_a_new_immutable_version(tmp_path, peft_dir):
    store = AdapterStore(tmp_path / "store")
    v1 = Path(store.save("bot", peft_dir, {"metrics": {"loss": 1.0}}))
    (peft_dir / "adapter_model.safetensors").write_bytes(b"weights-2")
    v2 = Path(store.save("bot", peft_dir, {"metrics": {"loss": 0.5}}))
    assert (v1.name, v2.name) == ("v1", "v2")
    assert (v1 / "adapter_model.safetensors").read_bytes() == b"weights", "v1 must be untouched by the second save"
    assert store.versions("bot") == [1, 2] and store.names() == ["bot"]
    assert store.resolve("bot") == str(v2) and store.resolve("bot", "v1") == str(v1) and store.resolve("bot", 1) == str(v1)
    assert json.loads((v2 / "lorag.json").read_text())["metrics"] == {"loss": 0.5}
    assert not [p for p in (tmp_path / "store" / "bot").iterdir() if p.name.startswith(".tmp")], "no temp dirs left behind"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", "Upper", "", ".hidden", "a..b"])
def test_malicious_or_invalid_names_are_refused(tmp_path, peft_dir, name):
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(ValueError, match="invalid adapter name"):
        store.save(name, peft_dir, {})
    with pytest.raises(ValueError, match="invalid adapter name"):
        store.resolve(name)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("version, error", [("v9", AdapterNotFoundError), ("../../x", ValueError), ("0", ValueError)])
def test_bad_versions(tmp_path, peft_dir, version, error):
    store = AdapterStore(tmp_path / "store")
    store.save("bot", peft_dir, {})
    with pytest.raises(error):
        store.resolve("bot", version)


def test_unknown_adapter_lists_known(tmp_path, peft_dir):
    store = AdapterStore(tmp_path / "store")
    store.save("bot", peft_dir, {})
    with pytest.raises(AdapterNotFoundError, match=r"'ghost' is not in the store .*\['bot'\]"):
        store.resolve("ghost")


def test_save_requires_peft_files(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        AdapterStore(tmp_path / "store").save("bot", tmp_path, {})


@pytest.mark.parametrize("model, expected", [("bot", ("bot", None)), ("bot@v2", ("bot", "v2")), ("bot@3", ("bot", "3"))])
def test_parse_model_id(model, expected):
    assert parse_model_id(model) == expected


def test_a_store_in_s3_saves_lists_tags_fetches_verified_and_removes(s3, tmp_path, peft_dir):
    """The same store on an S3 API (moto on loopback): versions, tags and metadata live in the
    bucket; `fetch` copies a version into the node cache once and refuses a tampered file."""
    import pyarrow.fs

    store = AdapterStore(f"{s3}/adapters")
    v1 = store.save("bot", peft_dir, {"metrics": {"loss": 1.0}}, config_yaml="a: 1\n")
    assert v1 == f"{s3}/adapters/bot/v1"
    (peft_dir / "adapter_model.safetensors").write_bytes(b"weights-2")
    store.save("bot", peft_dir, {})
    assert store.versions("bot") == [1, 2] and store.names() == ["bot"]
    assert store.tag("bot", 1, "prod") == 1 and store.resolve("bot", "prod") == v1
    assert store.metadata("bot", 1)["metrics"] == {"loss": 1.0}

    cache = tmp_path / "cache"
    local = store.fetch("bot", "prod", cache)
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights" and (local / "lorag.yaml").read_text() == "a: 1\n"
    assert local.is_relative_to(cache), "a fetched adapter lives in the node cache"
    assert store.fetch("bot", 1, cache) == local, "a second fetch reuses the verified copy"

    fs, path = pyarrow.fs.FileSystem.from_uri(f"{s3}/adapters/bot/v2/adapter_model.safetensors")
    with fs.open_output_stream(path) as f:
        f.write(b"tampered")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*sha256"):
        store.fetch("bot", 2, cache)

    # A version whose upload never finished (no lorag.json) does not exist for readers.
    with fs.open_output_stream(path.replace("/v2/", "/v3/")) as f:
        f.write(b"half")
    assert store.versions("bot") == [1, 2]
    store.remove("bot", 1)
    assert store.versions("bot") == [2] and store.tags("bot") == {}
