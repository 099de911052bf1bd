"""Run every benchmark in bench/ (each ``bench_*.py``), one after another, each in its own process.

    .venv/bin/python -m bench.run_all                        # all of them (what `make bench` runs)
    .venv/bin/python -m bench.run_all --list                 # names only
    .venv/bin/python -m bench.run_all --only rle metrics     # some of them
    .venv/bin/python -m bench.run_all --only rle -- --masks 30 --repeat 1   # arguments after -- go to each

Each benchmark prints its own ratios against a baseline measured in its run. Own processes, because
some start a local Ray and TensorFlow; one failing does not stop the others, and the exit status is
non-zero when any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    """Benchmark names (``bench_<name>.py``), sorted."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description="Run the benchmarks in bench/.")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"some of: {', '.join(available())}")
    parser.add_argument("--list", action="store_true", help="print the benchmark names and exit")
    args = parser.parse_args(argv)
    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
        names = [n for n in names if n in args.only]
    results = []
    for name in names:
        print(f"\n=== bench_{name} ===", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", f"bench.bench_{name}", *passthrough], cwd=HERE.parent)
        results.append((name, code, time.perf_counter() - t0))
    print("\n=== summary ===")
    for name, code, secs in results:
        print(f"bench_{name:10} {'ok' if code == 0 else f'FAILED (exit {code})':18} {secs:7.1f} s")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
