"""The ``steel`` command: one subcommand per job.

Each subcommand lives in the module that does the work; that module exposes
``cli_arguments(parser)`` and ``cli_main(args) -> int | None``. Those modules must stay cheap to
import (TensorFlow and Ray are imported inside functions), so ``steel --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("steel.data.synth", "write a synthetic Severstal-like dataset (Kaggle layout)"),
    "eda": ("steel.report.eda", "exploratory analysis report of a dataset (plots, area thresholds JSON)"),
    "evaluate": ("steel.eval.evaluate", "mean Dice of a submission against truth"),
    "train": ("ray_jobs.train", "train the models (six-model cascade or unified) data-parallel on Ray Train"),
    "tune": ("ray_jobs.tune", "tune cascade thresholds on the validation split"),
    "score": ("ray_jobs.score", "batch-score images with a bundle on Ray Data"),
    "serve": ("ray_jobs.serve", "serve a bundle's cascade as an HTTP endpoint (Ray Serve)"),
    "merge": ("steel.score.merge", "merge submission shards into one Kaggle-ready CSV"),
    "run": ("ray_jobs.pipeline", "run the whole pipeline from a config"),
}


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steel", description="Steel surface defect detection on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if names is not None and name not in names:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().split("\n")[0])
        module.cli_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Import only the chosen subcommand's module (others may be heavier or broken on this machine).
    chosen = [a for a in argv if a in COMMANDS][:1]
    parser = build_parser(chosen if chosen and "-h" not in argv[:1] and "--help" not in argv[:1] else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # matplotlib logs every categorical axis at INFO: noise in a run's output
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        return int(args._module.cli_main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError) as e:
        # User errors (bad config, bad labels, missing files) get one clear line, not a traceback.
        if args.verbose:
            raise
        print(f"steel {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
