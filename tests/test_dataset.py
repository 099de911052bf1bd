"""steel.data.labels: label CSVs (both layouts) -> the seed's wide table, bad rows, split, fingerprint."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from steel.core.names import SHAPE
from steel.data import labels as dataset
from steel.data import rle
from steel.data.labels import LabelError, load_labels

SHAPE = SHAPE


def _rle(y0, y1, x0, x1, shape=SHAPE):
    m = np.zeros(shape, np.uint8)
    m[y0:y1, x0:x1] = 1
    return rle.encode(m)


# Four images: a (classes 1 and 3), b (class 2), c (no defect), d (class 4).
LABELS = [
    ("a.jpg", 1, _rle(0, 10, 0, 5)),
    ("a.jpg", 3, _rle(20, 40, 100, 200)),
    ("b.jpg", 2, _rle(5, 6, 7, 9)),
    ("d.jpg", 4, _rle(100, 200, 1000, 1100)),
]
IMAGES = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


def write_long(path, rows, columns=("ImageId", "ClassId", "EncodedPixels")):
    df = pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])[list(columns)]
    df.to_csv(path, index=False)
    return str(path)


def write_combined(path, rows, images):
    got = {(i, c): p for i, c, p in rows}
    out = [(f"{i}_{c}", got.get((i, c), "")) for i in images for c in (1, 2, 3, 4)]
    pd.DataFrame(out, columns=["ImageId_ClassId", "EncodedPixels"]).to_csv(path, index=False)
    return str(path)


def test_both_layouts_give_the_same_wide_table(tmp_path):
    # The long file lists defect rows only (in Kaggle's sample column order); the listing adds c.jpg.
    long_csv = write_long(tmp_path / "long.csv", LABELS, columns=("ImageId", "EncodedPixels", "ClassId"))
    combined_csv = write_combined(tmp_path / "combined.csv", LABELS, IMAGES)
    wide_long = load_labels(long_csv, images=IMAGES)
    wide_comb = load_labels(combined_csv)
    assert list(wide_long.columns) == list(dataset.WIDE_COLUMNS)
    pd.testing.assert_frame_equal(wide_long, wide_comb)
    assert wide_comb.attrs["layout"] == "combined" and wide_long.attrs["layout"] == "long"

    w = wide_long.set_index("ImageId")
    assert list(w.index) == IMAGES  # sorted by ImageId like the seed's pivot table
    assert w.loc["a.jpg", "Defect_1"] == LABELS[0][2] and w.loc["a.jpg", "Defect_3"] == LABELS[1][2]
    assert w.loc["a.jpg", "Defect_2"] == "" and w.loc["c.jpg", "Defect_4"] == ""
    assert w["hasDefect"].tolist() == [1, 1, 0, 1]
    assert w[[f"hasDefect_{k}" for k in (1, 2, 3, 4)]].to_numpy().tolist() == [
        [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert w["stratify"].tolist() == ["1_3", "2", "0", "4"]
    for k in (1, 2, 3, 4):
        assert w[f"hasDefect_{k}"].dtype == np.int64


def test_images_folder_listing_adds_defect_free_images(tmp_path):
    folder = tmp_path / "train_images"
    folder.mkdir()
    for name in IMAGES + ["e.JPG", "notes.txt"]:
        (folder / name).write_bytes(b"")
    csv = write_long(tmp_path / "train.csv", LABELS)
    wide = load_labels(csv, images=str(folder))
    assert wide["ImageId"].tolist() == IMAGES + ["e.JPG"]
    assert wide.set_index("ImageId").loc["e.JPG", "hasDefect"] == 0


def test_empty_listing_and_missing_folder_are_errors(tmp_path):
    csv = write_long(tmp_path / "train.csv", LABELS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_labels(csv, images=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no images"):
        load_labels(csv, images=[])
    with pytest.raises(ValueError, match="no images .* found in .*nowhere \\(missing or empty folder\\)"):
        load_labels(csv, images=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError):
        load_labels(str(tmp_path / "missing.csv"), images=IMAGES)


def test_without_listing_long_layout_warns_about_defect_free_images(tmp_path, caplog):
    csv = write_long(tmp_path / "train.csv", LABELS)
    with caplog.at_level(logging.WARNING, logger="steel.data.labels"):
        wide = load_labels(csv)
    assert wide["ImageId"].tolist() == ["a.jpg", "b.jpg", "d.jpg"]
    assert "no image listing" in caplog.text


def test_unrecognised_columns_name_what_was_found(tmp_path):
    path = tmp_path / "x.csv"
    pd.DataFrame({"Image": ["a.jpg"], "Class": [1], "Pixels": ["1 2"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"unrecognised columns \['Image', 'Class', 'Pixels'\]"):
        load_labels(str(path))


def test_overlapping_classes_are_left_alone(tmp_path):
    rows = [("a.jpg", 1, _rle(0, 10, 0, 10)), ("a.jpg", 2, _rle(5, 15, 5, 15))]
    wide = load_labels(write_long(tmp_path / "t.csv", rows), images=["a.jpg"])
    assert wide.loc[0, "stratify"] == "1_2"


# ---------------------------------------------------------------------------------------------
# Bad rows: one case per kind. Each adds one bad row at CSV line 6 (header = 1, 4 good rows).

BAD_CASES = {
    "malformed_rle": (("b.jpg", 3, "10 5 3 2"), "malformed RLE: RLE runs are not sorted"),
    "odd_tokens": (("b.jpg", 3, "10 5 3"), "malformed RLE: RLE has an odd number of tokens"),
    "past_the_end": (("b.jpg", 3, "409600 2"), "malformed RLE: RLE run ends at pixel 409601"),
    "unknown_class": (("b.jpg", 5, "1 3"), "unknown class '5' (expected 1, 2, 3, 4)"),
    "missing_image": (("zzz.jpg", 1, "1 3"), "image not in the image listing"),
    "duplicate_pair": (("a.jpg", 1, "50 3"), "duplicate (ImageId, ClassId) of row 2 (different EncodedPixels)"),
}


@pytest.mark.parametrize("layout", ["long", "combined"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_raise_with_row_and_reason_or_are_skipped_with_a_report(tmp_path, case, layout):
    bad, reason = BAD_CASES[case]
    if layout == "long":
        csv = write_long(tmp_path / "train.csv", LABELS + [bad])
        line = 6
    else:
        # 4 rows per image (16 rows for IMAGES), the bad row appended at line 18.
        csv = write_combined(tmp_path / "train.csv", LABELS, IMAGES)
        with open(csv, "a") as fh:
            fh.write(f"{bad[0]}_{bad[1]},{bad[2]}\n")
        line = 18  # a.jpg_1 (what the duplicate repeats) is line 2 in both layouts

    with pytest.raises(LabelError) as err:
        load_labels(csv, images=IMAGES)
    msg = str(err.value)
    assert err.value.problems["row"].tolist() == [line]  # the bad row, as data too (for a report)
    assert f"row {line}: ImageId={bad[0]!r} ClassId='{bad[1]}': {reason}" in msg
    assert "1 bad label rows" in msg
    problems = err.value.problems
    assert problems[["row", "ImageId", "ClassId"]].values.tolist() == [[line, bad[0], str(bad[1])]]
    assert problems.loc[0, "reason"].startswith(reason)

    report = tmp_path / "out" / "skipped.csv"
    wide = load_labels(csv, images=IMAGES, skip_bad=True, report_uri=str(report))
    got = pd.read_csv(report, dtype=str, keep_default_na=False)
    assert list(got.columns) == ["row", "ImageId", "ClassId", "reason"]
    assert got[["row", "ImageId", "ClassId"]].values.tolist() == [[str(line), bad[0], str(bad[1])]]
    assert got.loc[0, "reason"] == problems.loc[0, "reason"]
    # The good rows are all kept (for a duplicate, the first occurrence wins).
    clean = load_labels(write_long(tmp_path / "clean.csv", LABELS), images=IMAGES)
    pd.testing.assert_frame_equal(wide, clean)
    assert len(wide.attrs["skipped"]) == 1


def test_bad_combined_key_and_missing_image_id(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("ImageId_ClassId,EncodedPixels\na.jpg_1,1 3\nnounderscore,\n_2,\n")
    with pytest.raises(LabelError) as err:
        load_labels(str(path))
    msg = str(err.value)
    assert "row 3: ImageId='nounderscore' ClassId='': ImageId_ClassId 'nounderscore' is not '<ImageId>_<ClassId>'" in msg
    assert "row 4: ImageId='' ClassId='2': missing ImageId" in msg


def test_identical_duplicate_is_reported_too(tmp_path):
    csv = write_long(tmp_path / "t.csv", LABELS + [LABELS[2]])
    with pytest.raises(LabelError, match=r"row 6: .*duplicate \(ImageId, ClassId\) of row 4 \(identical EncodedPixels\)"):
        load_labels(csv, images=IMAGES)


def test_skip_without_report_uri_logs_counts_and_keeps_report_in_attrs(tmp_path, caplog):
    rows = LABELS + [("b.jpg", 7, "1 3"), ("b.jpg", 3, "5 0"), ("q.jpg", 1, "1 1")]
    csv = write_long(tmp_path / "t.csv", rows)
    with caplog.at_level(logging.WARNING, logger="steel.data.labels"):
        wide = load_labels(csv, images=IMAGES, skip_bad=True)
    assert "skipped 3 bad label rows" in caplog.text
    assert "1 x unknown class" in caplog.text and "1 x malformed RLE" in caplog.text
    assert "1 x image not in the image listing" in caplog.text
    assert "row 8: ImageId='q.jpg'" in caplog.text
    assert dataset.skipped_rows(wide)["row"].tolist() == [6, 7, 8]
    assert wide.attrs["skipped"][0] == {"row": 6, "ImageId": "b.jpg", "ClassId": "7",
                                        "reason": "unknown class '7' (expected 1, 2, 3, 4)"}
    assert len(wide) == 4
    # attrs stay plain data, so the usual pandas operations on the table keep working.
    parts = dataset.split(wide)
    assert len(pd.concat(list(parts.values()))) == 4
    assert len(wide.merge(wide[["ImageId"]], on="ImageId")) == 4


def test_many_bad_rows_list_the_first_twenty_then_count(tmp_path):
    rows = LABELS + [(f"x{i:02d}.jpg", 1, "1 3") for i in range(25)]
    with pytest.raises(LabelError) as err:
        load_labels(write_long(tmp_path / "t.csv", rows), images=IMAGES)
    msg = str(err.value)
    assert "25 bad label rows" in msg
    assert "row 25: ImageId='x19.jpg'" in msg and "x20.jpg" not in msg
    assert "... and 5 more" in msg
    assert len(err.value.problems) == 25


def test_dataframe_input_and_float_class_ids():
    df = pd.DataFrame(LABELS, columns=["ImageId", "ClassId", "EncodedPixels"])
    df["ClassId"] = df["ClassId"].astype(float)
    wide = load_labels(df, images=IMAGES)
    assert wide["stratify"].tolist() == ["1_3", "2", "0", "4"]


# ---------------------------------------------------------------------------------------------
# Split

def synthetic_wide(n: int, seed: int = 0) -> pd.DataFrame:
    """A wide table of ``n`` images with the real set's class mix (no RLEs needed for splitting)."""
    # Severstal train: 5,902 clean; single 1/2/3/4 = 769/195/4,759/516; pairs 1_2/1_3/2_3/2_4/3_4/1_4 etc.
    mix = {"0": 5902, "1": 769, "2": 195, "3": 4759, "4": 516, "1_2": 35, "1_3": 91, "2_3": 14,
           "2_4": 1, "3_4": 284, "1_2_3": 2}
    codes = np.array(list(mix))
    p = np.array(list(mix.values()), float)
    rng = np.random.default_rng(seed)
    strata = rng.choice(codes, size=n, p=p / p.sum())
    wide = pd.DataFrame({"ImageId": [f"{i:09x}.jpg" for i in range(n)]})
    for k in (1, 2, 3, 4):
        has = np.array([str(k) in s.split("_") for s in strata], dtype=np.int64)
        wide[f"Defect_{k}"] = np.where(has == 1, "1 1", "")
        wide[f"hasDefect_{k}"] = has
    wide["hasDefect"] = (wide[[f"hasDefect_{k}" for k in (1, 2, 3, 4)]].sum(axis=1) > 0).astype(np.int64)
    wide["stratify"] = strata
    return wide


def test_split_sizes_match_the_seed_on_12568_images():
    wide = synthetic_wide(12568)
    parts = dataset.split(wide)
    assert {k: len(v) for k, v in parts.items()} == {"train": 9048, "val": 2263, "test": 1257}
    ids = [set(parts[k]["ImageId"]) for k in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set().union(*ids) == set(wide["ImageId"])
    assert list(parts["train"].columns) == list(wide.columns)
    # Stratified: each common stratum's share is the same in every split (up to rounding).
    total = wide["stratify"].value_counts()
    for name, frac in (("test", 1257 / 12568), ("val", 2263 / 12568), ("train", 9048 / 12568)):
        counts = parts[name]["stratify"].value_counts()
        for code in ("0", "1", "2", "3", "4", "3_4", "1_3"):
            assert abs(counts.get(code, 0) - total[code] * frac) <= 2, (name, code)


def test_split_is_deterministic_and_seeded():
    wide = synthetic_wide(500, seed=3)
    a, b = dataset.split(wide), dataset.split(wide.copy())
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k])
    assert dataset.fingerprint(a) == dataset.fingerprint(b)
    c = dataset.split(wide, seed=7)
    assert dataset.fingerprint(c) != dataset.fingerprint(a)


def test_rare_strata_still_split():
    # Strata with a single image ("2_4", "1_2_3", "1_4") and one with two: sklearn alone would refuse.
    wide = synthetic_wide(60, seed=1)
    wide.loc[0, "stratify"] = "2_4"
    wide.loc[1, "stratify"] = "1_2_3"
    wide.loc[2, "stratify"] = "1_4"
    wide.loc[3:4, "stratify"] = "1_2"
    parts = dataset.split(wide)
    assert sum(len(p) for p in parts.values()) == 60
    assert {k: len(v) for k, v in parts.items()} == {"train": 43, "val": 11, "test": 6}
    # The table itself keeps its true combinations.
    assert set(pd.concat(parts.values())["stratify"]) >= {"2_4", "1_2_3", "1_4"}


def test_safe_strata_merges_into_rare_bucket():
    s = pd.Series(["0"] * 5 + ["1"] * 3 + ["2_4", "1_2_3"])
    out = dataset.safe_strata(s, n_test=3)
    assert out.tolist() == ["0"] * 5 + ["1"] * 3 + ["rare", "rare"]
    # A lone rare member joins the largest stratum; too many strata for the test size get merged.
    assert dataset.safe_strata(pd.Series(["0"] * 4 + ["1"] * 2 + ["4"]), n_test=2).tolist() == ["0"] * 4 + ["1"] * 2 + ["0"]
    merged = dataset.safe_strata(pd.Series(["0"] * 6 + ["1"] * 2 + ["2"] * 2 + ["3"] * 2), n_test=2)
    assert merged.nunique() <= 2


@pytest.mark.parametrize("n", [3, 4, 7, 11])
def test_tiny_tables_split(n):
    wide = synthetic_wide(n, seed=n)
    wide["stratify"] = [str(i % 5) for i in range(n)]
    parts = dataset.split(wide)
    assert sum(len(p) for p in parts.values()) == n
    assert all(len(p) >= 1 for p in parts.values())


def test_split_rejects_too_small_or_repeated():
    with pytest.raises(ValueError, match="at least 3 images"):
        dataset.split(synthetic_wide(2))
    wide = synthetic_wide(10)
    wide.loc[1, "ImageId"] = wide.loc[0, "ImageId"]
    with pytest.raises(ValueError, match="repeats ImageIds"):
        dataset.split(wide)
    with pytest.raises(ValueError, match="wide table"):
        dataset.split(pd.DataFrame({"ImageId": ["a", "b", "c"]}))


def test_split_of_loaded_labels(tmp_path):
    images = [f"{i:03d}.jpg" for i in range(30)]
    rows = [(images[i], 1 + i % 4, _rle(0, 4, i, i + 2)) for i in range(0, 30, 2)]
    wide = load_labels(write_long(tmp_path / "t.csv", rows), images=images)
    parts = dataset.split(wide)
    assert {k: len(v) for k, v in parts.items()} == {"train": 21, "val": 6, "test": 3}


def test_fingerprint_depends_on_membership_not_order():
    a = {"train": ["a", "b"], "val": ["c"], "test": ["d"]}
    b = {"test": pd.DataFrame({"ImageId": ["d"]}), "val": ["c"], "train": ["b", "a"]}
    assert dataset.fingerprint(a) == dataset.fingerprint(b)
    assert len(dataset.fingerprint(a)) == 64
    assert dataset.fingerprint(a) != dataset.fingerprint({"train": ["a"], "val": ["b", "c"], "test": ["d"]})


def test_subset_per_model():
    wide = synthetic_wide(300, seed=2)
    assert len(dataset.subset(wide, "binary")) == 300
    assert (dataset.subset(wide, "multilabel")["hasDefect"] == 1).all()
    assert len(dataset.subset(wide, "multilabel")) == int(wide["hasDefect"].sum())
    for k in (1, 2, 3, 4):
        part = dataset.subset(wide, f"seg{k}")
        assert len(part) == int(wide[f"hasDefect_{k}"].sum()) and (part[f"hasDefect_{k}"] == 1).all()
    with pytest.raises(ValueError, match="unknown model name 'seg5'; expected one of binary, multilabel"):
        dataset.subset(wide, "seg5")


def test_labels_and_listing_on_s3(s3_bucket, tmp_path):
    from steel.core import storage

    root = f"s3://{s3_bucket}/data"
    storage.write_text(storage.join(root, "train.csv"),
                       pd.DataFrame(LABELS, columns=["ImageId", "ClassId", "EncodedPixels"]).to_csv(index=False))
    for name in IMAGES:
        storage.write_bytes(storage.join(root, "train_images", name), b"x")
    wide = load_labels(storage.join(root, "train.csv"), images=storage.join(root, "train_images"))
    assert wide["ImageId"].tolist() == IMAGES
    bad = storage.join(root, "bad.csv")
    storage.write_text(bad, "ImageId,ClassId,EncodedPixels\na.jpg,9,1 1\n")
    report = storage.join(root, "reports", "skipped.csv")
    load_labels(bad, images=IMAGES, skip_bad=True, report_uri=report)
    assert "unknown class '9'" in storage.read_text(report)
