"""Training/serving input skew: the arrays training and scoring hand the models for the same JPEG.

    python -m bench.bench_skew [--images 20]

Before (07092fa) training decoded with OpenCV and scaled ``x * (1/255)``, tuning decoded with
OpenCV, scoring decoded with PIL and scaled ``x / 255``, and every U-Net got [0, 1] pixels. Those old
paths are re-created here as references; "after" is ``steel.data.images`` (one path for all three).
Prints the max absolute difference of the model inputs per case, and the U-Nets' input difference
to the seed's ``get_preprocessing('efficientnetb1')``.
"""

from __future__ import annotations

import argparse
import io

import numpy as np

from steel.data import images as image_io


def _jpegs(n: int) -> list[tuple[str, bytes]]:
    from PIL import Image

    from steel.data.synth import render


    out = []
    for i in range(n):
        gray, _ = render.render(0, "train", i, (3,) if i % 2 else ())
        out.append(("grey RGB (synthetic set)", render.encode_jpeg(gray)))
        rgb = np.stack([gray, np.roll(gray, 7, 1), gray[::-1]], -1)
        for label, opts in (("colour 4:2:0", {}), ("colour 4:4:4", {"subsampling": 0}),
                            ("colour progressive", {"progressive": True})):
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, "JPEG", quality=90, **opts)
            out.append((label, buf.getvalue()))
        buf = io.BytesIO()
        Image.fromarray(gray, "L").save(buf, "JPEG", quality=90)
        out.append(("grayscale (L) JPEG", buf.getvalue()))
    return out


def _old_training(data: bytes, size) -> np.ndarray:
    """train_data at 07092fa: cv2.imdecode, BGR->RGB, INTER_AREA, x * (1/255)."""
    import cv2

    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if img.shape[:2] != tuple(size):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return img.astype(np.float32) * np.float32(1.0 / 255.0)


def _old_scoring(data: bytes, size) -> np.ndarray:
    """image_io.decode (PIL) + cascade.resize_images (INTER_AREA) + cascade.preprocess (x / 255)."""
    import cv2


    img = image_io.decode(data)  # the PIL decoder is unchanged (steel.data.images.decode)
    if img.shape[:2] != tuple(size):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return img.astype(np.float32) / np.float32(255.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="synthetic frames (x5 encodings)")
    args = parser.parse_args(argv)

    from steel.model import networks as models
    from steel.train.data import prepare_batch

    sizes = {"classifier 256x512": (256, 512), "U-Net 256x1600": (256, 1600)}
    import cv2

    rows: dict[tuple[str, str], list[float]] = {}
    decoder_diff: dict[str, int] = {}
    for kind, data in _jpegs(args.images):
        cv = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        diff = int(np.count_nonzero(cv != image_io.decode(data)))
        decoder_diff[kind] = decoder_diff.get(kind, 0) + diff
        for label, size in sizes.items():
            before = float(np.abs(_old_training(data, size) - _old_scoring(data, size)).max())
            name = "binary" if label.startswith("classifier") else "seg1"
            spec = models.resolve_spec(name, input_size=size, encoder_weights="none")
            batch = {"path": np.array(["x.jpg"], dtype=object), "bytes": np.array([data], dtype=object)}
            train = prepare_batch(batch, name=name, labels={"x.jpg": "" if name == "seg1" else np.float32([0])},
                                  input_size=size, preprocessing=spec["preprocessing"])["image"][0]
            serve = image_io.to_input(image_io.decode(data), spec)
            after = float(np.abs(train - serve).max())
            seed_gap = float(np.abs(_old_scoring(data, size) - serve).max()) if name == "seg1" else 0.0
            r = rows.setdefault((kind, label), [0.0, 0.0, 0.0])
            r[0], r[1], r[2] = max(r[0], before), max(r[1], after), max(r[2], seed_gap)
    print(f"{'JPEG':28s} {'model input':20s} {'before: max|train-serve|':>26s} {'after':>8s} "
          f"{'U-Net: old [0,1] vs seed preprocessing':>40s}")
    for (kind, label), (before, after, gap) in rows.items():
        print(f"{kind:28s} {label:20s} {before:26.3g} {after:8.3g} {format(gap, '.3g') if gap else '':>40}")
    print("pixel values where OpenCV's and PIL's decoders disagree: "
          + ", ".join(f"{k} {v}" for k, v in decoder_diff.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
