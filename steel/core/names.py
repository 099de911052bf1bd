"""The names and constants every stage shares, defined once.

The problem's fixed facts (four defect classes, 256 x 1600 frames, the seed's area bounds), the
models and their kinds, and the closed sets of choices a config or a command line may name (TTA
modes, output formats, input preprocessings). Everything else imports them from here; a second
definition anywhere is a bug (``tests/test_layout.py`` looks for the usual ones).
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# The problem

CLASSES: tuple[int, ...] = (1, 2, 3, 4)  # Severstal's defect classes (ClassId)
HEIGHT, WIDTH = 256, 1600  # every camera frame; masks and RLEs are numbered on this grid
SHAPE: tuple[int, int] = (HEIGHT, WIDTH)
PIXELS = HEIGHT * WIDTH
# The seed notebook's area bounds per class (section 4.1: 2nd-98th percentile of the train masks).
SEED_AREAS: dict[int, tuple[int, int]] = {1: (500, 15500), 2: (700, 10000), 3: (1100, 160000), 4: (2800, 127000)}
SPLITS: tuple[str, ...] = ("train", "val", "test")  # the seed's labelled splits

# ---------------------------------------------------------------------------------------------
# Models and their kinds

MODEL_NAMES: tuple[str, ...] = ("binary", "multilabel", "seg1", "seg2", "seg3", "seg4")  # the cascade
UNIFIED = "unified"  # one network instead of the six (train.kind: unified)
ALL_MODEL_NAMES: tuple[str, ...] = (*MODEL_NAMES, UNIFIED)
# ``train.kind`` -> the models that kind trains.
KINDS: dict[str, tuple[str, ...]] = {"cascade": MODEL_NAMES, "unified": (UNIFIED,)}
# Each model's kind: the architecture family it is built from (steel.model.networks.REGISTRY) and
# the config section that sets it up (classifier -> train.classifier; the others -> train.segmenter).
MODEL_KINDS: dict[str, str] = {"binary": "classifier", "multilabel": "classifier",
                               **{f"seg{k}": "segmenter" for k in CLASSES}, UNIFIED: "unified"}


def model_kind(name: str) -> str:
    """``classifier``, ``segmenter`` (seg1..seg4) or ``unified``; ValueError naming the choices."""
    try:
        return MODEL_KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(ALL_MODEL_NAMES)}") from None


def is_segmenter(name: str) -> bool:
    """True for the per-class U-Nets ``seg1`` .. ``seg4``."""
    return model_kind(name) == "segmenter"


def has_unet(name: str) -> bool:
    """True for the models with a U-Net decoder (the segmenters and the unified model)."""
    return model_kind(name) != "classifier"


def class_of(name: str) -> int:
    """The defect class (1..4) segmenter ``name`` predicts; ValueError for any other model."""
    if not is_segmenter(name):
        raise ValueError(f"{name!r} is a {model_kind(name)} model, not a per-class segmenter (seg1..seg4)")
    return int(name[3:])


def segmenter_name(k: int) -> str:
    """The name of class ``k``'s segmenter (``seg<k>``)."""
    if int(k) not in CLASSES:
        raise ValueError(f"unknown class {k!r}; classes are {', '.join(map(str, CLASSES))}")
    return f"seg{int(k)}"


# ---------------------------------------------------------------------------------------------
# Closed sets of choices

# Flip test-time augmentation: each mode's views as (flip rows, flip columns).
TTA_VIEWS: dict[str, tuple[tuple[bool, bool], ...]] = {
    "none": ((False, False),),
    "h": ((False, False), (False, True)),
    "v": ((False, False), (True, False)),
    "hv": ((False, False), (False, True), (True, False), (True, True)),
}
TTA_MODES: tuple[str, ...] = tuple(TTA_VIEWS)
FORMATS: tuple[str, ...] = ("csv", "parquet")  # scoring's shard formats
LAYOUTS: tuple[str, ...] = ("long", "combined")  # Kaggle CSV layouts (steel.data.submission)
# Input scalings of uint8 pixels (steel.data.images.preprocess); bundles saved before the spec
# recorded one were trained on LEGACY_PREPROCESSING.
PREPROCESSINGS: tuple[str, ...] = ("unit", "imagenet", "tf", "raw")
LEGACY_PREPROCESSING = "unit"
IMAGE_FORMATS: tuple[str, ...] = ("JPEG",)  # PIL format names accepted by default (the camera archive)
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")  # files a label listing counts as images

# One colour per class (RGB), for every plot and overlay.
CLASS_COLORS: dict[int, tuple[int, int, int]] = {1: (230, 40, 40), 2: (40, 200, 40), 3: (50, 110, 255),
                                                 4: (250, 170, 0)}


CLASS_COLOR_NAMES: dict[int, str] = {1: "red", 2: "green", 3: "blue", 4: "orange"}


def check_choice(value, allowed, what: str):
    """``value`` if it is one of ``allowed``; else ValueError naming ``what`` and the choices."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return value


def hex_color(k: int) -> str:
    """Class ``k``'s colour as ``#rrggbb`` (matplotlib)."""
    return "#%02x%02x%02x" % CLASS_COLORS[int(k)]
