"""Online scoring: deploy a bundle's cascade as a Ray Serve HTTP endpoint (see steel.serve.app).

    steel serve --bundle URI [--config C] [--host H] [--port P] [--replicas N] [--gpus-per-replica G]
                [--max-batch-size B] [--batch-wait-s S] [--set serve.KEY=VALUE] [--ray-address A] [--detach]
    python -m ray_jobs.serve ...   (the same; e.g. under ``ray job submit``)

Without ``--detach`` it serves until Ctrl-C, then shuts Serve down. With ``--detach`` (joining a
cluster) it deploys and returns; the application keeps running in the cluster's Serve. Running it
again with another ``--bundle`` updates the application in place (rolling, no request dropped).
"""

from __future__ import annotations

import argparse
import sys
import time

from steel.core import s3


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (bundle, score.*, serve.*, storage_endpoint, ray_address)")
    parser.add_argument("--bundle", help="model bundle URI (default: the config's bundle)")
    parser.add_argument("--thresholds", help="thresholds JSON URI (default: the bundle's thresholds.json)")
    parser.add_argument("--host", help="HTTP address (default serve.host: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default serve.port: 8000)")
    parser.add_argument("--replicas", type=int, help="replicas of the endpoint (ignored with serve.autoscaling)")
    parser.add_argument("--gpus-per-replica", type=float, help="GPUs per replica (0 = CPU)")
    parser.add_argument("--max-batch-size", type=int, help="largest batch of requests per cascade call")
    parser.add_argument("--batch-wait-s", type=float, help="how long a batch waits for more requests")
    parser.add_argument("--ray-address", help="Ray to join (default: the config's ray_address, else local)")
    parser.add_argument("--detach", action="store_true", help="deploy and return (for a cluster's Serve)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. serve.cpus_per_replica=2 (repeatable)")


def cli_main(args: argparse.Namespace) -> int:
    from steel.core.config import load_config

    changes = {"host": args.host, "port": args.port, "replicas": args.replicas,
               "gpus_per_replica": args.gpus_per_replica, "max_batch_size": args.max_batch_size,
               "batch_wait_timeout_s": args.batch_wait_s}
    # Flags are overrides like --set ones, so they get the config's checks.
    flags = [f"serve.{k}={v}" for k, v in changes.items() if v is not None]
    cfg = load_config(args.config, args.overrides + flags)
    serve_cfg = cfg.serve
    if cfg.storage_endpoint:
        s3.set_endpoint(cfg.storage_endpoint)
    bundle = args.bundle or cfg.bundle

    from ray import serve

    from steel.core.ray_session import ray_session
    from steel.serve import app as serving

    with ray_session(args.ray_address or cfg.ray_address):
        serving.start(serve_cfg)
        serving.run(serving.build_app(bundle, cfg.score, serve_cfg, args.thresholds), serve_cfg)
        prefix = serve_cfg.route_prefix.rstrip("/")
        print(f"serving {bundle} at http://{serve_cfg.host}:{serve_cfg.port}{prefix}/score "
              f"(batch: {prefix}/score/batch, health: {prefix}/healthz, ready: {prefix}/ready)", flush=True)
        if args.detach:
            return 0
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("shutting down", file=sys.stderr)
        finally:
            serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    from steel.cli import main as steel_main

    return steel_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
