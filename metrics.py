"""Segmentation metrics from one confusion matrix: OA, per-class IoU and F1, mIoU, mean F1.

    from metrics import ConfusionMatrix
    cm = ConfusionMatrix(6, device="cuda"); cm.update(pred, target); cm.compute(exclude=("clutter",))

Rows are the true class, columns the prediction; IGNORE_INDEX pixels in the target are left out. `exclude`
leaves classes (e.g. clutter, a common Potsdam protocol) out of the means, not out of OA.
"""

import numpy as np
import torch

from spec import CLASSES, IGNORE_INDEX


class ConfusionMatrix:
    """`device`: where the counts live. On a GPU, update() never waits for the device (no bincount, no
    boolean indexing): out-of-range targets are counted apart and reported by compute(), the one sync."""

    def __init__(self, num_classes, names=None, ignore_index=IGNORE_INDEX, device="cpu"):
        self.num_classes = num_classes
        self.names = tuple(names) if names is not None else tuple(CLASSES[:num_classes])
        self.ignore_index = ignore_index
        # k*k cells, then one slot for ignored pixels and one for targets outside 0..k-1
        self.counts = torch.zeros(num_classes * num_classes + 2, dtype=torch.int64, device=device)

    @property
    def mat(self):
        """(k, k) int64 on the CPU: rows true class, columns prediction."""
        k = self.num_classes
        return self.counts[: k * k].reshape(k, k).cpu()

    def update(self, pred, target):
        """pred, target: integer tensors of the same shape (any), on any device (moved to the matrix's)."""
        dev = self.counts.device
        pred = torch.as_tensor(pred).reshape(-1).to(dev, non_blocking=True).long()
        target = torch.as_tensor(target).reshape(-1).to(dev, non_blocking=True).long()
        k = self.num_classes
        ignored = target == self.ignore_index
        bad = ~ignored & ((target < 0) | (target >= k) | (pred < 0) | (pred >= k))
        idx = torch.where(ignored, k * k, torch.where(bad, k * k + 1, target * k + pred))
        self.counts.index_add_(0, idx, torch.ones_like(idx))
        if dev.type == "cpu":  # checking costs nothing here; on a GPU compute() checks once
            self._check()
        return self

    def _check(self):
        bad = int(self.counts[-1])
        if bad:
            raise ValueError(f"target (or prediction) holds values outside 0..{self.num_classes - 1} and "
                             f"{self.ignore_index} ({bad} pixels)")

    def compute(self, exclude=()):
        """Returns a dict: oa, miou, mf1, iou {name: value}, f1 {name: value}, pixels.
        A class absent from both target and prediction has IoU/F1 NaN and is left out of the means."""
        self._check()
        m = self.mat.double()
        tp = m.diag()
        fp, fn = m.sum(0) - tp, m.sum(1) - tp
        total = m.sum()
        iou = (tp / (tp + fp + fn)).numpy()  # torch division: 0/0 is NaN without a warning
        f1 = (2 * tp / (2 * tp + fp + fn)).numpy()
        unknown = set(exclude) - set(self.names)
        if unknown:
            raise ValueError(f"cannot exclude {sorted(unknown)}: classes are {self.names}")
        keep = np.array([n not in exclude for n in self.names])
        mean = lambda v: float(np.nanmean(v[keep])) if np.isfinite(v[keep]).any() else float("nan")
        return {
            "oa": float(tp.sum() / total) if total > 0 else float("nan"),
            "miou": mean(iou),
            "mf1": mean(f1),
            "iou": {n: float(v) for n, v in zip(self.names, iou)},
            "f1": {n: float(v) for n, v in zip(self.names, f1)},
            "pixels": int(total),
        }
