"""The baseline a person with a few clicks would otherwise use: a random forest on per-pixel filter features
(ilastik's pixel classification, scikit-image's trainable segmentation), trained on exactly the clicks a CNN
run trains on and scored with the same confusion matrix on the same dense val labels.

    python -m research.experiments --preset atlanta --only 8      # a forest row beside every few-clicks row

Two feature sets (FEATURES):
- `multiscale`: scikit-image's `multiscale_basic_features` per band: Gaussian-smoothed intensity, gradient
  magnitude (edges) and the two Hessian eigenvalues (texture) at sigmas from SIGMA_MIN to SIGMA_MAX processing
  pixels (6 scales): what ilastik offers by default;
- `bands`: the band values alone (Earth Engine's or QGIS SCP's classifiers on the bands).
Both work on the processing-grid image the CNN sees (SegmentationDataset.image) and learn from its training
target (point_grid: clicks, then grown labels and pseudo-labels where a run has them; only clicks here, as the
forest runs no rounds). The forest is scikit-learn's RandomForestClassifier with N_TREES trees, one job and a fixed
seed (repeatable); at most MAX_SAMPLES labelled pixels train it (drawn at random, seeded, when there are more:
dense labels), which keeps a row to seconds on a CPU. settings_id() digests these constants into the
experiments' keys.
"""

import time

import numpy as np
from skimage.feature import multiscale_basic_features
from sklearn.ensemble import RandomForestClassifier

from metrics import ConfusionMatrix
from spec import IGNORE_INDEX

FEATURES = ("multiscale", "bands")
SIGMA_MIN, SIGMA_MAX = 0.5, 16.0
N_TREES = 100
MAX_SAMPLES = 50_000
MAX_IMAGES = 200  # click_probabilities: images it draws pixels from


def settings_id():
    """A short digest of the forest's constants (features, sigmas, trees, samples): experiments.py puts it in a
    reference row's key, so rows of other forest settings are never mixed up with these."""
    import hashlib
    text = f"{FEATURES} {SIGMA_MIN} {SIGMA_MAX} {N_TREES} {MAX_SAMPLES}"
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def pixel_features(image, kind="multiscale"):
    """(h, w, F) float32 features of an image (B, h, w) in [0, 1] (a tensor or an array)."""
    if kind not in FEATURES:
        raise ValueError(f"unknown forest features {kind!r}; use one of {FEATURES}")
    arr = np.asarray(image, dtype=np.float32).transpose(1, 2, 0)  # (h, w, B)
    if kind == "bands":
        return arr
    return multiscale_basic_features(arr, intensity=True, edges=True, texture=True, sigma_min=SIGMA_MIN,
                                     sigma_max=SIGMA_MAX, channel_axis=-1).astype(np.float32)


def training_pixels(dataset, kind="multiscale", seed=0, clicks_only=False):
    """(features (N, F), classes (N,)) of every labelled pixel of the dataset's training targets (point_grid; its
    clicks alone, click_grid, with clicks_only), at most MAX_SAMPLES of them (a seeded random subset)."""
    xs, ys = [], []
    for i in range(len(dataset)):
        target = dataset.click_grid(i) if clicks_only else dataset.point_grid(i)
        at = target != IGNORE_INDEX
        if at.any():
            xs.append(pixel_features(dataset.image(i), kind)[at])
            ys.append(target[at].astype(np.int64))
    if not xs:
        raise ValueError("no labelled training pixel: the forest has nothing to learn from")
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(y) > MAX_SAMPLES:
        keep = np.sort(np.random.default_rng(seed).choice(len(y), MAX_SAMPLES, replace=False))
        x, y = x[keep], y[keep]
    return x, y


def fit_forest(dataset, kind="multiscale", seed=0, clicks_only=False):
    """A RandomForestClassifier fitted on the dataset's training targets (training_pixels)."""
    x, y = training_pixels(dataset, kind, seed, clicks_only)
    forest = RandomForestClassifier(n_estimators=N_TREES, n_jobs=1, random_state=seed)
    return forest.fit(x, y)


def probabilities(forest, image, num_classes, kind="multiscale"):
    """(num_classes, h, w) float32 class probabilities (the share of trees voting) of an image (B, h, w) in
    [0, 1]; 0 for a class no training pixel had."""
    feats = pixel_features(image, kind)
    h, w, f = feats.shape
    return _class_columns(forest, feats.reshape(-1, f), num_classes).reshape(num_classes, h, w)


def _class_columns(forest, feats, num_classes):
    """(num_classes, N) probabilities of N feature rows; 0 for a class no training pixel had."""
    prob = np.zeros((num_classes, len(feats)), np.float32)
    prob[forest.classes_] = forest.predict_proba(feats).T
    return prob


def click_probabilities(dataset, kind="multiscale", seed=0, max_pixels=MAX_SAMPLES, max_images=MAX_IMAGES):
    """((C, N) class probabilities, training pixel count): a forest fitted on the dataset's clicks alone, applied
    at N <= max_pixels defined pixels (dataset.defined) drawn at random (seeded) from at most max_images evenly
    spaced training images, as many from each. The count is of every defined pixel of every training image.
    class_weights.pixel_shares re-estimates the classes' pixel shares from these."""
    forest = fit_forest(dataset, kind, seed, clicks_only=True)
    rng = np.random.default_rng(seed)
    n = len(dataset)
    picked = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))
    per_image = max(1, max_pixels // len(picked))
    defined, total = {}, 0  # each image's defined pixels are read once; the picked ones are kept
    for i in range(n):
        mask = dataset.defined(i)
        total += int(mask.sum())
        if i in picked:
            defined[i] = mask
    out = []
    for i in picked:
        feats = pixel_features(dataset.image(i), kind)[defined[i]]
        if len(feats):
            feats = feats[rng.choice(len(feats), min(per_image, len(feats)), replace=False)]
            out.append(_class_columns(forest, feats, dataset.classes.num_classes))
    if not out:
        raise ValueError("the training images have no defined pixel: no class share can be estimated")
    return np.concatenate(out, 1), total


def predict(forest, image, kind="multiscale"):
    """(h, w) class map of an image (B, h, w) in [0, 1]."""
    feats = pixel_features(image, kind)
    h, w, f = feats.shape
    return forest.classes_[forest.predict_proba(feats.reshape(-1, f)).argmax(1)].reshape(h, w)


def forest_baseline(train_ds, val_ds, kind="multiscale", seed=0, exclude=()):
    """Fit on train_ds's clicks, score on val_ds's dense labels. Returns the metrics dict of
    metrics.ConfusionMatrix.compute (oa, miou, iou, ...) plus `labelled_fraction` and `seconds`."""
    t0 = time.time()
    forest = fit_forest(train_ds, kind, seed)
    cm = ConfusionMatrix(val_ds.classes.num_classes, val_ds.classes.names)
    for i in range(len(val_ds)):
        cm.update(predict(forest, val_ds.image(i), kind), val_ds.dense_label(i))
    out = cm.compute(exclude)
    out.update(labelled_fraction=train_ds.labelled_fraction(), seconds=time.time() - t0)
    return out
