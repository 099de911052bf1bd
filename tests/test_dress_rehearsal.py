"""bench/dress_rehearsal.py without running it: the derived config and the reading of the job's log."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import dress_rehearsal as dr
from steel.core.config import ConfigError, config_from_dict

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "configs" / "severstal-seed.yaml"


def test_derived_config_keeps_the_seed_models_and_changes_only_what_a_cpu_run_needs(tmp_path):
    data, sets = dr.derive_config(SEED, tmp_path / "r", images=30, test_images=7, steps=3, epochs=2)
    cfg = config_from_dict(data)
    seed = config_from_dict(__import__("yaml").safe_load(SEED.read_text()))
    # The seed's architectures at full size, batches and thresholds mode as the seed has them.
    for kind in ("classifier", "segmenter"):
        mine, theirs = getattr(cfg.train, kind), getattr(seed.train, kind)
        assert (mine.encoder, mine.input_size, mine.per_worker_batch, mine.preprocessing) == \
            (theirs.encoder, theirs.input_size, theirs.per_worker_batch, theirs.preprocessing)
        assert mine.encoder_weights == "none" and theirs.encoder_weights == "imagenet"
    assert cfg.train.segmenter.input_size == (256, 1600) and cfg.train.classifier.input_size == (256, 512)
    assert cfg.train.models == seed.train.models and cfg.tune.mode == seed.tune.mode == "fixed"
    # Capped, on CPU, everything under the output folder (nothing on s3://).
    assert (cfg.train.epochs, cfg.train.max_steps_per_epoch, cfg.train.use_gpu, cfg.score.gpus_per_actor) == (2, 3, False, 0)
    assert (cfg.data.synth.images, cfg.data.synth.test_images) == (30, 7)
    root = str((tmp_path / "r").resolve())
    for uri in (cfg.data.root, cfg.train.output, cfg.bundle, cfg.bundle_versions, cfg.score.images, cfg.score.out,
                cfg.report):
        assert uri.startswith(root), uri
    # Every change is in the printed list; nothing else differs from the seed.
    changed = {s.split("=", 1)[0] for s in sets}
    seed_flat, mine_flat = _flat(seed.to_dict()), _flat(cfg.to_dict())
    differs = {k for k in mine_flat if mine_flat[k] != seed_flat.get(k)}
    assert differs and all(any(k == c or k.startswith(c + ".") for c in changed) for k in differs), differs


def test_a_bad_extra_override_fails_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="train.segmenter.per_worker_batch"):
        dr.derive_config(SEED, tmp_path, extra=["train.segmenter.per_worker_batch=0"])
    data, sets = dr.derive_config(SEED, tmp_path, extra=["train.segmenter.per_worker_batch=2"])
    assert data["train"]["segmenter"]["per_worker_batch"] == 2 and sets[-1] == "train.segmenter.per_worker_batch=2"


def test_stage_times_reads_the_pipelines_own_lines():
    log = ("[    data] skipped (already done): 300 training images in /x\n"
           "[binary] epoch 1/1 12.0s loss=0.7\n"
           "(TrainController pid=1) [   train] done in 1234s: 6 models\n"  # prefixed: not a stage line
           "[   train] done in 1234s: 6 models in bundle /b\n"
           "[   score] done in 56s: 100 images: 100 scored, 0 errors\n"
           "[  report] /r/report.md\n")
    times = dr.stage_times(log)
    assert times == {"data": {"status": "skipped", "seconds": 0, "summary": "300 training images in /x"},
                     "train": {"status": "ran", "seconds": 1234, "summary": "6 models in bundle /b"},
                     "score": {"status": "ran", "seconds": 56, "summary": "100 images: 100 scored, 0 errors"}}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def test_epoch_times_and_table():
    log = ("(RayTrainWorker pid=3) [binary] epoch 1/1 275.7s loss=0.6682 val_images=44.0000 lr=0.0003 "
           "train_seconds=127.7730 images_per_s_per_worker=0.0310 *best*\n"
           "(RayTrainWorker pid=3) [seg3] epoch 2/2 90.5s loss=0.9 train_seconds=60.0000 images_per_s_per_worker=0.1\n")
    assert dr.epoch_times(log) == {"binary": {"epoch": 1, "epoch_seconds": 275.7, "train_seconds": 127.773},
                                   "seg3": {"epoch": 2, "epoch_seconds": 90.5, "train_seconds": 60.0}}
    record = {"stages": {"train": {"status": "ran", "seconds": 1234, "summary": ""}}, "job_seconds": 2000.4,
              "models": {"binary": {"encoder": "xception", "input": [256, 512], "params": 23523497, "seconds": 300.2,
                                    "epoch_seconds": 275.7, "train_seconds": 127.8}},
              "load": {"min": 20.0, "mean": 45.5, "max": 128.0, "samples": 9}}
    text = dr.table(record)
    assert "| train | ran | 1234 |" in text and "| data | MISSING | - |" in text and "**2000**" in text
    assert "| binary | xception | 256x512 | 23,523,497 | 300 | 276 | 128 |" in text
    assert "min 20.0 / mean 45.5 / max 128.0" in text
