"""The unified model kind (one network instead of six): targets, loss weights, the Cascade on its two
outputs (no Ray), and one tiny Ray Train run that is killed and resumes, then reloads, tunes and scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from steel.data import rle
from steel.model.thresholds import bundle_thresholds
from tests.checks import assert_search_rose
from tests.test_train_data import make_tiny_dataset
from tests.test_training import tiny_config

H, W = 256, 1600
TINY_UNIFIED = {"encoder": "simplecnn", "input_size": [32, 160], "encoder_weights": "none",
                "decoder_filters": [16, 8, 8, 4, 4]}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-unified"))


def test_build_two_outputs_and_the_head_on_the_deepest_features():
    from steel.model import networks as models

    m = models.build("unified", **TINY_UNIFIED)
    assert m.output_names == ["cls", "mask"]
    assert tuple(m.outputs[0].shape) == (None, 5) and tuple(m.outputs[1].shape) == (None, 32, 160, 4)
    # The head reads the encoder's deepest (stride 32) features, what the decoder starts from.
    pool_in = m.get_layer("cls_pool").input
    assert tuple(pool_in.shape[1:3]) == (1, 5) and pool_in.name.startswith("simplecnn_top_conv")
    with pytest.raises(ValueError, match="divisible by 32"):
        models.build("unified", **{**TINY_UNIFIED, "input_size": [30, 160]})
    with pytest.raises(ValueError, match="dense_units applies to classifiers"):
        models.resolve_spec("unified", dense_units=[8], **{k: v for k, v in TINY_UNIFIED.items()})


def test_config_kind_selects_the_models():
    from steel.core.config import ConfigError, config_from_dict

    assert config_from_dict({}).train.model_names() == ["binary", "multilabel", "seg1", "seg2", "seg3", "seg4"]
    assert config_from_dict({"train": {"kind": "unified"}}).train.model_names() == ["unified"]
    with pytest.raises(ConfigError, match="kind: must be one of cascade, unified"):
        config_from_dict({"train": {"kind": "one"}})


def test_unified_targets_hold_every_class_mask_and_blackout_clears_the_head(tiny_root):
    from steel.data import labels as dataset
    from steel.train.data import label_lookup, prepare_batch

    wide = dataset.load_labels(str(tiny_root / "train.csv"))
    row = wide[(wide["hasDefect_3"] == 1) & (wide["hasDefect"] == 1) & (wide[["hasDefect_1", "hasDefect_2",
                                                                              "hasDefect_4"]].sum(axis=1) == 1)].iloc[0]
    path = tiny_root / "train_images" / row["ImageId"]
    batch = {"path": np.array([str(path)]), "bytes": np.array([path.read_bytes()], dtype=object)}
    labels = label_lookup(wide, "unified")
    assert len(labels) == len(wide)  # every image, clean ones too
    out = prepare_batch(batch, name="unified", labels=labels, input_size=(64, 320))
    assert set(out) == {"image", "cls", "mask"} and out["mask"].shape == (1, 64, 320, 4)
    np.testing.assert_array_equal(out["cls"][0], row[["hasDefect", "hasDefect_1", "hasDefect_2", "hasDefect_3",
                                                      "hasDefect_4"]].to_numpy(np.float32))
    for k in range(1, 5):  # channel k-1 is the class-k mask (nearest-resized), as segK's target
        seg = prepare_batch(batch, name=f"seg{k}", labels={row["ImageId"]: row[f"Defect_{k}"] or ""},
                            input_size=(64, 320))
        np.testing.assert_array_equal(out["mask"][0, ..., k - 1], seg["label"][0, ..., 0])
    assert out["mask"][..., 2].sum() > 0
    black = prepare_batch(batch, name="unified", labels=labels, input_size=(64, 320), augment=True,
                          blackout_prob=1.0, seed=0)
    assert black["mask"].sum() == 0 and black["cls"].sum() == 0


def test_pos_weights_follow_the_class_counts():
    from steel.train.run import pos_weights

    rows = pd.DataFrame({"hasDefect": [1, 1, 0, 0], "hasDefect_1": [1, 0, 0, 0], "hasDefect_2": [0] * 4,
                         "hasDefect_3": [1, 1, 0, 0], "hasDefect_4": [1, 1, 1, 0]})
    assert pos_weights(rows, 10.0) == [1.0, 3.0, 10.0, 1.0, 1.0]
    assert pos_weights(rows, 2.0) == [1.0, 2.0, 2.0, 1.0, 1.0]


def _stub_unified(x):
    """cls from the image's mean brightness, mask k = the left columns times k/4."""
    n, h, w, _ = x.shape
    level = x.mean(axis=(1, 2, 3))
    cls = np.stack([level * (k + 1) / 5 for k in range(5)], axis=1).astype(np.float32)
    mask = np.zeros((n, h, w, 4), np.float32)
    for k in range(4):
        mask[:, :, : w // 4, k] = (k + 1) / 4
    return [cls, mask]


def test_mask_loss_leaves_classes_absent_from_the_batch_to_the_bce():
    """An absent class's predictions do not move the Dice term (only BCE punishes them); a present
    class's Dice does, so a rare class is not taught to predict nothing."""
    from steel.model import losses as km

    t = np.zeros((2, 4, 4, 4), np.float32)
    t[0, :2, :2, 2] = 1.0  # only class 3 is present
    perfect = t.copy()
    noisy_absent = t.copy()
    noisy_absent[..., 0] = 0.5  # class 1 absent, predicted everywhere
    assert float(km.present_class_dice_loss(t, perfect)) == pytest.approx(0.0, abs=1e-6)
    assert float(km.present_class_dice_loss(t, noisy_absent)) == pytest.approx(0.0, abs=1e-6)
    assert float(km.present_class_dice_loss(t, np.zeros_like(t))) == pytest.approx(1 - 1 / 5)  # (0+1)/(4+0+1)
    assert float(km.present_class_dice_loss(np.zeros_like(t), noisy_absent)) == 0.0  # nothing present
    bce_dice = km.unified_mask_loss("bce_dice")
    assert float(np.mean(bce_dice(t, noisy_absent))) > float(np.mean(bce_dice(t, perfect)))  # BCE pays


def test_cascade_reads_gate_classes_and_masks_from_one_forward_pass():
    from steel.model.cascade import Cascade
    from steel.model.thresholds import default_thresholds

    th = default_thresholds()
    th["binary"] = 0.1  # p_defect = brightness / 5: image 0 (50) is gated, 1 (200) and 2 (255) pass
    for k in range(1, 5):
        th["classes"][str(k)] = {"prob": 0.0, "pixel": 0.3, "min_area": 0, "max_area": H * W}
    calls = []

    def model(x):
        calls.append(len(x))
        return _stub_unified(x)

    cas = Cascade({"unified": model}, {"unified": (32, 160)}, th, tta="h", preprocessing={"unified": "unit"})
    imgs = np.stack([np.full((H, W, 3), v, np.uint8) for v in (50, 200, 255)])
    probs = cas.predict_probabilities(imgs)
    level = imgs.mean(axis=(1, 2, 3)) / 255.0
    np.testing.assert_allclose(probs["p_defect"], level / 5, rtol=1e-5)
    np.testing.assert_allclose(probs["p_class"], np.stack([level * k / 5 for k in range(2, 6)], 1), rtol=1e-5)
    # TTA h: the flipped view's map is flipped back, so the left quarter's 3/4 averages with 0 there
    # and shows up (halved) on the right quarter too.
    seg3 = probs["seg"][3]
    assert seg3.shape == (3, 32, 160) and seg3[0, 0, 0] == pytest.approx(0.375) and seg3[0, 0, -1] == pytest.approx(0.375)
    assert seg3[0, 0, 80] == 0
    assert calls == [3, 3] and cas.stats["forward_passes"] == 6  # one pass per image and TTA view
    out = cas.predict(imgs)
    assert calls == [3, 3, 3, 3]  # predict: the gates choose outputs, not extra model calls
    assert [o["p_class"][0] != o["p_class"][0] for o in out] == [True, False, False]  # image 0 gated: NaN
    # Classes 3-4 (0.375, 0.5 >= pixel 0.3) mark the outer quarters; classes 1-2 (0.125, 0.25) nothing.
    assert [bool(m) for m in out[1]["masks"]] == [False, False, True, True]
    assert abs(out[1]["areas"][2] - H * W // 2) < 0.01 * H * W  # linear upsampling softens the edges
    with pytest.raises(ValueError, match="unified model must return"):
        Cascade({"unified": lambda x: _stub_unified(x)[0]}, {"unified": (32, 160)}, th).predict(imgs[:1])
    with pytest.raises(ValueError, match="unknown model 'binary'"):
        Cascade({"unified": model, "binary": model}, {"unified": (32, 160)}, th)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_unified_trains_resumes_reloads_tunes_and_scores(tiny_root, tmp_path, ray_local, monkeypatch, capsys):
    """One Ray Train run (2 workers, 2 epochs) killed at epoch 2 and resumed from its checkpoint; its
    bundle reloads and predicts what the checkpoint predicts; `steel tune` and `steel score` run on it."""
    from steel.cli import main
    from steel.core.faults import TRAIN_FAIL_ENV as FAULT_ENV
    from steel.model import bundle
    from steel.model.predictor import cascade_from_bundle
    from steel.train.checkpoints import load_trained
    from steel.train.run import train_models

    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAULT_ENV, f"epoch=2,rank=1,marker={marker}")
    cfg = tiny_config(tiny_root, tmp_path, kind="unified", epochs=2, max_failures=1, segmenter=TINY_UNIFIED)
    results = train_models(cfg)
    assert list(results) == ["unified"] and marker.exists()
    r = results["unified"]
    assert [h["epoch"] for h in r["history"]] == [1, 2]  # resumed after epoch 1: nothing lost or repeated
    row = r["history"][0]
    assert r["monitor"] == "val_mask_class_dice_coef" and "val_cls_f1_m" in row and np.isfinite(row["loss"])
    from steel.data.labels import load_splits
    from steel.train.data import split_sizes

    splits, _ = load_splits(cfg)
    assert row["cls_images"] == (split_sizes(splits, "unified")["train"] // 2) * 2  # every image, both workers

    loaded = bundle.load_bundle(cfg.bundle)
    assert list(loaded.models) == ["unified"]
    trained, _ = load_trained("unified", r["checkpoint"], cfg.train)
    x = np.random.default_rng(0).random((2, 32, 160, 3), dtype=np.float32)
    for a, b in zip(loaded.models["unified"].predict(x, verbose=0), trained.predict(x, verbose=0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    cas = cascade_from_bundle(loaded)
    imgs = np.stack([np.full((H, W, 3), v, np.uint8) for v in (60, 180)])
    probs = cas.predict_probabilities(imgs)
    from steel.data.images import to_input

    cls, mask = trained(to_input(imgs, loaded.specs["unified"]), training=False)
    np.testing.assert_allclose(probs["p_defect"], cls.numpy()[:, 0], atol=1e-5)
    np.testing.assert_allclose(probs["seg"][4], mask.numpy()[..., 3], atol=1e-5)

    root = str(tiny_root)
    assert main(["tune", "--bundle", cfg.bundle, "--set", f"data.root={root}", "--rounds", "1",
                 "--cache-size", "16", "80", "--no-full-check"]) == 0
    th = bundle_thresholds(cfg.bundle)
    assert_search_rose(th["validation"]["before"], th["validation"]["after"], th["validation"]["changes"])
    assert th["validation"]["n_images"] >= 2
    out = tmp_path / "scores"
    rc = main(["score", "--bundle", cfg.bundle, "--images", f"{root}/train_images", "--out", str(out),
               "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    n_images = len(list((tiny_root / "train_images").iterdir()))
    assert f"{n_images} scored, 0 errors" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gating"]["images"] == n_images
    assert manifest["gating"]["forward_passes"] == n_images  # one pass per image (no TTA)
    from steel.score import merge

    s = merge.merge(str(out), str(tmp_path / "submission.csv"))
    assert (s["images"], s["rows"], s["errors"]) == (n_images, 4 * n_images, 0)
    sub = pd.read_csv(tmp_path / "submission.csv", dtype={"EncodedPixels": str}, keep_default_na=False)
    for r_ in sub.itertuples():
        if r_.EncodedPixels:
            rle.decode(r_.EncodedPixels)  # valid RLE
