"""The pipeline's final report: one Markdown page tying together every stage's outputs.

Plots made by the stages (training curves in the bundle, threshold curves from tuning, confusion
matrices and overlays from the evaluation) are copied next to ``report.md`` so the folder is
self-contained, plus the seed's per-split tables (:mod:`steel.eval.protocol`), a per-class Dice chart of
the model against the all-empty baseline on the separate test set, and the nightly drift chart (per-night defect-image rate per class, from the scoring run records).
"""

from __future__ import annotations

import json

from steel.core import figures, storage
from steel.core.config import Config
from steel.core.names import CLASSES, hex_color


def _copy_pngs(src_dir: str, dst_dir: str, prefix: str) -> list[str]:
    """Copy the PNGs of a folder (if any) into the report; returns their names in the report."""
    names = []
    try:
        files = storage.list_files(src_dir, suffixes=[".png"])
    except FileNotFoundError:
        return names
    for uri in files:
        name = f"{prefix}{storage.basename(uri)}"
        if storage.join(src_dir, storage.basename(uri)) != storage.join(dst_dir, name):
            storage.write_bytes(storage.join(dst_dir, name), storage.read_bytes(uri))
        names.append(name)
    return names


def _dice_chart(evaluation: dict) -> bytes:
    import numpy as np

    plt = figures.pyplot()
    classes = ["1", "2", "3", "4"]
    model = [evaluation["per_class"][k] for k in classes]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    x = np.arange(len(classes))
    ax.bar(x - 0.2, model, 0.4, label="model", color="#1f77b4")
    base = evaluation.get("baseline_per_class")
    if base:
        ax.bar(x + 0.2, [base[k] for k in classes], 0.4, label="all-empty", color="#bbbbbb")
    ax.axhline(evaluation["mean_dice"], color="#1f77b4", ls="--", lw=1,
               label=f"model mean {evaluation['mean_dice']:.3f}")
    ax.axhline(evaluation["baseline_all_empty"], color="#777777", ls=":", lw=1,
               label=f"all-empty mean {evaluation['baseline_all_empty']:.3f}")
    ax.set_xticks(x, [f"class {k}" for k in classes])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean Dice")
    ax.set_title("Held-out mean Dice per class")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return figures.png(fig, dpi=110)


def drift_series(records: list[dict]) -> list[dict]:
    """One point per night (UTC day of ``started_at``) from scoring run records: the per-class share of
    newly scored images with a defect of that class, weighted by the images each run scored.
    Runs that scored nothing (or failed) add nothing."""
    nights: dict[str, dict] = {}
    for r in records:
        scored = int(r.get("scored") or 0)
        if not scored or not r.get("defect_images"):
            continue
        night = str(r.get("started_at", ""))[:10]
        n = nights.setdefault(night, {"night": night, "scored": 0, "defects": {k: 0 for k in "1234"}})
        n["scored"] += scored
        for k in "1234":
            n["defects"][k] += int(r["defect_images"].get(k, 0))
    return [{"night": n["night"], "scored": n["scored"],
             "rate": {k: n["defects"][k] / n["scored"] for k in "1234"}} for _, n in sorted(nights.items())]


def drift_chart(records: list[dict]) -> bytes | None:
    """PNG: per-night defect-image rate per class (None when no run scored anything)."""
    series = drift_series(records)
    if not series:
        return None
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [p["night"] for p in series]
    for k in CLASSES:
        ax.plot(x, [p["rate"][str(k)] for p in series], marker="o", color=hex_color(k), label=f"class {k}")
    ax.set_ylabel("share of scored images with a defect")
    ax.set_title("Nightly defect-image rate per class (drift)")
    ax.set_ylim(0, max(0.05, max(max(p["rate"].values()) for p in series) * 1.15))
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    fig.tight_layout()
    return figures.png(fig, dpi=110)


def write(cfg: Config, results: list, state: dict) -> str:
    out = cfg.report
    storage.makedirs(out)
    lines = [f"# Pipeline report: {cfg.name}", ""]
    lines += figures.markdown_table(["stage", "status", "seconds", "summary"],
                                    [[r.name, "skipped" if r.skipped else "ran", f"{r.seconds:.0f}", r.summary]
                                     for r in results], right=[2])
    lines.append("")

    pr = state.get("protocol")
    if pr:
        from steel.eval import protocol

        lines += protocol.markdown(pr)
        lines += ["Numbers: [protocol/metrics.json](protocol/metrics.json).", ""]
    ev = state.get("evaluation")
    if ev:
        lines += ["## Held-out evaluation: the separate test set with its own truth", "",
                  f"The scored test images (`steel score`'s submission) against their own truth: mean Dice "
                  f"**{ev['mean_dice']:.4f}** on {ev['n_images']} images "
                  f"(all-empty baseline {ev['baseline_all_empty']:.4f}).", "",
                  *figures.markdown_table(["class", "Dice"], [[k, f"{v:.4f}"] for k, v in ev["per_class"].items()])]
        storage.write_bytes(storage.join(out, "dice_per_class.png"), _dice_chart(ev))
        lines += ["", "![Dice per class](dice_per_class.png)", ""]
        eval_dir = storage.join(out, "evaluation")
        if storage.exists(storage.join(eval_dir, "report.md")):
            lines += ["Confusion matrices, classification report and best/worst overlays: "
                      "[evaluation/report.md](evaluation/report.md)", ""]
            for name in _copy_pngs(eval_dir, eval_dir, ""):
                lines.append(f"![{name}](evaluation/{name})")
            lines.append("")

    from steel.score import io as score_io

    records = score_io.read_run_records(cfg.score.out)
    chart = drift_chart(records)
    if chart:
        storage.write_bytes(storage.join(out, "drift.png"), chart)
        last = records[-1]
        lines += ["## Nightly scoring", "",
                  f"{len(records)} runs recorded under `{cfg.score.out}/runs/`; the last: {last.get('status')} "
                  f"(run {last.get('run_id')}, bundle {(last.get('bundle') or {}).get('version')}, "
                  f"{last.get('images_in', 0)} new images, {last.get('errors', 0)} errors, "
                  f"{last.get('transient_failures', 0)} transient failures).", "",
                  "![Nightly defect-image rate per class](drift.png)", ""]

    thresholds = None
    try:
        thresholds = json.loads(storage.read_text(storage.join(cfg.bundle, "thresholds.json")))
    except FileNotFoundError:
        pass
    if thresholds:
        lines += ["## Thresholds", ""]
        v = thresholds.get("validation") or {}
        if "seed" in v and "after" in v:
            lines += [f"Validation split ({v.get('n_images')} images): tuned thresholds **{v['after']:.4f}**, the seed's "
                      f"fixed thresholds {v['seed']['mean_dice']:.4f} (start {v.get('before', float('nan')):.4f})."]
            check = v.get("deployed_check")
            if check:
                lines += [f"The search scores the deployed cascade's masks: search {check['search']:.4f}, deployed "
                          f"cascade {check['deployed']:.4f} (|difference| {check['difference']:.5f})."]
            lines.append("")
        lines += ["```json", json.dumps(thresholds, indent=2), "```", ""]
        for sub in ("tuning", "thresholds"):
            for name in _copy_pngs(storage.join(cfg.bundle, sub), out, "tuning_"):
                lines.append(f"![{name}]({name})")
        lines.append("")

    curves = _copy_pngs(storage.join(cfg.bundle, "history"), out, "training_")
    if curves:
        lines += ["## Training curves", ""]
        lines += [f"![{name}]({name})" for name in curves]
        lines.append("")
    try:
        manifest = json.loads(storage.read_text(storage.join(cfg.bundle, "manifest.json")))
        lines += ["## Bundle", "", f"`{cfg.bundle}`", "", "```json",
                  json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=2, default=str)[:6000],
                  "```", ""]
    except FileNotFoundError:
        pass
    path = storage.join(out, "report.md")
    storage.write_text(path, "\n".join(lines))
    return path
