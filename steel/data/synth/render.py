"""One synthetic image: rolled-steel surface, harmless marks, then each defect painted through its mask.

Image ``i`` of a split depends only on ``(seed, split, i)`` and its classes, so the set is identical
for any number of workers. Every masked pixel is altered (by at least ``MIN_DELTA`` grey levels
before noise and JPEG) and no other pixel is touched by that defect.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from steel.core.names import CLASSES, SEED_AREAS, SHAPE
from steel.data.synth.quotas import SPLIT_CODE
from steel.data.synth.shapes import (
    Shape,
    bbox_noise,
    crop,
    noise1d,
    sample_area,
    shape_cracks,
    shape_patches,
    shape_pits,
    shape_scratches_or_wear,
    smooth_noise,
)

H, W = SHAPE
JPEG_QUALITY = 90
MIN_DELTA = 6.0  # every masked pixel is changed by at least this many grey levels before noise/JPEG


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
    img += smooth_noise(rng, H, W, rng.uniform(60, 140), rng.uniform(150, 450)) * rng.uniform(4, 11)
    img += rng.uniform(-8, 8) * np.linspace(-1, 1, W, dtype=np.float32)[None, :]

    # Rolling streaks: a multi-scale 1-D profile across the rolling direction, slightly tilted.
    vertical = rng.random() < 0.7
    across, along = (W, H) if vertical else (H, W)
    slope = rng.uniform(-0.08, 0.08) if vertical else rng.uniform(-0.012, 0.012)
    shift = np.round(slope * np.arange(along)).astype(np.int64)
    shift -= shift.min()
    n = across + int(shift.max()) + 1
    prof = (noise1d(rng, n, 1) * rng.uniform(1.5, 4)
            + noise1d(rng, n, rng.uniform(2.5, 6)) * rng.uniform(2.5, 6)
            + noise1d(rng, n, rng.uniform(15, 60)) * rng.uniform(2.5, 7))
    # A few sharper roll marks.
    for _ in range(rng.integers(0, 6)):
        c = rng.integers(0, n)
        wdt = rng.integers(1, 4)
        prof[c:c + wdt] += rng.uniform(-12, 12)
    idx = np.arange(across)[None, :] + shift[:, None]  # along x across
    streak = prof[idx]
    if not vertical:
        streak = streak.T
    img += streak * (1 + 0.35 * smooth_noise(rng, H, W, 40, 200 if not vertical else 60))

    steel = np.ones((H, W), dtype=bool)
    # Sometimes the sheet ends inside the frame: a dark region at the left or right edge.
    if rng.random() < 0.2:
        width = rng.uniform(30, 300 if has_defects else 600)
        left = rng.random() < 0.5
        ys = np.arange(H, dtype=np.float32)
        edge = width + rng.uniform(-0.15, 0.15) * (ys - H / 2) + 2.5 * noise1d(rng, H, 12)
        xs = np.arange(W, dtype=np.float32)[None, :]
        d = (xs - edge[:, None]) if left else ((W - 1 - edge[:, None]) - xs)  # > 0 on the sheet
        ramp = rng.uniform(2, 7)
        alpha = np.clip(d / ramp, 0, 1)
        dark = rng.uniform(6, 28) + 2.0 * smooth_noise(rng, H, W, 20)
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
            box = crop(cy, cx, 2.2 * ry, 2.2 * rx)
            if box is None:
                continue
            y0, y1, x0, x1 = box
            yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
            xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
            r2 = yy * yy + xx * xx + 0.4 * smooth_noise(rng, y1 - y0, x1 - x0, max(ry, rx) / 3)
            img[y0:y1, x0:x1] -= rng.uniform(7, 15) * np.exp(-np.maximum(r2, 0) * 1.5)
    if rng.random() < 0.35:  # light speckles: scattered single bright pixels
        k = int(rng.integers(30, 300))
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        ys = np.clip(rng.normal(cy, rng.uniform(30, 200), k), 0, H - 1).astype(int)
        xs = np.clip(rng.normal(cx, rng.uniform(100, 800), k), 0, W - 1).astype(int)
        np.add.at(img, (ys, xs), rng.uniform(10, 28, k).astype(np.float32))




def _paint(rng, cls: int, kind: str, img: np.ndarray, mask: np.ndarray, shape: Shape, thr: float,
           amps: np.ndarray, vertical: bool) -> None:
    """Alter exactly the masked pixels (each by at least MIN_DELTA grey levels)."""
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
        tex = bbox_noise(rng, ys, xs, 2.5)
        delta = amp * (1 - 0.35 * s * s) + 0.25 * np.abs(amp) * tex
    elif cls == 3:
        # Worn: brightness shift plus streaks along the rolling direction, amplified.
        n = W if vertical else H
        prof = noise1d(rng, n, rng.uniform(1.5, 4)) + 0.5 * noise1d(rng, n, 1)
        tex = np.clip(prof[xs if vertical else ys] / 1.5, -1.5, 1.5)
        delta = amp * (0.85 - 0.3 * s * s) + 0.45 * np.abs(amp) * tex
    else:
        mottle = bbox_noise(rng, ys, xs, 8)
        factor = amp + (1 - amp) * 0.3 * s * s + 0.07 * mottle
        delta = old * (np.clip(factor, 0.15, 0.85) - 1)
    sign = np.where(delta >= 0, 1.0, -1.0) if cls != 4 else -1.0
    delta = sign * np.maximum(np.abs(delta), MIN_DELTA)
    img[ys, xs] = old + delta.astype(np.float32)


_SHAPERS = {1: shape_pits, 2: shape_cracks, 4: shape_patches}


def render_layers(seed: int, split: str, index: int, classes: tuple[int, ...]
                  ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray], np.random.Generator]:
    """Image ``index`` of ``split`` before sensor noise: (surface without defects, with defects, masks, rng).

    The second image differs from the first exactly on the union of the masks (float32, H x W).
    """
    for cls in classes:
        if cls not in SEED_AREAS:
            raise ValueError(f"unknown defect class {cls!r}; classes are {CLASSES}")
    rng = np.random.default_rng([seed, SPLIT_CODE[split], index])
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
        area = min(sample_area(rng, cls), int(0.5 * allowed_idx.size))
        if area < lo:
            raise RuntimeError(f"no room for class {cls} in image {split}/{index}")  # cannot happen: see caps
        for attempt in range(12):
            if cls == 3:
                shape, amps, kind = shape_scratches_or_wear(rng, area, allowed_idx)
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
