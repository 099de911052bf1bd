"""Train the cascade's six models data-parallel on Ray Train (one model after the other).

    python -m ray_jobs.train --config configs/quickstart.yaml [--model all|binary|seg3 ...]
                             [--set train.epochs=2 ...] [--address auto]
    steel train --config ...                                   (the same)
    ray job submit --working-dir . -- python -m ray_jobs.train --config configs/severstal-gpu.yaml

Checkpoints go to ``train.output/<model>-<train_key>/`` (Ray Train ``RunConfig(storage_path, name)``),
the best weights of each model into the bundle at ``bundle`` with ``history/`` and ``logs/``. Re-running
the same command after a crash continues each unfinished model from its last checkpoint and skips the
models the bundle already holds with the same config and data; a changed setting trains afresh.
"""

from __future__ import annotations

import argparse
import sys

from steel.core import s3


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (local path or URI)")
    parser.add_argument("--model", dest="models", action="append", default=[], metavar="NAME",
                        help="model to train: all (default) or one of binary, multilabel, seg1..seg4 "
                             "(repeatable, or comma-separated)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=1 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray address (default: config ray_address; inside `ray job submit` the job's cluster)")


def selected_models(values: list[str], default: list[str]) -> list[str]:
    """``--model`` values (repeatable / comma-separated, ``all``) -> model names, checked."""
    from steel.core.names import ALL_MODEL_NAMES

    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not names or "all" in names:
        return list(default)
    unknown = [n for n in names if n not in ALL_MODEL_NAMES]
    if unknown:
        raise ValueError(f"--model {unknown[0]!r}: choose all or one of {', '.join(ALL_MODEL_NAMES)}")
    return list(dict.fromkeys(names))


def ensure_data(cfg) -> None:
    """Generate the synthetic set when the config asks for one (``data.synth``) and it is missing."""
    from steel.core import storage

    if storage.exists(cfg.data.path("train_csv")) or cfg.data.synth is None:
        return
    from steel.data import synth

    print(f"no {cfg.data.path('train_csv')}: generating a synthetic dataset into {cfg.data.root}", flush=True)
    synth.generate(cfg.data.root, images=cfg.data.synth.images, test_images=cfg.data.synth.test_images,
                   seed=cfg.data.synth.seed)


def cli_main(args: argparse.Namespace) -> int:
    from steel.core.config import load_config
    from steel.core.ray_session import ray_session
    from steel.train.run import train_models

    cfg = load_config(args.config, args.overrides)
    models = selected_models(args.models, cfg.train.model_names())
    if cfg.storage_endpoint:
        s3.set_endpoint(cfg.storage_endpoint)
    ensure_data(cfg)
    with ray_session(args.address or cfg.ray_address):
        train_models(cfg, models)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.train", description=__doc__.split("\n")[0])
    cli_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
