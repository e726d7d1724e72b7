"""The `lorag` CLI: help for every command, and config errors printed as field paths (exit 2), never a traceback."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lorag.cli import app

runner = CliRunner()
COMMANDS = ["quickstart", "ingest", "train", "serve", "ask", "adapters"]


def test_top_level_help_lists_every_command():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in r.output
    assert "LoRA" in r.output and "knowledge bases" in r.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_explains_itself(cmd):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and len(r.output.splitlines()) > 5


@pytest.mark.parametrize("cmd", ["ingest", "train", "serve"])
def test_bad_config_is_a_field_error_not_a_traceback(tmp_path, cmd):
    bad = tmp_path / "lorag.yaml"
    bad.write_text("adapters:\n  - name: Bad Name\n    dataset: d.jsonl\n    lora: {rank: 4}\n")
    r = subprocess.run([sys.executable, "-m", "lorag.cli", cmd, "-c", str(bad)], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "adapters.0.name" in out and "adapters.0.lora.rank: unknown key" in out
    assert "Traceback" not in out


def test_unknown_names_are_rejected_before_ray_starts(tmp_path):
    (tmp_path / "lorag.yaml").write_text("adapters: []\n")
    r = subprocess.run([sys.executable, "-m", "lorag.cli", "train", "-c", str(tmp_path / "lorag.yaml"), "-a", "ghost"], capture_output=True, text=True)
    assert r.returncode == 2 and "no adapter 'ghost'" in r.stdout + r.stderr


def test_ask_without_a_server_says_so():
    r = runner.invoke(app, ["ask", "hi", "-m", "x", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 1 and "Is `lorag serve` running?" in r.output


def test_adapters_list_show_tag_rm(tmp_path):
    """The store commands on a real store: two versions, a tag that resolves, a guarded delete."""
    from lorag.adapters import AdapterStore

    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"w")
    store = AdapterStore(tmp_path / "store")
    store.save("bot", src, {"knowledge_base": "kb", "metrics": {"val_loss": 1.25, "base_val_loss": 2.5}})
    store.save("bot", src, {"knowledge_base": "kb", "metrics": {"val_loss": 1.0, "base_val_loss": 2.5}})
    opts = ["--store", str(tmp_path / "store")]

    r = runner.invoke(app, ["adapters", "list", *opts])
    assert r.exit_code == 0 and "bot" in r.output and "v1, v2" in r.output and "1.000" in r.output and "2.500" in r.output, r.output
    r = runner.invoke(app, ["adapters", "tag", "bot@v1", "prod", *opts])
    assert r.exit_code == 0 and "bot@prod -> v1" in r.output
    assert store.resolve("bot", "prod").name == "v1"
    r = runner.invoke(app, ["adapters", "show", "bot@prod", *opts])
    assert r.exit_code == 0 and '"version": 1' in r.output
    r = runner.invoke(app, ["adapters", "tag", "bot@v1", "v2", *opts])
    assert r.exit_code == 1 and "invalid tag" in r.output
    r = runner.invoke(app, ["adapters", "rm", "bot", *opts])
    assert r.exit_code == 2 and "say which version" in r.output
    r = runner.invoke(app, ["adapters", "rm", "bot@prod", "--yes", *opts])
    assert r.exit_code == 0 and store.versions("bot") == [2] and store.tags("bot") == {}, "removing v1 also drops the tag that pointed at it"
    r = runner.invoke(app, ["adapters", "show", "../etc", *opts])
    assert r.exit_code == 1 and "invalid adapter name" in r.output
