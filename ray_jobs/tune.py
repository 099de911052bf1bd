"""Tune the cascade thresholds of a bundle on the validation split (maximising mean Dice).

    steel tune --bundle URI --config C [--tta none|h|v|hv] [--rounds R] [--cache-size H W]
               [--batch-size B] [--no-full-check] [--cache PATH.npz] [--start thresholds.json|area_thresholds.json]
    python -m ray_jobs.tune ...   (the same; e.g. under ``ray job submit``)

The models run once over the validation images on Ray actors (scoring's pipeline; GPU actors with
``score.gpus_per_actor``), the search then runs in this process on the cached probabilities.
``--cache`` reuses a saved cache only when it was made by the same models, TTA, cache size, pixel grid and
validation labels; otherwise it is recomputed and overwritten. Writes ``<bundle>/thresholds.json``
(with the validation score before and after) and ``<bundle>/tuning/dice_vs_*.png``. With
``tune.mode: fixed`` in the config it searches nothing: it writes the seed's hand-set thresholds (area
percentiles of the train split, probabilities 0.5) and, unless ``--no-full-check``, their validation
mean Dice (on Ray actors, like the search's check).
"""

from __future__ import annotations

import argparse
import sys

from steel.core import s3
from steel.core.names import TTA_MODES


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (data paths and split seed, bundle, tune.tta)")
    parser.add_argument("--bundle", help="model bundle URI (default: the config's bundle)")
    parser.add_argument("--tta", choices=TTA_MODES, help="flip TTA (default: tune.tta)")
    parser.add_argument("--rounds", type=int, default=4, help="coordinate-ascent rounds at most (default 4)")
    parser.add_argument("--cache-size", nargs=2, type=int, metavar=("H", "W"),
                        help="also keep the segmentation maps at this resolution in the cache (default: "
                             "none; the search scores exact full-resolution tables the actors count)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference batch (default 8)")
    parser.add_argument("--no-full-check", dest="full_check", action="store_false",
                        help="skip the full-resolution Dice of the tuned cascade (a second inference pass)")
    parser.add_argument("--cache", help="local .npz: reuse cached validation predictions when they were made by "
                                        "the same models, TTA, cache size and labels; else (re)compute and write them")
    parser.add_argument("--address", help="Ray address to join (default: the config's ray_address, else local)")
    parser.add_argument("--start", help="starting thresholds: a thresholds.json, or EDA's area_thresholds.json "
                                        "(merged into the seed's); default: the bundle's, else the seed's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. data.root=/data (repeatable)")


def _start_thresholds(uri: str | None) -> dict | None:
    if not uri:
        return None
    import json

    from steel.core import storage
    from steel.model import thresholds

    data = json.loads(storage.read_text(uri))
    if isinstance(data, dict) and "classes" in data:
        return thresholds.validate_thresholds(data)
    return thresholds.from_area_json(uri)


def cli_main(args: argparse.Namespace) -> int:
    from steel.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.storage_endpoint:
        s3.set_endpoint(cfg.storage_endpoint)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")

    from steel.core.ray_session import local_cpus, ray_session
    from steel.tune import run as tuning

    with ray_session(args.address or cfg.ray_address, num_cpus=local_cpus(cfg)):
        if cfg.tune.mode == "fixed":  # the seed's thresholds: no search (steel.tune.run.fixed_thresholds)
            print(tuning.format_summary(tuning.write_fixed(cfg, bundle_uri=args.bundle or cfg.bundle,
                                                           full_check=args.full_check,
                                                           batch_size=args.batch_size)))
            return 0
        summary = tuning.tune(cfg, bundle_uri=args.bundle or cfg.bundle, start=_start_thresholds(args.start),
                              rounds=args.rounds, cache_size=args.cache_size, batch_size=args.batch_size,
                              full_check=args.full_check, cache_path=args.cache, tta=args.tta)
    print(tuning.format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    from steel.cli import main as steel_main

    return steel_main(["tune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
