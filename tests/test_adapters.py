"""The adapter store: versions never overwrite, names cannot escape, metadata travels with the files."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from lorag import storage
from lorag.adapters import AdapterNotFoundError, AdapterStore, AdapterStoreWarning, parse_model_id


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


def test_a_version_record_is_typed_and_an_older_lorags_record_still_loads(tmp_path, peft_dir):
    """`record` reads lorag.json as an `AdapterRecord`: keys it does not name (an older lorag's
    `model_path`, `examples` as one count) load as they are, and a save writes only the keys given."""
    from lorag.adapter_record import AdapterRecord

    store = AdapterStore(tmp_path / "store")
    location = Path(store.save("bot", peft_dir, {"knowledge_base": "kb", "examples": 12, "model_path": "/old"}))
    rec = store.record("bot")
    assert isinstance(rec, AdapterRecord) and (rec.name, rec.version, rec.method, rec.knowledge_base, rec.examples) == ("bot", 1, "lora", "kb", 12)
    assert rec.model_extra == {"model_path": "/old"} and rec.metrics is None
    on_disk = json.loads((location / "lorag.json").read_text())
    assert list(on_disk) == ["name", "version", "created_at", "knowledge_base", "examples", "model_path", "files"], "no defaults are added on disk"
    assert rec.files == on_disk["files"] and store.metadata("bot") == on_disk
    with pytest.raises(ValueError, match="method"):
        store.save("bot", peft_dir, {"method": "qlora"})
    assert store.versions("bot") == [1], "a record that does not fit is refused before anything is written"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", "Upper", "", ".hidden", "a..b", "bot\n"])
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
    with pytest.warns(AdapterStoreWarning, match="v3: no lorag.json"):
        assert store.versions("bot") == [1, 2]
        store.remove("bot", 1)
        assert store.versions("bot") == [2] and store.tags("bot") == {}


def test_a_local_store_fetches_a_verified_copy_and_refuses_a_file_damaged_on_disk(tmp_path, peft_dir):
    """A local store is checked as a remote one is: `fetch` copies the version into the node cache
    and checks every file against the sha256 recorded at save time, so a file damaged on disk
    (a flipped byte here) is refused with the file named, instead of being loaded."""
    store = AdapterStore(tmp_path / "store")
    store.save("bot", peft_dir, {})
    (peft_dir / "adapter_model.safetensors").write_bytes(b"weights-2")
    store.save("bot", peft_dir, {})
    (tmp_path / "store" / "bot" / "v2" / "adapter_model.safetensors").write_bytes(b"weights-3")  # same size, one byte off
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*sha256"):
        store.fetch("bot", 2, cache)
    local = store.fetch("bot", 1, cache)
    assert local.is_relative_to(cache) and (local / "adapter_model.safetensors").read_bytes() == b"weights", "a verified copy in the node cache"
    assert store.fetch("bot", 1, cache) == local, "a second fetch reuses the verified copy"


# -- store safety: numbers never reused, foreign entries skipped, removals seen as "not found", no secrets --------


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    """An empty store on a local disk, then the same on the loopback S3 server."""
    return AdapterStore(tmp_path / "store" if request.param == "local" else f"{request.getfixturevalue('s3')}/adapters")


def put(store, rel, data=b"x"):
    """Write a file into the store behind its back (as another tool, or a person, would)."""
    fs, root = storage.filesystem(store.root)
    storage.write_bytes(fs, f"{root}/{rel}", data)


def delete(store, rel):
    """Delete a directory of the store behind its back (a concurrent `remove` or a person)."""
    fs, root = storage.filesystem(store.root)
    fs.delete_dir(f"{root}/{rel}")


def test_reports_go_into_the_version_beside_its_files_and_leave_them_as_saved(any_store, peft_dir, tmp_path):
    """An evaluation's report is stored under v<N>/eval/<time>/: listed by `reports`, never replacing
    an earlier one, not counted as a version, and not part of what `fetch` copies and verifies."""
    store = any_store
    store.save("bot", peft_dir, {})
    before = store.metadata("bot", 1)
    (tmp_path / "eval.json").write_text('{"f1": 0.5}')
    (tmp_path / "eval.png").write_bytes(b"\x89PNG")
    first = store.add_report("bot", "v1", [tmp_path / "eval.json", tmp_path / "eval.png"])
    second = store.add_report("bot", 1, [tmp_path / "eval.json"])
    assert first != second and store.reports("bot", 1) == [first, second], "two reports in one second keep both"
    assert first.startswith(store.location("bot", 1) + "/eval/")
    fs, path = storage.filesystem(first)
    assert storage.read_bytes(fs, f"{path}/eval.json") == b'{"f1": 0.5}' and storage.read_bytes(fs, f"{path}/eval.png") == b"\x89PNG"
    assert store.versions("bot") == [1] and store.metadata("bot", 1) == before, "the version itself is unchanged"
    fetched = store.fetch("bot", 1, tmp_path / "cache")
    assert (fetched / "adapter_model.safetensors").read_bytes() == b"weights"
    if not store.local:
        assert not (fetched / "eval").exists(), "a node loading the adapter does not download its reports"
    with pytest.raises(AdapterNotFoundError):
        store.add_report("bot", 2, [tmp_path / "eval.json"])


def test_a_removed_number_is_never_given_out_again(any_store, peft_dir):
    store = any_store
    for _ in range(2):
        store.save("bot", peft_dir, {})
    store.remove("bot", 2)
    assert store.versions("bot") == [1]
    assert store.location("bot", 3) == store.save("bot", peft_dir, {}), "after removing the newest v2 the next save must be v3, never v2 again"
    store.remove("bot", 1)
    store.remove("bot", 3)
    assert store.names() == [] and store.versions("bot") == []
    assert store.save("bot", peft_dir, {}).endswith("/v4"), "removing every version must not reset the numbers"


def test_a_number_recorded_before_a_crash_is_skipped(any_store, peft_dir):
    """A save records its number before writing the version: a crash in between leaves the
    counter ahead of the versions, and the next save must go past it."""
    store = any_store
    store.save("bot", peft_dir, {})
    put(store, "bot/counter.json", json.dumps({"last_version": 5}).encode())
    assert store.save("bot", peft_dir, {}).endswith("/v6")


def test_a_store_from_before_the_counter_still_never_reuses(any_store, peft_dir):
    store = any_store
    for _ in range(3):
        store.save("bot", peft_dir, {})
    fs, root = storage.filesystem(store.root)
    fs.delete_file(f"{root}/bot/counter.json")  # as an older lorag left it
    store.remove("bot", 3)
    assert store.save("bot", peft_dir, {}).endswith("/v4")


def test_a_corrupt_counter_stops_the_save_with_the_fix(tmp_path, peft_dir):
    store = AdapterStore(tmp_path / "store")
    store.save("bot", peft_dir, {})
    (tmp_path / "store" / "bot" / "counter.json").write_text("{")
    with pytest.raises(ValueError, match=r"counter.json is corrupt: it must hold .*last_version"):
        store.save("bot", peft_dir, {})


def test_concurrent_local_saves_get_different_numbers(tmp_path, peft_dir):
    code = f"from lorag.adapters import AdapterStore; print(AdapterStore({str(tmp_path / 'store')!r}).save('bot', {str(peft_dir)!r}, {{}}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    saved = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert [Path(s).name for s in saved] == ["v1", "v2", "v3"], saved
    assert AdapterStore(tmp_path / "store").versions("bot") == [1, 2, 3]


def test_entries_lorag_did_not_write_are_skipped_with_one_warning_each(any_store, peft_dir):
    store = any_store
    store.save("bot", peft_dir, {})
    foreign = ["lost+found/x", "README", "Bad_Name/v1/lorag.json", "bot/lost+found/x", "bot/notes.txt", "bot/v0/lorag.json", "bot/V2/lorag.json", "bot/v7/adapter_model.safetensors"]
    for rel in foreign:
        put(store, rel)
    with pytest.warns(AdapterStoreWarning) as caught:
        assert store.names() == ["bot"]
    messages = [str(w.message) for w in caught]
    for entry in ["lost+found", "README", "Bad_Name", "bot/lost+found", "bot/notes.txt", "bot/v0", "bot/V2", "bot/v7"]:
        assert sum(f"skipping {store.root}/{entry}: " in m for m in messages) == 1, f"one warning for {entry}: {messages}"
    assert len(messages) == 8, messages
    with pytest.warns(AdapterStoreWarning):
        assert store.versions("bot") == [1] and store.resolve_number("bot") == 1
    with pytest.warns(AdapterStoreWarning):
        assert store.save("bot", peft_dir, {}).endswith("/v8"), "a half-written v7 is never written into again"


def test_an_unreadable_lost_found_does_not_break_listing(peft_dir):
    """A volume's lost+found is root's and mode 0700: the endpoint, running as another user,
    must still list the store (this made /v1/models answer 500)."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no way to become a user that cannot read the directory")
    with tempfile.TemporaryDirectory() as d:  # in /tmp, which the unprivileged user can reach
        os.chmod(d, 0o755)
        store = AdapterStore(Path(d) / "store")
        store.save("bot", peft_dir, {})
        for lost in (Path(d) / "store" / "lost+found", Path(d) / "store" / "bot" / "lost+found"):
            lost.mkdir(mode=0o700)
        os.chmod(Path(d) / "store" / "bot" / "lost+found", 0o000)
        subprocess.run(["chmod", "-R", "a+rX", str(Path(d) / "store" / "bot" / "v1")], check=True)
        code = f"import warnings; warnings.simplefilter('ignore'); from lorag.adapters import AdapterStore; s = AdapterStore({str(store.root)!r}); print(s.names(), s.versions('bot'))"
        cmd = [sys.executable, "-c", code]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.split() == ["['bot']", "[1]"], r.stderr


def test_a_tag_whose_version_was_removed_behind_the_stores_back_is_not_found(any_store, peft_dir):
    store = any_store
    for _ in range(2):
        store.save("bot", peft_dir, {})
    store.tag("bot", 2, "prod")
    delete(store, "bot/v2")
    with pytest.raises(AdapterNotFoundError, match=r"tag 'prod' of adapter 'bot' points at v2, which is no longer in the store .*'v1'.*lorag adapters tag bot@vN prod"):
        store.resolve("bot", "prod")
    assert store.resolve_number("bot") == 1, "latest falls back to the newest version left"
    assert store.tag("bot", 1, "prod") == 1 and store.resolve_number("bot", "prod") == 1, "moving the tag mends it"


def test_a_version_removed_while_being_read_is_not_found(any_store, peft_dir, tmp_path):
    """`resolve_number` saw the version, then another process removed it: reading it must
    answer "not found", never a FileNotFoundError from the filesystem."""
    store = any_store
    store.save("bot", peft_dir, {})
    store.save("bot", peft_dir, {})
    other = AdapterStore(store.root)  # the concurrent remover, in its own handle
    # The interleaving, made deterministic: this reader's listing stays what it saw before the removal.
    store.versions = lambda name: [1, 2]
    other.remove("bot", 2)
    for read in (lambda: store.metadata("bot", 2), lambda: store.fetch("bot", 2, tmp_path / "cache")):
        with pytest.raises(AdapterNotFoundError, match=r"'bot' v2 was removed from the store"):
            read()
    with pytest.raises(AdapterNotFoundError, match=r"'bot' v2 was removed"):
        store.remove("bot", 2)


@pytest.mark.parametrize("bad", ["v3\n", "3\n", "v1\n"])
def test_versions_with_a_trailing_newline_are_refused(tmp_path, peft_dir, bad):
    store = AdapterStore(tmp_path / "store")
    for _ in range(3):
        store.save("bot", peft_dir, {})
    with pytest.raises(ValueError, match="invalid adapter version"):
        store.resolve("bot", bad)


def test_names_and_tags_with_a_trailing_newline_are_refused(tmp_path, peft_dir):
    store = AdapterStore(tmp_path / "store")
    store.save("bot", peft_dir, {})
    for call in (lambda: store.save("bot\n", peft_dir, {}), lambda: store.resolve("bot\n")):
        with pytest.raises(ValueError, match="invalid adapter name"):
            call()
    with pytest.raises(ValueError, match="invalid tag"):
        store.tag("bot", 1, "prod\n")
    (tmp_path / "store" / "bot\n").mkdir()
    with pytest.warns(AdapterStoreWarning, match="not a valid adapter name"):
        assert store.names() == ["bot"]


def test_no_secret_reaches_a_saved_version(any_store, peft_dir):
    """The resolved config saved with every version holds the Milvus token, storage credentials
    in env_vars and URLs: none of them may be written, and the saved config must still load."""
    from lorag.config import LoragConfig, dump_config

    secrets = ["milvus-t0ken", "url-pa55", "aws-s3cret", "ghp-pip-t0ken"]
    cfg = LoragConfig.model_validate({
        "knowledge_bases": [{"name": "kb", "sources": ["docs/"], "uri": "http://root:url-pa55@milvus:19530", "token": "root:milvus-t0ken"}],
        "cluster": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "aws-s3cret", "AWS_ENDPOINT_URL": "http://minio:9000"},
                    "pip": ["git+https://ghp-pip-t0ken@github.com/acme/tool"]},
    })
    text = dump_config(cfg)
    assert all(s in text for s in secrets), "the test config must carry every secret"
    store = any_store
    store.save("bot", peft_dir, {"dataset": "s3://key:url-pa55@bucket/train.jsonl"}, config_yaml=text)
    saved = store.fetch("bot", 1, peft_dir.parent / "cache")
    for f in saved.iterdir():
        leaked = [s for s in secrets if s in f.read_text(errors="replace")]
        assert not leaked, f"{f.name} holds {leaked}"
    back = LoragConfig.model_validate(yaml.safe_load((saved / "lorag.yaml").read_text()))
    assert back.knowledge_bases[0].token == "<redacted>" and back.knowledge_bases[0].uri == "http://root:<redacted>@milvus:19530"
    assert back.cluster.env_vars == {"AWS_SECRET_ACCESS_KEY": "<redacted>", "AWS_ENDPOINT_URL": "http://minio:9000"}
    assert back.model_dump(exclude={"knowledge_bases", "cluster"}) == cfg.model_dump(exclude={"knowledge_bases", "cluster"}), "only secrets change"
    assert store.metadata("bot", 1)["dataset"] == "s3://key:<redacted>@bucket/train.jsonl"


def test_a_config_without_secrets_is_stored_byte_for_byte(tmp_path, peft_dir):
    store = AdapterStore(tmp_path / "store")
    text = "# resolved\nserve:\n  max_tokens: 16\n"
    assert (Path(store.save("bot", peft_dir, {}, config_yaml=text)) / "lorag.yaml").read_text() == text
