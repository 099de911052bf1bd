"""Run configuration: one YAML file per run, checked strictly.

Every section is a dataclass, so defaults live in one place and a typo in a YAML key is an error
that names the key (``train.epoch: unknown key; did you mean 'epochs'?``) instead of a silently
ignored setting. Load with :func:`load_config`; override single values from the command line with
``key.path=value`` strings (:func:`apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from steel.core.names import (
    ALL_MODEL_NAMES,
    FORMATS,
    KINDS,
    MODEL_NAMES,
    PREPROCESSINGS,
    SHAPE,
    SPLITS,
    TTA_MODES,
    UNIFIED,
    model_kind,
)


class ConfigError(ValueError):
    """A configuration value that is missing, unknown or of the wrong type; the message names the key."""


@dataclass
class SynthConfig:
    """Generate a synthetic Severstal-like dataset into ``data.root`` when it is missing."""

    images: int = 400
    test_images: int = 100
    seed: int = 0


@dataclass
class DataConfig:
    # Folder (local path, file:// or s3://) in the Kaggle layout: train_images/, train.csv,
    # test_images/, and optionally sample_submission.csv and test_truth.csv (synthetic sets).
    root: str = "runs/quickstart/data"
    train_csv: str | None = None  # default: <root>/train.csv
    train_images: str | None = None  # default: <root>/train_images
    test_images: str | None = None  # default: <root>/test_images
    test_truth: str | None = None  # default: <root>/test_truth.csv when it exists
    synth: SynthConfig | None = None  # set to generate the data when missing
    skip_bad: bool = False  # skip bad label rows (with a written report) instead of failing
    seed: int = 42  # split random_state, as the seed notebook

    def path(self, name: str) -> str:
        from steel.core import storage

        value = getattr(self, name)
        if value:
            return value
        default = {"train_csv": "train.csv", "train_images": "train_images",
                   "test_images": "test_images", "test_truth": "test_truth.csv"}[name]
        return storage.join(self.root, default)


@dataclass
class ModelConfig:
    """Architecture of one model (see ``steel.model.networks.build``)."""

    encoder: str = "xception"
    input_size: tuple[int, int] = (256, 512)  # (H, W) fed to the network
    encoder_weights: str = "imagenet"  # imagenet | none | path to a .h5 file
    # U-Net decoder widths; the seed uses segmentation-models' default (256, 128, 64, 32, 16).
    decoder_filters: tuple[int, ...] | None = None
    dense_units: tuple[int, ...] | None = None  # classifier head; default (1024, 512, 64)
    # Input scaling: unit | imagenet | tf | raw (steel.data.images); default: the encoder's pretraining one.
    preprocessing: str | None = None
    # Per model kind (this section's models); None: train.per_worker_batch / train.base_lr.
    per_worker_batch: int | None = None
    base_lr: float | None = None


@dataclass
class TrainConfig:
    output: str = "runs/quickstart/train"  # Ray Train storage_path (local or s3://)
    # cascade: the six models of ``models``; unified: one network (architecture from ``segmenter``).
    kind: str = "cascade"
    models: list[str] = field(default_factory=lambda: list(MODEL_NAMES))
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    mixed_precision: bool = False  # float16 compute on GPU
    epochs: int = 20
    # Epochs of particular models, e.g. {seg3: 30}; the others train for ``epochs``.
    epochs_by_model: dict[str, int] = field(default_factory=dict)
    per_worker_batch: int = 8
    base_lr: float = 1e-4  # learning rate at base_batch; scaled linearly with the global batch
    base_batch: int = 8
    warmup_epochs: int = 1
    lr_schedule: str = "constant"  # after warm-up: constant | cosine (decays to 0 at the last epoch)
    seg_loss: str = "bce_dice"  # dice | bce_dice
    max_failures: int = 2
    max_steps_per_epoch: int | None = None  # cap for quick runs; None = one pass over the data
    # Each worker keeps its share of the decoded, resized images (uint8, train + val) in memory after
    # one pass when that share fits in this many MB, and augments from there every epoch; 0: Ray Data
    # reads, decodes and augments every epoch (steel.train.run).
    worker_cache_mb: int = 2048
    # A Ray that `steel train` started on this machine (no address): train with one worker holding
    # every worker's CPUs and the same global batch, instead of num_workers workers all-reducing on
    # the same cores. A joined cluster always gets num_workers.
    one_local_worker: bool = True
    classifier: ModelConfig = field(default_factory=ModelConfig)
    segmenter: ModelConfig = field(
        default_factory=lambda: ModelConfig(encoder="efficientnetb1", input_size=SHAPE)
    )
    augment: bool = True
    blackout_prob: float = 0.2  # segmenters: chance to paint the defect out and relabel as clean
    # unified: loss = mask loss + cls_loss_weight * classification loss (steel.train.loop.compile_model).
    cls_loss_weight: float = 1.0
    # unified: cap of the per-output positive weights of the classification BCE (neg/pos of the
    # training split, clipped to [1, cap]); 1 switches the re-weighting off.
    max_pos_weight: float = 10.0

    def epochs_for(self, name: str) -> int:
        """Epochs model ``name`` trains for: ``epochs_by_model[name]``, else ``epochs``."""
        return int(self.epochs_by_model.get(name, self.epochs))

    def model_names(self) -> list[str]:
        """The models this training produces: ``models`` (cascade) or ``["unified"]``."""
        return list(self.models) if self.kind == "cascade" else [UNIFIED]

    def section(self, name: str) -> ModelConfig:
        """The architecture section of model ``name``: ``classifier`` for the two classifiers,
        ``segmenter`` for the U-Nets and the unified model."""
        return self.classifier if model_kind(name) == "classifier" else self.segmenter

    def batch_for(self, name: str) -> int:
        """Per-worker batch of model ``name``: its kind's ``per_worker_batch``, else ``per_worker_batch``."""
        value = self.section(name).per_worker_batch
        return int(self.per_worker_batch if value is None else value)

    def lr_for(self, name: str) -> float:
        """Base learning rate (at ``base_batch``) of model ``name``: its kind's ``base_lr``, else ``base_lr``."""
        value = self.section(name).base_lr
        return float(self.base_lr if value is None else value)


@dataclass
class TuneConfig:
    enabled: bool = True  # false: the seed's published thresholds (steel.model.thresholds.default_thresholds)
    tta: str = "none"  # none | h | v | hv
    # search: coordinate ascent on the validation split (steel.tune.run.tune). fixed: the seed's way,
    # no search: probabilities 0.5 and area bounds from the 2nd/98th percentile of the train split's
    # mask areas (steel.tune.run.fixed_thresholds), or from ``area_thresholds`` (EDA's area_thresholds.json).
    mode: str = "search"
    area_thresholds: str | None = None


@dataclass
class EvaluateConfig:
    """The pipeline's evaluate stage (steel.eval.protocol): the seed's tables on the labelled splits."""

    splits: list[str] = field(default_factory=lambda: list(SPLITS))  # [] to skip them
    # Images per split at most (a seeded sample above it; the tables say so); null: every image.
    max_images_per_split: int | None = 3000  # the real val (2,262) and test (1,257) splits stay whole


@dataclass
class ScoreConfig:
    images: str | None = None  # default: data test_images
    out: str = "runs/quickstart/scores"
    actors: int = 1
    batch_size: int = 8
    gpus_per_actor: float = 0.0
    format: str = "csv"  # csv | parquet
    tta: str | None = None  # none | h | v | hv; default: the TTA the bundle's thresholds were tuned with
    allow_resize: bool = False  # resize wrong-size images instead of rejecting them
    images_per_shard: int = 64
    image_formats: list[str] = field(default_factory=lambda: ["JPEG"])  # other formats (PNG...) are error rows
    retries: int = 4  # transient failures (storage, network, predictor/OOM): retries per read/write/batch
    retry_backoff_s: float = 1.0  # first wait; doubles each retry (capped at 60 s), with jitter
    max_error_rate: float = 0.05  # permanent (decode) errors / new images above this: the run exits non-zero
    # A lease not renewed for this long (the store's clock) is taken over; its holder renews it every
    # lock_ttl_s / 4 and stops writing when it could not for lock_ttl_s / 2 (steel.score.lease).
    lock_ttl_s: float = 120.0
    # YYYY-MM-DD: list only the date partitions (dt=/date=YYYY-MM-DD, YYYY-MM-DD or YYYY/MM/DD) on or
    # after this day minus since_lookback_days; images an earlier run left pending are retried anyway.
    since: str | None = None
    since_lookback_days: int = 1  # late uploads into the days before `since` are still found
    settle_s: float = 60.0  # a file written less than this ago that does not decode (still being copied): pending, not an error
    expect_new: bool = False  # no new images is a failure (a stopped camera feed)


@dataclass
class ServeAutoscaling:
    """Ray Serve autoscaling (replaces ``serve.replicas`` when set); see Serve's ``autoscaling_config``."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0  # per replica; more queued than this adds a replica


@dataclass
class ServeConfig:
    """Online scoring with Ray Serve (``steel serve``); decoding and TTA come from ``score.*``."""

    host: str = "127.0.0.1"  # the HTTP proxy's address; 0.0.0.0 on a cluster behind a Service
    port: int = 8000
    app_name: str = "steel"
    route_prefix: str = "/"
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    autoscaling: ServeAutoscaling | None = None
    max_batch_size: int = 8  # images per cascade call (serve.batch)
    batch_wait_timeout_s: float = 0.01  # how long a batch waits for more requests
    max_ongoing_requests: int = 32  # per replica; Serve queues the rest
    max_image_bytes: int = 4 * 1024 * 1024  # a bigger body is refused (413) before it is decoded
    max_images_per_request: int = 32  # the batch form
    request_timeout_s: float = 30.0  # a request that takes longer gets a 5xx, never a hang
    access_log: bool = False  # a log line per request from the proxy and the replica (costs CPU per request)


@dataclass
class Config:
    name: str = "quickstart"
    ray_address: str | None = None  # None: start a local Ray; "auto" or ray://... to join a cluster
    storage_endpoint: str | None = None  # S3-compatible endpoint; default AWS_ENDPOINT_URL or AWS
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    bundle: str = "runs/quickstart/bundle"
    # Versioned bundle root: after training + tuning the pipeline publishes the bundle as an immutable
    # version here and promotes it (CURRENT pointer); scoring resolves it once per run. None: score cfg.bundle.
    bundle_versions: str | None = None
    tune: TuneConfig = field(default_factory=TuneConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    report: str = "runs/quickstart/report"

    def to_dict(self) -> dict:
        return _to_plain(self)


def _to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = args or (Any, Any)
        return {_convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{full}: unknown key{extra}")
        kwargs[key] = _convert(value, hints[key], full)
        # A partial section keeps its field's own defaults for the keys it leaves out (a
        # `train.segmenter` with only `per_worker_batch` is still an EfficientNet-B1 U-Net at 256x1600,
        # not ModelConfig's class defaults, which are the classifier's).
        field = next(f for f in dataclasses.fields(cls) if f.name == key)
        if (isinstance(value, dict) and dataclasses.is_dataclass(kwargs[key])
                and field.default_factory is not dataclasses.MISSING):
            kwargs[key] = dataclasses.replace(field.default_factory(), **{k: getattr(kwargs[key], k) for k in value})
    obj = cls(**kwargs)
    _check(obj, prefix)
    return obj


def _check(obj, prefix: str) -> None:
    """Value checks beyond types."""
    p = f"{prefix}." if prefix else ""
    if isinstance(obj, TrainConfig):
        unknown = [m for m in obj.models if m not in MODEL_NAMES]
        if unknown:
            raise ConfigError(f"{p}models: unknown model {unknown[0]!r}; choose from {', '.join(MODEL_NAMES)}")
        if obj.worker_cache_mb < 0:
            raise ConfigError(f"{p}worker_cache_mb: must not be negative (0: no cache), got {obj.worker_cache_mb}")
        for name in ("num_workers", "epochs", "per_worker_batch", "base_batch", "cpus_per_worker"):
            if getattr(obj, name) < 1:
                raise ConfigError(f"{p}{name}: must be at least 1, got {getattr(obj, name)}")
        if obj.kind not in KINDS:
            raise ConfigError(f"{p}kind: must be one of {', '.join(KINDS)}, got {obj.kind!r}")
        if not obj.cls_loss_weight >= 0:
            raise ConfigError(f"{p}cls_loss_weight: must not be negative, got {obj.cls_loss_weight}")
        if not obj.max_pos_weight >= 1:
            raise ConfigError(f"{p}max_pos_weight: must be at least 1, got {obj.max_pos_weight}")
        unknown = [m for m in obj.epochs_by_model if m not in ALL_MODEL_NAMES]
        if unknown:
            raise ConfigError(f"{p}epochs_by_model: unknown model {unknown[0]!r}; choose from "
                              f"{', '.join(ALL_MODEL_NAMES)}")
        for m, n in obj.epochs_by_model.items():
            if n < 1:
                raise ConfigError(f"{p}epochs_by_model.{m}: must be at least 1, got {n}")
        if obj.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"{p}lr_schedule: must be 'constant' or 'cosine', got {obj.lr_schedule!r}")
        if obj.seg_loss not in ("dice", "bce_dice"):
            raise ConfigError(f"{p}seg_loss: must be 'dice' or 'bce_dice', got {obj.seg_loss!r}")
    if isinstance(obj, ModelConfig):
        if obj.preprocessing is not None and obj.preprocessing not in PREPROCESSINGS:
            raise ConfigError(f"{p}preprocessing: must be one of {', '.join(PREPROCESSINGS)} (or null: the "
                              f"encoder's), got {obj.preprocessing!r}")
        if obj.per_worker_batch is not None and obj.per_worker_batch < 1:
            raise ConfigError(f"{p}per_worker_batch: must be at least 1, got {obj.per_worker_batch}")
        if obj.base_lr is not None and not obj.base_lr > 0:
            raise ConfigError(f"{p}base_lr: must be positive, got {obj.base_lr}")
    if isinstance(obj, TrainConfig) and not obj.base_lr > 0:
        raise ConfigError(f"{p}base_lr: must be positive, got {obj.base_lr}")
    if isinstance(obj, TuneConfig) and obj.mode not in ("search", "fixed"):
        raise ConfigError(f"{p}mode: must be 'search' or 'fixed', got {obj.mode!r}")
    if isinstance(obj, (TuneConfig, ScoreConfig)) and obj.tta is not None and obj.tta not in TTA_MODES:
        raise ConfigError(f"{p}tta: must be one of {', '.join(TTA_MODES)}; got {obj.tta!r}")
    if isinstance(obj, ServeConfig):
        for name in ("replicas", "max_batch_size", "max_ongoing_requests", "max_image_bytes",
                     "max_images_per_request"):
            if getattr(obj, name) < 1:
                raise ConfigError(f"{p}{name}: must be at least 1, got {getattr(obj, name)}")
        for name in ("cpus_per_replica", "gpus_per_replica", "batch_wait_timeout_s"):
            if getattr(obj, name) < 0:
                raise ConfigError(f"{p}{name}: must not be negative, got {getattr(obj, name)}")
        if obj.request_timeout_s <= 0:
            raise ConfigError(f"{p}request_timeout_s: must be positive, got {obj.request_timeout_s}")
        if not 0 < obj.port < 65536:
            raise ConfigError(f"{p}port: must be 1..65535, got {obj.port}")
        if not obj.route_prefix.startswith("/"):
            raise ConfigError(f"{p}route_prefix: must start with '/', got {obj.route_prefix!r}")
    if isinstance(obj, ServeAutoscaling):
        if not 0 <= obj.min_replicas <= obj.max_replicas or obj.max_replicas < 1:
            raise ConfigError(f"{p}: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                              f"{obj.min_replicas}..{obj.max_replicas}")
        if obj.target_ongoing_requests <= 0:
            raise ConfigError(f"{p}target_ongoing_requests: must be positive, got {obj.target_ongoing_requests}")
    if isinstance(obj, EvaluateConfig):
        unknown = [v for v in obj.splits if v not in SPLITS]
        if unknown:
            raise ConfigError(f"{p}splits: unknown split {unknown[0]!r}; choose from {', '.join(SPLITS)}")
        if obj.max_images_per_split is not None and obj.max_images_per_split < 1:
            raise ConfigError(f"{p}max_images_per_split: must be at least 1 (or null: every image), "
                              f"got {obj.max_images_per_split}")
    if isinstance(obj, ScoreConfig):
        if obj.format not in FORMATS:
            raise ConfigError(f"{p}format: must be one of {', '.join(FORMATS)}, got {obj.format!r}")
        for name in ("actors", "batch_size", "images_per_shard"):
            if getattr(obj, name) < 1:
                raise ConfigError(f"{p}{name}: must be at least 1, got {getattr(obj, name)}")
        for name in ("gpus_per_actor", "retries", "retry_backoff_s", "since_lookback_days", "settle_s"):
            if getattr(obj, name) < 0:
                raise ConfigError(f"{p}{name}: must not be negative, got {getattr(obj, name)}")
        if not 0 <= obj.max_error_rate <= 1:
            raise ConfigError(f"{p}max_error_rate: must be between 0 and 1, got {obj.max_error_rate}")
        if not obj.lock_ttl_s > 0:
            raise ConfigError(f"{p}lock_ttl_s: must be positive, got {obj.lock_ttl_s}")
        if obj.since is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", obj.since):
            raise ConfigError(f"{p}since: must be a date YYYY-MM-DD, got {obj.since!r}")


def check_section(obj, prefix: str = ""):
    """Check a config section built in code (``ScoreConfig(...)``, ``dataclasses.replace``) as a loaded
    config is checked; returns it. The error names the key under ``prefix`` (e.g. ``score.actors``)."""
    _check(obj, prefix)
    return obj


def config_from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    return _build(Config, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config mapping."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        node = data
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {part} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (local path or URI); ``None`` gives the built-in defaults."""
    data: dict = {}
    if path:
        from steel.core import storage

        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data)
