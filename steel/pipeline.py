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

from steel.core import s3, storage
from steel.core.config import Config
from steel.model.thresholds import bundle_thresholds

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
        self._tmp: str | None = None  # this run's scratch folder (tuning's validation predictions)

    @property
    def _val_cache(self) -> str:
        """Local file for tuning's validation predictions, which the evaluate stage reuses."""
        import os
        import tempfile

        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="steel-run-")
        return os.path.join(self._tmp, "val.npz")

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
        from steel.data.synth.write import ensure_dataset

        return ensure_dataset(self.cfg.data)

    def split(self):
        from steel.data.labels import load_splits

        splits, fp = load_splits(self.cfg, report_uri=storage.join(self.cfg.report, "skipped_labels.csv"))
        self.state["splits"] = splits
        counts = {k: len(v) for k, v in splits.items()}
        return False, (f"train {counts['train']} / val {counts['val']} / test {counts['test']} images "
                       f"(fingerprint {fp[:12]})"), {"counts": counts, "fingerprint": fp}

    def train(self):
        from steel.train import run as training

        results = training.train_models(self.cfg)
        trained = [m for m, r in results.items() if not _was_skipped(r)]
        skipped = len(trained) == 0
        summary = (f"{len(results)} models in bundle {self.cfg.bundle}"
                   + (f" (trained: {', '.join(trained)})" if trained else ""))
        return skipped, summary, {"bundle": self.cfg.bundle, "models": list(results)}

    def tune(self):

        existing = bundle_thresholds(self.cfg.bundle)
        if not self.cfg.tune.enabled:
            return True, "disabled in config (default thresholds)", {}
        if self.cfg.tune.mode == "fixed":
            return self._fixed_thresholds(existing)
        if existing and existing.get("validation", {}).get("fingerprint") == self._bundle_stamp():
            v = existing["validation"]
            return True, (f"validation mean Dice {v.get('before', float('nan')):.4f} -> "
                          f"{v.get('after', float('nan')):.4f}; {storage.join(self.cfg.bundle, 'thresholds.json')}"), {}
        from steel.tune import run as tuning

        result = tuning.tune(self.cfg, bundle_uri=self.cfg.bundle, stamp=self._bundle_stamp(),
                             cache_path=self._val_cache)
        check = result.get("deployed_check") or {}
        return False, (f"validation mean Dice {result['before']:.4f} -> {result['after']:.4f} "
                       f"(seed's fixed thresholds {result['seed']['mean_dice']:.4f}); deployed cascade "
                       f"{check.get('deployed', float('nan')):.4f} (|difference| {check.get('difference', float('nan')):.5f}); "
                       f"{storage.join(self.cfg.bundle, 'thresholds.json')}"), result

    def _fixed_thresholds(self, existing: dict | None):
        """tune.mode fixed: the seed's hand-set thresholds (no search), checked on the validation split."""
        where = storage.join(self.cfg.bundle, "thresholds.json")
        source, v = (existing or {}).get("source"), (existing or {}).get("validation") or {}
        if isinstance(source, dict) and source.get("mode") == "fixed" and v.get("fingerprint") == self._bundle_stamp():
            return True, f"fixed thresholds; validation mean Dice {v.get('mean_dice', float('nan')):.4f}; {where}", {}
        from steel.tune import run as tuning

        result = tuning.write_fixed(self.cfg, bundle_uri=self.cfg.bundle, stamp=self._bundle_stamp())
        return False, (f"fixed thresholds (areas from {result['source']['areas']}); validation mean Dice "
                       f"{result['validation']['mean_dice']:.4f}; {where}"), result

    def publish(self):
        """Publish the trained + tuned bundle as an immutable version and promote it (atomic pointer),
        so a nightly run never reads a bundle that training is rewriting."""
        if not self.cfg.bundle_versions:
            return True, "no bundle_versions root configured: scoring reads the bundle folder", {}
        from steel.model import bundle as bundle_lib

        before = None
        try:
            before = bundle_lib.resolve_bundle(self.cfg.bundle_versions).version
        except FileNotFoundError:
            pass
        published = bundle_lib.publish_bundle(self.cfg.bundle, self.cfg.bundle_versions)
        return published.version == before, f"{published.version} promoted in {self.cfg.bundle_versions}", {
            "version": published.version, "uri": published.uri}

    def score(self):
        from steel.model import bundle as bundle_lib
        from steel.model import thresholds as th
        from steel.score import io as score_io
        from steel.score import run as scoring

        images = self.cfg.score.images or self.cfg.data.path("test_images")
        out = self.cfg.score.out
        previous = score_io.read_manifest(out)
        if previous is not None:
            bundle = bundle_lib.provenance(self.cfg.bundle)
            current = th.resolve(self.cfg.bundle)
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
        """The seed's tables on the labelled splits (:mod:`steel.eval.protocol`), then, where the scored test
        images have their own truth (synthetic sets), the scored submission against it."""
        parts, out = [], {}
        protocol = self._protocol()
        if protocol:
            out["protocol"] = protocol
            parts.append("; ".join(
                f"{name} split ({t['n_images']} images{', tuning predictions reused' if t.get('reused') else ''}) "
                f"cascade mean Dice "
                + ", ".join(f"{th} {c['mean_dice']:.4f}" for th, c in t["cascade"].items())
                for name, t in protocol["splits"].items()))
        truth = self.truth_uri
        if truth is None:
            parts.append("no separate truth for the scored images")
        else:
            ev = self._scored_test(truth)
            out["evaluation"] = ev
            parts.append(f"separate test set: held-out mean Dice {ev['mean_dice']:.4f} vs all-empty baseline "
                         f"{ev['baseline_all_empty']:.4f} on {ev['n_images']} images")
        return not out, "; ".join(parts), out

    def _protocol(self) -> dict | None:
        """The seed's per-split tables (``evaluate.splits``), written to ``<report>/protocol/metrics.json``."""
        want = list(self.cfg.evaluate.splits)
        if not want:
            return None
        import dataclasses
        import os

        from steel.core.ray_session import ensure_ray_for_actors
        from steel.eval import predictions, protocol
        from steel.model import bundle as bundle_lib
        from steel.model import thresholds as th_lib
        from steel.model.predictor import BundleCascade
        from steel.tune import run as tuning

        splits = self.state.get("splits")
        if splits is None:
            self.split()
            splits = self.state["splits"]
        try:
            deployed = th_lib.load_thresholds(self.cfg.bundle)
        except FileNotFoundError:
            deployed = th_lib.default_thresholds()
        thresholds = {"deployed": deployed}
        seed = tuning.fixed_thresholds(self.cfg)
        if _core({**seed, "tta": deployed.get("tta")}) != _core(deployed):
            thresholds["seed"] = seed
        tta = self.cfg.score.tta or deployed.get("tta", "none")
        score_cfg = dataclasses.replace(self.cfg.score, tta=tta, allow_resize=False)
        ensure_ray_for_actors(self.cfg.ray_address, score_cfg.gpus_per_actor, "evaluation")
        kind = "unified" if "unified" in (bundle_lib.read_manifest(self.cfg.bundle).get("models") or {}) else "cascade"
        reuse = {}
        if self._tmp is not None and os.path.exists(self._val_cache):
            reuse["val"] = predictions.PredictionCache.load(self._val_cache)
        result = protocol.evaluate_splits(
            {name: splits[name] for name in want}, self.cfg.data.path("train_images"),
            BundleCascade(str(self.cfg.bundle), deployed, tta, endpoint=s3.current_endpoint()),
            thresholds, score_cfg, max_images=self.cfg.evaluate.max_images_per_split, seed=self.cfg.data.seed,
            kind=kind, identity=predictions.bundle_identity(self.cfg.bundle), reuse=reuse)
        storage.write_text(storage.join(self.cfg.report, "protocol", "metrics.json"), protocol.to_json(result))
        self.state["protocol"] = result
        return result

    def _scored_test(self, truth: str) -> dict:
        """The scored submission against the test set's own truth (the extra table)."""
        from steel.eval import report as eval_report
        from steel.eval.evaluate import evaluate
        from steel.score import merge

        submission = storage.join(self.cfg.report, "submission.csv")
        merge.merge(self.cfg.score.out, submission)
        result = evaluate(submission, truth)
        from steel.eval.metrics import all_empty, presence

        baseline, baseline_per_class = all_empty(presence(result["truth"], sorted(set(result["per_pair"]["ImageId"]))))
        report = eval_report.write_report(result["pred"], result["truth"],
                                          self.cfg.score.images or self.cfg.data.path("test_images"),
                                          storage.join(self.cfg.report, "evaluation"))
        out = {"mean_dice": result["mean_dice"], "per_class": result["per_class"],
               "baseline_all_empty": baseline,
               "baseline_per_class": baseline_per_class, "n_images": result["n_images"], "report": report}
        self.state["evaluation"] = out
        return out

    def _bundle_stamp(self) -> str:
        """Identifies the trained bundle, so thresholds tuned for an older bundle are redone."""
        from steel.model.bundle import read_manifest

        models = read_manifest(self.cfg.bundle).get("models", {})
        return json.dumps({m: models[m].get("created_at", models[m].get("trained_at")) for m in sorted(models)},
                          sort_keys=True)

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            if self._tmp is not None:
                import shutil

                shutil.rmtree(self._tmp, ignore_errors=True)

    def _run(self) -> dict:
        t0 = time.time()
        self._stage("data", self.data)
        self._stage("split", self.split)
        self._stage("train", self.train)
        self._stage("tune", self.tune)
        self._stage("publish", self.publish)
        self._stage("score", self.score)
        self._stage("evaluate", self.evaluate)
        from steel.report import pipeline as pipeline_report

        path = pipeline_report.write(self.cfg, self.results, self.state)
        total = time.time() - t0
        print(f"[  report] {path}", flush=True)
        ev, pr = self.state.get("evaluation"), self.state.get("protocol")
        if pr:
            from steel.eval import protocol

            print("\n" + protocol.format_text(pr), flush=True)
        if ev:
            print(f"\nseparate test set with its own truth ({ev['n_images']} images): mean Dice {ev['mean_dice']:.4f}, "
                  f"all-empty baseline {ev['baseline_all_empty']:.4f}", flush=True)
        print(final_line(pr, ev, total), flush=True)
        return {"stages": [r.__dict__ for r in self.results], "evaluation": ev, "protocol": pr, "report": path,
                "seconds": total}


def final_line(protocol: dict | None, evaluation: dict | None, seconds: float) -> str:
    """The run's last line: the cascade's mean Dice on the split it names (the seed's X_test when
    evaluated, else the last split evaluated, else the separate test set)."""
    took = f"({seconds / 60:.1f} min)"
    if protocol and protocol["splits"]:
        name = "test" if "test" in protocol["splits"] else list(protocol["splits"])[-1]
        t = protocol["splits"][name]
        cascade = t["cascade"]
        seed = f", seed's fixed thresholds {cascade['seed']['mean_dice']:.4f}" if "seed" in cascade else ""
        return (f"\nmean Dice of the cascade on the {name} split ({_images_of(t)} labelled images"
                f"{', held out from training and tuning' if name == 'test' else ''}): "
                f"{cascade['deployed']['mean_dice']:.4f}{seed}, all-empty baseline "
                f"{cascade['deployed']['baseline_all_empty']:.4f}  {took}")
    if evaluation:
        return (f"\nmean Dice on the separate test set ({evaluation['n_images']} images with their own truth): "
                f"model {evaluation['mean_dice']:.4f}, all-empty baseline {evaluation['baseline_all_empty']:.4f}  {took}")
    return f"\nno labelled split evaluated and no truth for the scored images  {took}"


def _images_of(t: dict) -> str:
    return f"{t['n_images']} of {t['of']}" if t.get("sampled") else str(t["n_images"])


def _core(thresholds: dict | None) -> dict | None:
    """The thresholds that decide the output (not the tuning notes beside them)."""
    if not thresholds:
        return None
    return {k: thresholds.get(k) for k in ("binary", "classes", "tta")}


def _was_skipped(result) -> bool:
    if isinstance(result, dict):
        return bool(result.get("skipped"))
    return bool(getattr(result, "skipped", False))


def run_pipeline(cfg: Config) -> dict:
    if cfg.storage_endpoint:
        s3.set_endpoint(cfg.storage_endpoint)
    return Pipeline(cfg).run()
