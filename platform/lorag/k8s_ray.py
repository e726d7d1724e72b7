"""The Ray objects (KubeRay `ray.io/v1`) rendered from a config as the pods see it (`lorag.k8s_config.cluster_config`).

A RayCluster `lorag` for `lorag submit` / `ray job submit`, a RayService `lorag-serve` whose
`serveConfigV2` is `lorag.serving.serve_config` (the file `lorag serve --export` writes), and a
RayJob `lorag-<job>` per entry of JOBS that runs `python -m jobs.…` on a cluster of its own. Each
carries the same cluster spec: a head that only coordinates (with KubeRay's autoscaler v2 as its
sidecar), a CPU and a GPU worker group, Ray token auth from the Secret, the ConfigMap mounted at
CONFIG_PATH, and a bounded /dev/shm. Ray pods run as the image's non-root `ray` user with no
privilege escalation, no capabilities and no service-account token, except the heads: the
autoscaler calls the Kubernetes API with the head pod's token.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

from lorag.config import ConfigError, LoragConfig
from lorag.k8s_layout import (
    API_KEYS_KEY,
    CONFIG_DIR,
    CONFIG_MAP,
    CONFIG_PATH,
    CONTAINER_SECURITY,
    JOBS,
    MILVUS_PASSWORD_ENV,
    MILVUS_PASSWORD_KEY,
    MILVUS_TOKEN_ENV,
    NAME,
    RAY_USER,
    SECRET,
    SERVICE,
    labels,
    meta,
    milvus_uri,
    pod_security,
)

SHM_SHARE = 0.5  # of a Ray pod's memory, the most /dev/shm may take (Ray's object store uses 30%)
_QUANTITY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:([KMGTPE]i)|([kMGTPE])|[eE](\d+))?")


def ray_cluster(in_cluster: LoragConfig, ann: dict[str, str]) -> dict:
    """RayCluster NAME, for `lorag submit` and `ray job submit`."""
    return _ray_object("RayCluster", NAME, "raycluster", in_cluster, ann, ray_cluster_spec(in_cluster))


def ray_service(in_cluster: LoragConfig, ann: dict[str, str]) -> dict:
    """RayService SERVICE: the endpoint, with `lorag serve --export`'s Serve config on a cluster of its own."""
    from lorag.serving import serve_config

    spec = {
        "serveConfigV2": yaml.safe_dump(serve_config(in_cluster, CONFIG_PATH), sort_keys=False),
        # NewCluster: a changed cluster spec starts a new cluster and moves traffic once its
        # app is healthy (NewClusterWithIncrementalUpgrade needs a Gateway API controller).
        "upgradeStrategy": {"type": "NewCluster"},
        "rayClusterConfig": ray_cluster_spec(in_cluster, serve=True),
    }
    return _ray_object("RayService", SERVICE, "rayservice", in_cluster, ann, spec)


def ray_job(in_cluster: LoragConfig, job: str, ann: dict[str, str]) -> dict:
    """RayJob lorag-<job>: `python -m JOBS[job]` on a cluster it owns, deleted once the job ends."""
    cfg = in_cluster  # the pods' view: k8s.eval_dataset is its path in the image
    k = cfg.k8s
    entrypoint = f"python -m {JOBS[job]} --config {CONFIG_PATH}"
    if job == "eval":
        entrypoint += f" --dataset {shlex.quote(k.eval_dataset)}"
    spec = {
        "entrypoint": entrypoint,
        "activeDeadlineSeconds": k.job_deadline_s,
        "deletionStrategy": {"deletionRules": _deletion_rules(k.job_ttl_s)},
        # A cluster of its own rather than `clusterSelector` on the RayCluster: KubeRay enforces
        # activeDeadlineSeconds (by deleting the cluster) and deletionRules only for a cluster the
        # RayJob owns; on a selected cluster a job past its deadline keeps running.
        "rayClusterSpec": ray_cluster_spec(cfg),
        "submitterPodTemplate": _submitter(cfg),
    }
    return _ray_object("RayJob", f"lorag-{job}", f"rayjob-{job}", cfg, ann, spec)


def ray_cluster_spec(cfg: LoragConfig, serve: bool = False) -> dict:
    """A RayCluster spec for `cfg` as the pods see it (`cluster_config`)."""
    k = cfg.k8s
    env = _ray_env(cfg, serve)
    ports = [{"name": "serve", "containerPort": cfg.serve.port}] if serve else []  # KubeRay's serve Service targets this port
    groups = []
    for group, wg in (("cpu", k.cpu_workers), ("gpu", k.gpu_workers)):
        if wg.max_replicas == 0:
            continue
        groups.append(
            {
                "groupName": group,
                "replicas": wg.replicas,
                "minReplicas": wg.min_replicas,
                "maxReplicas": wg.max_replicas,
                "template": ray_pod(cfg, False, wg.cpu, (wg.memory, f"k8s.{group}_workers.memory"), wg.gpus, env, ports),
            }
        )
    return {
        "rayVersion": k.ray_version,
        "enableInTreeAutoscaling": True,
        # The autoscaler is a sidecar of the head (the head's pod-level securityContext applies to it too).
        "autoscalerOptions": {"version": "v2", "securityContext": CONTAINER_SECURITY},
        # KubeRay puts RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (this Secret's auth_token key) into every
        # Ray container, the autoscaler and a RayJob's submitter.
        "authOptions": {"mode": "token", "secretName": SECRET},
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0"},  # the head coordinates; training and serving run on workers
            "template": ray_pod(cfg, True, k.head_cpu, (k.head_memory, "k8s.head_memory"), 0, env, ports),
        },
        "workerGroupSpecs": groups,
    }


def ray_pod(cfg: LoragConfig, head: bool, cpu: str, memory: tuple[str, str], gpus: int, env: list[dict], ports: list[dict]) -> dict:
    """A Ray head or worker pod template; `memory` is (quantity, the config field it comes from)."""
    k = cfg.k8s
    requests = {"cpu": cpu, "memory": memory[0]}
    limits: dict[str, Any] = {**requests, **({"nvidia.com/gpu": gpus} if gpus else {})}
    c: dict[str, Any] = {"name": "ray-head" if head else "ray-worker", "image": k.image, "imagePullPolicy": k.image_pull_policy, "env": env}
    if k.storage_secret:
        c["envFrom"] = [{"secretRef": {"name": k.storage_secret}}]
    if ports:
        c["ports"] = ports
    c["resources"] = {"requests": requests, "limits": limits}
    c["volumeMounts"] = [
        {"name": "lorag-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},  # the object store and NCCL need more than the default 64 MiB
    ]
    c["securityContext"] = CONTAINER_SECURITY  # KubeRay copies it to the init containers it adds
    # The dshm tmpfs counts against the memory limit: bounded, so a full object store cannot take the whole pod.
    shm = {"medium": "Memory", "sizeLimit": share_of(memory, SHM_SHARE)}
    pod: dict[str, Any] = {"securityContext": pod_security(RAY_USER, RAY_USER[1])}
    if not head:  # the head keeps its token: KubeRay's autoscaler sidecar calls the Kubernetes API with it
        pod["automountServiceAccountToken"] = False
    pod["containers"] = [c]
    pod["volumes"] = [{"name": "lorag-config", "configMap": {"name": CONFIG_MAP}}, {"name": "dshm", "emptyDir": shm}]
    if gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # The label is what Milvus's NetworkPolicy admits.
    return {"metadata": {"labels": labels("ray")}, "spec": pod}


def share_of(memory: tuple[str, str], share: float) -> str:
    """`share` of a Kubernetes memory quantity, rounded down to MiB, as a quantity (8Gi, 6553Mi).

    Raises:
        ConfigError: naming the field when the quantity is not one Kubernetes reads.
    """
    quantity, field = memory
    m = _QUANTITY.fullmatch(quantity.strip())
    if not m:
        raise ConfigError(f"{field}: {quantity!r} is not a Kubernetes memory quantity: write it like 16Gi or 16000Mi")
    number, binary, decimal, exponent = m.groups()
    scale = 1024 ** ("KMGTPE".index(binary[0]) + 1) if binary else 1000 ** ("kMGTPE".index(decimal) + 1) if decimal else 10 ** int(exponent or 0)
    mib = max(1, int(float(number) * scale * share) // 2**20)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def _ray_object(kind: str, name: str, component: str, cfg: LoragConfig, ann: dict[str, str], spec: dict) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": kind, "metadata": meta(name, cfg.k8s.namespace, component, ann), "spec": spec}


def _ray_env(cfg: LoragConfig, serve: bool) -> list[dict[str, Any]]:
    """Every Ray container's environment: the config's path, the Milvus token, `cluster.env_vars`, the API keys for Serve."""
    env: list[dict[str, Any]] = [{"name": "LORAG_CONFIG", "value": CONFIG_PATH}]
    if any(kb.uri == milvus_uri(cfg.k8s.namespace) for kb in cfg.knowledge_bases):
        # The in-cluster Milvus's token, root:<password>, from the Secret (Kubernetes expands $(VAR) of an
        # earlier entry). Without such a knowledge base the pods may take LORAG_MILVUS_TOKEN from k8s.storage_secret.
        env.append({"name": MILVUS_PASSWORD_ENV, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": MILVUS_PASSWORD_KEY}}})
        env.append({"name": MILVUS_TOKEN_ENV, "value": f"root:$({MILVUS_PASSWORD_ENV})"})
    env += [{"name": n, "value": v} for n, v in sorted(cfg.cluster.env_vars.items())]  # none named like a credential (cluster_config)
    if serve:
        # Ray workers inherit the raylet's environment, so the Gateway replicas read the keys from here.
        env.append({"name": cfg.serve.api_keys_env, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": API_KEYS_KEY}}})
    return env


def _deletion_rules(ttl: int) -> list[dict[str, Any]]:
    """Delete the job's cluster as soon as the job ends (frees its GPUs; the submitter pod keeps the
    logs), the RayJob itself after `ttl` seconds. `Failed` deployments include an exceeded deadline."""
    rules = []
    for condition in ({"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}):
        rules.append({"policy": "DeleteCluster", "condition": {**condition, "ttlSeconds": 0}})
        rules.append({"policy": "DeleteSelf", "condition": {**condition, "ttlSeconds": ttl}})
    return rules


def _submitter(cfg: LoragConfig) -> dict[str, Any]:
    """KubeRay's default submitter pod, hardened: it only runs `ray job submit` (KubeRay fills in the
    command and the Ray token), so it needs no service-account token."""
    k = cfg.k8s
    submitter = {
        "name": "ray-job-submitter",
        "image": k.image,
        "imagePullPolicy": k.image_pull_policy,
        "resources": {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": CONTAINER_SECURITY,
    }
    return {
        "metadata": {"labels": labels("ray-submitter")},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": pod_security(RAY_USER, RAY_USER[1]),
            "containers": [submitter],
        },
    }
