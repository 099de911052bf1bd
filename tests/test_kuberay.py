"""infra/kuberay/*.yaml against the systems' own rules, object by object, by kind:

- core Kubernetes objects (and every pod template inside a Ray object, wrapped as a PodTemplate) are
  validated in strict mode (unknown fields are errors) by ``kubernetes-validate`` against the OpenAPI
  schemas of Kubernetes ``K8S_VERSION``;
- RayCluster / RayJob / RayService are checked against the fields of KubeRay's ray.io/v1 CRDs and the
  operator's own validation (ray-project/kuberay ``ray-operator/controllers/ray/utils/validation.go``,
  read at KubeRay ``KUBERAY_VERSION``), one function per rule, each named after the rule it encodes;
- then this project's own deployment rules (pinned images, deadlines, auth, network policy...).

Every rule is also shown to reject a broken copy of a manifest, so none passes by construction.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "infra" / "kuberay"
K8S_VERSION = "1.33.0"      # EKS standard support; the schemas kubernetes-validate ships for it
KUBERAY_VERSION = "1.5.1"   # first release with token-auth support; rules below hold from 1.4 on
RAY_KINDS = ("RayCluster", "RayJob", "RayService")


def documents() -> list[tuple[str, dict]]:
    """(file name, object) for every object in every infra/kuberay/*.yaml (and manifests in ConfigMaps)."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            docs.append((path.name, doc))
            if doc.get("kind") == "ConfigMap":
                for text in (doc.get("data") or {}).values():
                    inner = yaml.safe_load(text)
                    if isinstance(inner, dict) and "kind" in inner:
                        docs.append((path.name, inner))
    return docs


def of_kind(*kinds: str) -> list[dict]:
    return [d for _, d in documents() if d["kind"] in kinds]


def _ids(docs) -> list[str]:
    return [f"{f}:{d['kind']}/{d['metadata'].get('name') or d['metadata'].get('generateName')}" for f, d in docs]


# ====================================================================================================
# Core Kubernetes objects: strict OpenAPI validation for a stated Kubernetes version.

def k8s_errors(obj: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"]
    return []


CORE = [(f, d) for f, d in documents()
        if not d["apiVersion"].startswith(("ray.io/", "monitoring.coreos.com/"))]


@pytest.mark.parametrize("doc", [d for _, d in CORE], ids=_ids(CORE))
def test_core_object_is_valid_kubernetes(doc):
    assert not k8s_errors(doc)


def test_core_validation_is_strict_and_covers_the_kinds():
    kinds = {d["kind"] for _, d in CORE}
    assert {"Namespace", "ServiceAccount", "CronJob", "NetworkPolicy", "ResourceQuota"} <= kinds, kinds
    cron = copy.deepcopy(of_kind("CronJob")[0])
    cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] = "one"
    assert k8s_errors(cron)
    cron = copy.deepcopy(of_kind("CronJob")[0])
    cron["spec"]["concurrency"] = "Forbid"  # unknown field: only strict mode catches it
    assert k8s_errors(cron)


def test_resource_quota_names_extended_resources_by_requests_only():
    """Kubernetes API validation beyond the schema: extended resources (nvidia.com/gpu) cannot be
    overcommitted, so a quota may name them only as requests.<resource>."""
    quotas = of_kind("ResourceQuota")
    assert quotas
    for q in quotas:
        for key in q["spec"]["hard"]:
            if "/" in key and not key.split("/")[0].endswith("kubernetes.io"):
                assert key.startswith("requests."), f"{q['metadata']['name']}: {key} (only requests. is allowed)"


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """Every pod template inside a Ray object, with where it is."""
    spec = obj["spec"]
    cluster = {"RayCluster": lambda: spec, "RayJob": lambda: spec.get("rayClusterSpec"),
               "RayService": lambda: spec.get("rayClusterConfig")}[obj["kind"]]()
    found = []
    if cluster:
        found.append(("headGroupSpec", cluster["headGroupSpec"]["template"]))
        for g in cluster.get("workerGroupSpecs") or []:
            found.append((f"workerGroupSpecs[{g.get('groupName')}]", g["template"]))
    if obj["kind"] == "RayJob" and spec.get("submitterPodTemplate"):
        found.append(("submitterPodTemplate", spec["submitterPodTemplate"]))
    return found


RAY = [(f, d) for f, d in documents() if d["kind"] in RAY_KINDS]


@pytest.mark.parametrize("doc", [d for _, d in RAY], ids=_ids(RAY))
def test_pod_templates_in_ray_objects_are_valid_kubernetes(doc):
    for where, template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        assert not k8s_errors(wrapped), where


# ====================================================================================================
# KubeRay ray.io/v1 CRD fields (KubeRay 1.5.1). Pod templates and core types are checked above.

CRD_FIELDS = {
    "RayClusterSpec": {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                       "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                       "headGroupSpec", "rayVersion", "workerGroupSpecs"},
    "HeadGroupSpec": {"serviceType", "headService", "enableIngress", "resources", "labels",
                      "rayStartParams", "template"},
    "WorkerGroupSpec": {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas",
                        "idleTimeoutSeconds", "resources", "labels", "rayStartParams", "template",
                        "scaleStrategy", "numOfHosts"},
    "AuthOptions": {"mode"},
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
                   "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
                   "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
                   "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
                   "shutdownAfterJobFinishes", "suspend"},
    "RayServiceSpec": {"rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold",
                       "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy",
                       "serveConfigV2", "rayClusterConfig", "excludeHeadPodFromServeSvc"},
}
CRD_REQUIRED = {"RayClusterSpec": {"headGroupSpec"}, "HeadGroupSpec": {"template"},
                "WorkerGroupSpec": {"groupName", "template"}, "RayServiceSpec": {"rayClusterConfig"}}
CRD_TYPES = {"rayVersion": str, "entrypoint": str, "runtimeEnvYAML": str, "serveConfigV2": str,
             "enableInTreeAutoscaling": bool, "shutdownAfterJobFinishes": bool, "suspend": bool,
             "replicas": int, "minReplicas": int, "maxReplicas": int, "ttlSecondsAfterFinished": int,
             "activeDeadlineSeconds": int, "backoffLimit": int, "groupName": str}


def _fields(obj: dict, type_name: str, where: str) -> list[str]:
    errors = [f"{where}.{k}: unknown field of {type_name}" for k in obj if k not in CRD_FIELDS[type_name]]
    errors += [f"{where}.{k}: required by {type_name}" for k in CRD_REQUIRED.get(type_name, ()) if k not in obj]
    for k, v in obj.items():
        if k in CRD_TYPES and not isinstance(v, CRD_TYPES[k]) or (CRD_TYPES.get(k) is int and isinstance(v, bool)):
            errors.append(f"{where}.{k}: must be {CRD_TYPES[k].__name__}")
        if k == "rayStartParams" and not all(isinstance(x, str) for x in (v or {}).values()):
            errors.append(f"{where}.rayStartParams: values must be strings")
    return errors


def _cluster_fields(spec: dict, where: str) -> list[str]:
    errors = _fields(spec, "RayClusterSpec", where)
    errors += _fields(spec.get("headGroupSpec", {}), "HeadGroupSpec", f"{where}.headGroupSpec")
    for i, g in enumerate(spec.get("workerGroupSpecs") or []):
        errors += _fields(g, "WorkerGroupSpec", f"{where}.workerGroupSpecs[{i}]")
    if "authOptions" in spec:
        errors += _fields(spec["authOptions"], "AuthOptions", f"{where}.authOptions")
        if spec["authOptions"].get("mode", "token") not in ("disabled", "token"):
            errors.append(f"{where}.authOptions.mode: must be disabled or token")
    return errors


def crd_field_errors(obj: dict) -> list[str]:
    if obj["apiVersion"] != "ray.io/v1":
        return [f"apiVersion {obj['apiVersion']}: KubeRay serves ray.io/v1"]
    spec = obj.get("spec") or {}
    if obj["kind"] == "RayCluster":
        return _cluster_fields(spec, "spec")
    if obj["kind"] == "RayJob":
        errors = _fields(spec, "RayJobSpec", "spec")
        if "rayClusterSpec" in spec:
            errors += _cluster_fields(spec["rayClusterSpec"], "spec.rayClusterSpec")
        if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "InteractiveMode",
                                                             "SidecarMode"):
            errors.append("spec.submissionMode: not a JobSubmissionMode")
        return errors
    errors = _fields(spec, "RayServiceSpec", "spec")
    return errors + _cluster_fields(spec.get("rayClusterConfig", {}), "spec.rayClusterConfig")


# ====================================================================================================
# The operator's validation rules (validation.go), one function per rule; each returns its errors.

def _cluster_specs(obj: dict) -> list[dict]:
    spec = obj["spec"]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}
    return [cluster[obj["kind"]]] if cluster[obj["kind"]] else []


def _groups(cluster: dict) -> list[tuple[str, dict]]:
    return [("Head", cluster["headGroupSpec"])] + [(g.get("groupName"), g) for g in cluster.get("workerGroupSpecs") or []]


def _head_env(cluster: dict) -> dict:
    containers = cluster["headGroupSpec"]["template"].get("spec", {}).get("containers") or [{}]
    return {e["name"]: e for e in containers[0].get("env") or []}


def _autoscaling(cluster: dict | None) -> bool:
    return bool(cluster and cluster.get("enableInTreeAutoscaling"))


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # MaxRayClusterNameLength 53, minus 6


def rule_metadata_name_is_dns1035_and_short(obj):
    """ValidateRay{Cluster,Job,Service}Metadata: name <= 53 (cluster) / 47 (job, service), DNS-1035.
    A generateName gets 5 random characters appended by the API server."""
    meta = obj["metadata"]
    name = meta.get("name") or (meta.get("generateName", "") + "x" * 5)
    errors = []
    if len(name) > MAX_NAME[obj["kind"]]:
        errors.append(f"name {name!r} longer than {MAX_NAME[obj['kind']]}")
    if not DNS1035.match(name):
        errors.append(f"name {name!r} is not a DNS-1035 label")
    return errors


def rule_groups_have_a_container(obj):
    """ValidateRayClusterSpec: headGroupSpec and every workerGroupSpec need at least one container."""
    return [f"{n}: no container" for c in _cluster_specs(obj) for n, g in _groups(c)
            if not g["template"].get("spec", {}).get("containers")]


def rule_resources_not_in_both_ray_start_params_and_group(obj):
    """validateRayGroupResources: num-cpus/num-gpus/memory/resources in rayStartParams and the group's
    Resources field must not both be set."""
    keys = ("num-cpus", "num-gpus", "memory", "resources")
    return [f"{n}: resources in rayStartParams and resources" for c in _cluster_specs(obj) for n, g in _groups(c)
            if any((g.get("rayStartParams") or {}).get(k) for k in keys) and g.get("resources")]


LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def rule_group_labels_valid_and_not_in_ray_start_params(obj):
    """validateRayGroupLabels: rayStartParams['labels'] is refused (use the group's labels field), and
    those labels must be valid Kubernetes label keys and values."""
    errors = []
    for c in _cluster_specs(obj):
        for n, g in _groups(c):
            if "labels" in (g.get("rayStartParams") or {}):
                errors.append(f"{n}: rayStartParams.labels")
            for k, v in (g.get("labels") or {}).items():
                if not LABEL_KEY.match(k) or not LABEL_VALUE.match(str(v)) or len(str(v)) > 63:
                    errors.append(f"{n}: bad label {k}={v}")
    return errors


def rule_gcs_fault_tolerance_settings_consistent(obj):
    """ValidateRayClusterSpec: RAY_REDIS_ADDRESS on the head needs gcsFaultToleranceOptions; with them,
    no redis-password param or REDIS_PASSWORD/RAY_REDIS_ADDRESS env; never a redis username."""
    errors = []
    for c in _cluster_specs(obj):
        head = c["headGroupSpec"]
        env = _head_env(c)
        ft = c.get("gcsFaultToleranceOptions")
        ann = obj["metadata"].get("annotations") or {}
        if ft is None and "RAY_REDIS_ADDRESS" in env and ann.get("ray.io/ft-enabled") != "true":
            errors.append("RAY_REDIS_ADDRESS without gcsFaultToleranceOptions")
        if ft is not None and ((head.get("rayStartParams") or {}).get("redis-password")
                               or "REDIS_PASSWORD" in env or "RAY_REDIS_ADDRESS" in env):
            errors.append("redis settings outside gcsFaultToleranceOptions")
        if ft is not None and ann.get("ray.io/ft-enabled"):
            errors.append("ray.io/ft-enabled annotation and gcsFaultToleranceOptions both set")
        if (head.get("rayStartParams") or {}).get("redis-username") or "REDIS_USERNAME" in env:
            errors.append("redis username outside gcsFaultToleranceOptions")
    return errors


def rule_no_suspended_worker_group_with_autoscaling(obj):
    """ValidateRayClusterSpec: a worker group cannot be suspended with the autoscaler on (and needs the
    RayJobDeletionPolicy feature gate, off by default, at all)."""
    return [f"{g.get('groupName')}: suspended" for c in _cluster_specs(obj)
            for g in c.get("workerGroupSpecs") or [] if g.get("suspend")]


def rule_autoscaler_v2_needs_autoscaling_and_restart_never(obj):
    """ValidateRayClusterSpec: RAY_enable_autoscaler_v2 only with enableInTreeAutoscaling, not together
    with autoscalerOptions.version, and with autoscaler v2 every pod's restartPolicy is Never or unset."""
    errors = []
    for c in _cluster_specs(obj):
        env = _head_env(c)
        v2_env = env.get("RAY_enable_autoscaler_v2", {}).get("value") in ("1", "true")
        version = (c.get("autoscalerOptions") or {}).get("version")
        if v2_env and not _autoscaling(c):
            errors.append("RAY_enable_autoscaler_v2 without enableInTreeAutoscaling")
        if _autoscaling(c) and version and "RAY_enable_autoscaler_v2" in env:
            errors.append("autoscalerOptions.version and RAY_enable_autoscaler_v2 both set")
        if _autoscaling(c) and (v2_env or version == "v2"):
            for n, g in _groups(c):
                if g["template"]["spec"].get("restartPolicy", "Never") != "Never":
                    errors.append(f"{n}: restartPolicy must be Never with autoscaler v2")
    return errors


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def rule_token_auth_needs_ray_2_52(obj):
    """ValidateRayClusterSpec: authOptions.mode token needs rayVersion set and >= 2.52.0."""
    return [f"authOptions token with rayVersion {c.get('rayVersion')!r}" for c in _cluster_specs(obj)
            if (c.get("authOptions") or {}).get("mode", "token" if c.get("authOptions") is not None else None) == "token"
            and (not c.get("rayVersion") or _version(c["rayVersion"]) < (2, 52, 0))]


def rule_rayjob_suspend_needs_shutdown(obj):
    """ValidateRayJobSpec: suspend needs shutdownAfterJobFinishes, and is refused with clusterSelector."""
    s = obj["spec"]
    errors = []
    if s.get("suspend") and not s.get("shutdownAfterJobFinishes"):
        errors.append("suspend without shutdownAfterJobFinishes")
    if s.get("suspend") and s.get("clusterSelector"):
        errors.append("suspend with clusterSelector")
    return errors


def rule_rayjob_ttl_needs_shutdown(obj):
    """validateDeletionConfiguration: ttlSecondsAfterFinished >= 0, and > 0 only with
    shutdownAfterJobFinishes: true (the 07092fa nightly RayJob broke this)."""
    s = obj["spec"]
    ttl = s.get("ttlSecondsAfterFinished", 0)
    errors = ["ttlSecondsAfterFinished < 0"] if ttl < 0 else []
    if ttl > 0 and not s.get("shutdownAfterJobFinishes"):
        errors.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    return errors


def rule_rayjob_deletion_strategy(obj):
    """validateDeletionConfiguration: deletionStrategy needs the RayJobDeletionPolicy feature gate (alpha,
    off by default), deletionRules exclude shutdownAfterJobFinishes and the legacy onSuccess/onFailure
    (which must come together), and clusterSelector jobs cannot delete a cluster they do not own."""
    ds = obj["spec"].get("deletionStrategy")
    if ds is None:
        return []
    errors = ["deletionStrategy needs the RayJobDeletionPolicy feature gate (off by default)"]
    rules, legacy = ds.get("deletionRules") or [], ("onSuccess" in ds or "onFailure" in ds)
    if rules and obj["spec"].get("shutdownAfterJobFinishes"):
        errors.append("deletionRules with shutdownAfterJobFinishes")
    if rules and legacy:
        errors.append("deletionRules with onSuccess/onFailure")
    if legacy and not ("onSuccess" in ds and "onFailure" in ds):
        errors.append("onSuccess and onFailure must both be set")
    policies = [r.get("policy") for r in rules] + [ds.get(k, {}).get("policy") for k in ("onSuccess", "onFailure")]
    if obj["spec"].get("clusterSelector") and {"DeleteCluster", "DeleteWorkers"} & set(policies):
        errors.append("cluster deletion policy with clusterSelector")
    return errors


def rule_rayjob_has_cluster_spec_or_selector(obj):
    """ValidateRayJobSpec: one of rayClusterSpec / clusterSelector; the selector names a cluster under
    ray.io/cluster, and SidecarMode cannot use a selector."""
    s = obj["spec"]
    errors = []
    if not s.get("rayClusterSpec") and not s.get("clusterSelector"):
        errors.append("neither rayClusterSpec nor clusterSelector")
    if s.get("clusterSelector"):
        if not s["clusterSelector"].get("ray.io/cluster"):
            errors.append("clusterSelector without ray.io/cluster")
        if s.get("submissionMode") == "SidecarMode":
            errors.append("clusterSelector in SidecarMode")
    return errors


def rule_rayjob_mode_specific_limits(obj):
    """ValidateRayJobSpec: InteractiveMode refuses backoffLimit > 0; SidecarMode refuses
    submitterPodTemplate/submitterConfig and a head restartPolicy other than Never."""
    s = obj["spec"]
    errors = []
    if s.get("submissionMode") == "InteractiveMode" and s.get("backoffLimit", 0) > 0:
        errors.append("backoffLimit in InteractiveMode")
    if s.get("submissionMode") == "SidecarMode":
        if s.get("submitterPodTemplate") or s.get("submitterConfig"):
            errors.append("submitter settings in SidecarMode")
        head = (s.get("rayClusterSpec") or {}).get("headGroupSpec", {}).get("template", {}).get("spec", {})
        if head.get("restartPolicy", "Never") != "Never":
            errors.append("head restartPolicy in SidecarMode")
    return errors


def rule_rayjob_runtime_env_is_yaml(obj):
    """ValidateRayJobSpec: runtimeEnvYAML must parse as YAML (a mapping)."""
    text = obj["spec"].get("runtimeEnvYAML")
    if not text:
        return []
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"runtimeEnvYAML: {exc}"]
    return [] if isinstance(parsed, dict) else ["runtimeEnvYAML is not a mapping"]


def rule_rayjob_deadline_and_backoff_positive(obj):
    """ValidateRayJobSpec: activeDeadlineSeconds > 0 when set; backoffLimit >= 0."""
    s = obj["spec"]
    errors = []
    if "activeDeadlineSeconds" in s and s["activeDeadlineSeconds"] <= 0:
        errors.append("activeDeadlineSeconds <= 0")
    if s.get("backoffLimit", 0) < 0:
        errors.append("backoffLimit < 0")
    return errors


def rule_rayservice_spec(obj):
    """ValidateRayServiceSpec: no headService name, upgradeStrategy.type one of
    NewClusterWithIncrementalUpgrade / NewCluster / None, rayClusterDeletionDelaySeconds >= 0, and the
    incremental upgrade needs the autoscaler and clusterUpgradeOptions."""
    s = obj["spec"]
    cluster = s.get("rayClusterConfig") or {}
    errors = []
    if ((cluster.get("headGroupSpec") or {}).get("headService") or {}).get("metadata", {}).get("name"):
        errors.append("headService.metadata.name set")
    kind = (s.get("upgradeStrategy") or {}).get("type")
    if kind is not None and kind not in ("NewClusterWithIncrementalUpgrade", "NewCluster", "None"):
        errors.append(f"upgradeStrategy.type {kind}")
    if s.get("rayClusterDeletionDelaySeconds", 0) < 0:
        errors.append("rayClusterDeletionDelaySeconds < 0")
    if kind == "NewClusterWithIncrementalUpgrade":
        opts = s["upgradeStrategy"].get("clusterUpgradeOptions")
        if not _autoscaling(cluster):
            errors.append("incremental upgrade without autoscaling")
        if not opts or not opts.get("gatewayClassName") or not opts.get("intervalSeconds", 0) > 0:
            errors.append("incremental upgrade without complete clusterUpgradeOptions")
    return errors


CLUSTER_RULES = [rule_metadata_name_is_dns1035_and_short, rule_groups_have_a_container,
                 rule_resources_not_in_both_ray_start_params_and_group,
                 rule_group_labels_valid_and_not_in_ray_start_params, rule_gcs_fault_tolerance_settings_consistent,
                 rule_no_suspended_worker_group_with_autoscaling,
                 rule_autoscaler_v2_needs_autoscaling_and_restart_never, rule_token_auth_needs_ray_2_52]
RULES = {
    "RayCluster": CLUSTER_RULES,
    "RayJob": CLUSTER_RULES + [rule_rayjob_suspend_needs_shutdown, rule_rayjob_ttl_needs_shutdown,
                               rule_rayjob_deletion_strategy, rule_rayjob_has_cluster_spec_or_selector,
                               rule_rayjob_mode_specific_limits, rule_rayjob_runtime_env_is_yaml,
                               rule_rayjob_deadline_and_backoff_positive],
    "RayService": CLUSTER_RULES + [rule_rayservice_spec],
}


def kuberay_errors(obj: dict) -> list[str]:
    errors = crd_field_errors(obj)
    for rule in RULES[obj["kind"]]:
        errors += [f"{rule.__name__}: {e}" for e in rule(obj)]
    return errors


@pytest.mark.parametrize("doc", [d for _, d in RAY], ids=_ids(RAY))
def test_ray_object_passes_kuberay_crd_and_operator_validation(doc):
    assert not kuberay_errors(doc)


def _rayjob() -> dict:
    return copy.deepcopy(next(d for d in of_kind("RayJob")))


def _raycluster() -> dict:
    return copy.deepcopy(next(d for d in of_kind("RayCluster")))


def _head(obj):
    return _cluster_specs(obj)[0]["headGroupSpec"]


BROKEN = {
    # The 07092fa nightly RayJob: a clusterSelector job with a TTL and no shutdownAfterJobFinishes.
    "rule_rayjob_ttl_needs_shutdown": lambda: {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"generateName": "steel-score-"},
        "spec": {"clusterSelector": {"ray.io/cluster": "steel"}, "entrypoint": "python x.py",
                 "ttlSecondsAfterFinished": 86400}},
    "rule_metadata_name_is_dns1035_and_short": lambda: {**_rayjob(), "metadata": {"name": "steel-train-" + "x" * 40}},
    "rule_groups_have_a_container": lambda: (lambda o: (_head(o)["template"]["spec"].update(containers=[]), o)[1])(_raycluster()),
    "rule_resources_not_in_both_ray_start_params_and_group":
        lambda: (lambda o: (_head(o).update(resources={"CPU": "1"}), o)[1])(_raycluster()),
    "rule_group_labels_valid_and_not_in_ray_start_params":
        lambda: (lambda o: (_head(o)["rayStartParams"].update(labels="a=b"), o)[1])(_raycluster()),
    "rule_gcs_fault_tolerance_settings_consistent": lambda: (lambda o: (
        _head(o)["template"]["spec"]["containers"][0].setdefault("env", []).append(
            {"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}), o)[1])(_raycluster()),
    "rule_no_suspended_worker_group_with_autoscaling":
        lambda: (lambda o: (o["spec"]["workerGroupSpecs"][0].update(suspend=True), o)[1])(_raycluster()),
    "rule_autoscaler_v2_needs_autoscaling_and_restart_never": lambda: (lambda o: (
        o["spec"].update(autoscalerOptions={"version": "v2"}),
        o["spec"]["workerGroupSpecs"][0]["template"]["spec"].update(restartPolicy="Always"), o)[2])(_raycluster()),
    "rule_token_auth_needs_ray_2_52":
        lambda: (lambda o: (o["spec"].update(authOptions={"mode": "token"}, rayVersion="2.46.0"), o)[1])(_raycluster()),
    "rule_rayjob_suspend_needs_shutdown":
        lambda: (lambda o: (o["spec"].update(suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0), o)[1])(_rayjob()),
    "rule_rayjob_deletion_strategy":
        lambda: (lambda o: (o["spec"].update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"}}), o)[1])(_rayjob()),
    "rule_rayjob_has_cluster_spec_or_selector": lambda: (lambda o: (o["spec"].pop("rayClusterSpec"), o)[1])(_rayjob()),
    "rule_rayjob_mode_specific_limits":
        lambda: (lambda o: (o["spec"].update(submissionMode="InteractiveMode"), o)[1])(_rayjob()),
    "rule_rayjob_runtime_env_is_yaml": lambda: (lambda o: (o["spec"].update(runtimeEnvYAML="env_vars: [a"), o)[1])(_rayjob()),
    "rule_rayjob_deadline_and_backoff_positive":
        lambda: (lambda o: (o["spec"].update(activeDeadlineSeconds=0), o)[1])(_rayjob()),
    "rule_rayservice_spec": lambda: {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "steel-serve"},
        "spec": {"upgradeStrategy": {"type": "BlueGreen"}, "rayClusterConfig": _raycluster()["spec"]}},
}


@pytest.mark.parametrize("name", sorted({r.__name__ for rules in RULES.values() for r in rules}))
def test_each_operator_rule_rejects_a_broken_manifest(name):
    obj = BROKEN[name]()
    fn = globals()[name]
    assert fn(obj), f"{name} let a broken {obj['kind']} through"
    assert any(e.startswith(name) for e in kuberay_errors(obj))


def test_crd_fields_reject_unknown_and_mistyped_fields():
    job = _rayjob()
    job["spec"]["ttlSecondAfterFinished"] = 60  # misspelt
    assert any("unknown field" in e for e in crd_field_errors(job))
    cluster = _raycluster()
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert any("must be int" in e for e in crd_field_errors(cluster))
    cluster = _raycluster()
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("strings" in e for e in crd_field_errors(cluster))


# ====================================================================================================
# Network isolation, checked on the pods KubeRay makes from these manifests (KubeRay 1.5.1 source):
#
# - the RayCluster's pods belong to a cluster of the object's own name; a RayJob's and a RayService's
#   to a cluster KubeRay names with GenerateRayClusterName (utils/util.go): `<name>-<5 random chars>`
#   from KubeRay 1.4 on, `<name>-raycluster-<5>` before (both are simulated: the policies must not
#   depend on it). A RayService keeps two clusters while it upgrades (upgradeStrategy NewCluster).
# - each Ray pod's labels are labelPod (common/pod.go): ray.io/is-ray-node, ray.io/cluster=<generated
#   name>, ray.io/node-type, ray.io/group, ray.io/identifier, app.kubernetes.io/{name,created-by},
#   plus the template's labels and the group's `labels` (which cannot override cluster/node-type/group).
# - a RayJob (K8sJobMode, the default) submits from a Kubernetes Job whose pod is its
#   submitterPodTemplate (GetSubmitterTemplate: copied as written, labels included); the Job
#   controller adds job-name labels. The operator itself talks to the head's dashboard port of the
#   clusters it drives (RayJob: job status; RayService: serve config), from its own namespace.
# - NetworkPolicy semantics (ingress only: no policy here restricts egress): a pod selected by no
#   policy accepts everything; a selected pod accepts what one of the selecting policies' rules allows;
#   a peer's podSelector alone means the policy's namespace; a rule without ports allows every port.

K8S_RAND = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand, what rand.String draws from
NAMESPACE = "steel"
OPERATOR_NAMESPACE = "default"  # where KubeRay's helm chart README installs the operator
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
                   "app.kubernetes.io/component": "kuberay-operator"}  # helm-chart/kuberay-operator
SERVE_CLIENT_LABELS = {"steel.io/ray-client": "steel-serve"}  # README: pods that may call the Serve endpoint
PORTS = {"dashboard": 8265, "gcs": 6379, "client": 10001, "metrics": 8080, "serve": 8000,
         "agent": 52365, "worker": 11000}  # Ray's ports; `worker` stands for the random worker ports


def _rand5(rng) -> str:
    return "".join(rng.choice(K8S_RAND) for _ in range(5))


def cluster_names(obj: dict, rng) -> list[str]:
    """The names KubeRay gives the RayCluster(s) of a Ray object (GenerateRayClusterName)."""
    name = obj["metadata"]["name"]
    if obj["kind"] == "RayCluster":
        return [name]
    names = [f"{name}-{_rand5(rng)}", f"{name}-raycluster-{_rand5(rng)}"]  # KubeRay >= 1.4, < 1.4
    if obj["kind"] == "RayService" and (obj["spec"].get("upgradeStrategy") or {}).get("type", "NewCluster") != "None":
        names.append(f"{name}-{_rand5(rng)}")  # the new cluster beside the old one during an upgrade
    return names


def _label_pod(node_type: str, cluster: str, group: str, template: dict, group_spec: dict) -> dict:
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
              "ray.io/group": group, "ray.io/identifier": f"{cluster}-{node_type}"[-63:],
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    merged = {**((template.get("metadata") or {}).get("labels") or {}), **(group_spec.get("labels") or {})}
    fixed = ("ray.io/node-type", "ray.io/group", "ray.io/cluster")
    return {**labels, **{k: str(v) for k, v in merged.items() if k not in fixed}}


def _ports(template: dict) -> dict:
    return {p["name"]: p["containerPort"] for c in template.get("spec", {}).get("containers", [])
            for p in c.get("ports", []) if p.get("name")}


def _pod(name, namespace, labels, role, owner=None, ports=None) -> dict:
    return {"name": name, "namespace": namespace, "labels": labels, "role": role, "owner": owner,
            "ports": ports or {}}


def kuberay_pods(obj: dict, rng) -> list[dict]:
    """One pod per group (head, each worker group) of every cluster of a Ray object, and a RayJob's
    submitter pod, labelled as KubeRay and the Job controller label them."""
    owner = f"{obj['kind']}/{obj['metadata']['name']}"
    ns = obj["metadata"].get("namespace", "default")
    spec = _cluster_specs(obj)[0]
    pods = []
    for cluster in cluster_names(obj, rng):
        head = spec["headGroupSpec"]
        pods.append(_pod(f"{cluster}-head-{_rand5(rng)}", ns, _label_pod("head", cluster, "headgroup", head["template"], head),
                         "head", owner, _ports(head["template"])))
        for g in spec.get("workerGroupSpecs") or []:
            pods.append(_pod(f"{cluster}-{g['groupName']}-worker-{_rand5(rng)}", ns,
                             _label_pod("worker", cluster, g["groupName"], g["template"], g), "worker", owner,
                             _ports(g["template"])))
    if obj["kind"] == "RayJob" and obj["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
        template = obj["spec"].get("submitterPodTemplate") or {}
        job = obj["metadata"]["name"]
        labels = {**((template.get("metadata") or {}).get("labels") or {}),
                  "batch.kubernetes.io/job-name": job, "job-name": job}
        pods.append(_pod(f"{job}-{_rand5(rng)}", ns, labels, "submitter", owner))
    return pods


def _cron_pods(obj: dict) -> list[dict]:
    template = obj["spec"]["jobTemplate"]["spec"]["template"]
    job = f"{obj['metadata']['name']}-29012345"
    labels = {**((template.get("metadata") or {}).get("labels") or {}), "batch.kubernetes.io/job-name": job,
              "job-name": job}
    env = {e["name"]: e.get("value") for c in template["spec"]["containers"] for e in c.get("env") or []}
    host = re.sub(r"^https?://", "", env.get("RAY_ADDRESS") or "").split(":")[0].split(".")[0]
    target = f"RayCluster/{host[:-len('-head-svc')]}" if host.endswith("-head-svc") else None
    pod = _pod(f"{job}-{'x' * 5}", obj["metadata"].get("namespace", "default"), labels, "client", f"CronJob/{obj['metadata']['name']}")
    pod["client_of"] = target
    return [pod]


def steel_pods(docs: list[dict], seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    pods = []
    for d in docs:
        if d["kind"] in RAY_KINDS:
            pods += kuberay_pods(d, rng)
        elif d["kind"] == "CronJob":
            pods += _cron_pods(d)
    return pods


def other_pods() -> list[dict]:
    """Pods steel does not make: whoever else runs in the EKS cluster."""
    return [_pod("debug", NAMESPACE, {"run": "debug"}, "stranger"),
            _pod("lookalike", NAMESPACE, {"ray.io/cluster": "steel", "ray.io/node-type": "head"}, "stranger"),
            _pod("web", "default", {"app": "web"}, "stranger"),
            _pod("kuberay-operator-7d9f8", OPERATOR_NAMESPACE, dict(OPERATOR_LABELS), "operator"),
            _pod("prometheus-0", "monitoring", {"app.kubernetes.io/name": "prometheus"}, "prometheus"),
            _pod("line-camera-gw", NAMESPACE, dict(SERVE_CLIENT_LABELS), "serve-client")]


def _selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    if any(labels.get(k) != str(v) for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], [str(v) for v in e.get("values") or []]
        ok = {"In": lambda: labels.get(key) in values, "NotIn": lambda: labels.get(key) not in values,
              "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[op]()
        if not ok:
            return False
    return True


def _peer_admits(peer: dict, policy_ns: str, src: dict) -> bool:
    assert "ipBlock" not in peer, "ipBlock peers are not modelled"
    ns_sel = peer.get("namespaceSelector")
    in_ns = (src["namespace"] == policy_ns if ns_sel is None
             else _selects(ns_sel, {"kubernetes.io/metadata.name": src["namespace"]}))
    return in_ns and ("podSelector" not in peer or _selects(peer["podSelector"], src["labels"]))


def _port_admits(ports: list | None, dst: dict, port: int) -> bool:
    if not ports:
        return True
    for p in ports:
        assert p.get("protocol", "TCP") == "TCP", p
        number = dst["ports"].get(p["port"]) if isinstance(p.get("port"), str) else p.get("port")
        if p.get("port") is None or number == port or (number is not None and number <= port <= p.get("endPort", number)):
            return True
    return False


def _policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if spec.get("egress") else []))


def isolating(policies: list[dict], dst: dict) -> list[dict]:
    """The NetworkPolicies that select ``dst`` for ingress."""
    return [p for p in policies if p["metadata"].get("namespace", "default") == dst["namespace"]
            and "Ingress" in _policy_types(p) and _selects(p["spec"]["podSelector"], dst["labels"])]


def reachable(policies: list[dict], src: dict, dst: dict, port: int) -> bool:
    selecting = isolating(policies, dst)
    if not selecting:
        return True
    return any(_port_admits(rule.get("ports"), dst, port)
               and (not rule.get("from") or any(_peer_admits(peer, p["metadata"].get("namespace", "default"), src)
                                                for peer in rule["from"]))
               for p in selecting for rule in p["spec"].get("ingress") or [])


def _dashboard_port(obj: dict) -> int:
    return int((_cluster_specs(obj)[0]["headGroupSpec"].get("rayStartParams") or {}).get("dashboard-port", 8265))


def network_errors(docs: list[dict]) -> list[str]:
    """What is wrong with the NetworkPolicies among ``docs`` for the pods the other objects make."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    errors = [f"{p['metadata']['name']}: restricts egress (not modelled)" for p in policies if "Egress" in _policy_types(p)]
    ours = steel_pods(docs)
    everyone = ours + other_pods()
    ray_objects = {f"{d['kind']}/{d['metadata']['name']}": d for d in docs if d["kind"] in RAY_KINDS}
    # 1. Every pod steel makes is isolated: selected by a policy, so only what a rule allows gets in.
    for pod in ours:
        if not isolating(policies, pod):
            errors.append(f"{pod['owner']} pod {pod['name']} ({pod['role']}): selected by no NetworkPolicy, open to every pod")
    for owner, obj in ray_objects.items():
        members = [p for p in ours if p["owner"] == owner and p["role"] in ("head", "worker")]
        heads = [p for p in members if p["role"] == "head"]
        # 2. A cluster's pods reach each other on every port (Ray uses many, some random).
        for a in members:
            for b in members:
                for port in PORTS.values():
                    if not reachable(policies, a, b, port):
                        errors.append(f"{owner}: {a['name']} cannot reach {b['name']}:{port}")
        # 3. The job API / dashboard: only the cluster's own pods and its clients. Clients: the
        #    CronJob pods whose RAY_ADDRESS is this cluster, a RayJob's own submitter, and the
        #    operator for the clusters it drives (RayJob, RayService).
        port = _dashboard_port(obj)
        for head in heads:
            for src in everyone:
                own = src["owner"] == owner
                expected = (own or src.get("client_of") == owner
                            or (src["role"] == "operator" and obj["kind"] in ("RayJob", "RayService")))
                if reachable(policies, src, head, port) != expected:
                    verb = "cannot reach" if expected else "reaches"
                    errors.append(f"{owner}: {src['name']} ({src['role']}, {src['namespace']}) {verb} the job API "
                                  f"{head['name']}:{port}")
        # 4. Prometheus scrapes every Ray pod's metrics port, and nothing else.
        for pod in members:
            prometheus = next(p for p in everyone if p["role"] == "prometheus")
            if not reachable(policies, prometheus, pod, PORTS["metrics"]):
                errors.append(f"{owner}: Prometheus cannot scrape {pod['name']}:{PORTS['metrics']}")
            for other in (port, PORTS["gcs"], PORTS["serve"]):
                if reachable(policies, prometheus, pod, other):
                    errors.append(f"{owner}: Prometheus reaches {pod['name']}:{other}")
        # 5. A RayService's Serve port: its own pods and the labelled Serve clients only.
        if obj["kind"] == "RayService":
            for pod in members:
                for src in everyone:
                    expected = src["owner"] == owner or src["role"] == "serve-client"
                    if reachable(policies, src, pod, PORTS["serve"]) != expected:
                        errors.append(f"{owner}: {src['name']} ({src['role']}) "
                                      f"{'cannot reach' if expected else 'reaches'} Serve on {pod['name']}:{PORTS['serve']}")
    # 6. Every client of a cluster names one that exists.
    for pod in ours:
        if pod.get("client_of") and pod["client_of"] not in ray_objects:
            errors.append(f"{pod['owner']}: RAY_ADDRESS names {pod['client_of']}, which no manifest defines")
    return errors


def _all_docs() -> list[dict]:
    return [d for _, d in documents()]


def test_kuberay_pod_simulation_follows_the_operator():
    docs = _all_docs()
    pods = steel_pods(docs)
    job = next(d for d in docs if d["kind"] == "RayJob")
    service = next(d for d in docs if d["kind"] == "RayService")
    job_clusters = {p["labels"]["ray.io/cluster"] for p in pods if p["owner"] == f"RayJob/{job['metadata']['name']}"
                    and p["role"] == "head"}
    name = job["metadata"]["name"]
    assert {re.sub(r"[bcdfghjklmnpqrstvwxz2456789]{5}$", "R", c) for c in job_clusters} == \
        {f"{name}-R", f"{name}-raycluster-R"}, job_clusters
    assert all(c != name for c in job_clusters), "KubeRay never names a RayJob's cluster after the RayJob itself"
    assert len({p["labels"]["ray.io/cluster"] for p in pods if p["owner"].startswith("RayService/")
                and p["role"] == "head"}) == 3  # two naming schemes + the upgrade's second cluster
    assert any(p["role"] == "submitter" for p in pods)
    head = next(p for p in pods if p["owner"] == "RayCluster/steel" and p["role"] == "head")
    assert head["labels"]["ray.io/cluster"] == "steel" and head["labels"]["ray.io/node-type"] == "head"
    assert next(p for p in pods if p["role"] == "client")["client_of"] == "RayCluster/steel"
    del service


def test_network_policies_cover_every_pod_and_guard_every_job_api():
    errors = network_errors(_all_docs())
    assert not errors, "\n".join(errors)


def test_policies_selecting_by_the_cluster_name_miss_the_generated_clusters():
    """Today's (before issue 20) policies: `ray.io/cluster: steel` selects only the RayCluster's pods."""
    by_name = [
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "steel-ray-internal", "namespace": NAMESPACE},
         "spec": {"podSelector": {"matchLabels": {"ray.io/cluster": "steel"}}, "policyTypes": ["Ingress"],
                  "ingress": [{"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": "steel"}}}]},
                              {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                               "ports": [{"port": 8080, "protocol": "TCP"}]}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "steel-ray-job-api", "namespace": NAMESPACE},
         "spec": {"podSelector": {"matchLabels": {"ray.io/cluster": "steel", "ray.io/node-type": "head"}},
                  "policyTypes": ["Ingress"],
                  "ingress": [{"from": [{"podSelector": {"matchLabels": {"steel.io/ray-client": "true"}}}],
                               "ports": [{"port": 8265, "protocol": "TCP"}]}]}},
    ]
    docs = [d for d in _all_docs() if d["kind"] != "NetworkPolicy"] + by_name
    errors = network_errors(docs)
    assert any("RayJob/" in e and "selected by no NetworkPolicy" in e for e in errors), errors
    assert any("RayService/" in e and "selected by no NetworkPolicy" in e for e in errors), errors
    assert any("RayJob/" in e and "(stranger" in e and "reaches the job API" in e for e in errors), errors


@pytest.mark.parametrize("breakage", ["unlabelled worker template", "job API open to the namespace",
                                      "no default deny"])
def test_network_check_catches_a_broken_manifest(breakage):
    docs = copy.deepcopy(_all_docs())
    if breakage == "unlabelled worker template":
        service = next(d for d in docs if d["kind"] == "RayService")
        service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"] = {}
    elif breakage == "job API open to the namespace":
        for p in docs:
            if p["kind"] == "NetworkPolicy":
                for rule in p["spec"].get("ingress") or []:
                    for peer in rule.get("from") or []:
                        if "podSelector" in peer and "namespaceSelector" not in peer:
                            peer["podSelector"] = {}
    else:
        docs = [d for d in docs if not (d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"] == {})]
    assert network_errors(docs)
