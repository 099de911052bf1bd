"""RLE decode/encode speed: steel.data.rle against the seed notebook's rle2mask/mask2rle, same run.

Masks at 256x1600 of three kinds, and their mix in equal parts:
  pits   dozens of 2-5 px spots (like class 1): a few hundred short runs
  crack  one to three thin (1-4 px) cracks across the strip: one short run per column, ~1,000+ runs
  blobs  one to three elliptical blobs (typical class 3/4 defects): long runs

    .venv/bin/python -m bench.bench_rle [--masks 300] [--repeat 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from steel.core.names import SHAPE
from steel.data import rle

H, W = SHAPE


# ----------------------------------------------------------------------------------------------
# The seed notebook's functions (the baseline), verbatim apart from formatting.


def rle2mask(mask_rle, shape=(1600, 256)):
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape).T


def mask2rle(img):
    pixels = img.T.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


# ----------------------------------------------------------------------------------------------
# Synthetic masks shaped like Severstal defects (also used by bench.bench_metrics).


def blob(mask: np.ndarray, rng: np.random.Generator) -> None:
    """A filled, tilted ellipse 60-700 px wide and 30-256 px high."""
    a, b = rng.uniform(30, 350), rng.uniform(15, 128)
    cy, cx = rng.uniform(0, H), rng.uniform(0, W)
    theta = rng.uniform(-0.4, 0.4)
    r = int(max(a, b)) + 1
    y0, y1 = max(0, int(cy) - r), min(H, int(cy) + r)
    x0, x1 = max(0, int(cx) - r), min(W, int(cx) + r)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    mask[y0:y1, x0:x1] |= ((u / a) ** 2 + (v / b) ** 2 <= 1).astype(np.uint8)


def crack(mask: np.ndarray, rng: np.random.Generator) -> None:
    """A thin (1-4 px) wavy line across a long stretch of the strip: one short run per column."""
    x0 = int(rng.integers(0, W // 2))
    x1 = int(rng.integers(x0 + 200, W + 1))
    xs = np.arange(x0, min(x1, W))
    ys = rng.uniform(20, H - 20) + np.cumsum(rng.normal(0, 0.8, xs.size))
    ys = np.clip(ys, 0, H - 5).astype(int)
    thick = int(rng.integers(1, 5))
    for t in range(thick):
        mask[ys + t, xs] = 1


def pits(mask: np.ndarray, rng: np.random.Generator) -> None:
    """Dozens of 2-5 px spots scattered over a region (class-1-like pitting)."""
    n = int(rng.integers(20, 80))
    cx, spread = rng.uniform(0, W), rng.uniform(50, 600)
    for _ in range(n):
        s = int(rng.integers(2, 6))
        y = int(rng.integers(0, H - s))
        x = int(np.clip(rng.normal(cx, spread), 0, W - s))
        mask[y:y + s, x:x + s] = 1


def make_mask(kind: str, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    if kind == "blobs":  # typical class 3/4
        for _ in range(int(rng.integers(1, 4))):
            blob(mask, rng)
    elif kind == "pits":
        pits(mask, rng)
    elif kind == "crack":
        for _ in range(int(rng.integers(1, 4))):
            crack(mask, rng)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask


# ----------------------------------------------------------------------------------------------


def compare(base, ours, items, repeat: int) -> tuple[float, float]:
    """Mean seconds per item of two functions, each item timed alternately ``repeat`` times and the
    fastest time kept (so other processes on a loaded machine disturb both sides alike)."""
    t_base = t_ours = 0.0
    for item in items:
        best_base = best_ours = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            base(item)
            t1 = time.perf_counter()
            ours(item)
            t2 = time.perf_counter()
            best_base, best_ours = min(best_base, t1 - t0), min(best_ours, t2 - t1)
        t_base += best_base
        t_ours += best_ours
    return t_base / len(items), t_ours / len(items)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--masks", type=int, default=300, help="masks in all (a third of each kind)")
    parser.add_argument("--repeat", type=int, default=5, help="timings per mask (the fastest is kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    n = max(1, args.masks // 3)
    sets = {kind: [make_mask(kind, rng) for _ in range(n)] for kind in ("pits", "crack", "blobs")}
    rows = []
    for kind, masks in sets.items():
        encodings = [rle.encode(m) for m in masks]
        for m, e in zip(masks, encodings):  # same answers as the seed's functions
            assert e == mask2rle(m)
            assert np.array_equal(rle.decode(e), rle2mask(e))
        runs = float(np.mean([len(e.split()) // 2 for e in encodings]))
        dec = compare(rle2mask, rle.decode, encodings, args.repeat)
        enc = compare(mask2rle, rle.encode, masks, args.repeat)
        rows.append(dict(set=kind, op="decode", runs=runs, base=dec[0], ours=dec[1]))
        rows.append(dict(set=kind, op="encode", runs=runs, base=enc[0], ours=enc[1]))
    for op in ("decode", "encode"):  # the mix: equal parts of the three sets
        part = [r for r in rows if r["op"] == op]
        rows.append(dict(set="mix", op=op, runs=float(np.mean([r["runs"] for r in part])),
                         base=float(np.mean([r["base"] for r in part])),
                         ours=float(np.mean([r["ours"] for r in part]))))

    print(f"RLE at {H}x{W}, {n} masks per kind, fastest of {args.repeat} timings per mask")
    print(f"{'masks':6} {'op':7} {'runs/mask':>9} {'seed ms':>9} {'steel ms':>9} {'speed-up':>9}")
    for r in rows:
        print(f"{r['set']:6} {r['op']:7} {r['runs']:9.0f} {r['base'] * 1e3:9.3f} {r['ours'] * 1e3:9.3f} "
              f"{r['base'] / r['ours']:8.1f}x")
    return rows


if __name__ == "__main__":
    main()
