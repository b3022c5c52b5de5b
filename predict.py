"""Predict an image of any size with a segmentation model: class indices (or probabilities) at the input's size.

    from checkpoint import load_model; from predict import predict_image; from spec import load_input
    model, ckpt = load_model("checkpoints/best_model.pth", "cpu")
    image = load_input("tile.tif", ckpt.spec).image              # (H, W, bands) uint8, the checkpoint's contract
    mask = predict_image(model, image, ckpt.spec.scale, tile=512, overlap=64, tta="flip")   # (H, W) uint8

infer.py segments a folder with these functions (`python infer.py --input tiles/ --output masks/`); training
draws its figures here (`plot_history`: the curves; `plot_results`: image | truth | points | `predict_image`), the
annotation page its overlay with `predict_probabilities`. A click-conditioned model (train.py --click-input) is
also given a person's clicks (`clicks=`): they become planes on the processing grid, beside the image's bands.

How an image is predicted (`predict_image`): it is resized by the checkpoint's scale (processing size /
native size, e.g. 300 -> 150 = 0.5) so objects have the size the model learned; the resized image is cut
into overlapping tiles (`tile`, `overlap`, in resized pixels) run in batches; class probabilities are
blended with weights that fade to ~0 at tile edges (no seams), optionally averaged over flips and 90-degree
rotations (`tta`), and bilinearly upsampled back to the input size before the argmax. Click planes are cut into
the same tiles and flipped with them. Rows are finished
and upsampled as the tiles move down the image, so memory stays bounded for 6000x6000 tiles and beyond.
What a file becomes before the model (bands, intensity, scale) is the checkpoint's contract: spec.py,
the same functions training uses.

A TIFF too large to hold is streamed (`StreamedInput`, `predict_streamed`; infer.py does it above
infer.STREAM_PIXELS): read in windows of rows through the same contract, resized window by window to the same
bytes as the whole image and predicted, its mask handed out band of rows by band of rows, so memory does not grow
with the image.
"""

import math
import re
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import index_to_colour
from model import click_planes
from raster import Rows, bit_depth_of, read_raster, readable_by_rows, resize, scale_note
from spec import IGNORE_INDEX, file_bands, grid_size, load_input, to_grid, valid_mask, wide_input_warning

TTA_MODES = {  # (quarter turns, horizontal flip) applied to the input; the prediction is turned back
    "none": [(0, False)],
    "flip": [(0, False), (0, True), (2, False), (2, True)],  # identity, h-flip, h+v flip, v-flip
    "d4": [(k, f) for k in range(4) for f in (False, True)],  # all flips and 90-degree rotations
}
OVERLAY_ALPHA = 0.5

# --------------------------------------------------------------------------- tiles


def tile_starts(length, tile, overlap):
    """Tile starts along one axis and the tile length. A side that fits one tile is one tile. Otherwise n
    tiles, evenly spaced, overlapping by at least `overlap`, of length <= tile rounded up to a multiple of 32
    (the model pads to 32 anyway, so the rounding buys overlap for free)."""
    if length <= tile:
        return [0], length
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    n = math.ceil((length - overlap) / (tile - overlap))
    size = min(tile, 32 * math.ceil(math.ceil((length + (n - 1) * overlap) / n) / 32))
    return [round(i * (length - size) / (n - 1)) for i in range(n)], size


def blend_window(height, width, overlap):
    """(height, width) weights: 1 inside, a smoothstep from ~0 to 1 over `overlap` pixels at each edge, never 0."""
    def ramp(n):
        i = torch.arange(n, dtype=torch.float32)
        d = torch.minimum(i, n - 1 - i) + 0.5  # distance to the nearest edge
        r = (d / max(overlap, 1)).clamp(max=1)
        return r * r * (3 - 2 * r)
    return ramp(height)[:, None] * ramp(width)[None, :]


@torch.inference_mode()
def _forward(model, x, tta):
    """Class probabilities (N, C, h, w) averaged over the TTA transforms, in float32. Inference mode is kept to
    the model: the rest of the pipeline runs in generators, which must not leave it switched on between yields."""
    out = None
    for k, flip in TTA_MODES[tta]:
        t = torch.flip(x, (-1,)) if flip else x
        t = torch.rot90(t, k, (-2, -1)).contiguous() if k else t
        p = torch.softmax(model(t).float(), dim=1)
        p = torch.rot90(p, -k, (-2, -1)) if k else p
        p = torch.flip(p, (-1,)) if flip else p
        out = p if out is None else out.add_(p)
    return out.div_(len(TTA_MODES[tta]))


def _tta_mode(tta):
    if tta is True:
        return "d4"
    if not tta:
        return "none"
    if tta not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {tta!r}; use one of {list(TTA_MODES)}")
    return tta


def _probability_rows(model, small, tile, overlap, batch_size, tta, device, progress, desc, planes=None):
    """Blend tile predictions over a (h, w, B) uint8 image; yield finished rows in order as (C, n, w) float32
    tensors on `device`, normalised. Only one band of tile rows is held at a time. `planes`: (K, h, w) click planes
    on `device`, cut into the same tiles and put after the bands."""
    h, w, _ = small.shape
    ys, th = tile_starts(h, tile, overlap)
    xs, tw = tile_starts(w, tile, overlap)
    window = blend_window(th, tw, overlap).to(device)
    positions = [(y, x) for y in ys for x in xs]
    acc = wsum = None  # rows [a0, a0 + th) of the blended probabilities and weights
    a0 = 0
    bar = tqdm(total=len(positions), desc=desc, unit="tile", leave=False,
               disable=not progress or len(positions) <= batch_size)
    for b in range(0, len(positions), batch_size):
        batch = positions[b:b + batch_size]
        x = torch.from_numpy(np.stack([small[y:y + th, x:x + tw] for y, x in batch]))
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        if planes is not None:
            x = torch.cat([x, torch.stack([planes[:, y:y + th, x0:x0 + tw] for y, x0 in batch])], 1)
        probs = _forward(model, x, tta)
        for (y, x0), p in zip(batch, probs):
            if acc is None:
                acc, wsum = torch.zeros(p.shape[0], th, w, device=device), torch.zeros(th, w, device=device)
            if y > a0:  # a new tile row: rows above it get no more tiles
                yield acc[:, : y - a0].div_(wsum[: y - a0])  # in place: these rows get no more tiles
                keep = a0 + th - y
                new_acc, new_wsum = torch.zeros_like(acc), torch.zeros_like(wsum)
                new_acc[:, :keep], new_wsum[:keep] = acc[:, y - a0:], wsum[y - a0:]
                acc, wsum, a0 = new_acc, new_wsum, y
            acc[:, y - a0: y - a0 + th, x0:x0 + tw].addcmul_(p, window)
            wsum[y - a0: y - a0 + th, x0:x0 + tw] += window
        bar.update(len(batch))
    bar.close()
    yield acc.div_(wsum)


class _Upsampler:
    """Take model-resolution probability rows in order, emit (C, n, W) rows at the output size (H, W):
    bilinear, align_corners=False, the same numbers as F.interpolate on the whole map, a few rows at a time."""

    def __init__(self, h, w, H, W, sink, chunk_bytes=16 << 20, device="cpu"):
        src = np.maximum((np.arange(H) + 0.5) * (h / H) - 0.5, 0)
        self.i0 = np.floor(src).astype(np.int64)
        self.i1 = np.minimum(self.i0 + 1, h - 1)
        self.wy = torch.from_numpy((src - self.i0).astype(np.float32)).to(device)
        self.device = device
        self.same_height = h == H
        self.w, self.W, self.sink, self.chunk_bytes = w, W, sink, chunk_bytes
        self.buf, self.b0, self.y = None, 0, 0  # buffer holds model rows [b0, b0 + len); next output row y

    def push(self, rows):
        self.buf = rows if self.buf is None else torch.cat([self.buf, rows], 1)
        end = self.b0 + self.buf.shape[1]  # model rows available: [b0, end)
        y_end = int(np.searchsorted(self.i1, end - 1, side="right"))  # output rows computable now
        step = max(1, self.chunk_bytes // (4 * self.buf.shape[0] * self.W))
        for y0 in range(self.y, y_end, step):
            y1 = min(y0 + step, y_end)
            if self.same_height:
                rows = self.buf[:, y0 - self.b0: y1 - self.b0]
            else:
                top = self.buf[:, torch.from_numpy(self.i0[y0:y1] - self.b0).to(self.device)]
                bottom = self.buf[:, torch.from_numpy(self.i1[y0:y1] - self.b0).to(self.device)]
                rows = torch.lerp(top, bottom, self.wy[y0:y1, None])
            if self.W != self.w:
                rows = F.interpolate(rows[None], size=(y1 - y0, self.W), mode="bilinear", align_corners=False)[0]
            self.sink(y0, y1, rows)
        self.y = y_end
        if y_end < len(self.i0):
            drop = int(self.i0[y_end]) - self.b0
            self.buf, self.b0 = self.buf[:, drop:].clone(), self.b0 + drop  # a copy: the band's memory goes


def class_indices(probs):
    """The argmax over classes of (C, n, W) probabilities as (n, W) uint8 numpy. torch.max(dim).indices is
    argmax (the first of equal maxima, NaN the largest) computed 3-4x faster on CPU over the class axis."""
    return torch.max(probs, 0).indices.to(torch.uint8).cpu().numpy()


def _grid(image, scale):
    """An (H, W, B) or (H, W) uint8 image on the processing grid (spec.to_grid), checked."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected an (H, W, bands) uint8 image, got {image.dtype} {image.shape}")
    return to_grid(image, scale)


def _predict(model, small, size, sink, tile, overlap, batch_size, tta, device, progress, desc, clicks=None):
    """Predict the processing-grid image `small` ((h, w, B) uint8, or a StreamedInput) and hand the
    probabilities, upsampled to `size` (H, W), to `sink(y0, y1, rows)` in order, a few rows at a time. A
    generator: it yields whenever a band of rows has reached the sink, so the caller can write them out before
    the next band is predicted; run it to the end (`for _ in _predict(...): pass`) to predict everything.
    `clicks`: see predict_image."""
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() before predicting")
    if tile < 32:
        raise ValueError(f"tile must be >= 32 pixels, got {tile}")
    tta = _tta_mode(tta)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    H, W = size
    h, w = small.shape[:2]
    up = _Upsampler(h, w, H, W, sink, device=device)
    planes = None if clicks is None or not len(clicks) else grid_click_planes(model, clicks, size, (h, w), device)
    for rows in _probability_rows(model, small, tile, overlap, batch_size, tta, device, progress, desc, planes):
        up.push(rows)
        yield
    assert up.y == H, (up.y, H)


def grid_click_planes(model, clicks, size, grid, device):
    """The (K, h, w) click planes of a click-conditioned model on the processing grid `grid` (h, w): `clicks` (N, 3)
    of row, column, class index in pixels of the input (H, W) `size`, each carried to the grid cell it falls in, and
    encoded as the checkpoint says (model.click_encoding, click_radius: train.py --click-input, --click-radius)."""
    if not getattr(model, "click_channels", 0):
        raise ValueError("this model takes no clicks: it was trained without --click-input (train.py --click-input "
                         "disc or distance makes one that does)")
    c = np.asarray(clicks, dtype=np.int64).reshape(-1, 3)
    (H, W), (h, w) = size, grid
    off = (c[:, 0] < 0) | (c[:, 0] >= H) | (c[:, 1] < 0) | (c[:, 1] >= W)
    if off.any():
        raise ValueError(f"click (row, col, class) {c[off][0].tolist()} lies outside the {H}x{W} image")
    on_grid = np.stack([(2 * c[:, 0] + 1) * h // (2 * H), (2 * c[:, 1] + 1) * w // (2 * W), c[:, 2]], 1)
    return click_planes(on_grid, (h, w), model.num_classes, model.click_encoding, model.click_radius, device)


def predict_image(model, image, scale, *, clicks=None, tile=512, overlap=64, batch_size=4, tta=False, device=None,
                  progress=False, desc=None):
    """Class indices (H, W) uint8 for an (H, W, bands) uint8 image of any size.

    Args:
        model: a segmentation model in eval mode, (N, B, h, w) in [0, 1] -> logits (N, C, h, w).
        image: (H, W, B) uint8 with B = the model's input bands (spec.load_input makes it from a file).
        scale: the checkpoint's processing scale (processing size / native size), e.g. 0.5.
        tile, overlap: tile side and minimum overlap in model-input (rescaled) pixels.
        batch_size: tiles per forward pass.
        tta: False/"none", "flip" (4 flips), True/"d4" (flips and 90-degree rotations, 8 passes).
        device: where the model runs (default: where its parameters are).
        clicks: for a click-conditioned model (train.py --click-input), a person's clicks as (N, 3) rows, columns
            and class indices in pixels of `image`; None or none: the no-click map (any model).
    """
    return _predict_indices(model, _grid(image, scale), image.shape[:2], tile, overlap, batch_size, tta, device,
                            progress, desc, clicks)


def _predict_indices(model, small, size, tile, overlap, batch_size, tta, device, progress, desc, clicks=None):
    """predict_image of the processing-grid image `small` (_grid's) at the input size `size` (H, W)."""
    out = np.empty(size, np.uint8)

    def sink(y0, y1, rows):
        out[y0:y1] = class_indices(rows)

    for _ in _predict(model, small, size, sink, tile, overlap, batch_size, tta, device, progress, desc, clicks):
        pass
    return out


def predict_probabilities(model, image, scale, *, clicks=None, tile=512, overlap=64, batch_size=4, tta=False,
                          device=None, progress=False, desc=None):
    """Class probabilities (C, H, W) float32 at the image's size; arguments as predict_image. Holds the
    whole map (C x H x W x 4 bytes): for small images (figures, tests); predict_image streams."""
    parts = []

    def sink(y0, y1, rows):
        parts.append(rows.cpu().clone())

    for _ in _predict(model, _grid(image, scale), image.shape[:2], sink, tile, overlap, batch_size, tta, device,
                      progress, desc, clicks):
        pass
    return torch.cat(parts, 1).numpy()


# --------------------------------------------------------------------------- showing a prediction

def display_rgb(image):
    """What a person is shown of a model input (H, W, B) uint8: one band as gray, two as the first one's
    gray, three or more: bands 0, 1, 2 of the model input as red, green, blue (for RGBIR, the RGB; choose
    the order with --bands / the class file's bands to show another composite)."""
    if image.shape[2] >= 3:
        return image[:, :, :3]
    return np.repeat(image[:, :, :1], 3, axis=2)


def overlay(image, indices, palette, alpha=OVERLAY_ALPHA):
    """Blend an (H, W, 3) uint8 image with the colour mask, row chunk by row chunk."""
    out = np.empty(image.shape[:2] + (3,), np.uint8)
    for r in range(0, image.shape[0], 512):
        colours = index_to_colour(indices[r:r + 512], palette).astype(np.float32)
        out[r:r + 512] = np.round((1 - alpha) * image[r:r + 512, :, :3] + alpha * colours)
    return out


# --------------------------------------------------------------------------- large TIFFs, streamed by rows

STREAM_CHUNK_BYTES = 16 << 20  # file pixels decoded per window of rows
GRID_BLOCK_BYTES = 16 << 20  # int32 rows of the vertical resize pass computed at once
PRECISION_BITS = 22  # Pillow's fixed-point weights of 8-bit resampling (Resample.c: 32 - 8 - 2)


def _width_first(H, W, h, w):
    """Whether Pillow resizes (H, W) to (h, w) with the horizontal pass first. Both passes round to 8 bits, so
    the order shows in the pixels, and it changed: Pillow < 12.2 always goes width first; 12.2 goes height
    first for images over 100 times taller than wide (Image.resize); 13 when the height loses more than twice
    as many pixels as the width (Resample.c, ImagingResampleInner)."""
    version = tuple(int(v) for v in PIL.__version__.split(".")[:2])
    if version >= (13, 0):
        return not (H - h > 0 and H - h > 2 * (W - w))
    if version >= (12, 2):
        return not (H > 100 * W and h < H)
    return True


def _vertical_weights(H, h):
    """Pillow's bilinear (antialiased) weights from H rows to h, computed as Resample.c does (precompute_coeffs
    with the box (0, H), normalize_coeffs_8bpc), so the vertical pass of any band of rows equals the whole
    image's. Returns the first input row of each output row, the number of input rows it uses, and (h, k)
    int32 weights in units of 2^-PRECISION_BITS (0 past a row's count)."""
    scale = H / h
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support, stretched when shrinking
    center = (np.arange(h) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5), H).astype(np.int64) - first
    k = int(math.ceil(support)) * 2 + 1
    weights, total = np.zeros((h, k)), np.zeros(h)
    for j in range(k):  # in Pillow's order: the sums round alike
        x = np.abs(((first + j) - center + 0.5) * (1.0 / filterscale))
        weights[:, j] = np.where((j < count) & (x < 1.0), 1.0 - x, 0.0)
        total = total + weights[:, j]
    weights /= np.where(total == 0, 1.0, total)[:, None]
    return first, count, np.trunc(0.5 + weights * (1 << PRECISION_BITS)).astype(np.int32)


def _resize_width(rows, w):
    """(n, W, B) uint8 -> (n, w, B): Pillow's horizontal pass alone (raster.resize with the height kept)."""
    return resize(rows, (rows.shape[0], w))


def _resize_height(src, src0, first, weights):
    """Pillow's vertical pass (ImagingResampleVertical_8bpc) for output rows that start at input rows `first`
    with `weights`; `src` holds input rows from src0 on. (n, width, B) uint8, the whole image's numbers."""
    n = len(first)
    acc = np.full((n,) + src.shape[1:], 1 << (PRECISION_BITS - 1), np.int32)
    for j in range(weights.shape[1]):
        rows = np.minimum(first + j - src0, len(src) - 1)  # past a row's count the weight is 0
        acc += src[rows] * weights[:, j, None, None]
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def _merge_notes(notes, pixels):
    """The notes of every window of rows as one image's: a repeated note once; a note that counts pixels
    ("12 nodata pixels (0.1 %): ...") with the counts summed and their share of the `pixels` recomputed."""
    merged = {}
    for note in notes:
        m = re.fullmatch(r"(\d+) (.*)", note)
        if m is None:
            merged.setdefault(note, None)
        else:
            key = re.sub(r"\(\d+\.\d %\)", "({share} %)", m.group(2))
            merged[key] = (merged.get(key) or 0) + int(m.group(1))
    return [key if n is None else f"{n} " + key.format(share=f"{100 * (n / pixels):.1f}")
            for key, n in merged.items()]


class StreamedInput:
    """A large TIFF as the model eats it, made top to bottom in windows of rows, never whole.

    The file is read in windows through the contract itself, `spec.load_input(raster.Rows(path, a, b))`, so
    bands, nodata and intensity are the whole file's (the bit-depth rule of `uint8` intensity needs the image's
    largest value, and a float image's nodata mask its NaN: one streamed pass over the file first finds them).
    `grid[y0:y1, x0:x1]` gives rows of the processing-grid image, `spec.to_grid(load_input(path).image, scale)`
    to the byte: Pillow's two resize passes in Pillow's order, the vertical one with the whole image's
    weights; y0 never goes back. `valid_rows(y0, y1)` gives the nodata of input rows already read. Holds one
    window of input rows, the grid rows of a tile row or two and the nodata of the rows in between.

    Known at once: `size` (H, W), `shape` (h, w, bands) of the grid, `raster` (tags), `masked` (whether there
    is nodata to mark, as load_input's `valid is not None`); `notes` once every row is read.
    """

    def __init__(self, path, spec, bit_depth=None, chunk_bytes=None):
        self.path, self.spec = Path(path), spec
        H, W, segment_rows = readable_by_rows(path)
        first = read_raster(Rows(path, 0, 1))
        rows = max(1, (chunk_bytes or STREAM_CHUNK_BYTES) // first.array.nbytes)
        self.chunk_rows = -(-rows // segment_rows) * segment_rows  # whole strips or tiles: none decoded twice
        self.bit_depth, nonfinite = self._first_pass(first.array.dtype, bit_depth, H)
        self.warnings = []  # load_input's, for the whole image: its windows get the bit depth found here
        if bit_depth is None and self.bit_depth is not None:
            self.warnings.append(wide_input_warning(self._dtype, self.bit_depth))
        self.raster, first.array = first, None
        self.masked = first.nodata is not None or nonfinite
        h, w = grid_size(H, W, spec.scale)
        self.size, self.shape = (H, W), (h, w, spec.channels)
        self.resize_h, self.resize_w = h != H, w != W
        self.width_first = _width_first(H, W, h, w)
        if self.resize_h:
            self.first, count, self.weights = _vertical_weights(H, h)
            self.needs = self.first + count  # input rows [0, needs[r]) make grid row r
        else:
            self.needs = np.arange(1, H + 1)
        self._notes, self.valid, self.rows_read = [], [], 0  # valid: (a, b, (b - a, W) bool) windows with nodata
        self.src, self.src0 = np.zeros((0, w if self.width_first else W, spec.channels), np.uint8), 0
        self.grid, self.grid0 = np.zeros((0, w, spec.channels), np.uint8), 0

    def _windows(self, H):
        for a in range(0, H, self.chunk_rows):
            yield Rows(self.path, a, min(H, a + self.chunk_rows))

    def _first_pass(self, dtype, bit_depth, H):
        """(bit depth, whether a pixel is NaN or infinite) where load_input's rules need the whole image: the
        largest value of a wide integer image under `uint8` intensity without --bit-depth, the NaN of a float
        image under `uint8` intensity. (bit_depth, False) without a pass where neither applies."""
        wide = np.issubdtype(dtype, np.integer) and dtype.itemsize > 1 and bit_depth is None
        floating = np.issubdtype(dtype, np.floating)
        if self.spec.intensity.kind != "uint8" or not (wide or floating):
            return bit_depth, False
        maxima, nonfinite = [], False
        for rows in self._windows(H):
            raster = read_raster(rows)
            arr, _ = file_bands(raster, self.spec.bands, self.spec.channels, self.path)
            self._dtype = arr.dtype
            if wide:  # nodata left out, as load_input leaves it out
                maxima.append(arr.max() if raster.nodata is None else np.max(arr[valid_mask(raster, arr)], initial=0))
            else:
                nonfinite = nonfinite or not np.isfinite(arr).all()
        return (bit_depth_of(np.asarray(maxima, arr.dtype)) if wide else bit_depth), nonfinite

    @property
    def notes(self):
        notes = _merge_notes(self._notes, self.size[0] * self.size[1])
        if self.warnings:  # the warning says it: no note besides
            notes = [n for n in notes if n != scale_note(self._dtype, self.bit_depth)]
        return notes

    def _read(self):
        """The next window of input rows onto `src` (already resized in width when that pass comes first)."""
        a, b = self.rows_read, min(self.size[0], self.rows_read + self.chunk_rows)
        inp = load_input(Rows(self.path, a, b), self.spec, bit_depth=self.bit_depth)
        self.rows_read = b
        self._notes += inp.notes
        if inp.valid is not None and not inp.valid.all():
            self.valid.append((a, b, inp.valid))
        rows = _resize_width(inp.image, self.shape[1]) if self.resize_w and self.width_first else inp.image
        self.src = np.concatenate([self.src, rows])

    def _make(self, stop):
        """Grid rows up to `stop` onto `grid`."""
        end = self.grid0 + len(self.grid)
        while end < stop:
            while self.rows_read < self.needs[end]:
                self._read()
            r1 = min(stop, int(np.searchsorted(self.needs, self.rows_read, side="right")))
            step = max(1, GRID_BLOCK_BYTES // (4 * self.src.shape[1] * self.shape[2]))
            parts = [self.grid]
            for r0 in range(end, r1, step):
                r = slice(r0, min(r1, r0 + step))
                if self.resize_h:
                    rows = _resize_height(self.src, self.src0, self.first[r], self.weights[r])
                else:
                    rows = self.src[r.start - self.src0:r.stop - self.src0]
                if self.resize_w and not self.width_first:
                    rows = _resize_width(rows, self.shape[1])
                parts.append(rows)
            self.grid = np.concatenate(parts)
            end = r1
            if end < self.shape[0]:  # drop the input rows no grid row still needs
                keep = int(self.first[end]) if self.resize_h else end
            else:
                keep = self.rows_read
            self.src, self.src0 = self.src[keep - self.src0:], keep

    def __getitem__(self, key):
        rows, cols = key
        if rows.start < self.grid0:
            raise IndexError(f"grid rows are made top to bottom: row {rows.start} is gone (rows from {self.grid0})")
        self._make(min(rows.stop, self.shape[0]))
        self.grid, self.grid0 = self.grid[rows.start - self.grid0:], rows.start  # rows above are done with
        return self.grid[:rows.stop - rows.start, cols]

    def valid_rows(self, y0, y1):
        """(y1 - y0, W) bool, False at nodata, of input rows already read; None when they hold no nodata. The
        nodata of rows above y0 is forgotten."""
        if y1 > self.rows_read:
            raise IndexError(f"rows {y0}..{y1} asked for, {self.rows_read} read")
        self.valid = [(a, b, v) for a, b, v in self.valid if b > y0]
        out = None
        for a, b, v in self.valid:
            if a < y1:
                out = np.ones((y1 - y0, self.size[1]), bool) if out is None else out
                out[max(a, y0) - y0:min(b, y1) - y0] = v[max(a, y0) - a:min(b, y1) - a]
        return out


def predict_streamed(model, source, *, tile=512, overlap=64, batch_size=4, tta=False, device=None, progress=False,
                     desc=None):
    """Class indices of a StreamedInput, top to bottom: yields (y0, y1, (y1 - y0, W) uint8 rows), nodata
    IGNORE_INDEX. Concatenated, the mask predict_image makes of load_input's image (with the nodata set);
    nothing of the image's size is held. Arguments as predict_image."""
    done = []

    def sink(y0, y1, rows):
        pred = class_indices(rows)
        valid = source.valid_rows(y0, y1)
        if valid is not None:
            pred[~valid] = IGNORE_INDEX
        done.append((y0, y1, pred))

    for _ in _predict(model, source, source.size, sink, tile, overlap, batch_size, tta, device, progress, desc):
        yield from done
        done.clear()


# --------------------------------------------------------------------------- a run's figures

def plot_history(history, path):
    """The curves of a training run's history (train.py's `<out>/output.png`): loss, overall accuracy and mIoU
    per validation, train on the points beside val on the dense labels or the held-out clicks (with their 95 %
    interval)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    kind = history[-1].get("val_kind")  # "held-out clicks" without dense labels
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("loss", "oa", "miou"), ("partial CE loss (points)", "overall accuracy",
                                                             "mIoU")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train (points)")
        ax.plot(ep, [h[f"val_{key}"] for h in history], "o-",
                label=f"val ({kind})" if kind else "val (points)" if key == "loss" else "val (dense labels)")
        if kind and key != "loss":
            lo, hi = zip(*(h[f"val_{key}_ci"] for h in history))
            ax.fill_between(ep, lo, hi, alpha=0.2, label=f"95 % interval ({kind})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_results(model, dataset, path, n=4, device="cpu", title=None, points_name="held-out clicks"):
    """Grid of image | ground truth | points | prediction for the first n samples of a dataset. The
    prediction is what infer.py makes of the file (spec.load_input + predict_image), at its size. Without dense
    labels the points panel shows the dataset's clicks, named `points_name`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    palette = dataset.classes.palette
    n = min(n, len(dataset))
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n), squeeze=False)
    for r in range(n):
        image_id, image_path, _ = dataset.pairs[r]
        image = load_input(image_path, dataset.spec).image
        label = dataset.native_label(r)
        pred = predict_image(model, image, dataset.spec.scale, device=device)
        pts = dataset.point_grid(r)
        panels = (display_rgb(image), index_to_colour(label, palette), index_to_colour(pts, palette),
                  index_to_colour(pred, palette))
        titles = (f"image {image_id}", "ground truth" if dataset.has_labels else "no dense labels",
                  f"{'points' if dataset.has_labels else points_name} ({(pts != IGNORE_INDEX).mean():.1%} of pixels)",
                  "prediction (infer.py)")
        for ax, p, t in zip(axes[r], panels, titles):
            ax.imshow(p, interpolation="nearest")
            ax.set_title(t, fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
