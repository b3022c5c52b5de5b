"""Losses on the unlabelled pixels, for training from a few clicks: they add to the partial cross-entropy.

    python train.py --points 10 --affinity-weight 1 --consistency-weight 1      # how train.py uses them

- `affinity_loss`: a gated CRF-style pairwise loss (Obukhov et al. 2019, "Gated CRF loss"; Tang et al. 2018,
  "dense CRF loss"). Neighbouring pixels of similar colour should get the same class:

      loss = 1 / (|V| (K^2 - 1)) * sum_{i in V} sum_{j in window(i), j != i, j in V} k_ij (1 - sum_c P_i(c) P_j(c))
      k_ij = exp(-|I_i - I_j|^2 / (2 sigma_rgb^2) - |p_i - p_j|^2 / (2 sigma_xy^2))

  over the valid pixels V (padding left out), labelled ones included: the pairs between a click and its
  neighbours are what carries the click's class outwards. 1 - P_i.P_j is the Potts relaxation
  sum_c P_i(c) (1 - P_j(c)) (the same number, as sum_c P_i(c) = 1). Dividing by the K^2 - 1 neighbours of a
  K x K window (Obukhov et al. divide by |V| only) keeps the loss in [0, 1) whatever the window.
- `consistency_loss` with `strong_view` / `geometric` / `geometric_inverse`: FixMatch-style (Sohn et al.
  2020). The batch as it is (the weak view) gives pseudo-labels where the model is confident; a strong view
  (photometric jitter and a 90-degree rotation / flip) is predicted, turned back, and trained towards them.
  Labelled points are left out (the partial cross-entropy already has their true class); the sum is divided
  by the number of candidate pixels, confident or not, as FixMatch divides by the unlabelled batch.

Images are (N, B, H, W) in [0, 1] as the datasets give them; padding (pad_collate) is 0 in every band.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------- helpers


def valid_pixels(image):
    """(N, H, W) bool: False where every band is exactly 0, which is what pad_collate pads with. A genuinely
    black pixel is left out of the unsupervised terms too, which costs nothing; dense labels are not needed."""
    return (image != 0).any(1)


def _shifted_pair(x, dy, dx):
    """Views (a, b) of x (..., H, W) such that b[..., y, x] is the pixel (dy, dx) away from a[..., y, x].
    dy >= 0; dx any sign. Empty when the shift is as large as the image."""
    H, W = x.shape[-2:]
    a_cols, b_cols = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    return x[..., 0:H - dy, a_cols], x[..., dy:H, b_cols]


# --------------------------------------------------------------------------- affinity (gated CRF)

def affinity_loss(logits, image, valid=None, kernel_size=5, dilation=2, sigma_rgb=0.1, sigma_xy=4.0):
    """Gated CRF-style pairwise loss (see the module docstring for the formula).

    Args:
        logits: (N, C, H, W) float.
        image: (N, B, H, W) float in [0, 1]; the colour distance sums over the B bands.
        valid: (N, H, W) bool, False for padding (no pair touching it counts); None = every pixel.
        kernel_size: K, the side of the window (odd); the window's offsets are multiplied by `dilation`.
        sigma_rgb: colour bandwidth (image units); sigma_xy: spatial bandwidth (pixels of this grid).
    Returns a scalar in [0, 1); 0 without valid pixels. The image and the kernel carry no gradient.
    """
    if logits.dim() != 4 or image.dim() != 4 or image.shape[0] != logits.shape[0] \
            or image.shape[2:] != logits.shape[2:]:
        raise ValueError(f"expected logits (N, C, H, W) and image (N, B, H, W) of the same N, H, W; got "
                         f"{tuple(logits.shape)} and {tuple(image.shape)}")
    if kernel_size < 3 or kernel_size % 2 == 0 or dilation < 1:
        raise ValueError(f"kernel size must be odd and >= 3, dilation >= 1; got {kernel_size}, {dilation}")
    if not (sigma_rgb > 0 and sigma_xy > 0):
        raise ValueError(f"sigmas must be > 0, got sigma_rgb {sigma_rgb}, sigma_xy {sigma_xy}")
    prob = F.softmax(logits.float(), dim=1)
    image = image.detach().float()
    v = torch.ones_like(prob[:, 0]) if valid is None else valid.to(prob.dtype)
    r = kernel_size // 2
    total = prob.new_zeros(())
    # each unordered pair once (half the window), counted twice below
    for dy in range(0, r + 1):
        for dx in range(-r, r + 1):
            if dy == 0 and dx <= 0:
                continue
            sy, sx = dy * dilation, dx * dilation
            if sy >= prob.shape[-2] or abs(sx) >= prob.shape[-1]:
                continue
            pa, pb = _shifted_pair(prob, sy, sx)
            ia, ib = _shifted_pair(image, sy, sx)
            va, vb = _shifted_pair(v, sy, sx)
            colour = (ia - ib).pow(2).sum(1)
            kernel = torch.exp(-colour / (2 * sigma_rgb ** 2) - (sy * sy + sx * sx) / (2 * sigma_xy ** 2)) * va * vb
            total = total + (kernel * (1 - (pa * pb).sum(1))).sum()
    return 2 * total / (v.sum().clamp_min(1) * (kernel_size ** 2 - 1))


class AffinityLoss(nn.Module):
    """nn.Module wrapper of `affinity_loss`: forward(logits (N, C, H, W), image (N, B, H, W), valid (N, H, W))."""

    def __init__(self, kernel_size=5, dilation=2, sigma_rgb=0.1, sigma_xy=4.0):
        super().__init__()
        self.kernel_size, self.dilation, self.sigma_rgb, self.sigma_xy = kernel_size, dilation, sigma_rgb, sigma_xy

    def forward(self, logits, image, valid=None):
        return affinity_loss(logits, image, valid, self.kernel_size, self.dilation, self.sigma_rgb, self.sigma_xy)


# --------------------------------------------------------------------------- consistency (FixMatch-style)

def geometric(x, k, flip):
    """Rotate (..., H, W) by k x 90 degrees (torch.rot90 on the last two dims), then flip left-right if asked."""
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def geometric_inverse(x, k, flip):
    """Undo `geometric(., k, flip)`: flip back first, then rotate by -k x 90 degrees."""
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, -k, dims=(-2, -1))


def photometric(image, valid=None, brightness=0.2, contrast=0.2, noise=0.03):
    """Per image: contrast x U(1 - contrast, 1 + contrast) around its mean, + U(-brightness, brightness), then
    Gaussian noise of std `noise` per pixel; clipped to [0, 1]. Padding (valid False) stays 0. Uses torch's
    global RNG (seeded by train.py)."""
    n = image.shape[0]
    v = torch.ones_like(image[:, :1]) if valid is None else valid[:, None].to(image.dtype)
    mean = (image * v).sum((1, 2, 3), keepdim=True) / (v.sum((1, 2, 3), keepdim=True) * image.shape[1]).clamp_min(1)
    c = 1 + contrast * (2 * torch.rand(n, 1, 1, 1) - 1)
    b = brightness * (2 * torch.rand(n, 1, 1, 1) - 1)
    out = (image - mean) * c.to(image) + mean + b.to(image)
    out = out + noise * torch.randn(image.shape, device=image.device, dtype=image.dtype)
    return out.clamp(0, 1) * v


def strong_view(image, valid=None, brightness=0.2, contrast=0.2, noise=0.03):
    """(strong image, k, flip): photometric jitter per image, then one random 90-degree rotation k and flip for
    the whole batch (torch's global RNG). Turn its prediction back with geometric_inverse(pred, k, flip)."""
    k = int(torch.randint(0, 4, (1,)))
    flip = bool(torch.randint(0, 2, (1,)))
    return geometric(photometric(image, valid, brightness, contrast, noise), k, flip), k, flip


def consistency_loss(strong_logits, weak_logits, mask=None, threshold=0.95):
    """Cross-entropy of the strong view's prediction against the weak view's confident pseudo-labels.

    Args:
        strong_logits: (N, C, H, W), already turned back into the weak view's frame; carries the gradient.
        weak_logits: (N, C, H, W); its argmax is the pseudo-label where its softmax max >= threshold
            (no gradient flows into it).
        mask: (N, H, W) bool, the candidate pixels (unlabelled and not padding); None = all.
    Returns sum over confident candidates / number of candidates (0, with a zero gradient, when no pixel is
    confident or no pixel is a candidate).
    """
    if strong_logits.shape != weak_logits.shape or strong_logits.dim() != 4:
        raise ValueError(f"expected strong and weak logits of the same (N, C, H, W) shape; got "
                         f"{tuple(strong_logits.shape)} and {tuple(weak_logits.shape)}")
    with torch.no_grad():
        confidence, pseudo = F.softmax(weak_logits.detach().float(), dim=1).max(1)
        keep = confidence >= threshold
        if mask is not None:
            keep &= mask
        candidates = mask.sum() if mask is not None else torch.tensor(pseudo.numel(), device=pseudo.device)
    if not keep.any():
        return strong_logits.sum() * 0.0
    ce = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
    return (ce * keep).sum() / candidates.clamp_min(1)


class ConsistencyLoss(nn.Module):
    """FixMatch-style consistency: forward(model, image (N, B, H, W), weak_logits (N, C, H, W), mask (N, H, W)).

    Makes a strong view of `image` (strong_view), predicts it with `model`, turns the prediction back and
    applies `consistency_loss` against `weak_logits` (the model's prediction of `image` as it is) on `mask`.
    """

    def __init__(self, threshold=0.95, brightness=0.2, contrast=0.2, noise=0.03):
        super().__init__()
        self.threshold, self.brightness, self.contrast, self.noise = threshold, brightness, contrast, noise

    def forward(self, model, image, weak_logits, mask=None, valid=None):
        valid = valid_pixels(image) if valid is None else valid
        strong, k, flip = strong_view(image, valid, self.brightness, self.contrast, self.noise)
        back = geometric_inverse(model(strong), k, flip)
        return consistency_loss(back, weak_logits, mask, self.threshold)


# --------------------------------------------------------------------------- a worked example
