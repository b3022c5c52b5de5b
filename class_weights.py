"""Class weights from the point labels (default) or the dense labels (published choice).

    python train.py --class-weights points --class-weighting sqrt      # the default: sqrt of the points' counts
    python train.py --class-weights checkpoints/class_weights.pt       # the weights an earlier run wrote

With f_c the share of class c among the labelled pixels at processing resolution, the schemes are
- `inverse` (published): w_c = 1 / f_c;
- `sqrt`: w_c = 1 / sqrt(f_c), the milder square-root inverse frequency;
- `median`: w_c = median(f) / f_c, median-frequency balancing (Eigen & Fergus, 2015). It is inverse frequency
  times a constant, so after the normalisation below it gives exactly the `inverse` weights (and, with the loss's
  weighted mean, the same training); it is kept so that the comparison says so;
- `effective`: w_c = (1 - b) / (1 - b^n_c), the effective number of samples (Cui et al., CVPR 2019), with n_c
  the class's labelled pixel count and b = 1 - 1 / max(n);
- `capped`: inverse frequency with the ratio of the largest to the smallest weight capped at MAX_RATIO.
Each is normalised so the weights sum to the number of classes. train.py uses `sqrt` by default: in
experiments.py's experiment 7 (3 seeds) it gave the best mIoU on the synthetic demo (66.4 vs 63.6 % inverse, 60.5 %
none) and on the real Atlanta set (59.5 vs 57.7 % inverse, 53.6 % none) without inverse frequency's loss of
overall accuracy to the majority class (config.py declares that default; the functions here take the scheme
as an argument and have no default of their own). Points are what an annotator actually has;
dense labels are what the published description used (information a point-supervised user does not have).
"""

import warnings
from pathlib import Path

import numpy as np
import torch

from spec import IGNORE_INDEX

SOURCES = ("points", "dense")
SCHEMES = ("inverse", "sqrt", "median", "effective", "capped")
MAX_RATIO = 10.0  # the `capped` scheme's largest / smallest weight


def count_classes(dataset, source="points"):
    """Pixels per class over a SegmentationDataset, from its point maps or its dense labels."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    counts = np.zeros(dataset.classes.num_classes, dtype=np.int64)
    for i in range(len(dataset)):
        m = dataset.point_grid(i) if source == "points" else dataset.dense_label(i)
        m = m[m != IGNORE_INDEX]
        counts += np.bincount(m.astype(np.int64), minlength=len(counts))[: len(counts)]
    return counts


def weights_from_counts(counts, names, scheme):
    """Class weights by `scheme` (see the module docstring), summing to C. A class never seen gets the
    largest weight of the seen ones (finite) and a warning: the loss never meets it, the weights stay usable."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown class weighting {scheme!r}; use one of {SCHEMES}")
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() == 0:
        raise ValueError("no labelled pixel at all: cannot compute class weights")
    seen = counts > 0
    inv = np.zeros_like(counts)
    f = counts[seen] / counts.sum()
    if scheme in ("inverse", "capped"):
        inv[seen] = 1 / f
        if scheme == "capped":
            inv[seen] = np.minimum(inv[seen], inv[seen].min() * MAX_RATIO)
    elif scheme == "sqrt":
        inv[seen] = 1 / np.sqrt(f)
    elif scheme == "median":
        inv[seen] = np.median(f) / f
    else:  # effective number of samples
        beta = 1 - 1 / counts.max()
        inv[seen] = (1 - beta) / (1 - beta ** counts[seen])
    if not seen.all():
        missing = [names[i] for i in np.flatnonzero(~seen)]
        warnings.warn(f"classes never seen in the labels: {missing}; they get the largest weight of the others")
        inv[~seen] = inv[seen].max()
    w = inv / inv.sum() * len(counts)
    return torch.tensor(w, dtype=torch.float32)


def compute_class_weights(dataset, source, scheme):
    counts = count_classes(dataset, source)
    return weights_from_counts(counts, dataset.classes.names, scheme), counts


def save_class_weights(path, weights, counts, source, names, scheme):
    torch.save({"weights": weights, "counts": torch.as_tensor(counts), "source": source, "scheme": scheme,
                "classes": list(names)}, path)


def load_class_weights(path, names):
    """Load weights saved by save_class_weights, checking they belong to these classes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class weights {path} not found; a training run writes its own as "
                                f"<out>/class_weights.pt (--class-weights points or dense)")
    fmt = ('a dict {"weights": tensor of one weight per class, "classes": [names]}, as a run writes '
           '<out>/class_weights.pt')
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding code
        raise ValueError(f"{path} cannot be read as class weights ({type(e).__name__}); it must be {fmt}") from None
    if not isinstance(d, dict) or "weights" not in d or "classes" not in d:
        what = f"{type(d).__name__}{' without weights or classes' if isinstance(d, dict) else ''}"
        raise ValueError(f"{path} holds a {what}"
                         f"; class weights must be {fmt}")
    if list(d["classes"]) != list(names):
        raise ValueError(f"{path} holds weights for classes {list(d['classes'])}, not {list(names)}")
    w = d["weights"]
    if not isinstance(w, torch.Tensor) or w.shape != (len(names),):
        raise ValueError(f"{path} holds {tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__} "
                         f"weights for {len(names)} classes; it must be one weight per class")
    if not (torch.isfinite(w).all() and (w >= 0).all() and (w > 0).any()):
        raise ValueError(f"{path} holds weights {w.tolist()}: every weight must be a finite number >= 0, and one > 0")
    return w.float()
