"""steel.data.submission: both CSV layouts into long form, Kaggle layouts out, clear errors."""

from __future__ import annotations

import pandas as pd
import pytest

from steel.data import submission
from steel.data.submission import RowsError, read_rows, to_kaggle

ROWS = [("b.jpg", 2, "5 3"), ("a.jpg", 1, "1 3 10 2"), ("a.jpg", 3, ""), ("b.jpg", 4, "100 50")]


def test_long_and_combined_layouts_read_the_same(tmp_path):
    long_path = tmp_path / "long.csv"
    comb_path = tmp_path / "comb.csv"
    # Kaggle's sample column order; pandas would read ClassId as int and empty pixels as NaN.
    pd.DataFrame(ROWS, columns=["ImageId", "ClassId", "EncodedPixels"])[["ImageId", "EncodedPixels", "ClassId"]] \
        .to_csv(long_path, index=False)
    comb_path.write_text("ImageId_ClassId,EncodedPixels\n" + "".join(f"{i}_{c},{p}\n" for i, c, p in ROWS))
    a, b = read_rows(str(long_path)), read_rows(str(comb_path))
    assert list(a.columns) == ["ImageId", "ClassId", "EncodedPixels"]
    pd.testing.assert_frame_equal(a, b)
    assert a.values.tolist() == [list(r) for r in ROWS]  # file order, '' for empty
    assert a["ClassId"].dtype.kind == "i"
    assert a.attrs["layout"] == "long" and b.attrs["layout"] == "combined"


def test_image_ids_with_underscores_split_on_the_last_one(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("ImageId_ClassId,EncodedPixels\nplant_7_cam2.jpg_3,1 2\n")
    assert read_rows(str(path)).values.tolist() == [["plant_7_cam2.jpg", 3, "1 2"]]


def test_image_ids_are_kept_exactly_other_cells_stripped(tmp_path):
    """An ImageId is an object key as scoring listed it: " a.jpg" and "a.jpg " are other images than "a.jpg"."""
    path = tmp_path / "s.csv"
    path.write_text("ImageId,ClassId,EncodedPixels\n a.jpg , 1 , 1 2 \na.jpg,2,\n")
    assert read_rows(str(path)).values.tolist() == [[" a.jpg ", 1, "1 2"], ["a.jpg", 2, ""]]
    comb = tmp_path / "c.csv"
    comb.write_text("ImageId_ClassId,EncodedPixels\n a.jpg_3 ,5 1\n")
    assert read_rows(str(comb)).values.tolist() == [[" a.jpg", 3, "5 1"]]
    df = pd.DataFrame({"ImageId": ["b.jpg "], "ClassId": [" 4"], "EncodedPixels": [" 3 1"]})
    assert read_rows(df).values.tolist() == [["b.jpg ", 4, "3 1"]]


def test_dataframe_input():
    df = pd.DataFrame({"ImageId_ClassId": ["abc.jpg_3", "abc.jpg_1"], "EncodedPixels": ["1 1", float("nan")]})
    assert read_rows(df).values.tolist() == [["abc.jpg", 3, "1 1"], ["abc.jpg", 1, ""]]


def test_bad_columns_and_empty_file(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("ImageId,Pixels\na.jpg,1 1\n")
    with pytest.raises(ValueError, match=r"unrecognised columns \['ImageId', 'Pixels'\]; expected either "
                                         r"ImageId,ClassId,EncodedPixels or ImageId_ClassId,EncodedPixels"):
        read_rows(str(path))
    path.write_text("")
    with pytest.raises(ValueError, match="the file is empty"):
        read_rows(str(path))
    with pytest.raises(FileNotFoundError):
        read_rows(str(tmp_path / "nope.csv"))


def test_bad_rows_are_listed_with_line_numbers(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(
        "ImageId,ClassId,EncodedPixels\n"
        "a.jpg,1,1 3\n"
        "a.jpg,x,1 3\n"        # line 3: class not a number
        "a.jpg,2,3 1 1 1\n"    # line 4: unsorted runs
        "\n"                   # line 5: blank, ignored
        "a.jpg,1,1 3\n"        # line 6: duplicate of line 2
        ",4,\n"                # line 7: no ImageId
    )
    with pytest.raises(RowsError) as err:
        read_rows(str(path))
    msg = str(err.value)
    assert "4 bad rows" in msg
    assert "row 3: ImageId='a.jpg' ClassId='x': unknown class 'x'" in msg
    assert "row 4: ImageId='a.jpg' ClassId='2': malformed RLE: RLE runs are not sorted" in msg
    assert "row 6: ImageId='a.jpg' ClassId='1': duplicate (ImageId, ClassId) of row 2 (identical EncodedPixels)" in msg
    assert "row 7: ImageId='' ClassId='4': missing ImageId" in msg
    assert err.value.problems["row"].tolist() == [3, 4, 6, 7]


def test_rle_checked_against_shape(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,5000 10\n")
    assert len(read_rows(str(path))) == 1
    with pytest.raises(RowsError, match="past the image's 2048 pixels"):
        read_rows(str(path), shape=(32, 64))
    assert len(read_rows(str(path), shape=(32, 64), validate_rle=False)) == 1


@pytest.mark.parametrize("layout", ["long", "combined"])
def test_to_kaggle_four_sorted_rows_per_image(layout):
    df = pd.DataFrame(ROWS, columns=["ImageId", "ClassId", "EncodedPixels"])
    out = to_kaggle(df, layout=layout, images=["c.jpg"])
    assert len(out) == 12
    if layout == "long":
        assert list(out.columns) == ["ImageId", "ClassId", "EncodedPixels"]
        assert out["ImageId"].tolist() == ["a.jpg"] * 4 + ["b.jpg"] * 4 + ["c.jpg"] * 4
        assert out["ClassId"].tolist() == [1, 2, 3, 4] * 3
    else:
        assert list(out.columns) == ["ImageId_ClassId", "EncodedPixels"]
        assert out["ImageId_ClassId"].tolist()[:5] == ["a.jpg_1", "a.jpg_2", "a.jpg_3", "a.jpg_4", "b.jpg_1"]
    assert out["EncodedPixels"].tolist() == ["1 3 10 2", "", "", "", "", "5 3", "", "100 50", "", "", "", ""]
    # Round trip through read_rows gives the same pairs back.
    back = read_rows(out)
    assert len(back) == 12 and set(back["ImageId"]) == {"a.jpg", "b.jpg", "c.jpg"}


def test_to_kaggle_errors():
    with pytest.raises(ValueError, match="layout must be 'long' or 'combined'"):
        to_kaggle(pd.DataFrame(ROWS, columns=["ImageId", "ClassId", "EncodedPixels"]), layout="wide")
    with pytest.raises(ValueError, match=r"missing \['EncodedPixels'\]"):
        to_kaggle(pd.DataFrame({"ImageId": ["a"], "ClassId": [1]}))
    with pytest.raises(ValueError, match="ClassId must be one of"):
        to_kaggle(pd.DataFrame({"ImageId": ["a"], "ClassId": [6], "EncodedPixels": [""]}))
    with pytest.raises(ValueError, match="repeat an \\(ImageId, ClassId\\) pair: a_1"):
        to_kaggle(pd.DataFrame({"ImageId": ["a", "a"], "ClassId": [1, 1], "EncodedPixels": ["", "1 1"]}))


def test_write_csv(tmp_path):
    target = tmp_path / "sub" / "submission.csv"
    n = submission.write_csv(pd.DataFrame(ROWS, columns=["ImageId", "ClassId", "EncodedPixels"]), str(target),
                             layout="combined")
    assert n == 8
    text = target.read_text().splitlines()
    assert text[0] == "ImageId_ClassId,EncodedPixels" and text[1] == "a.jpg_1,1 3 10 2" and text[2] == "a.jpg_2,"
