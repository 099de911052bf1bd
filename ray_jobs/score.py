"""Batch-score images with a model bundle on Ray Data: shards of Kaggle rows + errors + a run record.

    steel score --bundle URI --images URI --out URI [--actors N] [--batch-size B]
                [--format csv|parquet] [--tta none|h|v|hv] [--allow-resize] [--gpus-per-actor G]
                [--images-per-shard K] [--image-formats JPEG,PNG] [--since YYYY-MM-DD]
                [--expect-new] [--config C]
    python -m ray_jobs.score ...   (the same; e.g. under ``ray job submit``)

With ``--config`` the run's ``bundle``, ``score.*``, ``storage_endpoint`` and ``ray_address`` come
from the YAML file; flags override them. Re-running into the same ``--out`` scores only images no
complete shard holds yet (resume after a crash, or the nightly run over a growing archive).

Exit status: 0 when the run finished clean; 1 when images failed transiently (retried next run),
the permanent-error rate is above ``score.max_error_rate``, or ``--expect-new`` found nothing new
(the last line says which); 3 when another run holds the output's lease; 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from steel.core import s3
from steel.core.names import FORMATS, TTA_MODES


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (bundle, score.*, storage_endpoint, ray_address)")
    parser.add_argument("--bundle", help="model bundle URI or versioned root (default: the config's bundle_versions, else bundle)")
    parser.add_argument("--images", help="folder / S3 prefix of images (default: score.images or data test_images)")
    parser.add_argument("--out", help="output folder URI (default: score.out)")
    parser.add_argument("--actors", type=int, help="cascade actors (model replicas)")
    parser.add_argument("--batch-size", type=int, help="images per cascade batch")
    parser.add_argument("--format", choices=FORMATS, help="shard file format")
    parser.add_argument("--tta", choices=TTA_MODES, help="flip test-time augmentation")
    parser.add_argument("--allow-resize", action="store_true", default=None,
                        help="resize images that are not 1600x256 instead of rejecting them")
    parser.add_argument("--gpus-per-actor", type=float, help="GPUs per cascade actor (0 = CPU)")
    parser.add_argument("--images-per-shard", type=int, help="images per output shard")
    parser.add_argument("--image-formats", help="comma-separated accepted formats (PIL names; default JPEG)")
    parser.add_argument("--since", help="list only date partitions dt=YYYY-MM-DD on or after this day")
    parser.add_argument("--expect-new", action="store_true", default=None,
                        help="exit non-zero when there are no new images (a stopped camera feed)")
    parser.add_argument("--thresholds", help="thresholds JSON URI (default: the bundle's thresholds.json)")
    parser.add_argument("--ray-address", help="Ray to join (default: the config's ray_address, else local)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. score.batch_size=4 (repeatable)")


def cli_main(args: argparse.Namespace) -> int:
    from steel.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    changes = {
        "actors": args.actors, "batch_size": args.batch_size, "format": args.format, "tta": args.tta,
        "allow_resize": args.allow_resize, "gpus_per_actor": args.gpus_per_actor,
        "images_per_shard": args.images_per_shard, "since": args.since, "expect_new": args.expect_new,
        "image_formats": [f.strip().upper() for f in args.image_formats.split(",") if f.strip()]
        if args.image_formats else None,
    }
    score_cfg = dataclasses.replace(cfg.score, **{k: v for k, v in changes.items() if v is not None})
    bundle = args.bundle or cfg.bundle_versions or cfg.bundle  # the promoted version when there is one
    images = args.images or score_cfg.images or cfg.data.path("test_images")
    out = args.out or score_cfg.out
    if cfg.storage_endpoint:
        s3.set_endpoint(cfg.storage_endpoint)

    import ray

    from steel.score import run as scoring
    from steel.score.lease import LeaseHeld

    had_ray = ray.is_initialized()
    try:  # Ray starts only once the lease is taken and there is work: a second run exits at once
        summary = scoring.score(bundle, images, out, score_cfg, thresholds=args.thresholds,
                                ray_address=args.ray_address or cfg.ray_address)
    except LeaseHeld as e:
        print(f"steel score: not started: {e}", file=sys.stderr)
        return 3
    finally:
        if not had_ray and ray.is_initialized():
            ray.shutdown()
    print(scoring.format_summary(summary))
    problems = summary.get("problems") or []
    if problems:
        print(f"steel score: FAILED (run {summary.get('run_id')}): " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from steel.cli import main as steel_main

    return steel_main(["score", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
