"""Run the whole pipeline from a config: data, split, train, tune, score, evaluate, report.

    python -m ray_jobs.pipeline --config configs/quickstart.yaml      (same as: steel run --config ...)
    ray job submit --working-dir . -- python -m ray_jobs.pipeline --config configs/severstal-gpu.yaml
"""

from __future__ import annotations

import argparse
import sys


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (local path or URI)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.epochs=1 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray address (default: config ray_address; inside `ray job submit` the job's cluster)")


def cli_main(args: argparse.Namespace) -> int:
    from steel.core.config import load_config
    from steel.core.ray_session import local_cpus, ray_session
    from steel.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    with ray_session(args.address or cfg.ray_address, num_cpus=local_cpus(cfg)):
        run_pipeline(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.pipeline", description=__doc__.split("\n")[0])
    cli_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
