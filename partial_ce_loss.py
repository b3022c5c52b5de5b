"""Partial cross-entropy: only labelled pixels (points) count, with a focal term and class weights.

    python train.py --gamma 2 --class-weights points --normalization weighted      # how train.py uses it

For a labelled pixel i with class y_i and predicted probability p_i of that class:

    l_i = -w[y_i] * (1 - p_i) ** gamma * log(p_i)

Normalisation (decided here): `"weighted"` (default) divides the sum by sum_i w[y_i], exactly as
`F.cross_entropy(weight=...)` does, so gamma = 0 reproduces it with or without weights and the loss scale does
not depend on which classes a batch happens to hold. `"points"` divides by the number of labelled pixels
(the published choice); with weights normalised to sum to C both give the same ranking of models, but the
weighted mean keeps the learning rate meaningful when class weights are large.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import NORMALIZATIONS  # the choices are declared with the settings
from spec import IGNORE_INDEX


def partial_cross_entropy(logits, target, weight=None, gamma=2.0, ignore_index=IGNORE_INDEX,
                          normalization="weighted"):
    """Focal partial cross-entropy.

    Args:
        logits: (N, C, H, W) float.
        target: (N, H, W) long; `ignore_index` where unlabelled.
        weight: optional (C,) class weights.
        gamma: focal exponent; 0 gives plain (weighted) cross-entropy.
    Returns a scalar. With no labelled pixel it is 0 (finite, zero gradient), not NaN.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if logits.dim() != 4 or target.shape != (logits.shape[0],) + logits.shape[2:]:
        raise ValueError(f"expected logits (N, C, H, W) and target (N, H, W); got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    mask = target != ignore_index
    if not mask.any():
        return logits.sum() * 0.0
    logp = F.log_softmax(logits.float(), dim=1).permute(0, 2, 3, 1)[mask]  # (P, C), labelled pixels only
    y = target[mask]
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    loss = -logp_y
    if gamma:
        loss = loss * (1.0 - logp_y.exp()).clamp_min(0).pow(gamma)
    w = weight.to(loss.device, loss.dtype)[y] if weight is not None else torch.ones_like(loss)
    loss = loss * w
    denom = w.sum() if normalization == "weighted" else torch.tensor(float(y.numel()), device=loss.device)
    return loss.sum() / denom.clamp_min(torch.finfo(loss.dtype).tiny)


class PartialCrossEntropyLoss(nn.Module):
    """nn.Module wrapper of `partial_cross_entropy` (shapes: logits (N, C, H, W), target (N, H, W) long)."""

    def __init__(self, gamma=2.0, weight=None, ignore_index=IGNORE_INDEX, normalization="weighted"):
        super().__init__()
        self.gamma, self.ignore_index, self.normalization = gamma, ignore_index, normalization
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float))

    def forward(self, logits, target):
        return partial_cross_entropy(logits, target, self.weight, self.gamma, self.ignore_index,
                                     self.normalization)
