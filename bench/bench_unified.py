"""The six-model cascade against the unified model (one network) on the same synthetic data, in one run.

For each data seed (``--seeds 0 1``) and each kind, the whole pipeline of one config
(``configs/quickstart.yaml`` unless ``--config``) runs on the same synthetic data set (same images,
split and input size): train, tune, score the separate test set, evaluate. The cascade trains first,
with the config's epochs; the unified model then gets ``--budget`` times the cascade's measured
training time (default 0.5: the issue's target), as the epochs that fit in it (:func:`plan_epochs`:
the cascade's class-3 U-Net epoch time, per training image, scaled to all training images, plus the
cascade's per-model overhead). ``--unified-epochs N`` sets the epochs by hand instead.

Printed per seed and kind: mean and per-class Dice on the separate test set and on the labelled
split's held-out ``test`` part (the seed's 10 %, scored in-process by the bundle's ``Cascade`` with its
tuned thresholds, Dice by ``steel.eval.metrics`` against the training labels), the all-empty values of
both, training time (the train stage's wall time), scoring images/s and bundle size (weights files);
then the ratios unified / cascade. Scoring speed: both bundles' ``Cascade.predict`` (batch 16) on the
same decoded test images, the two kinds alternating for ``--score-rounds`` rounds in one process
(both see the same load); the ratio is the median of the per-round ratios, and CPU seconds per
image (``time.process_time``, all threads) are printed beside the wall-time rate, being steadier on a
loaded machine.

::

    python -m bench.bench_unified [--config configs/quickstart.yaml] [--seeds 0 1] [--budget 0.5]
        [--images N --test-images M] [--unified-epochs N] [--score-rounds 7] [--out runs/bench_unified]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

from steel.core.names import CLASSES


def _weights_bytes(bundle: str) -> int:
    return sum(os.path.getsize(os.path.join(bundle, f)) for f in os.listdir(bundle) if f.endswith(".weights.h5"))


def _recorded_seconds(bundle: str) -> float:
    from steel.model.bundle import read_manifest

    return float(sum(m.get("training_seconds") or 0.0 for m in read_manifest(bundle)["models"].values()))


def plan_epochs(budget_s: float, stage_s: float, models: dict[str, dict], n_train: int, n_seg_train: int,
                seg_model: str = "seg3") -> tuple[int, dict]:
    """Epochs of the unified model that fit in ``budget_s`` seconds of train stage, from the cascade's run.

    ``models``: per cascade model ``{"seconds": training seconds, "epoch_seconds": [per epoch]}``;
    ``stage_s``: the cascade's train stage wall time; ``n_train``: training images (the unified model
    trains on all of them); ``n_seg_train``: training images of ``seg_model`` (the same U-Net with one
    mask channel, so its epoch time per image is the unified model's). The unified run pays the stage's
    fixed cost (``stage_s`` minus the models' seconds), one model's overhead (mean of training seconds
    minus epoch seconds) and the first epoch's extra (tracing). Returns ``(epochs >= 1, estimate)``.
    """
    if seg_model not in models or not models[seg_model]["epoch_seconds"]:
        raise ValueError(f"the cascade run has no epoch times of {seg_model}: cannot plan the unified budget")
    if n_seg_train <= 0 or n_train <= 0:
        raise ValueError(f"need training images (got {n_train} in all, {n_seg_train} for {seg_model})")
    fixed = max(0.0, stage_s - sum(m["seconds"] for m in models.values()))
    overhead = statistics.mean(max(0.0, m["seconds"] - sum(m["epoch_seconds"])) for m in models.values())
    seg = models[seg_model]["epoch_seconds"]
    steady = statistics.median(seg[1:]) if len(seg) > 1 else seg[0]
    first_extra = max(0.0, seg[0] - steady)
    epoch_s = steady * n_train / n_seg_train
    epochs = max(1, math.floor((budget_s - fixed - overhead - first_extra) / epoch_s))
    return epochs, {"budget_s": budget_s, "fixed_s": fixed, "model_overhead_s": overhead,
                    "first_epoch_extra_s": first_extra, "epoch_s": epoch_s}


def _cascade_times(bundle: str) -> dict[str, dict]:
    """Per model of a trained bundle: training seconds and per-epoch seconds (``history/<model>.csv``)."""
    import pandas as pd

    from steel.model.bundle import read_manifest

    out = {}
    for name, entry in read_manifest(bundle)["models"].items():
        frame = pd.read_csv(os.path.join(bundle, "history", f"{name}.csv")).sort_values("epoch")
        out[name] = {"seconds": float(entry.get("training_seconds") or 0.0),
                     "epoch_seconds": [float(s) for s in frame["seconds"]]}
    return out


def _decode_all(folder: str, names: list[str]):
    import numpy as np

    from steel.data import images as image_io

    def read(name):
        with open(os.path.join(folder, name), "rb") as fh:
            return image_io.decode(fh.read())

    return np.stack([read(n) for n in names]) if names else np.zeros((0, 256, 1600, 3), np.uint8)


def predict_rows(cascade, images, image_ids, batch: int = 16):
    """Long-form rows (ImageId, ClassId, EncodedPixels; every class, '' = empty) of ``cascade`` on images."""
    import pandas as pd

    rows = []
    for i in range(0, len(images), batch):
        for r in cascade.predict(images[i:i + batch], image_ids=list(image_ids[i:i + batch])):
            rows += [(r["ImageId"], k, r["masks"][k - 1]) for k in CLASSES]
    return pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])


def dice_with_baseline(pred, truth) -> dict:
    """``steel.eval.metrics.mean_dice`` of ``pred`` plus the all-empty prediction's values on the same pairs."""
    import pandas as pd

    from steel.eval import metrics
    from steel.eval.metrics import presence

    res = metrics.mean_dice(pred, truth)
    baseline, per_class = metrics.all_empty(presence(truth, list(pd.unique(pred["ImageId"]))))
    return {"mean_dice": res["mean_dice"], "per_class": {str(k): v for k, v in res["per_class"].items()},
            "baseline": baseline, "baseline_per_class": per_class, "n_images": res["n_images"]}


def labelled_test_dice(cfg) -> dict:
    """Dice of ``cfg.bundle`` on the labelled split's ``test`` part (never trained or tuned on)."""
    import pandas as pd

    from steel.data.labels import load_splits
    from steel.model.predictor import cascade_from_bundle

    splits, _ = load_splits(cfg)
    ids = sorted(splits["test"]["ImageId"])
    truth = pd.read_csv(cfg.data.path("train_csv"), dtype={"EncodedPixels": str}, keep_default_na=False)
    if "ImageId_ClassId" in truth.columns:  # the original 4-rows-per-image layout
        truth[["ImageId", "ClassId"]] = truth["ImageId_ClassId"].str.rsplit("_", n=1, expand=True)
        truth["ClassId"] = truth["ClassId"].astype(int)
    truth = truth[truth["ImageId"].isin(ids)][["ImageId", "ClassId", "EncodedPixels"]]
    pred = predict_rows(cascade_from_bundle(cfg.bundle), _decode_all(cfg.data.path("train_images"), ids), ids)
    return dice_with_baseline(pred, truth)


def interleaved_rates(predictors: dict, images, rounds: int, batch: int = 16) -> dict:
    """Scoring speed of each ``predictors[kind]`` (``.predict(images)``), the kinds alternating per round.

    Each round times every kind once on all ``images`` (order reversed every other round). Returns per
    kind the median images/s and median CPU seconds per image, and per round the rates (for ratios
    taken round by round, which cancels load that changes between rounds)."""
    kinds = list(predictors)
    for p in predictors.values():  # trace every batch shape once
        for i in range(0, len(images), batch):
            p.predict(images[i:i + batch])
    per_round = []
    for r in range(rounds):
        rates = {}
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(0, len(images), batch):
                predictors[kind].predict(images[i:i + batch])
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            rates[kind] = (len(images) / wall, cpu / len(images))
        per_round.append(rates)
    return {"per_round": per_round,
            **{k: {"images_per_s": statistics.median(r[k][0] for r in per_round),
                   "cpu_s_per_image": statistics.median(r[k][1] for r in per_round)} for k in kinds}}


def run_kind(kind: str, base: str, out: str, overrides: list[str]) -> dict:
    from steel.core.config import load_config
    from steel.pipeline import run_pipeline

    folder = os.path.join(out, kind)
    cfg = load_config(base, [*overrides, f"train.kind={kind}", f"train.output={folder}/train",
                             f"bundle={folder}/bundle", f"score.out={folder}/scores", f"report={folder}/report"])
    result = run_pipeline(cfg)
    stages = {s["name"]: s for s in result["stages"]}
    ev = result["evaluation"] or {}
    return {
        "kind": kind, "cfg": cfg,
        "test": {"mean_dice": ev.get("mean_dice"), "per_class": ev.get("per_class"),
                 "baseline": ev.get("baseline_all_empty"), "baseline_per_class": ev.get("baseline_per_class"),
                 "n_images": ev.get("n_images")},
        "labelled": labelled_test_dice(cfg),
        # A train stage skipped as done (a re-run): the bundle's recorded training seconds instead.
        "train_s": stages["train"]["seconds"] if not stages["train"]["skipped"] else _recorded_seconds(cfg.bundle),
        "epochs": {n: m["metrics"].get("epochs") for n, m in _manifest_models(cfg.bundle).items()},
        "bundle_mb": _weights_bytes(cfg.bundle) / 1e6,
    }


def _manifest_models(bundle: str) -> dict:
    from steel.model.bundle import read_manifest

    return read_manifest(bundle)["models"]


def run_seed(args, seed: int) -> list[dict]:
    from steel.core.config import load_config
    from steel.data.labels import load_splits
    from steel.model.predictor import cascade_from_bundle

    base = load_config(args.config)
    synth = dict(base.to_dict()["data"]["synth"] or {})
    synth.update({k: v for k, v in (("images", args.images), ("test_images", args.test_images)) if v})
    synth["seed"] = seed
    out = os.path.join(args.out, f"seed{seed}")
    common = [f"data.root={os.path.join(out, 'data')}", f"data.synth={json.dumps(synth)}"]
    cascade = run_kind("cascade", args.config, out, common)
    by_model = dict(base.train.epochs_by_model)
    if args.unified_epochs:
        epochs, plan = args.unified_epochs, {"by_hand": True}
    else:
        splits, _ = load_splits(cascade["cfg"])
        n_seg3 = int((splits["train"]["hasDefect_3"] == 1).sum())
        epochs, plan = plan_epochs(args.budget * cascade["train_s"], cascade["train_s"],
                                   _cascade_times(cascade["cfg"].bundle), len(splits["train"]), n_seg3)
    print(f"\n[bench] seed {seed}: unified model gets {epochs} epochs "
          f"({json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in plan.items()})})", flush=True)
    unified = run_kind("unified", args.config, out,
                       [*common, f"train.epochs_by_model={json.dumps({**by_model, 'unified': epochs})}"])
    rows = [cascade, unified]
    n = args.score_images
    names = sorted(os.listdir(cascade["cfg"].data.path("test_images")))[:n]
    images = _decode_all(cascade["cfg"].data.path("test_images"), names)
    rates = interleaved_rates({r["kind"]: cascade_from_bundle(r["cfg"].bundle, batch_size=16) for r in rows},
                              images, args.score_rounds)
    for r in rows:
        r.update(seed=seed, **rates[r["kind"]])
        r["plan"] = plan if r["kind"] == "unified" else None
    unified["score_ratio_rounds"] = [x["unified"][0] / x["cascade"][0] for x in rates["per_round"]]
    return rows


def _pc(d: dict | None) -> str:
    return "/".join(f"{d[str(k)]:.3f}" for k in CLASSES) if d else "-"


def print_table(rows: list[dict]) -> None:
    head = (f"{'seed':<5}{'kind':<9}{'test Dice':>10}{'empty':>8}  {'per class 1/2/3/4':<24}"
            f"{'split-test':>11}{'empty':>8}  {'per class 1/2/3/4':<24}{'train s':>8}  {'epochs':<14}"
            f"{'img/s':>8}{'cpu ms/img':>11}{'MB':>6}")
    print("\n" + head)
    for r in rows:
        t, s = r["test"], r["labelled"]
        ep = r["epochs"].get("unified") or "+".join(str(r["epochs"][m]) for m in r["epochs"])
        print(f"{r['seed']:<5}{r['kind']:<9}{t['mean_dice']:>10.4f}{t['baseline']:>8.4f}  {_pc(t['per_class']):<24}"
              f"{s['mean_dice']:>11.4f}{s['baseline']:>8.4f}  {_pc(s['per_class']):<24}{r['train_s']:>8.0f}"
              f"  {str(ep):<14}{r['images_per_s']:>8.1f}{r['cpu_s_per_image'] * 1e3:>11.1f}{r['bundle_mb']:>6.2f}")
    print("\nunified vs cascade (unified - cascade for Dice, unified / cascade otherwise):")
    for c, u in zip(rows[0::2], rows[1::2]):
        gains = "/".join(f"{u['test']['per_class'][str(k)] - c['test']['per_class'][str(k)]:+.3f}" for k in CLASSES)
        print(f"seed {c['seed']}: test Dice {u['test']['mean_dice'] - c['test']['mean_dice']:+.4f} "
              f"(per class {gains}), "
              f"split-test Dice {u['labelled']['mean_dice'] - c['labelled']['mean_dice']:+.4f}, "
              f"training time {u['train_s'] / c['train_s']:.2f}x, scoring {statistics.median(u['score_ratio_rounds']):.2f}x "
              f"(rounds {min(u['score_ratio_rounds']):.2f}-{max(u['score_ratio_rounds']):.2f}; "
              f"CPU per image {c['cpu_s_per_image'] / u['cpu_s_per_image']:.2f}x less), "
              f"bundle {u['bundle_mb'] / c['bundle_mb']:.2f}x")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--images", type=int, default=None, help="synthetic training images (default: the config's)")
    ap.add_argument("--test-images", type=int, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="synthetic data seeds")
    ap.add_argument("--budget", type=float, default=0.5,
                    help="the unified model's training budget, as a multiple of the cascade's measured time")
    ap.add_argument("--unified-epochs", type=int, default=None, help="set the unified epochs by hand instead")
    ap.add_argument("--score-images", type=int, default=96)
    ap.add_argument("--score-rounds", type=int, default=7)
    ap.add_argument("--out", default="runs/bench_unified")
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error("--budget must be > 0")

    from steel.core.config import load_config
    from steel.core.ray_session import local_cpus, ray_session

    base = load_config(args.config)
    rows: list[dict] = []
    with ray_session(base.ray_address, num_cpus=local_cpus(base)):
        for seed in args.seeds:
            rows += run_seed(args, seed)
            print_table(rows)  # after every seed: a long run shows what it has so far
    return rows


if __name__ == "__main__":
    main()
