"""steel.eval.metrics: Dice on masks and encodings, and the submission-level mean Dice."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from steel.core.names import SHAPE
from steel.data import rle
from steel.eval import metrics

SMALL = (16, 24)


def ref_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook Dice on decoded masks."""
    a, b = a.astype(bool), b.astype(bool)
    if not a.any() and not b.any():
        return 1.0
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def ref_mean_dice(pred: pd.DataFrame, truth: pd.DataFrame, shape) -> pd.DataFrame:
    """Decode every pair and score it: the obvious (slow) way."""
    def lookup(df):
        return {(r.ImageId, int(r.ClassId)): r.EncodedPixels for r in df.itertuples()}

    p, t = lookup(pred), lookup(truth)
    rows = []
    for image in sorted(set(pred["ImageId"])):
        for c in (1, 2, 3, 4):
            pm = rle.decode(p.get((image, c), ""), shape)
            tm = rle.decode(t.get((image, c), ""), shape)
            rows.append((image, c, ref_dice(pm, tm)))
    return pd.DataFrame(rows, columns=["ImageId", "ClassId", "dice"])


def random_mask(rng: np.random.Generator, shape, kind: int) -> np.ndarray:
    if kind == 0:
        return np.zeros(shape, np.uint8)
    if kind == 1:  # noise
        return (rng.random(shape) < rng.uniform(0.01, 0.6)).astype(np.uint8)
    mask = np.zeros(shape, np.uint8)  # a rectangle blob
    y0, x0 = rng.integers(0, shape[0]), rng.integers(0, shape[1])
    mask[y0:y0 + rng.integers(1, shape[0]), x0:x0 + rng.integers(1, shape[1])] = 1
    return mask


def random_frames(seed: int, n_images: int, shape):
    rng = np.random.default_rng(seed)
    pred_rows, truth_rows = [], []
    for i in range(n_images):
        image = f"{i:05x}.jpg"
        for c in (1, 2, 3, 4):
            truth = random_mask(rng, shape, int(rng.integers(0, 3)))
            if rng.random() < 0.5:  # a prediction near the truth: shifted by a pixel or two
                pred = np.roll(truth, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
            else:
                pred = random_mask(rng, shape, int(rng.integers(0, 3)))
            for rows, m in ((pred_rows, pred), (truth_rows, truth)):
                e = rle.encode(m)
                # Empty pairs are sometimes present as ''/NaN, sometimes absent (but every image has a
                # pred row, or it would not be scored at all).
                if e or rng.random() < 0.5 or (rows is pred_rows and c == 1):
                    rows.append((image, c, e if e or rng.random() < 0.5 else np.nan))
    columns = ["ImageId", "ClassId", "EncodedPixels"]
    pred = pd.DataFrame(pred_rows, columns=columns).sample(frac=1, random_state=seed)  # any row order
    truth = pd.DataFrame(truth_rows, columns=columns).sample(frac=1, random_state=seed + 1)
    return pred, truth


# ----------------------------------------------------------------------------------------------
# dice / dice_rle


def test_dice_edge_cases():
    empty = np.zeros((4, 5), np.uint8)
    one = empty.copy()
    one[1, 2] = 1
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.dice(one, empty) == 0.0
    assert metrics.dice(empty, one) == 0.0
    assert metrics.dice(one, one * 255) == 1.0  # any nonzero pixel is set
    two = one.copy()
    two[3, 4] = 1
    assert metrics.dice(one, two) == pytest.approx(2 * 1 / (1 + 2))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.dice(np.zeros((4, 5)), np.zeros((5, 4)))


def test_dice_rle_edge_cases():
    for empty in ("", None, float("nan"), "   "):
        assert metrics.dice_rle(empty, "", SMALL) == 1.0
    assert metrics.dice_rle("1 10", "", SMALL) == 0.0
    assert metrics.dice_rle("", "5 3", SMALL) == 0.0
    assert metrics.dice_rle("1 10", "1 10", SMALL) == 1.0
    assert metrics.dice_rle("1 10", "6 10", SMALL) == pytest.approx(2 * 5 / 20)
    assert metrics.dice_rle("1 2 5 2", "2 4", SMALL) == pytest.approx(2 * 2 / 8)  # touches both runs
    assert metrics.dice_rle("1 3 4 3", "1 6", SMALL) == 1.0  # touching runs = one long run
    with pytest.raises(rle.RLEError, match="odd number"):
        metrics.dice_rle("1 2 3", "", SMALL)
    with pytest.raises(rle.RLEError, match="past the image"):
        metrics.dice_rle("", f"{SMALL[0] * SMALL[1]} 2", SMALL)


@settings(max_examples=200, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    data=st.data(),
)
def test_dice_rle_matches_decoded_dice(shape, data):
    a = data.draw(arrays(np.uint8, shape, elements=st.integers(0, 1)))
    b = data.draw(arrays(np.uint8, shape, elements=st.integers(0, 1)))
    expected = ref_dice(a, b)
    assert metrics.dice(a, b) == pytest.approx(expected)
    assert metrics.dice_rle(rle.encode(a), rle.encode(b), shape) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# mean_dice


@pytest.mark.parametrize("seed, block", [(0, 2048), (1, 2048), (2, 4), (3, 7)])
def test_mean_dice_matches_decode_reference(seed, block, monkeypatch):
    monkeypatch.setattr(metrics, "_BLOCK_PAIRS", block)  # pairs scored a block at a time
    pred, truth = random_frames(seed, n_images=25, shape=SMALL)
    result = metrics.mean_dice(pred, truth, shape=SMALL)
    ref = ref_mean_dice(pred, truth, SMALL)
    got = result["per_pair"]
    assert list(got.columns) == ["ImageId", "ClassId", "dice"]
    assert got[["ImageId", "ClassId"]].values.tolist() == ref[["ImageId", "ClassId"]].values.tolist()
    np.testing.assert_allclose(got["dice"].to_numpy(), ref["dice"].to_numpy(), rtol=0, atol=1e-12)
    assert result["mean_dice"] == pytest.approx(ref["dice"].mean())
    assert result["n_images"] == 25 and result["n_pairs"] == 100
    for c in (1, 2, 3, 4):
        assert result["per_class"][c] == pytest.approx(ref.loc[ref.ClassId == c, "dice"].mean())


def test_mean_dice_full_size_masks():
    rng = np.random.default_rng(7)
    rows_p, rows_t = [], []
    for i in range(6):
        t = np.zeros(SHAPE, np.uint8)
        t[50:120, 100 + 50 * i:400 + 50 * i] = 1
        p = np.roll(t, 7 * i, axis=1)
        p[rng.random(SHAPE) < 0.001] = 1  # some speckle, crossing column boundaries
        rows_p.append((f"img{i}.jpg", 3, rle.encode(p)))
        rows_t.append((f"img{i}.jpg", 3, rle.encode(t)))
    cols = ["ImageId", "ClassId", "EncodedPixels"]
    pred, truth = pd.DataFrame(rows_p, columns=cols), pd.DataFrame(rows_t, columns=cols)
    result = metrics.mean_dice(pred, truth)
    ref = ref_mean_dice(pred, truth, SHAPE)
    np.testing.assert_allclose(result["per_pair"]["dice"], ref["dice"], atol=1e-12)
    assert result["per_class"][1] == 1.0 and result["per_class"][3] < 1.0


def test_mean_dice_all_empty_and_flexible_input():
    pred = pd.DataFrame({"ImageId": ["b.jpg", "a.jpg"], "ClassId": ["1", "4"], "EncodedPixels": ["", np.nan]})
    truth = pd.DataFrame({"ImageId": ["a.jpg"], "ClassId": [2.0], "EncodedPixels": ["3 4"]})
    result = metrics.mean_dice(pred, truth, shape=SMALL)
    assert result["n_images"] == 2 and result["n_pairs"] == 8
    assert result["mean_dice"] == pytest.approx(7 / 8)  # only (a.jpg, 2) is missed
    assert result["per_class"] == {1: 1.0, 2: 0.5, 3: 1.0, 4: 1.0}
    assert result["per_pair"]["ImageId"].tolist()[:4] == ["a.jpg"] * 4
    empty_truth = truth.iloc[:0]
    assert metrics.mean_dice(pred, empty_truth, shape=SMALL)["mean_dice"] == 1.0


def test_mean_dice_unusual_spacing_parses_the_same():
    cols = ["ImageId", "ClassId", "EncodedPixels"]
    truth = pd.DataFrame([("a", 1, "1 3 10 2"), ("b", 2, "5 5")], columns=cols)
    plain = pd.DataFrame([("a", 1, "2 3 10 1"), ("b", 2, "4 2")], columns=cols)
    expected = metrics.mean_dice(plain, truth, shape=SMALL)["per_pair"]["dice"].tolist()
    for a, b in [("2  3 10 1", "4 2"), (" 2 3 10 1 ", "4\t2"), ("2 3\n10 1", "+4 2")]:
        spaced = pd.DataFrame([("a", 1, a), ("b", 2, b)], columns=cols)
        assert metrics.mean_dice(spaced, truth, shape=SMALL)["per_pair"]["dice"].tolist() == expected


def test_mean_dice_errors(monkeypatch):
    cols = ["ImageId", "ClassId", "EncodedPixels"]
    pred = pd.DataFrame([("a", 1, "1 2"), ("b", 2, "")], columns=cols)
    truth = pd.DataFrame([("a", 1, "1 3")], columns=cols)

    dup = pd.concat([pred, pd.DataFrame([("a", 1, "")], columns=cols)])
    with pytest.raises(ValueError, match=r"duplicate .*a class 1 x2"):
        metrics.mean_dice(dup, truth, shape=SMALL)
    with pytest.raises(ValueError, match=r"truth: duplicate"):
        metrics.mean_dice(pred, pd.concat([truth, truth]), shape=SMALL)
    for bad in (0, 5, 1.5, "x"):
        with pytest.raises(ValueError, match="ClassId must be 1..4"):
            metrics.mean_dice(pd.DataFrame([("a", bad, "")], columns=cols), truth, shape=SMALL)
    with pytest.raises(ValueError, match=r"1 image\(s\) in truth are not in pred: c"):
        metrics.mean_dice(pred, pd.concat([truth, pd.DataFrame([("c", 2, "1 1")], columns=cols)]), shape=SMALL)
    with pytest.raises(ValueError, match="lacks column"):
        metrics.mean_dice(pred.drop(columns="EncodedPixels"), truth, shape=SMALL)
    with pytest.raises(ValueError, match="no rows"):
        metrics.mean_dice(pred.iloc[:0], truth.iloc[:0], shape=SMALL)
    bad_rles = {
        "5 2 1 2": "not sorted", "1 5 3 2": "overlap", "0 3": "not positive", "1 2 3": "odd number",
        "1 x": "not an integer", "380 10": "past the image", "-1 3": "not positive", "1 ²": "not an integer",
        "1 99999999999999999999999": "too large", "9223372036854775806 9223372036854775806": "past",
    }
    monkeypatch.setattr(metrics, "_BLOCK_PAIRS", 4)  # the bad row is in the second block
    for encoded, reason in bad_rles.items():
        bad = pd.DataFrame([("a", 1, "1 2"), ("b", 3, encoded)], columns=cols)
        with pytest.raises(rle.RLEError, match=f"pred EncodedPixels of b class 3: .*{reason}"):
            metrics.mean_dice(bad, truth, shape=SMALL)
    with pytest.raises(rle.RLEError, match="truth EncodedPixels of a class 1: .*must be a string"):
        metrics.mean_dice(pred, pd.DataFrame([("a", 1, 17)], columns=cols), shape=SMALL)


def test_mean_dice_is_nan_free_on_large_input():
    pred, truth = random_frames(11, n_images=300, shape=(8, 8))
    result = metrics.mean_dice(pred, truth, shape=(8, 8))
    assert not math.isnan(result["mean_dice"])
    assert len(result["per_pair"]) == 1200
    assert result["per_pair"]["dice"].between(0, 1).all()
