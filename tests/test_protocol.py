"""The seed's per-split tables (steel.eval.protocol): numbers from exact tables, sampling, text and Markdown."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from steel.core.names import SHAPE
from steel.data import rle
from steel.eval import protocol
from steel.eval.predictions import PredictionCache
from steel.model.thresholds import default_thresholds

H, W = SHAPE


def test_classifier_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_score, recall_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.6 + rng.random(200) * 0.5, 0, 1)
    m = protocol.classifier_metrics(y, p)
    pred = p > 0.5
    assert m["loss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), rel=1e-6)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    # multi-label entries all count (micro), and 0.5 itself is not positive (tf.round(0.5) == 0)
    m2 = protocol.classifier_metrics(np.array([[1, 0], [1, 1]]), np.array([[0.5, 0.1], [0.9, 0.8]]))
    assert m2["n"] == 4 and m2["recall"] == pytest.approx(2 / 3) and m2["precision"] == 1.0
    assert np.isnan(protocol.classifier_metrics(np.zeros(0), np.zeros(0))["loss"])


def _cache() -> PredictionCache:
    """4 images at one pixel threshold (0.5): 0 clean and predicted clean; 1 class-1 defect found exactly;
    2 clean with a 600-pixel false class-3 mask; 3 class-3 defect (4000 px) predicted as 2000 px inside it."""
    n = 4
    truth_area = np.zeros((n, 4), np.int64)
    area = np.zeros((n, 4, 1), np.int64)
    inter = np.zeros((n, 4, 1), np.int64)
    truth_area[1, 0] = area[1, 0, 0] = inter[1, 0, 0] = 5000
    area[2, 2, 0] = 600
    truth_area[3, 2], area[3, 2, 0], inter[3, 2, 0] = 4000, 2000, 2000
    soft = np.zeros((n, 4, 3))
    soft[1, 0] = (90.0, 100.0, 100.0)  # class-1 U-Net: (2*90 + 1) / (100 + 100 + 1)
    soft[3, 2] = (10.0, 20.0, 40.0)
    p_defect = np.array([0.1, 0.9, 0.7, 0.8], np.float32)
    p_class = np.array([[0.1] * 4, [0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.9, 0.1], [0.1, 0.1, 0.6, 0.1]], np.float32)
    return PredictionCache([f"{i}.jpg" for i in range(n)], p_defect, p_class, {}, {}, truth_area,
                           full_edges=np.array([0.5], np.float32), full_area=area, full_inter=inter, full_soft=soft)


def test_split_tables_from_exact_tables():
    wide_open = default_thresholds()
    for c in wide_open["classes"].values():
        c.update(min_area=0, max_area=H * W)
    seed = default_thresholds()  # class 3 min_area 1100: drops the 600-pixel false mask
    t = protocol.split_tables(_cache(), {"deployed": wide_open, "seed": seed})
    assert t["n_images"] == 4
    b = t["models"]["binary"]
    assert b["images"] == 4 and b["accuracy"] == pytest.approx(0.75) and b["precision"] == pytest.approx(2 / 3)
    assert b["recall"] == 1.0
    ml = t["models"]["multilabel"]
    assert ml["images"] == 2 and ml["n"] == 8 and ml["accuracy"] == 1.0  # images 1 and 3: all 8 entries right
    assert t["models"]["seg1"]["dice"] == pytest.approx(181 / 201)
    assert t["models"]["seg3"]["dice"] == pytest.approx(21 / 61) and t["models"]["seg3"]["images"] == 1
    assert np.isnan(t["models"]["seg2"]["dice"]) and t["models"]["seg2"]["images"] == 0
    d = t["cascade"]["deployed"]
    # class 3: image 2 scores 0 (false mask), image 3 scores 2*2000/6000; classes 1, 2, 4 all right
    assert d["per_class"]["3"] == pytest.approx((1 + 0 + 1 + 2 / 3) / 4)
    assert d["mean_dice"] == pytest.approx((3 + (1 + 0 + 1 + 2 / 3) / 4) / 4)
    assert d["confusion"]["3"] == {**d["confusion"]["3"], "tp": 1, "fp": 1, "fn": 0, "tn": 2}
    assert d["baseline_all_empty"] == pytest.approx((3 / 4 + 1 + 3 / 4 + 1) / 4)
    s = t["cascade"]["seed"]
    assert s["per_class"]["3"] == pytest.approx((1 + 1 + 1 + 2 / 3) / 4) and s["confusion"]["3"]["fp"] == 0
    assert "Defect_3" in s["classification_text"]


def test_split_tables_need_exact_tables():
    c = _cache()
    c.full_soft = None
    with pytest.raises(ValueError, match="exact full-resolution tables"):
        protocol.split_tables(c, {"deployed": default_thresholds()})


def test_reusable_needs_same_models_images_and_pixels():
    key = {"models": "m", "tta": "none", "labels": "l", "cache_size": None, "pixels": [0.5]}
    c = _cache()
    c.meta = {"key": {**key, "pixels": [0.3, 0.5, 0.55]}}
    assert protocol.reusable(c, key, [0.5])
    assert not protocol.reusable(c, key, [0.5, 0.6])  # a pixel threshold the tables lack
    for name in ("models", "tta", "labels"):
        assert not protocol.reusable(c, {**key, name: "other"}, [0.5]), name
    c.full_soft = None
    assert not protocol.reusable(c, key, [0.5])


def test_sample_is_seeded_and_capped():
    table = pd.DataFrame({"ImageId": [f"{i:03d}.jpg" for i in range(50)]})
    assert protocol.sample(table, None) is table and protocol.sample(table, 60) is table
    a, b = protocol.sample(table, 10, seed=42), protocol.sample(table, 10, seed=42)
    assert len(a) == 10 and a["ImageId"].tolist() == b["ImageId"].tolist() == sorted(a["ImageId"])
    assert a["ImageId"].tolist() != protocol.sample(table, 10, seed=1)["ImageId"].tolist()


def test_tables_as_text_and_markdown():
    t = protocol.split_tables(_cache(), {"deployed": default_thresholds()})
    t.update(split="test", of=9, sampled=True, skipped=[])
    result = {"splits": {"test": t}, "kind": "unified", "max_images": 4, "thresholds": {}}
    text = protocol.format_text(result)
    assert "4 of 9 (sampled)" in text and "unified: mask channel 3" in text and "deployed" in text
    md = "\n".join(protocol.markdown(result))
    assert "## The seed's protocol" in md and "at most 4 images per split" in md
    assert "| test | 4 of 9 (sampled) | deployed |" in md and "test split, deployed thresholds" in md


@pytest.mark.timeout(300)
def test_evaluate_splits_on_ray_actors_equals_the_deployed_cascade(tmp_path, ray_local):
    """One pass per split on Ray actors; the cascade's Dice from the exact tables is the Dice of the masks
    scoring's own actor writes (steel.tune.run.full_resolution_dice), for tuned-like and seed thresholds."""
    import sys

    import ray.cloudpickle

    cv2 = pytest.importorskip("cv2")
    from steel.core.config import ScoreConfig
    from steel.eval.predictions import full_resolution_dice
    from tests import test_tuning
    from tests.test_tuning import StubCascade

    images = tmp_path / "train_images"
    images.mkdir()
    left = np.zeros((H, W), np.uint8)
    left[:, :200] = 1  # truth wider than the stub's 160 columns: Dice below 1
    rows = []
    for i in range(8):
        name = f"img{i}.jpg"
        cv2.imwrite(str(images / name), np.full((H, W, 3), 20 * (i + 1), np.uint8))
        row = {"ImageId": name, **{f"Defect_{k}": "" for k in range(1, 5)}}
        if i % 2 == 0:
            row[f"Defect_{(i // 2) % 4 + 1}"] = rle.encode(left)
        rows.append(row)
    labels = pd.DataFrame(rows)
    tuned = default_thresholds()
    tuned["binary"] = 0.8
    for c in tuned["classes"].values():
        c.update(min_area=0, max_area=H * W, pixel=0.6)
    seed = default_thresholds()
    cfg = ScoreConfig(actors=1, batch_size=3)
    ray.cloudpickle.register_pickle_by_value(sys.modules[test_tuning.__name__])
    try:
        result = protocol.evaluate_splits({"val": labels.iloc[:5], "test": labels}, str(images), StubCascade("unused", tuned),
                                          {"deployed": tuned, "seed": seed}, cfg, max_images=6, seed=1)
        t = result["splits"]["test"]
        assert t["n_images"] == 6 and t["of"] == 8 and t["sampled"] and result["splits"]["val"]["n_images"] == 5
        chosen = labels[labels["ImageId"].isin(protocol.sample(labels, 6, 1)["ImageId"])]
        for name, th in (("deployed", tuned), ("seed", seed)):
            deployed = full_resolution_dice(StubCascade("unused", th), chosen, str(images), cfg)
            assert t["cascade"][name]["mean_dice"] == pytest.approx(deployed["mean_dice"], abs=1e-9), name
            for k in "1234":
                assert t["cascade"][name]["per_class"][k] == pytest.approx(deployed["per_class"][k], abs=1e-9)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[test_tuning.__name__])
    assert t["cascade"]["deployed"]["mean_dice"] != t["cascade"]["seed"]["mean_dice"]
    # stub binary: 0.9 on defect images, 0.78 on clean ones: all positive at 0.5
    share = float((chosen[[f"Defect_{k}" for k in range(1, 5)]] != "").any(axis=1).mean())
    assert t["models"]["binary"]["accuracy"] == pytest.approx(share) and t["models"]["binary"]["recall"] == 1.0
    seg = [t["models"][f"seg{k}"] for k in range(1, 5) if t["models"][f"seg{k}"]["images"]]
    assert seg and all(0.5 < m["dice"] < 1 for m in seg)  # the stub marks 160 of the truth's 200 columns


def test_final_line_names_the_split():
    from steel.pipeline import final_line

    t = protocol.split_tables(_cache(), {"deployed": default_thresholds(), "seed": default_thresholds()})
    t.update(split="test", of=4, sampled=False, skipped=[])
    line = final_line({"splits": {"val": t, "test": t}}, {"n_images": 9, "mean_dice": 0.5, "baseline_all_empty": 0.4}, 60)
    assert line.strip().startswith("mean Dice of the cascade on the test split (4 labelled images, held out")
    assert f"{t['cascade']['deployed']['mean_dice']:.4f}, seed's fixed thresholds" in line
    assert "on the val split (4 labelled images)" in final_line({"splits": {"val": t}}, None, 60)
    assert "separate test set (9 images" in final_line(None, {"n_images": 9, "mean_dice": 0.5,
                                                              "baseline_all_empty": 0.4}, 60)


def test_pipeline_evaluate_stage_reuses_tunings_predictions(tmp_path, monkeypatch):
    """The evaluate stage runs protocol on the labelled val split with tuning's saved predictions (the same
    models, TTA and images: no second pass), scores the deployed and the seed's thresholds, and writes
    protocol/metrics.json. The numbers are worked out by hand from :func:`_cache`."""
    import json

    from steel import pipeline
    from steel.core import ray_session
    from steel.core.config import load_config
    from steel.eval import predictions
    from steel.tune import run as tuning

    cfg = load_config(None, [f"bundle={tmp_path / 'bundle'}", f"report={tmp_path / 'report'}",
                             f"data.root={tmp_path / 'data'}", "evaluate.splits=[val]"])
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text(json.dumps({"format_version": 1, "models": {"unified": {"sha256": "ab", "spec": {}}}}))
    tuned = default_thresholds()
    tuned["binary"] = 0.7
    (tmp_path / "bundle" / "thresholds.json").write_text(json.dumps(tuned))
    val = pd.DataFrame({"ImageId": [f"{i}.jpg" for i in range(4)], **{f"Defect_{k}": "" for k in range(1, 5)}})
    cache = _cache()
    cache.meta["key"] = predictions.cache_key(predictions.bundle_identity(str(tmp_path / "bundle")), "none", None, val)

    def no_second_pass(*a, **k):
        raise AssertionError("the val split was predicted again instead of reusing tuning's predictions")

    monkeypatch.setattr(predictions, "predict_cache", no_second_pass)
    monkeypatch.setattr(ray_session, "ensure_ray_for_actors", lambda *a: None)
    monkeypatch.setattr(tuning, "fixed_thresholds", lambda cfg: default_thresholds())
    p = pipeline.Pipeline(cfg)
    p.state["splits"] = {"train": val.iloc[:0], "val": val, "test": val.iloc[:0]}
    cache.save(p._val_cache)  # what the tune stage leaves
    try:
        skipped, summary, out = p.evaluate()
    finally:
        import shutil

        shutil.rmtree(p._tmp)  # run() removes it; evaluate() alone does not
    assert not skipped and "val split (4 images, tuning predictions reused)" in summary
    tables = out["protocol"]["splits"]["val"]
    # Images 0-2 score 1 in every class (image 2's 600-pixel false mask is below class 3's min_area 1100);
    # image 3's class-3 mask covers 2000 of its 4000 pixels: Dice 2 * 2000 / 6000.
    class3 = (3 + 2 * 2000 / 6000) / 4
    for name in ("deployed", "seed"):
        assert tables["cascade"][name]["per_class"] == pytest.approx({"1": 1.0, "2": 1.0, "3": class3, "4": 1.0})
        assert tables["cascade"][name]["mean_dice"] == pytest.approx((3 + class3) / 4)
    assert tables["cascade"]["deployed"]["baseline_all_empty"] == pytest.approx(14 / 16)  # 2 of 16 pairs have a defect
    assert out["protocol"]["thresholds"]["deployed"]["binary"] == 0.7 and out["protocol"]["kind"] == "unified"
    written = json.loads((tmp_path / "report" / "protocol" / "metrics.json").read_text())
    assert written["splits"]["val"]["cascade"]["seed"]["mean_dice"] == pytest.approx((3 + class3) / 4)
