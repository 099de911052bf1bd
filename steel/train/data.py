"""Ray Data pipelines that feed the six models during training.

For one model and one split of the wide label table (``steel.data.labels``), :func:`build_dataset` returns
a lazy ``ray.data.Dataset`` with two columns:

- ``image``: float32 ``H x W x 3`` at the model's input size, scaled by the model's preprocessing;
- ``label``: float32 ``[1]`` (binary: ``hasDefect``), ``[4]`` (multilabel: ``hasDefect_1..4``) or
  ``H x W x 1`` (segK: the class-K mask, decoded from ``Defect_K`` with :func:`steel.data.rle.decode`).

The ``unified`` model has two label columns instead of ``label``: ``cls`` float32 ``[5]``
(``hasDefect``, ``hasDefect_1..4``) and ``mask`` float32 ``H x W x 4`` (the four class masks, decoded
the same way as segK's, one channel each).

Which images: :func:`steel.data.labels.subset` (binary = all, multilabel = defect images, segK = images
with class K). Only those files are read (``read_binary_files`` on the explicit list of paths through
the pyarrow filesystem of :func:`steel.core.storage.resolve`, so custom S3 endpoints work). The JPEG bytes
are decoded and resized by :mod:`steel.data.images` (the decoder and resize scoring uses; nearest for
masks), augmented (uint8), scaled by the model's preprocessing (``steel.data.images.preprocess``) and
labelled in one ``map_batches`` step on CPU workers, so training workers receive ready batches. Labels travel as a
small ``ImageId -> label`` dict with the map function (a few bytes per image; the RLE string per image
for segmenters), never as a join.

Nothing is materialised in the driver: the dataset is re-executed each time it is iterated (each
epoch), which re-reads the files, shuffles the file order (training only) and draws fresh random
augmentations. With ``decoded=True`` the pipeline stops before augmentation (:func:`decode_batch`):
training workers read it once, keep the uint8 rows and run :func:`finish_batch` themselves every
epoch (``steel.train.run``'s worker cache); :func:`prepare_batch` is the two steps in one.

Augmentation (training only, ``steel.data.augment``): classifiers get the seed's ``ImageDataGenerator``
settings (shear, zoom, rotation, shifts, flips); segmenters get joint image+mask flips plus "defect
blackout" with probability ``blackout_prob``.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import numpy as np
import pandas as pd

from steel.core.names import CLASSES, UNIFIED, class_of, is_segmenter
from steel.data import rle

# Rows per map_batches call: small, because a decoded 256x1600 RGB frame is 1.2 MB and each output
# row is float32 at the model's input size.
MAP_BATCH = 8


def label_columns(name: str) -> list[str]:
    """Label columns of ``name``'s dataset: ``["cls", "mask"]`` (unified) or ``["label"]``."""
    return ["cls", "mask"] if name == UNIFIED else ["label"]


def _mask_classes(name: str) -> tuple[int, ...]:
    """Classes whose masks make ``name``'s target: (k,) for segK, all four for unified, () otherwise."""
    if name == UNIFIED:
        return CLASSES
    return (class_of(name),) if is_segmenter(name) else ()


def model_rows(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Rows of the wide table that ``name`` trains on (``steel.data.labels.subset``)."""
    from steel.data.labels import subset

    missing = [c for c in ("ImageId", "hasDefect", *(f"hasDefect_{k}" for k in CLASSES),
                           *(f"Defect_{k}" for k in CLASSES)) if c not in table.columns]
    if missing:
        raise ValueError(f"label table lacks columns {missing}; expected the wide table of "
                         "steel.data.labels.load_labels")
    return subset(table, name)


def label_lookup(table: pd.DataFrame, name: str) -> dict[str, Any]:
    """``ImageId -> label`` for ``name``: float32 arrays for classifiers, the RLE string for segmenters,
    ``(cls float32 [5], [4 RLE strings])`` for unified."""
    rows = model_rows(table, name)
    ids = rows["ImageId"].astype(str).tolist()
    if name == UNIFIED:
        cls = rows[["hasDefect", *(f"hasDefect_{k}" for k in CLASSES)]].to_numpy(np.float32)
        rles = rows[[f"Defect_{k}" for k in CLASSES]].fillna("").astype(str).to_numpy().tolist()
        return dict(zip(ids, zip(cls, rles)))
    if name == "binary":
        values = rows["hasDefect"].to_numpy(np.float32)[:, None]
        return dict(zip(ids, values))
    if name == "multilabel":
        values = rows[[f"hasDefect_{k}" for k in CLASSES]].to_numpy(np.float32)
        return dict(zip(ids, values))
    k = class_of(name)
    return dict(zip(ids, rows[f"Defect_{k}"].fillna("").astype(str).tolist()))


def decode_batch(batch: dict[str, np.ndarray], *, name: str, labels: dict[str, Any],
                 input_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """``{"path", "bytes"}`` rows from ``read_binary_files`` -> decoded rows at ``input_size``, before
    augmentation (what a training worker can keep in memory: uint8 pixels, compact labels).

    Decodes each JPEG (``steel.data.images.decode``: 256x1600 JPEG, else a ValueError naming the file),
    looks its label up by file name, decodes the class mask(s) (segmenters, unified) and resizes both
    to ``input_size`` (nearest for masks). Columns: ``image`` uint8 ``N x H x W x 3`` and ``label``
    (uint8 mask ``N x H x W`` for segK, float32 ``N x 1|4`` for the classifiers), or for unified
    ``cls`` float32 ``N x 5`` and ``mask`` uint8 ``N x H x W x 4``. :func:`finish_batch` turns them
    into model rows.
    """
    from steel.data import images as image_io

    mask_classes = _mask_classes(name)
    unified = name == UNIFIED
    size = (int(input_size[0]), int(input_size[1]))
    images, targets, cls = [], [], []
    for path, data in zip(batch["path"], batch["bytes"]):
        path = str(path)
        image_id = posixpath.basename(path.replace("\\", "/"))
        if image_id not in labels:
            raise ValueError(f"{path}: no label for ImageId {image_id!r} in the {name} label table")
        try:
            img = image_io.decode(bytes(data))
        except image_io.BadImage as e:
            raise ValueError(f"{path}: {e}") from None
        if mask_classes:
            label = labels[image_id]
            if unified:
                cls.append(np.asarray(label[0], np.float32))
            rles = label[1] if unified else [label]
            channels = []
            for k, text in zip(mask_classes, rles):
                try:
                    mask = rle.decode(text, shape=img.shape[:2])
                except rle.RLEError as e:
                    raise ValueError(f"{path}: bad Defect_{k} RLE for image of shape "
                                     f"{img.shape[:2]}: {e}") from None
                channels.append(image_io.resize(mask[None], size, nearest=True)[0])
            targets.append(np.stack(channels, axis=-1) if unified else channels[0])
        else:
            targets.append(np.asarray(labels[image_id], np.float32))
        images.append(image_io.resize(img[None], size)[0])
    image_arr = np.stack(images) if images else np.zeros((0, *size, 3), np.uint8)
    if mask_classes:
        empty = (0, *size, 4) if unified else (0, *size)
        label_arr = np.stack(targets).astype(np.uint8) if targets else np.zeros(empty, np.uint8)
    else:
        label_arr = np.stack(targets) if targets else np.zeros((0, 4 if name == "multilabel" else 1),
                                                               np.float32)
    if unified:
        return {"image": image_arr, "cls": np.stack(cls) if cls else np.zeros((0, 5), np.float32),
                "mask": label_arr}
    return {"image": image_arr, "label": label_arr}


def finish_batch(batch: dict[str, np.ndarray], *, name: str, augment: bool = False, blackout_prob: float = 0.0,
                 seed: int | None = None, preprocessing: str | None = None) -> dict[str, np.ndarray]:
    """Decoded rows (:func:`decode_batch`) -> model rows: when ``augment`` the model's training
    augmentation, then the pixels scaled by ``preprocessing`` (the model spec's; None: ``unit``,
    [0, 1]) and the labels as float32 targets (masks ``N x H x W x 1``, or ``x 4`` for unified).
    The input arrays are not modified."""
    from steel.data import images as image_io

    unified = name == UNIFIED
    image_arr = batch["image"]
    label_arr = batch["mask"] if unified else batch["label"]
    had_defect = label_arr.reshape(len(label_arr), -1).any(axis=1) if unified else None
    if augment and len(image_arr):
        image_arr, label_arr = _augment(name, image_arr, label_arr, blackout_prob, seed)
    out_images = image_io.preprocess(image_arr, preprocessing)
    if unified:
        cls_arr = np.array(batch["cls"], np.float32)
        # Blackout painted every defect out of these images: they are clean now, for the head too.
        blacked = had_defect & ~label_arr.reshape(len(label_arr), -1).any(axis=1)
        cls_arr[blacked] = 0.0
        return {"image": out_images, "cls": cls_arr, "mask": (label_arr > 0).astype(np.float32)}
    if _mask_classes(name):
        out_labels = (label_arr > 0).astype(np.float32)[..., None]
    else:
        out_labels = label_arr.astype(np.float32)
    return {"image": out_images, "label": out_labels}


def prepare_batch(batch: dict[str, np.ndarray], *, name: str, labels: dict[str, Any],
                  input_size: tuple[int, int], augment: bool = False, blackout_prob: float = 0.0,
                  seed: int | None = None, preprocessing: str | None = None) -> dict[str, np.ndarray]:
    """``{"path", "bytes"}`` rows from ``read_binary_files`` -> ``{"image", "label"}`` model rows:
    :func:`decode_batch` then :func:`finish_batch` (see those for the steps and the columns)."""
    decoded = decode_batch(batch, name=name, labels=labels, input_size=input_size)
    return finish_batch(decoded, name=name, augment=augment, blackout_prob=blackout_prob, seed=seed,
                        preprocessing=preprocessing)


def _augment(name: str, images: np.ndarray, labels: np.ndarray, blackout_prob: float,
             seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Training augmentation of a uint8 batch (``steel.data.augment``); masks move with their images."""
    from steel.data import augment

    rng = np.random.default_rng(seed)
    if _mask_classes(name):
        return augment.augment_segmentation(images, labels, blackout_prob=blackout_prob, rng=rng)
    return augment.augment_classifier(images, rng=rng), labels


def image_paths(images_uri: str, image_ids: list[str]) -> tuple[list[str], Any]:
    """Filesystem paths (``bucket/key`` on S3) of ``image_ids`` under ``images_uri``, and the filesystem."""
    from steel.core import storage

    fs, root = storage.resolve(images_uri)
    join = posixpath.join if storage.is_s3(images_uri) else os.path.join
    return [join(root, i) for i in image_ids], fs


def build_dataset(table: pd.DataFrame, images_uri: str, name: str, input_size: tuple[int, int], *,
                  augment: bool = False, blackout_prob: float = 0.0, shuffle: bool = False,
                  seed: int | None = None, num_blocks: int | None = None, preprocessing: str | None = None,
                  decoded: bool = False):
    """Lazy ``ray.data.Dataset`` (columns ``image``, ``label``) of model ``name`` over ``table``'s images.

    Args:
        table: a split of the wide label table (``steel.data.labels.load_labels`` / ``split``).
        images_uri: folder holding ``<ImageId>`` files (local path, ``file://`` or ``s3://``).
        name: one of the six model names; selects the rows and the label column.
        input_size: ``(H, W)`` of the network input.
        augment: apply the training augmentation (training split only).
        blackout_prob: segmenters: chance per image of the defect blackout augmentation.
        shuffle: shuffle the file order anew on every pass (training split).
        seed: fixes the augmentation draws (tests); ``None`` draws fresh ones every pass.
        num_blocks: read parallelism override (default: Ray's choice).
        preprocessing: the model spec's input scaling (``steel.data.images``); None: ``unit`` ([0, 1]).
        decoded: stop after :func:`decode_batch` (uint8 rows for a worker-side cache, which applies
            :func:`finish_batch` itself every epoch); ``augment``, ``blackout_prob``, ``seed`` and
            ``preprocessing`` then do not apply here.
    """
    import ray

    rows = model_rows(table, name)
    if rows.empty:
        need = ("defect images" if name == "multilabel" else
                f"images with class {class_of(name)}" if is_segmenter(name) else "images")
        raise ValueError(f"no images for model {name!r} in this split: it needs {need}")
    labels = label_lookup(rows, name)
    # One path per row, not per label: rows repeated on purpose (steel.train.run.oversample_rare) stay.
    paths, fs = image_paths(images_uri, rows["ImageId"].astype(str).tolist())
    ds = ray.data.read_binary_files(
        paths, filesystem=fs, include_paths=True, shuffle="files" if shuffle else None,
        override_num_blocks=num_blocks,
    )
    if decoded:
        return ds.map_batches(decode_batch, batch_size=MAP_BATCH, batch_format="numpy",
                              fn_kwargs=dict(name=name, labels=labels, input_size=tuple(input_size)))
    return ds.map_batches(
        prepare_batch, batch_size=MAP_BATCH, batch_format="numpy",
        fn_kwargs=dict(name=name, labels=labels, input_size=tuple(input_size), augment=augment,
                       blackout_prob=blackout_prob, seed=seed, preprocessing=preprocessing),
    )


def build_datasets(splits: dict[str, pd.DataFrame], images_uri: str, name: str, train_cfg,
                   decoded: bool = False) -> dict:
    """``{"train": ds, "val": ds}`` for ``name`` under a ``TrainConfig`` (augmentation on train only).

    ``val`` is left out when the validation split has no image for ``name``; training then keeps
    the best epoch by the training metric. ``decoded``: uint8 rows before augmentation
    (:func:`decode_batch`), for workers that cache them and finish each batch themselves
    (:func:`finish_kwargs`).
    """
    from steel.model.networks import model_spec

    spec = model_spec(name, train_cfg)  # the spec the bundle records: same size and preprocessing
    size, prep = tuple(spec["input_size"]), spec["preprocessing"]
    blackout = train_cfg.blackout_prob if _mask_classes(name) else 0.0
    datasets = {"train": build_dataset(splits["train"], images_uri, name, size, augment=train_cfg.augment,
                                       blackout_prob=blackout, shuffle=True, preprocessing=prep, decoded=decoded)}
    if not model_rows(splits["val"], name).empty:  # a rare class may have no validation image
        datasets["val"] = build_dataset(splits["val"], images_uri, name, size, preprocessing=prep, decoded=decoded)
    return datasets


def finish_kwargs(name: str, train_cfg, split: str) -> dict:
    """:func:`finish_batch` arguments of ``split`` (``train``: augmented) for ``name`` under ``train_cfg``:
    the same steps :func:`build_datasets` runs in Ray Data when it does not stop at the decoded rows."""
    from steel.model.networks import model_spec

    train = split == "train"
    return dict(name=name, augment=bool(train and train_cfg.augment),
                blackout_prob=train_cfg.blackout_prob if train and _mask_classes(name) else 0.0,
                preprocessing=model_spec(name, train_cfg)["preprocessing"])


def decoded_bytes_per_row(name: str, train_cfg) -> int:
    """Bytes of one :func:`decode_batch` row of ``name`` (uint8 image + its label) at the model's size."""
    from steel.model.networks import model_spec

    h, w = model_spec(name, train_cfg)["input_size"]
    return int(h) * int(w) * (3 + len(_mask_classes(name))) + 4 * 5


def split_sizes(splits: dict[str, pd.DataFrame], name: str) -> dict[str, int]:
    """Number of rows each split contributes to ``name`` (the datasets' row counts, known up front)."""
    return {k: int(len(model_rows(v, name))) for k, v in splits.items()}


__all__ = ["build_dataset", "build_datasets", "label_lookup", "model_rows", "prepare_batch", "decode_batch",
           "finish_batch", "finish_kwargs", "decoded_bytes_per_row",
           "image_paths", "split_sizes", "label_columns", "MAP_BATCH"]
