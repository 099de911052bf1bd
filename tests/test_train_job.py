"""steel train / ray_jobs.train: argument handling, and a real `ray job submit` of a tiny training run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_train_data import make_tiny_dataset
from tests.test_training import TINY_CLASSIFIER, TINY_SEGMENTER

REPO = Path(__file__).resolve().parents[1]


def test_selected_models():
    from steel.cli import selected_models

    default = ["binary", "multilabel", "seg1", "seg2", "seg3", "seg4"]
    assert selected_models([], default) == default
    assert selected_models(["all"], default) == default
    assert selected_models(["seg3", "binary,seg3"], default) == ["seg3", "binary"]
    with pytest.raises(ValueError, match="seg9"):
        selected_models(["seg9"], default)


def test_help_is_cheap_and_lists_options():
    code = ("import sys, ray_jobs.train as t; from steel import cli; p = cli.command_parser(t.COMMAND); "
            "print(p.format_help()); print('tensorflow' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--model" in out and "--set" in out and "--address" in out
    assert out.strip().endswith("False False")  # importing the job module loads neither TF nor Ray


def test_bad_model_is_a_clear_cli_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    proc = subprocess.run([sys.executable, "-m", "steel.cli", "train", "--config", str(cfg), "--model", "seg7"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "seg7" in proc.stderr and "Traceback" not in proc.stderr


def _auth_headers() -> dict:
    """Ray 2.60 enables token auth on a head when a token exists (~/.ray/auth_token): send it."""
    import os

    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.exists():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.mark.slow
def test_job_submission_trains_into_a_bundle(tmp_path, ray_head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from steel.model.bundle import read_manifest
    root = make_tiny_dataset(tmp_path / "data")
    config = {"name": "job", "data": {"root": str(root)}, "bundle": str(tmp_path / "bundle"),
              "train": {"output": str(tmp_path / "ckpt"), "epochs": 1, "num_workers": 2, "per_worker_batch": 4,
                        "classifier": TINY_CLASSIFIER, "segmenter": TINY_SEGMENTER}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    client = JobSubmissionClient(ray_head, headers=_auth_headers())
    agent_deadline = time.time() + 120  # the head's job agent needs a while after the dashboard opens
    while True:
        try:
            job = client.submit_job(
                entrypoint=f"python -m ray_jobs.train --config {tmp_path / 'job.yaml'} --model binary",
                # No env_vars here: the job's driver calls ray.init(runtime_env=steel.core.keras_env.runtime_env())
                # and Ray refuses to merge two runtime envs that both set env_vars.
                runtime_env={"working_dir": str(REPO),
                             "excludes": [".venv", "runs", ".git", "**/__pycache__", "*.egg-info"]},
            )
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > agent_deadline:
                raise
            time.sleep(2)
    deadline = time.time() + 400
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "[binary] epoch 1/1" in logs and "best epoch" in logs
    manifest = read_manifest(str(tmp_path / "bundle"))
    assert set(manifest["models"]) == {"binary"}
    assert (tmp_path / "bundle" / "history" / "binary.csv").exists()
