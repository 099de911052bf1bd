"""Evaluation report of a submission against truth: Dice, confusion matrices, classification report, overlays.

:func:`write_report` writes into ``out_dir`` (any storage URI):

- ``report.md``: mean Dice overall and per class, per-class image-level confusion matrices (defect
  present in the truth vs predicted) and scikit-learn's classification report (the seed's section 6),
  and the overlays below;
- ``confusion.png``: the five confusion matrices (any defect, classes 1..4);
- ``overlays/worst_*.png`` / ``overlays/best_*.png``: the images with the lowest mean Dice, and the
  highest among images with a true defect: image, truth and prediction one above the other, each
  class in its own colour;
- ``metrics.json`` (everything above as numbers) and ``per_image.csv`` (Dice per image and class).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pandas as pd

from steel.core import figures
from steel.core.names import CLASS_COLORS, CLASSES, SHAPE
from steel.data import rle
from steel.eval.metrics import presence

log = logging.getLogger(__name__)

NAMES: tuple[str, ...] = tuple(f"Defect_{k}" for k in CLASSES)


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Image-level confusion per class and for "any defect": tn, fp, fn, tp, precision, recall, f1."""
    from sklearn.metrics import confusion_matrix

    out = {}
    columns = {"any": (y_true.max(axis=1), y_pred.max(axis=1))} if y_true.size else {}
    columns.update({str(k): (y_true[:, j], y_pred[:, j]) for j, k in enumerate(CLASSES)})
    for key, (t, p) in columns.items():
        tn, fp, fn, tp = (int(v) for v in confusion_matrix(t, p, labels=[0, 1]).ravel())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[key] = {"tn": tn, "fp": fp, "fn": fn, "tp": tp, "precision": precision, "recall": recall, "f1": f1}
    return out


def confusion_table(conf: dict) -> list[str]:
    """Markdown rows of :func:`confusion`'s matrices: TN, FP, FN, TP, precision, recall, F1 per row."""
    rows = [["any defect" if key == "any" else f"class {key}", c["tn"], c["fp"], c["fn"], c["tp"],
             f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}"] for key, c in conf.items()]
    return figures.markdown_table(["", "TN", "FP", "FN", "TP", "precision", "recall", "F1"], rows)


def classification_reports(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[dict, str]:
    """sklearn classification reports: multilabel over the 4 classes, then binary "any defect"."""
    from sklearn.metrics import classification_report

    kw = {"zero_division": 0}
    multi = classification_report(y_true, y_pred, labels=list(range(4)), target_names=list(NAMES),
                                  output_dict=True, **kw)
    multi_text = classification_report(y_true, y_pred, labels=list(range(4)), target_names=list(NAMES), **kw)
    any_t, any_p = y_true.max(axis=1), y_pred.max(axis=1)
    binary = classification_report(any_t, any_p, labels=[0, 1], target_names=["no defect", "defect"],
                                   output_dict=True, **kw)
    binary_text = classification_report(any_t, any_p, labels=[0, 1], target_names=["no defect", "defect"], **kw)
    text = ("Multi-label (image has defect k):\n" + multi_text + "\nBinary (image has any defect):\n" + binary_text)
    return {"multilabel": multi, "binary": binary}, text


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------

def plot_confusion(conf: dict) -> bytes:
    plt = figures.pyplot()
    keys = [k for k in ("any", "1", "2", "3", "4") if k in conf]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 3.2))
    for ax, key in zip(np.atleast_1d(axes), keys):
        c = conf[key]
        m = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(m, cmap="Blues")
        for (r, col), v in np.ndenumerate(m):
            ax.text(col, r, str(v), ha="center", va="center", color="black" if v < m.max() / 2 else "white")
        ax.set_xticks([0, 1], ["pred no", "pred yes"])
        ax.set_yticks([0, 1], ["true no", "true yes"])
        ax.set_title("any defect" if key == "any" else f"class {key}")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.88, wspace=0.45)
    return figures.png(fig, dpi=80)


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    import cv2

    bar = np.full((22, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel], axis=0)


def overlay(image: np.ndarray | None, truth: dict[int, str], pred: dict[int, str], title: str) -> bytes:
    """PNG: image, truth and prediction (one above the other), each class painted in its colour."""
    import cv2

    shape = SHAPE
    base = image if image is not None else np.full((*shape, 3), 60, np.uint8)
    tm = {k: rle.decode(truth.get(k, "") or "", shape) for k in CLASSES}
    pm = {k: rle.decode(pred.get(k, "") or "", shape) for k in CLASSES}
    top = _label(base, title + ("" if image is not None else "  (image not available: masks on grey)"))
    panels = [top, _label(figures.paint(base, tm), "truth"), _label(figures.paint(base, pm), "prediction")]
    key = np.full((22, shape[1], 3), 255, np.uint8)
    x = 6
    for k in CLASSES:
        cv2.rectangle(key, (x, 5), (x + 14, 17), CLASS_COLORS[k], -1)
        cv2.putText(key, f"class {k}", (x + 20, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        x += 110
    canvas = np.concatenate([key, *panels], axis=0)
    ok, data = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def _load_image(images_uri: str | None, image_id: str) -> np.ndarray | None:
    if not images_uri:
        return None
    from steel.core import storage
    from steel.data import images as image_io

    try:
        return image_io.read(storage.join(images_uri, image_id))
    except (ValueError, FileNotFoundError, OSError) as e:
        log.warning("overlay of %s without the image: %s", image_id, e)
        return None


def pick_overlays(per_image: pd.DataFrame, n: int) -> tuple[list[str], list[str]]:
    """(worst, best): the n images with the lowest mean Dice; the n highest among images with a true defect."""
    ordered = per_image.sort_values(["mean_dice", "ImageId"], kind="stable")
    worst = ordered["ImageId"].head(n).tolist()
    with_defect = per_image[per_image["truth_classes"] > 0]
    pool = with_defect if len(with_defect) else per_image
    pool = pool[~pool["ImageId"].isin(set(worst))] if len(pool) > n else pool
    best = pool.sort_values(["mean_dice", "ImageId"], ascending=[False, True], kind="stable")["ImageId"].head(n).tolist()
    return worst, best


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

def write_report(submission_df: Any, truth_df: Any, images_uri: str | None, out_dir: str,
                 n_overlays: int = 4) -> dict:
    """Write the evaluation report (see the module docstring) and return its numbers.

    Args:
        submission_df, truth_df: long rows (ImageId, ClassId, EncodedPixels) as DataFrames or CSV
            URIs, either layout. Pairs are every submission image x 4 classes (missing rows empty).
        images_uri: folder holding the images (for overlays); None draws masks on grey.
        out_dir: folder URI for the report files.
        n_overlays: how many worst and how many best images to draw.
    Returns ``{"mean_dice", "per_class", "n_images", "confusion", "classification_report",
    "overlays": {"worst": [...], "best": [...]}, "files": [...], "report": <report.md URI>}``.
    """
    from steel.core import storage
    from steel.data.submission import read_rows
    from steel.eval import metrics

    if n_overlays < 0:
        raise ValueError(f"n_overlays must be >= 0, got {n_overlays}")
    pred = read_rows(submission_df)
    truth = read_rows(truth_df)
    result = metrics.mean_dice(pred, truth)
    per_pair = result["per_pair"]
    images = sorted(pd.unique(per_pair["ImageId"]).tolist())
    y_true, y_pred = presence(truth, images), presence(pred, images)
    conf = confusion(y_true, y_pred)
    report_dict, report_text = classification_reports(y_true, y_pred)

    wide = per_pair.pivot(index="ImageId", columns="ClassId", values="dice").reindex(images)
    per_image = pd.DataFrame({"ImageId": images, **{f"dice_{k}": wide[k].to_numpy() for k in CLASSES}})
    per_image["mean_dice"] = wide.mean(axis=1).to_numpy()
    per_image["truth_classes"] = y_true.sum(axis=1)
    per_image["pred_classes"] = y_pred.sum(axis=1)

    files: dict[str, bytes | str] = {}
    files["confusion.png"] = plot_confusion(conf)
    worst, best = pick_overlays(per_image, n_overlays) if n_overlays else ([], [])
    lookup_t = {(r.ImageId, int(r.ClassId)): r.EncodedPixels for r in truth.itertuples()}
    lookup_p = {(r.ImageId, int(r.ClassId)): r.EncodedPixels for r in pred.itertuples()}
    overlays = {"worst": [], "best": []}
    scores = per_image.set_index("ImageId")
    for kind, chosen in (("worst", worst), ("best", best)):
        for rank, img in enumerate(chosen, 1):
            row = scores.loc[img]
            dice_text = " ".join(f"{k}:{row[f'dice_{k}']:.2f}" for k in CLASSES)
            title = f"{img}  mean Dice {row['mean_dice']:.3f}  ({dice_text})"
            png = overlay(_load_image(images_uri, img), {k: lookup_t.get((img, k), "") for k in CLASSES},
                          {k: lookup_p.get((img, k), "") for k in CLASSES}, title)
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in img)
            name = f"overlays/{kind}_{rank}_{safe}.png"
            files[name] = png
            overlays[kind].append({"ImageId": img, "mean_dice": float(row["mean_dice"]), "file": name})

    summary = {
        "mean_dice": float(result["mean_dice"]),
        "per_class": {str(k): float(v) for k, v in result["per_class"].items()},
        "n_images": int(result["n_images"]),
        "n_pairs": int(result["n_pairs"]),
        "counts": {str(k): {"truth": int(y_true[:, j].sum()), "pred": int(y_pred[:, j].sum())}
                   for j, k in enumerate(CLASSES)},
        "confusion": conf,
        "classification_report": report_dict,
        "overlays": overlays,
    }
    files["metrics.json"] = json.dumps(summary, indent=2) + "\n"
    files["per_image.csv"] = per_image.to_csv(index=False)
    files["report.md"] = _markdown(summary, report_text)
    written = []
    for name, data in files.items():
        uri = storage.join(out_dir, *name.split("/"))
        if isinstance(data, str):
            storage.write_text(uri, data)
        else:
            storage.write_bytes(uri, data)
        written.append(uri)
    summary["files"] = written
    summary["report"] = storage.join(out_dir, "report.md")
    return summary


def _markdown(s: dict, report_text: str) -> str:
    lines = [
        "# Evaluation report", "",
        f"Mean Dice **{s['mean_dice']:.4f}** over {s['n_images']} images ({s['n_pairs']} image-class pairs; "
        "a pair with both masks empty scores 1).", "",
        *figures.markdown_table(["class", "Dice", "images with defect (truth)", "images predicted"],
                                [[k, f"{s['per_class'][str(k)]:.4f}", s["counts"][str(k)]["truth"],
                                  s["counts"][str(k)]["pred"]] for k in CLASSES]),
    ]
    lines += ["", "## Image-level confusion matrices (defect present in truth vs predicted)", "",
              *confusion_table(s["confusion"])]
    lines += ["", "![confusion matrices](confusion.png)", "", "## Classification report", "", "```",
              report_text.rstrip(), "```", ""]
    for kind, title in (("worst", "Worst images (lowest mean Dice)"),
                        ("best", "Best images with a true defect (highest mean Dice)")):
        if not s["overlays"][kind]:
            continue
        lines += [f"## {title}", "", "Rows: image, truth, prediction. Colours: class 1 red, 2 green, 3 blue, 4 yellow.", ""]
        for o in s["overlays"][kind]:
            lines += [f"**{o['ImageId']}**, mean Dice {o['mean_dice']:.3f}", "", f"![{o['ImageId']}]({o['file']})", ""]
    lines += ["Numbers: `metrics.json`; Dice per image and class: `per_image.csv`.", ""]
    return "\n".join(lines)


__all__ = ["write_report", "presence", "confusion", "classification_reports", "overlay", "plot_confusion",
           "pick_overlays"]
