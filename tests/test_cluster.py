"""lorag against a running Ray cluster: `lorag submit`, `lorag jobs`, `lorag deploy` and plain
`ray job submit`, on a token-authenticated `ray start --head` on 127.0.0.1 that this module starts
(one head for all its tests) and stops; plus the address, token and upload rules without a cluster.
"""

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from hashlib import sha256
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO, free_port, project_copy, readme_block, write_config
from lorag.cluster import ClusterError, cluster
from lorag.config import parse_config
from lorag.submission import job_entrypoint
from lorag.upload import project_paths, project_runtime_env

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


# -- without a cluster ---------------------------------------------------------------------------


def test_address_and_token_precedence(tmp_path, monkeypatch):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ClusterError, match="no cluster address: pass --address"):
        cluster()
    with pytest.raises(ClusterError, match="Ray Client address"):
        cluster("ray://head:10001")
    cfg = parse_config({"cluster": {"address": "http://from-config:8265"}})
    monkeypatch.setenv("RAY_ADDRESS", "from-env:8265")
    assert cluster(None, None, cfg).address == "http://from-config:8265"
    assert cluster().address == "http://from-env:8265", "a bare host:port is the dashboard over http"
    assert cluster("http://flag:8265/", None, cfg).address == "http://flag:8265", "--address wins"

    assert cluster("h:1").token is None and cluster("h:1").headers == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert (cluster("h:1").token, cluster("h:1").token_source) == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert cluster("h:1").token == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert cluster("h:1").token == "from-env"
    c = cluster("h:1", "from-flag")
    assert (c.token, c.token_source, c.headers) == ("from-flag", "--token", {"Authorization": "Bearer from-flag"})


def test_config_must_be_uploaded_with_the_project(tmp_path):
    (tmp_path / "lorag.yaml").write_text("{}\n")
    with pytest.raises(ClusterError, match="is outside the project"):
        project_paths(tmp_path / "lorag.yaml")
    assert project_paths(REPO / "examples" / "quickstart" / "lorag.yaml") == (REPO, "examples/quickstart/lorag.yaml")
    with pytest.raises(ClusterError, match="under .lorag/, which is not uploaded"):
        project_paths(REPO / ".lorag" / "x" / "lorag.yaml")


def test_job_command_and_runtime_env():
    assert job_entrypoint("train", "a b/lorag.yaml", ["x"], ["adapters.x.train.max_steps=2"]) == (
        "python -m jobs.finetune --config 'a b/lorag.yaml' --adapter x --set adapters.x.train.max_steps=2"
    )
    assert job_entrypoint("ingest", "c.yaml", ["kb1", "kb2"]) == "python -m jobs.ingest --config c.yaml --kb kb1 --kb kb2"
    assert job_entrypoint("eval", "c.yaml", ["a"], None, "data/qa set.jsonl") == "python -m jobs.evaluate --config c.yaml --dataset 'data/qa set.jsonl' --adapter a"
    with pytest.raises(ValueError):
        job_entrypoint("eval", "c.yaml")
    cfg = parse_config({"cluster": {"pip": ["rich"], "env_vars": {"PYTHONPATH": "extra", "A": "1"}}})
    renv = project_runtime_env(cfg, REPO)
    assert renv["working_dir"] == str(REPO) and renv["pip"] == ["rich"]
    assert renv["env_vars"] == {"PYTHONPATH": f"platform{os.pathsep}extra", "A": "1"}
    assert {".venv", ".lorag", ".git", "__pycache__", "*.db"} <= set(renv["excludes"])


def test_runtime_env_refuses_env_vars_named_like_credentials():
    from lorag.config import ConfigError

    cfg = parse_config({"cluster": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "aws-s3cret", "HF_TOKEN": "hf-t0ken", "AWS_ENDPOINT_URL": "http://minio:9000"}}})
    with pytest.raises(ConfigError) as e:
        project_runtime_env(cfg, REPO)
    lines = str(e.value).splitlines()
    assert "nothing was uploaded" in lines[0] and len(lines) == 3, str(e.value)
    assert lines[1].strip().startswith("cluster.env_vars.AWS_SECRET_ACCESS_KEY: its value would be sent in plain text") and "HF_TOKEN" in lines[2]
    assert "aws-s3cret" not in str(e.value) and "hf-t0ken" not in str(e.value)


def test_deploy_ships_key_digests_and_the_gateway_accepts_the_keys(monkeypatch, tiny_model, model_cache):
    """The app's runtime_env (what Ray shows at /api/serve/applications/ and logs on every node) holds only
    sha256 digests of this machine's keys; a replica that gets that environment answers the keys, over
    real HTTP through the real app, and refuses the digests themselves as keys."""
    import json
    import threading

    import uvicorn

    from lorag.deploy import deploy_runtime_env
    from lorag.engine import Engine
    from lorag.gateway import Gateway, base_name, build_api

    keys = ["sk-deploy-one-1234", "sk-deploy-two-5678"]
    monkeypatch.setenv("LORAG_API_KEYS", ",".join(keys))
    cfg = parse_config({"base_model": str(tiny_model), "cache_dir": str(model_cache), "serve": {"host": "0.0.0.0", "max_tokens": 2}})
    renv = deploy_runtime_env(cfg, REPO)
    shipped = renv["env_vars"]["LORAG_API_KEYS"]
    assert not [k for k in keys if k in json.dumps(renv)], f"a key in plain text in the runtime_env: {renv['env_vars']}"
    assert sorted(shipped.split(",")) == sorted("sha256:" + sha256(k.encode()).hexdigest() for k in keys)

    monkeypatch.setenv("LORAG_API_KEYS", shipped)  # the replica's environment: the runtime_env's env_vars
    engine = Engine(cfg, str(tiny_model))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_api(Gateway(cfg, engine, engine.prompts)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        for key in keys:
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert r.status_code == 200, r.text
        body = {"model": base_name(cfg), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {keys[0]}"}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"], r.text
        for wrong in ["sk-deploy-three", shipped.split(",")[0], shipped.split(",")[0].removeprefix("sha256:"), None]:
            headers = {"Authorization": f"Bearer {wrong}"} if wrong else {}
            assert httpx.get(f"{url}/v1/models", headers=headers, timeout=30).status_code == 401, f"{wrong!r} must not be a key"
    finally:
        server.should_exit = True
        thread.join(30)
        engine.close()


SECRET_SETS = [
    # (--set, the field the one line names)
    ("knowledge_bases.tidewell-handbook.token=root:pa55word", "knowledge_bases.tidewell-handbook.token"),
    ("cluster.env_vars.AWS_SECRET_ACCESS_KEY=aws-s3cret", "cluster.env_vars.AWS_SECRET_ACCESS_KEY"),
    ("cluster.env_vars={HF_TOKEN: hf-t0ken, AWS_ENDPOINT_URL: 'http://minio:9000'}", "cluster.env_vars.HF_TOKEN"),
    ("knowledge_bases.tidewell-handbook.uri=http://root:pa55word@milvus:19530", "knowledge_bases.tidewell-handbook.uri"),
    ("storage=s3://AKIAEXAMPLE:s3cret@bucket/lorag", "storage"),
]


@pytest.mark.parametrize("override,field", SECRET_SETS, ids=[f for _, f in SECRET_SETS])
def test_submit_refuses_a_credential_in_set_before_contacting_the_cluster(tmp_path, override, field):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens: the refusal must come first
    r = _lorag("submit", "ingest", "-c", "examples/cluster/lorag.yaml", "--address", address, "--set", override, env=_client_env(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert f"--set {field}: a credential on the command line is sent in plain text in the job's entrypoint" in " ".join(out.split()), out
    assert "LORAG_MILVUS_TOKEN" in out and "uploading" not in out and "cannot reach" not in out and "Traceback" not in out, out
    secret = override.partition("=")[2]
    assert not [s for s in re.findall(r"[\w-]*(?:pa55|s3cret|t0ken)[\w-]*", secret) if s in out], f"the error repeats the secret: {out}"


def test_set_values_that_are_no_credentials_pass():
    from lorag.upload import secret_problems

    cfg = parse_config({})
    assert secret_problems(cfg, ["storage=s3://bucket/lorag", "knowledge_bases.kb.uri=http://milvus:19530", "knowledge_bases.kb.token=null",
                                 "cluster.env_vars.AWS_ENDPOINT_URL=http://minio:9000", "serve.api_keys=[{sha256: " + "a" * 64 + "}]"]) == []


def test_submit_without_a_cluster_says_so(tmp_path):
    r = _lorag("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}", env=_client_env(tmp_path))
    assert r.returncode == 1 and "cannot reach the Ray dashboard at http://127.0.0.1:" in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


# -- a token-authenticated head on 127.0.0.1 -----------------------------------------------------


class Head:
    def __init__(self, proc, address: str, token: str, temp_dir: str):
        self.proc, self.address, self.token, self.temp_dir = proc, address, token, temp_dir


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3_server):
    """`ray start --head` with token auth as Ray 2.60 turns it on: a token in the head's ~/.ray/auth_token
    (a temp HOME, so the developer's ~/.ray plays no part). The node has S3 credentials and endpoint
    (the loopback S3 server's) in its environment, as a cluster's nodes would. Stopped by SIGTERM to its `--block` process,
    which takes down the processes it started; never `ray stop`, which stops every Ray on the machine."""
    home = tmp_path_factory.mktemp("head-home")
    token = secrets.token_hex(32)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    # Ray's unix sockets live under the temp dir and must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="lr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    # On SIGTERM a node first drains for up to 30 s so that Serve can move replicas away (for
    # Kubernetes upgrades); this head has nowhere to move them, so it tears down at once.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                                            "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")}
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--num-cpus", "4",
           "--include-dashboard", "true", "--temp-dir", temp_dir, "--object-store-memory", str(400 * 2**20), "--disable-usage-stats"]
    for name, port in ports.items():
        cmd += [f"--{name}", str(port)]
    log = open(tmp_path_factory.mktemp("head-log") / "ray-start.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(proc, f"http://127.0.0.1:{ports['dashboard-port']}", token, temp_dir)
    try:
        # Ready when the dashboard answers (401: token auth is on) and the job agent listens.
        deadline = time.monotonic() + 180
        while not (_status(h.address + "/api/version") == 401 and _listening(ports["dashboard-agent-listen-port"])):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"ray start --head did not come up (exit {proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(1)
        yield h
    finally:
        _stop_head(proc, temp_dir)
        log.close()


@pytest.fixture(scope="module")
def project(head, tmp_path_factory, tiny_model, model_cache, embedder_path):
    """A test config inside the repository (submit uploads only the project), with its outputs (Milvus
    Lite file, adapter store) at absolute paths outside it, where the jobs on this machine write them."""
    root = REPO / "tests" / f"_cluster_{os.getpid()}"
    out = tmp_path_factory.mktemp("cluster-out")
    try:
        write_config(root, tiny_model, model_cache)
        data = yaml.safe_load((root / "lorag.yaml").read_text())
        data.update(workdir=str(out / "work"), storage=str(out / "store"))
        (root / "lorag.yaml").write_text(yaml.safe_dump(data))
        yield root / "lorag.yaml"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_token_missing_or_wrong_is_one_clear_line(head, tmp_path):
    r = _lorag("jobs", "list", "--address", head.address, "--token", "wrong", env=_client_env(tmp_path, RAY_AUTH_TOKEN=head.token))
    assert r.returncode == 1, r.stdout
    assert "rejected the Ray auth token from --token (HTTP 403)" in r.stdout and "RAY_AUTH_TOKEN" in r.stdout, r.stdout
    r = _lorag("submit", "ingest", "-c", "examples/quickstart/lorag.yaml", "--address", head.address, "--no-follow",
               env=_client_env(tmp_path, RAY_AUTH_TOKEN="wrong"))
    assert r.returncode == 1 and "rejected the Ray auth token from RAY_AUTH_TOKEN" in r.stdout, r.stdout + r.stderr
    r = _lorag("jobs", "list", "--address", head.address, env=_client_env(tmp_path))
    assert r.returncode == 1 and "requires a Ray auth token (HTTP 401) and none was sent" in r.stdout, r.stdout
    assert "copy the head's ~/.ray/auth_token" in r.stdout
    for out in (r.stdout, r.stderr):
        assert "Traceback" not in out, out
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(head.token)  # the head's token file, copied
    r = _lorag("jobs", "list", "--address", head.address, env=_client_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_no_follow_then_stop(head, project, tmp_path):
    """--no-follow returns with the job id; `jobs stop` stops it; `jobs logs --follow` then exits 1 with STOPPED."""
    rel = project.relative_to(REPO).as_posix()
    env = _client_env(tmp_path, RAY_AUTH_TOKEN=head.token)
    r = _lorag("submit", "ingest", "-c", rel, "--address", head.address, "--no-follow", env=env)
    assert r.returncode == 0 and "lorag jobs stop lorag-ingest-" in r.stdout, r.stdout + r.stderr
    job = re.search(r"submitted job (lorag-ingest-[0-9a-f-]+)", r.stdout).group(1)
    r = _lorag("jobs", "stop", job, "--address", head.address, env=env)
    assert r.returncode == 0 and f"stopping {job}" in r.stdout, r.stdout + r.stderr
    r = _lorag("jobs", "logs", job, "--follow", "--address", head.address, env=env)
    assert r.returncode == 1 and f"job {job} STOPPED" in r.stdout, r.stdout + r.stderr
    r = _lorag("jobs", "stop", "no-such-job", "--address", head.address, env=env)
    assert r.returncode == 1 and "does not exist" in r.stdout and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.slow
def test_plain_ray_job_submit_and_lorag_from_the_upload(head, project, tmp_path):
    """`ray job submit --working-dir .` from the repository root works as the README says, and the
    job's driver and workers import lorag from the uploaded copy, not from this checkout."""
    from ray.job_submission import JobSubmissionClient

    rel = project.relative_to(REPO).as_posix()
    env = _client_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token)
    r = subprocess.run([RAY, "job", "submit", "--address", head.address, "--working-dir", ".", "--", "python", "-m", "jobs.ingest", "--config", rel],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "handbook: 8 documents" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]

    where = ("import ray, lorag; from lorag.cluster import connect; connect(); "
             "print('driver', lorag.__file__); print('worker', ray.get(ray.remote(lambda: __import__('lorag').__file__).remote()))")
    r = subprocess.run([RAY, "job", "submit", "--address", head.address, "--working-dir", ".", "--", "python", "-c", "import jobs; " + where],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _assert_from_upload(r.stdout)

    # lorag submit's runtime_env does the same without the jobs/ bootstrap.
    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    job = client.submit_job(entrypoint=f"python -c \"{where}\"", runtime_env=project_runtime_env(parse_config({}), REPO))
    deadline = time.monotonic() + 300
    while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job).value == "SUCCEEDED", logs[-3000:]
    _assert_from_upload(logs)


REMOTE = "http://head.example:8265"  # never contacted: check_for_cluster makes no request


@pytest.mark.parametrize("config,overrides,kind,address,nodes,problems", [
    # the laptop config: every output lies inside the uploaded project
    ("examples/quickstart/lorag.yaml", [], "train", REMOTE, 1, ["storage: .lorag/quickstart is inside the project", "knowledge_bases.tidewell-handbook.uri: .lorag/quickstart/milvus.db"]),
    ("examples/quickstart/lorag.yaml", [], "ingest", "http://127.0.0.1:8265", 1, ["knowledge_bases.tidewell-handbook.uri: .lorag/quickstart/milvus.db"]),
    # the shipped cluster config passes everywhere, for every kind
    ("examples/cluster/lorag.yaml", [], "ingest", REMOTE, 3, []),
    ("examples/cluster/lorag.yaml", [], "train", REMOTE, 3, []),
    ("examples/cluster/lorag.yaml", [], "deploy", REMOTE, None, []),
    # an endpoint bound to loopback is refused for a remote cluster only
    ("examples/cluster/lorag.yaml", ["serve.host=127.0.0.1"], "deploy", REMOTE, 1, ["serve.host: 127.0.0.1"]),
    ("examples/cluster/lorag.yaml", ["serve.host=127.0.0.1"], "deploy", "http://127.0.0.1:8265", 1, []),
    # inputs only this machine has: refused for a remote cluster, fine for one on this machine
    ("examples/cluster/lorag.yaml", ["knowledge_bases.tidewell-handbook.sources=[/srv/docs]"], "ingest", REMOTE, 1, ["knowledge_bases.tidewell-handbook.sources: /srv/docs is on this machine only"]),
    ("examples/cluster/lorag.yaml", ["knowledge_bases.tidewell-handbook.sources=[/srv/docs]"], "ingest", "http://127.0.0.1:8265", 1, []),
    ("examples/cluster/lorag.yaml", ["base_model=/srv/models/llama"], "train", REMOTE, 1, ["base_model: /srv/models/llama is on this machine only"]),
    # one node's disk on a cluster of several nodes
    ("examples/cluster/lorag.yaml", ["knowledge_bases.tidewell-handbook.uri=/srv/kb.db", "storage=/srv/store"], "train", "http://127.0.0.1:8265", 2,
     ["storage: /srv/store is on one node's disk, and the cluster at http://127.0.0.1:8265 has 2 nodes", "knowledge_bases.tidewell-handbook.uri: /srv/kb.db is on one node's disk"]),
    ("examples/cluster/lorag.yaml", ["knowledge_bases.tidewell-handbook.uri=/srv/kb.db", "storage=/srv/store"], "train", "http://127.0.0.1:8265", 1, []),
    # ingest writes no artifacts: local storage does not matter to it
    ("examples/cluster/lorag.yaml", ["storage=/srv/store"], "ingest", REMOTE, 2, []),
])
def test_a_config_that_cannot_run_on_the_cluster_is_refused_before_upload(config, overrides, kind, address, nodes, problems):
    from lorag.cluster import Cluster
    from lorag.upload import check_for_cluster
    from lorag.config import ConfigError, load_config

    cfg = load_config(REPO / config, overrides)
    if not problems:
        check_for_cluster(cfg, REPO, Cluster(address), kind, None, nodes)
        return
    with pytest.raises(ConfigError) as e:
        check_for_cluster(cfg, REPO, Cluster(address), kind, None, nodes)
    lines = str(e.value).splitlines()
    assert "nothing was uploaded" in lines[0] and len(lines) == 1 + len(problems), str(e.value)
    for line, problem in zip(lines[1:], problems):
        assert line.strip().startswith(problem), str(e.value)


@pytest.mark.slow
def test_submit_refuses_the_laptop_config_before_uploading(head, tmp_path):
    """The quickstart's outputs lie inside the project: `lorag submit` says so in one line (exit 2) and submits nothing."""
    env = _client_env(tmp_path, RAY_AUTH_TOKEN=head.token)
    before = _lorag("jobs", "list", "--address", head.address, env=env).stdout.count("lorag-ingest-")
    r = _lorag("submit", "ingest", "-c", "examples/quickstart/lorag.yaml", "--address", head.address, env=env)
    assert r.returncode == 2 and "knowledge_bases.tidewell-handbook.uri: .lorag/quickstart/milvus.db is inside the project" in r.stdout, r.stdout + r.stderr
    assert "uploading" not in r.stdout and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert _lorag("jobs", "list", "--address", head.address, env=env).stdout.count("lorag-ingest-") == before, "nothing was submitted"


def test_ray_try_again_later_is_retried_with_backoff_for_a_bounded_time():
    from lorag.cluster import retry_later

    calls = []

    def flaky(fails: int, message: str):
        def call():
            calls.append(time.monotonic())
            if len(calls) <= fails:
                raise RuntimeError(message)
            return "submitted"
        return call

    assert retry_later(flaky(2, "Request failed with status code 500: No available agent to submit job, please try again later."), within_s=5, first_wait_s=0.05) == "submitted"
    assert len(calls) == 3 and calls[2] - calls[1] > calls[1] - calls[0] > 0.04, "waits grow between tries"
    calls.clear()
    with pytest.raises(RuntimeError, match="quota exceeded"):  # anything else: at once
        retry_later(flaky(1, "quota exceeded"), within_s=5, first_wait_s=0.05)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(RuntimeError, match="try again later"):  # bounded: the last answer after `within_s`
        retry_later(flaky(100, "please try again later"), within_s=0.3, first_wait_s=0.05)
    assert 2 <= len(calls) < 10


# -- the README's cluster block, as written ----------------------------------------------------


@pytest.mark.slow
def test_the_readmes_cluster_block_runs_as_written(head, s3, tmp_path, tiny_model):
    """Every line of the README's cluster block, run from a copy of the project with only HOST, the bucket,
    the token and the job id filled in, against a token-auth head, a Milvus server and an S3 bucket on
    loopback. The copied examples/cluster/lorag.yaml gets the same substitutions, and for time a tiny
    model, 2 training steps on one worker, a workdir under the test's, and the endpoint on loopback and a
    free port (tests bind no other address)."""
    import shlex

    from lorag.standalone import local_server

    lines = readme_block("## Run on a Ray cluster")
    assert any("lorag submit ingest" in line for line in lines) and any("lorag deploy" in line for line in lines), lines
    project = project_copy(tmp_path / "project")
    port = free_port()
    bucket = s3.removeprefix("s3://")
    with local_server(tmp_path / "milvus") as milvus_uri:
        milvus_host = milvus_uri.removeprefix("http://")
        config = project / "examples" / "cluster" / "lorag.yaml"
        text = (config.read_text().replace("http://HOST:19530", f"http://{milvus_host}").replace("my-bucket", bucket)
                .replace("base_model: smollm2-135m-instruct", f"base_model: {tiny_model}").replace("max_steps: 16", "max_steps: 2")
                .replace("num_workers: 2", "num_workers: 1").replace("max_seq_len: 640", "max_seq_len: 384")
                .replace("host: 0.0.0.0", "host: 127.0.0.1").replace("port: 8000", f"port: {port}").replace("workdir: /tmp/lorag", f"workdir: {tmp_path / 'work'}"))
        config.write_text(text)
        env = _client_env(tmp_path)
        job_id = None
        for line in lines:
            line = line.split("   #")[0].split("    #")[0].strip()
            line = (line.replace("http://HOST:8265", head.address).replace("http://HOST:8000", f"http://127.0.0.1:{port}")
                    .replace("RAY_AUTH_TOKEN=...", f"RAY_AUTH_TOKEN={head.token}"))
            if "JOB_ID" in line:
                assert job_id, f"no job id printed before {line!r}"
                line = line.replace("JOB_ID", job_id)
            assert "HOST" not in line and "..." not in line, f"a placeholder the test does not know: {line!r}"
            words = shlex.split(line)
            if words[0] == "export":
                env.update(w.split("=", 1) for w in words[1:])
                continue
            extra = {}
            while "=" in words[0] and not words[0].startswith("."):
                k, v = words.pop(0).split("=", 1)
                extra[k] = v
            r = subprocess.run(words, cwd=project, env={**env, **extra}, capture_output=True, text=True, timeout=900)
            out = r.stdout + r.stderr
            assert r.returncode == 0, f"{line}\n{out[-4000:]}"
            assert "Traceback" not in r.stderr, f"{line}\n{out[-4000:]}"  # lorag's own output (a job's logs are Ray's)
            if " submit train " in line:
                job_id = re.search(r"submitted job (lorag-train-[0-9a-z-]+)", r.stdout).group(1)
            if " submit ingest " in line:
                assert "tidewell-handbook: 8 documents" in r.stdout and "SUCCEEDED" in r.stdout, r.stdout[-3000:]
            if " jobs logs " in line:
                assert "tidewell-support v1:" in r.stdout and "SUCCEEDED" in r.stdout, r.stdout[-3000:]
            if " submit eval " in line:
                assert "SUCCEEDED" in r.stdout and "tidewell-support+rag" in r.stdout and "stored with the adapter: s3://" in r.stdout, r.stdout[-3000:]
            if " deploy " in line:
                assert f"lorag is RUNNING at http://127.0.0.1:{port}/v1" in r.stdout, r.stdout[-3000:]
            if " ask " in line:
                assert "[1] 05-error-codes.md" in r.stdout, r.stdout[-3000:]  # the page with TW-E417, cited under the answer
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 401, "the deployed endpoint wants a key"
    from lorag.adapters import AdapterStore

    assert AdapterStore(f"{s3}/lorag/adapters").versions("tidewell-support") == [1], "the adapter lives in the bucket"


# -- helpers -------------------------------------------------------------------------------------


def _lorag(*args: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _client_env(home: Path, **extra: str) -> dict:
    """This process's environment without any Ray address or token, HOME at `home`, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER", "LORAG_API_KEYS"))}
    env.update(HOME=str(home), COLUMNS="200", **extra)
    return env


def _assert_from_upload(out: str) -> None:
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("driver ", "worker ")))
    for who in ("driver", "worker"):
        assert "runtime_resources/working_dir_files/" in lines[who] and lines[who].endswith("platform/lorag/__init__.py"), (who, out[-2000:])


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    # Anything of this head that outlived it (its processes name its temp dir), by pid.
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if temp_dir.encode() in (pid_dir / "cmdline").read_bytes():
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)
