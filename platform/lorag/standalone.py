"""A Milvus standalone server on loopback, for tests, benchmarks and local development.

`local_server` runs the `milvus` PyPI package's `milvus-server` on free loopback ports and stops it
on exit; lorag itself reaches any Milvus server by its URI (`knowledge_bases[].uri`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

from lorag.milvus import MilvusStore

SERVER_PORTS = (
    "etcd-port", "root-coord-port", "proxy-port", "proxy-internal-port", "query-coord-port",
    "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port",
)


def _free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all held open while choosing, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def local_server(data_dir: str | os.PathLike, timeout: float = 180) -> Iterator[str]:
    """Run a Milvus standalone server (the `milvus` PyPI package's `milvus-server`) for tests,
    benchmarks and local development; yields its URI and stops it on exit.

    Every port is a free one chosen here, the embedded etcd listens on loopback only, and every
    component advertises 127.0.0.1. (Milvus 2.3's gRPC listeners bind all interfaces; it has no
    setting to narrow that.)

    Raises:
        FileNotFoundError: `milvus-server` is not installed (`pip install --no-deps milvus`).
        TimeoutError: the server did not answer within `timeout` seconds.
    """
    exe = os.path.join(os.path.dirname(sys.executable), "milvus-server")
    if not os.path.exists(exe):
        raise FileNotFoundError(f"{exe} not found: install the Milvus server package with `pip install --no-deps milvus`")
    ports = dict(zip([*SERVER_PORTS, "etcd-peer"], _free_ports(len(SERVER_PORTS) + 1)))
    peer = ports.pop("etcd-peer")
    cmd = [exe, "--data", str(data_dir)]
    for key, port in ports.items():
        cmd += [f"--{key}", str(port)]
    for component in ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode"):
        cmd += ["--extra-config", f"{component}.ip=127.0.0.1"]
    os.makedirs(data_dir, exist_ok=True)
    # The embedded etcd would take 2379/2380 on every server; give it its own loopback ports
    # (Milvus reads `etcd.config.path` from ETCD_CONFIG_PATH), so several servers can coexist.
    etcd_cfg = os.path.join(os.path.abspath(data_dir), "embed-etcd.yaml")
    client_url, peer_url = f"http://127.0.0.1:{ports['etcd-port']}", f"http://127.0.0.1:{peer}"
    with open(etcd_cfg, "w") as f:
        f.write(
            f"name: lorag\ndata-dir: {os.path.join(os.path.abspath(data_dir), 'etcd')}\n"
            f"listen-client-urls: {client_url}\nadvertise-client-urls: {client_url}\n"
            f"listen-peer-urls: {peer_url}\ninitial-advertise-peer-urls: {peer_url}\ninitial-cluster: lorag={peer_url}\n"
        )
    log = open(os.path.join(data_dir, "milvus-server.log"), "w")
    env = {**os.environ, "ETCD_CONFIG_PATH": etcd_cfg}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{ports['proxy-port']}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"milvus-server exited with {proc.returncode}; see {log.name}")
            try:
                MilvusStore(uri).close()
                break
            except ConnectionError:
                if time.time() > deadline:
                    raise TimeoutError(f"Milvus server at {uri} did not start in {timeout:.0f} s; see {log.name}") from None
                time.sleep(0.5)
        yield uri
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # milvus-server stops its children on SIGINT
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
