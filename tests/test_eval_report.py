"""Evaluation report: numbers against hand-computed values, and every file written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from steel.core.names import SHAPE
from steel.data import rle
from steel.eval.report import confusion, pick_overlays, presence, write_report

H, W = SHAPE


def box(r0, r1, c0, c1) -> str:
    m = np.zeros((H, W), np.uint8)
    m[r0:r1, c0:c1] = 1
    return rle.encode(m)


def frames():
    """4 images. a: class 1 exact; b: class 3 half overlap; c: clean, predicted class 2 (FP);
    d: class 4 missed (FN)."""
    truth = pd.DataFrame([
        {"ImageId": "a.jpg", "ClassId": 1, "EncodedPixels": box(0, 100, 0, 100)},
        {"ImageId": "b.jpg", "ClassId": 3, "EncodedPixels": box(0, 100, 0, 200)},
        {"ImageId": "d.jpg", "ClassId": 4, "EncodedPixels": box(50, 150, 500, 700)},
    ])
    pred = pd.DataFrame([
        {"ImageId": img, "ClassId": k, "EncodedPixels": ""} for img in ("a.jpg", "b.jpg", "c.jpg", "d.jpg")
        for k in range(1, 5)])
    pred.loc[(pred.ImageId == "a.jpg") & (pred.ClassId == 1), "EncodedPixels"] = box(0, 100, 0, 100)
    pred.loc[(pred.ImageId == "b.jpg") & (pred.ClassId == 3), "EncodedPixels"] = box(0, 100, 100, 300)
    pred.loc[(pred.ImageId == "c.jpg") & (pred.ClassId == 2), "EncodedPixels"] = box(0, 10, 0, 10)
    return pred, truth


def test_presence_and_confusion():
    pred, truth = frames()
    images = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    yt, yp = presence(truth, images), presence(pred, images)
    assert yt.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert yp.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    c = confusion(yt, yp)
    assert c["any"] == {"tn": 0, "fp": 1, "fn": 1, "tp": 2, "precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3)}
    assert (c["2"]["fp"], c["2"]["tn"]) == (1, 3)
    assert (c["4"]["fn"], c["4"]["tp"], c["4"]["recall"]) == (1, 0, 0.0)


def test_write_report_files_and_numbers(tmp_path):
    cv2 = pytest.importorskip("cv2")
    pred, truth = frames()
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):  # d.jpg missing: its overlay is drawn on grey
        cv2.imwrite(str(images / name), np.full((H, W, 3), 128, np.uint8))
    out = tmp_path / "report"
    s = write_report(pred, truth, str(images), str(out), n_overlays=2)
    # Dice per pair: a 4 x 1; b: class 3 = 0.5, others 1; c: class 2 = 0, others 1; d: class 4 = 0, others 1.
    assert s["mean_dice"] == pytest.approx((16 - 0.5 - 1 - 1) / 16)
    assert s["per_class"] == {"1": 1.0, "2": 0.75, "3": pytest.approx(0.875), "4": 0.75}
    assert s["n_images"] == 4
    assert s["classification_report"]["multilabel"]["Defect_1"]["precision"] == 1.0
    assert [o["ImageId"] for o in s["overlays"]["worst"]] == ["c.jpg", "d.jpg"]
    assert [o["ImageId"] for o in s["overlays"]["best"]] == ["a.jpg", "b.jpg"]
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == sorted(["report.md", "metrics.json", "per_image.csv", "confusion.png",
                            "overlays/worst_1_c.jpg.png", "overlays/worst_2_d.jpg.png",
                            "overlays/best_1_a.jpg.png", "overlays/best_2_b.jpg.png"])
    md = (out / "report.md").read_text()
    assert "0.8438" in md and "classification report" in md.lower() and "(overlays/worst_1_c.jpg.png)" in md
    assert "| class 2 | 3 | 1 | 0 | 0 |" in md
    assert json.loads((out / "metrics.json").read_text())["mean_dice"] == pytest.approx(s["mean_dice"])
    per_image = pd.read_csv(out / "per_image.csv")
    assert per_image.set_index("ImageId").loc["b.jpg", "dice_3"] == pytest.approx(0.5)
    png = cv2.imdecode(np.frombuffer((out / "overlays/worst_1_c.jpg.png").read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert png.shape[1] == W and png.shape[0] > 3 * H
    # The prediction panel (third image panel) paints class 2 green at the top-left; truth panel doesn't.
    pred_panel_y = 22 + 3 * (22 + H) - H + 5
    truth_panel_y = 22 + 2 * (22 + H) - H + 5
    b, g, r = png[pred_panel_y, 5].astype(int)
    assert g > r + 30 and g > b + 30
    assert tuple(png[truth_panel_y, 5]) == (128, 128, 128)


def test_pick_overlays_prefers_images_with_defects_for_best():
    per_image = pd.DataFrame({"ImageId": ["x", "y", "z", "w"], "mean_dice": [1.0, 0.9, 0.2, 1.0],
                              "truth_classes": [0, 1, 1, 0]})
    worst, best = pick_overlays(per_image, 1)
    assert worst == ["z"] and best == ["y"]


def test_write_report_rejects_truth_images_missing_from_submission(tmp_path):
    pred, truth = frames()
    with pytest.raises(ValueError, match="not in pred"):
        write_report(pred[pred.ImageId != "d.jpg"], truth, None, str(tmp_path / "r"))


def test_steel_evaluate_report_option(tmp_path, capsys):
    from steel.cli import main

    pred, truth = frames()
    pred.to_csv(tmp_path / "sub.csv", index=False)
    truth.to_csv(tmp_path / "truth.csv", index=False)
    rc = main(["evaluate", "--submission", str(tmp_path / "sub.csv"), "--truth", str(tmp_path / "truth.csv"),
               "--report", str(tmp_path / "rep")])
    assert rc == 0
    assert "report:" in capsys.readouterr().out
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "confusion.png").exists()
    # 4 worst (every image) + the 3 images with a true defect as best
    assert len(list((tmp_path / "rep" / "overlays").glob("*.png"))) == 7
