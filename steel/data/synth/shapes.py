"""Defect masks of the synthetic set: a smooth "shape field" per defect, thresholded to exactly the sampled area.

Each class has its shaper: class 1 clusters of small pits, class 2 thin near-vertical cracks, class 3
long scratches or large worn regions, class 4 large dark patches. Vectorised, on crops of the image.
"""

from __future__ import annotations

import math

import numpy as np

from steel.core.names import SEED_AREAS, SHAPE

H, W = SHAPE
# Log-normal (median, sigma) of each class's sampled areas, fitted to the quartiles of the seed's area table
# (the areas stay inside the seed's per-class bounds, steel.core.names.SEED_AREAS).
AREA_DIST: dict[int, tuple[float, float]] = {1: (3200, 0.75), 2: (3000, 0.55), 3: (12000, 1.25), 4: (25000, 0.85)}


# ---------------------------------------------------------------------------------------------
# Noise and geometry helpers (vectorised; work on crops of the image)
# ---------------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float | None = None) -> np.ndarray:
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


def noise1d(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """1-D smooth noise of length n, std ~1, correlation length ~scale samples."""
    if scale <= 1:
        return rng.standard_normal(n).astype(np.float32)
    m = int(math.ceil(n / scale)) + 2
    knots = rng.standard_normal(m)
    out = np.interp(np.arange(n) / scale, np.arange(m), knots).astype(np.float32)
    std = float(out.std())
    return out / std if std > 1e-6 else out


def crop(cy: float, cx: float, hy: float, hx: float) -> tuple[int, int, int, int] | None:
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


class Shape:
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
        box = crop(cy, cx, r, r)
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
            f = f + noise * smooth_noise(rng, y1 - y0, x1 - x0, cell or max(3.0, min(ry, rx) / 2))
        return self.add(box, f.astype(np.float32))

    def polyline(self, rng, pts: np.ndarray, hw: float, noise=0.0, cell=None, margin=2.5) -> int:
        """Band around a polyline (field 1 at distance hw), optionally with smooth edge noise."""
        m = hw * margin + 3
        ys, xs = pts[:, 0], pts[:, 1]
        box = crop((ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2,
                    (ys.max() - ys.min()) / 2 + m, (xs.max() - xs.min()) / 2 + m)
        if box is None:
            return self.add(None, None)
        f = _polyline_dist(pts, *box) / hw
        if noise:
            f = f + noise * smooth_noise(rng, f.shape[0], f.shape[1], cell or max(3.0, hw))
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


def sample_area(rng: np.random.Generator, cls: int) -> int:
    lo, hi = SEED_AREAS[cls]
    lo_t, hi_t = lo * 1.15, hi * 0.95
    med, sigma = AREA_DIST[cls]
    for _ in range(50):
        a = med * math.exp(sigma * rng.standard_normal())
        if lo_t <= a <= hi_t:
            return int(a)
    return int(min(max(med, lo_t), hi_t))


def _pick_point(rng: np.random.Generator, allowed_idx: np.ndarray) -> tuple[float, float]:
    i = int(allowed_idx[rng.integers(allowed_idx.size)])
    return float(i // W), float(i % W)




# ---------------------------------------------------------------------------------------------
# Defects: shape (mask) first, then paint through the mask
# ---------------------------------------------------------------------------------------------


def shape_pits(rng, area, allowed_idx) -> tuple[Shape, np.ndarray]:
    """Class 1: clusters of small pits. Returns the shape and a per-component signed amplitude."""
    shape, amps = Shape(), []
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


def shape_cracks(rng, area, allowed_idx) -> tuple[Shape, np.ndarray]:
    """Class 2: thin near-vertical cracks."""
    shape, amps = Shape(), []
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


def shape_scratches_or_wear(rng, area, allowed_idx) -> tuple[Shape, np.ndarray, str]:
    """Class 3: long scratches (smaller areas) or large worn regions (larger areas)."""
    shape, amps = Shape(), []
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


def shape_patches(rng, area, allowed_idx) -> tuple[Shape, np.ndarray]:
    """Class 4: large dark patches. Amplitudes are darkening factors (new = old * f)."""
    shape, amps = Shape(), []
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


def bbox_noise(rng, ys: np.ndarray, xs: np.ndarray, cell: float) -> np.ndarray:
    """Smooth noise sampled at the given pixels (generated over their bounding box only)."""
    y0, x0 = int(ys.min()), int(xs.min())
    field = smooth_noise(rng, int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1, cell)
    return field[ys - y0, xs - x0]
