"""`steel train` of one model against a plain Keras ``fit`` in one process: wall-time ratio and val metric.

Both sides train the same model (``steel.model.networks.build_from_config``), compiled the same way
(``steel.train.loop.compile_model``: loss, metrics, Adam with the same warm-up + schedule at the same peak
rate), on the same synthetic data and split (``steel.data.labels.load_splits``), for the same epochs
and global batch:

- **steel**: the command a user runs, ``steel train --config <config> --model <model>`` (a fresh
  process: Ray start, Ray Train worker group, Ray Data ingest, checkpoints, bundle, history), with
  ``--set`` overrides that point data, checkpoints and bundle into the work folder;
- **keras**: a fresh process that imports TensorFlow, decodes and resizes every image of the split
  once into numpy (``steel.train.data.prepare_batch``, no augmentation), and calls ``model.fit`` with
  ``validation_data``: what a user would do instead on one machine.

Each side is timed as the wall time of its whole process. The two sides alternate (``--repeat``
rounds of keras then steel) so that load from other jobs on the machine hits both alike; the ratio
of each round and their median are printed, with the best validation metric of each side. The steel
side's output lines are time-stamped, which gives a profile of where its wall time goes (Ray start,
worker group and model build, first epoch, later epochs, bundle).

    .venv/bin/python -m bench.bench_train_overhead [--config configs/quickstart.yaml] [--model seg3]
        [--epochs 10] [--images 640] [--repeat 2] [--set train.num_workers=1 ...] [--work DIR]
        [--compare train.worker_cache_mb=0 --compare train.one_local_worker=false]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
#  The plain Keras side (runs in its own process: `--side keras`)


def keras_side(config: str, overrides: list[str], model_name: str) -> dict:
    """Decode the split into numpy once, then one ``model.fit`` with validation; returns metrics."""
    t0 = time.time()
    import numpy as np

    from steel.core.config import load_config
    from steel.core.keras_env import tf  # noqa: F401  (TensorFlow import counts on this side too)
    from steel.data.labels import load_splits
    from steel.model import networks as models
    from steel.train import data as train_data
    from steel.train.checkpoints import monitor_metric
    from steel.train.loop import compile_model
    from steel.train.schedule import scaled_lr, warmup_schedule

    cfg = load_config(config, overrides)
    tc = cfg.train
    splits, _ = load_splits(cfg)
    spec = models.model_spec(model_name, tc)

    def arrays(table):
        rows = train_data.model_rows(table, model_name)
        paths, fs = train_data.image_paths(cfg.data.path("train_images"), rows["ImageId"].astype(str).tolist())
        data = []
        for p in paths:
            with fs.open_input_file(p) as fh:
                data.append(fh.read())
        out = train_data.prepare_batch({"path": np.array(paths), "bytes": data}, name=model_name,
                                       labels=train_data.label_lookup(rows, model_name),
                                       input_size=tuple(spec["input_size"]), preprocessing=spec["preprocessing"])
        cols = train_data.label_columns(model_name)
        return out["image"], (out[cols[0]] if len(cols) == 1 else {c: out[c] for c in cols})

    x_train, y_train = arrays(splits["train"])
    x_val, y_val = arrays(splits["val"])
    t_data = time.time()
    batch = tc.batch_for(model_name) * tc.num_workers  # steel's global batch
    epochs = tc.epochs_for(model_name)
    steps = -(-len(x_train) // batch)
    peak = scaled_lr(tc.lr_for(model_name), tc.batch_for(model_name), tc.num_workers, tc.base_batch)
    model = models.build_from_config(model_name, tc)
    schedule = warmup_schedule(peak, int(round(tc.warmup_epochs * steps)),
                               epochs * steps if tc.lr_schedule == "cosine" else None)
    compile_model(model, model_name, schedule, tc.seg_loss, tc.cls_loss_weight)
    hist = model.fit(x_train, y_train, batch_size=batch, epochs=epochs, validation_data=(x_val, y_val),
                     validation_batch_size=batch, shuffle=True, verbose=0)
    monitor = monitor_metric(model_name)
    curve = [float(v) for v in hist.history[monitor]]
    return {"monitor": monitor, "best": max(curve), "curve": [round(v, 4) for v in curve],
            "train_images": int(len(x_train)), "val_images": int(len(x_val)), "batch": batch,
            "data_s": round(t_data - t0, 2), "in_process_s": round(time.time() - t0, 2)}


# ---------------------------------------------------------------------------------------------
#  The driver


def _run_keras(args, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_train_overhead", "--side", "keras", "--config", args.config,
           "--model", args.model, *sum((["--set", o] for o in overrides), [])]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"keras side failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(wall, 1)
    return out


# Steel's log lines that mark a phase boundary, in order (the first line matching each one).
_PHASES = (("ray + labels", re.compile(r"^data: ")),
           ("trainer start", re.compile(r"\] training: ")),
           ("worker group + TF", re.compile(r"worker\(s\) ready")),
           ("build + first data pass", re.compile(r"\] (cached \d+ train|epoch 1/)")),
           ("epoch 1", re.compile(r"\] epoch 1/")),
           ("later epochs", re.compile(r"\] epoch (\d+)/\1 ")),
           ("bundle + history", re.compile(r"^model\s+status")),)


def _run_steel(args, overrides: list[str], work: str, tries: int = 2) -> dict:
    """One ``steel train`` process, timed; a Ray that timed out starting (a loaded machine) is retried."""
    for attempt in range(tries):
        try:
            return _steel_once(args, overrides, work)
        except RuntimeError as e:
            if "timed out during startup" not in str(e) or attempt == tries - 1:
                raise
            print("steel: Ray timed out starting (machine overloaded); running it again", flush=True)


def _steel_once(args, overrides: list[str], work: str) -> dict:
    bundle = os.path.join(work, f"bundle-{time.time_ns()}")  # a fresh bundle and run: nothing skipped
    sets = [*overrides, f"bundle={bundle}", f"train.output={bundle}-ckpt"]
    cmd = [sys.executable, "-m", "steel.cli", "train", "--config", args.config, "--model", args.model,
           *sum((["--set", o] for o in sets), [])]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stamped = []
    for line in proc.stdout:
        stamped.append((time.time() - t0, line.rstrip()))
    proc.wait()
    wall = time.time() - t0
    if proc.returncode:
        tail = "\n".join(line for _, line in stamped[-40:])
        raise RuntimeError(f"steel side failed ({proc.returncode}):\n{tail}")
    phases, last, i = {}, 0.0, 0
    for t, line in stamped:
        if i < len(_PHASES) and _PHASES[i][1].search(line):
            phases[_PHASES[i][0]] = round(t - last, 1)
            last, i = t, i + 1
    phases["exit"] = round(wall - last, 1)
    import pandas as pd

    from steel.train.checkpoints import monitor_metric

    monitor = monitor_metric(args.model)
    frame = pd.read_csv(os.path.join(bundle, "history", f"{args.model}.csv"))
    curve = [float(v) for v in frame[monitor]]
    epoch_s = [round(float(v), 2) for v in frame["seconds"]]
    return {"monitor": monitor, "best": max(curve), "curve": [round(v, 4) for v in curve], "wall_s": round(wall, 1),
            "phases": phases, "epoch_s": epoch_s, "log": [f"{t:7.1f}s {line}" for t, line in stamped]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=("both", "keras"), default="both", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--model", default="seg3")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the model (default: the config's)")
    parser.add_argument("--images", type=int, default=640, help="synthetic training images")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of keras then steel")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both sides (repeatable)")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                        help="also run steel with these extra overrides each round (e.g. the settings before "
                             "a change: train.worker_cache_mb=0, train.one_local_worker=false)")
    parser.add_argument("--work", default=None, help="work folder (default: a temp folder); data is reused")
    parser.add_argument("--show-log", action="store_true", help="print steel's time-stamped log")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.side == "keras":
        print(json.dumps(keras_side(args.config, args.overrides, args.model)), flush=True)
        return 0

    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bench-train-overhead-"))
    root = os.path.join(work, f"data-{args.images}")
    if not os.path.exists(os.path.join(root, "train.csv")):
        from steel.data.synth import write

        print(f"generating {args.images} synthetic images into {root}", flush=True)
        write.generate(root, images=args.images, test_images=0, seed=0, progress=False)
    overrides = [f"data.root={root}", "data.synth=null", *args.overrides]
    if args.epochs:
        overrides.append(f"train.epochs_by_model.{args.model}={args.epochs}")
    rounds = []
    for r in range(args.repeat):
        k = _run_keras(args, overrides)
        print(f"round {r + 1} keras: {k['wall_s']:.1f}s wall ({k['data_s']:.1f}s decode); best {k['monitor']} "
              f"{k['best']:.4f}; curve {k['curve']}", flush=True)
        s = _run_steel(args, overrides, work)
        if args.show_log:
            print("\n".join(s["log"]))
        print(f"round {r + 1} steel: {s['wall_s']:.1f}s wall; best {s['monitor']} {s['best']:.4f}; curve {s['curve']}",
              flush=True)
        print(f"round {r + 1} steel phases (s): {s['phases']}; epoch seconds {s['epoch_s']}", flush=True)
        ratio = s["wall_s"] / k["wall_s"]
        print(f"round {r + 1}: steel / keras wall time = {ratio:.2f}x", flush=True)
        s.pop("log")
        rounds.append({"keras": k, "steel": s, "ratio": round(ratio, 3)})
        if args.compare:
            c = _run_steel(args, [*overrides, *args.compare], work)
            c.pop("log")
            print(f"round {r + 1} steel {' '.join(args.compare)}: {c['wall_s']:.1f}s wall ({c['wall_s'] / k['wall_s']:.2f}x "
                  f"keras); best {c['monitor']} {c['best']:.4f}; curve {c['curve']}", flush=True)
            print(f"round {r + 1} its phases (s): {c['phases']}; epoch seconds {c['epoch_s']}", flush=True)
            rounds[-1].update(compare=c, compare_ratio=round(c["wall_s"] / k["wall_s"], 3))
    summary = {"ratio_median": round(statistics.median(r["ratio"] for r in rounds), 3),
               "keras_best_median": round(statistics.median(r["keras"]["best"] for r in rounds), 4),
               "steel_best_median": round(statistics.median(r["steel"]["best"] for r in rounds), 4),
               "monitor": rounds[0]["steel"]["monitor"], "rounds": rounds}
    print(f"steel train / plain Keras fit, wall time: {summary['ratio_median']:.2f}x (median of {len(rounds)}); "
          f"best {summary['monitor']}: steel {summary['steel_best_median']:.4f}, keras {summary['keras_best_median']:.4f}",
          flush=True)
    if args.compare:
        summary["compare_ratio_median"] = round(statistics.median(r["compare_ratio"] for r in rounds), 3)
        summary["compare_best_median"] = round(statistics.median(r["compare"]["best"] for r in rounds), 4)
        print(f"steel train {' '.join(args.compare)} / plain Keras fit: {summary['compare_ratio_median']:.2f}x; "
              f"best {summary['monitor']} {summary['compare_best_median']:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
