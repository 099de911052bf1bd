"""steel.train.data: label lookup, batch preparation (no Ray) and the Ray Data pipeline (local + S3)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from steel.data import images, rle

H, W = 256, 1600


def make_tiny_dataset(root: Path, n: int = 24, seed: int = 0) -> Path:
    """``n`` 256x1600 JPEGs in ``root/train_images`` + ``root/train.csv`` (ImageId,ClassId,EncodedPixels).

    Every class occurs on several images (so each seg model has train and val images); a quarter of
    the images have no defect. Defects are bright rectangles on a textured dark background, so the
    masks are learnable.
    """
    rng = np.random.default_rng(seed)
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    rows = []
    defect_images = 0
    for i in range(n):
        image_id = f"{i:04x}tiny.jpg"
        img = rng.integers(40, 80, size=(H, W), dtype=np.uint8)
        classes = []
        if i % 4 != 3:  # classes cycle over the defect images; some also get class 3
            classes = [1 + defect_images % 4]
            if defect_images % 5 == 0 and classes[0] != 3:
                classes.append(3)
            defect_images += 1
        used = np.zeros((H, W), bool)
        for k in classes:
            mask = np.zeros((H, W), np.uint8)
            for _ in range(2):
                y, x = int(rng.integers(0, H - 64)), int(rng.integers(0, W - 200))
                mask[y:y + 48, x:x + 160] = 1
            mask[used] = 0  # classes do not overlap
            used |= mask.astype(bool)
            img[mask.astype(bool)] = 200 + 10 * k
            rows.append({"ImageId": image_id, "ClassId": k, "EncodedPixels": rle.encode(mask)})
        buf = io.BytesIO()
        Image.fromarray(np.stack([img] * 3, -1)).save(buf, format="JPEG", quality=92)
        (root / "train_images" / image_id).write_bytes(buf.getvalue())
    pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"]).to_csv(root / "train.csv", index=False)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from steel.data.labels import load_labels

    root = make_tiny_dataset(tmp_path_factory.mktemp("tinydata"))
    wide = load_labels(str(root / "train.csv"), images=str(root / "train_images"))
    return root, wide


def _batch(root: Path, ids: list[str]) -> dict:
    return {"path": np.array([str(root / "train_images" / i) for i in ids], dtype=object),
            "bytes": np.array([(root / "train_images" / i).read_bytes() for i in ids], dtype=object)}


def test_label_lookup_per_model(tiny):
    from steel.train.data import label_lookup

    _, wide = tiny
    binary = label_lookup(wide, "binary")
    assert len(binary) == len(wide) == 24
    assert sum(float(v[0]) for v in binary.values()) == int(wide["hasDefect"].sum())
    multi = label_lookup(wide, "multilabel")
    assert len(multi) == int(wide["hasDefect"].sum()) and all(v.shape == (4,) for v in multi.values())
    assert all(v.sum() >= 1 for v in multi.values())
    seg3 = label_lookup(wide, "seg3")
    assert set(seg3) == set(wide.loc[wide["hasDefect_3"] == 1, "ImageId"])
    assert all(isinstance(v, str) and v for v in seg3.values())
    with pytest.raises(ValueError, match="unknown model"):
        label_lookup(wide, "seg5")


def test_prepare_batch_classifier_and_segmenter(tiny):
    from steel.train.data import label_lookup, prepare_batch

    root, wide = tiny
    ids = wide.loc[wide["hasDefect_3"] == 1, "ImageId"].tolist()[:3]
    out = prepare_batch(_batch(root, ids), name="multilabel", labels=label_lookup(wide, "multilabel"),
                        input_size=(32, 160))
    assert out["image"].shape == (3, 32, 160, 3) and out["image"].dtype == np.float32
    decoded = np.stack([images.resize(images.decode((root / "train_images" / i).read_bytes())[None], (32, 160))[0]
                        for i in ids])
    np.testing.assert_allclose(out["image"], decoded / np.float32(255.0), atol=1e-6)  # unit scaling of these pixels
    expected = wide.set_index("ImageId").loc[ids, [f"hasDefect_{k}" for k in (1, 2, 3, 4)]].to_numpy()
    np.testing.assert_array_equal(out["label"], expected.astype(np.float32))

    seg = prepare_batch(_batch(root, ids), name="seg3", labels=label_lookup(wide, "seg3"),
                        input_size=(64, 320))
    assert seg["label"].shape == (3, 64, 320, 1) and seg["label"].dtype == np.float32
    assert set(np.unique(seg["label"])) <= {0.0, 1.0}
    # The mask is the nearest-resized decoded RLE, and lies on the bright pixels of the image.
    full = rle.decode(wide.set_index("ImageId").loc[ids[0], "Defect_3"])
    assert abs(seg["label"][0].mean() - full.mean()) < 0.01
    on = seg["image"][0][seg["label"][0][..., 0] > 0].mean()
    off = seg["image"][0][seg["label"][0][..., 0] == 0].mean()
    assert on > off + 0.3


def test_decoded_rows_finish_to_the_streamed_rows(tiny):
    """The worker cache's two steps (decode once, finish per epoch) give what prepare_batch gives."""
    from steel.train.data import decode_batch, finish_batch, label_lookup, prepare_batch

    root, wide = tiny
    for name, size in (("seg3", (64, 320)), ("binary", (32, 160)), ("unified", (32, 160))):
        labels = label_lookup(wide, name)
        ids = list(labels)[:3]
        decoded = decode_batch(_batch(root, ids), name=name, labels=labels, input_size=size)
        assert decoded["image"].dtype == np.uint8 and decoded["image"].shape == (3, *size, 3)
        kept = {k: v.copy() for k, v in decoded.items()}
        finished = finish_batch(decoded, name=name, augment=True, blackout_prob=1.0, seed=0, preprocessing="imagenet")
        streamed = prepare_batch(_batch(root, ids), name=name, labels=labels, input_size=size, augment=True,
                                 blackout_prob=1.0, seed=0, preprocessing="imagenet")
        assert set(finished) == set(streamed)
        for k in streamed:
            np.testing.assert_array_equal(finished[k], streamed[k])
        for k in kept:  # the cached rows stay as decoded (a new augmentation every epoch)
            np.testing.assert_array_equal(decoded[k], kept[k])


def test_prepare_batch_errors_name_the_file(tiny, tmp_path):
    from steel.train.data import label_lookup, prepare_batch

    root, wide = tiny
    labels = label_lookup(wide, "binary")
    bad = {"path": np.array([str(tmp_path / "broken.jpg")], dtype=object),
           "bytes": np.array([b"not a jpeg"], dtype=object)}
    with pytest.raises(ValueError, match="broken.jpg"):
        prepare_batch(bad, name="binary", labels={**labels, "broken.jpg": np.float32([0])}, input_size=(32, 160))
    with pytest.raises(ValueError, match="no label for ImageId"):
        prepare_batch(bad, name="binary", labels=labels, input_size=(32, 160))


def test_augmentation_keeps_shapes_and_mask_alignment(tiny):
    from steel.train.data import label_lookup, prepare_batch

    root, wide = tiny
    ids = wide.loc[wide["hasDefect_1"] == 1, "ImageId"].tolist()[:4]
    seg = prepare_batch(_batch(root, ids), name="seg1", labels=label_lookup(wide, "seg1"), input_size=(64, 320),
                        augment=True, blackout_prob=0.0, seed=3)
    assert seg["image"].shape == (4, 64, 320, 3) and seg["label"].shape == (4, 64, 320, 1)
    # Flips move mask and image together: masked pixels stay the bright ones.
    for img, mask in zip(seg["image"], seg["label"][..., 0]):
        if mask.any():
            assert img[mask > 0].mean() > img[mask == 0].mean() + 0.3
    cls = prepare_batch(_batch(root, ids), name="binary", labels=label_lookup(wide, "binary"),
                        input_size=(32, 160), augment=True, seed=3)
    assert cls["image"].shape == (4, 32, 160, 3) and cls["label"].shape == (4, 1)
    plain = prepare_batch(_batch(root, ids), name="binary", labels=label_lookup(wide, "binary"),
                          input_size=(32, 160))
    assert not np.allclose(cls["image"], plain["image"])  # something was transformed
    np.testing.assert_array_equal(cls["label"], plain["label"])


@pytest.mark.slow
def test_ray_dataset_local_reads_only_model_images(tiny, ray_local):
    from steel.train.data import build_dataset

    root, wide = tiny
    ds = build_dataset(wide, str(root / "train_images"), "seg2", (32, 160), shuffle=True)
    rows = list(ds.iter_rows())
    assert len(rows) == int(wide["hasDefect_2"].sum())
    for r in rows:
        assert r["image"].shape == (32, 160, 3) and r["label"].shape == (32, 160, 1)
        assert r["label"].max() == 1.0  # every seg2 image has class 2
    ds = build_dataset(wide, str(root / "train_images"), "binary", (32, 160))
    labels = sorted(float(b["label"][0]) for b in ds.iter_rows())
    assert labels == sorted(wide["hasDefect"].astype(float).tolist())


@pytest.mark.slow
def test_ray_dataset_from_s3(tiny, ray_local, s3_bucket):
    import boto3

    from steel.train.data import build_dataset

    root, wide = tiny
    s3 = boto3.client("s3")
    ml = wide[wide["hasDefect"] == 1]
    for image_id in ml["ImageId"]:
        s3.put_object(Bucket=s3_bucket, Key=f"data/train_images/{image_id}",
                      Body=(root / "train_images" / image_id).read_bytes())
    ds = build_dataset(ml, f"s3://{s3_bucket}/data/train_images", "multilabel", (32, 160))
    batches = list(ds.iter_batches(batch_size=100, batch_format="numpy"))
    total = sum(len(b["label"]) for b in batches)
    assert total == len(ml)
    got = np.concatenate([b["label"] for b in batches]).sum(axis=0)
    np.testing.assert_array_equal(got, ml[[f"hasDefect_{k}" for k in (1, 2, 3, 4)]].sum().to_numpy())
