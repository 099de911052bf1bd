"""A model's training history: CSV, a plot of loss and its monitored metric, and TensorBoard scalars.
"""

from __future__ import annotations

import os
import tempfile

from steel.core import figures
from steel.train.checkpoints import monitor_metric


def history_frame(history: list[dict]):
    import pandas as pd

    frame = pd.DataFrame(history)
    cols = ["epoch"] + [c for c in frame.columns if c != "epoch"]
    return frame[cols].sort_values("epoch").reset_index(drop=True)


def plot_history(frame, name: str, path: str) -> None:
    """Loss and the monitored metric vs epoch, train and val (matplotlib Agg)."""
    from matplotlib.ticker import MaxNLocator

    plt = figures.pyplot()

    metric = monitor_metric(name)[len("val_"):]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", metric)):
        for col, style in ((key, "o-"), (f"val_{key}", "s--")):
            if col in frame:
                ax.plot(frame["epoch"], frame[col], style, label=col)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{name}: {key}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with open(path, "wb") as fh:
        fh.write(figures.png(fig, dpi=90))


def write_tensorboard(frame, logdir: str) -> None:
    """Per-epoch scalars (train under ``train/``, val under ``val/``) as TensorBoard event files.

    Written with the low-level ``tf.summary.write`` and TensorBoard's ``scalars`` plugin metadata, so
    the ``tensorboard`` package is needed only to view them, not to train.
    """
    from steel.core.keras_env import tf

    metadata = tf.compat.v1.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"

    writers = {"train": tf.summary.create_file_writer(os.path.join(logdir, "train")),
               "val": tf.summary.create_file_writer(os.path.join(logdir, "val"))}
    for row in frame.to_dict("records"):
        for col, value in row.items():
            if col == "epoch" or value is None or not isinstance(value, (int, float)):
                continue
            split, key = ("val", col[4:]) if col.startswith("val_") else ("train", col)
            with writers[split].as_default():
                tf.summary.write(key, tf.constant(float(value), tf.float32), step=int(row["epoch"]),
                                 metadata=metadata)
    for w in writers.values():
        w.flush()
        w.close()


def write_history(bundle_uri: str, name: str, history: list[dict]) -> dict:
    """``history/<name>.csv`` + ``.png`` and ``logs/<name>/`` (TensorBoard) under the bundle."""
    from steel.core import storage

    frame = history_frame(history)
    with tempfile.TemporaryDirectory(prefix="steel-hist-") as d:
        csv_path = os.path.join(d, f"{name}.csv")
        png_path = os.path.join(d, f"{name}.png")
        frame.to_csv(csv_path, index=False)
        plot_history(frame, name, png_path)
        storage.makedirs(storage.join(bundle_uri, "history"))
        for path in (csv_path, png_path):
            with open(path, "rb") as fh:
                storage.write_bytes(storage.join(bundle_uri, "history", os.path.basename(path)), fh.read())
        logs_uri = storage.join(bundle_uri, "logs", name)
        if storage.exists(logs_uri) or storage.list_files(logs_uri, recursive=True):
            storage.delete(logs_uri, recursive=True, missing_ok=True)  # a re-run replaces, not appends
        tb = os.path.join(d, "tb")
        write_tensorboard(frame, tb)
        storage.copy_local_dir_to(tb, logs_uri)
    return {"csv": storage.join(bundle_uri, "history", f"{name}.csv"),
            "png": storage.join(bundle_uri, "history", f"{name}.png"), "logs": logs_uri}
