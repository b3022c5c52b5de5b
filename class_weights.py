"""Inverse-frequency class weights, from the point labels (default) or the dense labels (published choice).

    python class_weights.py --data demo_data/patches --points 20000 --source points --out class_weights.pt

w_c = (1 / f_c), normalised so the weights sum to the number of classes, with f_c the share of class c among
the labelled pixels at processing resolution. Points are what an annotator actually has; dense labels are
what the published description used (information a point-supervised user does not have).
"""

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

from dataset import PotsdamDataset, available_ids, parse_points
from spec import IGNORE_INDEX, NATIVE_SIZE, POTSDAM, DataSpec

SOURCES = ("points", "dense")


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


def weights_from_counts(counts, names=POTSDAM.names):
    """Inverse-frequency weights summing to C. A class never seen gets the largest weight of the seen ones
    (finite) and a warning: the loss never meets it anyway, but the weights stay usable."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() == 0:
        raise ValueError("no labelled pixel at all: cannot compute class weights")
    seen = counts > 0
    inv = np.zeros_like(counts)
    inv[seen] = counts.sum() / counts[seen]
    if not seen.all():
        missing = [names[i] for i in np.flatnonzero(~seen)]
        warnings.warn(f"classes never seen in the labels: {missing}; they get the largest weight of the others")
        inv[~seen] = inv[seen].max()
    w = inv / inv.sum() * len(counts)
    return torch.tensor(w, dtype=torch.float32)


def compute_class_weights(dataset, source="points"):
    counts = count_classes(dataset, source)
    return weights_from_counts(counts, dataset.classes.names), counts


def save_class_weights(path, weights, counts, source, names):
    torch.save({"weights": weights, "counts": torch.as_tensor(counts), "source": source,
                "classes": list(names)}, path)


def load_class_weights(path, names=POTSDAM.names):
    """Load weights saved by save_class_weights, checking they belong to these classes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class weights {path} not found; compute them with python class_weights.py")
    d = torch.load(path, map_location="cpu", weights_only=True)
    if list(d.get("classes", [])) != list(names):
        raise ValueError(f"{path} holds weights for classes {d.get('classes')}, not {list(names)}")
    return d["weights"]


def get_args_parser():
    p = argparse.ArgumentParser(description="Compute inverse-frequency class weights.")
    p.add_argument("--data", default="demo_data/patches")
    p.add_argument("--points", default="20000", help="points per image, a share like 1%%, or 'dense'")
    p.add_argument("--source", default="points", choices=SOURCES)
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="class_weights.pt")
    return p


def main(args):
    ds = PotsdamDataset(args.data, available_ids(args.data), spec=DataSpec(scale=args.size / NATIVE_SIZE),
                        seed=args.seed, points=parse_points(args.points))
    w, counts = compute_class_weights(ds, args.source)
    save_class_weights(args.out, w, counts, args.source, ds.classes.names)
    for name, c, wi in zip(ds.classes.names, counts, w.tolist()):
        print(f"{name:20s} {c / counts.sum():7.2%}  weight {wi:.3f}")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
