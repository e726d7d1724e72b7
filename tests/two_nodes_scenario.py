"""Run by tests/test_two_nodes.py in a process of its own (a Ray driver joins one cluster per process).

    python tests/two_nodes_scenario.py CONFIG OUT_JSON NODE_CACHE_A NODE_CACHE_B

Starts a two-node Ray cluster on loopback (`ray.cluster_utils.Cluster`: a head and a second
raylet, each with its own LORAG_CACHE, the only place a node may write) with token authentication,
then runs the config as a user would: ingest every knowledge base, train every adapter, serve the
endpoint with a generator replica on each node, and ask it one question with the adapter and its
knowledge base. Writes what it saw to OUT_JSON; the test asserts on it and on S3 and Milvus.
"""

import json
import os
import secrets
import socket
import sys
import time


def main() -> None:
    config, out, cache_a, cache_b = sys.argv[1:5]
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")

    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.serving import build_app
    from lorag.train import train_adapter

    # Each raylet (and every worker it starts) inherits the environment it was started with.
    os.environ["LORAG_CACHE"] = cache_a
    with socket.socket() as sock:  # the dashboard answers the state API (which replica runs where)
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
    })
    os.environ["LORAG_CACHE"] = cache_b
    cluster.add_node(num_cpus=3, node_ip_address="127.0.0.1")
    os.environ.pop("LORAG_CACHE")
    cluster.wait_for_nodes()
    result: dict = {}
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        result["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        cfg = load_config(config)
        for kb in cfg.knowledge_bases:
            r = ingest(cfg, kb.name)
            result.setdefault("ingest", {})[kb.name] = {"documents": r.documents, "chunks": r.chunks_written, "uri": r.uri}
        for ad in cfg.adapters:
            r = train_adapter(cfg, ad.name)
            result.setdefault("train", {})[ad.name] = {"location": r.path, "version": r.version, "metrics": r.metrics.model_dump()}

        keys = os.environ[cfg.serve.api_keys_env]
        # Both raylets share one machine (one port): one HTTP proxy, on the head.
        serve.start(proxy_location="HeadOnly", http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        serve.run(build_app(cfg), name="lorag", route_prefix="/")
        replicas = list_actors(filters=[("class_name", "=", "ServeReplica:lorag:Generator"), ("state", "=", "ALIVE")])
        result["generator_nodes"] = sorted(a.node_id for a in replicas)
        url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1/chat/completions"
        ad = cfg.adapters[0]
        body = {"model": ad.name, "messages": [{"role": "user", "content": "How long is the Tidewell T4 warranty?"}], "max_tokens": 8, "temperature": 0}
        result["unauthorized"] = httpx.post(url, json=body, timeout=120).status_code
        # Several requests, so that each replica is likely to serve (and fetch the adapter) once.
        answers = [httpx.post(url, json=body, headers={"Authorization": f"Bearer {keys}"}, timeout=300) for _ in range(4)]
        result["answers"] = [{"status": a.status_code, "body": a.json()} for a in answers]
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"two-node scenario finished in {time.time() - start:.0f} s", flush=True)
