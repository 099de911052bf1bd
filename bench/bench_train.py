"""Training throughput on Ray Train (1 vs 2 workers, same run) and a "does it learn" check.

**Throughput** (default): synthetic 256x1600 JPEGs (``steel.data.synth``), streamed through the real
training pipeline (Ray Data read + decode + resize + augment -> ``TensorflowTrainer`` with
``MultiWorkerMirroredStrategy``), for a classifier (``binary``) and a U-Net (``seg3``), first with 1
worker, then with 2. Each run trains 2 epochs of ``--steps`` steps; the number reported is epoch 2's
training images/s per worker (epoch 1 includes graph tracing; validation is excluded by the loop's
timer). The ratio ``2 workers / 1 worker`` of total images/s is the scaling on this machine.

**Learning** (``--learning``): ``--learn-images`` synthetic images, ``--learn-epochs`` epochs at a
small input size, binary classifier and class-3 U-Net; prints validation F1 / Dice of epoch 1 and
of the best epoch.

    .venv/bin/python -m bench.bench_train [--images 64] [--steps 4] [--batch 4]
        [--classifier xception --cls-size 128 256] [--segmenter efficientnetb1 --seg-size 128 800]
    .venv/bin/python -m bench.bench_train --learning [--learn-images 300] [--learn-epochs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _config(root: str, out: str, args, **train):
    from steel.core.config import config_from_dict

    base = {"output": f"{out}/ckpt", "num_workers": 1, "cpus_per_worker": 1, "per_worker_batch": args.batch,
            "max_failures": 0, "base_lr": 1e-3, "base_batch": 8, "warmup_epochs": 0,
            "classifier": {"encoder": args.classifier, "input_size": list(args.cls_size), "encoder_weights": "none"},
            "segmenter": {"encoder": args.segmenter, "input_size": list(args.seg_size), "encoder_weights": "none"}}
    base.update(train)
    return config_from_dict({"name": "bench", "data": {"root": root}, "bundle": f"{out}/bundle", "train": base})


def throughput(root: str, work: str, args) -> dict:
    from steel.data import labels
    from steel.train import run as training

    rows = {}
    for name in ("binary", "seg3"):
        for workers in (1, 2):
            cfg = _config(root, f"{work}/{name}-{workers}w", args, num_workers=workers, epochs=2,
                          max_steps_per_epoch=args.steps)
            splits, _ = labels.load_splits(cfg)
            t0 = time.time()
            out = training.train_one(cfg, name, splits, cfg.data.path("train_images"))
            last = out["state"]["history"][-1]
            rows[(name, workers)] = {"ips_per_worker": last["images_per_s_per_worker"],
                                     "train_seconds": last["train_seconds"], "images": last["images"],
                                     "wall_s": time.time() - t0}
            print(f"{name:7s} {workers} worker(s): {last['images_per_s_per_worker']:.2f} images/s per worker "
                  f"(epoch 2: {int(last['images'])} images in {last['train_seconds']:.1f}s; whole run "
                  f"{time.time() - t0:.0f}s)", flush=True)
    summary = {}
    for name in ("binary", "seg3"):
        one, two = rows[(name, 1)], rows[(name, 2)]
        ratio = (2 * two["ips_per_worker"]) / one["ips_per_worker"]
        summary[name] = {"1w_ips": one["ips_per_worker"], "2w_ips_per_worker": two["ips_per_worker"],
                         "2w_over_1w_total": round(ratio, 3)}
        print(f"{name}: 2 workers / 1 worker total throughput = {ratio:.2f}x", flush=True)
    return summary


def learning(root: str, work: str, args) -> dict:
    from steel.data import labels
    from steel.train import run as training

    size = list(args.learn_size)
    cfg = _config(root, f"{work}/learn", args, num_workers=2, epochs=args.learn_epochs, per_worker_batch=8,
                  base_lr=1e-3, base_batch=16, warmup_epochs=1,
                  classifier={"encoder": "mobilenetv2_035", "input_size": size, "encoder_weights": "none",
                              "dense_units": [64, 32, 16]},
                  segmenter={"encoder": "mobilenetv2", "input_size": size, "encoder_weights": "none",
                             "decoder_filters": [64, 32, 16, 16, 8]})
    splits, _ = labels.load_splits(cfg)
    out = {}
    for name, metric in (("binary", "val_f1_m"), ("seg3", "val_dice_coef")):
        t0 = time.time()
        res = training.train_one(cfg, name, splits, cfg.data.path("train_images"))
        hist = res["state"]["history"]
        curve = [round(h[metric], 4) for h in hist]
        out[name] = {"metric": metric, "epoch1": curve[0], "best": max(curve), "best_epoch": res["state"]["best_epoch"],
                     "curve": curve, "seconds": round(time.time() - t0, 1)}
        print(f"{name}: {metric} epoch 1 = {curve[0]:.3f}, best = {max(curve):.3f} (epoch "
              f"{res['state']['best_epoch']}); per epoch {curve}; {time.time() - t0:.0f}s", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="synthetic images for the throughput runs")
    parser.add_argument("--steps", type=int, default=4, help="steps per epoch in the throughput runs")
    parser.add_argument("--batch", type=int, default=4, help="per-worker batch")
    parser.add_argument("--classifier", default="xception")
    parser.add_argument("--cls-size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    parser.add_argument("--segmenter", default="efficientnetb1")
    parser.add_argument("--seg-size", type=int, nargs=2, default=(128, 800), metavar=("H", "W"))
    parser.add_argument("--learning", action="store_true", help="run the learning check instead")
    parser.add_argument("--learn-images", type=int, default=300)
    parser.add_argument("--learn-epochs", type=int, default=6)
    parser.add_argument("--learn-size", type=int, nargs=2, default=(64, 320), metavar=("H", "W"))
    parser.add_argument("--work", default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import ray

    from steel.core.keras_env import runtime_env
    from steel.data.synth import write

    work = args.work or tempfile.mkdtemp(prefix="bench-train-")
    n = args.learn_images if args.learning else args.images
    root = os.path.join(work, f"data-{n}")
    if not os.path.exists(os.path.join(root, "train.csv")):
        write.generate(root, images=n, test_images=0, seed=1, progress=False)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), runtime_env=runtime_env(), include_dashboard=False,
             log_to_driver=True)
    try:
        result = learning(root, work, args) if args.learning else throughput(root, work, args)
    finally:
        ray.shutdown()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
