"""The six-model cascade against the unified model (one network) on the same synthetic data, in one run.

For each kind, the whole pipeline of one config (``configs/quickstart.yaml`` unless ``--config``) runs
on the same synthetic data set (same images, split, input size, epochs budget as configured): train,
tune, score the separate test set, evaluate. Printed for each kind: held-out mean Dice and per-class
Dice on the test set, the all-empty baseline, training time (the train stage's wall time), scoring
images/s (``Cascade.predict`` of the bundle in this process on decoded test images, batch 16: the
model work alone, without Ray Data start-up), bundle size (weights files); then the ratios
unified / cascade.

::

    python -m bench.bench_unified [--config configs/quickstart.yaml] [--images 640 --test-images 200]
        [--seed 0] [--unified-epochs 10] [--out runs/bench_unified]

``--unified-epochs`` sets the unified model's epochs (the cascade keeps the config's per-model
epochs); the training times printed say whether the budgets matched.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _weights_bytes(bundle: str) -> int:
    return sum(os.path.getsize(os.path.join(bundle, f)) for f in os.listdir(bundle) if f.endswith(".weights.h5"))


def _recorded_seconds(bundle: str) -> float:
    from steel.bundle import read_manifest

    return float(sum(m.get("training_seconds") or 0.0 for m in read_manifest(bundle)["models"].values()))


def _scoring_rate(bundle: str, images_dir: str, n: int, batch: int = 16) -> float:
    import numpy as np

    from steel import images as image_io
    from steel.cascade import Cascade

    names = sorted(os.listdir(images_dir))[:n]
    imgs = np.stack([image_io.decode(open(os.path.join(images_dir, f), "rb").read()) for f in names])
    cas = Cascade.from_bundle(bundle, batch_size=batch)
    cas.predict(imgs[:batch])  # trace
    t0 = time.perf_counter()
    for i in range(0, len(imgs), batch):
        cas.predict(imgs[i:i + batch])
    return len(imgs) / (time.perf_counter() - t0)


def run_kind(kind: str, base: str, out: str, overrides: list[str]) -> dict:
    from steel.config import load_config
    from steel.pipeline import run_pipeline

    folder = os.path.join(out, kind)
    cfg = load_config(base, [*overrides, f"train.kind={kind}", f"train.output={folder}/train",
                             f"bundle={folder}/bundle", f"score.out={folder}/scores", f"report={folder}/report"])
    result = run_pipeline(cfg)
    stages = {s["name"]: s for s in result["stages"]}
    ev = result["evaluation"] or {}
    return {
        "kind": kind,
        "mean_dice": ev.get("mean_dice"),
        "per_class": ev.get("per_class"),
        "baseline": ev.get("baseline_all_empty"),
        # A train stage skipped as done (a re-run): the bundle's recorded training seconds instead.
        "train_s": stages["train"]["seconds"] if not stages["train"]["skipped"] else _recorded_seconds(cfg.bundle),
        "score_images_per_s": _scoring_rate(cfg.bundle, cfg.data.path("test_images"), 96),
        "bundle_mb": _weights_bytes(cfg.bundle) / 1e6,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--images", type=int, default=None, help="synthetic training images (default: the config's)")
    ap.add_argument("--test-images", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    ap.add_argument("--unified-epochs", type=int, default=10)
    ap.add_argument("--out", default="runs/bench_unified")
    args = ap.parse_args(argv)

    from steel.config import load_config
    from steel.ray_session import local_cpus, ray_session

    base = load_config(args.config)
    synth = dict(base.to_dict()["data"]["synth"] or {})
    synth.update({k: v for k, v in (("images", args.images), ("test_images", args.test_images)) if v})
    synth["seed"] = args.seed
    data_root = os.path.join(args.out, f"data-seed{args.seed}")
    common = [f"data.root={data_root}", f"data.synth={json.dumps(synth)}"]
    rows = []
    with ray_session(base.ray_address, num_cpus=local_cpus(base)):
        rows.append(run_kind("cascade", args.config, args.out, common))
        rows.append(run_kind("unified", args.config, args.out,
                             [*common, f"train.epochs={args.unified_epochs}", "train.epochs_by_model={}"]))
    print(f"\n{'kind':<9}{'mean Dice':>10}{'all-empty':>10}  {'per-class Dice 1/2/3/4':<28}{'train s':>9}"
          f"{'score img/s':>12}{'bundle MB':>10}")
    for r in rows:
        pc = "/".join(f"{r['per_class'][str(k)]:.3f}" for k in (1, 2, 3, 4)) if r["per_class"] else "-"
        print(f"{r['kind']:<9}{r['mean_dice']:>10.4f}{r['baseline']:>10.4f}  {pc:<28}{r['train_s']:>9.0f}"
              f"{r['score_images_per_s']:>12.1f}{r['bundle_mb']:>10.2f}")
    c, u = rows
    print(f"\nunified / cascade: mean Dice {u['mean_dice'] - c['mean_dice']:+.4f}, training time "
          f"{u['train_s'] / c['train_s']:.2f}x, scoring {u['score_images_per_s'] / c['score_images_per_s']:.2f}x, "
          f"bundle {u['bundle_mb'] / c['bundle_mb']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
