"""The `lorag` CLI: help for every command, and config errors printed as field paths (exit 2), never a traceback."""

import os
import re
import subprocess
import sys
from typing import get_args

import pytest
import typer
from typer.testing import CliRunner

from conftest import free_port
from lorag.cli import app
from lorag.sections import KnowledgeBaseConfig, SearchMode, ServeConfig

runner = CliRunner()
COMMANDS = ["quickstart", "ingest", "train", "serve", "ask", "eval", "adapters", "kb", "submit", "jobs", "deploy", "k8s", "config"]


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


# Every option that mirrors a config field: (command, option, config model, field). They are built by
# lorag.cli.options.field_option from the field, so the command line accepts what the config accepts.
MIRRORED = [
    (["kb", "search"], "-k", KnowledgeBaseConfig, "top_k"),
    (["ask"], "--max-tokens", ServeConfig, "max_tokens"),
    (["eval"], "--max-tokens", ServeConfig, "max_tokens"),
    (["eval"], "--threshold", ServeConfig, "route_threshold"),
]


def _leaf(path: list[str]):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _option(path: list[str], flag: str):
    return next(p for p in _leaf(path).params if flag in p.opts)


@pytest.mark.parametrize("path,flag,model,field", MIRRORED, ids=[f"{' '.join(m[0])} {m[1]}" for m in MIRRORED])
def test_options_that_mirror_a_config_field_have_its_bounds(path, flag, model, field):
    bounds = {"ge": None, "le": None}
    for constraint in model.model_fields[field].metadata:
        bounds.update({k: getattr(constraint, k) for k in bounds if getattr(constraint, k, None) is not None})
    assert bounds["ge"] is not None, f"{model.__name__}.{field} has no lower bound: is it still the field this option mirrors?"
    param = _option(path, flag)
    # click keeps the bounds on the type (IntRange); the typer that vendors click, on the parameter
    lo, hi = (getattr(param, "min", None), getattr(param, "max", None)) if hasattr(param, "min") else (param.type.min, param.type.max)
    assert (lo, hi) == (bounds["ge"], bounds["le"]), (
        f"lorag {' '.join(path)} {flag} allows {lo}..{hi} but {model.__name__}.{field} allows {bounds['ge']}..{bounds['le']}: "
        "build the option with lorag.cli.options.field_option")


def test_search_mode_choices_are_the_configs():
    modes = get_args(KnowledgeBaseConfig.model_fields["search"].annotation)
    assert modes == get_args(SearchMode) and len(modes) == 3
    cmd = _leaf(["kb", "search"])
    for mode in modes:
        cmd.make_context("search", ["q", "--kb", "x", "--mode", mode])  # parses: a choice of the config is a choice here
    r = runner.invoke(app, ["kb", "search", "q", "--kb", "x", "--mode", "sparse"])
    assert r.exit_code == 2 and "sparse" in r.output and "Traceback" not in r.output, r.output


GOAWAY = """
import sys, time
from concurrent import futures
from lorag.cli import app  # as the `lorag` script: the CLI module first, its options next, gRPC after
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
import grpc
# A server that allows no pings, and a client pinging every 100 ms: gRPC's C core logs the server's GOAWAY
# ("too_many_pings") to stderr, as the Milvus client's channel does after an idle minute.
server = grpc.server(futures.ThreadPoolExecutor(1), options=[("grpc.http2.min_ping_interval_without_data_ms", 600000), ("grpc.http2.max_ping_strikes", 1)])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.keepalive_time_ms", 100), ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)])
grpc.channel_ready_future(channel).result(timeout=10)
time.sleep(5)  # the GOAWAY comes 2-3 s in
print("done")
"""


def test_grpc_log_lines_stay_out_of_a_commands_output_unless_verbose():
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    quiet = subprocess.run([sys.executable, "-c", GOAWAY, "eval", "--help"], capture_output=True, text=True, env=env, timeout=120)
    loud = subprocess.run([sys.executable, "-c", GOAWAY, "--verbose", "eval", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "too_many_pings" in loud.stderr, "the scenario must make gRPC log a GOAWAY, or this test shows nothing"
    assert "GOAWAY" not in quiet.stderr and "too_many_pings" not in quiet.stderr, quiet.stderr


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
    assert store.resolve("bot", "prod").endswith("/v1")
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


@pytest.mark.slow
def test_one_config_trains_two_adapters_and_lists_both_with_metrics(tmp_path, tiny_model, model_cache):
    """`lorag train` with no -a trains every adapter of the config; `adapters list` shows each with its losses."""
    import shutil

    import yaml

    from conftest import REPO, write_config

    write_config(tmp_path, tiny_model, model_cache)
    data = yaml.safe_load((tmp_path / "lorag.yaml").read_text())
    # No knowledge base needed, and one worker each: this checks the command, not distributed training.
    data["adapters"][0]["train"].update(with_retrieval=False, num_workers=1)
    shutil.copy(REPO / "examples" / "two-adapters" / "brief.jsonl", tmp_path / "brief.jsonl")
    data["adapters"].append({"name": "brief", "dataset": "brief.jsonl", "system_prompt": "One sentence.", "train": {"max_steps": 2, "batch_size": 2, "num_workers": 1}})
    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump(data))

    cli = [sys.executable, "-m", "lorag.cli"]
    r = subprocess.run([*cli, "train", "-c", str(tmp_path / "lorag.yaml")], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "support v1: train loss" in out and "brief v1: train loss" in out and "(base model " in out, out[-3000:]

    r = subprocess.run([*cli, "adapters", "list", "-c", str(tmp_path / "lorag.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in r.stdout.splitlines() if line.startswith("│")]
    rows = {row[0]: row for row in cells if row[0]}
    assert set(rows) == {"support", "brief"}, r.stdout
    for name, (_, versions, _, method, kb, val, base, _) in rows.items():
        assert versions == "v1" and method == "lora" and kb == ("handbook" if name == "support" else "-"), r.stdout
        assert re.fullmatch(r"\d+\.\d{3}", val) and re.fullmatch(r"\d+\.\d{3}", base), f"{name} shows its validation and base loss: {r.stdout}"


@pytest.mark.slow
def test_kb_ingest_list_search_drop(tmp_path, tiny_model, model_cache):
    """The knowledge-base commands on a real Milvus Lite file, each a separate process as a user runs them."""
    from conftest import write_config

    write_config(tmp_path, tiny_model, model_cache)
    (tmp_path / "corpus" / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    cfg = ["-c", str(tmp_path / "lorag.yaml")]
    kb = [sys.executable, "-m", "lorag.cli", "kb"]

    r = subprocess.run([*kb, "ingest", *cfg], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"skipped \S*broken\.pdf: .*PDF", r.stdout), f"the bad PDF is reported with its reason: {r.stdout}"
    assert "9 documents (0 unchanged, 8 indexed, 1 failed)" in r.stdout, r.stdout

    r = subprocess.run([*kb, "list", *cfg], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    row = next(line for line in r.stdout.splitlines() if line.startswith("│ handbook"))
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[2] == "8" and int(cells[3]) > 8 and cells[4] == "hybrid" and "BM25 in lorag" in cells[5], row

    r = subprocess.run([*kb, "search", "TW-E417", "--kb", "handbook", "--mode", "bm25", "-k", "2", *cfg], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first = r.stdout.split("[2]")[0]
    assert first.startswith("[1]") and "05-error-codes.md:" in first and "TW-E417" in first and "Error Codes" in first, r.stdout

    r = subprocess.run([*kb, "search", "x", "--kb", "nope", *cfg], capture_output=True, text=True)
    assert r.returncode == 2 and "no knowledge base 'nope'" in r.stdout + r.stderr

    r = subprocess.run([*kb, "drop", "handbook", "--yes", *cfg], capture_output=True, text=True)
    assert r.returncode == 0 and "dropped handbook" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*kb, "search", "TW-E417", "--kb", "handbook", *cfg], capture_output=True, text=True)
    assert r.returncode == 1 and "run `lorag kb ingest` first" in r.stdout + r.stderr


@pytest.mark.slow
def test_serve_stops_on_sigterm_like_ctrl_c(tmp_path, tiny_model, model_cache):
    """SIGTERM (systemd, Docker, Kubernetes) ends `lorag serve` as Ctrl-C does: the request in flight is
    answered, lorag's Serve app is deleted, exit 0, and no stack dump (Ray's own handler prints one)."""
    import signal
    import threading
    import time

    import httpx
    import yaml

    from conftest import REPO, write_config

    write_config(tmp_path, tiny_model, model_cache)
    data = yaml.safe_load((tmp_path / "lorag.yaml").read_text())
    data["knowledge_bases"], data["adapters"] = [], []  # the base model alone: this checks the stop, not retrieval
    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump(data))
    url = f"http://127.0.0.1:{data['serve']['port']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "LORAG_API_KEYS"))}
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "lorag.cli", "serve", "-c", str(tmp_path / "lorag.yaml")], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "lorag is serving at" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, f"lorag serve did not come up:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        answer: dict = {}
        body = {"model": httpx.get(f"{url}/v1/models").json()["data"][0]["id"], "messages": [{"role": "user", "content": "Count."}], "max_tokens": 400,
                "temperature": 0, "retrieval": False}
        asking = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)))
        asking.start()
        time.sleep(0.5)  # in flight
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        asking.join(timeout=60)
        out = log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: stopping lorag's endpoint" in out, out[-3000:]
    for dump in ("Traceback", "SIGTERM received"):
        assert dump not in out, out[-3000:]
    assert answer["r"].status_code == 200 and answer["r"].json()["usage"]["completion_tokens"] > 0, answer
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/v1/models", timeout=5)


@pytest.mark.slow
def test_the_readmes_step_by_step_block_runs_as_written(tmp_path, tiny_model):
    """README's "The same steps one by one" block, each line as written from a copy of the project: ingest,
    train, serve (in the background, "in one terminal"), ask. The copied quickstart config gets the tiny
    model (for time) and a free port, which the ask line gets as --url; its workdir stays in the copy."""
    import shlex
    import signal
    import time

    from conftest import project_copy, readme_block

    lines = readme_block("The same steps one by one")
    assert [shlex.split(line)[1] for line in lines] == ["ingest", "train", "serve", "ask"], lines
    project = project_copy(tmp_path / "project")
    port = free_port()
    config = project / "examples" / "quickstart" / "lorag.yaml"
    text = config.read_text()
    assert "base_model: smollm2-135m-instruct" in text and "  port: 8000" in text
    config.write_text(text.replace("base_model: smollm2-135m-instruct", f"base_model: {tiny_model}").replace("  port: 8000", f"  port: {port}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "LORAG_API_KEYS"))} | {"COLUMNS": "200"}
    server = None
    try:
        for line in lines:
            words = shlex.split(line.split("#")[0])
            if words[1] == "serve":
                log = open(tmp_path / "serve.log", "w")
                server = subprocess.Popen(words, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                deadline = time.monotonic() + 300
                while "lorag is serving at" not in (tmp_path / "serve.log").read_text():
                    assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                    time.sleep(1)
                continue
            if words[1] == "ask":
                words += ["--url", f"http://127.0.0.1:{port}"]
            r = subprocess.run(words, cwd=project, env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, f"{line}\n{(r.stdout + r.stderr)[-4000:]}"
            if words[1] == "ingest":
                assert "tidewell-handbook: 8 documents" in r.stdout, r.stdout[-3000:]
            if words[1] == "train":
                assert "tidewell-support v1: train loss" in r.stdout and "in 10 steps" in r.stdout, r.stdout[-3000:]
            if words[1] == "ask":
                assert "[1] 05-error-codes.md" in r.stdout, r.stdout[-3000:]  # the page with TW-E417, cited under the answer
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert (project / ".lorag" / "quickstart" / "adapters" / "tidewell-support" / "v1" / "adapter_model.safetensors").is_file()
