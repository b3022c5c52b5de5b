"""Segmentation metrics from one confusion matrix: OA, per-class IoU and F1, mIoU, mean F1.

    from metrics import ConfusionMatrix
    cm = ConfusionMatrix(6); cm.update(pred, target); cm.compute(exclude=("clutter",))

Rows are the true class, columns the prediction; IGNORE_INDEX pixels in the target are left out. `exclude`
leaves classes (e.g. clutter, a common Potsdam protocol) out of the means, not out of OA.
"""

import numpy as np
import torch

from spec import CLASSES, IGNORE_INDEX


class ConfusionMatrix:
    def __init__(self, num_classes, names=None, ignore_index=IGNORE_INDEX):
        self.num_classes = num_classes
        self.names = tuple(names) if names is not None else tuple(CLASSES[:num_classes])
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred, target):
        """pred, target: integer tensors of the same shape (any)."""
        pred, target = torch.as_tensor(pred).reshape(-1).cpu(), torch.as_tensor(target).reshape(-1).cpu()
        keep = target != self.ignore_index
        if (target[keep] >= self.num_classes).any() or (target[keep] < 0).any():
            raise ValueError(f"target holds values outside 0..{self.num_classes - 1} and {self.ignore_index}")
        k = self.num_classes
        idx = target[keep].long() * k + pred[keep].long()
        self.mat += torch.bincount(idx, minlength=k * k).reshape(k, k)
        return self

    def compute(self, exclude=()):
        """Returns a dict: oa, miou, mf1, iou {name: value}, f1 {name: value}, pixels.
        A class absent from both target and prediction has IoU/F1 NaN and is left out of the means."""
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
