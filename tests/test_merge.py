"""steel merge: shards -> one sorted Kaggle-ready CSV, with checks (no Ray needed)."""

from __future__ import annotations

import pandas as pd
import pytest

from steel.core import storage
from steel.score import io as score_io
from steel.score import merge

EMPTY = {"p_defect": 0.1, "p_class": [0.0] * 4, "masks": ["", "", "", ""], "areas": [0] * 4}


def write_shard(out: str, name: str, results: dict, fmt: str = "csv", errors: dict | None = None,
                written_at: str | None = None) -> None:
    shard = score_io.ShardResult(name, sorted([*results, *(errors or {})]))
    for image_id, res in results.items():
        shard.add_scored(image_id, res)
    for image_id, reason in (errors or {}).items():
        shard.add_error(image_id, f"/in/{image_id}", reason)
    shard.write(out, fmt, {"written_at": written_at} if written_at else None)


def test_merge_sorts_mixed_formats_and_fills_errors(tmp_path):
    out = str(tmp_path / "out")
    defect = {**EMPTY, "masks": ["", "", "7 3", ""], "areas": [0, 0, 3, 0]}
    write_shard(out, "part-b", {"c.jpg": EMPTY, "a.jpg": defect}, fmt="parquet")
    write_shard(out, "part-a", {"b.jpg": EMPTY}, errors={"bad.jpg": "empty file (0 bytes)"})
    with pytest.raises(merge.MergeError, match="has not finished"):
        merge.merge(out, str(tmp_path / "x.csv"))
    storage.write_text(storage.join(out, "_SUCCESS"), "")

    long_uri = str(tmp_path / "long.csv")
    s = merge.merge(out, long_uri)
    assert (s["images"], s["rows"], s["errors"], s["filled"], s["shards"]) == (3, 12, 1, 0, 2)
    table = pd.read_csv(long_uri, keep_default_na=False)
    assert list(table.columns) == ["ImageId", "ClassId", "EncodedPixels"]
    assert list(table["ImageId"]) == [i for i in ("a.jpg", "b.jpg", "c.jpg") for _ in range(4)]
    assert list(table["ClassId"]) == [1, 2, 3, 4] * 3
    assert table.loc[(table.ImageId == "a.jpg") & (table.ClassId == 3), "EncodedPixels"].item() == "7 3"

    combined_uri = str(tmp_path / "combined.csv")
    s = merge.merge(out, combined_uri, layout="combined", fill_errors=True)
    assert (s["images"], s["rows"], s["filled"]) == (4, 16, 1)
    table = pd.read_csv(combined_uri, keep_default_na=False)
    assert list(table.columns) == ["ImageId_ClassId", "EncodedPixels"]
    assert table["ImageId_ClassId"].iloc[8:12].tolist() == [f"bad.jpg_{k}" for k in (1, 2, 3, 4)]
    assert (table["EncodedPixels"].iloc[8:12] == "").all()


def test_merge_takes_an_image_in_two_shards_once_and_rejects_missing_rows_and_bad_rle(tmp_path):
    out = str(tmp_path / "out")
    defect = {**EMPTY, "masks": ["5 2", "", "", ""], "areas": [2, 0, 0, 0]}
    write_shard(out, "part-1", {"same.jpg": EMPTY, "a.jpg": EMPTY}, written_at="2026-12-02T01:00:00Z")
    write_shard(out, "part-2", {"same.jpg": defect}, written_at="2026-12-01T01:00:00Z")  # written first
    storage.write_text(storage.join(out, "_SUCCESS"), "")
    s = merge.merge(out, str(tmp_path / "s.csv"))
    assert (s["images"], s["rows"], s["duplicates_ignored"]) == (2, 8, 1)
    table = pd.read_csv(str(tmp_path / "s.csv"), keep_default_na=False)
    assert table.loc[(table.ImageId == "same.jpg") & (table.ClassId == 1), "EncodedPixels"].item() == "5 2"
    storage.write_text(score_io.shard_uri(out, "part-2", "csv"),
                       "ImageId,ClassId,EncodedPixels\nother.jpg,1,\nother.jpg,1,\nother.jpg,3,5 0\n")
    with pytest.raises(merge.MergeError) as e:
        merge.merge(out, str(tmp_path / "bad.csv"))
    assert "other.jpg: 3 rows with 2 distinct classes" in str(e.value)
    assert "invalid EncodedPixels" in str(e.value)
    # same.jpg: its owner's index lists it, its files no longer hold it (and part-1's copy is not its owner's)
    assert "same.jpg: listed by the index of part-2 but not in its files" in str(e.value)
    assert not storage.exists(str(tmp_path / "bad.csv"))


def test_merge_cli_and_empty_output(tmp_path, capsys):
    from steel.cli import main

    empty = str(tmp_path / "empty")
    assert main(["merge", empty, "--to", str(tmp_path / "s.csv"), "--partial"]) == 2
    assert "no shards found" in capsys.readouterr().err
    out = str(tmp_path / "out")
    write_shard(out, "part-1", {"x.jpg": EMPTY})
    storage.write_text(storage.join(out, "_SUCCESS"), "")
    assert main(["merge", out, "--to", str(tmp_path / "s.csv"), "--layout", "combined"]) == 0
    assert "merged 1 shards: 1 images, 4 rows (combined)" in capsys.readouterr().out
