"""Class weights from the point labels (default), from the pixel shares the clicks imply, or from the dense labels
(published choice).

    python train.py --class-weights points --class-weighting sqrt      # the default: sqrt of the points' counts
    python train.py --points 1/object --class-weights pixels           # clicks that are not a random sample
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

`pixels` is for clicks that are not a random sample of the pixels: one click per object puts a 5 % class at 60 % of
the clicks (Atlanta's buildings), and weights from those counts tell the model the class is common. It estimates
each class's share of the training pixels from the clicks alone: a random forest fitted on the clicks
(forest.click_probabilities) gives class probabilities at pixels drawn over the training images; those were
learnt under the clicks' class shares, and the EM of Saerens, Latinne & Decaestecker (2002, "Adjusting the outputs of
a classifier to new a priori probabilities") re-estimates the shares they imply (estimate_pixel_shares). Each class
keeps at least the share its clicked pixels have. The weights then make each class's clicks count as its pixels
would under the scheme (weights_from_shares). With `inverse` the shares cancel out (inverse frequency makes each
class count the same whatever its share): the source matters for the other schemes.
"""

import warnings
from pathlib import Path

import numpy as np
import torch

from config import SCHEMES  # the choices are declared with the settings
from spec import IGNORE_INDEX

MAX_RATIO = 10.0  # the `capped` scheme's largest / smallest weight
EM_ITERATIONS, EM_TOLERANCE = 2000, 1e-7  # estimate_pixel_shares: at most this many rounds; stop below this change


def count_classes(dataset, source="points"):
    """Pixels per class over a SegmentationDataset, from its point maps or its dense labels."""
    if source not in ("points", "dense"):
        raise ValueError(f"source must be points or dense, got {source!r}")
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


def estimate_pixel_shares(probabilities, prior, iterations=EM_ITERATIONS, tolerance=EM_TOLERANCE):
    """The class shares of the pixels behind (C, N) class probabilities that a classifier learnt under class
    shares `prior` (C,): the EM of Saerens et al. (2002). Each round re-weights every pixel's probabilities by
    (estimate / prior) and takes their mean as the next estimate, until it changes by less than `tolerance`.
    A class the prior lacks stays at 0."""
    p = np.asarray(probabilities, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != len(prior) or p.shape[1] == 0:
        raise ValueError(f"probabilities must be (classes, pixels) for {len(prior)} classes, got {p.shape}")
    if not np.isclose(prior.sum(), 1) or (prior < 0).any():
        raise ValueError(f"prior must be shares >= 0 summing to 1, got {prior.tolist()}")
    seen = prior > 0
    shares = prior.copy()
    for _ in range(iterations):
        ratio = np.zeros_like(shares)
        ratio[seen] = shares[seen] / prior[seen]
        q = p * ratio[:, None]
        total = q.sum(0, keepdims=True)
        q = np.divide(q, total, out=np.zeros_like(q), where=total > 0)
        new = q.mean(1)
        new = new / new.sum() if new.sum() > 0 else prior
        done = np.abs(new - shares).max() < tolerance
        shares = new
        if done:
            break
    return shares


def weights_from_shares(shares, clicks, names, scheme):
    """Class weights for clicks counted `clicks` (C,) that stand for pixels of class shares `shares` (C,): the
    scheme's weights for those shares times each class's shares / click share, so that a class's clicks weigh in the
    loss as its pixels would under the scheme. Normalised to sum to C; a class without clicks is handled as in
    weights_from_counts."""
    clicks = np.asarray(clicks, dtype=np.float64)
    shares = np.asarray(shares, dtype=np.float64)
    base = weights_from_counts(shares * clicks.sum(), names, scheme).double().numpy()
    seen = clicks > 0
    w = np.zeros_like(base)
    w[seen] = base[seen] * shares[seen] / (clicks[seen] / clicks.sum())
    w[~seen] = w[seen].max() if seen.any() else 1.0
    return torch.tensor(w / w.sum() * len(w), dtype=torch.float32)


def pixel_shares(dataset, seed=0):
    """(shares (C,), click counts (C,)): each class's estimated share of the training pixels from the clicks
    alone (the module docstring), never below the share its clicked pixels make of all training pixels."""
    import forest  # scikit-learn, needed by this source only
    clicks = count_classes(dataset, "points")
    if clicks.sum() == 0:
        raise ValueError("no labelled pixel at all: cannot estimate the classes' pixel shares")
    probabilities, total = forest.click_probabilities(dataset, seed=seed)
    shares = estimate_pixel_shares(probabilities, clicks / clicks.sum())
    shares = np.maximum(shares, clicks / total)
    return shares / shares.sum(), clicks


def compute_class_weights(dataset, source, scheme, seed=0, say=True):
    """(weights, counts, shares) from `source` (config.WEIGHT_SOURCES) by `scheme`; with `pixels`, `counts` are the clicks, the
    weights follow the estimated pixel shares (seeded forest) and `shares` are those (else None); `say`: print
    the estimate."""
    if source == "pixels":
        shares, clicks = pixel_shares(dataset, seed)
        names = dataset.classes.names
        if say:
            print("estimated pixel shares from the clicks: " + ", ".join(f"{n} {s:.1%}" for n, s in zip(names, shares))
                  + " (clicks: " + ", ".join(f"{n} {c / clicks.sum():.1%}" for n, c in zip(names, clicks)) + ")",
                  flush=True)
        return weights_from_shares(shares, clicks, names, scheme), clicks, shares
    counts = count_classes(dataset, source)
    return weights_from_counts(counts, dataset.classes.names, scheme), counts, None


def save_class_weights(path, weights, counts, source, names, scheme, shares=None):
    """`shares`: the estimated pixel shares the weights follow (source `pixels`), kept beside them."""
    d = {"weights": weights, "counts": torch.as_tensor(counts), "source": source, "scheme": scheme,
         "classes": list(names)}
    if shares is not None:
        d["shares"] = torch.as_tensor(shares, dtype=torch.float64)
    torch.save(d, path)


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
