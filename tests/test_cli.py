"""The `lorag` CLI: help for every command, and config errors printed as field paths (exit 2), never a traceback."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lorag.cli import app

runner = CliRunner()
COMMANDS = ["quickstart", "ingest", "train", "serve", "ask"]


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
