"""cluster.yaml passes Ray's own schema check and our checks for what it misses (ECR login, pinned AMI,
pinned image, head profile); infra/kuberay follows this project's deployment rules (pinned images from
their owners' registries, deadlines, token auth, network policy, metrics) and its entry points name real
``ray_jobs`` modules; the nightly CronJob's script fails when scoring fails (run against a real Ray head);
the Dockerfile has one CUDA stack and installs with the project's constraints."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "infra").rglob("*.yaml"))


def _validate_cluster(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validation():
    _validate_cluster(_cluster())


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["available_node_types"]["gpu_1x"].update(min_worker=0),  # misspelt key
        lambda c: c.update(max_worker=4),
        lambda c: c.update(head_node_type="nope"),
    ],
)
def test_broken_cluster_yaml_fails_validation(breakage):
    config = _cluster()
    breakage(config)
    with pytest.raises(Exception):
        _validate_cluster(config)


def test_cluster_only_ssh_open_to_world():
    perms = _cluster()["provider"]["security_group"]["IpPermissions"]
    world = [p for p in perms if any(r.get("CidrIp") == "0.0.0.0/0" for r in p.get("IpRanges", []))]
    assert [(p["FromPort"], p["ToPort"]) for p in world] == [(22, 22)]


def test_cluster_has_gpu_workers_iam_profile_and_install():
    c = _cluster()
    workers = {k: v for k, v in c["available_node_types"].items() if k != c["head_node_type"]}
    assert any(v["node_config"]["InstanceType"].startswith(("g", "p")) for v in workers.values())
    for node in c["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Arn"]
    assert any("pip install" in cmd for cmd in c["setup_commands"])
    assert c["docker"]["image"]


def _documents() -> list[tuple[Path, dict]]:
    from tests.test_kuberay import documents

    return [(REPO / "infra" / "kuberay" / f, d) for f, d in documents()]


def _cron() -> dict:
    return next(d for _, d in _documents() if d["kind"] == "CronJob")


def _cron_container(cron: dict | None = None) -> dict:
    return (cron or _cron())["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def _entrypoints(node) -> list[str]:
    """RayJob entrypoints, and the command the nightly CronJob hands to `ray job submit`."""
    found = []
    if isinstance(node, dict):
        if node.get("kind") == "CronJob":
            found.append(shlex.join(_cron_container(node)["args"]))
        for key, value in node.items():
            if key == "entrypoint":
                found.append(value)
            else:
                found.extend(_entrypoints(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_entrypoints(value))
    return found


def test_every_manifest_parses_and_is_kubernetes_shaped():
    docs = _documents()
    assert {p.name for p, _ in docs} == {p.name for p in MANIFESTS}
    kinds = {d["kind"] for _, d in docs}
    assert {"RayCluster", "RayJob", "CronJob"} <= kinds
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata"), path
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert doc["apiVersion"] == "ray.io/v1", path


def _check_entrypoint(entrypoint: str) -> str:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], entrypoint
    module_name, args = argv[2], argv[3:]
    assert module_name.startswith("ray_jobs."), entrypoint
    module = importlib.import_module(module_name)
    from steel.cli import command_parser

    parser = command_parser(module.COMMAND)
    parser.exit_on_error = False
    parsed = parser.parse_args(args)
    config = getattr(parsed, "config", None)
    if config:
        from steel.core.config import load_config

        assert (REPO / config).is_file(), f"{entrypoint}: config {config} does not exist"
        load_config(str(REPO / config))
    return module_name


def test_entrypoints_name_real_jobs_with_valid_arguments():
    modules = set()
    for path, doc in _documents():
        for entrypoint in _entrypoints(doc):
            modules.add(_check_entrypoint(entrypoint))
    assert {"ray_jobs.train", "ray_jobs.score"} <= modules


def test_a_bad_entrypoint_is_caught():
    with pytest.raises(ModuleNotFoundError):
        _check_entrypoint("python -m ray_jobs.trian --config configs/severstal-gpu.yaml")
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        _check_entrypoint("python -m ray_jobs.train --confg configs/severstal-gpu.yaml")




# ---- cluster.yaml: what Ray's validator does not check ---------------------------------------------

def _ecr_registry(image: str) -> str | None:
    m = re.match(r"^(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/", image)
    return m.group(0).rstrip("/") if m else None


def test_cluster_logs_in_to_ecr_before_pulling():
    c = _cluster()
    registry = _ecr_registry(c["docker"]["image"])
    if registry is None:
        pytest.skip("image is not on ECR")
    region = registry.split(".")[3]
    logins = [cmd for cmd in c.get("initialization_commands", [])
              if "aws ecr get-login-password" in cmd and "docker login" in cmd]
    assert logins, "image on ECR but no `aws ecr get-login-password | docker login` in initialization_commands"
    assert any(f"--region {region}" in cmd and cmd.rstrip().endswith(registry) for cmd in logins), logins


def test_cluster_image_tag_is_pinned_and_the_same_as_kuberay():
    image = _cluster()["docker"]["image"]
    name, _, tag = image.rpartition(":")
    assert "/" in name and tag and tag != "latest", f"{image}: pin a version tag"
    for _, doc in _documents():
        for img in _images(doc):
            if img.split(":")[0] == name:
                assert img == image, f"{img} differs from cluster.yaml's {image}"


def test_cluster_pins_an_ami_on_every_node_type():
    for name, node in _cluster()["available_node_types"].items():
        ami = node["node_config"].get("ImageId")
        assert ami and re.fullmatch(r"ami-[0-9a-f]{8,17}", ami), f"{name}: no pinned ImageId (Ray falls back to Ubuntu 18.04)"
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in (REPO / "cluster.yaml").read_text()


def test_cluster_head_and_workers_have_separate_profiles():
    c = _cluster()
    head = c["available_node_types"][c["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
    workers = {v["node_config"]["IamInstanceProfile"]["Arn"]
               for k, v in c["available_node_types"].items() if k != c["head_node_type"]}
    assert head.endswith("/steel-ray-head") and workers == {head.replace("steel-ray-head", "steel-ray-worker")}


# ---- infra/kuberay: this project's deployment rules -----------------------------------------------

def _pod_specs(doc: dict) -> list[dict]:
    from tests.test_kuberay import pod_templates

    if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
        return [t["spec"] for _, t in pod_templates(doc)]
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if doc["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    return []


def _images(doc: dict) -> list[str]:
    return [c["image"] for spec in _pod_specs(doc)
            for c in spec.get("containers", []) + spec.get("initContainers", [])]


TRUSTED_REGISTRIES = (r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/", r"^registry\.k8s\.io/", r"^rayproject/")


def test_every_image_is_pinned_and_from_its_owners_registry():
    images = [(p.name, i) for p, d in _documents() for i in _images(d)]
    assert images
    for path, image in images:
        ref = image.split("@")[0]
        assert "@sha256:" in image or (":" in ref.rsplit("/", 1)[-1] and not ref.endswith(":latest")), \
            f"{path}: {image} is not pinned to a version"
        assert any(re.match(r, image) for r in TRUSTED_REGISTRIES), f"{path}: {image} is from an untrusted registry"
        assert "bitnami/" not in image, f"{path}: versioned bitnami tags were withdrawn in 2025"


def test_no_hand_written_dev_shm_volume():
    for path, doc in _documents():
        for spec in _pod_specs(doc):
            for c in spec.get("containers", []):
                assert all(m["mountPath"] != "/dev/shm" for m in c.get("volumeMounts", [])), \
                    f"{path}: KubeRay sizes /dev/shm to the pod's memory; do not override it"


def test_gpu_workers_pin_one_gpu_type():
    for path, doc in _documents():
        for spec in _pod_specs(doc):
            gpus = [c for c in spec.get("containers", []) if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]
            if gpus:
                selector = spec.get("nodeSelector", {})
                assert selector.get("node.kubernetes.io/instance-type") or selector.get("nvidia.com/gpu.product"), \
                    f"{path}: GPU pods must pin a GPU type (nodeSelector)"


def test_rayjobs_have_deadlines_and_release_gpus_quickly():
    jobs = [(p, d) for p, d in _documents() if d["kind"] == "RayJob"]
    assert jobs
    for path, job in jobs:
        s = job["spec"]
        assert s.get("activeDeadlineSeconds", 0) > 0, f"{path}: RayJob without activeDeadlineSeconds"
        if s.get("rayClusterSpec"):
            assert s.get("shutdownAfterJobFinishes") is True, path
            assert s.get("ttlSecondsAfterFinished", 0) <= 600, f"{path}: GPU nodes idle after the job for too long"


def _env_names(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _uses_token(container: dict) -> bool:
    env = _env_names(container)
    token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return env.get("RAY_AUTH_MODE", {}).get("value") == "token" and token.get("name") and token.get("key")


def _ray_pod_specs(doc: dict) -> list[dict]:
    """The pod specs of a Ray object's Ray nodes (head and worker groups; not a RayJob's submitter)."""
    from tests.test_kuberay import pod_templates

    return [t["spec"] for where, t in pod_templates(doc) if where != "submitterPodTemplate"]


def _token_secret(container: dict) -> str | None:
    env = _env_names(container)
    return env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("name")


def test_every_ray_cluster_and_its_clients_use_token_auth():
    """Every cluster's dashboard/job API needs the token. Two ways (KubeRay 1.5.1 source): the cluster's
    ``authOptions: {mode: token}``, with which the operator makes the Secret and gives it to every Ray
    container, the autoscaler, a RayJob's submitter and its own dashboard client
    (SetContainerTokenAuthEnvVars, GetRayDashboardClientFunc); or the token from a Secret in each Ray
    container's env, which reaches nothing KubeRay adds. So the clusters the operator talks to (a
    RayJob's: job status; a RayService's: serve config) must use authOptions. (Network access to the
    job APIs: tests/test_kuberay.py, on the pods KubeRay makes.)"""
    from tests.test_kuberay import _cluster_specs

    secrets = {}
    ray_objects = [d for _, d in _documents() if d["kind"] in ("RayCluster", "RayJob", "RayService")]
    assert {d["kind"] for d in ray_objects} == {"RayCluster", "RayJob", "RayService"}
    for doc in ray_objects:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = _cluster_specs(doc)[0]
        assert spec["rayVersion"] >= "2.52", f"{name}: Ray token auth needs Ray >= 2.52"
        if (spec.get("authOptions") or {}).get("mode") == "token":
            continue
        assert doc["kind"] == "RayCluster", f"{name}: the operator must send the token: use authOptions {{mode: token}}"
        for pod in _ray_pod_specs(doc):
            for c in pod["containers"]:
                assert _uses_token(c), f"{name} {c['name']}: no RAY_AUTH_MODE=token with the token from a Secret"
        secrets[doc["metadata"]["name"]] = {_token_secret(c) for pod in _ray_pod_specs(doc) for c in pod["containers"]}
    assert _uses_token(_cron_container())
    assert secrets["steel"] == {_token_secret(_cron_container())}, "the nightly pod sends another cluster's token"


def test_the_autoscaler_sidecar_gets_the_token():
    """With enableInTreeAutoscaling KubeRay adds an autoscaler container to the head pod
    (BuildAutoscalerContainer); it talks to the GCS, which refuses it without the token. Its env is
    autoscalerOptions.env, plus the token only with authOptions (common/pod.go, KubeRay 1.5.1)."""
    from tests.test_kuberay import _cluster_specs

    for _, doc in _documents():
        if doc["kind"] not in ("RayCluster", "RayJob", "RayService"):
            continue
        spec = _cluster_specs(doc)[0]
        if not spec.get("enableInTreeAutoscaling") or (spec.get("authOptions") or {}).get("mode") == "token":
            continue
        sidecar = {"name": "autoscaler", "env": (spec.get("autoscalerOptions") or {}).get("env") or []}
        assert _uses_token(sidecar), f"{doc['metadata']['name']}: the autoscaler gets no RAY_AUTH_MODE/RAY_AUTH_TOKEN"
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert _token_secret(sidecar) == _token_secret(head), "the autoscaler sends another Secret's token"


def _pod_gpus(spec: dict) -> int:
    """nvidia.com/gpu a pod requests (an extended resource's request defaults to its limit)."""
    total = 0
    for c in spec.get("containers", []):
        res = c.get("resources") or {}
        total += int((res.get("requests") or {}).get("nvidia.com/gpu", (res.get("limits") or {}).get("nvidia.com/gpu", 0)))
    return total


def max_gpus(doc: dict) -> tuple[int, str]:
    """The most GPUs an object's pods can request at once, and how that is counted."""
    from tests.test_kuberay import _cluster_specs

    if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
        spec = _cluster_specs(doc)[0]
        per_cluster = _pod_gpus(spec["headGroupSpec"]["template"]["spec"]) + sum(
            int(g.get("maxReplicas", g.get("replicas", 0))) * int(g.get("numOfHosts", 1)) * _pod_gpus(g["template"]["spec"])
            for g in spec.get("workerGroupSpecs") or [])
        submitter = _pod_gpus(((doc["spec"].get("submitterPodTemplate") or {}).get("spec")) or {})
        # A RayService upgrade (NewCluster) runs the new cluster beside the old one until it serves, and
        # the old one until rayClusterDeletionDelaySeconds later: both may be at their maximum.
        clusters = 2 if doc["kind"] == "RayService" and (doc["spec"].get("upgradeStrategy") or {}).get(
            "type", "NewCluster") != "None" else 1
        return clusters * per_cluster + submitter, f"{clusters} x {per_cluster} + submitter {submitter}"
    gpus = sum(_pod_gpus(spec) for spec in _pod_specs(doc))
    return gpus, f"{gpus}"


def test_gpu_quota_holds_every_manifest_at_its_maximum_at_once():
    quota = next(d for _, d in _documents() if d["kind"] == "ResourceQuota")
    hard = int(quota["spec"]["hard"]["requests.nvidia.com/gpu"])
    counted = {f"{d['kind']}/{d['metadata']['name']}": max_gpus(d) for _, d in _documents()
               if d["metadata"].get("namespace") == quota["metadata"]["namespace"]}
    total = sum(n for n, _ in counted.values())
    assert {"RayCluster/steel", "RayJob/steel-train", "RayService/steel-serve"} <= set(counted)
    assert counted["RayService/steel-serve"][0] > 0 and counted["RayJob/steel-train"][0] > 0
    assert total <= hard, (f"ResourceQuota {quota['metadata']['name']}: {hard} GPUs, the manifests may ask for "
                           f"{total}: " + ", ".join(f"{k} {n} ({how})" for k, (n, how) in counted.items() if n))


def test_podmonitor_scrapes_the_ray_metrics_port():
    monitors = [d for _, d in _documents() if d["kind"] == "PodMonitor"]
    assert monitors and monitors[0]["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitors[0]["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels"}
    ports = {e["port"] for e in spec["podMetricsEndpoints"]}
    for _, doc in _documents():
        if doc["kind"] in ("RayCluster", "RayJob"):
            for pod in _ray_pod_specs(doc):
                names = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
                assert ports & names, f"{doc['metadata']['name']}: no container port named {ports}"


def test_service_accounts_exist_and_match_the_job():
    accounts = {d["metadata"]["name"] for _, d in _documents() if d["kind"] == "ServiceAccount"}
    for path, doc in _documents():
        for spec in _pod_specs(doc):
            assert spec.get("serviceAccountName") in accounts, f"{path}: service account {spec.get('serviceAccountName')}"
    train = next(d for _, d in _documents() if d["kind"] == "RayJob" and "ray_jobs.train" in d["spec"]["entrypoint"])
    assert {s["serviceAccountName"] for s in _ray_pod_specs(train)} == {"steel-train"}
    cluster = next(d for _, d in _documents() if d["kind"] == "RayCluster")
    assert {s["serviceAccountName"] for s in _ray_pod_specs(cluster)} == {"steel-score"}
    # A pod that only submits (the RayJob's submitter) gets no IAM role and no Kubernetes token.
    submitter = (train["spec"].get("submitterPodTemplate") or {}).get("spec")
    if submitter:
        account = next(d for _, d in _documents() if d["kind"] == "ServiceAccount"
                       and d["metadata"]["name"] == submitter["serviceAccountName"])
        assert "eks.amazonaws.com/role-arn" not in (account["metadata"].get("annotations") or {})
        assert account.get("automountServiceAccountToken") is False


def test_nightly_cronjob_waits_for_the_scoring_job():
    cron = _cron()
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job.get("activeDeadlineSeconds", 0) > 0
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    c = _cron_container(cron)
    script = c["command"][2]
    assert c["command"][:2] == ["bash", "-c"] and "ray job submit" in script and "--no-wait" not in script
    assert c["args"][:3] == ["python", "-m", "ray_jobs.score"]
    assert "RAY_ADDRESS" in _env_names(c)


# ---- the nightly script against a fake Ray: which jobs it stops and submits --------------------------

FAKE_RAY = r"""
import json, os, sys

STATE = os.environ["FAKE_RAY_STATE"]


def _load():
    with open(STATE) as fh:
        return json.load(fh)


def _save(state):
    with open(STATE, "w") as fh:
        json.dump(state, fh)


class Status(str):
    def is_terminal(self):
        return self in ("STOPPED", "SUCCEEDED", "FAILED")


class Job:
    def __init__(self, d):
        self.submission_id, self.status, self.entrypoint = d["id"], Status(d["status"]), d.get("entrypoint", "")


class JobSubmissionClient:  # what ray.job_submission offers, on the state file
    def __init__(self, address=None, **kwargs):
        _log({"call": "client", "address": address or os.environ.get("RAY_ADDRESS")})

    def list_jobs(self):
        return [Job(d) for d in _load()["jobs"]]

    def get_job_status(self, job_id):
        return Status(next(d["status"] for d in _load()["jobs"] if d["id"] == job_id))


def _log(entry):
    state = _load()
    state["calls"].append(entry)
    _save(state)


def cli(argv):  # `ray job stop ID` / `ray job submit --submission-id ID ... -- CMD`
    state = _load()
    assert argv[:1] == ["job"], argv
    if argv[1] == "stop":
        job_id = argv[-1]
        state["calls"].append({"call": "stop", "id": job_id})
        for d in state["jobs"]:
            if d["id"] == job_id:  # `ray job stop` waits until the job has stopped
                d["status"] = "STOPPED" if d["status"] in ("PENDING", "RUNNING") else d["status"]
        _save(state)
        return 0
    if argv[1] == "submit":
        job_id = argv[argv.index("--submission-id") + 1]
        live = [d["id"] for d in state["jobs"] if d["status"] in ("PENDING", "RUNNING")]
        state["calls"].append({"call": "submit", "id": job_id, "argv": argv, "live": live})
        state["jobs"].append({"id": job_id, "status": state.get("outcome", "SUCCEEDED")})
        _save(state)
        return 0 if state.get("outcome", "SUCCEEDED") == "SUCCEEDED" else 1
    raise SystemExit(f"fake ray: unexpected {argv}")
"""


def _fake_ray(tmp_path: Path, jobs: list[dict]) -> dict:
    """A fake ``ray`` CLI first on PATH and a fake ``ray`` package first on PYTHONPATH, both on one
    JSON state file (the cluster's jobs, and every call made)."""
    pkg = tmp_path / "pkg" / "ray"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_fake.py").write_text(FAKE_RAY)
    (pkg / "job_submission.py").write_text("from ray._fake import JobSubmissionClient  # noqa: F401\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(f"#!{sys.executable}\nimport sys\nfrom ray._fake import cli\nsys.exit(cli(sys.argv[1:]))\n")
    (bin_dir / "ray").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"jobs": jobs, "calls": []}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=str(tmp_path / "pkg"),
               FAKE_RAY_STATE=str(state), HOSTNAME="steel-nightly-score-29012345-abcde",
               STEEL_WORKDIR=str(tmp_path))
    for e in _cron_container()["env"]:  # the pod's own env (the token's Secret reference aside)
        if "value" in e:
            env[e["name"]] = e["value"]
    return {"env": env, "state": state}


def _run_script(fake: dict, *args) -> subprocess.CompletedProcess:
    c = _cron_container()
    return subprocess.run(c["command"] + list(args or c["args"]), env=fake["env"], capture_output=True,
                          text=True, timeout=60)


def test_nightly_script_stops_the_job_a_killed_pod_left_before_submitting(tmp_path):
    """A pod killed by SIGKILL (OOM, lost node, eviction past its grace period) never runs its trap: its
    Ray job keeps running, holding the output's lease, and the Job's retry would exit 3 (lease held).
    The script stops this CronJob's earlier jobs that are still live, by submission id, before it
    submits; it leaves every other job (interactive work, finished nights) alone."""
    c = _cron_container()
    cron = _cron()
    prefix = _env_names(c).get("SUBMISSION_PREFIX", {}).get("value") or f"{cron['metadata']['name']}-"
    assert prefix.startswith(cron["metadata"]["name"]), "the prefix should name the CronJob"
    earlier = f"{prefix}20260101T023000-steel-nightly-score-29011111-zzzzz-123"
    jobs = [{"id": earlier, "status": "RUNNING"},
            {"id": f"{prefix}20251231T023000-steel-nightly-score-29010000-yyyyy-7", "status": "SUCCEEDED"},
            {"id": "raysubmit_interactive", "status": "RUNNING"},
            {"id": "steel-score-by-hand", "status": "PENDING"}]
    fake = _fake_ray(tmp_path, jobs)
    out = _run_script(fake)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = [x for x in json.loads(fake["state"].read_text())["calls"] if x["call"] != "client"]
    assert [x["call"] for x in calls] == ["stop", "submit"], calls
    assert calls[0]["id"] == earlier
    submit = calls[1]
    assert earlier not in submit["live"], "submitted before the earlier job had stopped"
    assert set(submit["live"]) == {"raysubmit_interactive", "steel-score-by-hand"}
    assert submit["id"].startswith(prefix) and submit["id"] != earlier
    argv = submit["argv"]
    assert argv[argv.index("--") + 1:] == c["args"]
    # `ray job stop` then ends the job's driver with SIGINT and waits: Python raises KeyboardInterrupt,
    # steel's `finally` releases the lease, so the next try does not wait out lock_ttl_s.
    env_vars = json.loads(argv[argv.index("--runtime-env-json") + 1])["env_vars"]
    assert env_vars["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    grace = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert 0 < int(env_vars["RAY_JOB_STOP_WAIT_TIME_S"]) < grace, "the driver must get its time within the pod's"


def test_nightly_script_fails_when_the_job_fails_with_the_fake_ray(tmp_path):
    fake = _fake_ray(tmp_path, [])
    state = json.loads(fake["state"].read_text())
    fake["state"].write_text(json.dumps({**state, "outcome": "FAILED"}))
    out = _run_script(fake)
    assert out.returncode != 0 and "did not succeed" in out.stderr, out.stdout + out.stderr
    calls = [x["call"] for x in json.loads(fake["state"].read_text())["calls"] if x["call"] != "client"]
    assert calls == ["submit"], calls


def _head_token() -> str | None:
    """Ray 2.60 turns token auth on for a head started where a token exists (~/.ray/auth_token)."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return os.environ.get("RAY_AUTH_TOKEN") or (path.read_text().strip() if path.exists() else None)


def _run_nightly(address: str, workdir: Path, entrypoint: list[str], token: str | None = None,
                 prefix: str | None = None, **popen) -> subprocess.Popen:
    """The CronJob's own script (from the manifest), with the test's Ray head and entrypoint, and the
    token passed the way the manifest passes it (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN). Each run gets
    its own SUBMISSION_PREFIX unless given one (runs of one prefix stop each other's jobs)."""
    import uuid

    c = _cron_container()
    env = dict(os.environ, RAY_ADDRESS=address, STEEL_WORKDIR=str(workdir),
               SUBMISSION_PREFIX=prefix or f"test-{uuid.uuid4().hex[:8]}-")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return subprocess.Popen(c["command"] + entrypoint, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nightly_script_fails_when_scoring_fails_and_stops_the_job_on_deadline(ray_head, tmp_path):
    # `sleep` runs until stopped; on KeyboardInterrupt (what `ray job stop` sends it, RAY_JOB_STOP_SIGNAL)
    # it leaves a mark, as steel's driver releases its lease in a `finally`.
    (tmp_path / "job.py").write_text(
        "import pathlib, sys, time\nif sys.argv[1] == 'sleep':\n    try:\n        time.sleep(600)\n"
        "    except KeyboardInterrupt:\n        pathlib.Path(sys.argv[2]).write_text('released')\n        raise\n"
        "sys.exit(int(sys.argv[1]))\n")
    from ray.job_submission import JobStatus, JobSubmissionClient

    token = _head_token()
    client = JobSubmissionClient(ray_head, headers={"Authorization": f"Bearer {token}"} if token else None)
    before = {j.submission_id for j in client.list_jobs()}
    # All three at once (the slow part is each job's start): succeeding, failing, and one that runs
    # until Kubernetes' deadline SIGTERM.
    ok = _run_nightly(ray_head, tmp_path, ["python", "job.py", "0"], token)
    bad = _run_nightly(ray_head, tmp_path, ["python", "job.py", "3"], token)
    slow = _run_nightly(ray_head, tmp_path, ["python", "job.py", "sleep", str(tmp_path / "released-1")], token)
    out, _ = ok.communicate(timeout=180)
    assert ok.returncode == 0, out
    out, _ = bad.communicate(timeout=180)
    assert bad.returncode != 0 and "did not succeed" in out, out
    if token:  # the head requires the token: without it nothing is submitted
        anon = _run_nightly(ray_head, tmp_path, ["python", "job.py", "0"])
        out, _ = anon.communicate(timeout=120)
        assert anon.returncode != 0 and "Authentication" in out, out
    if token and (Path.home() / ".ray" / "auth_token").exists() and "RAY_AUTH_TOKEN" not in os.environ:
        # README: a workstation with RAY_AUTH_MODE=token sends the token from ~/.ray/auth_token.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        listing = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", ray_head],
                                 env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120)
        assert listing.returncode == 0, listing.stdout + listing.stderr

    def running_sleeper(proc, mark) -> str:
        deadline = time.time() + 150
        while time.time() < deadline:
            running = [j for j in client.list_jobs() if j.submission_id not in before
                       and j.status == JobStatus.RUNNING and mark in j.entrypoint]
            if running:
                return running[0].submission_id
            time.sleep(0.5)
        proc.kill()
        jobs = [(j.submission_id, j.status, j.entrypoint, j.message) for j in client.list_jobs()]
        pytest.fail(f"the sleeping job never ran: {jobs}\n{proc.communicate()[0]}")

    job_id = running_sleeper(slow, "released-1")
    slow.send_signal(signal.SIGTERM)  # what Kubernetes does at activeDeadlineSeconds
    out, _ = slow.communicate(timeout=90)
    assert slow.returncode == 143, out
    assert client.get_job_status(job_id) == JobStatus.STOPPED
    assert (tmp_path / "released-1").read_text() == "released", "the driver was not stopped with SIGINT"

    # A pod SIGKILLed (no trap runs): its job goes on; the Job's next pod stops it, then scores.
    prefix = "steel-nightly-score-test-"
    killed = _run_nightly(ray_head, tmp_path, ["python", "job.py", "sleep", str(tmp_path / "released-2")], token,
                          prefix=prefix)
    orphan = running_sleeper(killed, "released-2")
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=30)
    time.sleep(1)
    assert client.get_job_status(orphan) == JobStatus.RUNNING, "the job should outlive its SIGKILLed pod"
    retry = _run_nightly(ray_head, tmp_path, ["python", "job.py", "0"], token, prefix=prefix)
    out, _ = retry.communicate(timeout=180)
    assert retry.returncode == 0, out
    assert f"stopping Ray job {orphan}" in out, out
    assert client.get_job_status(orphan) == JobStatus.STOPPED
    assert (tmp_path / "released-2").read_text() == "released"


# ---- Dockerfile ---------------------------------------------------------------------------------------

DOCKERFILE = REPO / "infra" / "Dockerfile"


def _from_image() -> str:
    return next(line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM "))


def test_dockerfile_has_one_cuda_stack_and_a_pinned_base():
    base = _from_image()
    assert re.fullmatch(r"rayproject/ray:2\.60\.\d+-py311-cpu(@sha256:[0-9a-f]{64})?", base), \
        f"{base}: the CUDA libraries come from tensorflow[and-cuda]; a -gpu/-cu base would add a second stack"
    text = DOCKERFILE.read_text()
    assert "tensorflow[and-cuda]" in text
    assert "ray-ml" not in base


def test_dockerfile_installs_with_the_project_constraints_and_checks():
    text = DOCKERFILE.read_text()
    installs = [line for line in re.split(r"(?<!\\)\n", text) if "pip install" in line]
    assert installs
    for line in installs:
        for part in line.split("&&"):
            if "pip install" in part:
                assert "-c constraints.txt" in part, f"pip install without the constraints: {part.strip()}"
    assert "COPY" in text and "constraints.txt" in text.split("pip install", 1)[0]
    assert "pip check" in text
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    ray_tag = re.search(r"ray:(\d+\.\d+\.\d+)", _from_image()).group(1)
    assert pins["ray"] == ray_tag, "base image's Ray and constraints.txt's differ"
    tf = re.search(r'tensorflow\[and-cuda\]==([\d.*]+)', text)
    assert tf and pins["tensorflow"].startswith(tf.group(1).rstrip("*").rstrip(".")), "TensorFlow pin differs"


def test_dockerfile_keeps_tf_warnings_and_keras_env():
    text = DOCKERFILE.read_text()
    assert "TF_USE_LEGACY_KERAS=1" in text and "SM_FRAMEWORK=tf.keras" in text
    level = re.search(r"TF_CPP_MIN_LOG_LEVEL=(\d)", text)
    assert level is None or int(level.group(1)) <= 1, "level 2 hides TF's 'Skipping registering GPU devices'"


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignore = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", "runs", ".git"):
        assert any(line.strip("/") == entry for line in ignore), f".dockerignore misses {entry}"


def test_gpu_smoke_check_is_in_the_image_and_fails_without_a_gpu():
    text = DOCKERFILE.read_text()
    assert "infra/gpu_smoke.py" in text
    out = subprocess.run([sys.executable, str(REPO / "infra" / "gpu_smoke.py"), "--require-gpu"],
                         capture_output=True, text=True, timeout=240, env=dict(os.environ, CUDA_VISIBLE_DEVICES="-1"))
    assert out.returncode != 0 and "no GPU" in out.stdout + out.stderr, out.stdout + out.stderr


def test_cluster_turns_on_token_auth_with_a_token_on_every_node():
    c = _cluster()
    assert any(re.search(r"(--env|-e)[ =]RAY_AUTH_MODE=token", o) for o in c["docker"]["run_options"]), \
        "RAY_AUTH_MODE=token is not set in the containers"
    mounts = {os.path.expanduser(k) if not k.startswith("~") else k: v for k, v in c["file_mounts"].items()}
    assert any(k.endswith(".ray/auth_token") and v.endswith(".ray/auth_token") for k, v in mounts.items()), \
        "the token file is not copied to the nodes"
