"""IAM (infra/iam/): every URI a job writes or reads is allowed for the role that runs it, the scoring
role cannot touch bundles, no action wildcards, listing only under named prefixes, and the autoscaler's
rights (with iam:PassRole for the worker role only) only on the launcher head's role.

Policies are evaluated by a small evaluator of IAM's own rules for what these files use: explicit Deny
wins, else any matching Allow (no match: implicit deny); actions match case-insensitively, resources
case-sensitively, both with ``*``/``?`` wildcards; every condition operator of a statement must hold,
every key of an operator must hold, and a key holds when any of its values matches; a key missing
from the request fails ``String*`` operators (and ``ForAnyValue:``) but passes ``ForAllValues:``;
condition key names are case-insensitive, values are not. Operators: ``StringEquals``,
``StringLike``, ``StringNotEquals``, ``Null``, with ``ForAnyValue:``/``ForAllValues:`` for multi-valued
keys (``aws:TagKeys``). Anything else fails the test rather than being guessed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IAM = REPO / "infra" / "iam"
ROLES = {k: v for k, v in json.loads((IAM / "roles.json").read_text()).items() if not k.startswith("_")}
ACCOUNT = "123456789012"


def _policy(name: str) -> dict:
    return json.loads((IAM / f"{name}.json").read_text())


def _statements(role: str) -> list[dict]:
    return [s for name in ROLES[role]["policies"] for s in _policy(name)["Statement"]]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


_OPERATORS = {
    "StringEquals": lambda value, pattern: value == pattern,
    "StringLike": lambda value, pattern: fnmatch.fnmatchcase(value, pattern),
    "StringNotEquals": lambda value, pattern: value != pattern,
}


def _condition_holds(op: str, key: str, patterns, context: dict) -> bool:
    patterns = [str(p) for p in _as_list(patterns)]
    present = {k.lower(): v for k, v in context.items()}
    value = present.get(key.lower())
    if op == "Null":  # "true": the key must be absent; "false": present
        return any((value is None) == (p.lower() == "true") for p in patterns)
    qualifier, _, base = op.rpartition(":")
    assert base in _OPERATORS and qualifier in ("", "ForAnyValue", "ForAllValues"), f"evaluator does not know {op}"
    test = _OPERATORS[base]
    if qualifier == "ForAllValues":  # every value in the request matches one pattern (vacuously true if absent)
        return value is None or all(any(test(v, p) for p in patterns) for v in _as_list(value))
    if value is None:
        return False
    values = _as_list(value)
    if qualifier == "ForAnyValue" or len(values) > 1:
        return any(test(v, p) for v in values for p in patterns)
    if base == "StringNotEquals":  # negated operators: the value matches none of the patterns
        return all(test(values[0], p) for p in patterns)
    return any(test(values[0], p) for p in patterns)


def _matches(statement: dict, action: str, resource: str, context: dict) -> bool:
    if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _as_list(statement["Action"])):
        return False
    if not any(fnmatch.fnmatchcase(resource, r) for r in _as_list(statement["Resource"])):
        return False
    return all(_condition_holds(op, key, patterns, context)
               for op, conditions in statement.get("Condition", {}).items()
               for key, patterns in conditions.items())


def allowed(role: str, action: str, resource: str, context: dict | None = None, **kwargs) -> bool:
    """IAM's decision for one request. ``context``: condition keys of the request (e.g.
    ``{"aws:RequestTag/ray-cluster-name": "steel"}``); ``s3_prefix=`` is ``s3:prefix``."""
    context = {**(context or {}), **{k.replace("s3_", "s3:"): v for k, v in kwargs.items()}}
    statements = _statements(role)
    if any(s["Effect"] == "Deny" and _matches(s, action, resource, context) for s in statements):
        return False
    return any(s["Effect"] == "Allow" and _matches(s, action, resource, context) for s in statements)


def _split(uri: str) -> tuple[str, str]:
    assert uri.startswith("s3://"), uri
    bucket, _, key = uri[5:].partition("/")
    return bucket, key.rstrip("/")


def can_write(role: str, uri: str) -> bool:
    bucket, key = _split(uri)
    obj = f"arn:aws:s3:::{bucket}/{key}/part-0.parquet"
    return (allowed(role, "s3:PutObject", obj) and allowed(role, "s3:DeleteObject", obj)
            and allowed(role, "s3:ListBucket", f"arn:aws:s3:::{bucket}", s3_prefix=f"{key}/"))


def can_read(role: str, uri: str) -> bool:
    bucket, key = _split(uri)
    return (allowed(role, "s3:GetObject", f"arn:aws:s3:::{bucket}/{key}/x.jpg")
            and allowed(role, "s3:ListBucket", f"arn:aws:s3:::{bucket}", s3_prefix=f"{key}/"))


def _config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())


# Every config that works on S3 (the cluster configs), not only today's.
S3_CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml")
                    if str(yaml.safe_load(p.read_text()).get("bundle", "")).startswith("s3://"))


def _nightly_args() -> dict:
    """--images / --out of the nightly scoring command in the CronJob."""
    text = (REPO / "infra" / "kuberay" / "nightly-score.yaml").read_text()
    argv = shlex.split(" ".join(str(a) for d in yaml.safe_load_all(text) if d and d["kind"] == "CronJob"
                                for c in d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
                                for a in c.get("args", [])))
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i] in ("--images", "--out")}


# --- the evaluator itself ----------------------------------------------------------------------------

def test_evaluator_follows_iam_rules():
    assert allowed("steel-train", "s3:GetObject", "arn:aws:s3:::steel-data/severstal/train.csv")
    assert not allowed("steel-train", "s3:GetObject", "arn:aws:s3:::steel-data/other/train.csv")
    assert not allowed("steel-train", "s3:ListBucket", "arn:aws:s3:::steel-data")  # no prefix: denied
    assert not allowed("steel-train", "s3:ListBucket", "arn:aws:s3:::steel-data", s3_prefix="other/")
    assert allowed("steel-train", "s3:ListBucket", "arn:aws:s3:::steel-data", s3_prefix="severstal/x/")


@pytest.mark.parametrize("op, patterns, context, holds", [
    ("StringEquals", "steel", {"ec2:ResourceTag/ray-cluster-name": "steel"}, True),
    ("StringEquals", "steel", {"ec2:ResourceTag/ray-cluster-name": "Steel"}, False),  # values: case-sensitive
    ("StringEquals", "steel", {"EC2:ResourceTag/RAY-CLUSTER-NAME": "steel"}, True),  # key names: not
    ("StringEquals", "steel", {}, False),  # a missing key never equals
    ("StringLike", "ste*", {"ec2:ResourceTag/ray-cluster-name": "steel"}, True),
    ("StringEquals", "ste*", {"ec2:ResourceTag/ray-cluster-name": "steel"}, False),  # no wildcards in Equals
    ("StringNotEquals", ["a", "b"], {"ec2:ResourceTag/ray-cluster-name": "b"}, False),
    ("StringNotEquals", ["a", "b"], {"ec2:ResourceTag/ray-cluster-name": "c"}, True),
    ("Null", "true", {}, True),
    ("Null", "true", {"ec2:ResourceTag/ray-cluster-name": "x"}, False),
])
def test_evaluator_condition_operators(op, patterns, context, holds):
    assert _condition_holds(op, "ec2:ResourceTag/ray-cluster-name", patterns, context) is holds


def test_evaluator_set_operators_on_multivalued_keys():
    keys = {"aws:TagKeys": ["ray-cluster-name", "Name"]}
    assert _condition_holds("ForAnyValue:StringEquals", "aws:TagKeys", ["Name"], keys)
    assert not _condition_holds("ForAllValues:StringEquals", "aws:TagKeys", ["Name"], keys)
    assert _condition_holds("ForAllValues:StringEquals", "aws:TagKeys", ["Name", "ray-cluster-name"], keys)
    assert _condition_holds("ForAllValues:StringEquals", "aws:TagKeys", ["Name"], {})  # vacuous
    assert not _condition_holds("ForAnyValue:StringEquals", "aws:TagKeys", ["Name"], {})
    with pytest.raises(AssertionError, match="does not know"):
        _condition_holds("NumericLessThan", "aws:MultiFactorAuthAge", "3600", {"aws:MultiFactorAuthAge": "1"})


# --- each role may do what its jobs do ---------------------------------------------------------------

def test_there_are_s3_configs():
    assert "severstal-gpu" in S3_CONFIGS


@pytest.mark.parametrize("name", S3_CONFIGS)
def test_training_role_writes_every_output_of_training(name):
    c = _config(name)
    for uri in (c["train"]["output"], c["bundle"], c["report"], c.get("bundle_versions") or c["bundle"]):
        assert can_write("steel-train", uri), f"steel-train cannot write {uri}"
    assert can_read("steel-train", c["data"]["root"])


@pytest.mark.parametrize("name", S3_CONFIGS)
def test_scoring_role_reads_bundle_and_images_and_writes_scores(name):
    c = _config(name)
    nightly = _nightly_args()
    assert nightly.get("--images") and nightly.get("--out"), "nightly CronJob has no --images/--out"
    for uri in (c["score"]["out"], nightly["--out"]):
        assert can_write("steel-score", uri), f"steel-score cannot write {uri}"
    for uri in (c["bundle"], c.get("bundle_versions") or c["bundle"], c["score"]["images"], nightly["--images"]):
        assert can_read("steel-score", uri), f"steel-score cannot read {uri}"


@pytest.mark.parametrize("name", S3_CONFIGS)
def test_launcher_nodes_can_run_every_stage(name):
    c = _config(name)
    for role in ("steel-ray-head", "steel-ray-worker"):
        for uri in (c["train"]["output"], c["bundle"], c["report"], c["score"]["out"]):
            assert can_write(role, uri), f"{role} cannot write {uri}"


# --- and no more ---------------------------------------------------------------------------------------

def test_scoring_role_cannot_write_or_delete_bundles_or_training_data():
    bundle = "arn:aws:s3:::steel-models/bundles/severstal-gpu/manifest.json"
    for action in ("s3:PutObject", "s3:DeleteObject"):
        assert not allowed("steel-score", action, bundle)
        assert not allowed("steel-score", action, "arn:aws:s3:::steel-models/checkpoints/x/ckpt")
        assert not allowed("steel-score", action, "arn:aws:s3:::steel-data/plant/archive/a.jpg")
    assert not allowed("steel-score", "s3:GetObject", "arn:aws:s3:::steel-models/checkpoints/x/ckpt")


def test_no_role_writes_the_images_bucket():
    for role in ROLES:
        for action in ("s3:PutObject", "s3:DeleteObject"):
            assert not allowed(role, action, "arn:aws:s3:::steel-data/severstal/train_images/a.jpg"), role


@pytest.mark.parametrize("name", sorted(p.stem for p in IAM.glob("steel-*.json")))
def test_no_wildcard_actions_and_listing_only_under_prefixes(name):
    for s in _policy(name)["Statement"]:
        for action in _as_list(s["Action"]):
            service, _, verb = action.partition(":")
            assert verb and "*" not in action and "?" not in action, f"{name}: wildcard action {action}"
        if "s3:ListBucket" in _as_list(s["Action"]):
            prefixes = s.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
            assert prefixes, f"{name}: s3:ListBucket without an s3:prefix condition"
        if any(a.startswith("s3:") for a in _as_list(s["Action"])):
            assert all(r.startswith("arn:aws:s3:::") for r in _as_list(s["Resource"])), s


def test_autoscaler_rights_only_on_the_launcher_head():
    worker_role = f"arn:aws:iam::{ACCOUNT}:role/steel-ray-worker"
    for role in ROLES:
        can_launch = allowed(role, "ec2:RunInstances", _instance("*"), _request_tags(CLUSTER_NAME))
        assert can_launch == (role == "steel-ray-head"), role
        assert allowed(role, "iam:PassRole", worker_role) == (role == "steel-ray-head"), role
        assert not allowed(role, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/steel-ray-head"), role
        assert not allowed(role, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin"), role
        can_terminate = allowed(role, "ec2:TerminateInstances", _instance(), _resource_tags(CLUSTER_NAME))
        assert can_terminate == (role == "steel-ray-head"), role


# --- the autoscaler touches only its own cluster's instances ------------------------------------------
# Ray's AWS node provider tags every instance it launches with ray-cluster-name=<cluster_name> (in the
# RunInstances call's TagSpecifications), finds its nodes by that tag, retags them (CreateTags) as their
# status changes, and terminates (or, with cache_stopped_nodes, stops and restarts) them by id.

CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
CLUSTER_NAME = CLUSTER["cluster_name"]
REGION = CLUSTER["provider"]["region"]
TAG = "ray-cluster-name"


def _instance(instance_id: str = "i-0123456789abcdef0", region: str = REGION, account: str = ACCOUNT) -> str:
    return f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"


def _resource_tags(cluster: str | None) -> dict:
    """Condition keys of a request on an existing instance tagged ray-cluster-name=<cluster> (None: untagged)."""
    return {} if cluster is None else {f"ec2:ResourceTag/{TAG}": cluster}


def _request_tags(cluster: str | None, **other) -> dict:
    """Condition keys of a request that sets tags (RunInstances' TagSpecifications, CreateTags)."""
    tags = ({TAG: cluster} if cluster is not None else {}) | other
    return {**{f"aws:RequestTag/{k}": v for k, v in tags.items()}, **({"aws:TagKeys": list(tags)} if tags else {})}


def _launch_resources() -> list[str]:
    """The other resources IAM authorizes in a RunInstances call of cluster.yaml's node types: the AMI,
    subnet, security group, key pair, the network interface and volumes it creates, and the spot request
    of a spot node type."""
    amis = {n["node_config"]["ImageId"] for n in CLUSTER["available_node_types"].values()}
    kinds = ["subnet", "security-group", "key-pair", "network-interface", "volume"]
    if any("InstanceMarketOptions" in n["node_config"] for n in CLUSTER["available_node_types"].values()):
        kinds.append("spot-instances-request")
    return ([f"arn:aws:ec2:{REGION}::image/{ami}" for ami in sorted(amis)]
            + [f"arn:aws:ec2:{REGION}:{ACCOUNT}:{kind}/x-0123456789abcdef0" for kind in kinds])


def test_autoscaler_tag_is_rays_and_names_the_cluster_of_cluster_yaml():
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    assert TAG == TAG_RAY_CLUSTER_NAME
    values = [v for s in _policy("steel-autoscaler")["Statement"] for conds in s.get("Condition", {}).values()
              for key, v in conds.items() if key.lower().endswith(f"tag/{TAG}")]
    assert values, "steel-autoscaler scopes nothing by the cluster's tag"
    assert all(_as_list(v) == [CLUSTER_NAME] for v in values), (values, CLUSTER_NAME)


@pytest.mark.parametrize("action", ["ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"])
def test_autoscaler_stops_and_terminates_only_its_own_instances(action):
    assert allowed("steel-ray-head", action, _instance(), _resource_tags(CLUSTER_NAME))
    assert not allowed("steel-ray-head", action, _instance()), "an untagged instance"
    assert not allowed("steel-ray-head", action, _instance(), _resource_tags("other-cluster"))
    assert not allowed("steel-ray-head", action, _instance(), _resource_tags(CLUSTER_NAME.upper()))
    assert not allowed("steel-ray-head", action, _instance(account="210987654321"), _resource_tags(CLUSTER_NAME))


def test_autoscaler_launches_only_instances_tagged_for_its_cluster():
    head = "steel-ray-head"
    assert allowed(head, "ec2:RunInstances", _instance("*"), _request_tags(CLUSTER_NAME, **{"ray-node-type": "worker"}))
    assert not allowed(head, "ec2:RunInstances", _instance("*")), "an untagged launch"
    assert not allowed(head, "ec2:RunInstances", _instance("*"), _request_tags("other-cluster"))
    assert not allowed(head, "ec2:RunInstances", _instance("*", region="eu-west-1"), _request_tags(CLUSTER_NAME))
    for resource in _launch_resources():  # what else a launch touches: not taggable by Ray, so untagged
        assert allowed(head, "ec2:RunInstances", resource), resource
        assert not allowed("steel-ray-worker", "ec2:RunInstances", resource), resource


def test_autoscaler_tags_instances_only_at_launch_or_its_own():
    head = "steel-ray-head"
    at_launch = {"ec2:CreateAction": "RunInstances"}
    assert allowed(head, "ec2:CreateTags", _instance("*"), {**at_launch, **_request_tags(CLUSTER_NAME)})
    assert not allowed(head, "ec2:CreateTags", _instance("*"), {**at_launch, **_request_tags("other-cluster")})
    status = _request_tags(None, **{"ray-node-status": "up-to-date"})
    assert allowed(head, "ec2:CreateTags", _instance(), {**_resource_tags(CLUSTER_NAME), **status})
    # Adopting someone else's instance (tag it as ours, then terminate it) is refused at the first step.
    assert not allowed(head, "ec2:CreateTags", _instance(), _request_tags(CLUSTER_NAME))
    assert not allowed(head, "ec2:CreateTags", _instance(), {**_resource_tags("other-cluster"), **_request_tags(CLUSTER_NAME)})
    assert not allowed(head, "ec2:CreateTags", f"arn:aws:ec2:{REGION}:{ACCOUNT}:volume/vol-1", _request_tags(CLUSTER_NAME))


def test_autoscaler_still_sees_everything_it_needs():
    for action in ("ec2:DescribeInstances", "ec2:DescribeInstanceStatus", "ec2:DescribeInstanceTypes",
                   "ec2:DescribeImages", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups",
                   "ec2:DescribeKeyPairs", "ec2:DescribeAvailabilityZones"):
        assert allowed("steel-ray-head", action, "*"), action  # Describe* has no resource-level permissions
        assert not allowed("steel-ray-worker", action, "*"), action


def test_launcher_nodes_can_pull_the_image_from_ecr():
    image = yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"]
    registry, _, rest = image.partition("/")
    account, _, _, region = registry.split(".")[:4]
    repo = rest.split(":")[0]
    for role in ("steel-ray-head", "steel-ray-worker"):
        assert allowed(role, "ecr:GetAuthorizationToken", "*"), role
        for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"):
            assert allowed(role, action, f"arn:aws:ecr:{region}:{account}:repository/{repo}"), (role, action)


def test_cluster_yaml_and_service_accounts_use_these_roles():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for name, node in cluster["available_node_types"].items():
        want = "steel-ray-head" if name == cluster["head_node_type"] else "steel-ray-worker"
        assert node["node_config"]["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/{want}"), name
    accounts = {}
    for path in (REPO / "infra" / "kuberay").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "ServiceAccount":
                accounts[doc["metadata"]["name"]] = doc["metadata"].get("annotations", {})
    assert accounts["steel-train"]["eks.amazonaws.com/role-arn"].endswith(":role/steel-train")
    assert accounts["steel-score"]["eks.amazonaws.com/role-arn"].endswith(":role/steel-score")


# --- infra/iam/create.sh, run with the real AWS CLI against moto's IAM ----------------------------------

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("aws") is None, reason="the AWS CLI is not installed")
@pytest.mark.timeout(300)
def test_create_script_builds_exactly_the_roles_of_roles_json(s3_endpoint):
    """moto's IAM server also checks each policy document's grammar, as IAM does on create-policy."""
    import boto3

    oidc = "oidc.eks.us-east-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE"
    env = dict(os.environ, ACCOUNT=ACCOUNT, OIDC_PROVIDER=oidc, AWS_ENDPOINT_URL=s3_endpoint,
               AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    out = subprocess.run(["bash", str(IAM / "create.sh")], env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    iam = boto3.client("iam", endpoint_url=s3_endpoint, region_name="us-east-1")
    for role, spec in ROLES.items():
        attached = {p["PolicyName"] for p in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]}
        assert attached == set(spec["policies"]), role
    for profile in ("steel-ray-head", "steel-ray-worker"):
        roles = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]
        assert [r["RoleName"] for r in roles] == [profile]
    trust = iam.get_role(RoleName="steel-score")["Role"]["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    cond = trust["Statement"][0]["Condition"]["StringEquals"]
    assert cond[f"{oidc}:sub"] == "system:serviceaccount:steel:steel-score"
    autoscaler = iam.get_policy_version(PolicyArn=f"arn:aws:iam::{ACCOUNT}:policy/steel-autoscaler", VersionId="v1")
    assert ACCOUNT in json.dumps(autoscaler["PolicyVersion"]["Document"])
