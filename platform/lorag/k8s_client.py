"""The connection to a cluster's Kubernetes API: the client, one call at a time, and the Secrets lorag needs there.

`dynamic_client` finds the cluster (kubeconfig, else the pod's service account), `resource` the API
of a kind (KubeRay's CRDs included), `call` runs one API call and turns connection and API errors
into a RuntimeError that names the object and what to check, `get` reads one object,
`server_side_apply` writes one, and `check_secret` refuses a Secret that is missing or still
holds the rendered placeholders. The `kubernetes` package is imported only when a cluster is
contacted.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Callable

from lorag.k8s_layout import API_KEYS_KEY, MILVUS_PASSWORD_KEY, PLACEHOLDER, TOKEN_KEY

FIELD_MANAGER = "lorag"  # server-side apply's owner of the fields lorag sets


def dynamic_client(kubeconfig: str | None, context: str | None):
    """A `kubernetes.dynamic.DynamicClient` for `kubeconfig` (default: $KUBECONFIG, else ~/.kube/config,
    else the pod's service account when running in a cluster) and its `context`.

    Raises:
        RuntimeError: no kubeconfig, an unusable one, or an unreachable API server; saying what to set.
    """
    from kubernetes import config, dynamic
    from kubernetes.config.config_exception import ConfigException

    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    files = [p for p in path.split(os.pathsep) if p and Path(p).expanduser().is_file()]
    try:
        if files:
            api_client = config.new_client_from_config(config_file=os.pathsep.join(files), context=context)
        elif not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            api_client = None  # the default client, configured by load_incluster_config
        else:
            raise RuntimeError(
                f"no Kubernetes cluster configured: no kubeconfig file at {path}. Point KUBECONFIG (or --kubeconfig) "
                "at the cluster's kubeconfig, e.g. from `kind get kubeconfig` or your cloud's `get-credentials` command"
            )
    except ConfigException as e:
        raise RuntimeError(f"kubeconfig {path} (context {context or 'current'}) is unusable: {e}") from e
    from kubernetes.client import ApiClient

    return call(lambda: dynamic.DynamicClient(api_client or ApiClient()), f"the API server of kubeconfig {path}")


def resource(dyn, api_version: str, kind: str):
    """The API of `kind`; RuntimeError when the cluster has none (for ray.io: install KubeRay first)."""
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    try:
        return dyn.resources.get(api_version=api_version, kind=kind)
    except ResourceNotFoundError as e:
        hint = " Install the KubeRay operator first (its Helm chart `kuberay-operator` brings the CRDs)." if api_version.startswith("ray.io/") else ""
        raise RuntimeError(f"the cluster has no {kind} ({api_version}).{hint}") from e


def call(fn: Callable[[], Any], what: str) -> Any:
    """Run one API call; turn connection and API errors into a RuntimeError that names the object."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        return fn()
    except ApiException as e:
        raise RuntimeError(f"{what}: the API server answered {e.status} {e.reason}: {e.body or ''}".rstrip(": ")) from e
    except urllib3.exceptions.HTTPError as e:
        raise RuntimeError(f"{what}: cannot reach the Kubernetes API server ({e}); check the kubeconfig's server and your network") from e


def get(api, ns: str, name: str) -> dict | None:
    """The object as a dict, or None when it does not exist."""
    from kubernetes.dynamic.exceptions import NotFoundError

    def get_one():
        try:
            return api.get(name=name, namespace=ns).to_dict()
        except NotFoundError:
            return None

    return call(get_one, f"{api.kind} {ns}/{name}")


def server_side_apply(api, obj: dict, what: str) -> None:
    """Server-side apply `obj` as FIELD_MANAGER, taking over the fields that others changed."""
    call(lambda: api.server_side_apply(body=obj, field_manager=FIELD_MANAGER, force_conflicts=True), what)


def check_secret(api, ns: str, name: str, storage: bool = False) -> None:
    """Refuse to go on unless Secret ns/name exists with real values (the storage Secret: with any keys)."""
    if storage:
        create = (
            f"kubectl create secret generic {name} -n {ns} --from-literal=AWS_ACCESS_KEY_ID=... "
            "--from-literal=AWS_SECRET_ACCESS_KEY=... [--from-literal=AWS_ENDPOINT_URL=...]"
        )
        keys: tuple[str, ...] = ()
        what = "k8s.storage_secret: every Ray pod reads the bucket's credentials from it"
    else:
        create = (
            f"kubectl create secret generic {name} -n {ns} --from-literal={TOKEN_KEY}=$(openssl rand -hex 32) "
            f"--from-literal={API_KEYS_KEY}=KEY1,KEY2 --from-literal={MILVUS_PASSWORD_KEY}=$(openssl rand -hex 16)"
        )
        keys = (TOKEN_KEY, API_KEYS_KEY, MILVUS_PASSWORD_KEY)
        what = "the Ray token, the endpoint's API keys and Milvus's root password"
    secret = get(api, ns, name)
    if secret is None:
        raise RuntimeError(f"Secret {ns}/{name} does not exist ({what}); create it with real values, then apply again:\n  {create}")
    data = secret.get("data") or {}
    missing = [key for key in keys if key not in data]
    placeholders = [key for key, value in data.items() if base64.b64decode(value).decode(errors="replace") == PLACEHOLDER]
    wrong = (["it has no keys"] if not data else []) + ([f"it lacks the keys {missing}"] if missing else [])
    wrong += [f"it still holds placeholders in {placeholders}"] if placeholders else []
    if wrong:
        raise RuntimeError(
            f"Secret {ns}/{name}: {', '.join(wrong)}; recreate it (kubectl delete secret {name} -n {ns}) with real values:\n  {create}"
        )
