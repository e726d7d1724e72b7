"""Milvus standalone in the cluster: the manifests of the Milvus every knowledge base without a URI uses.

One StatefulSet with its volume (embedded etcd and local storage keep both in this one pod, as in
Milvus's own standalone_embed setup), its Service, the ConfigMap of the embedded etcd, and a
NetworkPolicy that lets only the Ray pods reach it. Authentication is on: root's password comes
from the Secret when the volume is first initialised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorag.k8s_layout import CONTAINER_SECURITY, MILVUS, MILVUS_PASSWORD_KEY, MILVUS_PORT, MILVUS_USER, SECRET, labels, meta, pod_security

if TYPE_CHECKING:
    from lorag.config import K8sConfig, LoragConfig

# etcd listens on loopback only: nothing but Milvus in this pod talks to it.
ETCD_CONFIG = (
    "listen-client-urls: http://127.0.0.1:2379\n"
    "advertise-client-urls: http://127.0.0.1:2379\n"
    "quota-backend-bytes: 4294967296\n"
    "auto-compaction-mode: revision\n"
    "auto-compaction-retention: '1000'\n"
)


def milvus_objects(cfg: LoragConfig, ann: dict[str, str]) -> list[dict]:
    """Milvus's ConfigMap, Service, NetworkPolicy and StatefulSet, in that order, in `cfg.k8s.namespace`."""
    k = cfg.k8s
    ns = k.namespace
    select = {"app.kubernetes.io/name": "milvus", "app.kubernetes.io/instance": MILVUS}
    claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": k.milvus_storage}}}
    if k.storage_class:
        claim["storageClassName"] = k.storage_class
    pod = {
        "automountServiceAccountToken": False,
        # fsGroup makes the volume writable for the non-root user; OnRootMismatch skips the walk over a volume already right.
        "securityContext": {**pod_security(MILVUS_USER, 1000), "fsGroupChangePolicy": "OnRootMismatch"},
        "containers": [_container(k)],
        "volumes": [{"name": "etcd-config", "configMap": {"name": MILVUS}}],
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(MILVUS, ns, "milvus", ann), "data": {"embedEtcd.yaml": ETCD_CONFIG}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(MILVUS, ns, "milvus", ann),
            "spec": {"selector": select, "ports": [{"name": "grpc", "port": MILVUS_PORT, "targetPort": "grpc"}]},
        },
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(MILVUS, ns, "milvus", ann), "spec": _policy(select)},
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": meta(MILVUS, ns, "milvus", ann),
            "spec": {
                "serviceName": MILVUS,
                "replicas": 1,
                "selector": {"matchLabels": select},
                "template": {"metadata": {"labels": {**select, **labels("milvus")}}, "spec": pod},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
            },
        },
    ]


def _container(k: K8sConfig) -> dict[str, Any]:
    """The Milvus container: standalone, embedded etcd, local storage, authentication on, health probes."""
    health = {"httpGet": {"path": "/healthz", "port": 9091}}
    return {
        "name": "milvus",
        "image": k.milvus_image,
        "args": ["milvus", "run", "standalone"],  # args, not command: keep the image's tini entrypoint
        "env": [
            {"name": "ETCD_USE_EMBED", "value": "true"},
            {"name": "ETCD_DATA_DIR", "value": "/var/lib/milvus/etcd"},
            {"name": "ETCD_CONFIG_PATH", "value": "/milvus/configs/embedEtcd.yaml"},
            {"name": "COMMON_STORAGETYPE", "value": "local"},
            # common.security.*: every client must log in; root's password is taken from the Secret when
            # the volume is first initialised (changing the Secret later does not change it).
            {"name": "COMMON_SECURITY_AUTHORIZATIONENABLED", "value": "true"},
            {"name": "COMMON_SECURITY_DEFAULTROOTPASSWORD", "valueFrom": {"secretKeyRef": {"name": SECRET, "key": MILVUS_PASSWORD_KEY}}},
        ],
        "ports": [{"name": "grpc", "containerPort": MILVUS_PORT}, {"name": "metrics", "containerPort": 9091}],
        "resources": {"requests": {"cpu": k.milvus_cpu, "memory": k.milvus_memory}, "limits": {"cpu": k.milvus_cpu, "memory": k.milvus_memory}},
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 30},
        "readinessProbe": {**health, "periodSeconds": 10},
        "livenessProbe": {**health, "periodSeconds": 30, "failureThreshold": 3},
        "volumeMounts": [
            {"name": "data", "mountPath": "/var/lib/milvus"},
            {"name": "etcd-config", "mountPath": "/milvus/configs/embedEtcd.yaml", "subPath": "embedEtcd.yaml"},
        ],
        "securityContext": CONTAINER_SECURITY,
    }


def _policy(select: dict[str, str]) -> dict[str, Any]:
    """The NetworkPolicy's spec: only the Ray pods reach Milvus's port."""
    # The Ray pods' template label (lorag.k8s_ray.ray_pod); kubelet probes come from the node and pass.
    return {
        "podSelector": {"matchLabels": select},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": labels("ray")}}], "ports": [{"protocol": "TCP", "port": MILVUS_PORT}]}],
    }
