"""What a node copies from storage (`lorag.storage.fetch_dir`): nothing lands outside its cache,
and no file appears under its name before its sha256 is checked.

    .venv/bin/python -m pytest -q tests/test_storage.py
"""

import hashlib
import os
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "name, why",
    [
        ("config.json", None),
        ("sub/dir/weights.safetensors", None),
        ("..hidden/..x", None),  # dots inside a component are an ordinary name
        ("../evil", "has an empty, '.' or '..' component"),
        ("a/../../evil", "has an empty, '.' or '..' component"),
        ("a/./b", "has an empty, '.' or '..' component"),
        ("a//b", "has an empty, '.' or '..' component"),
        ("", "has an empty, '.' or '..' component"),
        ("/etc/x", "is absolute"),
    ],
)
def test_contained_table(tmp_path, name, why):
    from lorag.storage import contained

    if why is None:
        assert contained(tmp_path, name, "s3://b/m") == tmp_path / name
        return
    with pytest.raises(ValueError) as e:
        contained(tmp_path, name, "s3://b/m")
    assert f"refusing to fetch s3://b/m: its file {name!r} {why}" in str(e.value), str(e.value)


def test_a_name_resolving_through_a_link_outside_is_refused(tmp_path):
    from lorag.storage import contained

    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="'link/x' resolves outside the copy"):
        contained(tmp_path / "copy", "link/x", "s3://b/m")


@pytest.mark.parametrize("key", ["m/../../../escaped/evil", "m/{abs}/evil"], ids=["dotdot", "absolute"])  # short: the bucket is named after the test
def test_escaping_names_are_refused(s3, tmp_path, key):
    """Nothing is written outside the cache. An S3 listing is whatever keys the bucket holds: `m/../../../escaped/evil` lists as the
    relative name `../../../escaped/evil`, and `m//tmp/...` as an absolute one. Joined onto the
    copy's directory they point outside the cache (here: beside it, in tmp_path)."""
    import boto3

    bucket = s3.removeprefix("s3://")
    key = key.format(abs=str(tmp_path / "absolute"))
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=bucket, Key="m/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=key, Body=b"written outside the cache")
    from lorag.storage import fetch_dir

    with pytest.raises(ValueError) as e:
        fetch_dir(f"{s3}/m", tmp_path / "cache")
    assert str(e.value).startswith(f"refusing to fetch {s3}/m: its file {key.removeprefix('m/')!r}"), str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["cache"], "nothing may be created outside the cache directory"
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".lock"], "nothing is downloaded"


def test_a_corrupt_file_is_never_visible_under_its_name(tmp_path):
    """The recorded sha256 of `a.bin` does not match what storage holds: the fetch fails naming
    it, and no file by that name (nor the good file beside it) is left anywhere in the cache."""
    from lorag.storage import fetch_dir

    store = tmp_path / "store"
    store.mkdir()
    (store / "a.bin").write_bytes(b"corrupted on disk")
    (store / "b.bin").write_bytes(b"fine")
    expected = {"a.bin": hashlib.sha256(b"what was saved").hexdigest(), "b.bin": hashlib.sha256(b"fine").hexdigest()}
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"store: a\.bin has sha256 [0-9a-f]{64}, not the [0-9a-f]{64} recorded when it was saved"):
        fetch_dir(str(store), cache, expected)
    left = [p.relative_to(cache).as_posix() for p in cache.rglob("*")]
    assert not [p for p in left if Path(p).name.startswith(("a.bin", "b.bin"))], left
    assert not [p for p in left if ".tmp-" in p], f"the unfinished copy is removed: {left}"

    (store / "a.bin").write_bytes(b"what was saved")  # repaired: the same call now gives a verified copy
    copy = fetch_dir(str(store), cache, expected)
    assert (copy / "a.bin").read_bytes() == b"what was saved" and (copy / "b.bin").read_bytes() == b"fine"
    assert sorted(p.name for p in copy.iterdir()) == [".lorag-fetched.json", "a.bin", "b.bin"], "no temporary file is left beside them"


def test_a_file_the_record_lists_but_storage_lacks_fails_the_fetch(tmp_path):
    from lorag.storage import fetch_dir

    store = tmp_path / "store"
    store.mkdir()
    (store / "b.bin").write_bytes(b"fine")
    expected = {"a.bin": "0" * 64, "b.bin": hashlib.sha256(b"fine").hexdigest()}
    with pytest.raises(ValueError, match=r"\['a\.bin'\] listed in the recorded sha256 but missing in storage"):
        fetch_dir(str(store), tmp_path / "cache", expected)
    assert not list((tmp_path / "cache" / "fetched").glob("*/b.bin")), "no copy is made"
