"""Which classes each synthetic image gets, and the images' names: the real set's shares, as exact quotas.
"""

from __future__ import annotations

import hashlib

import numpy as np

from steel.core.names import CLASSES

# Frequencies of the real training set.
NO_DEFECT_SHARE = 0.47
CLASS_SHARE = {1: 0.13, 2: 0.035, 3: 0.77, 4: 0.12}  # of defect images containing each class
TWO_CLASS_SHARE = 0.055  # of defect images
_PAIR_WEIGHTS = {(3, 4): 0.45, (1, 3): 0.35, (1, 2): 0.10, (2, 3): 0.10}

SPLIT_CODE = {"train": 1, "test": 2}


# ---------------------------------------------------------------------------------------------
# Label plan: which classes each image gets
# ---------------------------------------------------------------------------------------------


def _categories() -> dict[tuple[int, ...], float]:
    """Probability of each label set, so that the class shares above hold exactly in expectation."""
    pair_share = {k: sum(w for p, w in _PAIR_WEIGHTS.items() if k in p) for k in CLASSES}
    single = {k: (CLASS_SHARE[k] - TWO_CLASS_SHARE * pair_share[k]) / (1 - TWO_CLASS_SHARE) for k in CLASSES}
    defect = 1 - NO_DEFECT_SHARE
    cats: dict[tuple[int, ...], float] = {(): NO_DEFECT_SHARE}
    for k in CLASSES:
        cats[(k,)] = defect * (1 - TWO_CLASS_SHARE) * single[k]
    for pair, w in _PAIR_WEIGHTS.items():
        cats[pair] = defect * TWO_CLASS_SHARE * w
    return cats


def plan_labels(n: int, seed: int, split: str) -> list[tuple[int, ...]]:
    """Label sets of ``n`` images: exact quotas (largest remainder) in a seeded random order."""
    cats = _categories()
    keys = list(cats)
    exact = np.array([cats[k] for k in keys]) * n
    counts = np.floor(exact).astype(int)
    remainder = exact - counts
    # Largest remainders first; ties broken by category order (deterministic).
    for i in np.argsort(-remainder, kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    labels = [k for k, c in zip(keys, counts) for _ in range(c)]
    rng = np.random.default_rng([seed, SPLIT_CODE[split], 0x91A7])
    order = rng.permutation(n)
    return [labels[i] for i in order]


def image_ids(seed: int, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """Kaggle-like ids (9 hex chars + '.jpg'), deterministic from the seed and unique over both splits."""
    seen: set[str] = set()
    out: dict[str, list[str]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            salt = 0
            while True:
                h = hashlib.sha256(f"steel-synth:{seed}:{split}:{i}:{salt}".encode()).hexdigest()[:9]
                if h not in seen:
                    break
                salt += 1
            seen.add(h)
            out[split].append(h + ".jpg")
    return out["train"], out["test"]
