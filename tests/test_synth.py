"""Synthetic Severstal-like dataset (steel.data.synth): layout, frequencies, masks, determinism, CLI."""

from __future__ import annotations

import filecmp
import os
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from steel.cli import main
from steel.core.names import SEED_AREAS, SHAPE
from steel.data import rle
from steel.data.synth import quotas, render, write

ID_RE = re.compile(r"^[0-9a-f]{9}\.jpg$")


@pytest.fixture(scope="module")
def d400(tmp_path_factory):
    """400 training + 20 test images, generated once for this module."""
    out = tmp_path_factory.mktemp("synth") / "d400"
    summary = write.generate(str(out), images=400, test_images=20, seed=0, workers=2, progress=False)
    train = pd.read_csv(out / "train.csv", keep_default_na=False)
    truth = pd.read_csv(out / "test_truth.csv", keep_default_na=False)
    return out, summary, train, truth


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _same_tree(a, b) -> bool:
    for sub in ("train_images", "test_images"):
        if _files(a / sub) != _files(b / sub):
            return False
        if not all(filecmp.cmp(a / sub / n, b / sub / n, shallow=False) for n in _files(a / sub)):
            return False
    return all(filecmp.cmp(a / f, b / f, shallow=False)
               for f in ("train.csv", "test_truth.csv", "sample_submission.csv", write.MARKER))


# ---------------------------------------------------------------------------------------------
# The 400-image set


def test_kaggle_layout(d400):
    out, summary, train, truth = d400
    train_ids, test_ids = _files(out / "train_images"), _files(out / "test_images")
    assert len(train_ids) == 400 and len(test_ids) == 20
    assert all(ID_RE.match(i) for i in train_ids + test_ids)
    assert len(set(train_ids) | set(test_ids)) == 420  # unique over both splits
    assert list(train.columns) == ["ImageId", "ClassId", "EncodedPixels"]
    assert list(truth.columns) == ["ImageId", "ClassId", "EncodedPixels"]
    # Defect rows only, one row per (image, class), labels only for existing images.
    for df, ids in ((train, train_ids), (truth, test_ids)):
        assert (df.EncodedPixels != "").all()
        assert set(df.ImageId) <= set(ids)
        assert not df.duplicated(["ImageId", "ClassId"]).any()
        assert set(df.ClassId) <= {1, 2, 3, 4}
    sub = pd.read_csv(out / "sample_submission.csv", keep_default_na=False)
    assert list(sub.columns) == ["ImageId", "ClassId", "EncodedPixels"]
    assert len(sub) == 4 * 20 and set(sub.ImageId) == set(test_ids)
    assert (sub.groupby("ImageId").ClassId.apply(sorted).map(tuple) == (1, 2, 3, 4)).all()
    assert (sub.EncodedPixels == "1 1").all()
    # The summary agrees with the files.
    assert summary["train"]["images"] == 400
    assert summary["train"]["defect_images"] == train.ImageId.nunique()
    assert summary["train"]["class_images"] == train.ClassId.value_counts().reindex([1, 2, 3, 4], fill_value=0).to_dict()


def test_class_frequencies_like_the_real_set(d400):
    _, _, train, _ = d400
    per_image = train.groupby("ImageId").ClassId.apply(set)
    n_defect = len(per_image)
    no_defect_share = 1 - n_defect / 400
    share = {k: per_image.map(lambda s: k in s).sum() / n_defect for k in (1, 2, 3, 4)}
    two = (per_image.map(len) == 2).sum() / n_defect
    assert abs(no_defect_share - 0.47) <= 0.06, no_defect_share
    assert abs(share[3] - 0.77) <= 0.08, share
    assert abs(share[1] - 0.13) <= 0.05, share
    assert abs(share[4] - 0.12) <= 0.05, share
    assert 0 < share[2] <= 0.07, share  # rare but present
    assert 0.02 <= two <= 0.10, two
    assert (per_image.map(len) <= 2).all()


def test_masks_valid_in_area_bounds_and_disjoint(d400):
    _, _, train, truth = d400
    for df in (train, truth):
        for image_id, rows in df.groupby("ImageId"):
            union = np.zeros(SHAPE, dtype=np.uint8)
            for cls, enc in zip(rows.ClassId, rows.EncodedPixels):
                rle.validate(enc)
                mask = rle.decode(enc)
                lo, hi = SEED_AREAS[cls]
                assert lo <= int(mask.sum()) <= hi, (image_id, cls, int(mask.sum()))
                union += mask
            assert union.max() <= 1, f"classes overlap in {image_id}"


def test_area_distributions_differ_by_class(d400):
    _, _, train, _ = d400
    areas = train.assign(area=train.EncodedPixels.map(rle.area)).groupby("ClassId").area.median()
    # Pits and cracks are small, patches large, scratches/wear in between (seed table: 3.2k/3.1k/12k/25k).
    assert areas[1] < areas[3] < areas[4]
    assert areas[2] < areas[3]


def test_images_are_grayscale_jpegs(d400):
    out, _, train, _ = d400
    for name in _files(out / "train_images")[:5] + _files(out / "test_images")[:2]:
        folder = "train_images" if (out / "train_images" / name).exists() else "test_images"
        with Image.open(out / folder / name) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (1600, 256)
            a = np.asarray(im)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
        assert 20 < a.mean() < 220 and a.std() > 3  # textured, neither black nor saturated


def test_defects_darker_or_brighter_than_surroundings_in_the_jpeg(d400):
    """After JPEG, each class-4 patch is clearly darker than the rest of its image."""
    out, _, train, _ = d400
    rows = train[train.ClassId == 4].head(5)
    assert len(rows)
    for image_id, enc in zip(rows.ImageId, rows.EncodedPixels):
        img = np.asarray(Image.open(out / "train_images" / image_id))[..., 0].astype(float)
        mask = rle.decode(enc).astype(bool)
        assert img[mask].mean() < img[~mask & (img > 40)].mean() - 20


# ---------------------------------------------------------------------------------------------
# Masks are exactly the painted pixels, visible after downscaling


@pytest.mark.parametrize("classes", [(1,), (2,), (3,), (4,), (1, 3), (3, 4), (2, 3), (1, 2)])
def test_masks_are_exactly_the_painted_pixels(classes):
    for index in range(2):
        clean, painted, masks, _ = render.render_layers(7, "train", index, classes)
        assert set(masks) == set(classes)
        union = np.zeros(SHAPE, dtype=bool)
        for m in masks.values():
            assert not (union & m).any()
            union |= m
        diff = np.abs(painted - clean)
        assert ((diff > 0) == union).all()
        assert diff[union].min() >= 6 - 1e-3
        for cls, m in masks.items():
            # Downscaled 4x5 (to 64x320, a training input size) the defect still changes some pixels a lot.
            d = np.where(m, diff, 0).reshape(64, 4, 320, 5).mean(axis=(1, 3))
            assert d.max() >= 20, (classes, index, cls, d.max())


def test_label_plan_has_exact_quotas():
    plan = quotas.plan_labels(1000, 3, "train")
    assert len(plan) == 1000
    defect = [p for p in plan if p]
    assert len(defect) == 530
    counts = {k: sum(k in p for p in defect) for k in (1, 2, 3, 4)}
    assert abs(counts[3] / 530 - 0.77) < 0.01 and abs(counts[1] / 530 - 0.13) < 0.01
    assert abs(counts[4] / 530 - 0.12) < 0.01 and abs(counts[2] / 530 - 0.035) < 0.01
    assert quotas.plan_labels(1000, 3, "train") == plan
    assert quotas.plan_labels(1000, 4, "train") != plan


# ---------------------------------------------------------------------------------------------
# Determinism, CLI, arguments, output handling


def test_deterministic_for_a_seed_regardless_of_workers(tmp_path):
    write.generate(str(tmp_path / "a"), images=6, test_images=2, seed=11, workers=1, progress=False)
    write.generate(str(tmp_path / "b"), images=6, test_images=2, seed=11, workers=2, progress=False)
    assert _same_tree(tmp_path / "a", tmp_path / "b")


def test_different_seeds_differ(tmp_path):
    write.generate(str(tmp_path / "a"), images=3, test_images=1, seed=1, workers=1, progress=False)
    write.generate(str(tmp_path / "b"), images=3, test_images=1, seed=2, workers=1, progress=False)
    assert set(_files(tmp_path / "a" / "train_images")).isdisjoint(_files(tmp_path / "b" / "train_images"))
    g1, _ = render.render(1, "train", 0, (3,))
    g2, _ = render.render(2, "train", 0, (3,))
    assert (g1 != g2).mean() > 0.5


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["synth", str(out), "--images", "3", "--test-images", "1", "--seed", "4", "--workers", "1",
               "--no-progress"])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("synth: 3 train images") and str(out) in line and "\n" not in line
    assert len(_files(out / "train_images")) == 3 and len(_files(out / "test_images")) == 1
    # Same seed through the Python API gives the same files.
    write.generate(str(tmp_path / "api"), images=3, test_images=1, seed=4, workers=1, progress=False)
    assert _same_tree(out, tmp_path / "api")


@pytest.mark.parametrize("argv, message", [
    (["--images", "-3"], "--images must be >= 1"),
    (["--test-images", "-1"], "--test-images must be >= 0"),
    (["--seed", "-5"], "--seed must be >= 0"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--images", "many"], "--images must be an integer"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["synth", str(tmp_path / "x"), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"images": -1}, "images must be >= 1"),
    ({"images": 0}, "images must be >= 1"),
    ({"test_images": -2}, "test_images must be >= 0"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"workers": 0}, "workers must be >= 1"),
    ({"images": 2.5}, "images must be an integer"),
])
def test_generate_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write.generate(str(tmp_path / "x"), **{"images": 2, "test_images": 0, "progress": False, **kwargs})
    assert not (tmp_path / "x").exists()


def test_refuses_to_overwrite_another_dataset_but_regenerates_its_own(tmp_path):
    foreign = tmp_path / "kaggle"
    (foreign / "train_images").mkdir(parents=True)
    (foreign / "train_images" / "0002cc93b.jpg").write_bytes(b"real data")
    (foreign / "train.csv").write_text("ImageId,ClassId,EncodedPixels\n")
    with pytest.raises(ValueError, match="not written by 'steel synth'"):
        write.generate(str(foreign), images=2, test_images=0, workers=1, progress=False)
    assert (foreign / "train_images" / "0002cc93b.jpg").read_bytes() == b"real data"

    ours = tmp_path / "ours"
    write.generate(str(ours), images=4, test_images=2, seed=0, workers=1, progress=False)
    write.generate(f"file://{ours}", images=2, test_images=1, seed=1, workers=1, progress=False)
    assert len(_files(ours / "train_images")) == 2 and len(_files(ours / "test_images")) == 1
    assert set(pd.read_csv(ours / "train.csv").ImageId) <= set(_files(ours / "train_images"))


def test_writes_to_s3(tmp_path, s3_bucket):
    from steel.core import storage

    uri = f"s3://{s3_bucket}/synth"
    summary = write.generate(uri, images=3, test_images=1, seed=5, workers=1, progress=False)
    assert summary["out"] == uri
    local = tmp_path / "local"
    write.generate(str(local), images=3, test_images=1, seed=5, workers=1, progress=False)
    names = [storage.basename(u) for u in storage.list_files(storage.join(uri, "train_images"))]
    assert names == _files(local / "train_images")
    assert storage.read_bytes(storage.join(uri, "train_images", names[0])) == \
        (local / "train_images" / names[0]).read_bytes()
    for f in ("train.csv", "test_truth.csv", "sample_submission.csv"):
        assert storage.read_text(storage.join(uri, f)) == (local / f).read_text()
    # Regenerating over its own prefix replaces the set.
    write.generate(uri, images=2, test_images=0, seed=6, workers=1, progress=False)
    assert len(storage.list_files(storage.join(uri, "train_images"))) == 2
    assert storage.list_files(storage.join(uri, "test_images")) == []
