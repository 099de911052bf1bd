"""Write a synthetic Severstal-like steel-defect dataset in the Kaggle layout.

``steel synth OUT --images N --test-images M --seed S [--workers K]`` writes::

    OUT/train_images/<id>.jpg      256x1600 grayscale JPEGs stored as 3 equal channels
    OUT/train.csv                  ImageId,ClassId,EncodedPixels (defect rows only)
    OUT/test_images/<id>.jpg
    OUT/sample_submission.csv      ImageId,ClassId,EncodedPixels, 4 rows per test image, "1 1"
    OUT/test_truth.csv             ImageId,ClassId,EncodedPixels (defect rows only)
    OUT/synth.json                 what was generated (marks the folder as ours, safe to regenerate)

The images look like rolled steel: streaks along the rolling direction, low-frequency brightness
variation, sensor noise, sometimes a dark region where the sheet ends, and harmless marks (faint
lines, oil-stain smudges, light speckles) that are *not* labelled. Defects follow the real set's
shapes, frequencies and the seed notebook's per-class area bounds:

- class 1: clusters of small dark/bright pits;          area 500 - 15,500 px
- class 2: thin near-vertical cracks (rare);            area 700 - 10,000 px
- class 3: long scratches or large worn regions (most); area 1,100 - 160,000 px
- class 4: large dark patches;                          area 2,800 - 127,000 px

Each defect's mask is computed first, as the pixels of a "shape field" below a threshold chosen so
the mask has exactly the sampled area, and then painted through: every masked pixel is altered and
no other pixel is touched by that defect. Classes never overlap.

Image ``i`` of a split depends only on ``(seed, split, i)`` and the label plan (which is drawn from
the seed with exact per-category quotas), so the output is identical for any number of workers.

Modules: :mod:`~steel.data.synth.quotas` (which classes each image gets, exact per-class quotas), :mod:`~steel.data.synth.shapes`
(defect masks), :mod:`~steel.data.synth.render` (one image), :mod:`~steel.data.synth.write` (the set,
written through :mod:`steel.core.storage`).
"""
