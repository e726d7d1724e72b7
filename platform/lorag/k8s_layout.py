"""Where lorag lives in a Kubernetes namespace: the names every rendered manifest shares.

The objects' names, the paths in the image and the pods, the Secret's keys and the environment
variables made from them, the users pods run as and their security contexts, and the labels and
metadata every object carries. `lorag.k8s` renders the manifests from these; nothing here reads
a config or talks to a cluster.
"""

from __future__ import annotations

from typing import Any

APP_DIR = "/app"  # where k8s/Dockerfile copies the project
CONFIG_DIR = "/etc/lorag"  # where the ConfigMap is mounted
CONFIG_PATH = f"{CONFIG_DIR}/lorag.yaml"
POD_WORKDIR = "/tmp/lorag"  # node-local scratch: artifacts live in storage, knowledge bases in Milvus
NAME = "lorag"  # the RayCluster; other objects are named lorag-<part>
CONFIG_MAP = "lorag-config"
SECRET = "lorag-secrets"
TOKEN_KEY = "auth_token"  # KubeRay reads the Ray token from this key of authOptions.secretName
API_KEYS_KEY = "LORAG_API_KEYS"
MILVUS_PASSWORD_KEY = "milvus_root_password"  # Milvus's root password, set at its first start; lorag connects as root
MILVUS_PASSWORD_ENV = "LORAG_MILVUS_PASSWORD"  # in the Ray pods, only to build MILVUS_TOKEN_ENV from it
MILVUS_TOKEN_ENV = "LORAG_MILVUS_TOKEN"  # knowledge_bases[].token's default (lorag.config)
PLACEHOLDER = "REPLACE-ME"
MILVUS = "lorag-milvus"
MILVUS_PORT = 19530
SERVICE = "lorag-serve"
JOBS = {"ingest": "jobs.ingest", "finetune": "jobs.finetune", "eval": "jobs.evaluate"}  # RayJob lorag-<key> runs `python -m <module>`
RAY_USER = (1000, 100)  # uid and gid of the `ray` user of rayproject/ray, which k8s/Dockerfile builds on
# Milvus's image names no user (it would run as root) and its files are root:root, mode 774: uid 1000 runs them in group 0.
MILVUS_USER = (1000, 0)
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def labels(component: str) -> dict[str, str]:
    """The labels of every object lorag renders; `labels("ray")` is what Milvus's NetworkPolicy admits."""
    return {"app.kubernetes.io/part-of": "lorag", "app.kubernetes.io/component": component}


def meta(name: str, ns: str, component: str, annotations: dict[str, str]) -> dict[str, Any]:
    """An object's metadata: name, namespace, lorag's labels and (a copy of) `annotations`."""
    return {"name": name, "namespace": ns, "labels": labels(component), "annotations": dict(annotations)}


def milvus_uri(ns: str) -> str:
    """The in-cluster Milvus Service's URI, as the Ray pods reach it."""
    return f"http://{MILVUS}.{ns}.svc.cluster.local:{MILVUS_PORT}"


def pod_security(user: tuple[int, int], fs_group: int) -> dict[str, Any]:
    """A pod's securityContext: this non-root uid and gid, `fs_group` on its volumes, RuntimeDefault seccomp."""
    uid, gid = user
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": fs_group, "seccompProfile": {"type": "RuntimeDefault"}}
