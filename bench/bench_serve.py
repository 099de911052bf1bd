"""Online scoring under load: N concurrent HTTP clients against a local Ray Serve, against batch
scoring's images/s on the same bundle and images, in the same run.

1. **bundle**: ``--bundle URI``, or (default) the quickstart architecture (configs/quickstart.yaml:
   simplecnn classifiers and U-Nets at 64x320) with random weights and seed-like gates (about half
   the images stop at the binary gate, class gates at the Severstal class shares; bench_score's
   rule). Random weights do the same work per image as trained ones: the gates decide the work.
2. **batch baseline**: :func:`steel.score.run.score` with the quickstart's score settings (1 actor,
   batch 16, 25 images per shard) over ``--images`` synthetic 256x1600 JPEGs. Its reported
   ``images_per_s`` includes Ray Data's start, the actor's start and model load (~25-40 s here, most
   of a short run), so the baseline is the *steady-state* rate: the images of every shard after the
   first over the time from the first shard written to the last (the stricter one). Both are printed.
3. **serve**: ``steel.serve.app`` on 127.0.0.1 (1 replica, serve.batch); ``--clients`` threads each
   POST one image at a time to ``/score`` for ``--seconds``; throughput (answered images/s),
   p50/p95/p99 latency, failed requests, mean batch size (from ``/ready``). A client retries a
   request that got no answer, a 408 (the proxy's request timeout) or a 5xx
   (0.5 s apart, for up to 120 s); a request is *failed* only when every try failed.
4. **replica killed**: the same load for ``--kill-seconds``; a third of the way in, the replica's
   actor is killed (``ray.kill``). Serve starts a new one; the clients' retries must carry every
   request through: retried requests counted, failed requests must be 0.

``--images-per-request K`` (K > 1) makes the load phase use the batch form (``/score/batch``, K images
per request; latencies are per request). Prints one JSON summary; targets (issue 13): throughput >= 0.8x batch, p99 <= 3x p50, 0 failed.

    .venv/bin/python -m bench.bench_serve [--bundle URI] [--clients 8] [--seconds 30] [--images 384]
                                          [--kill-seconds 40] [--max-batch-size 8] [--batch-wait-s 0.01]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import tempfile
import threading
import time

import numpy as np

from steel.model.thresholds import save_thresholds

RETRY_STATUSES = {408, 500, 502, 503, 504}  # scoring is idempotent: a timeout or 5xx is safe to retry
RETRY_FOR_S = 120.0  # a client retries a request for this long (replica restart included)


def quickstart_bundle(folder: str, image_paths: list[str]) -> str:
    """A bundle with the quickstart's architectures, random weights and seed-like thresholds."""
    from bench.bench_score import seed_like_thresholds
    from steel.core.config import load_config
    from steel.core.names import MODEL_NAMES
    from steel.model import bundle as bundle_lib
    from steel.model import networks as models

    cfg = load_config("configs/quickstart.yaml")
    built = {n: models.build_from_config(n, cfg.train) for n in MODEL_NAMES}
    specs = {n: models.model_spec(n, cfg.train) for n in MODEL_NAMES}
    bundle_lib.save_bundle(folder, built, specs, cfg.to_dict(), extra={"bench": "random weights"})
    save_thresholds(folder, seed_like_thresholds(built, specs, image_paths[:64]))
    return folder


class Load:
    """``clients`` threads posting images to ``url`` until stopped; per-request outcome records."""

    def __init__(self, url: str, images: list[tuple[str, bytes]], clients: int, per_request: int = 1):
        self.url, self.images, self.clients, self.per_request = url, images, clients, per_request
        self.records: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _client(self, k: int) -> None:
        import requests

        session = requests.Session()
        i = k * self.per_request
        while not self._stop.is_set():
            group = [self.images[(i + j) % len(self.images)] for j in range(self.per_request)]
            i += self.clients * self.per_request
            if self.per_request == 1:
                (name, data), url, body = group[0], self.url, None
            else:  # the batch form: several images in one request
                name, data, url = None, None, self.url + "/batch"
                body = {"images": [{"id": n, "jpeg_b64": base64.b64encode(d).decode()} for n, d in group]}
            t0 = time.perf_counter()
            tries, status, error = 0, None, ""
            while time.perf_counter() - t0 < RETRY_FOR_S:
                tries += 1
                try:
                    if body is None:
                        r = session.post(url, params={"id": name}, data=data, timeout=120)
                    else:
                        r = session.post(url, json=body, timeout=120)
                    status = r.status_code
                    if status not in RETRY_STATUSES:
                        break
                    error = r.text[:200]
                except requests.RequestException as e:
                    status, error = None, repr(e)[:200]
                    session = requests.Session()
                time.sleep(0.5)
            rec = {"t": t0, "latency": time.perf_counter() - t0, "status": status, "tries": tries,
                   "error": "" if status == 200 else error}
            with self._lock:
                self.records.append(rec)

    def run(self, seconds: float, during=None) -> dict:
        threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(self.clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        if during is not None:
            during()
        time.sleep(max(0.0, seconds - (time.time() - t0)))
        self._stop.set()
        for t in threads:
            t.join(timeout=180)
        wall = time.time() - t0
        ok = [r for r in self.records if r["status"] == 200]
        lat = np.array([r["latency"] for r in ok]) * 1000
        failed = [r for r in self.records if r["status"] != 200]
        return {
            "clients": self.clients, "images_per_request": self.per_request, "seconds": round(wall, 1),
            "requests": len(self.records), "ok": len(ok),
            "failed": len(failed), "failed_examples": [(r["status"], r["error"]) for r in failed[:3]],
            "retried": sum(1 for r in self.records if r["tries"] > 1),
            "images_per_s": round(len(ok) * self.per_request / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        }


# Where the CPU goes: processes of this run by role (the bench process is the clients).
ROLES = (("ProxyActor", "http proxy"), ("ServeReplica", "replica"), ("ServeController", "serve controller"),
         ("raylet", "ray core"), ("gcs_server", "ray core"), ("dashboard", "ray core"), ("log_monitor", "ray core"),
         ("ray::", "other ray workers"))


def _proc_cpu() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command line, CPU seconds so far), from /proc (Linux); {} elsewhere."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry.name)] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    if not os.path.exists("/proc/stat"):
        return 0, 0
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:8]]
    return sum(v) - v[3] - v[4], sum(v)


class CpuMeter:
    """CPU seconds spent between ``start()`` and ``stop()`` by this run's processes, by role (clients =
    this process, http proxy, replica, ray core, ...), and by everything else on the machine."""

    def start(self) -> "CpuMeter":
        self.before, self.machine = _proc_cpu(), _machine_cpu()
        return self

    def stop(self, requests: int) -> dict:
        after, (busy1, total1) = _proc_cpu(), _machine_cpu()
        me = os.getpid()

        def role(pid: int) -> str:
            if pid == me:
                return "clients"
            cmd, p = after[pid][1], pid
            while p > 1 and p in after and p != me:
                p = after[p][0]
            if p != me:
                return "not this run"
            return next((name for key, name in ROLES if key in cmd), "other")

        cpu: dict[str, float] = {}
        for pid, (_, cmd, t) in after.items():
            r = role(pid)
            cpu[r] = cpu.get(r, 0.0) + t - self.before.get(pid, (0, cmd, 0.0))[2]
        busy0, total0 = self.machine
        out = {"machine_busy": round((busy1 - busy0) / max(1, total1 - total0), 3)}
        out["cpu_ms_per_request"] = {k: round(1000 * v / max(1, requests), 2)
                                     for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0}
        out["cpu_ms_per_request_this_run"] = round(sum(v for k, v in cpu.items() if k != "not this run")
                                                   * 1000 / max(1, requests), 2)
        return out


def kill_replica(app: str, deployment: str) -> str:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    if not names:
        raise RuntimeError(f"no replica actor named {prefix}*")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def batch_baseline(bundle: str, work: str, score_cfg) -> dict:
    """Batch scoring (steel.score.run.score) of the images in ``work``; its steady-state and end-to-end images/s."""
    from steel.core.config import ScoreConfig
    from steel.score import run as scoring

    # Steady state: images of every shard after the first, over the time between the first and the
    # last shard written (from steel.score.run's "shard ... written" log lines); excludes Ray Data's
    # start, the actor's start and the model load, which the end-to-end rate includes.
    written: list[tuple[float, int]] = []

    class ShardTimes(logging.Handler):
        def emit(self, record):
            if record.msg.startswith("shard %s written"):
                written.append((record.created, int(record.args[1])))

    slog = logging.getLogger("steel.score.run")
    handler, level = ShardTimes(), slog.level
    slog.addHandler(handler)
    slog.setLevel(logging.INFO)
    busy0, total0 = _machine_cpu()
    try:
        summary = scoring.score(bundle, os.path.join(work, "images"), os.path.join(work, "scores"),
                                ScoreConfig(actors=score_cfg.actors, batch_size=score_cfg.batch_size,
                                            images_per_shard=score_cfg.images_per_shard))
    finally:
        slog.removeHandler(handler)
        slog.setLevel(level)
    span = written[-1][0] - written[0][0] if len(written) > 1 else 0
    batch_ips = round(sum(n for _, n in written[1:]) / span, 2) if span > 0 else summary["timings"]["images_per_s"]
    busy1, total1 = _machine_cpu()
    out = {"steady_images_per_s": batch_ips, "end_to_end_images_per_s": summary["timings"]["images_per_s"],
           "images": summary["scored"], "score_s": summary["timings"]["score_s"],
           "shards": len(written), "steady_span_s": round(span, 2),
           "actors": score_cfg.actors, "batch_size": score_cfg.batch_size,
           "machine_busy": round((busy1 - busy0) / max(1, total1 - total0), 3)}
    print(f"batch scoring: {batch_ips} images/s steady state, {summary['timings']['images_per_s']} end to end "
          f"({summary['scored']} images in {summary['timings']['score_s']} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", help="bundle URI (default: quickstart architecture, random weights)")
    parser.add_argument("--images", type=int, default=384, help="synthetic images (batch baseline and load)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--kill-seconds", type=float, default=40.0, help="0: skip the replica-kill phase")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-s", type=float, default=0.01)
    parser.add_argument("--images-per-request", type=int, default=1,
                        help="1: POST /score; more: the batch form POST /score/batch (load phase only)")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    parser.add_argument("--no-batch", action="store_true", help="skip the batch baseline (profiling the endpoint)")
    parser.add_argument("--access-log", action="store_true", help="serve.access_log: a log line per request")
    args = parser.parse_args(argv)

    import steel.core.keras_env  # noqa: F401  (Keras variables before TensorFlow)
    from bench.bench_score import make_images
    from steel.core.config import ScoreConfig, ServeConfig, load_config
    from steel.serve import app as serving

    work = tempfile.mkdtemp(prefix="bench-serve-")
    paths = make_images(os.path.join(work, "images"), args.images)
    t0 = time.time()
    bundle = args.bundle or quickstart_bundle(os.path.join(work, "bundle"), paths)
    build_s = time.time() - t0
    port = args.port
    if not port:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    score_cfg = load_config("configs/quickstart.yaml").score
    serve_cfg = ServeConfig(port=port, max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_s,
                            access_log=args.access_log)
    images = [(os.path.basename(p), open(p, "rb").read()) for p in paths]
    out: dict = {"bundle": bundle, "bundle_built_s": round(build_s, 1), "images": args.images,
                 "cpus": os.cpu_count(), "serve": {"max_batch_size": args.max_batch_size,
                                                    "batch_wait_timeout_s": args.batch_wait_s, "replicas": 1,
                                                    "access_log": args.access_log}}
    import ray
    import requests

    from steel.core.keras_env import runtime_env
    from steel.core.ray_session import local_cpus

    # log_to_driver=False: the replica's access log (one line per request) would drown the output
    ray.init(num_cpus=local_cpus(), include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    try:
        from ray import serve

        if args.no_batch:
            batch_ips = None
        else:
            out["batch"] = batch_baseline(bundle, work, score_cfg)
            batch_ips = out["batch"]["steady_images_per_s"]
        try:
            serving.start(serve_cfg)
            t0 = time.time()
            serving.run(serving.build_app(bundle, ScoreConfig(), serve_cfg), serve_cfg)
            out["serve"]["deploy_s"] = round(time.time() - t0, 1)
            url = f"http://127.0.0.1:{port}/score"
            Load(url, images[:8], 2).run(3)  # warm the proxy and the batch path; not measured
            ready = f"http://127.0.0.1:{port}/ready"
            before = requests.get(ready, timeout=60).json()
            meter = CpuMeter().start()
            load = Load(url, images, args.clients, args.images_per_request).run(args.seconds)
            load["cpu"] = meter.stop(load["ok"])
            after = requests.get(ready, timeout=60).json()
            batches = after["batches"] - before["batches"]
            load["mean_batch_size"] = round((after["images"] - before["images"]) / batches, 2) if batches else None
            # Replica-side wall time: decoding (worker threads, concurrent) and cascade calls (one at a time).
            decoded = after["decoded"] - before["decoded"]
            score_s = after["score_s"] - before["score_s"]
            load["replica"] = {
                "decode_ms_per_image": round(1000 * (after["decode_s"] - before["decode_s"]) / decoded, 2) if decoded else None,
                "cascade_ms_per_batch": round(1000 * score_s / batches, 2) if batches else None,
                "cascade_busy": round(score_s / load["seconds"], 3)}
            load["ratio_to_batch"] = round(load["images_per_s"] / batch_ips, 3) if batch_ips else None
            load["p99_over_p50"] = round(load["p99_ms"] / load["p50_ms"], 2) if load["p50_ms"] else None
            out["load"] = load
            print("load:", json.dumps(load), flush=True)
            if args.kill_seconds > 0:
                killed = {}

                def kill():
                    time.sleep(args.kill_seconds / 3)
                    killed["at_s"] = round(args.kill_seconds / 3, 1)
                    killed["replica"] = kill_replica(serve_cfg.app_name, serving.DEPLOYMENT)

                k = Load(url, images, args.clients).run(args.kill_seconds, during=kill)
                out["replica_killed"] = {**k, **killed}
                print("replica killed:", json.dumps(out["replica_killed"]), flush=True)
        finally:
            serve.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # images, bundle and scores of this run
    load = out.get("load", {})
    out["targets"] = {
        "throughput_ratio>=0.8": load.get("ratio_to_batch") is not None and load["ratio_to_batch"] >= 0.8,
        "p99<=3x_p50": load.get("p99_over_p50") is not None and load["p99_over_p50"] <= 3,
        "no_failed_requests": load.get("failed") == 0,
        "kill:no_lost_request": out.get("replica_killed", {}).get("failed") == 0 if args.kill_seconds > 0 else None,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
