"""steel evaluate: mean Dice of a submission against truth, as text or JSON."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from steel.cli import main
from steel.data import rle
from steel.eval.evaluate import evaluate

SHAPE = (32, 64)  # small images keep the RLEs short; --shape passes it to the command


def _rle(y0, y1, x0, x1):
    m = np.zeros(SHAPE, np.uint8)
    m[y0:y1, x0:x1] = 1
    return rle.encode(m)


# Truth (defect rows only): a.jpg class 1 = a 10x10 square; b.jpg class 3; c.jpg has no defect.
TRUTH = [("a.jpg", 1, _rle(0, 10, 0, 10)), ("b.jpg", 3, _rle(5, 15, 20, 40))]
# Prediction: a.jpg class 1 covers half the square (dice 2*50/(50+100) = 2/3); b.jpg exact;
# c.jpg predicts a false class-2 defect (dice 0); everything else empty (dice 1).
PRED = [("a.jpg", 1, _rle(0, 10, 0, 5)), ("b.jpg", 3, _rle(5, 15, 20, 40)), ("c.jpg", 2, _rle(0, 1, 0, 1))]
IMAGES = ["a.jpg", "b.jpg", "c.jpg"]
EXPECTED_PER_CLASS = {"1": (2 / 3 + 1 + 1) / 3, "2": (1 + 1 + 0) / 3, "3": 1.0, "4": 1.0}
EXPECTED_MEAN = (10 + 2 / 3) / 12


def _long(rows, images=None, path=None):
    """Kaggle long layout; with ``images``, 4 rows per image (empty for none)."""
    df = pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])
    if images is not None:
        from steel.data.submission import to_kaggle

        df = to_kaggle(df, images=images)
    df.to_csv(path, index=False)
    return str(path)


def _combined(rows, images, path):
    got = {(i, c): p for i, c, p in rows}
    lines = ["ImageId_ClassId,EncodedPixels"] + [f"{i}_{c},{got.get((i, c), '')}" for i in images for c in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _run(capsys, *argv):
    rc = main(["evaluate", *argv, "--shape", str(SHAPE[0]), str(SHAPE[1])])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("sub_layout", ["long", "combined"])
@pytest.mark.parametrize("truth_layout", ["defects_only", "combined"])
def test_json_output_both_layouts(tmp_path, capsys, sub_layout, truth_layout):
    sub = (_long(PRED, IMAGES, tmp_path / "sub.csv") if sub_layout == "long"
           else _combined(PRED, IMAGES, tmp_path / "sub.csv"))
    truth = (_long(TRUTH, path=tmp_path / "truth.csv") if truth_layout == "defects_only"
             else _combined(TRUTH, IMAGES, tmp_path / "truth.csv"))
    rc, out, err = _run(capsys, "--submission", sub, "--truth", truth, "--json")
    assert rc == 0, err
    got = json.loads(out)
    assert set(got) == {"mean_dice", "per_class", "n_images"}
    assert got["n_images"] == 3
    assert got["mean_dice"] == pytest.approx(EXPECTED_MEAN)
    assert list(got["per_class"]) == ["1", "2", "3", "4"]
    for k, v in EXPECTED_PER_CLASS.items():
        assert got["per_class"][k] == pytest.approx(v)


def test_text_table(tmp_path, capsys):
    sub = _long(PRED, IMAGES, tmp_path / "sub.csv")
    truth = _long(TRUTH, path=tmp_path / "truth.csv")
    rc, out, _ = _run(capsys, "--submission", sub, "--truth", truth)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"mean Dice {EXPECTED_MEAN:.4f} over 3 images (12 pairs)"
    assert lines[2].split() == ["class", "dice", "truth", "images", "predicted", "images"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[3:]}
    assert rows["1"] == [f"{EXPECTED_PER_CLASS['1']:.4f}", "1", "1"]
    assert rows["2"] == [f"{EXPECTED_PER_CLASS['2']:.4f}", "0", "1"]
    assert rows["3"] == ["1.0000", "1", "1"]
    assert rows["4"] == ["1.0000", "0", "0"]


def test_perfect_and_empty_submissions(tmp_path):
    truth = _long(TRUTH, path=tmp_path / "truth.csv")
    perfect = evaluate(_long(TRUTH, IMAGES, tmp_path / "perfect.csv"), truth, shape=SHAPE)
    assert perfect["mean_dice"] == 1.0 and perfect["n_pairs"] == 12
    empty = evaluate(_long([], IMAGES, tmp_path / "empty.csv"), truth, shape=SHAPE)
    assert empty["mean_dice"] == pytest.approx(10 / 12)
    assert empty["per_class"] == {"1": pytest.approx(2 / 3), "2": 1.0, "3": pytest.approx(2 / 3), "4": 1.0}
    assert set(empty["per_pair"].columns) == {"ImageId", "ClassId", "dice"}


def test_truth_images_missing_from_submission_are_listed(tmp_path, capsys):
    sub = _long([("a.jpg", 1, "1 1")], ["a.jpg"], tmp_path / "sub.csv")
    truth = _long(TRUTH, path=tmp_path / "truth.csv")
    rc, out, err = _run(capsys, "--submission", sub, "--truth", truth, "--json")
    assert rc == 2 and out == ""
    assert "1 truth images are missing from the submission" in err and "b.jpg" in err


def test_submission_images_unknown_to_a_full_truth_are_an_error(tmp_path):
    sub = _long(PRED, IMAGES + ["z.jpg"], tmp_path / "sub.csv")
    full_truth = _combined(TRUTH, IMAGES, tmp_path / "truth.csv")
    with pytest.raises(ValueError, match="1 submission images are not in the truth.*z.jpg"):
        evaluate(sub, full_truth, shape=SHAPE)
    # A defect-rows-only truth cannot know z.jpg: it is scored as defect-free.
    result = evaluate(sub, _long(TRUTH, path=tmp_path / "t2.csv"), shape=SHAPE)
    assert result["n_images"] == 4 and result["mean_dice"] == pytest.approx((14 + 2 / 3) / 16)


def test_bad_rows_and_bad_files_give_one_clear_error(tmp_path, capsys):
    truth = _long(TRUTH, path=tmp_path / "truth.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,9 1 2 1\nb.jpg,1,\nc.jpg,1,\n")
    rc, _, err = _run(capsys, "--submission", str(bad), "--truth", truth)
    assert rc == 2 and "row 2: ImageId='a.jpg' ClassId='1': malformed RLE" in err
    rc, _, err = _run(capsys, "--submission", str(tmp_path / "missing.csv"), "--truth", truth)
    assert rc == 2 and "missing.csv" in err
    cols = tmp_path / "cols.csv"
    cols.write_text("id,rle\na,1 1\n")
    rc, _, err = _run(capsys, "--submission", str(cols), "--truth", truth)
    assert rc == 2 and "unrecognised columns" in err


def test_shape_matters_for_validation(tmp_path):
    # 2,100 is past the end of a 32x64 image but fine for 256x1600.
    sub = _long([("a.jpg", 1, "2100 5")], ["a.jpg"], tmp_path / "sub.csv")
    truth = _long([("a.jpg", 1, "2100 5")], path=tmp_path / "truth.csv")
    assert evaluate(sub, truth)["mean_dice"] == 1.0
    with pytest.raises(ValueError, match="past the image"):
        evaluate(sub, truth, shape=SHAPE)


def test_dataframes_are_accepted():
    sub = pd.DataFrame(PRED, columns=["ImageId", "ClassId", "EncodedPixels"])
    truth = pd.DataFrame(TRUTH, columns=["ImageId", "ClassId", "EncodedPixels"])
    result = evaluate(sub, truth, shape=SHAPE)
    assert result["mean_dice"] == pytest.approx(EXPECTED_MEAN)
