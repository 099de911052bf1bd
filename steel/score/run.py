"""Batch scoring on Ray Data: images URI -> decode -> gated cascade (actor pool) -> submission shards.

:func:`score` lists every file under the images URI, works out which images no complete shard holds
yet (see :mod:`steel.score.io` for ids, shard names, resume and the nightly/incremental mode), and
streams only those through a Ray Data pipeline::

    from_items(pending files)                         one row per file (shard, ImageId, path)
      .map_batches(decode_batch)                      CPU tasks: bytes -> uint8 256x1600x3, or an error reason
      .map_batches(CascadeActor, ActorPoolStrategy)   models loaded once per actor; gated cascade
      .iter_batches()                                 driver: group rows by shard; write each shard
                                                      atomically the moment all its images are in

A shard is written only when every one of its images has a result, errors file first, rows file
next and its index file last, so a killed run leaves only complete shards and a re-run scores only
the rest. A run holds the output's lease (:mod:`steel.score.lease`) from start to end, removes ``_SUCCESS``
before writing anything, and at the end writes ``<out>/runs/<run_id>.json`` (its record),
``<out>/manifest.json`` (the last run's settings and totals) and - only when no image failed
transiently - ``<out>/_SUCCESS``.

Bad input never stops the job: files that are empty, not images, truncated, of another format or
colour mode, or of the wrong size get a row in ``<out>/errors/<shard>.csv`` (ImageId, file, reason,
kind=decode). Everything else that fails (storage, network, predictor, OOM) is transient: retried
with backoff, and if it still fails the image is not recorded (the next run scores it) and the run
reports a problem. The counts add up: images in = scored + errors + transient failures.

Test hooks (:mod:`steel.core.faults`): ``STEEL_SCORE_FAIL_AFTER_SHARDS=N`` makes the run raise after
writing N shards; ``STEEL_SCORE_PAUSE_AT`` pauses it at a named point so a test can SIGKILL it there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections import Counter
from typing import Any, Callable

from steel.core import faults, s3, storage
from steel.core.config import ScoreConfig, check_section
from steel.core.names import CLASSES, IMAGE_FORMATS
from steel.core.retry import policy as retry_policy
from steel.core.retry import retry
from steel.model import bundle as bundle_lib
from steel.model import thresholds as th
from steel.model.predictor import BundleCascade
from steel.score import io as score_io
from steel.score import listing as listing_lib
from steel.score.lease import Lease, LeaseHeld, LeaseLost
from steel.score.stages import add_stats, batch_result, cascade_dataset

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def score(bundle_uri: str, images_uri: str, out_uri: str, score_cfg: ScoreConfig | None = None,
          thresholds: dict | str | None = None, *, predictor: Callable[..., Callable[[], Any]] = BundleCascade,
          ray_address: str | None = None, expect_new: bool | None = None) -> dict:
    """Score every not-yet-scored image under ``images_uri`` with the bundle's cascade into ``out_uri``.

    Args:
        bundle_uri: a model bundle folder (``manifest.json``, weights, ``thresholds.json``) or a
            versioned bundle root (``CURRENT`` pointer + ``versions/``, see :mod:`steel.model.bundle`),
            resolved once at the start: the whole run uses one version.
        images_uri: folder or S3 prefix; every file under it (recursively) is an input
            (only date partitions on or after ``score.since`` when that is set).
        out_uri: output folder: ``shards/``, ``errors/``, ``index/``, ``runs/``, ``manifest.json``,
            ``_SUCCESS``, and ``_LOCK`` while a run holds it.
        score_cfg: :class:`steel.core.config.ScoreConfig`; default values if None.
        thresholds: a thresholds mapping or URI; default the bundle's ``thresholds.json``, else
            the seed's defaults. The values used are recorded in the manifest.
        predictor: the factory class each actor's predictor comes from, called as
            ``predictor(bundle folder, thresholds, tta, endpoint=, threads=)``; its instance is
            picklable and builds an object with ``predict(images)`` (and ``stats``) once per actor.
            Default :class:`steel.model.predictor.BundleCascade`.
        ray_address: Ray to start or join when this process has not initialised Ray yet.
        expect_new: no new images is a problem (default ``score.expect_new``).

    Takes the output's lease (:class:`steel.score.lease.LeaseHeld` if another run holds it), removes
    ``_SUCCESS``, scores, writes the run record ``runs/<run_id>.json`` and writes ``_SUCCESS`` only
    when no transient failure is left. Returns the summary (also the run record): ``images_listed``,
    ``images_already_scored``, ``images_in`` (new this run) = ``scored`` + ``errors`` (permanent) +
    ``transient_failures``, ``problems`` (reasons the run must exit non-zero; empty when fine) ...
    """
    cfg = check_section(score_cfg or ScoreConfig(), "score")
    expect_new = cfg.expect_new if expect_new is None else expect_new
    run_id = score_io.new_run_id()
    started_at, t_start = _now_iso(), time.time()
    resolved = bundle_lib.resolve_bundle(bundle_uri)
    bundle = bundle_lib.provenance(resolved.uri, resolved.version)
    used_thresholds = th.resolve(resolved.uri, thresholds)
    formats = tuple(getattr(cfg, "image_formats", None) or IMAGE_FORMATS)
    tuned_tta = used_thresholds.get("tta", "none")
    if cfg.tta is None:  # not chosen: score with the TTA the thresholds were tuned for
        cfg = dataclasses.replace(cfg, tta=tuned_tta)
    if tuned_tta != cfg.tta:
        log.warning("scoring with tta=%s but the thresholds were tuned with tta=%s (set score.tta / --tta %s "
                    "to match)", cfg.tta, tuned_tta, tuned_tta)

    def call(fn, what=""):
        """``fn()`` with each of its storage requests retried ``score.retries`` times (one at a time)."""
        try:
            with retry_policy(cfg.retries, cfg.retry_backoff_s):
                return fn()
        except Exception as e:  # noqa: BLE001 - re-raised, saying what the run was doing
            if what:
                e.add_note(f"(while {what})")
            raise

    lease = Lease(out_uri, run_id, ttl_s=cfg.lock_ttl_s, retries=cfg.retries, backoff_s=cfg.retry_backoff_s)
    call_lease = dict(retries=cfg.retries, backoff_s=cfg.retry_backoff_s, what="taking the lease")
    retry(lease.acquire, permanent=(LeaseHeld, ValueError), **call_lease)
    record = {"run_id": run_id, "started_at": started_at, "host": socket.gethostname(),
              "images_uri": str(images_uri), "out": str(out_uri), "since": cfg.since, "bundle": bundle,
              "status": "running"}
    try:
        if lease.took_over:
            record["took_over_from"] = lease.took_over
        # Nothing of this run is written before this: the output no longer looks finished.
        call(lambda: storage.delete(storage.join(out_uri, score_io.SUCCESS), missing_ok=True), "removing _SUCCESS")
        summary = _score_locked(record, resolved, bundle, used_thresholds, images_uri, out_uri, cfg, formats,
                                predictor, ray_address, expect_new, lease, call, t_start)
        return summary
    except BaseException as e:
        record.update(status="failed", ended_at=_now_iso(), error=f"{type(e).__name__}: {e}"[:2000])
        try:
            storage.write_text(score_io.run_record_uri(out_uri, run_id), json.dumps(record, indent=1, default=str))
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    finally:
        lease.release()


def _score_locked(record, resolved, bundle, used_thresholds, images_uri, out_uri, cfg, formats,
                  predictor, ray_address, expect_new, lease, call, t_start) -> dict:
    listing = call(lambda: listing_lib.list_inputs(
        images_uri, exclude=out_uri, since=cfg.since, lookback_days=cfg.since_lookback_days if cfg.since else 0,
        settle_s=cfg.settle_s), "listing inputs")
    faults.pause_point("listed")
    previous = call(lambda: score_io.read_manifest(out_uri), "reading the manifest")
    done, owner = score_io.done_images(out_uri, previous, retry_call=lambda fn: call(fn, "reading the index"))
    for name, entry in done.items():  # shards a killed run (or older code) left without an index file
        if entry.get("recovered") or entry.get("legacy"):
            lease.fence()
            call(lambda: score_io.write_index(out_uri, name, {k: v for k, v in entry.items()
                                                              if k not in ("recovered", "legacy", "ignored")}),
                 "writing an index")
    # What an earlier run left pending is retried whatever `since` lists now (a transient failure last
    # night, a file that was still settling); a file it listed that is gone now drops out at reading.
    carried = {i: u for i, u in call(lambda: score_io.carried_pending(out_uri), "reading the pending images").items()
               if i not in owner and i not in listing.inputs}
    inputs = dict(sorted({**listing.inputs, **carried}.items()))
    pending = [i for i in inputs if i not in owner]
    plan = score_io.plan_shards(pending, cfg.images_per_shard)
    t_listed = time.time()
    if not inputs and not done and not cfg.since:
        raise ValueError(f"{images_uri}: no files to score")
    log.info("%d files under %s%s: %d already in complete shards, %d to score in %d shards (run %s, bundle %s)",
             len(inputs), images_uri, f" since {cfg.since}" if cfg.since else "", len(inputs) - len(pending),
             len(pending), len(plan), record["run_id"], bundle.get("version"))

    written: dict[str, dict] = {}
    gone: set[str] = set()
    settling: dict[str, str] = {}
    gating: dict = {}
    error_reasons: Counter = Counter()
    error_examples: list[dict] = []
    failures: dict[str, str] = {}
    defects: Counter = Counter()
    if plan:
        factory = predictor(
            str(resolved.uri), used_thresholds, cfg.tta, endpoint=s3.current_endpoint(),
            threads=(max(1, (os.cpu_count() or 1) // cfg.actors) if cfg.gpus_per_actor == 0 and cfg.actors > 1
                     else None), weights={n: m.get("sha256") for n, m in bundle.get("models", {}).items()})
        from steel.core.ray_session import ensure_ray

        ensure_ray(ray_address)  # no-op when the caller (a job, the pipeline, a test) already started Ray
        if cfg.gpus_per_actor > 0:  # fail before any work when the GPU nodes' TensorFlow sees no GPU
            from steel.core.devices import check_ray_gpus

            check_ray_gpus("score.gpus_per_actor > 0", cfg.gpus_per_actor)
        extra = {"bundle_version": str(resolved.version), "scored_at": record["started_at"]}
        index_extra = {"run_id": record["run_id"], "bundle_version": str(resolved.version),
                       "written_at": record["started_at"]}
        for entry in _run_pipeline(plan, inputs, listing.young, out_uri, cfg, formats, factory, gating, extra,
                                   index_extra, lease, call, failures, settling, gone):
            written[entry["name"]] = entry
            for k, n in entry.pop("defects").items():
                defects[k] += n
            for err in entry.pop("error_rows"):
                error_reasons[_reason_kind(err["reason"])] += 1
                if len(error_examples) < 20:
                    error_examples.append(err)
    t_scored = time.time()
    lease.fence()
    call(lambda: score_io.remove_orphan_errors(out_uri, set(done) | set(written)), "removing orphan errors")

    scored = sum(e["scored"] for e in written.values())
    errors = sum(e["errors"] for e in written.values())
    left = len(failures) + len(settling) + len(gone)
    if scored + errors + left != len(pending):  # guard: every pending image is accounted for
        raise RuntimeError(f"internal error: {len(pending)} images pending but {scored} scored + {errors} errors "
                           f"+ {len(failures)} transient failures + {len(settling)} settling + {len(gone)} gone")
    still_pending = {i: inputs[i] for i in sorted({*failures, *settling})}
    score_seconds = t_scored - t_listed
    summary = {
        **record,
        "images_listed": len(inputs),
        "images_already_scored": len(inputs) - len(pending),
        "images_in": len(pending),
        "scored": scored,
        "errors": errors,
        "transient_failures": len(failures),
        "images_gone": len(gone),
        "images_carried_over": len(carried),
        "images_settling": len(settling),
        "settling_examples": [{"ImageId": k, "reason": v} for k, v in sorted(settling.items())[:20]],
        "unplaced": len(listing.unplaced),
        "unplaced_examples": listing.unplaced[:20],
        "partitions": listing.partitions,
        "duplicates_ignored": sum(len(e.get("ignored", ())) for e in done.values()),
        "pending": still_pending,
        "shards_written": len(written),
        "shards_skipped": len(done),
        "error_reasons": dict(error_reasons),
        "error_examples": error_examples,
        "transient_reasons": dict(Counter(_reason_kind(r) for r in failures.values())),
        "transient_examples": [{"ImageId": k, "reason": v} for k, v in sorted(failures.items())[:20]],
        "defect_image_rate": {str(k): round(defects[k] / scored, 6) if scored else None for k in CLASSES},
        "defect_images": {str(k): defects[k] for k in CLASSES},
        "gating": gating,
        "timings": {
            "list_s": round(t_listed - t_start, 3),
            "score_s": round(score_seconds, 3),
            "total_s": round(time.time() - t_start, 3),
            "images_per_s": round(len(pending) / score_seconds, 3) if pending and score_seconds > 0 else None,
        },
    }
    summary["problems"] = exit_problems(summary, cfg, expect_new)
    summary["status"] = "incomplete" if failures or listing.unplaced else ("problems" if summary["problems"] else "ok")
    summary["ended_at"] = _now_iso()
    lease.fence()
    call(lambda: storage.write_text(score_io.run_record_uri(out_uri, record["run_id"]),
                                    json.dumps(summary, indent=1, default=str) + "\n"), "writing the run record")
    call(lambda: _write_manifest(out_uri, done, written, summary, bundle, used_thresholds, cfg, formats),
         "writing the manifest")
    faults.pause_point("before_success")
    if not failures and not listing.unplaced:  # every listed input has its rows or a permanent error row
        lease.fence()
        call(lambda: storage.write_text(storage.join(out_uri, score_io.SUCCESS), record["run_id"] + "\n"),
             "writing _SUCCESS")
    return summary


def exit_problems(summary: dict, cfg: ScoreConfig, expect_new: bool = False) -> list[str]:
    """Why a finished run must exit non-zero (empty list: it must not). One line per rule."""
    problems = []
    n_in = summary["images_in"]
    if summary.get("transient_failures"):
        reasons = ", ".join(f"{k} x{v}" for k, v in sorted(summary.get("transient_reasons", {}).items()))
        problems.append(f"{summary['transient_failures']} images failed after {cfg.retries} retries and were not "
                        f"recorded (the next run scores them): {reasons}")
    if n_in and summary["scored"] == 0 and summary["errors"]:
        problems.append("no image could be scored")
    if n_in and summary["errors"] / n_in > cfg.max_error_rate:
        problems.append(f"permanent-error rate {summary['errors'] / n_in:.1%} ({summary['errors']}/{n_in}) is above "
                        f"score.max_error_rate {cfg.max_error_rate:.1%}")
    if summary.get("unplaced"):
        examples = ", ".join(summary.get("unplaced_examples", [])[:3])
        problems.append(f"{summary['unplaced']} entries under {summary['images_uri']} are not in a date partition "
                        f"(dt=/date=YYYY-MM-DD, YYYY-MM-DD or YYYY/MM/DD) and were not scored with since {cfg.since}: "
                        f"{examples}")
    if expect_new and n_in == 0:
        problems.append(f"no new images under {summary['images_uri']}"
                        + (f" since {cfg.since}" if cfg.since else "") + " (--expect-new): is the camera feed stopped?")
    return problems


def _reason_kind(reason: str) -> str:
    """Short category of an error reason for the summary ("wrong size", "empty file", ...)."""
    return reason.split(":")[0].split("(")[0].strip()


def _write_manifest(out_uri, done, written, summary, bundle, used_thresholds, cfg, formats) -> None:
    """``manifest.json``: the last run's settings and counts (fixed size: which images are done lives in
    the per-shard index files, the history in ``runs/``)."""
    entries = list(done.values()) + list(written.values())
    manifest = {
        "kind": "steel-scores",
        "format_version": 2,
        "run_id": summary["run_id"],
        "finished_at": _now_iso(),
        "bundle": bundle,
        "images_uri": summary["images_uri"],
        "thresholds": used_thresholds,
        "settings": {"format": cfg.format, "tta": cfg.tta, "allow_resize": cfg.allow_resize,
                     "images_per_shard": cfg.images_per_shard, "batch_size": cfg.batch_size,
                     "actors": cfg.actors, "gpus_per_actor": cfg.gpus_per_actor, "image_formats": list(formats),
                     "since": cfg.since},
        "counts": {k: summary[k] for k in ("images_listed", "images_already_scored", "images_in", "scored",
                                           "errors", "transient_failures", "shards_written", "shards_skipped")},
        "totals": {"shards": len(entries), "images": sum(len(s["images"]) - len(s.get("ignored", ())) for s in entries),
                   "scored": sum(s["scored"] for s in entries), "errors": sum(s["errors"] for s in entries)},
        "error_reasons": summary["error_reasons"],
        "gating": summary["gating"],
        "timings": summary["timings"],
    }
    storage.write_text(storage.join(out_uri, score_io.MANIFEST), json.dumps(manifest, indent=1, default=str) + "\n")


def _run_pipeline(plan, inputs, young, out_uri, cfg, formats, factory, gating, extra, index_extra, lease,
                  call, failures, settling, gone):
    """Stream the planned shards through Ray Data; yields each shard's entry once written.

    Images left without a result go into ``failures`` (transient: ImageId -> reason), ``settling``
    (young files that did not decode yet) or ``gone`` (deleted since the listing); their shard is
    written without them. A shard whose write still fails after retries counts all its images as
    failures. Each shard is committed behind the lease's fence."""
    items = [{"shard": shard.name, "image_id": image_id, "file": inputs[image_id], "young": image_id in young}
             for shard in plan for image_id in shard.image_ids]
    ds = cascade_dataset(items, cfg, formats, factory)

    open_shards = {s.name: score_io.ShardResult(s.name, s.image_ids) for s in plan}
    fail_after = faults.fail_after_shards()
    n_written = n_rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["image_id"])):
            if batch["stats"][i]:
                add_stats(gating, json.loads(batch["stats"][i]))
            name = str(batch["shard"][i])
            shard = open_shards.get(name)
            if shard is None:
                raise RuntimeError(f"internal error: a result for shard {name} after it was written")
            image_id = str(batch["image_id"][i])
            n_rows += 1
            if n_rows == 2:
                faults.pause_point("mid_shard")
            kind = str(batch["error_kind"][i])
            if batch["error"][i] and kind in score_io.LEFT_KINDS:
                shard.add_left(image_id, kind, str(batch["error"][i]))
            elif batch["error"][i]:
                shard.add_error(image_id, str(batch["file"][i]), str(batch["error"][i]),
                                kind=str(batch["error_kind"][i]) or "decode")
            else:
                shard.add_scored(image_id, batch_result(batch, i), extra)
            if not shard.settled:
                continue
            del open_shards[name]
            gone.update(shard.left_as("gone"))
            settling.update(shard.left_as("settling"))
            if not shard.complete:
                failures.update(shard.failed)
                if shard.failed:
                    log.warning("shard %s: %d of its %d images failed transiently (e.g. %s: %s); they stay pending",
                                name, len(shard.failed), len(shard.image_ids), *next(iter(shard.failed.items())))
                shard = shard.recorded_part()
                if shard is None:
                    continue
                name = shard.name
            try:
                lease.check()
                entry = call(lambda: shard.write(out_uri, cfg.format, index_extra, before_commit=lease.fence,
                                                 between=lambda: faults.pause_point("shard_written")),
                             f"writing shard {name}")
            except Exception as e:  # noqa: BLE001 - lease lost is re-raised; storage faults fail the shard
                if isinstance(e, LeaseLost):
                    raise
                failures.update({i: f"could not write the shard: {type(e).__name__}: {e}" for i in shard.image_ids})
                log.error("shard %s not written after %d retries: %s", name, cfg.retries, e)
                continue
            n_written += 1
            log.info("shard %s written: %d images (%d scored, %d errors) [%d/%d]", name,
                     len(shard.image_ids), entry["scored"], entry["errors"], n_written, len(plan))
            defects = Counter(r["ClassId"] for r in shard.rows if r["EncodedPixels"])
            yield {"name": name, **entry, "error_rows": shard.errors, "defects": defects}
            if fail_after is not None and n_written >= fail_after:
                raise RuntimeError(f"injected failure after {n_written} shards ({faults.SCORE_FAIL_AFTER_ENV})")
    if open_shards:
        missing = {n: len(s.image_ids) - len(s.seen) - len(s.left) for n, s in open_shards.items()}
        raise RuntimeError(f"scoring ended with incomplete shards (images missing per shard): {missing}")




def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    t = summary["timings"]
    lines = [
        f"scored {summary['images_in']} images from {summary['images_uri']}: {summary['scored']} scored, "
        f"{summary['errors']} errors ({summary['images_listed']} listed, {summary['images_already_scored']} "
        f"already scored in {summary['shards_skipped']} complete shards)",
        f"shards written: {summary['shards_written']} -> {summary['out']} (run {summary.get('run_id')}, "
        f"bundle version {(summary.get('bundle') or {}).get('version')})",
        f"time: {t['total_s']:.1f} s" + (f" ({t['images_per_s']:.2f} images/s)" if t.get("images_per_s") else ""),
    ]
    g = summary.get("gating") or {}
    if g.get("images"):
        lines.append(f"gating: multilabel ran on {g.get('multilabel_calls', 0)}/{g['images']} images, "
                     f"segmenters on {g.get('seg_calls', 0)}/{4 * g['images']} image-classes "
                     f"({g.get('seg_calls_saved', 0)} saved)")
    if summary["errors"]:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(summary["error_reasons"].items())))
        for e in summary["error_examples"][:5]:
            lines.append(f"  {e['file']}: {e['reason']}")
    if summary.get("transient_failures"):
        lines.append(f"transient failures (not recorded; the next run retries them): {summary['transient_failures']} "
                     + ", ".join(f"{k} x{v}" for k, v in sorted(summary["transient_reasons"].items())))
        for e in summary["transient_examples"][:5]:
            lines.append(f"  {e['ImageId']}: {e['reason']}")
    if summary.get("images_settling"):
        lines.append(f"settling (written less than score.settle_s ago and not decodable yet; the next run scores "
                     f"them): {summary['images_settling']}")
    if summary.get("images_carried_over"):
        lines.append(f"carried over from earlier runs (left pending there): {summary['images_carried_over']}")
    if summary.get("images_gone"):
        lines.append(f"deleted since the listing (no rows): {summary['images_gone']}")
    if summary.get("duplicates_ignored"):
        lines.append(f"images in two shards (each counted once, from the shard written first): "
                     f"{summary['duplicates_ignored']}")
    if summary.get("unplaced"):
        lines.append(f"not in a date partition, not scored with --since: {summary['unplaced']} (e.g. "
                     + ", ".join(summary["unplaced_examples"][:3]) + ")")
    return "\n".join(lines)


__all__ = ["score", "format_summary", "exit_problems"]
