"""Planning a nightly run at archive scale: per-shard index files against the old one-file manifest.

A scoring output that already holds 1,000,000 scored images (in shards of 64: 15,625 shards, each with
its index file ``index/<shard>.json``) and an archive laid out ``dt=YYYY-MM-DD/`` whose newest
partition has 10,000 new images. "Planning" is what a run does before scoring: list the inputs
(``--since`` the new day: only the new partition), read which images are done, and cut the pending
ones into shards. The baseline is the previous design on the same data: the done images come from
one ``manifest.json`` listing every scored ImageId (rewritten each night). Each side runs in a fresh
process; time and peak memory (max RSS, imports included) are printed, and the ratio.

    .venv/bin/python -m bench.bench_plan [--scored 1000000] [--new 10000] [--per-shard 64] [--root DIR]

Synthetic files are empty placeholders (the plan never opens a shard that has an index file); they
are written once under ``--root`` (default /tmp/steel-bench-plan) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

NEW_DAY = "2026-11-30"


def _day(i: int) -> str:
    return f"dt=2026-{1 + (i // 100_000) % 11:02d}-{1 + (i // 4000) % 25:02d}"


def make_data(root: str, scored: int, new: int, per_shard: int) -> None:
    from steel.score import io as score_io

    stamp = os.path.join(root, f"ready-{scored}-{new}-{per_shard}")
    if os.path.exists(stamp):
        return
    ids = sorted(f"{_day(i)}/cam{i % 4}/{i:09d}.jpg" for i in range(scored))
    legacy_shards = {}
    for kind in ("indexed", "legacy"):
        os.makedirs(os.path.join(root, kind, "shards"), exist_ok=True)
    os.makedirs(os.path.join(root, "indexed", "index"), exist_ok=True)
    for start in range(0, scored, per_shard):
        group = ids[start:start + per_shard]
        name = score_io.shard_name(group)
        entry = {"images": group, "scored": len(group), "errors": 0, "file": f"{name}.csv"}
        for kind in ("indexed", "legacy"):
            open(os.path.join(root, kind, "shards", f"{name}.csv"), "w").close()
        with open(os.path.join(root, "indexed", "index", f"{name}.json"), "w") as fh:
            json.dump(entry, fh, separators=(",", ":"))
        legacy_shards[name] = entry
    with open(os.path.join(root, "legacy", "manifest.json"), "w") as fh:
        json.dump({"kind": "steel-scores", "shards": legacy_shards}, fh, indent=1)
    day = os.path.join(root, "archive", f"dt={NEW_DAY}")
    for i in range(new):
        sub = os.path.join(day, f"cam{i % 4}")
        os.makedirs(sub, exist_ok=True)
        open(os.path.join(sub, f"n{i:07d}.jpg"), "w").close()
    open(stamp, "w").close()


def measure(root: str, kind: str, per_shard: int) -> dict:
    """One planning pass (run in its own process)."""
    from steel.score import io as score_io
    from steel.score import listing

    t0 = time.perf_counter()
    inputs = listing.list_inputs(os.path.join(root, "archive"), since=NEW_DAY).inputs
    t_list = time.perf_counter()
    out = os.path.join(root, kind)
    done, owner = score_io.done_images(out, score_io.read_manifest(out))
    t_done = time.perf_counter()
    pending = [i for i in inputs if i not in owner]
    plan = score_io.plan_shards(pending, per_shard)
    t_plan = time.perf_counter()
    return {"kind": kind, "listed": len(inputs), "done": len(owner), "pending": len(pending), "shards": len(plan),
            "list_s": t_list - t0, "done_s": t_done - t_list, "plan_s": t_plan - t_done, "total_s": t_plan - t0,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scored", type=int, default=1_000_000)
    p.add_argument("--new", type=int, default=10_000)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--root", default="/tmp/steel-bench-plan")
    p.add_argument("--measure", choices=("indexed", "legacy"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.root, args.measure, args.per_shard)))
        return 0
    t0 = time.perf_counter()
    make_data(args.root, args.scored, args.new, args.per_shard)
    print(f"data: {args.scored:,} scored ids in {args.scored // args.per_shard:,} shards + {args.new:,} new "
          f"images under {args.root} ({time.perf_counter() - t0:.1f} s to prepare)")
    results = {}
    for kind in ("indexed", "legacy"):
        proc = subprocess.run([sys.executable, "-m", "bench.bench_plan", "--measure", kind, "--root", args.root,
                               "--per-shard", str(args.per_shard)], capture_output=True, text=True, check=True)
        r = results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["pending"] == args.new and r["done"] == args.scored, r
        print(f"{kind:8s} list {r['list_s']:6.2f} s  done {r['done_s']:6.2f} s  plan {r['plan_s']:5.2f} s  "
              f"total {r['total_s']:6.2f} s  peak {r['peak_mib']:7.0f} MiB  ({r['pending']:,} pending in "
              f"{r['shards']} shards)")
    a, b = results["indexed"], results["legacy"]
    print(f"index files vs one manifest: time {a['total_s'] / b['total_s']:.2f}x, "
          f"peak memory {a['peak_mib'] / b['peak_mib']:.2f}x")
    ok = a["total_s"] < 30 and a["peak_mib"] < 1024
    print(f"target (under 30 s and under 1 GiB): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
