"""configs/severstal-seed.yaml: the seed's settings, checked; and it trains at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from steel.core.config import ConfigError, config_from_dict, load_config
from steel.core.names import SEED_AREAS, is_segmenter

SEED = str(Path(__file__).resolve().parents[1] / "configs" / "severstal-seed.yaml")


def test_seed_config_is_the_seed():
    cfg = load_config(SEED)
    t = cfg.train
    assert (t.classifier.encoder, tuple(t.classifier.input_size)) == ("xception", (256, 512))
    assert (t.segmenter.encoder, tuple(t.segmenter.input_size)) == ("efficientnetb1", (256, 1600))
    assert [t.batch_for(n) for n in ("binary", "multilabel", "seg1", "seg4")] == [16, 16, 8, 8]
    assert t.num_workers == 1  # global batch = the seed's batch
    from steel.train.schedule import scaled_lr

    # Every model at Keras' Adam default (the seed names no optimizer settings), after batch scaling.
    assert {n: scaled_lr(t.lr_for(n), t.batch_for(n), t.num_workers, t.base_batch) for n in t.models} == \
        {n: pytest.approx(1e-3) for n in t.models}
    assert t.seg_loss == "dice" and t.blackout_prob == 0.0 and t.augment
    assert cfg.tune.tta == "none" and cfg.score.tta == "none" and cfg.tune.mode == "fixed"
    assert cfg.data.seed == 42

    from steel.model import networks as models

    assert models.model_spec("binary", t)["preprocessing"] == "unit"  # rescale=1./255
    assert models.model_spec("seg3", t)["preprocessing"] == "imagenet"  # get_preprocessing('efficientnetb1')


def test_per_kind_batch_and_learning_rate():
    cfg = config_from_dict({"train": {"per_worker_batch": 4, "base_lr": 1e-3,
                                      "segmenter": {"per_worker_batch": 2, "base_lr": 5e-4}}})
    t = cfg.train
    assert [t.batch_for(n) for n in ("binary", "seg2")] == [4, 2]
    assert [t.lr_for(n) for n in ("multilabel", "seg2")] == [1e-3, 5e-4]

    from steel.train.run import plan

    sizes = {"train": 40, "val": 8}
    assert plan("binary", sizes, t)["steps_per_epoch"] == 40 // 2 // 4  # 2 workers x 4
    assert plan("seg1", sizes, t)["steps_per_epoch"] == 40 // 2 // 2  # 2 workers x 2
    with pytest.raises(ConfigError, match="train.segmenter.per_worker_batch"):
        config_from_dict({"train": {"segmenter": {"per_worker_batch": 0}}})
    with pytest.raises(ConfigError, match="train.classifier.base_lr"):
        config_from_dict({"train": {"classifier": {"base_lr": -1}}})
    with pytest.raises(ConfigError, match="train.segmenter.preprocessing: must be one of unit, imagenet"):
        config_from_dict({"train": {"segmenter": {"preprocessing": "torch"}}})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_seed_config_trains_at_tiny_sizes(tmp_path, ray_local):
    """The seed's U-Net (Unet-EfficientNetB1, dice loss, batch 8, ImageNet standardisation) trained
    from the seed config, shrunk by overrides only: random init (no internet), tiny input, one step.
    (Only seg1: the Xception classifier adds ~2 min of graph building on 2 CPUs; its batch of 16
    is checked by test_seed_config_is_the_seed / test_per_kind_batch_and_learning_rate.)"""
    from steel.model import bundle
    from steel.train.run import train_models
    from tests.test_train_data import make_tiny_dataset

    root = make_tiny_dataset(tmp_path / "data", n=64)  # 15 class-3 training images: a full batch of 8
    cfg = load_config(SEED, [
        f"data.root={root}", f"train.output={tmp_path}/ckpt", f"bundle={tmp_path}/bundle",
        f"report={tmp_path}/report", "train.use_gpu=false", "train.cpus_per_worker=1",
        "train.models=[seg3]", "train.epochs=1", "train.max_steps_per_epoch=1",
        "train.segmenter.input_size=[64, 320]", "train.segmenter.encoder_weights=none",
    ])
    results = train_models(cfg)
    r = results["seg3"]
    assert r["status"] == "trained"
    assert r["history"][0]["images"] == 8  # one step of the seed's U-Net batch
    row = r["history"][0]
    assert row["loss"] == pytest.approx(1.0 - row["dice_coef"], abs=1e-4)  # dice loss (the seed's), no BCE term
    spec = bundle.read_manifest(cfg.bundle)["models"]["seg3"]["spec"]
    assert (spec["encoder"], spec["preprocessing"]) == ("efficientnetb1", "imagenet")


def test_fixed_thresholds_are_the_eda_train_split_percentiles(tmp_path):
    """tune.mode fixed: probabilities 0.5 and the area bounds `steel eda --split train` writes."""
    import json

    from steel.model import thresholds
    from steel.report import eda
    from steel.tune import run as tuning
    from tests.test_train_data import make_tiny_dataset

    root = make_tiny_dataset(tmp_path / "data")
    cfg = load_config(SEED, [f"data.root={root}", f"bundle={tmp_path}/bundle"])
    th = tuning.fixed_thresholds(cfg)
    eda.run_eda(str(root), str(tmp_path / "eda"), split="train", samples=0)
    areas = json.loads((tmp_path / "eda" / "area_thresholds.json").read_text())
    assert areas and th["binary"] == 0.5
    for k, c in th["classes"].items():
        assert (c["prob"], c["pixel"]) == (0.5, 0.5)
        want = areas.get(k, dict(zip(("min_area", "max_area"), SEED_AREAS[int(k)])))
        assert (c["min_area"], c["max_area"]) == (want["min_area"], want["max_area"])
    assert th["source"]["mode"] == "fixed" and "train split" in th["source"]["areas"]
    # The tiny set's rectangles are ~15,000 pixels: far from the seed's Kaggle bounds.
    assert th["classes"]["1"]["max_area"] != SEED_AREAS[1][1]

    # From EDA's file instead, and written into the bundle (no validation pass here).
    cfg = load_config(SEED, [f"data.root={root}", f"bundle={tmp_path}/bundle",
                             f"tune.area_thresholds={tmp_path}/eda/area_thresholds.json"])
    summary = tuning.write_fixed(cfg, full_check=False)
    written = thresholds.load_thresholds(str(tmp_path / "bundle"))
    assert written["classes"] == th["classes"] and written["source"]["areas"].endswith("area_thresholds.json")
    assert "fixed thresholds" in tuning.format_summary(summary)
    with pytest.raises(ConfigError, match="tune.mode: must be 'search' or 'fixed'"):
        config_from_dict({"tune": {"mode": "grid"}})


@pytest.mark.timeout(240)
def test_write_fixed_checks_the_deployed_cascade_on_the_validation_split(tmp_path, ray_local):
    """write_fixed's validation Dice is the full cascade's (scoring's Ray actors at 256x1600) on the val split."""
    from steel.core.names import MODEL_NAMES
    from steel.model import bundle, thresholds
    from steel.model import networks as models
    from steel.tune import run as tuning
    from tests.test_train_data import make_tiny_dataset

    root = make_tiny_dataset(tmp_path / "data")
    kw_cls = dict(encoder="simplecnn", input_size=(32, 160), encoder_weights="none", dense_units=(8,))
    kw_seg = dict(encoder="simplecnn", input_size=(32, 160), encoder_weights="none", decoder_filters=(8, 8, 4, 4, 4))
    specs = {n: models.resolve_spec(n, **(kw_seg if is_segmenter(n) else kw_cls)) for n in MODEL_NAMES}
    bundle.save_bundle(str(tmp_path / "bundle"), {n: models.build(n, **specs[n]) for n in MODEL_NAMES}, specs, {})
    # The seed config asks for GPU actors; this machine has none (tuning would refuse or wait for one).
    cfg = load_config(SEED, [f"data.root={root}", f"bundle={tmp_path}/bundle", "score.gpus_per_actor=0"])
    summary = tuning.write_fixed(cfg, stamp="s1")
    v = summary["validation"]
    labels, _ = tuning.validation_labels(cfg)
    assert v["n_images"] == len(labels) and set(v["per_class"]) == {"1", "2", "3", "4"}
    assert v["mean_dice"] == pytest.approx(sum(v["per_class"].values()) / 4)  # every (image, class) pair counts
    written = thresholds.load_thresholds(str(tmp_path / "bundle"))
    assert written["validation"]["fingerprint"] == "s1" and written["validation"]["mean_dice"] == v["mean_dice"]

    # The pipeline's tune stage in fixed mode: writes them for this bundle once, then skips.
    from steel.pipeline import Pipeline

    skipped, line, _ = Pipeline(cfg).tune()
    assert not skipped and "fixed thresholds" in line and f"{v['mean_dice']:.4f}" in line
    skipped, line, _ = Pipeline(cfg).tune()
    assert skipped and f"{v['mean_dice']:.4f}" in line
