"""Write a synthetic Severstal-like steel-defect dataset in the Kaggle layout.

``steel synth OUT --images N --test-images M --seed S [--workers K]`` writes::

    OUT/train_images/<id>.jpg      256x1600 grayscale JPEGs stored as 3 equal channels
    OUT/train.csv                  ImageId,ClassId,EncodedPixels (defect rows only)
    OUT/test_images/<id>.jpg
    OUT/sample_submission.csv      ImageId,ClassId,EncodedPixels, 4 rows per test image, "1 1"
    OUT/test_truth.csv             ImageId,ClassId,EncodedPixels (defect rows only)
    OUT/synth.json                 what was generated (marks the folder as ours, safe to regenerate)

The images look like rolled steel: streaks along the rolling direction, low-frequency brightness
variation, sensor noise, sometimes a dark region where the sheet ends, and harmless marks (faint
lines, oil-stain smudges, light speckles) that are *not* labelled. Defects follow the real set's
shapes, frequencies and the seed notebook's per-class area bounds:

- class 1: clusters of small dark/bright pits;          area 500 - 15,500 px
- class 2: thin near-vertical cracks (rare);            area 700 - 10,000 px
- class 3: long scratches or large worn regions (most); area 1,100 - 160,000 px
- class 4: large dark patches;                          area 2,800 - 127,000 px

Each defect's mask is computed first, as the pixels of a "shape field" below a threshold chosen so
the mask has exactly the sampled area, and then painted through: every masked pixel is altered and
no other pixel is touched by that defect. Classes never overlap.

Image ``i`` of a split depends only on ``(seed, split, i)`` and the label plan (which is drawn from
the seed with exact per-category quotas), so the output is identical for any number of workers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from steel.core.names import CLASSES, SEED_AREAS, SHAPE
from steel.data import rle

log = logging.getLogger(__name__)

H, W = SHAPE
# The seed notebook's per-class area bounds (pixels of one class in one image).
# Log-normal (median, sigma) of the sampled areas, fitted to the quartiles in the seed's area table.
_AREA_DIST: dict[int, tuple[float, float]] = {1: (3200, 0.75), 2: (3000, 0.55), 3: (12000, 1.25), 4: (25000, 0.85)}

# Frequencies of the real training set.
NO_DEFECT_SHARE = 0.47
CLASS_SHARE = {1: 0.13, 2: 0.035, 3: 0.77, 4: 0.12}  # of defect images containing each class
TWO_CLASS_SHARE = 0.055  # of defect images
_PAIR_WEIGHTS = {(3, 4): 0.45, (1, 3): 0.35, (1, 2): 0.10, (2, 3): 0.10}

JPEG_QUALITY = 90
MARKER = "synth.json"
_SPLIT_CODE = {"train": 1, "test": 2}
_MIN_DELTA = 6.0  # every masked pixel is changed by at least this many grey levels before noise/JPEG


# ---------------------------------------------------------------------------------------------
# Label plan: which classes each image gets
# ---------------------------------------------------------------------------------------------


def _categories() -> dict[tuple[int, ...], float]:
    """Probability of each label set, so that the class shares above hold exactly in expectation."""
    pair_share = {k: sum(w for p, w in _PAIR_WEIGHTS.items() if k in p) for k in CLASSES}
    single = {k: (CLASS_SHARE[k] - TWO_CLASS_SHARE * pair_share[k]) / (1 - TWO_CLASS_SHARE) for k in CLASSES}
    defect = 1 - NO_DEFECT_SHARE
    cats: dict[tuple[int, ...], float] = {(): NO_DEFECT_SHARE}
    for k in CLASSES:
        cats[(k,)] = defect * (1 - TWO_CLASS_SHARE) * single[k]
    for pair, w in _PAIR_WEIGHTS.items():
        cats[pair] = defect * TWO_CLASS_SHARE * w
    return cats


def plan_labels(n: int, seed: int, split: str) -> list[tuple[int, ...]]:
    """Label sets of ``n`` images: exact quotas (largest remainder) in a seeded random order."""
    cats = _categories()
    keys = list(cats)
    exact = np.array([cats[k] for k in keys]) * n
    counts = np.floor(exact).astype(int)
    remainder = exact - counts
    # Largest remainders first; ties broken by category order (deterministic).
    for i in np.argsort(-remainder, kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    labels = [k for k, c in zip(keys, counts) for _ in range(c)]
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], 0x91A7])
    order = rng.permutation(n)
    return [labels[i] for i in order]


def image_ids(seed: int, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """Kaggle-like ids (9 hex chars + '.jpg'), deterministic from the seed and unique over both splits."""
    seen: set[str] = set()
    out: dict[str, list[str]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            salt = 0
            while True:
                h = hashlib.sha256(f"steel-synth:{seed}:{split}:{i}:{salt}".encode()).hexdigest()[:9]
                if h not in seen:
                    break
                salt += 1
            seen.add(h)
            out[split].append(h + ".jpg")
    return out["train"], out["test"]


# ---------------------------------------------------------------------------------------------
# Noise and geometry helpers (vectorised; work on crops of the image)
# ---------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float | None = None) -> np.ndarray:
    """Smooth random field of shape (h, w), std ~1, with correlation lengths ~cell_y, cell_x pixels."""
    from PIL import Image

    cell_x = cell_y if cell_x is None else cell_x
    gh = max(2, int(math.ceil(h / max(cell_y, 1.0))) + 2)
    gw = max(2, int(math.ceil(w / max(cell_x, 1.0))) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
    out = np.asarray(up, dtype=np.float32)
    std = float(out[::3, ::3].std())  # a subsample is enough to normalise, and 9x cheaper
    return out / std if std > 1e-6 else out


def _noise1d(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """1-D smooth noise of length n, std ~1, correlation length ~scale samples."""
    if scale <= 1:
        return rng.standard_normal(n).astype(np.float32)
    m = int(math.ceil(n / scale)) + 2
    knots = rng.standard_normal(m)
    out = np.interp(np.arange(n) / scale, np.arange(m), knots).astype(np.float32)
    std = float(out.std())
    return out / std if std > 1e-6 else out


def _crop(cy: float, cx: float, hy: float, hx: float) -> tuple[int, int, int, int] | None:
    y0, y1 = max(0, int(cy - hy)), min(H, int(cy + hy) + 2)
    x0, x1 = max(0, int(cx - hx)), min(W, int(cx + hx) + 2)
    if y1 - y0 < 1 or x1 - x0 < 1:
        return None
    return y0, y1, x0, x1


def _polyline_dist(pts: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Euclidean distance of every pixel of a crop to a polyline (pts: K x 2, (y, x))."""
    yy = np.arange(y0, y1, dtype=np.float32)[:, None]
    xx = np.arange(x0, x1, dtype=np.float32)[None, :]
    best = np.full((y1 - y0, x1 - x0), np.inf, dtype=np.float32)
    for (py, px), (qy, qx) in zip(pts[:-1], pts[1:]):
        vy, vx = qy - py, qx - px
        vv = vy * vy + vx * vx
        if vv < 1e-9:
            t = np.zeros_like(best)
        else:
            t = np.clip(((yy - py) * vy + (xx - px) * vx) / vv, 0.0, 1.0)
        dy = yy - (py + t * vy)
        dx = xx - (px + t * vx)
        np.minimum(best, dy * dy + dx * dx, out=best)
    return np.sqrt(best)


class _Shape:
    """A class's shape field over the image: lower = more inside; components remember their ids."""

    def __init__(self) -> None:
        self.field = np.full((H, W), np.inf, dtype=np.float32)
        self.comp = np.full((H, W), -1, dtype=np.int16)
        self.n = 0

    def add(self, box: tuple[int, int, int, int] | None, f: np.ndarray) -> int:
        cid = self.n
        self.n += 1
        if box is None:
            return cid
        y0, y1, x0, x1 = box
        cur = self.field[y0:y1, x0:x1]
        better = f < cur
        cur[better] = f[better]
        self.comp[y0:y1, x0:x1][better] = cid
        return cid

    def ellipse(self, rng, cy, cx, ry, rx, angle=0.0, noise=0.0, cell=None, margin=2.0) -> int:
        """Rotated ellipse (field 1 on its boundary), optionally with smooth edge noise."""
        r = max(ry, rx) * margin + 2
        box = _crop(cy, cx, r, r)
        if box is None:
            return self.add(None, None)
        y0, y1, x0, x1 = box
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        c, s = math.cos(angle), math.sin(angle)
        u = (xx * c + yy * s) / rx
        v = (-xx * s + yy * c) / ry
        f = np.sqrt(u * u + v * v)
        if noise:
            f = f + noise * _smooth_noise(rng, y1 - y0, x1 - x0, cell or max(3.0, min(ry, rx) / 2))
        return self.add(box, f.astype(np.float32))

    def polyline(self, rng, pts: np.ndarray, hw: float, noise=0.0, cell=None, margin=2.5) -> int:
        """Band around a polyline (field 1 at distance hw), optionally with smooth edge noise."""
        m = hw * margin + 3
        ys, xs = pts[:, 0], pts[:, 1]
        box = _crop((ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2,
                    (ys.max() - ys.min()) / 2 + m, (xs.max() - xs.min()) / 2 + m)
        if box is None:
            return self.add(None, None)
        f = _polyline_dist(pts, *box) / hw
        if noise:
            f = f + noise * _smooth_noise(rng, f.shape[0], f.shape[1], cell or max(3.0, hw))
        return self.add(box, f.astype(np.float32))

    def select(self, area: int, allowed: np.ndarray) -> tuple[np.ndarray, float] | None:
        """Mask of exactly ``area`` allowed pixels with the lowest field, and the threshold used."""
        flat = self.field.ravel()
        cand = np.flatnonzero(allowed.ravel() & np.isfinite(flat))
        if cand.size < area:
            return None
        vals = flat[cand]
        part = np.argpartition(vals, area - 1)[:area]
        mask = np.zeros(H * W, dtype=bool)
        mask[cand[part]] = True
        return mask.reshape(H, W), float(vals[part].max())


def _sample_area(rng: np.random.Generator, cls: int) -> int:
    lo, hi = SEED_AREAS[cls]
    lo_t, hi_t = lo * 1.15, hi * 0.95
    med, sigma = _AREA_DIST[cls]
    for _ in range(50):
        a = med * math.exp(sigma * rng.standard_normal())
        if lo_t <= a <= hi_t:
            return int(a)
    return int(min(max(med, lo_t), hi_t))


def _pick_point(rng: np.random.Generator, allowed_idx: np.ndarray) -> tuple[float, float]:
    i = int(allowed_idx[rng.integers(allowed_idx.size)])
    return float(i // W), float(i % W)


# ---------------------------------------------------------------------------------------------
# Background: rolled steel
# ---------------------------------------------------------------------------------------------


@dataclass
class _Background:
    img: np.ndarray  # float32 H x W
    steel: np.ndarray  # bool: where defects may be placed (the sheet, away from its edge)
    vertical: bool  # rolling streak direction


def _background(rng: np.random.Generator, has_defects: bool) -> _Background:
    img = np.full((H, W), rng.uniform(70, 135), dtype=np.float32)
    # Illumination: low-frequency brightness variation and a gentle left-right gradient.
    img += _smooth_noise(rng, H, W, rng.uniform(60, 140), rng.uniform(150, 450)) * rng.uniform(4, 11)
    img += rng.uniform(-8, 8) * np.linspace(-1, 1, W, dtype=np.float32)[None, :]

    # Rolling streaks: a multi-scale 1-D profile across the rolling direction, slightly tilted.
    vertical = rng.random() < 0.7
    across, along = (W, H) if vertical else (H, W)
    slope = rng.uniform(-0.08, 0.08) if vertical else rng.uniform(-0.012, 0.012)
    shift = np.round(slope * np.arange(along)).astype(np.int64)
    shift -= shift.min()
    n = across + int(shift.max()) + 1
    prof = (_noise1d(rng, n, 1) * rng.uniform(1.5, 4)
            + _noise1d(rng, n, rng.uniform(2.5, 6)) * rng.uniform(2.5, 6)
            + _noise1d(rng, n, rng.uniform(15, 60)) * rng.uniform(2.5, 7))
    # A few sharper roll marks.
    for _ in range(rng.integers(0, 6)):
        c = rng.integers(0, n)
        wdt = rng.integers(1, 4)
        prof[c:c + wdt] += rng.uniform(-12, 12)
    idx = np.arange(across)[None, :] + shift[:, None]  # along x across
    streak = prof[idx]
    if not vertical:
        streak = streak.T
    img += streak * (1 + 0.35 * _smooth_noise(rng, H, W, 40, 200 if not vertical else 60))

    steel = np.ones((H, W), dtype=bool)
    # Sometimes the sheet ends inside the frame: a dark region at the left or right edge.
    if rng.random() < 0.2:
        width = rng.uniform(30, 300 if has_defects else 600)
        left = rng.random() < 0.5
        ys = np.arange(H, dtype=np.float32)
        edge = width + rng.uniform(-0.15, 0.15) * (ys - H / 2) + 2.5 * _noise1d(rng, H, 12)
        xs = np.arange(W, dtype=np.float32)[None, :]
        d = (xs - edge[:, None]) if left else ((W - 1 - edge[:, None]) - xs)  # > 0 on the sheet
        ramp = rng.uniform(2, 7)
        alpha = np.clip(d / ramp, 0, 1)
        dark = rng.uniform(6, 28) + 2.0 * _smooth_noise(rng, H, W, 20)
        if rng.random() < 0.4:  # bright rim where light catches the sheet edge
            img += rng.uniform(10, 30) * ((d > 0) & (d < rng.uniform(3, 8)))
        img = dark + (img - dark) * alpha
        steel = d > ramp + 16
    return _Background(img.astype(np.float32), steel, vertical)


def _harmless(rng: np.random.Generator, img: np.ndarray) -> None:
    """Surface features that are not defects (never labelled): marks, smudges, speckles."""
    from PIL import Image, ImageDraw, ImageFilter

    if rng.random() < 0.4:  # faint marks: short thin lines, slightly blurred
        sign, amp = rng.choice([-1, 1]), rng.uniform(5, 10)
        for _ in range(rng.integers(1, 5)):
            length, ang = rng.uniform(20, 120), rng.uniform(0, math.pi)
            dx, dy = length * math.cos(ang), length * math.sin(ang)
            pad = 4
            cw, ch = int(abs(dx)) + 2 * pad + 1, int(abs(dy)) + 2 * pad + 1
            canvas = Image.new("L", (cw, ch), 0)
            x0, y0 = pad + max(0.0, -dx), pad + max(0.0, -dy)
            ImageDraw.Draw(canvas).line([(x0, y0), (x0 + dx, y0 + dy)], fill=255, width=int(rng.integers(1, 3)))
            mark = np.asarray(canvas.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32) / 255.0
            top, left = int(rng.integers(-ch // 2, H - ch // 2)), int(rng.integers(-cw // 2, W - cw // 2))
            ty0, tx0 = max(top, 0), max(left, 0)
            ty1, tx1 = min(top + ch, H), min(left + cw, W)
            img[ty0:ty1, tx0:tx1] += sign * amp * mark[ty0 - top:ty1 - top, tx0 - left:tx1 - left]
    if rng.random() < 0.3:  # oil-stain-like smudges: faint, soft-edged
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(0, H), rng.uniform(0, W)
            ry, rx = rng.uniform(20, 90), rng.uniform(30, 170)
            box = _crop(cy, cx, 2.2 * ry, 2.2 * rx)
            if box is None:
                continue
            y0, y1, x0, x1 = box
            yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
            xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
            r2 = yy * yy + xx * xx + 0.4 * _smooth_noise(rng, y1 - y0, x1 - x0, max(ry, rx) / 3)
            img[y0:y1, x0:x1] -= rng.uniform(7, 15) * np.exp(-np.maximum(r2, 0) * 1.5)
    if rng.random() < 0.35:  # light speckles: scattered single bright pixels
        k = int(rng.integers(30, 300))
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        ys = np.clip(rng.normal(cy, rng.uniform(30, 200), k), 0, H - 1).astype(int)
        xs = np.clip(rng.normal(cx, rng.uniform(100, 800), k), 0, W - 1).astype(int)
        np.add.at(img, (ys, xs), rng.uniform(10, 28, k).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Defects: shape (mask) first, then paint through the mask
# ---------------------------------------------------------------------------------------------


def _shape_pits(rng, area, allowed_idx) -> tuple[_Shape, np.ndarray]:
    """Class 1: clusters of small pits. Returns the shape and a per-component signed amplitude."""
    shape, amps = _Shape(), []
    n_clusters = 1 + int(area > 2500 and rng.random() < 0.5) + int(area > 7000 and rng.random() < 0.6)
    for share in rng.dirichlet(np.full(n_clusters, 3.0)):
        a = area * share
        rs = rng.uniform(3.5, 7.0)
        n_spots = int(np.clip(round(a / (math.pi * rs * rs * 1.1)), 3, 90))
        rs = math.sqrt(a / (n_spots * math.pi * 1.1))
        cover = rng.uniform(0.1, 0.25)
        region = a / cover
        aspect = rng.uniform(1.0, 3.0)
        sy = min(math.sqrt(region / (math.pi * aspect)), 70.0)
        sx = region / (math.pi * sy)
        cy, cx = _pick_point(rng, allowed_idx)
        ys = cy + rng.normal(0, sy / 2, n_spots)
        xs = cx + rng.normal(0, sx / 2, n_spots)
        bright = rng.random(n_spots) < 0.25
        for i in range(n_spots):
            shape.ellipse(rng, ys[i], xs[i], rs * rng.uniform(0.7, 1.2), rs * rng.uniform(0.9, 1.6),
                          angle=rng.uniform(-0.5, 0.5), margin=2.2)
            amps.append(rng.uniform(30, 55) if bright[i] else -rng.uniform(40, 75))
    return shape, np.array(amps, dtype=np.float32)


def _crack_points(rng, cy, cx, length) -> np.ndarray:
    k = int(rng.integers(8, 15))
    ys = np.linspace(cy - length / 2, cy + length / 2, k)
    tilt = math.tan(rng.uniform(-0.25, 0.25))
    xs = cx + tilt * (ys - cy) + np.cumsum(rng.normal(0, rng.uniform(1.5, 4.0), k))
    xs -= xs.mean() - cx
    return np.stack([ys, xs], axis=1)


def _shape_cracks(rng, area, allowed_idx) -> tuple[_Shape, np.ndarray]:
    """Class 2: thin near-vertical cracks."""
    shape, amps = _Shape(), []
    n = max(int(rng.choice([1, 1, 1, 2, 2, 3])), int(math.ceil(area / 4500)))
    for share in rng.dirichlet(np.full(n, 4.0)):
        a = area * share
        length = rng.uniform(90, 260)
        hw = float(np.clip(a / (2 * length), 3.0, 9.0))
        length = a / (2 * hw)
        cy, cx = _pick_point(rng, allowed_idx)
        cy = float(np.clip(cy, length / 2 - 20, H - length / 2 + 20)) if length < H else H / 2
        shape.polyline(rng, _crack_points(rng, cy, cx, length), hw, noise=0.15, cell=5)
        amps.append(-rng.uniform(45, 80))
    return shape, np.array(amps, dtype=np.float32)


def _line_points(rng, cy, cx, length, angle, wobble) -> np.ndarray:
    k = int(rng.integers(6, 16))
    t = np.linspace(-length / 2, length / 2, k)
    off = np.cumsum(rng.normal(0, wobble, k))
    off -= np.linspace(off[0], off[-1], k)  # a gentle bend, not a drift
    c, s = math.cos(angle), math.sin(angle)
    ys = cy + t * s + off * c
    xs = cx + t * c - off * s
    return np.stack([ys, xs], axis=1)


def _shape_scratches_or_wear(rng, area, allowed_idx) -> tuple[_Shape, np.ndarray, str]:
    """Class 3: long scratches (smaller areas) or large worn regions (larger areas)."""
    shape, amps = _Shape(), []
    worn = rng.random() < (0.85 if area > 30000 else 0.25)
    if worn:
        n = int(rng.choice([1, 1, 2])) + int(area > 80000)
        for share in rng.dirichlet(np.full(n, 4.0)):
            a = area * share
            aspect = rng.uniform(1.5, 5.0)
            tall = rng.random() < 0.2
            ry = math.sqrt(a / (math.pi * aspect))
            rx = aspect * ry
            if tall:
                ry, rx = rx, ry
            if ry > 110:
                ry, rx = 110.0, a / (math.pi * 110.0)
            rx = min(rx, 700.0)
            cy, cx = _pick_point(rng, allowed_idx)
            shape.ellipse(rng, cy, cx, ry, rx, angle=rng.uniform(-0.15, 0.15), noise=0.3,
                          cell=max(6.0, min(ry, rx) / 2), margin=1.7)
            amps.append(rng.uniform(22, 45) if rng.random() < 0.7 else -rng.uniform(22, 40))
        return shape, np.array(amps, dtype=np.float32), "worn"
    n = int(rng.choice([1, 1, 2, 3])) + int(area > 20000)
    for share in rng.dirichlet(np.full(n, 4.0)):
        a = area * share
        r = rng.random()
        if r < 0.6:
            angle, max_len = rng.uniform(-0.26, 0.26), 1500.0
        elif r < 0.85:
            angle, max_len = rng.choice([-1, 1]) * rng.uniform(0.26, 0.9), 600.0
        else:
            angle, max_len = math.pi / 2 + rng.uniform(-0.2, 0.2), 320.0
        hw = rng.uniform(3.0, 12.0)
        length = float(np.clip(a / (2 * hw), 120.0, max_len))
        hw = float(np.clip(a / (2 * length), 3.0, 30.0))
        cy, cx = _pick_point(rng, allowed_idx)
        shape.polyline(rng, _line_points(rng, cy, cx, length, angle, rng.uniform(1, 6)), hw,
                       noise=0.2, cell=max(4.0, hw))
        # Near-vertical scratches are bright, so they do not read as (dark) class-2 cracks.
        bright = r >= 0.85 or rng.random() < 0.6
        amps.append(rng.uniform(30, 60) if bright else -rng.uniform(30, 55))
    return shape, np.array(amps, dtype=np.float32), "scratch"


def _shape_patches(rng, area, allowed_idx) -> tuple[_Shape, np.ndarray]:
    """Class 4: large dark patches. Amplitudes are darkening factors (new = old * f)."""
    shape, amps = _Shape(), []
    n = int(rng.choice([1, 1, 1, 2, 2, 3]))
    for share in rng.dirichlet(np.full(n, 4.0)):
        a = area * share
        aspect = rng.uniform(1.0, 2.5)
        ry = math.sqrt(a / (math.pi * aspect))
        rx = aspect * ry
        if ry > 115:
            ry, rx = 115.0, a / (math.pi * 115.0)
        cy, cx = _pick_point(rng, allowed_idx)
        shape.ellipse(rng, cy, cx, ry, rx, angle=rng.uniform(-0.6, 0.6), noise=0.2,
                      cell=max(6.0, min(ry, rx) / 2), margin=1.7)
        amps.append(rng.uniform(0.35, 0.6))
    return shape, np.array(amps, dtype=np.float32)


def _bbox_noise(rng, ys: np.ndarray, xs: np.ndarray, cell: float) -> np.ndarray:
    """Smooth noise sampled at the given pixels (generated over their bounding box only)."""
    y0, x0 = int(ys.min()), int(xs.min())
    field = _smooth_noise(rng, int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1, cell)
    return field[ys - y0, xs - x0]


def _paint(rng, cls: int, kind: str, img: np.ndarray, mask: np.ndarray, shape: _Shape, thr: float,
           amps: np.ndarray, vertical: bool) -> None:
    """Alter exactly the masked pixels (each by at least _MIN_DELTA grey levels)."""
    ys, xs = np.nonzero(mask)
    s = np.clip(shape.field[ys, xs] / max(thr, 1e-6), 0.0, 1.0)  # 0 in the core, 1 at the edge
    amp = amps[shape.comp[ys, xs]]
    old = img[ys, xs]
    if cls == 1:
        delta = amp * (1 - 0.45 * s * s)
    elif cls == 2:
        delta = amp * (1 - 0.55 * s * s)
    elif cls == 3 and kind == "scratch":
        # Scraped metal: fine grain inside the scratch.
        tex = _bbox_noise(rng, ys, xs, 2.5)
        delta = amp * (1 - 0.35 * s * s) + 0.25 * np.abs(amp) * tex
    elif cls == 3:
        # Worn: brightness shift plus streaks along the rolling direction, amplified.
        n = W if vertical else H
        prof = _noise1d(rng, n, rng.uniform(1.5, 4)) + 0.5 * _noise1d(rng, n, 1)
        tex = np.clip(prof[xs if vertical else ys] / 1.5, -1.5, 1.5)
        delta = amp * (0.85 - 0.3 * s * s) + 0.45 * np.abs(amp) * tex
    else:
        mottle = _bbox_noise(rng, ys, xs, 8)
        factor = amp + (1 - amp) * 0.3 * s * s + 0.07 * mottle
        delta = old * (np.clip(factor, 0.15, 0.85) - 1)
    sign = np.where(delta >= 0, 1.0, -1.0) if cls != 4 else -1.0
    delta = sign * np.maximum(np.abs(delta), _MIN_DELTA)
    img[ys, xs] = old + delta.astype(np.float32)


_SHAPERS = {1: _shape_pits, 2: _shape_cracks, 4: _shape_patches}


def render_layers(seed: int, split: str, index: int, classes: tuple[int, ...]
                  ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray], np.random.Generator]:
    """Image ``index`` of ``split`` before sensor noise: (surface without defects, with defects, masks, rng).

    The second image differs from the first exactly on the union of the masks (float32, H x W).
    """
    for cls in classes:
        if cls not in SEED_AREAS:
            raise ValueError(f"unknown defect class {cls!r}; classes are {CLASSES}")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    bg = _background(rng, bool(classes))
    img = bg.img
    _harmless(rng, img)
    clean = img.copy()
    masks: dict[int, np.ndarray] = {}
    taken = np.zeros((H, W), dtype=bool)
    for cls in rng.permutation(np.array(classes, dtype=int)).tolist() if classes else []:
        lo, hi = SEED_AREAS[cls]
        allowed = bg.steel & ~taken
        allowed_idx = np.flatnonzero(allowed)
        area = min(_sample_area(rng, cls), int(0.5 * allowed_idx.size))
        if area < lo:
            raise RuntimeError(f"no room for class {cls} in image {split}/{index}")  # cannot happen: see caps
        for attempt in range(12):
            if cls == 3:
                shape, amps, kind = _shape_scratches_or_wear(rng, area, allowed_idx)
            else:
                (shape, amps), kind = _SHAPERS[cls](rng, area, allowed_idx), ""
            got = shape.select(area, allowed)
            if got is not None:
                break
            if attempt >= 5:  # persistent lack of room: shrink towards the lower bound
                area = max(int(lo * 1.15), int(area * 0.7))
        else:
            raise RuntimeError(f"could not place class {cls} in image {split}/{index}")
        mask, thr = got
        _paint(rng, cls, kind, img, mask, shape, thr, amps, bg.vertical)
        masks[cls] = mask
        taken |= mask
    return clean, img, masks, rng


def render(seed: int, split: str, index: int, classes: tuple[int, ...]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """One synthetic image (uint8 H x W grayscale) and its masks ({class: bool H x W}).

    Depends only on its arguments: image ``index`` is the same whatever else is generated.
    """
    _, img, masks, rng = render_layers(seed, split, index, classes)
    # Sensor noise over everything, last.
    img += rng.standard_normal((H, W), dtype=np.float32) * np.float32(rng.uniform(2.0, 4.5))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), masks


def encode_jpeg(gray: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a grayscale image stored as 3 equal channels (like the Severstal images)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _render_task(task: tuple) -> tuple[str, dict[int, str]]:
    seed, split, index, image_id, classes, folder = task
    gray, masks = render(seed, split, index, classes)
    path = os.path.join(folder, image_id)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(encode_jpeg(gray))
    os.replace(tmp, path)
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


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


_OUTPUT_FILES = ("train.csv", "test_truth.csv", "sample_submission.csv")


def _prepare_local(out: str) -> None:
    """Create ``out``; clear a previous synthetic set there; refuse to touch any other dataset."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output {out!r} exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    ours = os.path.exists(os.path.join(out, MARKER))
    present = [p for p in _OUTPUT_FILES if os.path.exists(os.path.join(out, p))]
    present += [p for p in ("train_images", "test_images")
                if os.path.isdir(os.path.join(out, p)) and os.listdir(os.path.join(out, p))]
    if present and not ours:
        raise ValueError(
            f"output {out!r} already holds a dataset not written by 'steel synth' ({', '.join(present)}); "
            "refusing to overwrite it: choose an empty or new folder")
    if ours:
        for name in ("train_images", "test_images"):
            folder = os.path.join(out, name)
            if os.path.isdir(folder):
                for f in os.listdir(folder):
                    if f.endswith((".jpg", ".tmp")):
                        os.remove(os.path.join(folder, f))
        for name in (*_OUTPUT_FILES, MARKER):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    for name in ("train_images", "test_images"):
        os.makedirs(os.path.join(out, name), exist_ok=True)
    # Claim the folder first, so an interrupted run can be regenerated over.
    _write_text_atomic(os.path.join(out, MARKER), json.dumps({"generator": "steel.data.synth", "complete": False}) + "\n")


def _prepare_remote(out: str) -> None:
    """Same as :func:`_prepare_local` for an S3 prefix (through :mod:`steel.core.storage`)."""
    from steel.core import storage

    if storage.exists(storage.join(out, MARKER)):
        for name in ("train_images", "test_images"):
            for f in storage.list_files(storage.join(out, name), suffixes=[".jpg"]):
                storage.delete(f, missing_ok=True)
        for name in _OUTPUT_FILES:
            storage.delete(storage.join(out, name), missing_ok=True)
    else:
        present = [p for p in _OUTPUT_FILES if storage.exists(storage.join(out, p))]
        present += [p for p in ("train_images", "test_images") if storage.list_files(storage.join(out, p))]
        if present:
            raise ValueError(
                f"output {out!r} already holds a dataset not written by 'steel synth' ({', '.join(present)}); "
                "refusing to overwrite it: choose an empty or new prefix")
    storage.write_text(storage.join(out, MARKER), json.dumps({"generator": "steel.data.synth", "complete": False}) + "\n")


def _upload(local: str, out: str) -> None:
    """Images first, then the CSVs, then the completed marker: a reader never sees labels without images."""
    from steel.core import storage

    for name in ("train_images", "test_images"):
        storage.copy_local_dir_to(os.path.join(local, name), storage.join(out, name))
    for name in (*_OUTPUT_FILES, MARKER):
        with open(os.path.join(local, name), encoding="utf-8") as f:
            storage.write_text(storage.join(out, name), f.read())


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


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
        out_uri: destination folder: local path, ``file://path`` or ``s3://bucket/prefix``
            (S3 goes through :mod:`steel.core.storage`; the set is built in a local temp folder first).
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
    remote = _is_remote(out_uri)
    if remote:
        if not out_uri.startswith("s3://"):
            raise ValueError(f"unsupported output URI {out_uri!r}: use a local path, file:// or s3://")
        _prepare_remote(out_uri)
        tmpdir = tempfile.mkdtemp(prefix="steel-synth-")
        local = tmpdir
        _prepare_local(local)
    else:
        tmpdir = None
        local = _local_path(out_uri)
        _prepare_local(local)

    try:
        train_ids, test_ids = image_ids(seed, images, test_images)
        tasks = []
        for split, ids, folder in (("train", train_ids, "train_images"), ("test", test_ids, "test_images")):
            plan = plan_labels(len(ids), seed, split)
            tasks += [(seed, split, i, image_id, plan[i], os.path.join(local, folder)) for i, image_id in enumerate(ids)]
        results = _run_tasks(tasks, workers, progress)
        train_res, test_res = results[:images], results[images:]

        _write_text_atomic(os.path.join(local, "train.csv"),
                           _csv([(i, c, e) for i, r in train_res for c, e in r.items()]))
        _write_text_atomic(os.path.join(local, "test_truth.csv"),
                           _csv([(i, c, e) for i, r in test_res for c, e in r.items()]))
        _write_text_atomic(os.path.join(local, "sample_submission.csv"),
                           _csv([(i, c, "1 1") for i in test_ids for c in CLASSES]))
        summary = {
            "out": out_uri, "seed": seed, "workers": workers,
            "train": _stats(train_res), "test": _stats(test_res),
        }
        marker = {k: v for k, v in summary.items() if k not in ("out", "workers")}
        marker.update(generator="steel.data.synth", complete=True)
        _write_text_atomic(os.path.join(local, MARKER), json.dumps(marker, indent=1, sort_keys=True) + "\n")
        if remote:
            _upload(local, out_uri)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    log.debug(summary_line(summary))
    return summary


def summary_line(summary: dict) -> str:
    tr = summary["train"]
    cls = " ".join(f"{k}:{v}" for k, v in tr["class_images"].items())
    return (f"synth: {tr['images']} train images ({tr['no_defect']} without defect; images per class {cls}; "
            f"{tr['two_class']} with two classes) + {summary['test']['images']} test images -> "
            f"{summary['out']} in {summary['seconds']:.1f} s ({summary['workers']} workers)")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _nonneg(name: str, minimum: int = 0):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value

    parse.__name__ = name
    return parse


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder: local path, file:// or s3://bucket/prefix")
    parser.add_argument("--images", type=_nonneg("--images", 1), default=400, help="training images (default 400)")
    parser.add_argument("--test-images", type=_nonneg("--test-images", 0), default=100,
                        help="test images (default 100)")
    parser.add_argument("--seed", type=_nonneg("--seed", 0), default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=_nonneg("--workers", 1), default=None,
                        help="processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cli_main(args: argparse.Namespace) -> int:
    summary = generate(args.out, images=args.images, test_images=args.test_images, seed=args.seed,
                       workers=args.workers, progress=not args.no_progress)
    print(summary_line(summary))
    return 0
