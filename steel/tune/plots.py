"""Plots of the search: validation Dice against each threshold, the others at their tuned values.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from steel.core import figures
from steel.core.names import CLASSES
from steel.eval.evaluator import Evaluator
from steel.tune.search import Grids, candidates


def sweep(ev: Evaluator, th: dict, k: int | None, param: str, values: Sequence[float]) -> np.ndarray:
    """Dice as one threshold varies (others fixed at ``th``): overall for ``binary``, class k otherwise."""
    out = []
    for v in values:
        if param == "binary":
            out.append(ev.score({**th, "binary": float(v)}))
        else:
            ck = {**th["classes"][str(k)], param: v}
            out.append(float(ev.class_dice(k, th["binary"], ck["prob"], ck["pixel"], ck["min_area"],
                                           ck["max_area"]).mean()))
    return np.asarray(out)


def plot_curves(ev: Evaluator, start: dict, final: dict, grids: Grids) -> dict[str, bytes]:
    """PNG bytes: ``dice_vs_binary.png`` and ``dice_vs_class{k}.png`` (prob, pixel, min_area, max_area panels)."""
    plt = figures.pyplot()

    def png(fig) -> bytes:
        return figures.png(fig, dpi=80)

    files = {}
    values = candidates(grids.binary, final["binary"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(values, sweep(ev, final, None, "binary", values), marker="o", ms=3, label="mean Dice (all pairs)")
    for k in CLASSES:
        ys = [float(np.mean(ev.class_dice(k, v, **_class_args(final, k)))) for v in values]
        ax.plot(values, ys, lw=1, alpha=0.6, label=f"class {k}")
    ax.axvline(final["binary"], color="k", ls="--", lw=1, label=f"tuned {final['binary']:.2f}")
    ax.axvline(start["binary"], color="grey", ls=":", lw=1, label=f"start {start['binary']:.2f}")
    ax.set_xlabel("t_bin (binary classifier threshold)")
    ax.set_ylabel("validation Dice")
    ax.set_title("Dice vs binary gate (other thresholds tuned)")
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.9)
    files["dice_vs_binary.png"] = png(fig)
    for k in CLASSES:
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
        ck, c0 = final["classes"][str(k)], start["classes"][str(k)]
        for ax, (param, grid, label) in zip(axes, (("prob", grids.prob, "t_k (multilabel prob)"),
                                                   ("pixel", grids.pixel, "p_k (pixel prob)"),
                                                   ("min_area", grids.min_area, "min_area_k (pixels)"),
                                                   ("max_area", grids.max_area, "max_area_k (pixels)"))):
            xs = candidates(grid, ck[param])
            if param == "min_area":
                xs = [x for x in xs if x <= ck["max_area"]]
            if param == "max_area":
                xs = [x for x in xs if x >= ck["min_area"]]
            ax.plot(xs, sweep(ev, final, k, param, xs), marker="o", ms=3)
            ax.axvline(ck[param], color="k", ls="--", lw=1, label=f"tuned {ck[param]:g}")
            ax.axvline(c0[param], color="grey", ls=":", lw=1, label=f"start {c0[param]:g}")
            ax.set_xlabel(label)
            ax.set_ylabel(f"class {k} Dice")
            ax.legend(fontsize=7)
        fig.suptitle(f"Class {k}: validation Dice vs each threshold (others at tuned values)")
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.15, top=0.86, wspace=0.28)
        files[f"dice_vs_class{k}.png"] = png(fig)
    return files


def _class_args(th: dict, k: int) -> dict:
    ck = th["classes"][str(k)]
    return {"prob": ck["prob"], "pixel": ck["pixel"], "min_area": ck["min_area"], "max_area": ck["max_area"]}
