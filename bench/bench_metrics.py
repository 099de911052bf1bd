"""Mean Dice of a test-set-sized submission: steel.eval.metrics.mean_dice against decoding every pair.

A synthetic truth shaped like Severstal's test set (5,506 images, 47% without defects; class 3 the
most common, as blobs or cracks; class 1 pits; class 2 thin cracks; class 4 big blobs) and a
prediction that finds most defects a few pixels off, misses some and adds a few false positives.
Masks are drawn from a pool of 150 per kind (see bench.bench_rle). The baseline decodes both masks
of every pair with the seed notebook's rle2mask and counts pixels; it is timed on a random sample
of images (it is slow) and scaled to the whole set, and mean_dice is timed on that same sample too.
Times are CPU seconds of this process (steadier than wall time on a busy machine).

    .venv/bin/python -m bench.bench_metrics [--images 5506] [--sample 500] [--repeat 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from bench.bench_rle import make_mask, rle2mask
from steel.core.names import SHAPE
from steel.data import rle
from steel.eval import metrics

# Per defect image: chance of each class and the mask kinds it is drawn from.
CLASS_RATE = {1: 0.13, 2: 0.04, 3: 0.77, 4: 0.12}
CLASS_KINDS = {1: ["pits"], 2: ["crack"], 3: ["blobs", "blobs", "crack"], 4: ["blobs"]}


def synthetic_submission(n_images: int, rng: np.random.Generator,
                         pool: int = 150) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Truth and prediction frames; masks come from a pool of ``pool`` per kind (drawing 256x1600
    masks is slow), each with a few predictions shifted by a few pixels."""
    masks = {}
    for kind in ("pits", "crack", "blobs"):
        masks[kind] = []
        for _ in range(pool):
            truth = make_mask(kind, rng)
            shifts = [(int(rng.integers(-5, 6)), int(rng.integers(-20, 21))) for _ in range(3)]
            preds = [rle.encode(np.roll(truth, shift, axis=(0, 1))) for shift in shifts]
            masks[kind].append((rle.encode(truth), preds))

    truth_rows, pred_rows = [], []
    for i in range(n_images):
        image = f"{i:08x}.jpg"
        classes = []
        if rng.random() > 0.47:
            classes = [c for c, p in CLASS_RATE.items() if rng.random() < p] or [3]
        for c in (1, 2, 3, 4):
            if c in classes:
                truth, preds = masks[str(rng.choice(CLASS_KINDS[c]))][int(rng.integers(pool))]
                truth_rows.append((image, c, truth))
                if rng.random() < 0.85:  # found, a few pixels off
                    pred_rows.append((image, c, preds[int(rng.integers(len(preds)))]))
                    continue
            elif rng.random() < 0.04:  # a false positive
                pred_rows.append((image, c, masks["pits" if c < 3 else "blobs"][int(rng.integers(pool))][0]))
                continue
            pred_rows.append((image, c, ""))
    cols = ["ImageId", "ClassId", "EncodedPixels"]
    return pd.DataFrame(pred_rows, columns=cols), pd.DataFrame(truth_rows, columns=cols)


def decode_everything(pred: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """Baseline: decode both masks of every pair (seed's rle2mask) and compute Dice on pixels."""
    t = {(r.ImageId, r.ClassId): r.EncodedPixels for r in truth.itertuples()}
    scores = []
    for r in pred.sort_values(["ImageId", "ClassId"]).itertuples():
        p_rle, t_rle = r.EncodedPixels, t.get((r.ImageId, r.ClassId), "")
        pm = rle2mask(p_rle) if p_rle else np.zeros(SHAPE, np.uint8)
        tm = rle2mask(t_rle) if t_rle else np.zeros(SHAPE, np.uint8)
        total = int(pm.sum()) + int(tm.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((pm & tm).sum()) / total)
    return np.array(scores)


def cpu_time(fn, repeat: int = 1) -> float:
    """Fewest CPU seconds of ``repeat`` calls: this process's CPU time, which other processes on a
    busy machine disturb much less than wall time (everything here is single-threaded)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5506)
    parser.add_argument("--sample", type=int, default=500, help="images the slow baseline is timed on")
    parser.add_argument("--repeat", type=int, default=3, help="timings of mean_dice (the fastest is kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    pred, truth = synthetic_submission(args.images, rng)
    made = time.perf_counter() - t0
    runs = int(sum(len(e.split()) // 2 for e in pd.concat([pred, truth])["EncodedPixels"]))

    ours_full = cpu_time(lambda: metrics.mean_dice(pred, truth), args.repeat)
    result = metrics.mean_dice(pred, truth)

    sample_ids = set(rng.choice(pred["ImageId"].unique(), size=min(args.sample, args.images), replace=False))
    p_s, t_s = pred[pred.ImageId.isin(sample_ids)], truth[truth.ImageId.isin(sample_ids)]
    base_scores = []
    base_sample = cpu_time(lambda: base_scores.append(decode_everything(p_s, t_s)))
    base_scores = base_scores[0]
    ours_sample = cpu_time(lambda: metrics.mean_dice(p_s, t_s), args.repeat)
    got = metrics.mean_dice(p_s, t_s)["per_pair"]["dice"].to_numpy()
    assert np.allclose(got, base_scores, rtol=0, atol=1e-12), "mean_dice disagrees with the baseline"
    base_full = base_sample / len(base_scores) * result["n_pairs"]

    print(f"Mean Dice: {result['n_images']} images x 4 = {result['n_pairs']} pairs, "
          f"{(truth.EncodedPixels != '').sum()} truth / {(pred.EncodedPixels != '').sum()} predicted masks, "
          f"{runs} runs in all (data made in {made:.1f} s); mean Dice {result['mean_dice']:.4f}")
    print(f"CPU seconds, fewest of {args.repeat} for mean_dice, one run of the baseline")
    print(f"{'pairs':>12} {'decode-all s':>13} {'mean_dice s':>12} {'speed-up':>9}")
    print(f"{len(base_scores):>12} {base_sample:13.3f} {ours_sample:12.4f} {base_sample / ours_sample:8.0f}x")
    print(f"{result['n_pairs']:>12} {base_full:12.1f}* {ours_full:12.4f} {base_full / ours_full:8.0f}x")
    print("* baseline scaled from the sample (same per-pair cost)")
    return dict(ours_full=ours_full, base_full=base_full, ours_sample=ours_sample, base_sample=base_sample)


if __name__ == "__main__":
    main()
