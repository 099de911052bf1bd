"""Exploratory analysis of a dataset in the Kaggle layout, written as a report folder.

``steel eda DATA --out DIR [--split train] [--samples N] [--skip-bad]``

DATA holds ``train.csv`` (either layout) and ``train_images/``. The seed notebook's section 4,
as files under DIR:

- ``report.md``: the page that ties the tables and plots together
- ``class_distribution.png``, ``labels_per_image.png``, ``area_histograms.png``,
  ``samples_class_<k>.png`` (sample images with translucent class masks)
- ``area_stats.csv``: mask area per class (count, mean, std, min, quartiles, max)
- ``area_thresholds.json``: ``{"1": {"min_area": .., "max_area": ..}, ...}`` from the 2nd and 98th
  percentile of each class's mask areas (what the cascade's area filter reads; see
  ``steel.model.thresholds.from_area_json``). Classes without examples are left out (the cascade then
  keeps its defaults).
- ``summary.json``: every number of the report

Scope: the seed computed its EDA on its train split only (9,048 of 12,568 images, after the split,
"to avoid data leakage"). By default this uses the whole train.csv; ``--split train`` restricts it
to the train split of :func:`steel.data.labels.split` as the seed did (the thresholds then come from
training images only).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from steel.core import figures
from steel.core.names import CLASS_COLOR_NAMES, CLASSES, SEED_AREAS, SHAPE, hex_color
from steel.data import labels as dataset
from steel.data import rle

log = logging.getLogger(__name__)

PLOTS = ("class_distribution.png", "labels_per_image.png", "area_histograms.png")


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

def area_stats(areas: pd.DataFrame) -> pd.DataFrame:
    """The seed's table: per class count, mean, std, min, 25%, 50%, 75%, max (index Defect_k)."""
    rows = {}
    for k in CLASSES:
        rows[f"Defect_{k}"] = areas.loc[areas["ClassId"] == k, "area"].astype(float).describe()
    return pd.DataFrame(rows).T[["count", "mean", "std", "min", "25%", "50%", "75%", "max"]]


def label_counts(wide: pd.DataFrame) -> tuple[dict[str, int], dict[str, int]]:
    """(images per class {"1": n, ...}, images per number of labels {"0": n, "1": n, "2": n, ...})."""
    per_class = {str(k): int(wide[f"hasDefect_{k}"].sum()) for k in CLASSES}
    n_labels = wide[[f"hasDefect_{k}" for k in CLASSES]].sum(axis=1)
    top = max(2, int(n_labels.max()) if len(n_labels) else 0)
    per_count = {str(i): int((n_labels == i).sum()) for i in range(top + 1)}
    return per_class, per_count


# --------------------------------------------------------------------------------------------
# Plots (matplotlib Agg; each returns PNG bytes)
# --------------------------------------------------------------------------------------------

def _pct(v: int, total: int) -> str:
    if not total:
        return ""
    p = 100 * v / total
    return f" ({p:.1f}%)" if p == 0 or p >= 0.1 else " (<0.1%)"


def _bar(ax, labels, values, colors, total):
    bars = ax.bar(labels, values, color=colors, edgecolor="black", linewidth=0.6)
    top = max(values) if values and max(values) > 0 else 1
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:,}{_pct(v, total)}", (bar.get_x() + bar.get_width() / 2, v), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=10)
    ax.set_ylim(0, top * 1.15)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_class_distribution(per_class: dict[str, int], n_images: int) -> bytes:
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _bar(ax, [f"class {k}" for k in CLASSES], [per_class[str(k)] for k in CLASSES],
         [hex_color(k) for k in CLASSES], n_images)
    ax.set_ylabel("images with the defect")
    ax.set_title(f"Images per defect class ({n_images:,} images)")
    return figures.png(fig, tight=True)


def plot_labels_per_image(per_count: dict[str, int], n_images: int) -> bytes:
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = {"0": "no defect", "1": "one label", "2": "two labels"}
    labels = [names.get(i, f"{i} labels") for i in per_count]
    greys = ["#7f7f7f", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    _bar(ax, labels, list(per_count.values()), greys[:len(labels)], n_images)
    ax.set_ylabel("images")
    ax.set_title(f"Defect labels per image ({n_images:,} images)")
    return figures.png(fig, tight=True)


def plot_area_histograms(areas: pd.DataFrame, thresholds: dict) -> bytes:
    plt = figures.pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    for ax, k in zip(axes.ravel(), CLASSES):
        a = areas.loc[areas["ClassId"] == k, "area"].to_numpy()
        ax.set_title(f"class {k}: {a.size:,} mask{'' if a.size == 1 else 's'}")
        ax.spines[["top", "right"]].set_visible(False)
        if a.size == 0:
            ax.text(0.5, 0.5, f"no class {k} defects", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[["left", "bottom"]].set_visible(False)
            continue
        lo, hi = max(1, int(a.min())), max(int(a.max()), int(a.min()) + 1)
        log_scale = hi / lo > 20  # the real data spans 150 .. 356,000 pixels
        if log_scale:
            bins = np.logspace(np.log10(lo), np.log10(hi * 1.001), 30)
            ax.set_xscale("log")
        else:
            if hi < lo * 1.05:  # one value, or nearly: give the bars and labels room
                lo, hi = lo * 0.8, hi * 1.2
            bins = np.linspace(lo, hi * 1.001, 30)
        counts, _, _ = ax.hist(a, bins=bins, color=hex_color(k), alpha=0.8, edgecolor="black", linewidth=0.4)
        ax.set_ylim(0, max(1, counts.max()) * 1.3)  # headroom for the threshold labels
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_scale:
            decades = np.log10(hi / lo)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 1.5 else (1.0, 3.0) if decades < 3 else (1.0,)))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        t = thresholds.get(str(k))
        if t:
            for name, x, side in (("p2", t["min_area"], 1), ("p98", t["max_area"], -1)):
                ax.axvline(x, color="black", linestyle="--", linewidth=1)
                ax.annotate(f"{name} = {x:,}", (x, 1), xycoords=("data", "axes fraction"),
                            xytext=(4 * side, -4), textcoords="offset points",
                            ha="left" if side > 0 else "right", va="top", fontsize=9,
                            bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.8))
        ax.set_xlabel("mask area (pixels" + (", log scale)" if log_scale else ")"))
        ax.set_ylabel("masks")
        ax.grid(alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle("Mask area per class with the 2nd / 98th percentile area thresholds")
    fig.tight_layout()
    return figures.png(fig, tight=True)


def plot_samples(wide: pd.DataFrame, images_uri: str, k: int, n: int = 3, seed: int = 42,
                 shape: tuple[int, int] = SHAPE) -> bytes | None:
    """Up to ``n`` images with class ``k`` (all their masks overlaid, outlined); None if there are none."""
    from matplotlib.patches import Patch

    from steel.core import storage
    from steel.data import images as image_io

    rows = wide[wide[f"hasDefect_{k}"] == 1]
    if rows.empty:
        return None
    rows = rows.sample(n=min(n, len(rows)), random_state=seed).sort_values("ImageId")
    plt = figures.pyplot()
    h, w = shape
    # Fixed layout in inches: a header band for the title and legend, then per image a title line
    # and the image at its true aspect ratio (1600 x 256 is 6.25 : 1).
    fig_w, margin, header, caption = 16.0, 0.15, 0.55, 0.3
    img_w = fig_w - 2 * margin
    img_h = img_w * h / w
    fig_h = header + len(rows) * (caption + img_h) + margin
    fig = plt.figure(figsize=(fig_w, fig_h))
    for i, (_, r) in enumerate(rows.iterrows()):
        top = header + i * (caption + img_h) + caption
        ax = fig.add_axes((margin / fig_w, 1 - (top + img_h) / fig_h, img_w / fig_w, img_h / fig_h))
        image = image_io.read(storage.join(images_uri, r["ImageId"]), allow_resize=True)[..., 0]
        masks = {c: rle.decode(r[f"Defect_{c}"], image.shape[:2]) for c in CLASSES if r[f"hasDefect_{c}"]}
        ax.imshow(figures.paint(image, masks), interpolation="antialiased", aspect="auto")
        present = ", ".join(str(c) for c in masks)
        ax.set_title(f"{r['ImageId']}  (class{'es' if len(masks) > 1 else ''} {present})", fontsize=10, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(facecolor=hex_color(c), alpha=0.7, label=f"class {c}") for c in CLASSES]
    fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(1 - margin / fig_w, 1 - 0.08 / fig_h),
               ncol=4, frameon=False, fontsize=10)
    fig.text(margin / fig_w, 1 - 0.12 / fig_h, f"Sample images with a class {k} defect",
             ha="left", va="top", fontsize=12, weight="bold")
    return figures.png(fig)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def markdown(head: list[str], rows: list[list]) -> str:
    return "\n".join(figures.markdown_table(head, rows))


def _ordinal(p: float) -> str:
    n = f"{p:g}"
    suffix = "th" if n.endswith(("11", "12", "13")) else {"1": "st", "2": "nd", "3": "rd"}.get(n[-1], "th")
    return n + suffix


def _num(x: float, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}" if not float(x).is_integer() else f"{int(x):,}"


def render_report(s: dict, plots: list[str]) -> str:
    n = s["n_images"]
    pct = (lambda v: f"{100 * v / n:.1f}%") if n else (lambda v: "-")
    lines = [
        "# Exploratory data analysis",
        "",
        f"Data: `{s['data']}` ({s['layout']} train.csv layout). Images analysed: **{n}** "
        f"({s['scope']}).",
        "",
        "The seed notebook ran this analysis on its train split only (9,048 of 12,568 images); this "
        "report uses " + ("the same train split (`--split train`)." if s["split"] == "train"
                          else "the whole train.csv (use `--split train` for the seed's scope)."),
    ]
    if s["skipped_rows"]:
        lines += ["", f"**{s['skipped_rows']} bad label rows were skipped** (see `{s['skipped_report']}`)."]
    lines += ["", "## Defect classes", "", "![class distribution](class_distribution.png)", "",
              markdown(["class", "images", "share of images"],
                        [[k, f"{v:,}", pct(v)] for k, v in s["images_per_class"].items()]),
              "", "## Labels per image", "", "![labels per image](labels_per_image.png)", "",
              markdown(["labels", "images", "share"],
                        [[k, f"{v:,}", pct(v)] for k, v in s["labels_per_image"].items()]),
              "", f"Images with no defect: {s['labels_per_image']['0']:,}, with one label: "
                  f"{s['labels_per_image']['1']:,}, with two labels: {s['labels_per_image']['2']:,}.",
              "", "## Mask area per class", "",
              "Area = pixels in the class mask of one image (256 x 1600 = 409,600 pixels per image).", ""]
    stats = s["area_stats"]
    cols = ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    lines.append(markdown([""] + cols, [[name] + [_num(row[c]) for c in cols] for name, row in stats.items()]))
    lines += ["", "![area histograms](area_histograms.png)", "",
              f"### Area thresholds ({_ordinal(dataset.PERCENTILES[0])} / {_ordinal(dataset.PERCENTILES[1])} percentile)", "",
              "Written to `area_thresholds.json` for the cascade's area filter (masks whose area falls "
              "outside [min_area, max_area] are emptied). The seed's rounded choice is shown for comparison.",
              ""]

    rows = []
    for k in CLASSES:
        t = s["area_thresholds"].get(str(k))
        lo, hi = SEED_AREAS[k]
        rows.append([k, f"{t['min_area']:,}" if t else "no data", f"{t['max_area']:,}" if t else "no data",
                     f"{lo:,} - {hi:,}"])
    lines.append(markdown(["class", "min_area", "max_area", "seed"], rows))
    lines += ["", "## Sample images", "",
              "Translucent colours mark each class mask (outlined): "
              + ", ".join(f"class {k} {CLASS_COLOR_NAMES[k]}" for k in CLASSES) + ".", ""]
    for k in CLASSES:
        name = f"samples_class_{k}.png"
        lines += [f"### Class {k}", "", f"![class {k} samples]({name})" if name in plots
                  else f"No image has a class {k} defect.", ""]
    return "\n".join(lines)


def run_eda(data_uri: str, out_uri: str, split: str | None = None, samples: int = 3, seed: int = 42,
            skip_bad: bool = False, shape: tuple[int, int] = SHAPE) -> dict:
    """Write the EDA report of ``data_uri`` (Kaggle layout) under ``out_uri``; returns the summary dict."""
    from steel.core import storage

    if split not in (None, "all", "train"):
        raise ValueError(f"split must be 'train' or None (whole train.csv), got {split!r}")
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    csv_uri = storage.join(data_uri, "train.csv")
    images_uri = storage.join(data_uri, "train_images")
    storage.makedirs(out_uri)
    report_uri = storage.join(out_uri, "skipped_labels.csv") if skip_bad else None
    wide = dataset.load_labels(csv_uri, images=images_uri, skip_bad=skip_bad, report_uri=report_uri, shape=shape)
    skipped = len(wide.attrs.get("skipped", ()))
    layout = wide.attrs.get("layout", "")
    total = len(wide)
    if split == "train":
        wide = dataset.split(wide, seed=seed)["train"]
        scope = f"train split of {total} images, seed {seed}"
    else:
        scope = "whole train.csv"
    if wide.empty:
        raise ValueError(f"{csv_uri}: no images to analyse")

    areas = dataset.mask_areas(wide, shape)
    stats = area_stats(areas)
    thresholds = dataset.area_thresholds(areas)
    per_class, per_count = label_counts(wide)
    summary = {
        "data": str(data_uri), "layout": layout, "split": split or "all", "scope": scope,
        "n_images": len(wide), "n_images_total": total,
        "images_per_class": per_class, "labels_per_image": per_count,
        "area_stats": {name: {c: (None if np.isnan(v) else float(v)) for c, v in row.items()}
                       for name, row in stats.iterrows()},
        "area_percentiles": list(dataset.PERCENTILES), "area_thresholds": thresholds,
        "skipped_rows": skipped, "skipped_report": "skipped_labels.csv" if skipped else None,
    }

    files = {
        "class_distribution.png": plot_class_distribution(per_class, len(wide)),
        "labels_per_image.png": plot_labels_per_image(per_count, len(wide)),
        "area_histograms.png": plot_area_histograms(areas, thresholds),
    }
    if samples:
        for k in CLASSES:
            png = plot_samples(wide, images_uri, k, n=samples, seed=seed, shape=shape)
            if png is not None:
                files[f"samples_class_{k}.png"] = png
    for name, data in files.items():
        storage.write_bytes(storage.join(out_uri, name), data)
    storage.write_text(storage.join(out_uri, "area_stats.csv"), stats.to_csv(index_label="class"))
    storage.write_text(storage.join(out_uri, "area_thresholds.json"), json.dumps(thresholds, indent=2) + "\n")
    summary["files"] = sorted([*files, "area_stats.csv", "area_thresholds.json", "summary.json", "report.md"])
    storage.write_text(storage.join(out_uri, "summary.json"), json.dumps(summary, indent=2) + "\n")
    storage.write_text(storage.join(out_uri, "report.md"), render_report(summary, list(files)) + "\n")
    return summary
