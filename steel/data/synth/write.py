"""Write a synthetic set in the Kaggle layout to any storage URI (``steel synth``).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from steel.core import s3, storage
from steel.core.names import CLASSES
from steel.data import rle
from steel.data.synth.quotas import image_ids, plan_labels
from steel.data.synth.render import encode_jpeg, render

MARKER = "synth.json"  # what was generated; marks the folder as ours (safe to regenerate)
OUTPUT_FILES = ("train.csv", "test_truth.csv", "sample_submission.csv")
IMAGE_FOLDERS = ("train_images", "test_images")


def _render_task(task: tuple) -> tuple[str, dict[int, str]]:
    """Render one image and write it to its URI (atomically, through steel.core.storage); its RLEs."""
    seed, split, index, image_id, classes, folder, endpoint = task
    if endpoint:  # a spawned worker does not share the parent's process-wide endpoint
        s3.set_endpoint(endpoint)
    gray, masks = render(seed, split, index, classes)
    storage.write_bytes(storage.join(folder, image_id), encode_jpeg(gray))
    return image_id, {cls: rle.encode(m) for cls, m in masks.items()}


# ---------------------------------------------------------------------------------------------
# Dataset writer
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _prepare(out: str) -> None:
    """Claim ``out`` for a new synthetic set: clear an earlier one there; refuse any other dataset."""
    if not storage.is_s3(out) and os.path.isfile(out.removeprefix("file://")):
        raise ValueError(f"output {out!r} exists and is not a folder")
    ours = storage.exists(storage.join(out, MARKER))
    if ours:
        for name in IMAGE_FOLDERS:
            storage.delete(storage.join(out, name), recursive=True, missing_ok=True)
        for name in OUTPUT_FILES:
            storage.delete(storage.join(out, name), missing_ok=True)
    else:
        present = [p for p in OUTPUT_FILES if storage.exists(storage.join(out, p))]
        present += [p for p in IMAGE_FOLDERS if storage.list_files(storage.join(out, p))]
        if present:
            raise ValueError(
                f"output {out!r} already holds a dataset not written by 'steel synth' ({', '.join(present)}); "
                "refusing to overwrite it: choose an empty or new folder")
    for name in IMAGE_FOLDERS:
        storage.makedirs(storage.join(out, name))
    # Claim the folder first, so an interrupted run can be regenerated over.
    storage.write_text(storage.join(out, MARKER), json.dumps({"generator": "steel.data.synth", "complete": False}) + "\n")


def _csv(rows: list[tuple[str, int, str]]) -> str:
    lines = ["ImageId,ClassId,EncodedPixels"] + [f"{i},{c},{e}" for i, c, e in sorted(rows)]
    return "\n".join(lines) + "\n"


def _stats(results: list[tuple[str, dict[int, str]]]) -> dict:
    classes = {k: 0 for k in CLASSES}
    areas: dict[int, list[int]] = {k: [] for k in CLASSES}
    two = 0
    for _, rles in results:
        two += len(rles) >= 2
        for k, e in rles.items():
            classes[k] += 1
            areas[k].append(rle.area(e))
    no_defect = sum(1 for _, r in results if not r)
    return {
        "images": len(results),
        "no_defect": no_defect,
        "defect_images": len(results) - no_defect,
        "class_images": classes,
        "two_class": two,
        "mask_area": {k: ({"min": min(v), "median": int(np.median(v)), "max": max(v)} if v else None)
                      for k, v in areas.items()},
    }


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover (not Linux)
        return max(1, os.cpu_count() or 1)


def _start_method() -> str:
    """'spawn' (safe when the caller runs threads: Ray, TensorFlow), unless the main script cannot be
    re-imported by a spawned child (``python - < script``), where only 'fork' works."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        return "fork"
    return "spawn"


def _run_tasks(tasks: list[tuple], workers: int, progress: bool) -> list[tuple[str, dict[int, str]]]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="synth", unit="img", disable=not progress, file=sys.stderr)
    results = []
    try:
        if workers <= 1 or len(tasks) <= 2:
            for t in tasks:
                results.append(_render_task(t))
                bar.update()
        else:
            import multiprocessing as mp

            ctx = mp.get_context(_start_method())
            chunk = max(1, min(16, len(tasks) // (workers * 4)))
            with ctx.Pool(workers) as pool:
                for r in pool.imap(_render_task, tasks, chunksize=chunk):
                    results.append(r)
                    bar.update()
    finally:
        bar.close()
    return results


def generate(out_uri: str, images: int = 400, test_images: int = 100, seed: int = 0,
             workers: int | None = None, progress: bool = True) -> dict:
    """Write a synthetic Severstal-like dataset in the Kaggle layout at ``out_uri``.

    Args:
        out_uri: destination folder: local path, ``file://path`` or ``s3://bucket/prefix``; every file
            is written atomically through :mod:`steel.core.storage`.
            A folder holding a dataset not written by this function is refused; a previous synthetic
            set there is replaced.
        images: number of training images (>= 1), written with ``train.csv``.
        test_images: number of test images (>= 0), with ``sample_submission.csv`` and ``test_truth.csv``.
        seed: non-negative integer; the same seed gives byte-identical files for any ``workers``.
        workers: processes to render with (default: all available cores).
        progress: show a tqdm progress bar.

    Returns:
        Summary dict: ``out``, ``seed``, ``workers``, ``seconds``, and per split (``train``, ``test``)
        ``images``, ``no_defect``, ``defect_images``, ``class_images`` {1..4}, ``two_class``,
        ``mask_area`` {class: {min, median, max}}.
    """
    if not isinstance(out_uri, (str, os.PathLike)) or not str(out_uri):
        raise ValueError(f"output must be a non-empty path or URI, got {out_uri!r}")
    out_uri = os.fspath(out_uri)
    images = _check_int("images", images, 1)
    test_images = _check_int("test_images", test_images, 0)
    seed = _check_int("seed", seed, 0)
    workers = _default_workers() if workers is None else _check_int("workers", workers, 1)
    workers = max(1, min(workers, images + test_images))

    t0 = time.perf_counter()
    if "://" in out_uri and not out_uri.startswith(("s3://", "file://")):
        raise ValueError(f"unsupported output URI {out_uri!r}: use a local path, file:// or s3://")
    _prepare(out_uri)
    train_ids, test_ids = image_ids(seed, images, test_images)
    tasks = []
    for split, ids, folder in (("train", train_ids, "train_images"), ("test", test_ids, "test_images")):
        plan = plan_labels(len(ids), seed, split)
        tasks += [(seed, split, i, image_id, plan[i], storage.join(out_uri, folder), s3.current_endpoint())
                  for i, image_id in enumerate(ids)]
    results = _run_tasks(tasks, workers, progress)
    train_res, test_res = results[:images], results[images:]
    # Images first, then the CSVs, then the completed marker: a reader never sees labels without images.
    storage.write_text(storage.join(out_uri, "train.csv"), _csv([(i, c, e) for i, r in train_res for c, e in r.items()]))
    storage.write_text(storage.join(out_uri, "test_truth.csv"),
                       _csv([(i, c, e) for i, r in test_res for c, e in r.items()]))
    storage.write_text(storage.join(out_uri, "sample_submission.csv"),
                       _csv([(i, c, "1 1") for i in test_ids for c in CLASSES]))
    summary = {"out": out_uri, "seed": seed, "workers": workers, "train": _stats(train_res), "test": _stats(test_res)}
    marker = {k: v for k, v in summary.items() if k not in ("out", "workers")}
    marker.update(generator="steel.data.synth", complete=True)
    storage.write_text(storage.join(out_uri, MARKER), json.dumps(marker, indent=1, sort_keys=True) + "\n")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def stale(data_cfg) -> str | None:
    """Why the synthetic set at ``data.root`` is not the one ``data.synth`` asks for, or None.

    Only a folder this module wrote (its ``synth.json``) is ever regenerated; real data never is.
    """
    marker = storage.join(data_cfg.root, MARKER)
    if data_cfg.synth is None or not storage.exists(marker):
        return None
    try:
        made = json.loads(storage.read_text(marker))
    except ValueError:
        return f"{marker} is unreadable"
    if not made.get("complete"):
        return f"the synthetic set in {data_cfg.root} is incomplete (an interrupted run)"
    have = ((made.get("train") or {}).get("images"), (made.get("test") or {}).get("images"), made.get("seed"))
    want = (data_cfg.synth.images, data_cfg.synth.test_images, data_cfg.synth.seed)
    if have != want:
        return (f"{data_cfg.root} holds a synthetic set of {have[0]} + {have[1]} images (seed {have[2]}), "
                f"data.synth asks for {want[0]} + {want[1]} (seed {want[2]})")
    return None


def ensure_dataset(data_cfg) -> tuple[bool, str, dict]:
    """The config's dataset, generated when ``data.synth`` asks for one that is missing or stale.

    Returns ``(already there, what is there, details)``; FileNotFoundError naming what is missing when
    there is no dataset at ``data.root`` and no ``data.synth`` to make one.
    """
    csv, images = data_cfg.path("train_csv"), data_cfg.path("train_images")
    why = stale(data_cfg)
    if why:
        print(f"[    data] {why}: generating it again", flush=True)
    elif storage.exists(csv) and storage.list_files(images)[:1]:
        n = len(storage.list_files(images))
        return True, f"{n} training images in {data_cfg.root}", {"root": data_cfg.root}
    if data_cfg.synth is None:
        raise FileNotFoundError(f"no dataset at {data_cfg.root} (need {csv} and {images}/); point data.root at the "
                                "Kaggle files, or set data.synth to generate a synthetic set")
    syn = data_cfg.synth
    summary = generate(data_cfg.root, images=syn.images, test_images=syn.test_images, seed=syn.seed)
    return False, f"synthesised {syn.images} train + {syn.test_images} test images into {data_cfg.root}", {
        "root": data_cfg.root, "synth": summary}


def summary_line(summary: dict) -> str:
    tr = summary["train"]
    cls = " ".join(f"{k}:{v}" for k, v in tr["class_images"].items())
    return (f"synth: {tr['images']} train images ({tr['no_defect']} without defect; images per class {cls}; "
            f"{tr['two_class']} with two classes) + {summary['test']['images']} test images -> "
            f"{summary['out']} in {summary['seconds']:.1f} s ({summary['workers']} workers)")
