"""A click changes the map at once, with no network training: a small head re-fitted on a trained network's
per-pixel features at the clicked pixels (the ilastik way, on learned features instead of filter banks).

    from page.head import Features, fit_head
    feats = Features("checkpoints/annotate/model.pth")           # the network and its preprocessing contract
    x = feats.at("tile", "tile.tif", rows, cols)                 # (n, D) features at image pixels (row, col)
    head = fit_head(x, classes, feats.weight, feats.bias)        # a fraction of a second for hundreds of clicks
    grid = head.predict(feats.of("tile", "tile.tif"))            # (h, w) class map on the processing grid

The annotation page's `live` overlay layer uses it (page/live.py); research/click_response.py measures it.

Features: the input of the network's output layer (`model.output_layer`, the 1x1 classifier): the decoder's last
feature map, at the processing grid's resolution (ResNet18: 32 channels; the tiny test network: 16). The image goes
through the checkpoint's contract (spec.load_input, spec.to_grid: bands, intensity, scale) as for predict.py, and
is cut into overlapping tiles blended as predict.py blends probabilities, so a large image keeps memory bounded per
tile. They are cached per image (float16) for the model they came from; a new model is a new `Features`.

The head (`Head`): multinomial logistic regression on the features. Anchored (the default): its weights start at the
network's own classifier (its logits, the checkpoint's class prior included) and the fit pays `l2 / 2 * |W - W0|^2`
to leave them, so with no clicks it paints the network's map exactly and each click moves it only as far as the
clicks ask. `anchored=False` is plain L2-regularised logistic regression from zero, which knows only the clicked
classes. A click's cell is points_to_grid's: image row r lies in grid row r * h // H (the overlay's rule too).
"""

import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import load_model, prior_shift
from predict import blend_window, tile_starts
from spec import load_input, to_grid

L2 = 1.0  # the anchored head's pull toward the network's classifier (research/click_response.py measured it)
L2_SCRATCH = 1e-2  # plain logistic regression's weight decay (features standardised)
FIT_ITERATIONS = 100  # L-BFGS iterations of one fit
CACHE_BYTES = 1 << 30  # feature maps kept per model (float16); the least recently used go first

# --------------------------------------------------------------------------- features


@torch.inference_mode()
def extract_features(model, small, tile=512, overlap=64):
    """(D, h, w) float32: the input of `model`'s output layer over a processing-grid image `small` ((h, w, B) uint8),
    tiled and blended like predict.py's probabilities."""
    layer = model.get_submodule(model.output_layer)
    grabbed = []
    hook = layer.register_forward_pre_hook(lambda module, inputs: grabbed.append(inputs[0]))
    try:
        h, w = small.shape[:2]
        ys, th = tile_starts(h, tile, overlap)
        xs, tw = tile_starts(w, tile, overlap)
        window = blend_window(th, tw, overlap)
        acc, wsum = None, torch.zeros(h, w)
        device = next(model.parameters()).device
        for y in ys:
            for x in xs:
                t = torch.from_numpy(np.array(small[y:y + th, x:x + tw])).permute(2, 0, 1)[None]
                grabbed.clear()
                model(t.to(device).float().div_(255))
                f = grabbed[0][0, :, :th, :tw].float().cpu()  # ResNet's is padded to a multiple of 32
                if acc is None:
                    acc = torch.zeros(f.shape[0], h, w)
                acc[:, y:y + th, x:x + tw].addcmul_(f, window)
                wsum[y:y + th, x:x + tw] += window
    finally:
        hook.remove()
    return acc.div_(wsum).numpy()


def grid_cells(rows, cols, image_shape, grid_shape):
    """Grid rows and columns of image pixels (rows, cols): points_to_grid's rule."""
    (H, W), (h, w) = image_shape, grid_shape
    return np.asarray(rows, np.int64) * h // H, np.asarray(cols, np.int64) * w // W


class Features:
    """A checkpoint's network, its classifier (`weight` (C, D), `bias` (C,), the class prior's shift included) and
    its per-pixel features of images, extracted once per image and kept (up to CACHE_BYTES)."""

    def __init__(self, checkpoint, device="cpu", cache_bytes=CACHE_BYTES):
        self.model, self.ck = load_model(checkpoint, device)
        self.spec = self.ck.spec
        out = self.model.get_submodule(self.model.output_layer)
        self.weight = out.weight.detach().float().cpu().flatten(1).numpy()  # (C, D) of the 1x1 convolution
        bias = out.bias.detach().float().cpu()
        if self.ck.prior is not None:  # the logits load_model's hook shifts: the map the page shows
            bias = bias + prior_shift(self.ck.prior).float()
        self.bias = bias.numpy()
        self.cache, self.cache_bytes = OrderedDict(), cache_bytes
        self.shapes = {}  # name -> (image (H, W), grid (h, w))
        self.seconds = 0.0  # spent extracting so far

    def of(self, name, path):
        """(D, h, w) float16 features of the image `path` on its processing grid (cached under `name`)."""
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        t0 = time.perf_counter()
        image = load_input(path, self.spec).image
        small = to_grid(image, self.spec.scale)
        f = extract_features(self.model, small).astype(np.float16)
        self.seconds += time.perf_counter() - t0
        self.shapes[name] = (image.shape[:2], small.shape[:2])
        self.cache[name] = f
        while len(self.cache) > 1 and sum(v.nbytes for v in self.cache.values()) > self.cache_bytes:
            self.cache.popitem(last=False)
        return f

    def at(self, name, path, rows, cols):
        """(n, D) float32 features at image pixels (rows, cols) of the image."""
        f = self.of(name, path)
        r, c = grid_cells(rows, cols, *self.shapes[name])
        return f[:, r, c].T.astype(np.float32)

    def window(self, name, path, rows, cols):
        """(D, len(rows), len(cols)) float16 features at grid rows x grid cols (the overlay's cells)."""
        f = self.of(name, path)
        return f[:, rows][:, :, cols]


# --------------------------------------------------------------------------- the head


class Head:
    """A linear head: class = argmax(W f + b) over features f; `predict` takes (D, h, w) features."""

    def __init__(self, weight, bias, mean=None, std=None):
        self.weight, self.bias = weight.astype(np.float32), bias.astype(np.float32)
        self.mean, self.std = mean, std  # standardisation of the plain head (None: raw features)

    def predict(self, features):
        """(h, w) uint8 class map."""
        D = features.shape[0]
        f = torch.from_numpy(np.ascontiguousarray(features)).reshape(D, -1).float()
        if self.mean is not None:
            f = (f - torch.from_numpy(self.mean)[:, None]) / torch.from_numpy(self.std)[:, None]
        out = torch.addmm(torch.from_numpy(self.bias)[:, None], torch.from_numpy(self.weight), f)
        return torch.max(out, 0).indices.to(torch.uint8).reshape(features.shape[1:]).numpy()


def fit_head(x, y, weight, bias, anchored=True, l2=None, iterations=FIT_ITERATIONS):
    """A Head fitted on features x (n, D) and classes y (n,) of the clicks. Anchored: minimises the clicks' summed
    cross-entropy + l2 / 2 * (|W - weight|^2 + |b - bias|^2), starting from the network's classifier (weight (C, D),
    bias (C,)); with no clicks it is that classifier. Not anchored: from zero on standardised features, weight decay
    l2 on W; a class without clicks is never predicted."""
    C, D = weight.shape
    x, y = np.asarray(x, np.float32).reshape(-1, D), np.asarray(y, np.int64)
    mean = std = None
    if anchored:
        l2 = L2 if l2 is None else l2
        W0, b0 = torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))
    else:
        l2 = L2_SCRATCH if l2 is None else l2
        mean = x.mean(0) if len(x) else np.zeros(D, np.float32)
        std = x.std(0) + 1e-6 if len(x) else np.ones(D, np.float32)
        x = (x - mean) / std
        W0, b0 = torch.zeros(C, D), torch.full((C,), -1e3)
        b0[np.unique(y)] = 0  # the classes nobody clicked stay out of the map
    if len(y) == 0:
        return Head(W0.numpy(), b0.numpy(), mean, std)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    W, b = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iterations, tolerance_grad=1e-5, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X @ W.T + b, Y, reduction="sum") + l2 / 2 * (W - W0).pow(2).sum()
        if anchored:
            loss = loss + l2 / 2 * (b - b0).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    W, b = W.detach(), b.detach()
    if not (torch.isfinite(W).all() and torch.isfinite(b).all()):
        raise FloatingPointError("the click head's fit diverged (non-finite weights)")
    return Head(W.numpy(), b.numpy(), mean, std)


def fit_forest(x, y, trees=50, seed=0):
    """A random forest on the clicks' features (the comparison research/click_response.py measures): an object with
    `predict((D, h, w) features) -> (h, w) uint8`."""
    from sklearn.ensemble import RandomForestClassifier
    forest = RandomForestClassifier(trees, n_jobs=1, random_state=seed).fit(np.asarray(x, np.float32), y)

    class Forest:
        def predict(self, features):
            D = features.shape[0]
            flat = features.reshape(D, -1).T.astype(np.float32)
            return forest.classes_[forest.predict_proba(flat).argmax(1)].astype(np.uint8).reshape(features.shape[1:])
    return Forest()
