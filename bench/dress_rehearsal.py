"""Full-size dress rehearsal: the seed's architectures at full resolution through every pipeline stage,
submitted with ``ray job submit`` to a Ray head this script starts on 127.0.0.1.

    .venv/bin/python -m bench.dress_rehearsal [--images 300] [--test-images 100] [--steps 2] [--epochs 1]
        [--out runs/rehearsal] [--config configs/severstal-seed.yaml] [--set KEY=VALUE ...]

1. Derives a config from ``configs/severstal-seed.yaml`` (Xception at 256x512, Unet-EfficientNetB1 at
   256x1600) overriding only what this machine needs (printed): local folders under ``--out``, a
   synthetic full-resolution set (``data.synth``), random init (no ImageNet download here), CPU
   workers, epochs and steps per epoch capped, CPU scoring actors.
2. Starts its own Ray head (``ray start --head --block`` in its own process group, 127.0.0.1 only).
3. ``ray job submit --working-dir <repo> -- python -m ray_jobs.pipeline --config <derived>``: data,
   split, train (6 models), tune, publish, score, evaluate, report.
4. Checks that every stage completed and that the scores hold a row for every test image, prints
   per-stage and per-model wall times and the load average during the run, writes them to
   ``<out>/rehearsal.json``, and stops the head by its process group (never ``ray stop``).

There is no baseline to divide by (DESIGN's ratio rule): this records how long each stage of the real
cascade takes at full size on this machine, and that nothing breaks there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("data", "split", "train", "tune", "publish", "score", "evaluate")
# Outputs of a previous rehearsal in --out that are cleared before a run, so every stage runs (the
# synthetic set is kept when it has the asked-for size: the data stage checks that itself).
FRESH = ("train", "bundle", "bundle-versions", "scores", "report")


def overrides(out: Path, images: int, test_images: int, steps: int, epochs: int,
              cpus_per_worker: int) -> list[str]:
    """``key=value`` overrides of the seed config for a CPU rehearsal writing under ``out``."""
    out = out.resolve()
    return [
        "name=severstal-seed-rehearsal",
        f"data.root={out / 'data'}",
        f"data.synth={{images: {images}, test_images: {test_images}, seed: 0}}",
        f"train.output={out / 'train'}",
        "train.use_gpu=false",
        f"train.cpus_per_worker={cpus_per_worker}",
        f"train.epochs={epochs}",
        f"train.max_steps_per_epoch={steps}",
        "train.classifier.encoder_weights=none",
        "train.segmenter.encoder_weights=none",
        f"bundle={out / 'bundle'}",
        f"bundle_versions={out / 'bundle-versions'}",
        f"score.images={out / 'data' / 'test_images'}",
        f"score.out={out / 'scores'}",
        "score.gpus_per_actor=0",
        f"report={out / 'report'}",
    ]


def derive_config(seed_config: Path, out: Path, images: int = 300, test_images: int = 100, steps: int = 2,
                  epochs: int = 1, cpus_per_worker: int = 1, extra: list[str] | None = None) -> tuple[dict, list[str]]:
    """The seed config with the rehearsal's overrides (then ``extra``) applied and checked.

    Returns the plain mapping to write as YAML and the overrides applied, for printing.
    """
    from steel.core.config import apply_overrides, config_from_dict

    sets = overrides(out, images, test_images, steps, epochs, cpus_per_worker) + list(extra or [])
    data = apply_overrides(yaml.safe_load(seed_config.read_text()), sets)
    config_from_dict(data)  # a bad override fails here, naming the key, before anything starts
    return data, sets


# -- the Ray head -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(num_cpus: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    """``ray start --head --block`` on 127.0.0.1 in its own process group; returns it and the job API URL."""
    from steel.core.keras_env import runtime_env

    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the jobs' `python`
           **runtime_env()["env_vars"],
           # On SIGTERM `ray start` first drains the node for up to 30 s (for Serve's proxies in a
           # cluster); this one-machine head has nothing to drain.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    temp = Path("/tmp") / f"rr{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths have a length limit
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={temp}",
             "--disable-usage-stats"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            stop_head(proc)  # its GCS/raylet may outlive it, in its process group
            raise RuntimeError(f"ray head exited with code {proc.returncode}; see {log_path}")
        with socket.socket() as s:  # the dashboard opens before the raylet has registered: wait for both
            if s.connect_ex(("127.0.0.1", dash)) == 0 and "Ray runtime started" in log_path.read_text(errors="replace"):
                return proc, f"http://127.0.0.1:{dash}"
        time.sleep(0.5)
    stop_head(proc)
    raise TimeoutError(f"ray head not started after 180 s; see {log_path}")


def start_head_retrying(num_cpus: int, log_path: Path, tries: int = 8) -> tuple[subprocess.Popen, str]:
    """``start_head``, again when it fails. On a loaded machine (load average ~100 here) the raylet
    exits when the dashboard agent has not written its port file within a hard-coded 15 s
    (``NodeManager::WaitForDashboardAgentPorts``, ray-project/ray#65983) and ``ray start`` reports
    only "The current node timed out during startup"; the next try often gets through."""
    for attempt in range(1, tries + 1):
        try:
            return start_head(num_cpus, log_path)
        except (RuntimeError, TimeoutError) as e:
            if attempt == tries:
                raise
            print(f"ray head: {e}; starting it again ({attempt}/{tries})", flush=True)
            time.sleep(5)


def stop_head(proc: subprocess.Popen) -> None:
    """Stop the head and its children (raylet, GCS, workers: one process group) by its pid.

    SIGTERM to ``ray start`` alone: it stops its children itself (a SIGTERM to the whole group kills
    them under it and it takes ~33 s to give up); the SIGKILL after takes whatever is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still alive
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=30)


# -- the job ----------------------------------------------------------------------------------------

def submit(address: str, config_path: Path, log_path: Path, timeout: float) -> int:
    """``ray job submit`` (waits, streaming the job's log to stdout and ``log_path``); its exit code."""
    from steel.core.keras_env import runtime_env

    env_json = json.dumps({**runtime_env(),
                           "excludes": [".venv", "runs", ".git", "**/__pycache__", "*.egg-info"]})
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", env_json, "--", "python", "-m", "ray_jobs.pipeline", "--config", str(config_path)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.exists():
        env["RAY_AUTH_MODE"] = "token"  # Ray 2.60's head turns token auth on when a token exists; the CLI sends it
    deadline = time.time() + timeout
    for attempt in range(30):  # the job agent starts a little after the dashboard port opens
        with open(log_path, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    start_new_session=True)
            try:
                for line in proc.stdout:
                    sys.stdout.write(line)
                    fh.write(line)
                    fh.flush()
                    if time.time() > deadline:
                        os.killpg(proc.pid, signal.SIGTERM)
                rc = proc.wait()
            finally:
                if proc.poll() is None:  # interrupted: stop our `ray job submit` (the head goes next)
                    os.killpg(proc.pid, signal.SIGTERM)
        if rc != 0 and "No available agent" in log_path.read_text() and attempt < 29:
            time.sleep(2)
            continue
        return rc
    return rc


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every ``every`` seconds until stopped."""

    def __init__(self, every: float = 15.0):
        super().__init__(daemon=True)
        self.every, self.samples, self._stop = every, [], threading.Event()

    def run(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        s = self.samples or [float("nan")]
        return {"min": min(s), "mean": sum(s) / len(s), "max": max(s), "samples": len(s)}


# -- checks and the record --------------------------------------------------------------------------

_STAGE_LINE = re.compile(r"^\[\s*(\w+)\] (done in (\d+)s|skipped \(already done\)): (.*)$")


def stage_times(log: str) -> dict[str, dict]:
    """The pipeline's own per-stage lines (``[   train] done in 123s: ...``) from the job log."""
    out = {}
    for line in log.splitlines():
        m = _STAGE_LINE.match(line.strip())
        if m and m.group(1) in STAGES:
            out[m.group(1)] = {"status": "ran" if m.group(3) else "skipped",
                               "seconds": int(m.group(3)) if m.group(3) else 0, "summary": m.group(4)}
    return out


_EPOCH_LINE = re.compile(r"\[(\w+)\] epoch (\d+)/\d+ ([\d.]+)s .*?train_seconds=([\d.]+)")


def epoch_times(log: str) -> dict[str, dict]:
    """Per model, its last epoch line: wall seconds (training + validation) and training seconds."""
    out = {}
    for m in _EPOCH_LINE.finditer(log):
        out[m.group(1)] = {"epoch": int(m.group(2)), "epoch_seconds": float(m.group(3)),
                           "train_seconds": float(m.group(4))}
    return out


def check(cfg: dict, log: str, test_images: int) -> tuple[dict, list[str]]:
    """What the run produced, and the problems found (empty: every stage completed and scored)."""
    import pandas as pd

    problems = []
    stages = stage_times(log)
    for name in STAGES:
        if name not in stages:
            problems.append(f"stage {name}: no completion line in the job log")
    bundle = json.loads(Path(cfg["bundle"], "manifest.json").read_text()) if Path(cfg["bundle"], "manifest.json").exists() else {}
    models = {n: {"params": m.get("params"), "seconds": m.get("training_seconds"),
                  "input": m.get("spec", {}).get("input_size"), "encoder": m.get("spec", {}).get("encoder")}
              for n, m in (bundle.get("models") or {}).items()}
    for n, e in epoch_times(log).items():
        models.setdefault(n, {}).update(e)
    missing = [n for n in cfg["train"]["models"] if n not in models]
    if missing:
        problems.append(f"bundle {cfg['bundle']}: models missing: {', '.join(missing)}")
    totals = {}
    manifest = Path(cfg["score"]["out"], "manifest.json")
    if manifest.exists():
        totals = json.loads(manifest.read_text())["totals"]
        if totals.get("images") != test_images or totals.get("scored", 0) + totals.get("errors", 0) != test_images:
            problems.append(f"scores: {totals} for {test_images} test images")
        if totals.get("errors"):
            problems.append(f"scores: {totals['errors']} error rows")
    else:
        problems.append(f"no scoring manifest at {manifest}")
    rows = None
    submission = Path(cfg["report"], "submission.csv")
    if submission.exists():
        sub = pd.read_csv(submission, keep_default_na=False)
        rows = len(sub)
        per_image = sub.groupby("ImageId").size()
        if len(per_image) != test_images or not (per_image == 4).all():
            problems.append(f"{submission}: {len(per_image)} images with 4 rows each expected {test_images}")
    else:
        problems.append(f"no merged submission at {submission}")
    dice = re.search(r"held-out mean Dice ([\d.]+) vs all-empty baseline ([\d.]+)", log)
    return {"stages": stages, "models": models, "score_totals": totals, "submission_rows": rows,
            "mean_dice": float(dice.group(1)) if dice else None,
            "baseline": float(dice.group(2)) if dice else None}, problems


def table(record: dict) -> str:
    lines = ["| stage | status | wall s |", "|---|---|---:|"]
    for name in STAGES:
        s = record["stages"].get(name)
        lines.append(f"| {name} | {s['status'] if s else 'MISSING'} | {s['seconds'] if s else '-'} |")
    lines.append(f"| **job total** | | **{record['job_seconds']:.0f}** |")
    lines += ["", "| model | encoder | input | params | fit wall s | last epoch s | of it training s |",
              "|---|---|---|---:|---:|---:|---:|"]

    def num(v):
        return "-" if v is None else f"{v:.0f}"

    for name, m in record["models"].items():
        size = "x".join(str(v) for v in m.get("input") or [])
        lines.append(f"| {name} | {m.get('encoder', '-')} | {size} | {m.get('params') or 0:,} | {num(m.get('seconds'))} "
                     f"| {num(m.get('epoch_seconds'))} | {num(m.get('train_seconds'))} |")
    load = record["load"]
    lines.append("")
    lines.append(f"load average (1 min) during the job: min {load['min']:.1f} / mean {load['mean']:.1f} / "
                 f"max {load['max']:.1f} ({load['samples']} samples)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dress_rehearsal", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "severstal-seed.yaml")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "rehearsal")
    p.add_argument("--images", type=int, default=300, help="synthetic labelled images (256x1600)")
    p.add_argument("--test-images", type=int, default=100, help="synthetic test images, scored at the end")
    p.add_argument("--steps", type=int, default=2, help="train.max_steps_per_epoch")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="one more override (repeatable), e.g. --set train.segmenter.per_worker_batch=4")
    p.add_argument("--resume", action="store_true",
                   help="keep the outputs of an earlier rehearsal in --out: finished stages are skipped")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: check <out>/job.log and the outputs again and rewrite the record")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds before the job is stopped")
    a = p.parse_args(argv)
    for name in ("images", "test_images", "steps", "epochs", "cpus_per_worker"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")

    from steel.core.config import config_from_dict
    from steel.core.ray_session import local_cpus

    out = a.out.resolve()
    data, sets = derive_config(a.config, out, a.images, a.test_images, a.steps, a.epochs, a.cpus_per_worker, a.extra)
    if a.report_only:
        return _report(out, data, a, json.loads((out / "rehearsal.json").read_text()))
    out.mkdir(parents=True, exist_ok=True)
    for name in () if a.resume else FRESH:
        shutil.rmtree(out / name, ignore_errors=True)
    config_path = out / "rehearsal.yaml"
    config_path.write_text(f"# {a.config} with these overrides (bench/dress_rehearsal.py):\n"
                           + "".join(f"#   {s}\n" for s in sets) + yaml.safe_dump(data, sort_keys=False))
    print(f"config: {config_path} = {a.config} with:\n" + "\n".join(f"  {s}" for s in sets), flush=True)

    cpus = local_cpus(config_from_dict(data))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops the head too (finally below)
    head, address = start_head_retrying(cpus, out / "head.log")
    print(f"ray head: {address} (pid {head.pid}, {cpus} logical CPUs)", flush=True)
    sampler = LoadSampler()
    sampler.start()
    t0 = time.time()
    try:
        rc = submit(address, config_path, out / "job.log", a.timeout)
    finally:
        job_seconds = time.time() - t0
        load = sampler.stop()
        stop_head(head)
    return _report(out, data, a, {"job_seconds": job_seconds, "load": load, "exit_code": rc, "overrides": sets,
                                  "finished_at": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())})


def _report(out: Path, data: dict, a, run: dict) -> int:
    """Check the outputs, write ``<out>/rehearsal.json`` and print the tables; 0 when all is well."""
    record, problems = check(data, (out / "job.log").read_text(), a.test_images)
    if run["exit_code"] != 0:
        problems.insert(0, f"ray job submit exited {run['exit_code']}; see {out / 'job.log'}")
    record.update({k: run[k] for k in ("job_seconds", "load", "exit_code", "overrides", "finished_at")},
                  problems=problems, images=a.images, test_images=a.test_images, steps=a.steps, epochs=a.epochs)
    (out / "rehearsal.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n" + table(record) if record["models"] or record["stages"] else "", flush=True)
    if problems:
        print("\nPROBLEMS:\n" + "\n".join(f"  - {x}" for x in problems), flush=True)
        return 1
    print(f"\nall {len(STAGES)} stages completed; {record['score_totals']['scored']} of {a.test_images} test "
          f"images scored; record: {out / 'rehearsal.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
