"""The whole product in one command: data -> split -> train -> tune -> score -> evaluate -> report.

Each stage checks whether its outputs already exist and are valid for this config, and skips its work
if so; a pipeline killed at any point and run again continues where it stopped (training resumes
from Ray Train checkpoints, scoring from finished shards). Every stage prints one summary line naming
where its outputs are.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from steel import storage
from steel.config import Config

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    name: str
    skipped: bool
    seconds: float
    summary: str
    outputs: dict = field(default_factory=dict)


def _say(result: StageResult) -> None:
    state = "skipped (already done)" if result.skipped else f"done in {result.seconds:.0f}s"
    print(f"[{result.name:>8}] {state}: {result.summary}", flush=True)


class Pipeline:
    """Runs the stages of one config; ``run()`` returns the final summary dict."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.results: list[StageResult] = []
        self.state: dict = {}

    # -- helpers ------------------------------------------------------------------------------
    def _stage(self, name, fn):
        t0 = time.time()
        skipped, summary, outputs = fn()
        result = StageResult(name, skipped, time.time() - t0, summary, outputs)
        self.results.append(result)
        _say(result)
        return result

    @property
    def truth_uri(self) -> str | None:
        uri = self.cfg.data.path("test_truth")
        return uri if storage.exists(uri) else None

    # -- stages -------------------------------------------------------------------------------
    def data(self):
        cfg = self.cfg.data
        csv, images = cfg.path("train_csv"), cfg.path("train_images")
        stale = self._stale_synth()
        if stale:
            print(f"[    data] {stale}: generating it again", flush=True)
        elif storage.exists(csv) and storage.list_files(images)[:1]:
            n = len(storage.list_files(images))
            return True, f"{n} training images in {cfg.root}", {"root": cfg.root}
        if cfg.synth is None:
            raise FileNotFoundError(
                f"no dataset at {cfg.root} (need {csv} and {images}/); point data.root at the Kaggle "
                "files, or set data.synth to generate a synthetic set"
            )
        from steel import synth

        summary = synth.generate(cfg.root, images=cfg.synth.images, test_images=cfg.synth.test_images,
                                 seed=cfg.synth.seed)
        return False, f"synthesised {cfg.synth.images} train + {cfg.synth.test_images} test images into {cfg.root}", {
            "root": cfg.root, "synth": summary}

    def _stale_synth(self) -> str | None:
        """Why the synthetic set at ``data.root`` is not the one ``data.synth`` asks for, or None.

        Only a folder ``steel synth`` wrote (its ``synth.json``) is ever regenerated; real data is not.
        """
        import json

        from steel.synth import MARKER

        cfg = self.cfg.data
        marker = storage.join(cfg.root, MARKER)
        if cfg.synth is None or not storage.exists(marker):
            return None
        try:
            made = json.loads(storage.read_text(marker))
        except ValueError:
            return f"{marker} is unreadable"
        if not made.get("complete"):
            return f"the synthetic set in {cfg.root} is incomplete (an interrupted run)"
        have = ((made.get("train") or {}).get("images"), (made.get("test") or {}).get("images"), made.get("seed"))
        want = (cfg.synth.images, cfg.synth.test_images, cfg.synth.seed)
        if have != want:
            return (f"{cfg.root} holds a synthetic set of {have[0]} + {have[1]} images (seed {have[2]}), "
                    f"data.synth asks for {want[0]} + {want[1]} (seed {want[2]})")
        return None

    def split(self):
        from steel import dataset

        cfg = self.cfg.data
        report = storage.join(self.cfg.report, "skipped_labels.csv") if cfg.skip_bad else None
        wide = dataset.load_labels(cfg.path("train_csv"), images=cfg.path("train_images"),
                                   skip_bad=cfg.skip_bad, report_uri=report)
        splits = dataset.split(wide, seed=cfg.seed)
        fp = dataset.fingerprint(splits)
        self.state["splits"] = splits
        counts = {k: len(v) for k, v in splits.items()}
        return False, (f"train {counts['train']} / val {counts['val']} / test {counts['test']} images "
                       f"(fingerprint {fp[:12]})"), {"counts": counts, "fingerprint": fp}

    def train(self):
        from steel import training

        results = training.train_models(self.cfg)
        trained = [m for m, r in results.items() if not _was_skipped(r)]
        skipped = len(trained) == 0
        summary = (f"{len(results)} models in bundle {self.cfg.bundle}"
                   + (f" (trained: {', '.join(trained)})" if trained else ""))
        return skipped, summary, {"bundle": self.cfg.bundle, "models": list(results)}

    def tune(self):
        from steel import bundle as bundle_lib

        existing = bundle_lib.read_thresholds(self.cfg.bundle)
        if not self.cfg.tune.enabled:
            return True, "disabled in config (default thresholds)", {}
        if self.cfg.tune.mode == "fixed":
            return self._fixed_thresholds(existing)
        if existing and existing.get("validation", {}).get("fingerprint") == self._bundle_stamp():
            v = existing["validation"]
            return True, (f"validation mean Dice {v.get('before', float('nan')):.4f} -> "
                          f"{v.get('after', float('nan')):.4f}; {storage.join(self.cfg.bundle, 'thresholds.json')}"), {}
        from steel import tuning

        result = tuning.tune(self.cfg, bundle_uri=self.cfg.bundle, stamp=self._bundle_stamp())
        return False, (f"validation mean Dice {result['before']:.4f} -> {result['after']:.4f}; "
                       f"{storage.join(self.cfg.bundle, 'thresholds.json')}"), result

    def _fixed_thresholds(self, existing: dict | None):
        """tune.mode fixed: the seed's hand-set thresholds (no search), checked on the validation split."""
        where = storage.join(self.cfg.bundle, "thresholds.json")
        source, v = (existing or {}).get("source"), (existing or {}).get("validation") or {}
        if isinstance(source, dict) and source.get("mode") == "fixed" and v.get("fingerprint") == self._bundle_stamp():
            return True, f"fixed thresholds; validation mean Dice {v.get('mean_dice', float('nan')):.4f}; {where}", {}
        from steel import tuning

        result = tuning.write_fixed(self.cfg, bundle_uri=self.cfg.bundle, stamp=self._bundle_stamp())
        return False, (f"fixed thresholds (areas from {result['source']['areas']}); validation mean Dice "
                       f"{result['validation']['mean_dice']:.4f}; {where}"), result

    def publish(self):
        """Publish the trained + tuned bundle as an immutable version and promote it (atomic pointer),
        so a nightly run never reads a bundle that training is rewriting."""
        if not self.cfg.bundle_versions:
            return True, "no bundle_versions root configured: scoring reads the bundle folder", {}
        from steel import bundle as bundle_lib

        before = None
        try:
            before = bundle_lib.resolve_bundle(self.cfg.bundle_versions).version
        except FileNotFoundError:
            pass
        published = bundle_lib.publish_bundle(self.cfg.bundle, self.cfg.bundle_versions)
        return published.version == before, f"{published.version} promoted in {self.cfg.bundle_versions}", {
            "version": published.version, "uri": published.uri}

    def score(self):
        from steel import scoring, score_io
        from steel import thresholds as th

        images = self.cfg.score.images or self.cfg.data.path("test_images")
        out = self.cfg.score.out
        previous = score_io.read_manifest(out)
        if previous is not None:
            bundle = scoring._bundle_info(self.cfg.bundle)
            current = th.load_thresholds(self.cfg.bundle) if storage.exists(
                storage.join(self.cfg.bundle, "thresholds.json")) else th.default_thresholds()
            same_models = previous.get("bundle", {}).get("models") == bundle.get("models")
            same_thresholds = _core(previous.get("thresholds")) == _core(current)
            if not (same_models and same_thresholds):
                what = "models" if not same_models else "thresholds"
                print(f"[   score] the bundle's {what} changed since {out} was scored: scoring again", flush=True)
                storage.delete(out, recursive=True, missing_ok=True)
        summary = scoring.score(self.cfg.bundle_versions or self.cfg.bundle, images, out, self.cfg.score)
        total = score_io.read_manifest(out)["totals"]
        self.state["score"] = summary
        return summary["shards_written"] == 0, (
            f"{total['images']} images: {total['scored']} scored, {total['errors']} errors "
            f"({summary['images_in']} new this run) -> {out}"), summary

    def evaluate(self):
        truth = self.truth_uri
        if truth is None:
            return True, "no truth for the scored images: evaluation skipped", {}
        from steel import eval_report, merge
        from steel.evaluate import evaluate

        submission = storage.join(self.cfg.report, "submission.csv")
        merge.merge(self.cfg.score.out, submission)
        result = evaluate(submission, truth)
        baseline, baseline_per_class = _all_empty_baseline(result)
        report = eval_report.write_report(result["pred"], result["truth"],
                                          self.cfg.score.images or self.cfg.data.path("test_images"),
                                          storage.join(self.cfg.report, "evaluation"))
        out = {"mean_dice": result["mean_dice"], "per_class": result["per_class"],
               "baseline_all_empty": baseline,
               "baseline_per_class": baseline_per_class, "n_images": result["n_images"], "report": report}
        self.state["evaluation"] = out
        return False, (f"held-out mean Dice {result['mean_dice']:.4f} vs all-empty baseline {baseline:.4f} "
                       f"on {result['n_images']} images"), out

    def _bundle_stamp(self) -> str:
        """Identifies the trained bundle, so thresholds tuned for an older bundle are redone."""
        manifest = json.loads(storage.read_text(storage.join(self.cfg.bundle, "manifest.json")))
        models = manifest.get("models", {})
        return json.dumps({m: models[m].get("created_at", models[m].get("trained_at")) for m in sorted(models)},
                          sort_keys=True)

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        self._stage("data", self.data)
        self._stage("split", self.split)
        self._stage("train", self.train)
        self._stage("tune", self.tune)
        self._stage("publish", self.publish)
        self._stage("score", self.score)
        self._stage("evaluate", self.evaluate)
        from steel import pipeline_report

        path = pipeline_report.write(self.cfg, self.results, self.state)
        total = time.time() - t0
        print(f"[  report] {path}", flush=True)
        ev = self.state.get("evaluation")
        if ev:
            print(f"\nmean Dice on {ev['n_images']} held-out images: model {ev['mean_dice']:.4f}, "
                  f"all-empty baseline {ev['baseline_all_empty']:.4f}  ({total / 60:.1f} min)", flush=True)
        return {"stages": [r.__dict__ for r in self.results], "evaluation": ev, "report": path,
                "seconds": total}


def _core(thresholds: dict | None) -> dict | None:
    """The thresholds that decide the output (not the tuning notes beside them)."""
    if not thresholds:
        return None
    return {k: thresholds.get(k) for k in ("binary", "classes", "tta")}


def _was_skipped(result) -> bool:
    if isinstance(result, dict):
        return bool(result.get("skipped"))
    return bool(getattr(result, "skipped", False))


def _all_empty_baseline(result: dict) -> tuple[float, dict]:
    """Mean Dice (overall, per class) of predicting no defect anywhere, for the same pairs.

    An empty prediction scores 1 on a pair whose truth is empty and 0 otherwise.
    """
    pairs = result["per_pair"][["ImageId", "ClassId"]]
    truth = result["truth"]
    defect = truth[truth["EncodedPixels"] != ""][["ImageId", "ClassId"]].assign(_defect=1)
    merged = pairs.merge(defect, on=["ImageId", "ClassId"], how="left")
    empty = merged["_defect"].isna()
    per_class = {str(k): float(empty[merged["ClassId"] == k].mean()) for k in (1, 2, 3, 4)}
    return float(empty.mean()), per_class


def run_pipeline(cfg: Config) -> dict:
    if cfg.storage_endpoint:
        storage.set_endpoint(cfg.storage_endpoint)
    return Pipeline(cfg).run()
