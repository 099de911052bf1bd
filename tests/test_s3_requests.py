"""Every S3 request the nightly scoring and the training jobs send is one their IAM role may make.

steel's storage code runs against a moto S3 server behind :class:`tests.s3_iam_proxy.IamProxy`, which
records each request as it goes over the wire (boto3's and pyarrow's), maps it to the IAM action,
resource and ``s3:prefix`` S3 authorizes, and answers as S3 would for the role that runs the job: 403
for what the role's policies (``infra/iam/``, evaluated by ``tests/test_iam.py``) do not allow, and
403 instead of 404 for a missing key when the role may not list the whole bucket. The jobs must still
do their work, and no request may be refused.

- nightly scoring, role ``steel-score`` (the KubeRay cluster ``steel``): two nights of
  ``steel.score.run.score`` on the CronJob's ``--images``/``--out`` and the config's versioned bundle,
  with a stand-in predictor and the Ray Data pipeline run in-process (decode stage and actor stage as
  they are, only without Ray), plus the storage calls of loading the bundle (not TensorFlow's part);
- training, role ``steel-train``: the storage calls of ``steel.train.run`` and ``steel.model.bundle``
  on the config's URIs: reading the data, looking for earlier checkpoints, saving a model into the
  bundle (a stand-in model writes the weights file), its history and logs, publishing and promoting.

pyarrow's first S3 call probes the backend with a HeadBucket of ``$extremelyunlikelytoexist$`` (not
ours, refused, and the answer is ignored): the one refused request tolerated, by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from steel.core import s3
from tests.s3_iam_proxy import IamProxy, authorizations
from tests.test_iam import _nightly_args, allowed

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "configs" / "severstal-gpu.yaml").read_text())
ARROW_PROBE = "/%24extremelyunlikelytoexist%24"  # pyarrow's S3 backend detection


@pytest.fixture(scope="module")
def proxy():
    """A moto S3 server on 127.0.0.1 (stopped by its handle) behind the recording IAM proxy."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        upstream = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=upstream, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        for bucket in ("steel-data", "steel-models"):
            client.create_bucket(Bucket=bucket)
        with IamProxy(upstream, allowed) as p:
            p.setup = client  # direct to moto: what other jobs (or people) put there
            yield p
    finally:
        server.stop()


@pytest.fixture
def as_role(proxy, monkeypatch):
    """steel.core.storage pointed at the proxy; ``as_role(name)`` makes every request one of that role."""

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    saved = s3._endpoint
    s3.set_endpoint(proxy.url)
    proxy.take()

    def use(role: str | None) -> IamProxy:
        proxy.role = role
        return proxy

    yield use
    proxy.role = None
    s3.set_endpoint(saved)


def refused(log: list[dict]) -> list[str]:
    """The requests the role's policies refuse (the pyarrow probe aside), and HEADs of missing keys
    (S3 answers them 403 and pyarrow's get_file_info raises), one line each. A GET of a missing key,
    answered 403 too, is allowed: the job must take it for a missing file, and passes only if it does."""
    out = []
    for e in log:
        if e["status"] != 403 or e["path"] == ARROW_PROBE:
            continue
        if e.get("missing_key") and e["op"] == "GetObject":
            continue
        why = ("HEAD of a missing key" if e.get("missing_key") else f"denied {e['denied'] or 'unknown request'}")
        out.append(f"{e['role']}: {e['method']} {e['path']} ({e['op']}) -> 403: {why}")
    return out


def _s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key.rstrip("/")


# --- the proxy itself ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, headers, body, op, auth", [
    ("HEAD", "/steel-models", {}, None, "HeadBucket", [("s3:ListBucket", "arn:aws:s3:::steel-models", {})]),
    ("GET", "/steel-models?list-type=2&prefix=scores%2Fa%2F&max-keys=1", {}, None, "ListObjectsV2",
     [("s3:ListBucket", "arn:aws:s3:::steel-models", {"s3:prefix": "scores/a/"})]),
    ("GET", "/steel-models?list-type=2", {}, None, "ListObjectsV2", [("s3:ListBucket", "arn:aws:s3:::steel-models", {})]),
    ("HEAD", "/steel-models/a/b.json", {}, None, "HeadObject", [("s3:GetObject", "arn:aws:s3:::steel-models/a/b.json", {})]),
    ("PUT", "/steel-models/a/b", {"x-amz-copy-source": "/steel-data/x"}, b"", "CopyObject",
     [("s3:GetObject", "arn:aws:s3:::steel-data/x", {}), ("s3:PutObject", "arn:aws:s3:::steel-models/a/b", {})]),
    ("POST", "/steel-models?delete", {}, b"<Delete><Object><Key>a/1</Key></Object><Object><Key>a/2</Key></Object></Delete>",
     "DeleteObjects", [("s3:DeleteObject", "arn:aws:s3:::steel-models/a/1", {}),
                       ("s3:DeleteObject", "arn:aws:s3:::steel-models/a/2", {})]),
    ("POST", "/steel-models/a/b?uploads", {}, None, "CreateMultipartUpload", [("s3:PutObject", "arn:aws:s3:::steel-models/a/b", {})]),
    ("DELETE", "/steel-models/a/b?uploadId=u", {}, None, "AbortMultipartUpload",
     [("s3:AbortMultipartUpload", "arn:aws:s3:::steel-models/a/b", {})]),
])
def test_requests_map_to_what_s3_authorizes(method, path, headers, body, op, auth):
    assert authorizations(method, path, headers, body) == (op, auth)


def test_proxy_answers_as_s3_would_for_the_role(as_role):
    import boto3

    proxy = as_role("steel-score")
    client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
    client.put_object(Bucket="steel-models", Key="scores/proxy-check/a.txt", Body=b"a")
    with pytest.raises(Exception) as exc:
        client.head_bucket(Bucket="steel-models")
    assert "403" in str(exc.value)
    with pytest.raises(client.exceptions.ClientError) as exc:  # a missing key: 403, not NoSuchKey
        client.get_object(Bucket="steel-models", Key="scores/proxy-check/missing.txt")
    assert exc.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(client.exceptions.ClientError):
        client.put_object(Bucket="steel-models", Key="bundles/severstal-gpu/manifest.json", Body=b"{}")
    assert client.list_objects_v2(Bucket="steel-models", Prefix="scores/proxy-check/")["KeyCount"] == 1
    log = proxy.take()
    assert [e["status"] for e in log] == [200, 403, 403, 403, 200], log
    assert log[2]["missing_key"] and log[2]["upstream_status"] == 404


# --- nightly scoring, as steel-score -------------------------------------------------------------------

def _jpeg(seed: int) -> bytes:
    from tests.test_scoring import jpeg_bytes

    return jpeg_bytes(seed)  # 1600x256, what the scorer takes


def _publish_bundle_version(proxy, root: str, version: str = "b-0123456789ab") -> str:
    """What training published: ``<root>/versions/<version>/`` and the CURRENT pointer (set-up)."""
    from steel.model import bundle as bundle_lib

    bucket, key = _s3(root)
    folder = f"{key}/{bundle_lib.VERSIONS}/{version}"
    manifest = {"format_version": bundle_lib.FORMAT_VERSION, "version": version, "config": {}, "extra": {},
                "models": {"binary": {"weights": "binary.weights.h5", "spec": {}}}}
    proxy.setup.put_object(Bucket=bucket, Key=f"{folder}/{bundle_lib.MANIFEST}", Body=json.dumps(manifest).encode())
    proxy.setup.put_object(Bucket=bucket, Key=f"{folder}/binary.weights.h5", Body=b"\x89HDF weights")
    proxy.setup.put_object(Bucket=bucket, Key=f"{key}/{bundle_lib.POINTER}", Body=json.dumps({"version": version}).encode())
    return f"s3://{bucket}/{folder}"


def test_nightly_scoring_sends_only_requests_the_scoring_role_may_make(as_role, scoring_without_ray):
    from steel.core import storage
    from steel.core.config import load_config
    from steel.model import bundle as bundle_lib
    from steel.model.thresholds import bundle_thresholds, default_thresholds
    from steel.score import io as score_io
    from steel.score import run
    from tests.test_scoring import BrightCascade

    nightly = _nightly_args()
    images, out = nightly["--images"], nightly["--out"]
    cfg = load_config(str(REPO / "configs" / "severstal-gpu.yaml"))
    bundle_root = cfg.bundle_versions or cfg.bundle  # what ray_jobs.score scores with
    proxy = as_role(None)
    version_uri = _publish_bundle_version(proxy, bundle_root)
    bucket, prefix = _s3(images)
    for i in range(3):
        proxy.setup.put_object(Bucket=bucket, Key=f"{prefix}/2026-01-01/cam-{i}.jpg", Body=_jpeg(i))
    score_cfg = dataclasses.replace(cfg.score, actors=1, gpus_per_actor=0, batch_size=2, images_per_shard=2,
                                    retries=1, retry_backoff_s=0.01)

    as_role("steel-score")
    # The case first: a fresh output, where every listing comes back empty.
    fresh = storage.join(out.rstrip("/") + "-fresh")
    assert score_io.complete_shards(fresh) == {}
    assert score_io.remove_orphan_errors(fresh, set()) == []
    assert score_io.done_images(fresh) == ({}, {})
    assert score_io.read_manifest(fresh) is None
    assert not storage.exists(storage.join(fresh, score_io.SUCCESS))
    assert refused(proxy.take()) == []

    first = run.score(bundle_root, images, out, score_cfg, thresholds=default_thresholds(),
                      predictor=BrightCascade, expect_new=True)
    assert (first["scored"], first["problems"]) == (3, []), first
    assert storage.exists(storage.join(out, score_io.SUCCESS))
    for i in range(3, 5):  # the next day's images
        proxy.setup.put_object(Bucket=bucket, Key=f"{prefix}/2026-01-02/cam-{i}.jpg", Body=_jpeg(i))
    second = run.score(bundle_root, images, out, score_cfg, thresholds=default_thresholds(),
                       predictor=BrightCascade, expect_new=True)
    assert (second["scored"], second["images_already_scored"]) == (2, 3), second
    assert storage.read_text(storage.join(out, score_io.SUCCESS)).strip() == second["run_id"]

    # Loading the bundle (the storage part of steel.model.bundle.load_bundle in each scoring actor).
    resolved = bundle_lib.resolve_bundle(bundle_root)
    assert resolved.uri == version_uri
    manifest = bundle_lib.read_manifest(resolved.uri)
    assert bundle_thresholds(resolved.uri) is None  # this version has none: a missing key
    storage.download_to(storage.join(resolved.uri, manifest["models"]["binary"]["weights"]),
                        Path(os.environ.get("TMPDIR", "/tmp")) / f"w-{os.getpid()}.h5")

    log = proxy.take()
    assert refused(log) == [], "\n".join(refused(log))
    ops = {e["op"] for e in log}
    assert {"ListObjectsV2", "GetObject", "PutObject", "DeleteObject"} <= ops, ops
    assert any(e["op"] == "PutObject" and e["path"].endswith("/_LOCK") for e in log), "the lease was not taken"


# --- training, as steel-train --------------------------------------------------------------------------

class StandInModel:
    """What steel.model.bundle needs of a Keras model: save_weights and count_params."""

    def save_weights(self, path: str) -> None:
        Path(path).write_bytes(b"\x89HDF stand-in weights")

    def count_params(self) -> int:
        return 1


def test_training_storage_sends_only_requests_the_training_role_may_make(as_role, monkeypatch):
    from steel.core import storage
    from steel.core.config import load_config
    from steel.model import bundle as bundle_lib
    from steel.model import networks
    from steel.model.thresholds import bundle_thresholds, default_thresholds, save_thresholds
    from steel.train import checkpoints, history
    from steel.train import run as train_run

    cfg = load_config(str(REPO / "configs" / "severstal-gpu.yaml"))
    proxy = as_role(None)
    bucket, root = _s3(cfg.data.root)
    proxy.setup.put_object(Bucket=bucket, Key=f"{root}/train.csv", Body=b"ImageId,ClassId,EncodedPixels\na.jpg,1,1 3\n")
    proxy.setup.put_object(Bucket=bucket, Key=f"{root}/train_images/a.jpg", Body=_jpeg(0))
    # Plots and TensorBoard files are TensorFlow's and matplotlib's business: stand-ins write the files.
    monkeypatch.setattr(history, "plot_history", lambda frame, name, path: Path(path).write_bytes(b"png"))
    monkeypatch.setattr(history, "write_tensorboard",
                        lambda frame, logdir: (os.makedirs(logdir, exist_ok=True), Path(logdir, "events.x").write_bytes(b"tb")))

    as_role("steel-train")
    train_csv = cfg.data.path("train_csv")
    assert storage.exists(train_csv)
    assert storage.read_bytes(train_csv).startswith(b"ImageId")
    assert storage.list_files(cfg.data.path("train_images"), suffixes=".jpg")
    fs, path = storage.resolve(storage.list_files(cfg.data.path("train_images"))[0])
    with fs.open_input_stream(path) as fh:  # Ray Data's read of an image
        assert fh.read(2) == b"\xff\xd8"
    # Earlier runs and checkpoints (a first run: none), the bundle (none yet).
    assert checkpoints.other_runs(cfg.train.output, "binary", "k" * 16) == []
    assert checkpoints.latest_checkpoint(cfg.train.output, f"binary-{'k' * 16}") is None
    assert not train_run._completed(cfg.bundle, "binary", "k" * 16)
    # A finished model: history and logs, then its weights and manifest entry; twice (a re-run replaces).
    spec = networks.model_spec("binary", cfg.train)
    for _ in range(2):
        history.write_history(cfg.bundle, "binary", [{"epoch": 1, "loss": 0.5, "val_loss": 0.6}])
        bundle_lib.save_model_to_bundle(cfg.bundle, "binary", StandInModel(), spec, {"val_loss": 0.6})
    assert bundle_thresholds(cfg.bundle) is None
    save_thresholds(cfg.bundle, default_thresholds())
    storage.write_text(storage.join(cfg.report, "report.md"), "# report\n")
    published = bundle_lib.publish_bundle(cfg.bundle, cfg.bundle_versions)
    assert bundle_lib.resolve_bundle(cfg.bundle_versions).uri == published.uri

    log = proxy.take()
    assert refused(log) == [], "\n".join(refused(log))
    assert {"ListObjectsV2", "GetObject", "PutObject", "DeleteObjects"} <= {e["op"] for e in log}


def test_ray_train_checkpoint_storage_needs_no_bucket_level_call(as_role, tmp_path):
    """Ray Train's StorageContext (pyarrow create_dir before every checkpoint) on steel's filesystem:
    the validation marker, a checkpoint persisted and listed, all without HeadBucket."""
    import pickle

    import pyarrow.fs as pafs
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from steel.core import storage
    from steel.core.config import load_config
    from steel.train.run import _storage

    cfg = load_config(str(REPO / "configs" / "severstal-gpu.yaml"))
    proxy = as_role("steel-train")
    path, fs = _storage(cfg.train.output)
    local = tmp_path / "ckpt"
    (local / "sub").mkdir(parents=True)
    (local / "model.weights.h5").write_bytes(b"weights")
    (local / "sub" / "state.json").write_text("{}")
    try:
        ctx = StorageContext(storage_path=path, experiment_dir_name="binary-prefixonly", storage_filesystem=fs)
        saved = ctx.persist_current_checkpoint(Checkpoint.from_directory(str(local)), "checkpoint_000000")
        again = pickle.loads(pickle.dumps(saved))  # as Ray ships it to a worker
        infos = again.filesystem.get_file_info(pafs.FileSelector(again.path, recursive=True))
        assert sorted(i.path[len(again.path) + 1:] for i in infos if i.type == pafs.FileType.File) == [
            "model.weights.h5", "sub/state.json"]
        listed = storage.list_files(storage.join(cfg.train.output, "binary-prefixonly"), recursive=True)
        assert {storage.basename(u) for u in listed} >= {"model.weights.h5", "state.json"}
    finally:
        log = proxy.take()
    assert refused(log) == [], "\n".join(refused(log))
    assert "HeadBucket" not in {e["op"] for e in log}
