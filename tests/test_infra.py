"""cluster.yaml passes Ray's own schema check; every manifest in infra/ parses and its entry points
name real ``ray_jobs`` modules with arguments those modules accept."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import shlex
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
        assert "steel-ray-node" in node["node_config"]["IamInstanceProfile"]["Arn"]
    assert any("pip install" in cmd for cmd in c["setup_commands"])
    assert c["docker"]["image"]


def _documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
                # Manifests carried inside ConfigMaps (the nightly RayJob template) count too.
                if doc.get("kind") == "ConfigMap":
                    for text in doc.get("data", {}).values():
                        inner = yaml.safe_load(text)
                        if isinstance(inner, dict) and "kind" in inner:
                            docs.append((path, inner))
    return docs


def _entrypoints(node) -> list[str]:
    found = []
    if isinstance(node, dict):
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
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", path


def _check_entrypoint(entrypoint: str) -> str:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], entrypoint
    module_name, args = argv[2], argv[3:]
    assert module_name.startswith("ray_jobs."), entrypoint
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=module_name, exit_on_error=False)
    module.cli_arguments(parser)
    parsed = parser.parse_args(args)
    config = getattr(parsed, "config", None)
    if config:
        from steel.config import load_config

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


def test_cronjob_creates_scoring_rayjob_nightly():
    docs = [d for _, d in _documents()]
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = next(d for d in docs if d["kind"] == "RayJob" and "ray_jobs.score" in d["spec"]["entrypoint"])
    assert job["spec"]["clusterSelector"]


def test_iam_policy_is_least_privilege():
    policy = json.loads((REPO / "infra" / "iam-policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert "s3:*" not in actions and "*" not in actions
    for s in policy["Statement"]:
        assert all(r.startswith("arn:aws:s3:::") for r in s["Resource"]), s
        if "s3:PutObject" in s["Action"]:
            assert not any("steel-data" in r for r in s["Resource"]), "images bucket must stay read-only"


def test_dockerfile_base_image_and_keras_env():
    text = (REPO / "infra" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60." in text and "-py311-gpu" in text
    assert "ray-ml" not in text.split("FROM", 1)[1].split("\n", 1)[0]
    assert "TF_USE_LEGACY_KERAS=1" in text and "SM_FRAMEWORK=tf.keras" in text
