"""steel eda: tables, area thresholds and plots of a small dataset written here (Kaggle layout)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from steel.cli import main
from steel.core import storage
from steel.core.names import SHAPE
from steel.data import rle

H, W = SHAPE

# (image, class) -> rectangle (y0, y1, x0, x1). No class 2 anywhere: the report must cope.
DEFECTS = {
    ("img1.jpg", 1): (0, 10, 0, 20),          # 200 px
    ("img2.jpg", 1): (100, 130, 200, 230),    # 900 px
    ("img2.jpg", 3): (50, 100, 600, 700),     # 5,000 px
    ("img3.jpg", 3): (10, 30, 40, 80),        # 800 px
    ("img4.jpg", 3): (0, 100, 1000, 1300),    # 30,000 px
    ("img5.jpg", 4): (100, 160, 1200, 1400),  # 12,000 px
    ("img7.jpg", 1): (200, 205, 5, 13),       # 40 px
    ("img7.jpg", 4): (0, 256, 1500, 1600),    # 25,600 px
}
IMAGES = [f"img{i}.jpg" for i in range(8)]  # img0 and img6 have no defect


def _mask(box):
    m = np.zeros((H, W), np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 1
    return m


def _area(box):
    return (box[1] - box[0]) * (box[3] - box[2])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eda_data")
    (root / "train_images").mkdir()
    rng = np.random.default_rng(0)
    for name in IMAGES:
        img = rng.normal(120, 10, (H, W)) + np.linspace(-20, 20, W)[None, :]
        for (iid, _), box in DEFECTS.items():
            if iid == name:
                img[_mask(box).astype(bool)] -= 60
        grey = np.clip(img, 0, 255).astype(np.uint8)
        Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(root / "train_images" / name, quality=80)
    rows = [(iid, k, rle.encode(_mask(box))) for (iid, k), box in DEFECTS.items()]
    pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"]).to_csv(root / "train.csv", index=False)
    return root


@pytest.fixture(scope="module")
def report(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eda_out") / "report"
    assert main(["eda", str(data), "--out", str(out), "--samples", "1"]) == 0
    return out


def test_numbers(report):
    s = json.loads((report / "summary.json").read_text())
    assert s["n_images"] == 8 and s["split"] == "all"
    assert s["images_per_class"] == {"1": 3, "2": 0, "3": 3, "4": 2}
    assert s["labels_per_image"] == {"0": 2, "1": 4, "2": 2}

    stats = pd.read_csv(report / "area_stats.csv", index_col="class")
    assert list(stats.columns) == ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    class3 = np.array([5000, 800, 30000], float)
    assert stats.loc["Defect_3", "count"] == 3
    assert stats.loc["Defect_3", "mean"] == pytest.approx(class3.mean())
    assert stats.loc["Defect_3", "std"] == pytest.approx(class3.std(ddof=1))
    assert stats.loc["Defect_3", "50%"] == 5000 and stats.loc["Defect_3", "max"] == 30000
    assert stats.loc["Defect_2", "count"] == 0

    thresholds = json.loads((report / "area_thresholds.json").read_text())
    assert set(thresholds) == {"1", "3", "4"}  # no class 2 examples -> left out
    for k in (1, 3, 4):
        areas = [_area(b) for (_, c), b in DEFECTS.items() if c == k]
        lo, hi = np.percentile(areas, [2, 98])
        assert thresholds[str(k)] == {"min_area": int(np.floor(lo)), "max_area": int(np.ceil(hi))}


def test_thresholds_file_is_what_the_cascade_reads(report):
    from steel.core.names import SEED_AREAS
    from steel.model.thresholds import from_area_json

    t = from_area_json(str(report / "area_thresholds.json"))
    assert t["classes"]["3"]["max_area"] == json.loads((report / "area_thresholds.json").read_text())["3"]["max_area"]
    assert (t["classes"]["2"]["min_area"], t["classes"]["2"]["max_area"]) == SEED_AREAS[2]


def test_plots_and_report_page(report):
    pngs = ["class_distribution.png", "labels_per_image.png", "area_histograms.png",
            "samples_class_1.png", "samples_class_3.png", "samples_class_4.png"]
    for name in pngs:
        with Image.open(report / name) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 200, name
    assert not (report / "samples_class_2.png").exists()
    # Sample images keep the 256 x 1600 aspect: one image ~1570 px wide, ~250 px high.
    with Image.open(report / "samples_class_1.png") as im:
        assert im.width >= 1500 and 230 < im.height < 330 + 120
    page = (report / "report.md").read_text()
    for name in pngs:
        assert f"]({name})" in page
    assert "No image has a class 2 defect." in page
    assert "| Defect_3 | 3 |" in page
    assert "whole train.csv" in page
    assert "2nd / 98th percentile" in page


def test_overlay_colours_masks_only():
    from steel.core import figures

    img = np.full((4, 6), 100, np.uint8)
    m = np.zeros((4, 6), np.uint8)
    m[1:3, 2:4] = 1
    out = figures.paint(img, {1: m})
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 100).all()
    r, g, b = out[1, 2]
    assert r > 100 and g < 100 and b < 100  # class 1 is red


def test_split_train_and_combined_layout(data, tmp_path, capsys):
    # Same data in the original 4-rows-per-image layout, restricted to the seed's train split.
    from steel.data import labels as dataset
    from steel.data.submission import read_rows, to_kaggle

    copy = tmp_path / "data"
    storage.copy_local_dir_to(str(data), str(copy))
    rows = read_rows(str(data / "train.csv"))
    to_kaggle(rows, layout="combined", images=IMAGES).to_csv(copy / "train.csv", index=False)
    out = tmp_path / "out"
    assert main(["eda", str(copy), "--out", str(out), "--split", "train", "--samples", "0"]) == 0
    s = json.loads((out / "summary.json").read_text())
    train = dataset.split(dataset.load_labels(str(data / "train.csv"), images=IMAGES))["train"]
    assert s["layout"] == "combined" and s["split"] == "train"
    assert s["n_images"] == len(train) == 5 and s["n_images_total"] == 8
    assert sum(s["images_per_class"].values()) == int(train[[f"hasDefect_{k}" for k in (1, 2, 3, 4)]].sum().sum())
    assert "train split" in (out / "report.md").read_text()
    assert not list(out.glob("samples_class_*.png"))
    assert "images (train split of 8 images" in capsys.readouterr().out


def test_bad_labels_fail_or_are_skipped_with_report(data, tmp_path, capsys):
    copy = tmp_path / "data"
    storage.copy_local_dir_to(str(data), str(copy))
    with open(copy / "train.csv", "a") as fh:
        fh.write("img0.jpg,9,1 1\nghost.jpg,1,1 1\n")
    out = tmp_path / "out"
    assert main(["eda", str(copy), "--out", str(out), "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "row 10: ImageId='img0.jpg' ClassId='9': unknown class" in err
    assert "row 11: ImageId='ghost.jpg' ClassId='1': image not in the image listing" in err
    assert main(["eda", str(copy), "--out", str(out), "--samples", "0", "--skip-bad"]) == 0
    skipped = pd.read_csv(out / "skipped_labels.csv")
    assert skipped["row"].tolist() == [10, 11]
    assert json.loads((out / "summary.json").read_text())["skipped_rows"] == 2
    assert "2 bad label rows were skipped" in (out / "report.md").read_text()
