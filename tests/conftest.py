"""Shared fixtures: servers the tests start themselves and stop by process id.

- ``s3_endpoint``: a moto S3 server (real HTTP) on 127.0.0.1, one per session, with fake credentials
  exported through the standard AWS variables; ``s3_bucket`` gives each test a fresh bucket.
- ``ray_local``: an in-process local Ray (started once per session, shut down at the end).
- ``ray_head``: a separate Ray head (``ray start --head --block`` in its own process group), for
  tests that submit jobs; stopped by killing that process group, never ``ray stop``.
- ``tiny_bundle``: a real bundle of six tiny random-weight models; ``scoring_without_ray``: scoring's
  Ray Data stages run in the test's process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import steel.core.keras_env  # noqa: F401  (sets the Keras variables before anything imports TensorFlow)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process we started (and its children, which share its process group) by its pid.

    SIGTERM goes to the leader alone: ``ray start --block`` then stops its raylet, GCS and workers
    itself, whereas a SIGTERM to the whole group kills those under it and ``ray start`` takes ~33 s
    to give up on them. Whatever is left of the group is killed after."""
    if proc.poll() is not None:
        return
    pgid = os.getpgid(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    # Children of ray start (raylet, gcs_server...) share the group: make sure none linger.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """URL of a moto S3 server on 127.0.0.1; AWS_* variables point boto3/pyarrow at it."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        saved = {k: os.environ.get(k) for k in
                 ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
        )
        yield endpoint
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        _stop_group(proc)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """An in-process local Ray shared by the session's integration tests.

    Depends on ``s3_endpoint`` so that Ray's worker processes inherit the moto credentials/endpoint
    variables: workers unpickle pyarrow S3 filesystems and resolve credentials from their own
    environment, which is fixed when Ray starts.
    """
    import ray

    from steel.core.keras_env import runtime_env

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
            runtime_env=runtime_env(), ignore_reinit_error=True,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A Ray head in its own process group; yields the dashboard URL for JobSubmissionClient."""
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"rt{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths have a length limit
    log = tmp_path_factory.mktemp("rayhead") / "head.log"
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # jobs' `python` is this venv's
    env.update(steel.core.keras_env.runtime_env()["env_vars"])
    # On SIGTERM `ray start` drains the node for up to 30 s first (for Serve's proxies in a cluster):
    # nothing to drain here, and it would be 30 s of every session's teardown.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}",
             "--node-ip-address=127.0.0.1", "--num-cpus=4", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}",
             # Own agent port: the default 52365 is taken by any other Ray on the machine (ray_local),
             # and without its agent the head answers job submissions "No available agent".
             f"--dashboard-agent-listen-port={free_port()}",
             "--disable-usage-stats"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True,
        )
    try:
        _wait_port(dash_port, proc, timeout=120)
        yield f"http://127.0.0.1:{dash_port}"
    finally:
        _stop_group(proc)


# Six random-weight models small enough to build in a second: a real bundle (weights, manifest,
# provenance), for tests whose predictor is a stand-in or whose models only need to run.
TINY_SPECS = {
    "classifier": dict(encoder="simplecnn", input_size=(32, 160), encoder_weights="none", dense_units=(8,)),
    "segmenter": dict(encoder="simplecnn", input_size=(32, 160), encoder_weights="none",
                      decoder_filters=(16, 8, 8, 4, 4)),
}


def save_tiny_bundle(uri: str) -> dict:
    """Save the six tiny models as a bundle at ``uri``; returns its manifest."""
    from steel.core.names import MODEL_NAMES, model_kind
    from steel.model import bundle as bundle_lib
    from steel.model import networks

    built, specs = {}, {}
    for name in MODEL_NAMES:
        kw = TINY_SPECS[model_kind(name)]
        built[name] = networks.build(name, **kw)
        specs[name] = networks.resolve_spec(name, **kw)
    return bundle_lib.save_bundle(uri, built, specs, {"test": "tiny"})


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> str:
    """A real bundle of six tiny random-weight models (no thresholds.json), saved once per session."""
    uri = str(tmp_path_factory.mktemp("bundle") / "tiny")
    save_tiny_bundle(uri)
    return uri


# Scoring's pipeline without Ray

def _in_process_dataset(items, cfg, formats, factory, actor=None):
    """steel.score.stages.cascade_dataset without Ray: the same decode and actor stages, in this process."""
    import numpy as np

    from steel.score import stages

    class Dataset:
        def iter_batches(self, batch_size=None, batch_format="numpy"):
            stage = (actor or stages.CascadeActor)(factory, retries=cfg.retries, backoff_s=cfg.retry_backoff_s)
            for i in range(0, len(items), cfg.batch_size):
                chunk = items[i:i + cfg.batch_size]
                batch = {k: np.asarray([item[k] for item in chunk], dtype=object) for k in chunk[0]}
                yield stage(stages.decode_batch(batch, allow_resize=cfg.allow_resize, formats=formats,
                                                retries=cfg.retries, backoff_s=cfg.retry_backoff_s))

    return Dataset()


@pytest.fixture
def scoring_without_ray(monkeypatch):
    """steel.score.run.score runs its Ray Data stages in this process (tests of what scoring reads and
    writes, where Ray's start-up would be most of the time)."""
    import steel.core.ray_session
    from steel.score import run

    monkeypatch.setattr(run, "cascade_dataset", _in_process_dataset)
    monkeypatch.setattr(steel.core.ray_session, "ensure_ray", lambda *a, **k: False)
