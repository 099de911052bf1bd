"""The whole pipeline on a tiny synthetic set: every stage, every output, and a re-run that skips.

Also submits the pipeline as a Ray job to a head started by the test.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.checks import assert_search_rose

REPO = Path(__file__).resolve().parents[1]
TINY = {"encoder": "simplecnn", "input_size": [32, 160], "encoder_weights": "none"}


def tiny_config(root: Path) -> dict:
    return {
        "name": "tiny",
        "data": {"root": str(root / "data"), "synth": {"images": 64, "test_images": 8, "seed": 3}},
        # One network (train.kind: unified): the pipeline's stages are the same for both kinds, and six
        # cascade models cost ~8 of this file's minutes (test_training trains the six).
        "train": {"kind": "unified", "output": str(root / "train"), "num_workers": 2, "epochs": 1, "per_worker_batch": 4,
                  "base_lr": 0.001, "base_batch": 8, "augment": False,
                  "classifier": {**TINY, "dense_units": [16, 8]},
                  "segmenter": {**TINY, "decoder_filters": [16, 8, 8, 4, 4]}},
        "bundle": str(root / "bundle"),
        "tune": {"enabled": True},
        "score": {"out": str(root / "scores"), "actors": 1, "batch_size": 4, "images_per_shard": 3},
        "report": str(root / "report"),
    }


def _run(config_path: Path) -> str:
    from steel.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["run", "--config", str(config_path)]) == 0
    text = out.getvalue()
    print(text)
    return text


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("pipeline")
    config = tiny_config(root)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, config, path, _run(path)


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_writes_valid_outputs(first_run):
    root, config, _, text = first_run
    for stage in ("data", "split", "train", "tune", "score", "evaluate"):
        assert f"{stage:>8}] done" in text, stage  # a first run: every stage ran
    assert "held-out mean Dice" in text and "all-empty baseline" in text
    # The seed's protocol: tables for the labelled splits, and the last line names the split it reports.
    assert "The seed's protocol: cascade mean Dice per split" in text and "Each model on each split" in text
    assert text.strip().splitlines()[-1].startswith("mean Dice of the cascade on the test split (")

    data = Path(config["data"]["root"])
    assert (data / "train.csv").exists() and len(list((data / "test_images").glob("*.jpg"))) == 8

    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    assert set(manifest["models"]) == {"unified"}
    for name, entry in manifest["models"].items():
        assert (root / "bundle" / entry["weights"]).stat().st_size > 0, name
        assert (root / "bundle" / "history" / f"{name}.csv").exists()
    thresholds = json.loads((root / "bundle" / "thresholds.json").read_text())
    v = thresholds["validation"]
    assert_search_rose(v["before"], v["after"], v["changes"])
    assert thresholds["validation"]["deployed_check"]["agree"]  # search score == deployed cascade's, within 0.001
    assert "mean_dice" in thresholds["validation"]["seed"]

    scores = root / "scores"
    assert (scores / "_SUCCESS").exists()
    score_manifest = json.loads((scores / "manifest.json").read_text())
    assert score_manifest["totals"]["images"] == 8
    assert (score_manifest["totals"]["scored"], score_manifest["totals"]["errors"]) == (8, 0)

    submission = pd.read_csv(root / "report" / "submission.csv", keep_default_na=False)
    test_ids = sorted(p.name for p in (data / "test_images").glob("*.jpg"))
    assert sorted(submission["ImageId"].unique()) == test_ids  # (merge checked the rows: 4 per image, valid RLEs)

    report = (root / "report" / "report.md").read_text()
    assert "Held-out evaluation" in report and "all-empty baseline" in report
    assert "## The seed's protocol: train / val / test splits" in report
    metrics = json.loads((root / "report" / "protocol" / "metrics.json").read_text())
    assert list(metrics["splits"]) == ["train", "val", "test"]
    val = metrics["splits"]["val"]
    assert val["n_images"] == thresholds["validation"]["n_images"]
    # the val split's deployed Dice is tuning's score on the same images (both exact)
    assert val["cascade"]["deployed"]["mean_dice"] == pytest.approx(thresholds["validation"]["after"], abs=1e-3)
    # the unified model's heads and mask channels fill the six models' rows
    assert {"binary", "multilabel", "seg1", "seg2", "seg3", "seg4"} == set(metrics["splits"]["test"]["models"])
    for line in report.splitlines():  # every image the report shows exists beside it
        if line.startswith("!["):
            target = line.split("](", 1)[1].rstrip(")")
            assert (root / "report" / target).exists(), target
    assert (root / "report" / "dice_per_class.png").exists()
    assert (root / "report" / "evaluation" / "report.md").exists()


@pytest.mark.slow
def test_second_run_does_no_training_again(first_run):
    root, _, path, _ = first_run
    weights = {p: p.stat().st_mtime_ns for p in (root / "bundle").glob("*.weights.h5")}
    t0 = time.time()
    text = _run(path)
    assert "[   train] skipped" in text and "[    tune] skipped" in text and "[   score] skipped" in text
    assert {p: p.stat().st_mtime_ns for p in (root / "bundle").glob("*.weights.h5")} == weights
    assert "held-out mean Dice" in text
    assert time.time() - t0 < 300


@pytest.mark.slow
def test_pipeline_as_a_ray_job(first_run, tmp_path, ray_head):
    """Submit the pipeline to a separate Ray head: it reuses the data and bundle, scores afresh."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from steel.core.keras_env import runtime_env
    from tests.test_train_job import _auth_headers

    root, config, _, _ = first_run
    config = {**config, "score": {**config["score"], "out": str(tmp_path / "scores")}, "report": str(tmp_path / "report")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    client = JobSubmissionClient(ray_head, headers=_auth_headers())
    for attempt in range(60):  # the job agent needs a moment after the dashboard port opens
        try:
            job = client.submit_job(
                entrypoint=f"python -m ray_jobs.pipeline --config {path}",
                runtime_env={"working_dir": str(REPO), **runtime_env(),
                             "excludes": [".venv", "runs", ".git", "**/__pycache__", "*.egg-info"]},
            )
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == 59:
                raise
            time.sleep(2)
    deadline = time.time() + 420
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "[   train] skipped" in logs and "[   score] done" in logs
    assert (tmp_path / "scores" / "_SUCCESS").exists()
    assert (tmp_path / "report" / "report.md").exists()


def test_data_stage_regenerates_a_synthetic_set_of_other_sizes_only(tmp_path, capsys):
    from steel.core.config import config_from_dict
    from steel.data.synth import write
    from steel.pipeline import Pipeline

    root = tmp_path / "data"
    write.generate(str(root), images=6, test_images=2, seed=1)
    cfg = config_from_dict({"data": {"root": str(root), "synth": {"images": 6, "test_images": 2, "seed": 1}}})
    assert Pipeline(cfg).data()[0] is True  # the same set: skipped
    cfg = config_from_dict({"data": {"root": str(root), "synth": {"images": 8, "test_images": 2, "seed": 1}}})
    skipped, summary, _ = Pipeline(cfg).data()
    assert not skipped and "synthesised 8 train + 2 test" in summary
    assert "holds a synthetic set of 6 + 2 images (seed 1), data.synth asks for 8 + 2 (seed 1)" in capsys.readouterr().out
    assert len(list((root / "train_images").glob("*.jpg"))) == 8
    assert json.loads((root / "synth.json").read_text())["train"]["images"] == 8
    # A real dataset (no synth.json) is never regenerated, whatever data.synth says.
    (root / "synth.json").unlink()
    cfg = config_from_dict({"data": {"root": str(root), "synth": {"images": 4, "test_images": 1, "seed": 1}}})
    assert Pipeline(cfg).data()[0] is True
