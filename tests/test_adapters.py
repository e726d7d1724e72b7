"""The adapter store: versions never overwrite, names cannot escape, metadata travels with the files."""

import json

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
    v1 = store.save("bot", peft_dir, {"metrics": {"loss": 1.0}})
    (peft_dir / "adapter_model.safetensors").write_bytes(b"weights-2")
    v2 = store.save("bot", peft_dir, {"metrics": {"loss": 0.5}})
    assert (v1.name, v2.name) == ("v1", "v2")
    assert (v1 / "adapter_model.safetensors").read_bytes() == b"weights", "v1 must be untouched by the second save"
    assert store.versions("bot") == [1, 2] and store.names() == ["bot"]
    assert store.resolve("bot") == v2 and store.resolve("bot", "v1") == v1 and store.resolve("bot", 1) == v1
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
