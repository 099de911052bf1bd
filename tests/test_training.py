"""steel.train.run: unit pieces (no Ray) and tiny end-to-end Ray Train runs (2 CPU workers)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from steel.core.config import config_from_dict
from tests.test_train_data import make_tiny_dataset

TINY_CLASSIFIER = {"encoder": "simplecnn", "input_size": [32, 160], "encoder_weights": "none",
                   "dense_units": [16, 8, 8]}
TINY_SEGMENTER = {"encoder": "simplecnn", "input_size": [32, 160], "encoder_weights": "none",
                  "decoder_filters": [16, 8, 8, 4, 4]}


def tiny_config(root, out, **train) -> "object":
    """Config for the tiny dataset at ``root``; checkpoints and bundle under ``out`` (path or s3:// URI)."""
    base = {"output": f"{out}/ckpt", "epochs": 1, "per_worker_batch": 4, "num_workers": 2,
            "cpus_per_worker": 1, "max_failures": 0, "classifier": TINY_CLASSIFIER,
            "segmenter": TINY_SEGMENTER}
    base.update(train)
    return config_from_dict({"name": "tiny", "data": {"root": str(root)}, "bundle": f"{out}/bundle",
                             "train": base})


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


# ---------------------------------------------------------------------------------------------
#  Unit tests


def test_linear_scaling_and_warmup():
    from steel.train.schedule import scaled_lr, warmup_schedule

    assert scaled_lr(1e-4, per_worker_batch=16, num_workers=4, base_batch=8) == pytest.approx(8e-4)
    sched = warmup_schedule(8e-4, warmup_steps=4)
    assert [round(float(sched(s)), 8) for s in range(6)] == [2e-4, 4e-4, 6e-4, 8e-4, 8e-4, 8e-4]
    assert float(warmup_schedule(1e-3, 0)(0)) == pytest.approx(1e-3)


def test_cosine_schedule_decays_to_zero_after_warmup():
    from steel.train.schedule import warmup_schedule

    sched = warmup_schedule(1e-3, warmup_steps=2, decay_steps=10)
    lrs = [float(sched(s)) for s in range(12)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(1e-3)
    assert lrs[6] == pytest.approx(5e-4, rel=1e-5)  # half-way through the decay: half the peak
    assert all(a > b for a, b in zip(lrs[2:10], lrs[3:11]))  # strictly decreasing after warm-up
    assert lrs[10] == pytest.approx(0.0, abs=1e-9) and lrs[11] == pytest.approx(0.0, abs=1e-9)
    assert sched.get_config() == {"peak_lr": 1e-3, "warmup_steps": 2, "decay_steps": 10}


def test_plan_gives_equal_steps_per_worker(tiny_root):
    from steel.train.run import plan

    cfg = tiny_config(tiny_root, "/tmp/unused", per_worker_batch=4, num_workers=2)
    p = plan("binary", {"train": 17, "val": 5}, cfg.train)
    # streaming_split(equal=True): 8 rows per worker -> 2 batches of 4; val 2 rows each -> 1 step.
    assert (p["steps_per_epoch"], p["val_steps"], p["split_val"], p["images_per_epoch"]) == (2, 1, True, 16)
    p = plan("seg2", {"train": 9, "val": 1}, cfg.train)  # one val image for two workers: not split
    assert (p["steps_per_epoch"], p["val_steps"], p["split_val"]) == (1, 1, False)
    capped = tiny_config(tiny_root, "/tmp/unused", max_steps_per_epoch=1)
    assert plan("binary", {"train": 100, "val": 10}, capped.train)["train_rows"] == 8
    with pytest.raises(ValueError, match="at least one image per worker"):
        plan("seg4", {"train": 1, "val": 0}, cfg.train)


def test_plan_caches_in_workers_when_the_share_fits(tiny_root):
    from steel.train.run import plan

    cfg = tiny_config(tiny_root, "/tmp/unused", per_worker_batch=4, num_workers=2)
    p = plan("seg3", {"train": 17, "val": 5}, cfg.train)
    # 8 train + 2 val rows per worker, 32x160 pixels x (3 image + 1 mask) bytes each.
    assert p["cache"] and p["cache_mb"] == round(10 * (32 * 160 * 4 + 20) / 2**20, 1) == 0.2
    small = tiny_config(tiny_root, "/tmp/unused", worker_cache_mb=0)
    assert not plan("seg3", {"train": 17, "val": 5}, small.train)["cache"]
    big = plan("seg3", {"train": 2000, "val": 500}, tiny_config(tiny_root, "/tmp/unused", worker_cache_mb=1).train)
    assert not big["cache"] and big["cache_mb"] > 1


def test_local_train_config_one_worker_same_global_batch(tiny_root, monkeypatch):
    from steel.core import ray_session
    from steel.train.run import local_train_config
    from steel.train.schedule import scaled_lr

    cfg = tiny_config(tiny_root, "/tmp/unused", num_workers=2, cpus_per_worker=1, per_worker_batch=4,
                      segmenter={**TINY_SEGMENTER, "per_worker_batch": 3})
    monkeypatch.setattr(ray_session, "_started_local", False)
    assert local_train_config(cfg.train) is cfg.train  # a Ray this process joined: unchanged
    monkeypatch.setattr(ray_session, "_started_local", True)
    one = local_train_config(cfg.train)
    assert (one.num_workers, one.cpus_per_worker, one.batch_for("binary"), one.batch_for("seg3")) == (1, 2, 8, 6)
    for name in ("binary", "seg3"):  # same global batch, so the same learning rate
        assert scaled_lr(one.lr_for(name), one.batch_for(name), 1, one.base_batch) == \
            scaled_lr(cfg.train.lr_for(name), cfg.train.batch_for(name), 2, cfg.train.base_batch)
    off = tiny_config(tiny_root, "/tmp/unused", one_local_worker=False)
    assert local_train_config(off.train) is off.train
    gpu = tiny_config(tiny_root, "/tmp/unused", use_gpu=True)
    assert local_train_config(gpu.train) is gpu.train


def test_parse_fault():
    from steel.core.faults import parse_train_fault as parse_fault

    assert parse_fault(None) is None
    assert parse_fault("epoch=2,rank=1,marker=/tmp/m") == {"epoch": "2", "rank": "1", "marker": "/tmp/m"}
    with pytest.raises(ValueError, match="needs epoch"):
        parse_fault("rank=1")
    with pytest.raises(ValueError, match="expected"):
        parse_fault("epoch=1,rank=0,when=now")


def test_write_history_csv_png_tensorboard(tmp_path):
    import pandas as pd

    from steel.train.history import write_history

    history = [{"epoch": e, "loss": 1.0 / e, "f1_m": 0.2 * e, "val_loss": 1.2 / e, "val_f1_m": 0.15 * e,
                "seconds": 1.0} for e in (2, 1, 3)]
    files = write_history(str(tmp_path / "bundle"), "binary", history)
    frame = pd.read_csv(files["csv"])
    assert frame["epoch"].tolist() == [1, 2, 3] and "val_f1_m" in frame
    assert (tmp_path / "bundle/history/binary.png").read_bytes()[:4] == b"\x89PNG"
    events = list((tmp_path / "bundle/logs/binary").rglob("events.out.tfevents.*"))
    assert {p.parent.name for p in events} == {"train", "val"}
    # A second write replaces the logs instead of adding a second set of event files.
    write_history(str(tmp_path / "bundle"), "binary", history)
    assert len(list((tmp_path / "bundle/logs/binary").rglob("events.out.tfevents.*"))) == 2


def test_checkpoint_files_keep_what_each_model_needs_to_continue():
    from steel.train.checkpoints import BEST_WEIGHTS, WEIGHTS, checkpoint_files

    states = {"multilabel": {"epoch": 2, "epochs": 2},  # finished
              "seg1": {"epoch": 1, "epochs": 1},  # finished, no epoch with a finite metric: no best file
              "seg3": {"epoch": 1, "epochs": 3},  # continued from an earlier run, not reached yet
              "binary": {"epoch": 1, "epochs": 2}}  # training now
    files = checkpoint_files("binary", states, lambda name: name != "seg1")
    assert files == {"multilabel": [BEST_WEIGHTS], "seg1": [WEIGHTS], "seg3": [BEST_WEIGHTS, WEIGHTS],
                     "binary": [BEST_WEIGHTS, WEIGHTS]}
    states["binary"]["epoch"] = 2  # its last epoch: still the current model, its last weights kept
    assert checkpoint_files("binary", states, lambda name: True)["binary"] == [BEST_WEIGHTS, WEIGHTS]


def test_train_key_tracks_config_and_data(tiny_root):
    from steel.train.checkpoints import train_key

    cfg = tiny_config(tiny_root, "/tmp/unused")
    key = train_key("binary", cfg, "fp1")
    assert key == train_key("binary", tiny_config(tiny_root, "/tmp/other"), "fp1")  # output path irrelevant
    assert key != train_key("binary", cfg, "fp2")
    assert key != train_key("binary", tiny_config(tiny_root, "/tmp/unused", epochs=3), "fp1")
    assert key != train_key("multilabel", cfg, "fp1")
    # A per-model epoch count changes only that model's key.
    other = tiny_config(tiny_root, "/tmp/unused", epochs_by_model={"seg3": 4})
    assert train_key("binary", other, "fp1") == key
    assert train_key("seg3", other, "fp1") != train_key("seg3", cfg, "fp1")
    assert train_key("seg3", other, "fp1") == train_key("seg3", tiny_config(tiny_root, "/tmp/unused", epochs=4), "fp1")


def test_other_runs_lists_the_models_runs_with_other_keys(tmp_path):
    from steel.train.checkpoints import other_runs, run_name

    for d in ("binary", "binary-aaaa", "binary-bbbb", "multilabel-aaaa", "seg1-aaaa"):
        (tmp_path / d).mkdir()
    (tmp_path / "binary-cccc").write_text("a file, not a run")
    assert run_name("binary", "bbbb") == "binary-bbbb"
    assert other_runs(str(tmp_path), "binary", "bbbb") == ["binary", "binary-aaaa"]
    assert other_runs(str(tmp_path), "seg1", "aaaa") == []
    assert other_runs(str(tmp_path / "missing"), "binary", "aaaa") == []


# ---------------------------------------------------------------------------------------------
#  Ray Train runs


def _epochs(result) -> list[int]:
    return [h["epoch"] for h in result["history"]]


@pytest.mark.slow
def test_trains_all_six_into_a_loadable_bundle(tiny_root, tmp_path, ray_local):
    from steel.model import bundle
    from steel.train.checkpoints import load_trained
    from steel.train.run import train_models

    cfg = tiny_config(tiny_root, tmp_path, epochs=1, epochs_by_model={"seg2": 2}, lr_schedule="cosine")
    results = train_models(cfg)
    assert set(results) == {"binary", "multilabel", "seg1", "seg2", "seg3", "seg4"}
    runs = {r["run"] for r in results.values()}  # one Ray Train run (one worker group) for all six
    assert len(runs) == 1 and runs.pop().startswith("cascade-")
    assert _epochs(results["seg2"]) == [1, 2]  # epochs_by_model overrides epochs for that model only
    loaded = bundle.load_bundle(cfg.bundle)
    assert set(loaded.models) == set(results)
    rng = np.random.default_rng(0)
    for name, r in results.items():
        expected = [1, 2] if name == "seg2" else [1]
        assert r["status"] == "trained" and _epochs(r) == expected and r["best_epoch"] in expected
        row = r["history"][0]
        monitor = "val_dice_coef" if name.startswith("seg") else "val_f1_m"
        assert r["monitor"] == monitor and np.isfinite(row["loss"]) and monitor in row
        # Every worker used its whole batch: images seen = rows per worker x workers.
        n_train = int(row["images"])
        assert n_train >= 2 and n_train % 2 == 0
        manifest_entry = loaded.manifest["models"][name]
        assert manifest_entry["metrics"]["best_epoch"] == r["best_epoch"]
        assert (tmp_path / "bundle" / "history" / f"{name}.csv").exists()
        assert (tmp_path / "bundle" / "history" / f"{name}.png").exists()
        assert list((tmp_path / "bundle" / "logs" / name).rglob("events.out.tfevents.*"))
        # The bundle's model predicts exactly what the checkpoint's best weights predict.
        trained, _ = load_trained(name, r["checkpoint"], cfg.train)
        h, w = loaded.input_sizes[name]
        x = rng.random((2, h, w, 3), dtype=np.float32)
        np.testing.assert_allclose(loaded.models[name].predict(x, verbose=0), trained.predict(x, verbose=0),
                                   rtol=1e-5, atol=1e-6)
    # binary trains on all 16-17 training images: both workers' full batches are used.
    from steel.data.labels import load_splits
    from steel.train.data import split_sizes

    splits, _ = load_splits(cfg)
    n = split_sizes(splits, "binary")["train"]
    assert results["binary"]["history"][0]["images"] == (n // 2) * 2

    # Same command again: every model is already in the bundle with the same config and data.
    again = train_models(cfg, ["binary", "seg3"])
    assert {r["status"] for r in again.values()} == {"skipped"}


@pytest.mark.slow
def test_worker_failure_recovers_from_checkpoint(tiny_root, tmp_path, ray_local, monkeypatch):
    from steel.core.faults import TRAIN_FAIL_ENV as FAULT_ENV
    from steel.train.run import train_models

    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAULT_ENV, f"epoch=2,rank=1,marker={marker}")
    cfg = tiny_config(tiny_root, tmp_path, epochs=3, max_failures=2)
    r = train_models(cfg, ["binary"])["binary"]
    assert marker.exists()  # the failure did happen
    assert _epochs(r) == [1, 2, 3]  # resumed after epoch 1: no epoch lost or repeated
    assert r["run"] == f"binary-{r['train_key']}"
    ckpts = sorted(p.name for p in (tmp_path / "ckpt" / r["run"]).glob("binary_epoch_*"))
    assert ckpts == ["binary_epoch_0002", "binary_epoch_0003"]  # num_to_keep=2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_crash_then_rerun_continues_on_s3(tiny_root, tmp_path, ray_local, s3_bucket, monkeypatch, capsys):
    """binary and seg3 train in one run (max_failures=0); seg3 dies at its 2nd epoch. binary reaches
    the bundle all the same, and the same command again (now seg3 alone: another run folder) continues
    seg3 after its epoch 1 from the failed run's checkpoint.

    Without the worker cache (``worker_cache_mb=0``): Ray Data streams every epoch, as for a dataset
    too big to cache; the other runs here use the cache."""
    import boto3

    from steel.core import storage
    from steel.core.faults import TRAIN_FAIL_ENV as FAULT_ENV
    from steel.model import bundle
    from steel.train.checkpoints import checkpoint_states, latest_checkpoint
    from steel.train.run import train_models

    out = f"s3://{s3_bucket}/run"
    cfg = tiny_config(tiny_root, out, epochs=2, epochs_by_model={"binary": 1}, max_failures=0, worker_cache_mb=0)
    monkeypatch.setenv(FAULT_ENV, f"model=seg3,epoch=2,rank=1,marker={tmp_path / 'crashed'}")
    with pytest.raises(Exception, match="injected failure"):
        train_models(cfg, ["binary", "seg3"])
    assert "finished models saved to the bundle: binary" in capsys.readouterr().out
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    runs = {k.split("/")[2] for k in keys if k.startswith("run/ckpt/") and "_epoch_" in k}
    assert len(runs) == 1 and next(iter(runs)).startswith("cascade-")  # one run for both models
    run = runs.pop()
    assert any(k.startswith(f"run/ckpt/{run}/seg3_epoch_0001/") for k in keys)
    failed = checkpoint_states(latest_checkpoint(cfg.train.output, run))
    assert failed["binary"]["epoch"] == 1 and failed["seg3"]["epoch"] == 1
    assert set(bundle.read_manifest(f"{out}/bundle")["models"]) == {"binary"}

    again = train_models(cfg, ["binary", "seg3"])  # the marker exists: no failure this time
    assert again["binary"]["status"] == "skipped"
    assert f"seg3 epoch 1 ({run})" in capsys.readouterr().out
    assert _epochs(again["seg3"]) == [1, 2] and again["seg3"]["run"].startswith("seg3-")
    assert again["seg3"]["history"][0] == failed["seg3"]["history"][0]  # epoch 1 continued, not repeated
    loaded = bundle.load_bundle(f"{out}/bundle")
    assert set(loaded.models) == {"binary", "seg3"}
    assert storage.exists(f"{out}/bundle/history/seg3.csv")
    assert any(k.startswith("run/bundle/logs/seg3/") for k in
               (o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]))
    assert os.path.exists(tmp_path / "crashed")


def test_rare_class_rows_are_repeated_for_every_worker():
    import pandas as pd

    from steel.train.run import oversample_rare

    train = pd.DataFrame({"ImageId": ["a.jpg", "b.jpg", "c.jpg"], "hasDefect": [1, 1, 0],
                          **{f"hasDefect_{k}": [int(k == 3), int(k == 2), 0] for k in (1, 2, 3, 4)},
                          **{f"Defect_{k}": ["1 5" if k == 3 else "", "1 5" if k == 2 else "", ""] for k in (1, 2, 3, 4)}})
    splits = {"train": train, "val": train.iloc[:0]}
    out = oversample_rare(splits, "seg2", workers=3)
    assert (out["train"]["hasDefect_2"] == 1).sum() == 3 and len(out["train"]) == 5
    assert oversample_rare(splits, "binary", workers=3) is splits  # enough rows: unchanged
    with pytest.raises(ValueError, match="seg1: no training images"):
        oversample_rare(splits, "seg1", workers=2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_hyperparameter_change_after_a_finished_run_trains_afresh(tiny_root, tmp_path, ray_local, capsys):
    """A finished run is not resumed under a new base_lr: a new run folder, epoch 1 trained, new weights."""
    from steel.model import bundle
    from steel.train.run import train_models

    cfg = tiny_config(tiny_root, tmp_path, epochs=1)
    first = train_models(cfg, ["binary"])["binary"]
    before = bundle.load_bundle(cfg.bundle)
    old_sha = before.manifest["models"]["binary"]["sha256"]
    old_weights = [w.copy() for w in before.models["binary"].get_weights()]
    capsys.readouterr()

    changed = tiny_config(tiny_root, tmp_path, epochs=1, base_lr=3e-2)
    second = train_models(changed, ["binary"])["binary"]
    printed = capsys.readouterr().out
    assert second["status"] == "trained" and second["train_key"] != first["train_key"]
    assert second["run"] != first["run"] and _epochs(second) == [1]
    assert f"differs from the earlier run(s) {first['run']}" in printed
    assert "resuming" not in printed  # epoch 1 was trained, not restored from the old run
    assert second["history"][0]["loss"] != first["history"][0]["loss"]
    after = bundle.load_bundle(cfg.bundle)
    entry = after.manifest["models"]["binary"]
    assert entry["metrics"]["train_key"] == second["train_key"] and entry["sha256"] != old_sha
    new_weights = after.models["binary"].get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(old_weights, new_weights))
    # The old run's checkpoints stay where they were (its own folder), untouched.
    assert sorted(p.name for p in (tmp_path / "ckpt" / first["run"]).glob("*_epoch_*")) == ["binary_epoch_0001"]



@pytest.mark.timeout(120)
def test_tensorflow_backend_config_unpickles_without_tensorflow(tmp_path):
    """Ray Train's controller unpickles the backend config: ours must not import TensorFlow there
    (``ray.train.tensorflow`` does, in its package ``__init__``)."""
    import subprocess
    import sys

    import ray.cloudpickle as cloudpickle

    from steel.train.backend import tensorflow_backend_config

    blob = tmp_path / "backend.pkl"
    blob.write_bytes(cloudpickle.dumps(tensorflow_backend_config()))
    code = ("import pickle, sys; c = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(type(c).__name__, c.backend_cls.__name__, c.framework.value, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["TensorflowBackendConfig", "TensorflowBackend", "tensorflow", "False"]
