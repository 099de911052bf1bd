"""Nightly scoring that survives a real night (issue 9): transient faults, exit status, partitions,
bundle versions, faults from a real S3 server through a fault-injecting proxy, and kill tests.

Unit tests need no Ray. Integration tests use the session's local Ray (``ray_local``) or, for the
kill tests, driver processes joined to a separate Ray head (``ray_head``) so that SIGKILLing a
driver's process group does not take a Ray down. All use the light stand-in predictor of
test_scoring.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steel.core import s3, storage
from steel.core.config import ScoreConfig
from steel.core.retry import retry
from steel.data import images as image_io
from steel.model import bundle as bundle_lib
from steel.model.thresholds import bundle_thresholds, default_thresholds, save_thresholds
from steel.score import io as score_io
from steel.score import listing, merge
from tests.test_scoring import BrightCascade, BrightPredictor, check_output, jpeg_bytes, write_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stand_in():
    import ray.cloudpickle

    import tests.test_scoring as mod

    ray.cloudpickle.register_pickle_by_value(mod)
    yield BrightCascade
    ray.cloudpickle.unregister_pickle_by_value(mod)


def index_ids(out: str) -> set[str]:
    done, _ = score_io.done_images(out)
    return {i for e in done.values() for i in e["images"]}


# --------------------------------------------------------------------------------------------
# Unit tests (no Ray)
# --------------------------------------------------------------------------------------------

def test_retry_backs_off_with_jitter_and_never_retries_permanent_errors():
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retry(flaky, retries=5, backoff_s=1.0, sleep=waits.append) == "ok"
    assert len(calls) == 4 and len(waits) == 3
    for attempt, w in enumerate(waits):  # 1, 2, 4 s, each times a jitter in [0.5, 1]
        assert 0.5 * 2 ** attempt <= w <= 2 ** attempt
    calls.clear()
    with pytest.raises(ConnectionResetError):
        retry(flaky, retries=1, backoff_s=0.0, sleep=waits.append)
    assert len(calls) == 2  # bounded
    calls.clear()

    def bad():
        calls.append(1)
        raise image_io.BadImage("empty file (0 bytes)")

    with pytest.raises(image_io.BadImage):
        retry(bad, retries=5, backoff_s=0.0, permanent=(image_io.BadImage,))
    assert len(calls) == 1  # a permanent error is not retried


class ResourceExhaustedError(RuntimeError):
    """Named like TensorFlow's OOM error (what steel.score.stages.is_oom recognises)."""


class OOMPredictor(BrightPredictor):
    """Runs out of memory on batches larger than 2 images; fails twice then works on 'flaky' batches."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def predict(self, images):
        self.sizes.append(len(images))
        if len(images) > 2:
            raise ResourceExhaustedError(f"OOM when allocating tensor for {len(images)} images")
        return super().predict(images)


def test_oom_retries_with_smaller_batches_and_predictor_failures_are_transient():
    from steel.score.stages import CascadeActor

    images = np.stack([image_io.decode(jpeg_bytes(i)) for i in range(5)])
    batch = {"shard": np.array(["s"] * 5, dtype=object), "image_id": np.array(list("abcde"), dtype=object),
             "file": np.array(list("abcde"), dtype=object), "image": images,
             "error": np.array([""] * 5, dtype=object), "error_kind": np.array([""] * 5, dtype=object)}
    actor = CascadeActor(OOMPredictor, retries=0)
    out = actor(batch)
    assert list(out["error"]) == [""] * 5 and all(out["mask_1"])
    assert actor.predictor.sizes == [5, 2, 3, 1, 2]  # halved (5 -> 2 + 3 -> 2 + 1 + 2), not failed

    class Flaky(BrightPredictor):
        calls = 0

        def predict(self, images):
            Flaky.calls += 1
            if Flaky.calls <= 2:
                raise ConnectionError("model server went away")
            return super().predict(images)

    out = CascadeActor(Flaky, retries=2, backoff_s=0.0)(batch)
    assert list(out["error"]) == [""] * 5 and Flaky.calls == 3


def test_since_lists_only_new_date_partitions(tmp_path):
    root = str(tmp_path / "archive")
    for day in ("dt=2026-11-27", "dt=2026-11-28", "2026-11-29", "dt=2026-11-30"):
        write_images(storage.join(root, day), ["a.jpg", "cam2/b.jpg"])
    write_images(root, ["loose.jpg"])
    inputs = listing.list_inputs(root, since="2026-11-29").inputs
    assert list(inputs) == ["2026-11-29/a.jpg", "2026-11-29/cam2/b.jpg", "dt=2026-11-30/a.jpg",
                            "dt=2026-11-30/cam2/b.jpg"]
    assert len(listing.list_inputs(root).inputs) == 9  # without --since: everything, same ids
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        listing.list_inputs(root, since="29/11/2026")


def test_since_finds_every_partition_form_late_uploads_and_reports_the_rest(tmp_path):
    root = str(tmp_path / "archive")
    forms = {"dt=2026-11-28": "a.jpg", "date=2026-11-29": "b.jpg", "2026-11-30": "c.jpg", "2026/11/30": "d.jpg",
             "2026/12/01": "cam/e.jpg", "dt=2026-11-20": "old.jpg"}
    for folder, name in forms.items():
        write_images(storage.join(root, folder), [name])
    write_images(root, ["loose.jpg"])
    write_images(storage.join(root, "misc"), ["x.jpg"])
    write_images(storage.join(root, "2026", "extra"), ["y.jpg"])
    found = listing.list_inputs(root, since="2026-11-30", lookback_days=1)
    assert list(found.inputs) == ["2026-11-30/c.jpg", "2026/11/30/d.jpg", "2026/12/01/cam/e.jpg",
                                    "date=2026-11-29/b.jpg"]  # 11-29: the day of lookback
    assert found.unplaced == ["2026/extra/", "loose.jpg", "misc/"]
    assert found.partitions == ["2026-11-30", "2026/11/30", "2026/12/01", "date=2026-11-29"]
    assert len(listing.list_inputs(root, since="2026-11-30", lookback_days=3).inputs) == 5  # + dt=2026-11-28


def test_a_night_retries_what_the_last_left_pending_whatever_since_says(tiny_bundle, scoring_without_ray, tmp_path,
                                                                        monkeypatch):
    """Night 1 cannot read one image (storage fault); night 2, with --since that night's date, still
    scores it, and a late upload into night 1's partition (the lookback); a file outside every
    partition fails the night instead of being skipped quietly."""
    from steel.score.run import score

    images, out = str(tmp_path / "archive"), str(tmp_path / "out")
    write_images(storage.join(images, "dt=2026-11-29"), ["a.jpg", "b.jpg", "c.jpg"])
    real_read = storage.read_bytes

    def flaky(uri, endpoint=None):
        if uri.endswith("/b.jpg") and night["n"] == 1:
            raise ConnectionError("connection reset by peer")
        return real_read(uri, endpoint)

    night = {"n": 1}
    monkeypatch.setattr(storage, "read_bytes", flaky)
    cfg = ScoreConfig(batch_size=2, images_per_shard=2, retries=1, retry_backoff_s=0.0)
    s = score(tiny_bundle, images, out, dataclasses.replace(cfg, since="2026-11-29"), predictor=BrightCascade)
    assert (s["scored"], s["transient_failures"], s["status"]) == (2, 1, "incomplete")
    assert list(s["pending"]) == ["dt=2026-11-29/b.jpg"] and not storage.exists(storage.join(out, "_SUCCESS"))

    night["n"] = 2  # --since 2026-12-01 with a day of lookback lists 11-30 and 12-01, not 11-29
    write_images(storage.join(images, "dt=2026-12-01"), ["d.jpg"], start=10)
    write_images(storage.join(images, "dt=2026-11-30"), ["late.jpg"], start=11)  # uploaded after its night
    write_images(images, ["stray.jpg"], start=12)
    s = score(tiny_bundle, images, out, dataclasses.replace(cfg, since="2026-12-01"), predictor=BrightCascade)
    assert (s["scored"], s["images_carried_over"], s["unplaced"], s["status"]) == (3, 1, 1, "incomplete")
    assert any("not in a date partition" in p and "stray.jpg" in p for p in s["problems"])
    assert index_ids(out) == {f"dt=2026-11-29/{n}" for n in ("a.jpg", "b.jpg", "c.jpg")} | {
        "dt=2026-11-30/late.jpg", "dt=2026-12-01/d.jpg"}
    assert not storage.exists(storage.join(out, "_SUCCESS"))

    storage.delete(storage.join(images, "stray.jpg"))
    write_images(storage.join(images, "dt=2026-12-02"), ["e.jpg"], start=13)
    s = score(tiny_bundle, images, out, dataclasses.replace(cfg, since="2026-12-02", since_lookback_days=0),
              predictor=BrightCascade)
    assert (s["scored"], s["images_carried_over"], s["problems"], s["status"]) == (1, 0, [], "ok")
    assert storage.exists(storage.join(out, "_SUCCESS"))


def test_s3_keys_are_scored_exactly_as_listed(tiny_bundle, scoring_without_ray, s3_bucket, monkeypatch):
    """``a//b.jpg`` and ``a/b.jpg`` are two images; ``x/../b.jpg`` and ``trailing.jpg/`` are read by their own
    keys; a listed key the store will not serve is a permanent error row; a key deleted after the
    listing leaves no row and is not pending."""
    from steel.core import faults
    from steel.score.run import score

    images, out = f"s3://{s3_bucket}/archive", f"s3://{s3_bucket}/scores"
    keys = ["a//b.jpg", "a/b.jpg", "x/../b.jpg", "trailing.jpg/", "./c.jpg", "unservable.jpg", "gone.jpg"]
    for i, key in enumerate(keys):
        storage.write_bytes(f"{images}/{key}", jpeg_bytes(i))
    real_read = storage.read_bytes

    def read(uri, endpoint=None):
        if uri.endswith("/unservable.jpg"):
            raise FileNotFoundError(uri)  # what S3 says to a key it lists but will not serve under that name
        return real_read(uri, endpoint)

    monkeypatch.setattr(storage, "read_bytes", read)
    monkeypatch.setattr(faults, "pause_point",
                        lambda point: point == "listed" and storage.delete(f"{images}/gone.jpg"))
    s = score(tiny_bundle, images, out, ScoreConfig(batch_size=3, images_per_shard=4, settle_s=0),
              predictor=BrightCascade)
    assert (s["images_in"], s["scored"], s["errors"], s["images_gone"], s["pending"]) == (7, 5, 1, 1, {})
    rows = check_output(out, set(keys[:5]), {"unservable.jpg"})
    for i, key in enumerate(keys[:5]):  # each id's rows come from its own object's pixels
        [expected] = BrightPredictor().predict(image_io.decode(jpeg_bytes(i))[None])
        got = rows.loc[(rows["ImageId"] == key) & (rows["ClassId"] == 1), "EncodedPixels"].item()
        assert got == expected["masks"][0], key
    errors = score_io.read_errors_file(storage.list_files(storage.join(out, "errors"))[0])
    assert errors["reason"].item().startswith("listed but cannot be read by its own key")
    assert storage.exists(storage.join(out, "_SUCCESS"))
    monkeypatch.undo()
    assert merge.merge(out, f"{out}/submission.csv", fill_errors=True)["images"] == 6


def test_storage_attempts_are_counted_once(tiny_bundle, scoring_without_ray, s3_endpoint, s3_bucket):
    """botocore retries nothing itself: a key that always fails is tried exactly score.retries + 1 times."""
    from steel.score.run import score
    from tests.faulty_proxy import FaultyProxy

    images, out = f"s3://{s3_bucket}/archive", f"s3://{s3_bucket}/scores"
    write_images(images, ["ok.jpg", "bad.jpg"])
    with FaultyProxy(s3_endpoint, persist=["/bad.jpg"]) as proxy:
        s3.set_endpoint(proxy.url)
        try:
            s = score(tiny_bundle, images, out, ScoreConfig(batch_size=2, retries=2, retry_backoff_s=0.0),
                      predictor=BrightCascade)
        finally:
            s3.set_endpoint(None)
    assert (s["scored"], s["transient_failures"]) == (1, 1)
    assert proxy.per_key[("GET", f"/{s3_bucket}/archive/bad.jpg")] == 3
    assert proxy.per_key[("GET", f"/{s3_bucket}/archive/ok.jpg")] == 1


def test_a_bundle_folder_rewritten_mid_run_fails_the_actor_not_the_rows(tiny_bundle, scoring_without_ray, tmp_path,
                                                                      monkeypatch):
    """The driver reads the bundle's weights hashes; an actor that loads other weights refuses to score,
    so no row carries a bundle_version its weights do not have."""
    import shutil

    from steel.core import faults
    from steel.model.bundle import BundleError
    from steel.score.run import score

    bundle, images, out = str(tmp_path / "bundle"), str(tmp_path / "images"), str(tmp_path / "out")
    shutil.copytree(tiny_bundle, bundle)
    write_images(images, ["a.jpg", "b.jpg"])

    def retrain(point):  # training saves a new binary model into the same folder while the run lists
        if point == "listed":
            manifest = bundle_lib.read_manifest(bundle)
            manifest["models"]["binary"]["sha256"] = "0" * 64
            storage.write_text(storage.join(bundle, bundle_lib.MANIFEST), json.dumps(manifest))

    monkeypatch.setattr(faults, "pause_point", retrain)
    with pytest.raises(BundleError, match="the bundle changed after this run started .*binary"):
        score(bundle, images, out, ScoreConfig(settle_s=0), predictor=BrightCascade)
    assert score_io.complete_shards(out) == {}


def test_exit_rules_one_per_reason():
    from steel.score.run import exit_problems

    cfg = ScoreConfig(max_error_rate=0.1)
    base = {"images_uri": "s3://plant/archive", "images_in": 20, "scored": 20, "errors": 0,
            "transient_failures": 0, "transient_reasons": {}}
    assert exit_problems(base, cfg) == []
    assert exit_problems({**base, "scored": 18, "errors": 2}, cfg) == []  # 10% is not above 10%
    [p] = exit_problems({**base, "scored": 17, "errors": 3}, cfg)
    assert p.startswith("permanent-error rate 15.0% (3/20) is above score.max_error_rate 10.0%")
    [p] = exit_problems({**base, "scored": 17, "transient_failures": 3,
                         "transient_reasons": {"could not read the file": 3}}, cfg)
    assert "3 images failed after 4 retries and were not recorded" in p and "could not read the file x3" in p
    nothing = {**base, "images_in": 0, "scored": 0}
    assert exit_problems(nothing, cfg) == []
    [p] = exit_problems(nothing, cfg, expect_new=True)
    assert "no new images under s3://plant/archive" in p and "camera feed" in p


def test_bundle_versions_resolve_once_and_publish_immutably(tmp_path):
    from tests.test_scoring import tiny_models

    built, specs = tiny_models()
    work, root = str(tmp_path / "work"), str(tmp_path / "bundles")
    bundle_lib.save_bundle(work, built, specs, {"test": "tiny"})
    direct = bundle_lib.resolve_bundle(work)
    assert direct.uri == work and direct.version.startswith("b-") and direct.pointer is None
    v1 = bundle_lib.publish_bundle(work, root)
    assert v1.version == direct.version  # the same content has the same version, direct or published
    assert bundle_lib.resolve_bundle(root) == bundle_lib.ResolvedBundle(
        storage.join(root, "versions", v1.version), v1.version, storage.join(root, "CURRENT"))
    assert bundle_lib.read_manifest(v1.uri)["version"] == v1.version

    save_thresholds(work, {**default_thresholds(), "binary": 0.9})
    v2 = bundle_lib.publish_bundle(work, root, promote=False)
    assert v2.version != v1.version and bundle_lib.resolve_bundle(root).version == v1.version
    bundle_lib.promote_bundle(root, v2.version)
    assert bundle_lib.resolve_bundle(root).uri == v2.uri
    assert bundle_thresholds(v1.uri) is None  # the old version folder is untouched
    with pytest.raises(FileNotFoundError, match="no such bundle version"):
        bundle_lib.promote_bundle(root, "b-000000000000")
    with pytest.raises(FileNotFoundError, match="nor a versioned bundle root"):
        bundle_lib.resolve_bundle(str(tmp_path / "nothing"))

    # The pipeline's publish stage (after train + tune) publishes and promotes the working bundle.
    from steel.core.config import Config
    from steel.pipeline import Pipeline

    save_thresholds(work, {**default_thresholds(), "binary": 0.8})
    skipped, summary, outputs = Pipeline(Config(bundle=work, bundle_versions=root)).publish()
    assert not skipped and bundle_lib.resolve_bundle(root).version == outputs["version"] not in (v1.version, v2.version)
    assert Pipeline(Config(bundle=work, bundle_versions=root)).publish()[0]  # nothing new: skipped


# --------------------------------------------------------------------------------------------
# Integration: local Ray, stand-in predictor
# --------------------------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_bundle_promoted_during_a_run_and_lease_refusal(ray_local, stand_in, tmp_path, monkeypatch, capsys):
    from steel.cli import main
    from steel.core import faults
    from steel.score import lease
    from steel.score import run as scoring
    from tests.test_scoring import tiny_models

    built, specs = tiny_models()
    root, work = str(tmp_path / "bundles"), str(tmp_path / "work")
    bundle_lib.save_bundle(work, built, specs, {"test": "tiny"})
    v1 = bundle_lib.publish_bundle(work, root)
    save_thresholds(work, {**default_thresholds(), "binary": 0.7})
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    write_images(images, [f"p{i}.jpg" for i in range(6)])
    seen = {}

    def promote_midway(point):  # training publishes and promotes v2 while the run is scoring
        if point == "mid_shard" and "v2" not in seen:
            seen["v2"] = bundle_lib.publish_bundle(work, root)
            seen["holder"] = lease.read_holder(out)
            # A second run on the same output is refused at once, naming the holder.
            seen["rc"] = main(["score", "--bundle", root, "--images", images, "--out", out])

    monkeypatch.setattr(faults, "pause_point", promote_midway)
    cfg = ScoreConfig(batch_size=2, images_per_shard=2, format="parquet")
    summary = scoring.score(root, images, out, cfg, predictor=stand_in)
    assert seen["v2"].version != v1.version and bundle_lib.resolve_bundle(root).version == seen["v2"].version
    assert (summary["bundle"]["uri"], summary["bundle"]["version"], summary["scored"]) == (v1.uri, v1.version, 6)
    rows = pd.concat([score_io.read_rows_file(u) for u in score_io.complete_shards(out).values()])
    assert set(rows["bundle_version"]) == {v1.version} and set(rows["scored_at"]) == {summary["started_at"]}
    record = json.loads(storage.read_text(score_io.run_record_uri(out, summary["run_id"])))
    assert record["bundle"]["version"] == v1.version
    assert seen["rc"] == 3 and seen["holder"]["run_id"] == summary["run_id"]
    err = capsys.readouterr().err
    assert "another run holds the lease" in err and f"run {summary['run_id']} on" in err
    assert lease.read_holder(out) is None  # released at the end


@pytest.mark.timeout(300)
def test_s3_faults_through_a_proxy_are_retried_and_persistent_ones_fail_the_run(
        ray_local, stand_in, tiny_bundle, s3_endpoint, s3_bucket, tmp_path):
    from steel.score.run import score
    from tests.faulty_proxy import FaultyProxy

    images, out = f"s3://{s3_bucket}/archive", f"s3://{s3_bucket}/scores"
    first = [f"f{i:02d}.jpg" for i in range(8)]
    write_images(images, first)
    cfg = ScoreConfig(batch_size=3, images_per_shard=3, format="parquet", retries=8, retry_backoff_s=0.01)
    with FaultyProxy(s3_endpoint, rate=0.2, first_n=3, seed=3) as proxy:
        s3.set_endpoint(proxy.url)
        try:
            # Intermittent: every key's first 3 GETs/PUTs fail (botocore makes one attempt per call, so
            # only steel's retries get through), plus 20% at random: 503 SlowDown or a drop.
            s = score(tiny_bundle, images, out, cfg, predictor=stand_in)
            assert (s["scored"], s["errors"], s["transient_failures"], s["problems"]) == (8, 0, 0, [])
            faulted = {k for (m, k), n in proxy.faults_per_key.items() if n}
            assert any(k.endswith(".jpg") for k in faulted) and any("/shards/" in k for k in faulted)
            assert all(proxy.per_key[("GET", f"/{s3_bucket}/archive/{n}")] > 3 for n in first)
            proxy.set(rate=0.0, first_n=0)  # the test's own reads below have no retries
            from steel.score import lease
            assert lease.read_holder(out) is None, proxy.faults_per_key
            assert storage.exists(storage.join(out, "_SUCCESS")) and not storage.list_files(
                storage.join(out, "errors"))
            check_output(out, set(first))

            # Persistent: two new images can never be read; the rest of the night goes on.
            new = [f"g{i}.jpg" for i in range(5)]
            write_images(images, new, start=50)
            proxy.set(rate=0.1, persist=["/g1.jpg", "/g3.jpg"])
            s = score(tiny_bundle, images, out, cfg, predictor=stand_in)
            proxy.set(rate=0.0)
            assert (s["images_in"], s["scored"], s["transient_failures"]) == (5, 3, 2)
            assert s["problems"] and "2 images failed after 8 retries" in s["problems"][0]
            assert index_ids(out) == set(first) | {"g0.jpg", "g2.jpg", "g4.jpg"}  # g1, g3 not recorded
            assert not storage.exists(storage.join(out, "_SUCCESS"))
            with pytest.raises(merge.MergeError, match="not finished"):
                merge.merge(out, str(tmp_path / "s.csv"))
            record = json.loads(storage.read_text(score_io.run_record_uri(out, s["run_id"])))
            assert record["status"] == "incomplete" and record["transient_failures"] == 2

            # Faults cleared: the re-run scores exactly the two.
            proxy.set(rate=0.0, persist=[])
            s = score(tiny_bundle, images, out, cfg, predictor=stand_in)
            assert (s["images_in"], s["scored"], s["problems"]) == (2, 2, [])
            assert s["images_already_scored"] == 11
        finally:
            s3.set_endpoint(None)
    check_output(out, set(first) | set(new))
    assert merge.merge(out, str(tmp_path / "s.csv"))["images"] == 13


# --------------------------------------------------------------------------------------------
# Kill tests: driver processes joined to a Ray head, SIGKILLed at named points
# --------------------------------------------------------------------------------------------

class Jobs:
    """Scoring jobs (tests/score_driver.py) on the Ray head, each a driver we can SIGKILL."""

    def __init__(self, dashboard: str, bundle: str):
        from ray.job_submission import JobSubmissionClient

        self.bundle = bundle

        from tests.test_train_job import _auth_headers

        self.client = JobSubmissionClient(dashboard, headers=_auth_headers())

    def submit(self, images: str, out: str, env: dict | None = None) -> str:
        deadline = time.time() + 120  # the head's job agent needs a while after the dashboard opens
        while True:
            try:
                return self.client.submit_job(
                    entrypoint=f"python -m tests.score_driver {self.bundle} {images} {out}",
                    runtime_env={"working_dir": str(REPO), "env_vars": env or {},
                                 "excludes": [".venv", "runs", ".git", "**/__pycache__", "*.egg-info"]})
            except RuntimeError as e:
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                time.sleep(2)

    def wait(self, job: str, timeout: float = 240) -> str:
        from ray.job_submission import JobStatus

        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return status
            time.sleep(1)
        raise TimeoutError(f"job {job} still running after {timeout} s")

    def logs(self, job: str) -> str:
        return self.client.get_job_logs(job)[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_at_each_point_then_rerun_loses_nothing(ray_head, tiny_bundle, tmp_path):
    from ray.job_submission import JobStatus

    images, out = str(tmp_path / "archive"), str(tmp_path / "out")
    jobs = Jobs(ray_head, tiny_bundle)
    day1 = [f"dt=2026-11-28/a{i}.jpg" for i in range(4)]
    write_images(images, day1)
    job = jobs.submit(images, out)
    assert jobs.wait(job) == JobStatus.SUCCEEDED, jobs.logs(job)
    day2 = [f"dt=2026-11-29/b{i:02d}.jpg" for i in range(9)]
    write_images(images, day2, start=20)

    for point in ("listed", "mid_shard", "shard_written", "before_success"):
        marker = tmp_path / f"paused-{point}"
        job = jobs.submit(images, out, {"STEEL_SCORE_PAUSE_AT": point, "STEEL_SCORE_PAUSE_FILE": str(marker)})
        deadline = time.time() + 240
        while not marker.exists() or len(marker.read_text().split()) < 2:
            assert jobs.client.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING), jobs.logs(job)
            assert time.time() < deadline, f"never reached {point}"
            time.sleep(0.2)
        pid = int(marker.read_text().split()[1])
        group = os.getpgid(pid)  # the job's own process group (its shell and the driver), not ours
        assert group not in (os.getpgid(0), os.getpgid(os.getppid()))
        os.killpg(group, signal.SIGKILL)
        assert jobs.wait(job, 60) != JobStatus.SUCCEEDED
        with pytest.raises(merge.MergeError, match="not finished"):
            merge.merge(out, str(tmp_path / "s.csv"))
        if point == "shard_written":  # a shard without its index: recovered by the next run
            assert len(score_io.complete_shards(out)) == len(storage.list_files(storage.join(out, "index"))) + 1
        # No wait: the killed run's lease (TTL 600 s) names a pid on this host that is gone; the next
        # run takes it over at once.

    assert index_ids(out) == set(day1) | set(day2)  # the last killed run had written every shard
    job = jobs.submit(images, out)
    assert jobs.wait(job) == JobStatus.SUCCEEDED, jobs.logs(job)
    check_output(out, set(day1) | set(day2))
    s = merge.merge(out, str(tmp_path / "s.csv"))
    assert (s["images"], s["rows"]) == (13, 52)
    records = score_io.read_run_records(out)
    # Runs killed earlier leave no record; the one killed before _SUCCESS had written its record.
    assert [r["status"] for r in records] == ["ok", "ok", "ok"]
    assert records[-1]["took_over_from"]["dead"] and records[-1]["images_in"] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stalled_run_that_lost_its_lease_writes_nothing_more(ray_head, tiny_bundle, tmp_path):
    """Run A writes a shard, stalls (SIGSTOP: its heartbeat too) past its TTL; run B takes the stale
    lease over and scores the rest, with two late uploads that regroup the shards A had planned. A
    wakes up and stops at its next fence: no file of its lands, no image is in two shards."""
    from ray.job_submission import JobStatus

    images, out = str(tmp_path / "archive"), str(tmp_path / "out")
    names = [f"dt=2026-11-30/c{i}.jpg" for i in range(9)]  # A plans 3 shards of 3
    write_images(images, names)
    jobs = Jobs(ray_head, tiny_bundle)
    ttl = {"STEEL_TEST_LOCK_TTL_S": "4"}
    marker, resume = tmp_path / "paused", tmp_path / "resume"
    a = jobs.submit(images, out, {**ttl, "STEEL_SCORE_PAUSE_AT": "shard_written:2", "STEEL_SCORE_PAUSE_FILE": str(marker),
                                  "STEEL_SCORE_RESUME_FILE": str(resume)})
    deadline = time.time() + 240
    while not marker.exists() or len(marker.read_text().split()) < 2:
        assert jobs.client.get_job_status(a) in (JobStatus.PENDING, JobStatus.RUNNING), jobs.logs(a)
        assert time.time() < deadline, "A never reached its second shard"
        time.sleep(0.2)
    pid = int(marker.read_text().split()[1])
    os.kill(pid, signal.SIGSTOP)
    try:
        assert len(score_io.complete_shards(out)) == 2  # A's first shard, and its second without an index
        late = ["dt=2026-11-30/c6a.jpg", "dt=2026-11-30/c7a.jpg"]
        write_images(images, late, start=40)
        time.sleep(5)  # A's lease, not renewed, goes stale by the store's clock
        b = jobs.submit(images, out, ttl)
        assert jobs.wait(b) == JobStatus.SUCCEEDED, jobs.logs(b)
        after_b = {n: storage.read_bytes(u) for n, u in score_io.complete_shards(out).items()}
        records = score_io.read_run_records(out)
        assert records[-1]["took_over_from"]["dead"] is False and records[-1]["images_in"] == 5
        resume.write_text("")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert jobs.wait(a, 120) == JobStatus.FAILED
    assert "lease lost" in jobs.logs(a)
    assert {n: storage.read_bytes(u) for n, u in score_io.complete_shards(out).items()} == after_b
    check_output(out, set(names) | set(late))  # each image in exactly one shard
    done, _ = score_io.done_images(out)
    assert not [e for e in done.values() if e.get("ignored")]
    assert merge.merge(out, str(tmp_path / "s.csv"))["images"] == 11


def test_drift_chart_from_run_records(tmp_path):
    from steel.report.pipeline import drift_chart, drift_series

    def rec(started, scored, defects):
        return {"started_at": started, "scored": scored, "defect_images": dict(zip("1234", defects))}

    records = [rec("2026-11-28T01:00:00Z", 100, (10, 0, 40, 5)), rec("2026-11-29T01:00:00Z", 50, (5, 1, 20, 0)),
               rec("2026-11-29T03:00:00Z", 150, (45, 3, 60, 0)),  # a second run that night: weighted
               {"started_at": "2026-11-30T01:00:00Z", "status": "failed"}]
    series = drift_series(records)
    assert [p["night"] for p in series] == ["2026-11-28", "2026-11-29"]
    assert series[1]["scored"] == 200 and series[1]["rate"] == {"1": 0.25, "2": 0.02, "3": 0.4, "4": 0.0}
    png = drift_chart(records)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and drift_chart(records[3:]) is None


@pytest.mark.timeout(180)
def test_metrics_reach_rays_prometheus_endpoint(ray_local):
    """The counters CascadeActor increments are exported on the node's Prometheus endpoint."""
    import urllib.request

    import ray

    from steel.score.stages import _Metrics

    @ray.remote(num_cpus=0)
    class Scorer:
        def __init__(self):
            self.m = _Metrics()

        def work(self):
            self.m.inc("scored", 7)
            self.m.inc("errors", 2, {"kind": "decode"})
            self.m.inc("defects", 3, {"class_id": "3"})
            return self.m.ok

    def value(text: str, name: str, tag: str = "") -> float:
        """Sum of a counter's samples (other tests in this session's Ray may have added to it)."""
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith(f"ray_{name}") and tag in ln)

    actor = Scorer.remote()
    assert ray.get(actor.work.remote())
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.time() + 120, ""
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if value(text, "steel_images_scored") >= 7 and value(text, "steel_defect_images", 'class_id="3"') >= 3:
            break
        time.sleep(2)
    ray.kill(actor)
    assert value(text, "steel_images_scored") >= 7, text[-2000:]
    assert value(text, "steel_score_errors", 'kind="decode"') >= 2
    assert value(text, "steel_defect_images", 'class_id="3"') >= 3
