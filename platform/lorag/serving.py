"""The endpoint as Ray Serve runs it: the application builder and the `serve deploy` config.

Importing this module does not import Ray: `serve_config` and `generator_options` (used by `lorag
serve --export`, `lorag deploy` and `lorag k8s render`) only shape dicts. `build_app(cfg)` binds the
deployments of `lorag.deployments`: a Gateway (HTTP ingress: auth, validation, routing, retrieval)
in front of Generator replicas (one `lorag.engine.Engine` each). `serve/app.py` only calls it.

The layers, each usable without the ones above it:
- `lorag.schemas`: request bodies and OpenAI-shaped errors;
- `lorag.prompts`: the sourced prompt (shared with training and evaluation);
- `lorag.engine`: the model, batching, adapters, sampling and stops (no Serve);
- `lorag.gateway` + `lorag.auth`: the HTTP app over any engine-like backend;
- `lorag.deployments`: the thin Serve wrappers.
"""

from __future__ import annotations

from typing import Any

from lorag.config import LoragConfig


def generator_options(cfg: LoragConfig) -> dict[str, Any]:
    """Serve deployment options of the generator replicas, from `cfg.serve`."""
    sv = cfg.serve
    opts: dict[str, Any] = {
        "max_ongoing_requests": sv.max_ongoing_requests,
        "max_queued_requests": sv.max_queued_requests,
        "ray_actor_options": {"num_cpus": sv.cpus_per_replica, **({"num_gpus": sv.gpus_per_replica} if sv.gpus_per_replica else {})},
    }
    if sv.max_replicas_per_node:
        opts["max_replicas_per_node"] = sv.max_replicas_per_node
    if sv.autoscaling:
        a = sv.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": max(a.min_replicas, 1),
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        }
    else:
        opts["num_replicas"] = sv.replicas
    return opts


def gateway_options(cfg: LoragConfig) -> dict[str, Any]:
    """The gateway only validates, retrieves and forwards; its queue bounds what the proxy holds. It runs
    as many replicas as the generator keeps (`serve.gateway_replicas`), spread like them: one gateway is
    a single point of failure, lost with its node."""
    sv = cfg.serve
    replicas = sv.gateway_replicas or max(1, sv.autoscaling.min_replicas if sv.autoscaling else sv.replicas)
    opts: dict[str, Any] = {"max_ongoing_requests": max(64, 4 * sv.max_ongoing_requests), "max_queued_requests": 4 * max(sv.max_queued_requests, 1),
                            "num_replicas": replicas}
    if sv.max_replicas_per_node:
        opts["max_replicas_per_node"] = sv.max_replicas_per_node
    return opts


def build_app(cfg: LoragConfig):
    """The Serve application for `cfg`: the Gateway in front of Generator replicas.

    Raises:
        ConfigError: the app would read paths that other nodes of the cluster do not have.
    """
    from lorag.deployments import GatewayDeployment, GeneratorDeployment
    from lorag.models import node_ref
    from lorag.storage import check_cluster_paths

    check_cluster_paths(cfg, [kb.name for kb in cfg.knowledge_bases], artifacts=True)
    data = cfg.model_dump(mode="json")
    # Replicas may run on any node: they resolve the models themselves, from URIs where needed.
    model_ref = node_ref(cfg.base_model, cfg.storage_root, cfg.model_cache)
    generator = GeneratorDeployment.options(name="Generator", **generator_options(cfg)).bind(data, model_ref)
    gateway = GatewayDeployment.options(name="Gateway", **gateway_options(cfg))
    return gateway.bind(data, generator, model_ref, node_ref(cfg.embedder, cfg.storage_root, cfg.model_cache))


def serve_config(cfg: LoragConfig, config_path: str) -> dict[str, Any]:
    """A `serve deploy` / `serve run` config file for `cfg`, as a dict (see `lorag serve --export`).

    Args:
        cfg: the loaded config (for the HTTP and deployment options).
        config_path: how the deployed app finds the lorag.yaml: a path relative to the
            working_dir (repository root) or absolute.
    """
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port, "request_timeout_s": cfg.serve.request_timeout_s},
        "applications": [
            {
                "name": "lorag",
                "route_prefix": "/",
                "import_path": "serve.app:app",
                "args": {"config": config_path},
                "deployments": [{"name": "Generator", **generator_options(cfg)}],
            }
        ],
    }
