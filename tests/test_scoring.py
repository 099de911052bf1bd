"""Batch scoring: shards, decoding, resume, incremental runs and bad input (steel.score.run, steel.score.io).

Unit tests run without Ray. Integration tests use the session's local Ray (``ray_local``) with a
light stand-in predictor (``BrightPredictor``: deterministic masks from pixel brightness), and the
slow ones a tiny real bundle (random-weight models) through ``steel.model.predictor``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from steel.core import s3, storage
from steel.core.config import ScoreConfig
from steel.core.names import MODEL_NAMES, is_segmenter
from steel.data import images as image_io
from steel.data import rle
from steel.model.thresholds import save_thresholds
from steel.score import io as score_io
from steel.score import listing

H, W = 256, 1600


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def jpeg_bytes(seed: int, size=(W, H), mode="RGB", fmt="JPEG") -> bytes:
    """A 'steel' image: gray noise with a bright rectangle whose position depends on ``seed``."""
    rng = np.random.default_rng(seed)
    w, h = size
    gray = rng.integers(40, 90, size=(h, w), dtype=np.uint8)
    x0 = 50 + (seed * 97) % max(1, w - 300)
    gray[40:120, x0:x0 + 200] = 230
    img = Image.fromarray(gray, "L")
    if mode != "L":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_images(folder: str, names: list[str], start: int = 0) -> None:
    for i, name in enumerate(names):
        storage.write_bytes(storage.join(folder, name), jpeg_bytes(start + i))


class BrightPredictor:
    """Stand-in for the cascade: class 1 = pixels brighter than 200, p_defect = their share.

    Fails on purpose for images whose mean is exactly 0 (all-black), to test error isolation.
    """

    def __init__(self):
        self.stats = {"images": 0, "seg_calls": 0}

    def predict(self, images):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (H, W, 3) or images.dtype != np.uint8:
            raise ValueError(f"bad batch {images.shape} {images.dtype}")
        if (images.reshape(len(images), -1).max(axis=1) == 0).any():
            raise RuntimeError("black image")
        out = []
        for img in images:
            mask = (img[:, :, 0] > 200).astype(np.uint8)
            area = int(mask.sum())
            out.append({"p_defect": area / mask.size, "p_class": [0.9, 0.1, 0.1, 0.1],
                        "masks": [rle.encode(mask), "", "", ""], "areas": [area, 0, 0, 0]})
        self.stats["images"] += len(images)
        self.stats["seg_calls"] += int(len(images))
        return out


@dataclasses.dataclass
class BrightCascade:
    """Stand-in for ``steel.model.predictor.BundleCascade`` (same constructor): builds a
    :class:`BrightPredictor` where it is called, after reading the bundle's manifest from the URI it
    was given (so the actor must see the run's resolved bundle folder, holding the weights the driver read)."""

    bundle_uri: str
    thresholds: dict
    tta: str = "none"
    endpoint: str | None = None
    threads: int | None = None
    weights: dict | None = None

    def __call__(self) -> BrightPredictor:
        from steel.model.bundle import Bundle, read_manifest
        from steel.model.predictor import check_weights

        if self.endpoint:
            s3.set_endpoint(self.endpoint)
        manifest = read_manifest(self.bundle_uri)
        if self.weights is not None:
            check_weights(Bundle(self.bundle_uri, manifest), self.weights)
        return BrightPredictor()


@pytest.fixture(scope="module")
def stand_in():
    """The stand-in predictor's factory class, pickled by value so Ray workers need not import tests/."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield BrightCascade
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def check_output(out: str, image_ids: set[str], error_ids: set[str] = frozenset()) -> pd.DataFrame:
    """Every scored image has exactly one row set (4 rows, classes 1..4) in exactly one shard."""
    rows = []
    for name, uri in score_io.complete_shards(out).items():
        df = score_io.read_rows_file(uri)
        df["shard"] = name
        rows.append(df)
    rows = pd.concat(rows, ignore_index=True)
    assert set(rows["ImageId"]) == image_ids
    counts = rows.groupby("ImageId")["ClassId"].agg(list)
    assert all(sorted(v) == [1, 2, 3, 4] for v in counts), counts[counts.map(len) != 4]
    assert rows.groupby("ImageId")["shard"].nunique().max() == 1
    for value in rows["EncodedPixels"]:
        rle.validate(value)
    errors = []
    for uri in storage.list_files(storage.join(out, "errors")) if error_ids else []:
        errors.append(score_io.read_errors_file(uri))
    if error_ids:
        err = pd.concat(errors, ignore_index=True)
        assert set(err["ImageId"]) == set(error_ids) and len(err) == len(error_ids)
    return rows


# --------------------------------------------------------------------------------------------
# Unit tests (no Ray)
# --------------------------------------------------------------------------------------------

def test_shards_are_deterministic_and_disjoint():
    ids = [f"{i:04d}.jpg" for i in range(23)]
    plan = score_io.plan_shards(ids, 5)
    again = score_io.plan_shards(list(reversed(ids)), 5)
    assert [s.name for s in plan] == [s.name for s in again]
    assert [len(s.image_ids) for s in plan] == [5, 5, 5, 5, 3]
    assert sorted(i for s in plan for i in s.image_ids) == ids
    assert all(s.name.startswith("part-") and len(s.name) == 5 + 16 for s in plan)
    assert plan[0].name == score_io.shard_name(ids[:5]) != score_io.shard_name(ids[:4])
    # No separator an id could hold: a newline in a key does not make two sets one name.
    assert score_io.shard_name(["a.jpg", "b.jpg"]) != score_io.shard_name(["a.jpg\nb.jpg"])
    with pytest.raises(ValueError, match="at least 1"):
        score_io.plan_shards(ids, 0)


def test_decode_accepts_jpeg_and_rejects_bad_input_with_reasons():
    good = image_io.decode(jpeg_bytes(1))
    assert good.shape == (H, W, 3) and good.dtype == np.uint8
    gray = image_io.decode(jpeg_bytes(2, mode="L"))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    data = jpeg_bytes(3)
    cases = {
        b"": "empty file",
        b"hello, this is text\n": "not an image",
        data[: len(data) // 2]: "truncated",
        jpeg_bytes(4, fmt="PNG"): "PNG image: only JPEG accepted",
        jpeg_bytes(5, size=(W - 1, H)): "wrong size 1599x256 (expected 1600x256",
        jpeg_bytes(6, mode="CMYK"): "colour mode CMYK",
    }
    for payload, reason in cases.items():
        with pytest.raises(image_io.BadImage, match=reason.replace("(", r"\(")):
            image_io.decode(payload)
    resized = image_io.decode(jpeg_bytes(5, size=(W - 1, H)), allow_resize=True)
    assert resized.shape == (H, W, 3)
    png = image_io.decode(jpeg_bytes(4, fmt="PNG"), formats=("JPEG", "PNG"))
    assert png.shape == (H, W, 3)


def test_list_inputs_uses_relative_paths_as_ids(tmp_path):
    root = str(tmp_path / "in")
    write_images(root, ["b.jpg", "a.jpg", "day2/a.jpg"])
    storage.write_text(storage.join(root, "notes.txt"), "not an image")
    storage.write_text(storage.join(root, "out", "manifest.json"), "{}")
    inputs = listing.list_inputs(root, exclude=storage.join(root, "out")).inputs
    assert list(inputs) == ["a.jpg", "b.jpg", "day2/a.jpg", "notes.txt"]
    assert inputs["day2/a.jpg"] == storage.join(root, "day2/a.jpg")
    with pytest.raises(FileNotFoundError):
        listing.list_inputs(str(tmp_path / "missing"))


def test_shard_files_resume_state_and_recovery(tmp_path):
    out = str(tmp_path / "out")
    result = {"p_defect": 0.7, "p_class": [0.9, 0.1, 0.2, 0.3], "masks": ["1 3", "", "", "10 2"],
              "areas": [3, 0, 0, 2]}
    a = score_io.ShardResult("part-a", ["x.jpg", "y.jpg"])
    a.add_scored("x.jpg", result)
    a.add_scored("x.jpg", result)  # a retried task's duplicate is ignored
    assert not a.complete
    with pytest.raises(RuntimeError, match="not complete"):
        a.write(out, "parquet")
    a.add_error("y.jpg", "/in/y.jpg", "empty file (0 bytes)")
    entry = a.write(out, "parquet")
    assert entry == {"images": ["x.jpg", "y.jpg"], "scored": 1, "errors": 1, "file": "part-a.parquet"}
    df = score_io.read_rows_file(score_io.shard_uri(out, "part-a", "parquet"))
    assert list(df["ClassId"]) == [1, 2, 3, 4] and list(df["EncodedPixels"]) == ["1 3", "", "", "10 2"]
    assert df["p_class_3"].iloc[0] == pytest.approx(0.2) and df["area_4"].iloc[0] == 2
    # The index file written after the shard is the record of its images.
    index = json.loads(storage.read_text(score_io.index_uri(out, "part-a")))
    assert index["images"] == ["x.jpg", "y.jpg"] and (index["scored"], index["errors"]) == (1, 1)
    done, owner = score_io.done_images(out, None)
    assert owner == {"x.jpg": "part-a", "y.jpg": "part-a"} and not done["part-a"].get("recovered")
    # Killed between the shard and its index: the shard's images are recovered from its files.
    storage.delete(score_io.index_uri(out, "part-a"))
    done, owner = score_io.done_images(out, None)
    assert owner == {"x.jpg": "part-a", "y.jpg": "part-a"} and done["part-a"]["recovered"]
    errors = score_io.read_errors_file(score_io.errors_uri(out, "part-a"))
    assert list(errors["kind"]) == ["decode"]
    # A stale errors file of a shard that never completed is removed; complete ones stay.
    storage.write_text(score_io.errors_uri(out, "part-b"), "ImageId,file,reason\n")
    assert score_io.remove_orphan_errors(out, {"part-a"}) == ["part-b"]
    assert storage.exists(score_io.errors_uri(out, "part-a"))
    # The same image in two complete shards (two runs wrote it): it belongs to the shard written first,
    # whatever the names say; the other one lists it as ignored. Nothing blocks the next run.
    score_io.write_index(out, "part-a", {**score_io.shard_contents(out, "part-a", score_io.shard_uri(out, "part-a", "parquet")),
                                         "written_at": "2026-12-02T01:00:00Z"})
    b = score_io.ShardResult("part-b", ["x.jpg"])
    b.add_scored("x.jpg", result)
    b.write(out, "parquet", {"written_at": "2026-12-01T01:00:00Z"})
    done, owner = score_io.done_images(out, None)
    assert owner == {"x.jpg": "part-b", "y.jpg": "part-a"}
    assert done["part-a"]["ignored"] == ["x.jpg"] and "ignored" not in done["part-b"]


def test_cascade_actor_isolates_failing_images_and_passes_errors():
    from steel.score.stages import CascadeActor, decode_batch

    actor = CascadeActor(BrightPredictor)
    images = np.stack([image_io.decode(jpeg_bytes(i)) for i in range(3)])
    images[1] = 0  # the stand-in raises on black images
    batch = {"shard": np.array(["s"] * 4, dtype=object), "image_id": np.array(list("abcd"), dtype=object),
             "file": np.array(list("abcd"), dtype=object),
             "image": np.concatenate([images, np.zeros((1, H, W, 3), np.uint8)]),
             "error": np.array(["", "", "", "empty file (0 bytes)"], dtype=object)}
    out = actor(batch)
    assert list(out["error"][[0, 2]]) == ["", ""]
    assert out["error"][1] == "scoring failed: RuntimeError: black image"
    assert out["error"][3] == "empty file (0 bytes)"
    assert list(out["error_kind"]) == ["", "transient", "", "decode"]  # a predictor failure is never a row
    assert out["mask_1"][0] and rle.area(out["mask_1"][0]) == out["area_1"][0] > 0
    assert json.loads(out["stats"][0]) == {"images": 2, "seg_calls": 2}
    # a file deleted since the listing is "gone": no row, the next listing decides
    dec = decode_batch({"shard": ["s"], "image_id": ["z"], "file": ["/no/such/file.jpg"]})
    assert dec["error"][0].startswith("deleted since it was listed:")
    assert dec["error_kind"][0] == "gone"


# --------------------------------------------------------------------------------------------
# Integration tests on a local Ray (stand-in predictor)
# --------------------------------------------------------------------------------------------

BAD_FILES = {
    "bad_corrupt.jpg": lambda: b"\xff\xd8\xff\xe0" + b"\x00" * 50 + jpeg_bytes(9)[200:2000],
    "bad_empty.jpg": lambda: b"",
    "bad_text.jpg": lambda: b"this is a text file, not a JPEG\n",
    "bad_png.png": lambda: jpeg_bytes(10, fmt="PNG"),
    "bad_size.jpg": lambda: jpeg_bytes(11, size=(W - 1, H)),
}


def test_score_local_with_bad_inputs_and_merge(ray_local, stand_in, tiny_bundle, tmp_path):
    from steel.score import merge
    from steel.score.run import format_summary, score

    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    good = [f"img{i:02d}.jpg" for i in range(9)]
    write_images(images, good)
    for name, make in BAD_FILES.items():
        storage.write_bytes(storage.join(images, name), make())
    cfg = ScoreConfig(batch_size=3, images_per_shard=4, format="parquet", settle_s=0)  # written long ago
    summary = score(tiny_bundle, images, out, cfg, predictor=stand_in)
    assert summary["images_in"] == 14 == summary["scored"] + summary["errors"]
    assert (summary["scored"], summary["errors"], summary["shards_written"]) == (9, 5, 4)
    assert summary["gating"] == {"images": 9, "seg_calls": 9}
    rows = check_output(out, set(good), set(BAD_FILES))
    assert (rows.loc[rows["ClassId"] == 1, "EncodedPixels"] != "").all()  # the bright rectangles
    assert {"p_defect", "p_class_1", "area_1"} <= set(rows.columns)
    errors = pd.concat([score_io.read_errors_file(u) for u in storage.list_files(storage.join(out, "errors"))])
    reasons = dict(zip(errors["ImageId"], errors["reason"]))
    assert reasons["bad_empty.jpg"] == "empty file (0 bytes)"
    assert reasons["bad_text.jpg"].startswith("not an image")
    assert reasons["bad_corrupt.jpg"].startswith(("not an image", "corrupt or truncated", "unreadable"))
    assert reasons["bad_png.png"].startswith("PNG image: only JPEG accepted")
    assert reasons["bad_size.jpg"].startswith("wrong size 1599x256")
    assert set(errors["file"]) == {storage.join(images, n) for n in BAD_FILES}
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["counts"]["images_in"] == 14 and manifest["totals"]["images"] == 14
    done, _ = score_io.done_images(out)
    assert sorted(i for s in done.values() for i in s["images"]) == sorted(good + list(BAD_FILES))
    assert storage.exists(storage.join(out, "_SUCCESS"))
    assert set(errors["kind"]) == {"decode"}
    # 5 permanent errors out of 14 is above the default max_error_rate (5%): an operator is told.
    assert summary["problems"] == ["permanent-error rate 35.7% (5/14) is above score.max_error_rate 5.0%"]
    record = json.loads(storage.read_text(score_io.run_record_uri(out, summary["run_id"])))
    assert (record["images_in"], record["scored"], record["errors"], record["transient_failures"]) == (14, 9, 5, 0)
    assert record["defect_image_rate"] == {"1": 1.0, "2": 0.0, "3": 0.0, "4": 0.0}
    # The bundle's provenance, read from its manifest: which weights scored these rows.
    from steel.model.bundle import content_version, read_manifest

    manifest_b = read_manifest(tiny_bundle)
    assert record["bundle"]["uri"] == tiny_bundle and record["ended_at"]
    assert record["bundle"]["version"] == content_version(manifest_b, None)
    assert record["bundle"]["models"]["seg3"]["sha256"] == manifest_b["models"]["seg3"]["sha256"]
    assert "9 scored, 5 errors" in format_summary(summary)

    sub = str(tmp_path / "submission.csv")
    s = merge.merge(out, sub, layout="combined", fill_errors=True)
    assert (s["images"], s["rows"], s["errors"]) == (14, 56, 5)
    table = pd.read_csv(sub, keep_default_na=False)
    assert list(table.columns) == ["ImageId_ClassId", "EncodedPixels"]
    assert list(table["ImageId_ClassId"]) == sorted(table["ImageId_ClassId"], key=lambda v: (v[:-2], v[-1]))

    # Nothing new: a second run writes nothing and scores nothing.
    again = score(tiny_bundle, images, out, cfg, predictor=stand_in)
    assert (again["images_in"], again["shards_written"], again["shards_skipped"]) == (0, 0, 4)


def test_resume_after_crash_then_incremental_run(ray_local, stand_in, tiny_bundle, tmp_path, monkeypatch):
    from steel.core.faults import SCORE_FAIL_AFTER_ENV as FAIL_AFTER_ENV
    from steel.score import merge
    from steel.score.run import score

    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    first = [f"a{i:02d}.jpg" for i in range(12)]
    write_images(images, first)
    cfg = ScoreConfig(batch_size=2, images_per_shard=3)

    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(RuntimeError, match="injected failure after 2 shards"):
        score(tiny_bundle, images, out, cfg, predictor=stand_in)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    assert len(score_io.complete_shards(out)) == 2
    assert not storage.exists(storage.join(out, "_SUCCESS"))
    with pytest.raises(merge.MergeError, match="not finished"):
        merge.merge(out, str(tmp_path / "partial.csv"))

    resumed = score(tiny_bundle, images, out, cfg, predictor=stand_in)
    assert (resumed["images_already_scored"], resumed["images_in"]) == (6, 6)
    assert (resumed["shards_skipped"], resumed["shards_written"]) == (2, 2)
    check_output(out, set(first))
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert len(storage.list_files(storage.join(out, "index"))) == 4  # the 2 crashed-run shards got theirs

    # Nightly: new images arrive (one in a subfolder with a clashing file name); only they are scored.
    new = ["b00.jpg", "b01.jpg", "late/a00.jpg"]
    write_images(images, new, start=100)
    before = {u: storage.read_bytes(u) for u in score_io.complete_shards(out).values()}
    nightly = score(tiny_bundle, images, out, cfg, predictor=stand_in)
    assert (nightly["images_listed"], nightly["images_in"], nightly["scored"]) == (15, 3, 3)
    assert (nightly["shards_written"], nightly["shards_skipped"]) == (1, 4)
    assert all(storage.read_bytes(u) == data for u, data in before.items())  # old shards untouched
    check_output(out, set(first) | set(new))
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["totals"] == {"shards": 5, "images": 15, "scored": 15, "errors": 0}
    records = score_io.read_run_records(out)
    assert [r["status"] for r in records] == ["failed", "ok", "ok"]
    assert [r["images_in"] for r in records[1:]] == [6, 3]
    s = merge.merge(out, str(tmp_path / "sub.csv"))
    assert (s["images"], s["rows"]) == (15, 60)



def test_score_from_and_to_s3(ray_local, stand_in, tiny_bundle, s3_bucket, tmp_path):
    from steel.score import merge
    from steel.score.run import score

    images, out = f"s3://{s3_bucket}/archive/2026-11-24", f"s3://{s3_bucket}/scores/nightly"
    good = [f"s{i}.jpg" for i in range(5)]
    write_images(images, good)
    storage.write_bytes(storage.join(images, "zero.jpg"), b"")  # an upload that has not finished?
    cfg = ScoreConfig(batch_size=2, images_per_shard=4)
    summary = score(tiny_bundle, images, out, cfg, predictor=stand_in)
    # Written a moment ago (S3's clock, score.settle_s 60 s) and not decodable: pending, not an error row.
    assert (summary["images_in"], summary["scored"], summary["errors"], summary["images_settling"]) == (6, 5, 0, 1)
    assert summary["pending"] == {"zero.jpg": storage.join(images, "zero.jpg")} and summary["status"] == "ok"
    assert storage.exists(storage.join(out, "_SUCCESS"))
    # Once it is older than settle_s (here: 0), still empty, it is a permanent error row.
    summary = score(tiny_bundle, images, out, dataclasses.replace(cfg, settle_s=0), predictor=stand_in)
    assert (summary["images_in"], summary["scored"], summary["errors"], summary["images_settling"]) == (1, 0, 1, 0)
    assert summary["pending"] == {}
    check_output(out, set(good), {"zero.jpg"})
    assert storage.exists(storage.join(out, "_SUCCESS"))
    s = merge.merge(out, storage.join(out, "submission.csv"))
    assert (s["images"], s["rows"]) == (5, 20)
    table = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(out, "submission.csv"))), keep_default_na=False)
    assert sorted(set(table["ImageId"])) == good


# --------------------------------------------------------------------------------------------
# A tiny real bundle: random-weight models through steel.model.bundle + steel.model.predictor
# --------------------------------------------------------------------------------------------

TINY = {"classifier": dict(encoder="simplecnn", input_size=(32, 160), encoder_weights="none", dense_units=(8,)),
        "segmenter": dict(encoder="mobilenetv2_035", input_size=(32, 160), encoder_weights="none",
                          decoder_filters=(16, 8, 8, 4, 4))}


def tiny_models():
    from steel.model import networks as models

    built, specs = {}, {}
    for name in MODEL_NAMES:
        kw = TINY["segmenter" if is_segmenter(name) else "classifier"]
        built[name] = models.build(name, **kw)
        specs[name] = models.resolve_spec(name, **kw)
    return built, specs


def visible_thresholds(built, specs, images: np.ndarray) -> dict:
    """Thresholds under which random-weight models give gating and non-empty masks on ``images``:
    the binary gate at the median p_defect (about half pass), classes 1-2 always pass with the pixel
    threshold at the median probability (masks of about half the image), classes 3-4 never pass."""
    from steel.model.cascade import Cascade
    from steel.model.predictor import traced_callable
    from steel.model.thresholds import default_thresholds

    th = default_thresholds()
    probe = Cascade({n: traced_callable(m) for n, m in built.items()},
                    {n: s["input_size"] for n, s in specs.items()}, th,
                    preprocessing={n: s["preprocessing"] for n, s in specs.items()})
    probs = probe.predict_probabilities(images)
    th["binary"] = float(np.median(probs["p_defect"]))
    for k in (1, 2, 3, 4):
        seg = probs["seg"][k]
        th["classes"][str(k)] = {"prob": 0.0 if k <= 2 else 1.0, "pixel": float(np.median(seg)),
                                 "min_area": 0, "max_area": H * W}
    return th


@pytest.mark.slow
def test_cli_scores_s3_images_with_a_tiny_real_bundle(ray_local, s3_bucket, tmp_path, capsys):
    from steel.cli import main
    from steel.model import bundle as bundle_lib
    from steel.score import merge

    root = f"s3://{s3_bucket}"
    images, out, bundle = f"{root}/images", f"{root}/scores", f"{root}/bundle"
    names = [f"t{i}.jpg" for i in range(6)]
    write_images(images, names)
    storage.write_bytes(storage.join(images, "broken.jpg"), b"not a jpeg")
    built, specs = tiny_models()
    decoded = np.stack([image_io.decode(storage.read_bytes(storage.join(images, n))) for n in names])
    bundle_lib.save_bundle(bundle, built, specs, {"test": "tiny"})
    save_thresholds(bundle, visible_thresholds(built, specs, decoded))

    rc = main(["score", "--bundle", bundle, "--images", images, "--out", out, "--batch-size", "4",
               "--images-per-shard", "4", "--format", "parquet", "--set", "score.max_error_rate=0.2",
               "--set", "score.settle_s=0"])  # broken.jpg is an old file: an error row at once
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "7 images" in printed and "6 scored, 1 errors" in printed
    rows = check_output(out, set(names), {"broken.jpg"})
    masks = rows[rows["EncodedPixels"] != ""]
    assert len(masks) > 0 and set(masks["ClassId"]) <= {1, 2}  # classes 3-4 are gated off
    assert (rows.loc[rows["ClassId"] >= 3, "EncodedPixels"] == "").all()
    for r in masks.itertuples():
        assert rle.area(r.EncodedPixels) == getattr(r, f"area_{r.ClassId}")
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["bundle"]["created_at"] == bundle_lib.read_manifest(bundle)["created_at"]
    assert manifest["thresholds"]["classes"]["3"]["prob"] == 1.0
    gating = manifest["gating"]
    assert gating["images"] == 6 and gating["seg_calls_per_class"]["3"] == 0
    assert gating["multilabel_calls"] + gating["multilabel_calls_saved"] == 6
    assert gating["seg_calls"] + gating["seg_calls_saved"] == 24

    s = merge.merge(out, str(tmp_path / "submission.csv"))
    assert (s["images"], s["rows"], s["errors"]) == (6, 24, 1)


def test_cli_flags_override_the_config(tmp_path, monkeypatch, capsys):
    from steel.cli import main
    from steel.score import run as scoring

    seen = {}

    def fake_score(bundle, images, out, cfg, thresholds=None, ray_address=None):
        seen.update(bundle=bundle, images=images, out=out, cfg=cfg, thresholds=thresholds)
        summary = {"images_uri": images, "out": out, "images_listed": 3, "images_already_scored": 0,
                   "images_in": 3, "scored": 0, "errors": 3, "shards_written": 1, "shards_skipped": 0,
                   "error_reasons": {"empty file": 3}, "error_examples": [], "gating": {},
                   "timings": {"total_s": 1.0, "images_per_s": 3.0}}
        return {**summary, "problems": scoring.exit_problems(summary, cfg)}

    monkeypatch.setattr(scoring, "score", fake_score)
    config = tmp_path / "c.yaml"
    config.write_text("bundle: /b\ndata:\n  root: /data\nscore:\n  out: /o\n  actors: 3\n  batch_size: 5\n")
    rc = main(["score", "--config", str(config), "--batch-size", "2", "--tta", "hv", "--allow-resize",
               "--image-formats", "jpeg,png", "--gpus-per-actor", "0.5"])
    assert rc == 1  # nothing could be scored
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "FAILED" in last and "no image could be scored" in last and "permanent-error rate 100.0%" in last
    cfg = seen["cfg"]
    assert (seen["bundle"], seen["images"], seen["out"]) == ("/b", "/data/test_images", "/o")
    assert (cfg.actors, cfg.batch_size, cfg.tta, cfg.allow_resize, cfg.gpus_per_actor) == (3, 2, "hv", True, 0.5)
    assert cfg.image_formats == ["JPEG", "PNG"] and cfg.format == "csv"
