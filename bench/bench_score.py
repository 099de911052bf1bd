"""Scoring throughput: the gated, batched cascade against the seed's way, same run, full resolution.

Models at the seed's sizes with random weights (``encoder_weights=none``): Xception classifiers at
256x512, EfficientNet-B1 U-Nets at 256x1600. Synthetic 256x1600 JPEGs. Three measurements:

1. **seed way** (baseline): for each image, decode it, then run all six models on it one image at a
   time (``model.predict`` on a batch of one), then thresholds and RLE.
2. **cascade, in process**: :class:`steel.model.cascade.Cascade` on batches of ``--batch`` images, under
   two threshold sets: ``all-pass`` (every gate open: the gain of batching alone) and ``seed-like``
   (binary gate at the median p_defect, so about half the images stop there; class gates at the
   quantiles that pass the Severstal class shares among defective images, 13/4/77/12 %).
3. **Ray Data pipeline** (:func:`steel.score.run.score`, one actor, models loaded once in it) on
   ``--ray-images`` and 4x as many images, end to end (listing, actor start and model load
   included), with the peak resident memory of the driver and of the largest Ray worker sampled
   from /proc every 0.2 s: it should not grow with the number of images.

Random weights give meaningless masks, but the same work per image as trained models: the gates
only decide how many images reach each model, which the seed-like thresholds fix.

    .venv/bin/python -m bench.bench_score [--images 8] [--batch 8] [--ray-images 8] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import numpy as np

from steel.data import images as image_io
from steel.model.thresholds import save_thresholds

H, W = 256, 1600
CLASS_SHARE = {1: 897 / 6666, 2: 247 / 6666, 3: 5150 / 6666, 4: 801 / 6666}  # of defective train images


def make_images(folder: str, n: int, seed: int = 0) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        gray = rng.integers(30, 110, size=(H, W), dtype=np.uint8)
        x = int(rng.integers(0, W - 300))
        gray[60:160, x:x + 250] = rng.integers(150, 255)
        path = os.path.join(folder, f"img{i:04d}.jpg")
        Image.fromarray(gray, "L").convert("RGB").save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def decode(path: str) -> np.ndarray:

    with open(path, "rb") as fh:
        return image_io.decode(fh.read())


# ----------------------------------------------------------------------------------------------
# The seed's way: all six models, one image at a time.


def seed_way(models: dict, specs: dict, paths: list[str], th: dict) -> list[dict]:
    from steel.data import rle
    from steel.data.images import to_input
    from steel.model.cascade import mask_from_prob

    out = []
    for path in paths:
        img = decode(path)[None]
        x_cls = to_input(img, specs["binary"])
        p_defect = float(models["binary"].predict(x_cls, verbose=0)[0, 0])
        p_class = models["multilabel"].predict(x_cls, verbose=0)[0]
        x_seg = to_input(img, specs["seg1"])
        masks = []
        for k in (1, 2, 3, 4):
            prob = models[f"seg{k}"].predict(x_seg, verbose=0)[0, ..., 0]
            ck = th["classes"][str(k)]
            mask, _ = mask_from_prob(prob, ck["pixel"], ck["min_area"], ck["max_area"])
            keep = p_defect >= th["binary"] and p_class[k - 1] >= ck["prob"]
            masks.append(rle.encode(mask) if keep else "")
        out.append({"p_defect": p_defect, "masks": masks})
    return out


def cascade_way(cascade, paths: list[str], batch: int) -> tuple[list[dict], dict]:
    cascade.reset_stats()
    out = []
    for start in range(0, len(paths), batch):
        images = np.stack([decode(p) for p in paths[start:start + batch]])
        out.extend(cascade.predict(images))
    return out, cascade.stats


def seed_like_thresholds(models: dict, specs: dict, paths: list[str]) -> dict:
    """Gates that pass about half the images, then the Severstal class shares of those."""
    from steel.data.images import to_input
    from steel.model.thresholds import default_thresholds

    images = np.stack([decode(p) for p in paths])
    x = to_input(images, specs["binary"])
    p_defect = models["binary"].predict_on_batch(x)[:, 0]
    p_class = models["multilabel"].predict_on_batch(x)
    th = default_thresholds()
    th["binary"] = float(np.median(p_defect))
    defective = p_class[p_defect >= th["binary"]]
    for k, share in CLASS_SHARE.items():
        th["classes"][str(k)]["prob"] = float(np.quantile(defective[:, k - 1], 1 - share))
    return th


def all_pass_thresholds() -> dict:
    from steel.model.thresholds import default_thresholds

    th = default_thresholds()
    th["binary"] = 0.0
    for k in (1, 2, 3, 4):
        th["classes"][str(k)]["prob"] = 0.0
    return th


# ----------------------------------------------------------------------------------------------
# Memory of this process and its descendants (Ray's workers in a local Ray), from /proc.


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class MemorySampler:
    """Peak RSS of the driver and of the largest ``ray::`` worker process while running."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.driver_peak = 0.0
        self.worker_peak = 0.0
        self.worker_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, _rss_mb(me))
            todo, seen = [me], set()
            while todo:
                pid = todo.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                todo.extend(_children(pid))
                if pid != me:
                    cmd = _cmdline(pid)
                    if cmd.startswith("ray::"):
                        rss = _rss_mb(pid)
                        if rss > self.worker_peak:
                            self.worker_peak, self.worker_name = rss, cmd.split()[0]
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8, help="images for the seed way and the in-process cascade")
    ap.add_argument("--batch", type=int, default=8, help="cascade batch size")
    ap.add_argument("--ray-images", type=int, default=8, help="images for the first Ray run (the second: 4x)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from steel.core.config import ScoreConfig
    from steel.core.names import MODEL_NAMES
    from steel.model import bundle as bundle_lib
    from steel.model import networks as models_lib
    from steel.model.cascade import Cascade
    from steel.model.predictor import to_numpy, traced_callable

    work = tempfile.mkdtemp(prefix="bench_score_")
    results: dict = {"images": args.images, "batch": args.batch, "cpus": os.cpu_count()}
    t = time.perf_counter()
    models = {n: models_lib.build(n, encoder_weights="none") for n in MODEL_NAMES}
    specs = {n: models_lib.resolve_spec(n, encoder_weights="none") for n in MODEL_NAMES}
    results["build_s"] = round(time.perf_counter() - t, 1)
    results["params"] = {n: int(m.count_params()) for n, m in models.items()}
    print(f"built the six seed-size models in {results['build_s']} s: {results['params']}", flush=True)
    paths = make_images(os.path.join(work, "bench"), args.images)
    sizes = {n: tuple(s["input_size"]) for n, s in specs.items()}
    prep = {n: s["preprocessing"] for n, s in specs.items()}
    callables = {n: traced_callable(m) for n, m in models.items()}  # what the scoring actors use
    seed_th = seed_like_thresholds(models, specs, paths)

    # warm-up: first calls build the graphs; neither way should pay that in its timing
    warm = np.stack([decode(paths[0])])
    Cascade(callables, sizes, all_pass_thresholds(), preprocessing=prep).predict(warm)
    seed_way(models, specs, paths[:1], seed_th)

    t = time.perf_counter()
    seed_way(models, specs, paths, seed_th)
    base_s = time.perf_counter() - t
    results["seed_way"] = {"seconds": round(base_s, 2), "images_per_s": round(args.images / base_s, 4)}
    print(f"seed way (6 models x 1 image at a time): {args.images} images in {base_s:.1f} s "
          f"= {args.images / base_s:.3f} images/s", flush=True)

    on_batch = {n: (lambda m: lambda x: to_numpy(m.predict_on_batch(x)))(m)  # retraces per new batch shape
                for n, m in models.items()}
    Cascade(on_batch, sizes, all_pass_thresholds(), preprocessing=prep).predict(warm)
    for label, th, fns in (("all_pass", all_pass_thresholds(), callables), ("seed_like", seed_th, callables),
                           ("seed_like_predict_on_batch", seed_th, on_batch)):
        cascade = Cascade(fns, sizes, th, preprocessing=prep)
        t = time.perf_counter()
        _, stats = cascade_way(cascade, paths, args.batch)
        secs = time.perf_counter() - t
        results[f"cascade_{label}"] = {"seconds": round(secs, 2), "images_per_s": round(args.images / secs, 4),
                                       "speedup_vs_seed_way": round(base_s / secs, 2), "stats": stats}
        print(f"cascade {label} (batch {args.batch}): {args.images} images in {secs:.1f} s = "
              f"{args.images / secs:.3f} images/s, {base_s / secs:.2f}x the seed way; multilabel on "
              f"{stats['multilabel_calls']}/{stats['images']}, U-Nets on {stats['seg_calls']}/{4 * stats['images']}",
              flush=True)

    if not args.skip_ray:
        import ray

        from steel.core.keras_env import runtime_env
        from steel.score.run import score

        bundle = os.path.join(work, "bundle")
        bundle_lib.save_bundle(bundle, models, specs, {"bench": "score"})
        save_thresholds(bundle, seed_th)
        del models, callables, on_batch
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env=runtime_env())
        cfg = ScoreConfig(actors=1, batch_size=args.batch, images_per_shard=max(args.batch, 16))
        for n in (args.ray_images, 4 * args.ray_images):
            folder = os.path.join(work, f"ray{n}")
            make_images(folder, n, seed=n)
            with MemorySampler() as mem:
                t = time.perf_counter()
                summary = score(bundle, folder, os.path.join(work, f"out{n}"), cfg)
                secs = time.perf_counter() - t
            assert summary["scored"] == n, summary
            results[f"ray_{n}"] = {"images": n, "seconds": round(secs, 2), "images_per_s": round(n / secs, 4),
                                   "driver_peak_rss_mb": round(mem.driver_peak), "worker_peak_rss_mb":
                                   round(mem.worker_peak), "worker": mem.worker_name}
            print(f"Ray Data pipeline, {n} images end to end (actor start + model load included): {secs:.1f} s "
                  f"= {n / secs:.3f} images/s; peak RSS driver {mem.driver_peak:.0f} MB, largest worker "
                  f"{mem.worker_peak:.0f} MB ({mem.worker_name})", flush=True)
        ray.shutdown()
        small, large = results[f"ray_{args.ray_images}"], results[f"ray_{4 * args.ray_images}"]
        results["memory_ratio_4x_images"] = {
            "driver": round(large["driver_peak_rss_mb"] / max(1, small["driver_peak_rss_mb"]), 2),
            "worker": round(large["worker_peak_rss_mb"] / max(1, small["worker_peak_rss_mb"]), 2)}
        print(f"4x the images: peak RSS x{results['memory_ratio_4x_images']['driver']} (driver), "
              f"x{results['memory_ratio_4x_images']['worker']} (largest worker)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
