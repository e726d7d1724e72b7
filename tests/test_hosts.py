"""The quickstart's shape across two real hosts, as a user runs it from their machine.

Host A runs the Ray head, host B a Ray worker node (tests/hosts.py: each its own network namespace
and address, and a view of the disk without the driver's project, temp files or $HOME). The driver
(this process) holds the project and reaches the cluster only through its dashboard: `lorag submit
ingest` into a Milvus server, `lorag submit train` with one worker per host (STRICT_SPREAD),
artifacts in S3, `lorag deploy` with a replica per host, and answers over HTTP with an API key. The
S3 server (moto) and the Milvus standalone server listen on the driver's address on the bridge.
"""

import json
import os
import re
import threading
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import S3_ENV, free_port, project_copy
from hosts import Hosts, available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]

BIN = Path(sys.executable).parent
KEY = "hosts-key"
CACHE = "/tmp/lorag-cache"  # each host's LORAG_CACHE, inside its own /tmp


class Cluster:
    def __init__(self, hosts: Hosts, token: str, s3: str, milvus: str, node_env: dict[str, str], logs: Path):
        self.hosts, self.token, self.s3, self.milvus, self.node_env, self.logs = hosts, token, s3, milvus, node_env, logs

    @property
    def address(self) -> str:
        return f"http://{self.hosts[0].ip}:8265"

    def start_node(self, i: int) -> None:
        """Start host i's Ray node (the head on host 0) and wait until the cluster counts it."""
        host = self.hosts[i]
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", host.ip, "--num-cpus", "3", "--temp-dir", "/tmp/ray",
               "--object-store-memory", str(300 * 2**20), "--disable-usage-stats"]
        if i == 0:
            cmd += ["--head", "--port", "6379", "--dashboard-host", "0.0.0.0", "--dashboard-port", "8265", "--include-dashboard", "true"]
        else:
            cmd += ["--address", f"{self.hosts[0].ip}:6379"]
        proc = host.start(cmd, self.node_env, self.logs / f"ray-{host.name}.log")
        self.wait_nodes(lambda n: n is not None and n >= i + 1, f"host {host.name}'s Ray node", proc)

    def nodes(self) -> int | None:
        from lorag.cluster import Cluster as Target
        from lorag.cluster import cluster_nodes

        return cluster_nodes(Target(self.address, self.token))

    def wait_nodes(self, ok, what: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not ok(self.nodes()):
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in self.logs.glob("ray-*.log"))
                pytest.fail(f"{what} did not come up (exit {proc.poll() if proc else None}, {timeout:.0f} s at most):\n{logs}")
            time.sleep(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import logging

    from moto.server import ThreadedMotoServer

    from lorag.standalone import local_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    work = tmp_path_factory.mktemp("hosts")
    logs = work / "logs"
    logs.mkdir()
    with Hosts(2, work) as hosts:
        s3_server = ThreadedMotoServer(ip_address=hosts.bridge, port=free_port(), verbose=False)
        s3_server.start()
        try:
            with local_server(work / "milvus") as local_uri:
                endpoint = f"http://{hosts.bridge}:{s3_server.get_host_and_port()[1]}"
                milvus = local_uri.replace("127.0.0.1", hosts.bridge)  # its proxy listens on every address of this machine
                token = secrets.token_hex(32)
                node_env = {
                    "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "LANG": "C.UTF-8",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                    "LORAG_CACHE": CACHE, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    # A lost host is declared dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s, each waiting 10 s).
                    "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3",
                    **S3_ENV, "AWS_ENDPOINT_URL": endpoint,
                }
                c = Cluster(hosts, token, endpoint, milvus, node_env, logs)
                for i in range(len(hosts.hosts)):
                    c.start_node(i)
                yield c
        finally:
            s3_server.stop()
    assert not hosts.leftovers(), f"namespaces or links left behind: {hosts.leftovers()}"


def _lorag(c: Cluster, project: Path, *args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`lorag ARGS` from the driver's machine, as a user runs it (the cluster's token in the environment)."""
    driver = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER", "LORAG_API_KEYS", "AWS_"))}
    driver.update(RAY_AUTH_TOKEN=c.token, COLUMNS="200", **S3_ENV, AWS_ENDPOINT_URL=c.s3, **(env or {}))
    r = subprocess.run([str(BIN / "lorag"), *args], cwd=project, env=driver, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"lorag {' '.join(args)}\n{(r.stdout + r.stderr)[-4000:]}"
    return r


def _replica_ips(c: Cluster, deployment: str) -> list[str]:
    """The addresses of the hosts running a RUNNING replica of `deployment` of the lorag app (Serve's REST API)."""
    r = httpx.get(f"{c.address}/api/serve/applications/", headers={"Authorization": f"Bearer {c.token}"}, timeout=30)
    apps = r.json().get("applications", {}) if r.status_code == 200 else {}
    deployments = next(iter(apps.values()), {}).get("deployments", {})
    return sorted(rep.get("node_ip", "?") for rep in deployments.get(deployment, {}).get("replicas", []) if rep.get("state") == "RUNNING")


def _wait(ok, what: str, timeout: float = 240) -> float:
    """Poll `ok()` every half second; the seconds it took. Fails the test after `timeout`."""
    start = time.monotonic()
    while not ok():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - start


class Project:
    def __init__(self, root: Path, bucket: str, tiny_model: Path):
        self.root, self.bucket, self.tiny_model = root, bucket, tiny_model
        self.config = root / "examples" / "cluster" / "lorag.yaml"

    def store(self, c: Cluster):
        from lorag.adapters import AdapterStore

        return AdapterStore(f"s3://{self.bucket}/lorag/adapters")  # this module's S3 endpoint is in the environment (`project`)


@pytest.fixture(scope="module")
def project(cluster, tmp_path_factory, tiny_model):
    """A copy of the project with examples/cluster/lorag.yaml filled in for these hosts (as the README's
    cluster block has the user do), and a model only the driver has, inside the project."""
    import boto3

    c = cluster
    bucket = f"hosts-{os.getpid()}"
    boto3.client("s3", endpoint_url=c.s3, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                 region_name=S3_ENV["AWS_REGION"]).create_bucket(Bucket=bucket)
    root = project_copy(tmp_path_factory.mktemp("driver") / "project")
    shutil.copytree(tiny_model, root / "models" / "tiny")  # uploaded with the project, published to S3 by the job
    p = Project(root, bucket, tiny_model)
    text = (p.config.read_text().replace("http://HOST:19530", c.milvus).replace("my-bucket", bucket)
            .replace("base_model: smollm2-135m-instruct", "base_model: ../../models/tiny").replace("max_steps: 16", "max_steps: 10").replace("checkpoint_every: 8", "checkpoint_every: 2")
            .replace("max_seq_len: 640", "max_seq_len: 384").replace("replicas: 1", "replicas: 2\n  max_replicas_per_node: 1\n  cpus_per_replica: 1")
            .replace("max_tokens: 96", "max_tokens: 8").replace("      zero_stage: 2\n", "      zero_stage: 2\n      placement_strategy: STRICT_SPREAD\n"))
    assert all(x in text for x in ("STRICT_SPREAD", "max_replicas_per_node", "max_steps: 10", "checkpoint_every: 2")), \
        "examples/cluster/lorag.yaml changed: update the substitutions"
    p.config.write_text(text)
    with pytest.MonkeyPatch.context() as env:  # this process reads the bucket too; other modules' S3 server is back afterwards
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": c.s3}.items():
            env.setenv(k, v)
        yield p


@pytest.fixture(scope="module")
def deployed(cluster, project):
    """The README's cluster block on these hosts: ingest, train, deploy; each command's output."""
    c = cluster
    args = ["-c", "examples/cluster/lorag.yaml", "--address", c.address]
    out = {"ingest": _lorag(c, project.root, "submit", "ingest", *args).stdout}
    out["train"] = _lorag(c, project.root, "submit", "train", *args).stdout
    out["deploy"] = _lorag(c, project.root, "deploy", *args, env={"LORAG_API_KEYS": KEY}).stdout
    return out


def _ask(host_ip: str, question: str, timeout: float = 60) -> int | str:
    """One chat completion through the endpoint at `host_ip`: its status, or the error's name."""
    try:
        r = httpx.post(f"http://{host_ip}:8000/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout,
                       json={"model": "tidewell-support", "messages": [{"role": "user", "content": question}], "max_tokens": 8})
        return r.status_code if r.status_code != 200 or r.json().get("sources") else "no sources"
    except httpx.HTTPError as e:
        return type(e).__name__


def test_the_quickstart_runs_across_two_hosts_that_share_no_disk(cluster, project, deployed, tmp_path_factory):
    c = cluster
    a, b = c.hosts
    probe = "import json, os, sys; print(json.dumps({p: os.path.exists(p) for p in sys.argv[1:]}))"
    seen = json.loads(b.run([sys.executable, "-c", probe, str(project.root), str(project.tiny_model), str(project.config)], c.node_env).stdout)
    assert seen and not any(seen.values()), f"host B sees the driver's files: {seen}"

    assert "tidewell-handbook: 8 documents" in deployed["ingest"] and "SUCCEEDED" in deployed["ingest"], deployed["ingest"][-3000:]
    assert "tidewell-support v1:" in deployed["train"] and "SUCCEEDED" in deployed["train"], deployed["train"][-3000:]
    assert "RUNNING" in deployed["deploy"], deployed["deploy"][-3000:]

    store = project.store(c)
    assert store.versions("tidewell-support") == [1], "the adapter version lives in the bucket"
    meta = store.metadata("tidewell-support")
    assert meta["metrics"]["world_size"] == 2 and meta["metrics"]["nodes"] == 2, "STRICT_SPREAD put one training worker on each host"
    assert _replica_ips(c, "Generator") == sorted([a.ip, b.ip]) and _replica_ips(c, "Gateway") == sorted([a.ip, b.ip]), \
        "a generator and a gateway replica on each host"

    assert httpx.get(f"http://{a.ip}:8000/v1/models", timeout=30).status_code == 401, "the deployed endpoint wants a key"
    for q in ["What does error TW-E417 mean?", "How long is the T4 warranty?", "What does a solid teal LED mean?", "How much is Harbor 5?"]:
        assert _ask(a.ip, q) == 200

    for host in (a, b):  # what each host has of the model came through S3, into its own cache
        assert list((host.tmp / CACHE.removeprefix("/tmp/")).glob("fetched/*/config.json")), f"host {host.name} fetched the base model from S3"
    driver_paths = (str(project.root), str(project.tiny_model))
    for host in (a, b):  # and no host holds anything under a path of the driver's
        assert not [p for p in host.tmp.rglob("*") if any(str(p).removeprefix(str(host.tmp)).startswith(d) for d in driver_paths)], host.name


def test_serving_goes_on_when_a_host_is_lost_and_heals_when_it_returns(cluster, deployed):
    """Host B dies (every process at once) while two clients ask questions through host A: requests go
    on being answered by A's replicas (a request in flight on B may fail: the client retries it once),
    the model list stays up, and Serve brings B's replicas back when B returns."""
    c = cluster
    a, b = c.hosts
    _wait(lambda: _replica_ips(c, "Generator") == sorted([a.ip, b.ip]), "a generator replica on each host")
    log: list[tuple[float, object, object]] = []  # (time, first try, retry)
    models: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            t, i = time.monotonic(), i + 1
            first = _ask(a.ip, f"What does error TW-E417 mean? ({n}.{i})")
            log.append((t, first, None if first == 200 else _ask(a.ip, f"What does error TW-E417 mean? ({n}.{i}, again)")))

    def prober() -> None:
        while not stop.is_set():
            try:
                status = httpx.get(f"http://{a.ip}:8000/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            models.append((time.monotonic(), status))
            time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(2)] + [threading.Thread(target=prober)]
    for t in threads:
        t.start()
    try:
        time.sleep(5)
        lost = time.monotonic()
        assert b.kill() > 0
        time.sleep(15)  # A alone serves
        c.start_node(1)
        rejoined = time.monotonic()
        _wait(lambda: _replica_ips(c, "Generator") == sorted([a.ip, b.ip]) and _replica_ips(c, "Gateway") == sorted([a.ip, b.ip]),
              "Serve restarting B's replicas")
        full = time.monotonic()
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    after = [(first, retry) for t, first, retry in log if t >= lost]
    failed_once = [x for x in after if x[0] != 200]
    print(f"\nhost lost: {len(after)} requests after the loss, {len(failed_once)} failed on the first try (retried); without a full "
          f"replica set for {full - lost:.0f} s (host B down {rejoined - lost:.0f} s, its replicas back {full - rejoined:.0f} s after it rejoined)")
    assert len(after) >= 10, f"the clients kept asking: {log}"
    assert all(retry == 200 for first, retry in failed_once), f"a retried request failed again: {failed_once}"
    assert len(failed_once) <= 4, f"only requests in flight on B may fail: {failed_once}"
    down = [status for t, status in models if status != 200]
    assert len(down) <= 2 and any(t > lost + 5 for t, status in models if status == 200), f"the model list stayed up: {down}"


def test_training_resumes_from_its_s3_checkpoint_after_losing_a_host(cluster, project, deployed):
    """Host B dies after the run's first checkpoint; Ray Train restarts the worker group when B is back
    and the run resumes from the checkpoint in S3: its loss curve is the uninterrupted run's, and the
    adapter version is saved once."""
    c = cluster
    a, b = c.hosts
    args = ["-c", "examples/cluster/lorag.yaml", "--address", c.address]
    store = project.store(c)
    before = store.versions("tidewell-support")  # v1, trained uninterrupted by the same config (`deployed`)
    r = _lorag(c, project.root, "submit", "train", *args, "--no-follow")
    job = re.search(r"submitted job (lorag-train-[0-9a-z-]+)", r.stdout).group(1)

    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{project.bucket}")

    def checkpointed() -> bool:  # committed: Ray Train's controller has registered it (a checkpoint only uploaded is not resumed from)
        files = fs.get_file_info(pyarrow.fs.FileSelector(f"{project.bucket}/lorag/ray_results", recursive=True, allow_not_found=True))
        return any(f.path.endswith("checkpoint_manager_snapshot.json") for f in files)

    _wait(checkpointed, "the run's first checkpoint in S3", timeout=300)
    assert b.kill() > 0
    time.sleep(5)
    c.start_node(1)
    r = _lorag(c, project.root, "jobs", "logs", job, "--follow", "--address", c.address)
    assert "SUCCEEDED" in r.stdout, r.stdout[-3000:]

    versions = store.versions("tidewell-support")
    assert versions == [*before, before[-1] + 1], f"the interrupted run saved one version: {versions}"
    whole, resumed = (store.metadata("tidewell-support", v)["metrics"] for v in (1, versions[-1]))
    assert resumed["resumed_from_step"] is not None and resumed["resumed_from_step"] >= 2, (resumed, r.stdout[-3000:])
    assert [s for s, _ in resumed["history"]["train_loss"]] == list(range(1, 11)), "no step lost or repeated"
    assert [x for _, x in resumed["history"]["train_loss"]] == pytest.approx([x for _, x in whole["history"]["train_loss"]], rel=1e-4), \
        "the resumed run's losses are the uninterrupted run's"


def test_a_network_cut_ends_every_job_with_a_result_and_duplicates_nothing(cluster, project, deployed):
    """Host B's link goes down for longer than Ray's node-death timeout (3 s here), once during an ingest
    that re-indexes every document and once after a training run's first checkpoint, then up again.
    Each job ends SUCCEEDED or FAILED with a message (never hangs), no knowledge-base chunk is stored
    twice, and no adapter version is written twice."""
    from lorag.config import load_config
    from lorag.milvus import MilvusStore

    c = cluster
    a, b = c.hosts
    args = ["-c", "examples/cluster/lorag.yaml", "--address", c.address]

    def cut_then_heal(seconds: float = 8) -> None:
        b.cut()
        time.sleep(seconds)
        b.mend()
        b.kill()  # B's node was declared dead meanwhile: what is left of it is restarted, as an operator would
        c.start_node(1)

    def outcome(job: str) -> str:
        driver = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
        r = subprocess.run([str(BIN / "lorag"), "jobs", "logs", job, "--follow", "--address", c.address], cwd=project.root,
                           env={**driver, "RAY_AUTH_TOKEN": c.token}, capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        if r.returncode == 0:
            assert f"job {job} SUCCEEDED" in out, out[-3000:]
            return "SUCCEEDED"
        assert re.search(rf"error: job {job} FAILED: \S", out), f"a failed job says why: {out[-3000:]}"
        return "FAILED"

    # An ingest that re-embeds every document (a new chunk size changes every document's hash); a stage
    # that can no longer run (its actor lost, no node with room for it) fails it after 60 s, not 300.
    changed = ["--set", "knowledge_bases.tidewell-handbook.chunking.size=150", "--set", "knowledge_bases.tidewell-handbook.stall_timeout_s=60"]
    r = _lorag(c, project.root, "submit", "ingest", *args, *changed, "--no-follow")
    ingest_job = re.search(r"submitted job (lorag-ingest-[0-9a-z-]+)", r.stdout).group(1)
    time.sleep(4)
    cut_then_heal()
    ingest = outcome(ingest_job)
    _lorag(c, project.root, "submit", "ingest", *args, *changed)  # completes what the cut left
    kb = load_config(project.config).knowledge_base("tidewell-handbook")
    docs = MilvusStore(c.milvus).documents(kb.collection)
    assert len(docs) == 8 and all(d["count"] == d["n_chunks"] and d["doc_hash"] for d in docs.values()), \
        f"every document holds each of its chunks exactly once: {docs}"

    store = project.store(c)
    before = store.versions("tidewell-support")
    r = _lorag(c, project.root, "submit", "train", *args, "--no-follow")
    train_job = re.search(r"submitted job (lorag-train-[0-9a-z-]+)", r.stdout).group(1)
    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{project.bucket}")
    _wait(lambda: any(f.path.endswith("checkpoint_manager_snapshot.json") for f in fs.get_file_info(
        pyarrow.fs.FileSelector(f"{project.bucket}/lorag/ray_results", recursive=True, allow_not_found=True))), "the run's first checkpoint", 300)
    cut_then_heal()
    status = outcome(train_job)
    print(f"\nnetwork cut of host B for 8 s: the ingest {ingest}, the training run {status}")
    after = store.versions("tidewell-support")
    assert after == before + ([before[-1] + 1] if status == "SUCCEEDED" else []), f"{status}: one version at most, and only on success: {after}"
