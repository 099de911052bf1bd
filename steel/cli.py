"""The ``steel`` command: every subcommand's arguments, exit codes and output, over :mod:`steel.api`.

``steel --help`` lists the commands, ``steel COMMAND --help`` gives one's full usage and exit
codes. Importing this module (and so ``steel --help``) loads neither TensorFlow nor Ray: each
command imports what it runs. ``python -m ray_jobs.<job>`` is the same command for ``ray job submit``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable

from steel.core.names import ALL_MODEL_NAMES, FORMATS, LAYOUTS, SHAPE, TTA_MODES

EXIT_COMMON = ("exit status: 0 done; 2 bad input (a config key, an argument, a missing or unreadable file: one "
               "line naming it; -v shows the traceback); 130 interrupted.")
EXIT = {
    "score": ("exit status: 0 every listed image has its rows or a permanent error row (_SUCCESS written); "
              "1 the run finished with problems: images failed transiently (not recorded; the next run scores "
              "them), the permanent-error rate is above score.max_error_rate, or --expect-new found nothing new "
              "(the last line says which); 3 another run holds the output's lease (nothing started; the message "
              "names the holder and when its lease goes stale), or this run lost it while running (it stopped "
              "before writing more; what it wrote counts); 2 bad input; 130 interrupted."),
    "train": ("exit status: 0 every model is in the bundle; 1 training failed (models it finished are saved to "
              "the bundle first, and a re-run continues from the last checkpoint); 2 bad input; 130 interrupted."),
    "lease": ("exit status: 0 shown (or broken); 3 --break refused: the holder is alive (its heartbeat is fresh "
              "and it is not provably dead); 2 no lease to break, or bad input; 130 interrupted."),
    "merge": ("exit status: 0 written; 2 the shards do not make a valid submission (each problem listed), the run "
              "has not finished (no _SUCCESS; --partial merges anyway), or bad input; 130 interrupted."),
}


def _json_default(value):
    """numpy scalars and arrays, paths and anything else a summary may hold, as JSON."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def dumps(summary: dict) -> str:
    """A summary dict as one JSON document (what ``--json`` prints)."""
    return json.dumps(summary, default=_json_default, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Arguments


def _config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, help="YAML run config (local path or URI)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=1 (repeatable)")
    p.add_argument("--ray-address", "--address", dest="ray_address",
                   help="Ray to join (default: the config's ray_address; inside `ray job submit` the job's "
                        "cluster; else a local Ray)")


def _bundle_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--bundle", help=f"model bundle URI (default: {default})")
    p.add_argument("--thresholds", help="thresholds JSON URI (default: the bundle's thresholds.json)")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (the run's summary) on stdout and nothing else there")


def args_synth(p: argparse.ArgumentParser) -> None:
    def count(name: str, minimum: int):
        def parse(text: str) -> int:
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
            if value < minimum:
                raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
            return value

        parse.__name__ = name
        return parse

    p.add_argument("out", metavar="OUT", help="output folder: local path, file:// or s3://bucket/prefix")
    p.add_argument("--images", type=count("--images", 1), default=400, help="training images (default 400)")
    p.add_argument("--test-images", type=count("--test-images", 0), default=100, help="test images (default 100)")
    p.add_argument("--seed", type=count("--seed", 0), default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=count("--workers", 1), default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _json_arg(p)


def args_eda(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="dataset folder (URI) with train.csv and train_images/")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder (URI) to write")
    p.add_argument("--split", choices=["all", "train"], default="all",
                   help="analyse the whole train.csv (default) or only the train split, as the seed did")
    p.add_argument("--samples", type=int, default=3, metavar="N", help="sample images per class (default 3)")
    p.add_argument("--seed", type=int, default=42, help="split random_state and sample choice (default 42)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad label rows (written to DIR/skipped_labels.csv) instead of failing")
    _json_arg(p)


def args_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--submission", required=True, metavar="F",
                   help="submission CSV (URI): ImageId,ClassId,EncodedPixels or ImageId_ClassId,EncodedPixels")
    p.add_argument("--truth", required=True, metavar="F",
                   help="truth CSV (URI), train.csv-style: defect rows only, or 4 rows per image")
    p.add_argument("--shape", nargs=2, type=int, metavar=("H", "W"), default=list(SHAPE),
                   help="image height and width the RLEs refer to (default %(default)s)")
    p.add_argument("--report", metavar="DIR", help="also write a report folder (URI): report.md, confusion "
                                                    "matrices, classification report, best/worst overlays")
    p.add_argument("--images", metavar="URI", help="with --report: folder of the submission's images, for the overlays")
    p.add_argument("--json", action="store_true", help="print only a JSON object {mean_dice, per_class, n_images}")


def args_train(p: argparse.ArgumentParser) -> None:
    _config_args(p, required=True)
    p.add_argument("--model", dest="models", action="append", default=[], metavar="NAME",
                   help=f"model to train: all (default) or one of {', '.join(ALL_MODEL_NAMES)} "
                        "(repeatable, or comma-separated)")
    _json_arg(p)


def args_tune(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--bundle", help="model bundle URI (default: the config's bundle)")
    p.add_argument("--tta", choices=TTA_MODES, help="flip TTA (default: tune.tta)")
    p.add_argument("--rounds", type=int, default=4, help="coordinate-ascent rounds at most (default 4)")
    p.add_argument("--cache-size", nargs=2, type=int, metavar=("H", "W"),
                   help="also keep the segmentation maps at this resolution in the cache (default: none; the "
                        "search scores exact full-resolution tables the actors count)")
    p.add_argument("--batch-size", type=int, default=8, help="images per inference batch (default 8)")
    p.add_argument("--no-full-check", dest="full_check", action="store_false",
                   help="skip the full-resolution Dice of the tuned cascade (a second inference pass)")
    p.add_argument("--cache", help="local .npz: reuse cached validation predictions when they were made by the same "
                                   "models, TTA, cache size and labels; else (re)compute and write them")
    p.add_argument("--start", help="starting thresholds: a thresholds.json, or EDA's area_thresholds.json (merged "
                                   "into the seed's); default: the bundle's, else the seed's")
    _json_arg(p)


def args_score(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    _bundle_args(p, "the config's bundle_versions root, else its bundle")
    p.add_argument("--images", help="folder / S3 prefix of images (default: score.images or data test_images)")
    p.add_argument("--out", help="output folder URI (default: score.out)")
    p.add_argument("--actors", type=int, help="cascade actors (model replicas)")
    p.add_argument("--batch-size", type=int, help="images per cascade batch")
    p.add_argument("--format", choices=FORMATS, help="shard file format")
    p.add_argument("--tta", choices=TTA_MODES, help="flip test-time augmentation (default: the thresholds')")
    p.add_argument("--allow-resize", action="store_true", default=None,
                   help="resize images that are not 1600x256 instead of rejecting them")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per cascade actor (0 = CPU)")
    p.add_argument("--images-per-shard", type=int, help="images per output shard")
    p.add_argument("--image-formats", help="comma-separated accepted formats (PIL names; default JPEG)")
    p.add_argument("--since", help="list only date partitions dt=YYYY-MM-DD on or after this day")
    p.add_argument("--expect-new", action="store_true", default=None,
                   help="exit 1 when there are no new images (a stopped camera feed)")
    _json_arg(p)


def args_serve(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    _bundle_args(p, "the config's bundle")
    p.add_argument("--host", help="HTTP address (default serve.host: 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default serve.port: 8000)")
    p.add_argument("--replicas", type=int, help="replicas of the endpoint (ignored with serve.autoscaling)")
    p.add_argument("--gpus-per-replica", type=float, help="GPUs per replica (0 = CPU)")
    p.add_argument("--max-batch-size", type=int, help="largest batch of requests per cascade call")
    p.add_argument("--batch-wait-s", type=float, help="how long a batch waits for more requests")
    p.add_argument("--detach", action="store_true", help="deploy and return (for a cluster's Serve)")


def args_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="scoring output folder (URI) with shards/")
    p.add_argument("--to", required=True, help="submission CSV to write (URI)")
    p.add_argument("--layout", choices=LAYOUTS, default="long",
                   help="long: ImageId,ClassId,EncodedPixels; combined: ImageId_ClassId,EncodedPixels")
    p.add_argument("--fill-errors", action="store_true", help="write images that failed to score as four empty rows")
    p.add_argument("--partial", action="store_true", help="merge a run that has not finished")
    _json_arg(p)


def args_lease(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="scoring output folder (URI) holding the _LOCK")
    p.add_argument("--break", dest="break_stale", action="store_true",
                   help="remove the lease if it is stale or its holder is dead (a live holder's is refused)")
    _json_arg(p)


def args_run(p: argparse.ArgumentParser) -> None:
    _config_args(p, required=True)
    _json_arg(p)


# ---------------------------------------------------------------------------------------------
# Commands: each returns (exit code, summary dict or None, the lines to print)


def _flags(args, section: str, names: dict[str, str]) -> list[str]:
    """``--flag`` values as config overrides (``section.key=value``): they get the config's checks."""
    out = []
    for attr, key in names.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{section}.{key}={json.dumps(value)}")
    return out


def _load(args, extra: list[str] = ()):
    from steel import api

    return api.config(args.config, [*args.overrides, *extra])


def selected_models(values: list[str], default: list[str]) -> list[str]:
    """``--model`` values (repeatable / comma-separated, ``all``) -> model names, checked."""
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not names or "all" in names:
        return list(default)
    unknown = [n for n in names if n not in ALL_MODEL_NAMES]
    if unknown:
        raise ValueError(f"--model {unknown[0]!r}: choose all or one of {', '.join(ALL_MODEL_NAMES)}")
    return list(dict.fromkeys(names))


def cmd_synth(args):
    from steel import api
    from steel.data.synth.write import summary_line

    s = api.synth(args.out, images=args.images, test_images=args.test_images, seed=args.seed, workers=args.workers,
                  progress=not args.no_progress)
    return 0, s, [summary_line(s)]


def cmd_eda(args):
    from steel import api

    s = api.eda(args.data, args.out, split=None if args.split == "all" else args.split, samples=args.samples,
                seed=args.seed, skip_bad=args.skip_bad)
    pc, lp = s["images_per_class"], s["labels_per_image"]
    return 0, s, [f"{s['n_images']} images ({s['scope']}): per class " + ", ".join(f"{k}={v}" for k, v in pc.items())
                  + f"; no defect {lp['0']}, one label {lp['1']}, two labels {lp['2']}",
                  "area thresholds: " + ", ".join(f"{k}: {v['min_area']}-{v['max_area']}"
                                                  for k, v in s["area_thresholds"].items()),
                  f"report: {args.out}/report.md"]


def cmd_evaluate(args):
    from steel import api
    from steel.eval.evaluate import format_table

    h, w = args.shape
    if h < 1 or w < 1:
        raise ValueError(f"--shape must be positive, got {h} {w}")
    s = api.evaluate(args.submission, args.truth, shape=(h, w), report=args.report, images=args.images)
    lines = [format_table(s)] + ([f"report: {s['report']}"] if s.get("report") else [])
    if args.json:  # the headline numbers (the counts and the report path are in the table)
        s = {k: s[k] for k in ("mean_dice", "per_class", "n_images")}
    return 0, s, lines


def cmd_train(args):
    from steel import api

    cfg = _load(args)
    s = api.train(cfg, selected_models(args.models, cfg.train.model_names()), ray_address=args.ray_address)
    return 0, s, []  # training prints its own epoch lines and its summary table


def cmd_tune(args):
    from steel import api
    from steel.tune.run import format_summary

    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    cfg = _load(args)
    options = dict(rounds=args.rounds, cache_size=args.cache_size, batch_size=args.batch_size,
                   full_check=args.full_check, cache_path=args.cache, tta=args.tta, start=_start_thresholds(args.start))
    s = api.tune(cfg, bundle=args.bundle, ray_address=args.ray_address, **options)
    return 0, s, [format_summary(s)]


def _start_thresholds(uri: str | None) -> dict | None:
    if not uri:
        return None
    from steel.core import storage
    from steel.model import thresholds

    data = json.loads(storage.read_text(uri))
    if isinstance(data, dict) and "classes" in data:
        return thresholds.validate_thresholds(data)
    return thresholds.from_area_json(uri)


def cmd_score(args):
    from steel import api
    from steel.score.lease import LeaseHeld, LeaseLost
    from steel.score.run import format_summary

    overrides = _flags(args, "score", {
        "actors": "actors", "batch_size": "batch_size", "format": "format", "tta": "tta", "allow_resize": "allow_resize",
        "gpus_per_actor": "gpus_per_actor", "images_per_shard": "images_per_shard", "since": "since",
        "expect_new": "expect_new"})
    if args.image_formats:
        formats = [f.strip().upper() for f in args.image_formats.split(",") if f.strip()]
        overrides.append(f"score.image_formats={json.dumps(formats)}")
    cfg = _load(args, overrides)
    try:
        s = api.score(cfg, bundle=args.bundle, images=args.images, out=args.out, thresholds=args.thresholds,
                      ray_address=args.ray_address)
    except LeaseHeld as e:
        print(f"steel score: not started: {e}", file=sys.stderr)
        return 3, {"status": "not started", "error": str(e)}, []
    except LeaseLost as e:
        print(f"steel score: stopped: {e}. The shards it wrote count; the next run scores the rest",
              file=sys.stderr)
        return 3, {"status": "lease lost", "error": str(e)}, []
    lines = [format_summary(s)]
    if s.get("problems"):
        print(f"steel score: FAILED (run {s.get('run_id')}): " + "; ".join(s["problems"]), file=sys.stderr)
        return 1, s, lines
    return 0, s, lines


def cmd_serve(args):
    import time

    from steel.core import s3
    from steel.core.ray_session import ray_session

    cfg = _load(args, _flags(args, "serve", {"host": "host", "port": "port", "replicas": "replicas",
                                             "gpus_per_replica": "gpus_per_replica",
                                             "max_batch_size": "max_batch_size",
                                             "batch_wait_s": "batch_wait_timeout_s"}))
    if cfg.storage_endpoint:
        s3.set_endpoint(cfg.storage_endpoint)
    bundle = args.bundle or cfg.bundle
    from ray import serve

    from steel.serve import app as serving

    serve_cfg = cfg.serve
    with ray_session(args.ray_address or cfg.ray_address):
        serving.start(serve_cfg)
        serving.run(serving.build_app(bundle, cfg.score, serve_cfg, args.thresholds), serve_cfg)
        prefix = serve_cfg.route_prefix.rstrip("/")
        print(f"serving {bundle} at http://{serve_cfg.host}:{serve_cfg.port}{prefix}/score "
              f"(batch: {prefix}/score/batch, health: {prefix}/healthz, ready: {prefix}/ready)", flush=True)
        if args.detach:
            return 0, None, []
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("shutting down", file=sys.stderr)
        finally:
            serve.shutdown()
    return 0, None, []


def cmd_merge(args):
    from steel import api

    s = api.merge(args.out, args.to, layout=args.layout, fill_errors=args.fill_errors, partial=args.partial)
    line = f"merged {s['shards']} shards: {s['images']} images, {s['rows']} rows ({s['layout']}) -> {s['to']}"
    if s["errors"]:
        line += f"; {s['errors']} images failed to score" + (" (written empty)" if s["filled"] else
                                                            " (not included; --fill-errors adds them)")
    return 0, s, [line]


def cmd_lease(args):
    from steel import api
    from steel.score.lease import LeaseHeld, describe

    try:
        s = api.lease(args.out, break_stale=args.break_stale)
    except LeaseHeld as e:
        print(f"steel lease: not broken: {e}", file=sys.stderr)
        return 3, {"held": True, "broken": None, "error": str(e)}, []
    if args.break_stale:
        b = s["broken"]
        return 0, s, [f"broke {b['uri']}: {describe(b['holder'])}, last renewed {b['age_s']:.0f} s ago "
                      f"({'holder dead' if b['dead'] else 'stale'}; TTL {b['ttl_s']:.0f} s)"]
    if not s["held"]:
        return 0, s, [f"{args.out}: no lease: no run is scoring into it"]
    state = "holder dead" if s["dead"] else ("stale: the next run takes it over" if s["stale"] else
                                             f"live: goes stale in {s['ttl_s'] - s['age_s']:.0f} s without renewal")
    return 0, s, [f"{s['uri']}: {describe(s['holder'])}, last renewed {s['age_s']:.0f} s ago (TTL "
                  f"{s['ttl_s']:.0f} s): {state}"]


def cmd_run(args):
    from steel import api

    return 0, api.run(_load(args), ray_address=args.ray_address), []  # the pipeline prints its stages and tables


# name -> (one-line help, arguments, command)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "synth": ("write a synthetic Severstal-like dataset (Kaggle layout)", args_synth, cmd_synth),
    "eda": ("exploratory analysis report of a dataset (plots, area thresholds JSON)", args_eda, cmd_eda),
    "train": ("train the models (six-model cascade or unified) data-parallel on Ray Train", args_train, cmd_train),
    "tune": ("tune the cascade's thresholds on the validation split", args_tune, cmd_tune),
    "score": ("batch-score images with a bundle on Ray Data (resumable, incremental)", args_score, cmd_score),
    "serve": ("serve a bundle's cascade as an HTTP endpoint (Ray Serve)", args_serve, cmd_serve),
    "merge": ("merge scoring shards into one Kaggle-ready CSV", args_merge, cmd_merge),
    "lease": ("show (or --break) the lease of a scoring output: which run holds it, and since when", args_lease,
              cmd_lease),
    "evaluate": ("mean Dice of a submission against truth", args_evaluate, cmd_evaluate),
    "run": ("run the whole pipeline from a config, each finished stage skipped", args_run, cmd_run),
}
DESCRIPTIONS = {
    "train": "Checkpoints go to train.output/<run>/ (Ray Train RunConfig(storage_path, name)); each model's best "
             "weights into the bundle with history/ and logs/. Re-running the same command after a crash continues "
             "each unfinished model from its last checkpoint and skips the models the bundle already holds with "
             "the same config and data; a changed setting trains afresh.",
    "score": "Lists every file under --images, scores the images no complete shard holds yet and writes shards of "
             "Kaggle rows, error rows and a run record under --out. Re-running into the same --out resumes a killed "
             "run or scores a night's new images; every image ends with one row set.",
    "tune": "The models run once over the validation images on Ray actors (GPU actors with score.gpus_per_actor); "
            "the search runs in this process. Writes <bundle>/thresholds.json and <bundle>/tuning/*.png. With "
            "tune.mode: fixed it writes the seed's hand-set thresholds instead.",
    "serve": "Without --detach it serves until Ctrl-C; running it again with another --bundle rolls the application "
             "over in place, without dropping requests.",
    "run": "data -> split -> train -> tune -> publish -> score -> evaluate -> report; a killed run, run again, "
           "continues where it stopped.",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("steel")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, Ray's own log lines and tracebacks")
    parser = argparse.ArgumentParser(prog="steel", description="Steel surface defect detection on Ray.",
                                     parents=[common], epilog="steel COMMAND --help shows a command's usage and exit codes.")
    parser.add_argument("--version", action="version", version=f"steel {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, arguments, command) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, parents=[common], description=f"{help_text}. {DESCRIPTIONS.get(name, '')}",
                           epilog=EXIT.get(name, EXIT_COMMON), formatter_class=argparse.RawDescriptionHelpFormatter)
        arguments(p)
        p.set_defaults(_command=command)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one command (what ``steel NAME`` parses)."""
    return build_parser()._subparsers._group_actions[0].choices[name]


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # matplotlib logs every categorical axis at INFO: noise in a run's output
        logging.getLogger("matplotlib").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    _logging(verbose)
    as_json = getattr(args, "json", False)
    try:
        # With --json, everything the run prints goes to stderr: stdout carries the one JSON document.
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            code, summary, lines = args._command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError) as e:
        # User errors (bad config, bad labels, missing files) get one clear line, not a traceback.
        if verbose:
            raise
        print(f"steel {args.command}: error: {e}", file=sys.stderr)
        return 2
    if as_json:
        if summary is not None:
            print(dumps(summary), flush=True)
    else:
        for line in lines:
            print(line, flush=True)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
