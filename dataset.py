"""Potsdam patches, their labels and simulated point annotations (or a person's clicks).

A dataset sample holds the image, the point annotation (IGNORE_INDEX where nobody clicked) and the dense
label (for evaluation only; all IGNORE_INDEX when the images come without labels, so nothing dense scores).
What a file becomes before the model (bands, intensity, scale) is the contract in spec.py, which infer.py
follows too; the class list and palette live there.
"""

import json
import zlib
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

from config import parse_points
from raster import IMAGE_SUFFIXES, exif_orientation, no_pixel_limit, orient
from spec import (IGNORE_INDEX, PALETTE, POTSDAM, DataSpec, grid_size, load_input,
                  to_grid)

PUBLISHED_TRAIN_IDS = list(range(0, 2100))
PUBLISHED_VAL_IDS = list(range(2100, 2400))


# --------------------------------------------------------------------------- reading files

def colour_to_index(rgb, classes=POTSDAM, path="<array>"):
    """Map an (H, W, 3) colour label to an (H, W) uint8 class map; the ignore colour -> IGNORE_INDEX.
    Any other colour is an error naming the file and the colours found."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"{path}: a colour label needs 3 bands, got shape {rgb.shape}")
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    known = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(classes.palette)}
    r, g, b = classes.ignore_colour
    known[(r << 16) | (g << 8) | b] = IGNORE_INDEX
    uniq, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(u) for u in uniq if int(u) not in known]
    if unknown:
        found = ", ".join(f"({u >> 16}, {(u >> 8) & 255}, {u & 255})" for u in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise ValueError(f"{path}: label colours {found}{more} are not in the palette "
                         f"{[tuple(c) for c in classes.palette]} (undefined = {tuple(classes.ignore_colour)}). "
                         f"Fix the label or pass a class file that names these colours.")
    lut = np.array([known[int(u)] for u in uniq], dtype=np.uint8)
    return lut[inverse.reshape(codes.shape)]


def index_to_index(arr, classes, path="<array>"):
    """Validate a single-band index label: the class file's `value_map` (e.g. {0: 0, 255: 1}) or value i =
    class i; `ignore_value` -> IGNORE_INDEX; any other value is an error naming the file."""
    arr = arr[..., 0] if arr.ndim == 3 else arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: index labels must hold integers, this one is {arr.dtype}")
    values = arr.astype(np.int64)
    uniq, inverse = np.unique(values, return_inverse=True)
    mapping = dict(classes.value_map) if classes.value_map is not None else \
        {c: c for c in range(classes.num_classes)}
    if classes.ignore_value is not None:
        mapping[classes.ignore_value] = IGNORE_INDEX
    unknown = [int(u) for u in uniq if int(u) not in mapping]
    if unknown:
        known = f"the value map {dict(classes.value_map)}" if classes.value_map is not None else \
            f"classes 0..{classes.num_classes - 1}"
        raise ValueError(f"{path}: label values {unknown[:8]} are not {known} nor the ignore value "
                         f"{classes.ignore_value}. Fix the label or the class file (a 0/255 mask needs "
                         f'"value_map": {{"0": 0, "255": 1}}).')
    lut = np.array([mapping[int(u)] for u in uniq], dtype=np.uint8)
    return lut[inverse.reshape(values.shape)]


def read_label(path, classes=POTSDAM):
    """Read a label file (colour or index, per `classes`) as an (H, W) uint8 class map. PNG/JPEG labels are
    turned by their EXIF orientation like the images (raster.orient), so both line up as viewers show them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label {path} not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        else:
            with no_pixel_limit(), Image.open(path) as im:
                arr = np.asarray(im.convert("RGB") if classes.label_format == "colour" else im)
                arr = orient(arr, exif_orientation(im))
    except Exception as e:
        raise OSError(f"cannot read label {path}: {e}") from None
    if classes.label_format == "index":
        return index_to_index(arr, classes, path)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return colour_to_index(arr, classes, path)


def index_to_colour(index_map, palette=PALETTE):
    """(H, W) class map -> (H, W, 3) uint8 colours; IGNORE_INDEX (or anything else) -> black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[np.asarray(index_map, dtype=np.uint8)]


# --------------------------------------------------------------------------- point annotations

def _image_seed(seed, image_id, epoch=None):
    key = zlib.crc32(str(image_id).encode())  # stable across runs and machines, unlike hash()
    return [int(seed), key] + ([int(epoch)] if epoch is not None else [])


def sample_points(label, points, strategy="uniform", rng=None):
    """Draw a point annotation from a dense (H, W) class map at its own resolution.

    Returns flat pixel indices into `label`. `points=None` means dense (every labelled pixel). Undefined
    pixels are never drawn. `uniform` draws among all labelled pixels; `balanced` gives every class present
    an equal share (a class with too few pixels gives all of them, the rest is shared among the others).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    flat = label.reshape(-1)
    labelled = np.flatnonzero(flat != IGNORE_INDEX)
    if points is None or points >= labelled.size:
        return labelled
    if strategy == "uniform":
        return np.sort(rng.choice(labelled, size=int(points), replace=False))
    if strategy != "balanced":
        raise ValueError(f"unknown point strategy {strategy!r}; use 'uniform' or 'balanced'")
    by_class = [labelled[flat[labelled] == c] for c in np.unique(flat[labelled])]
    by_class.sort(key=len)  # the rarest first, so their leftover share moves on to larger classes
    chosen, left = [], int(points)
    for i, pix in enumerate(by_class):
        share = left // (len(by_class) - i)
        take = min(share, pix.size)
        chosen.append(rng.choice(pix, size=take, replace=False))
        left -= take
    return np.sort(np.concatenate(chosen))

OBJECT_MARGIN = 2.0  # native pixels: a click on an object of some size is at least this deep inside it
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)  # objects touching only at a corner are two objects


def object_clicks(label, k, rng=None, margin=OBJECT_MARGIN):
    """Simulate an annotator who clicks k times inside every object of a dense (H, W) class map.

    An object is a 4-connected component of one class (scipy.ndimage.label). Its depth map is the Euclidean
    distance of each of its pixels to the nearest pixel of another value (another class or undefined): a
    pixel with such a 4-neighbour has depth 1. The image border is not a boundary (the object goes on beyond
    it), unless one class fills the whole image. Clicks go to the object's core, the
    pixels at least half as deep as its deepest one: the first at random there, the next ones as far as
    possible from those already placed (farthest-point sampling), up to k, and no closer than 2 x margin
    to each other, so a small core gets fewer clicks. An object less than 2 x margin deep (at most about
    2 x 2 x margin pixels across) gets one click at its most interior pixel. Undefined pixels are never
    objects. Every object gets at least one click: a one- or two-pixel-wide sliver has no interior, so
    its click touches its boundary.

    Returns sorted flat pixel indices into `label`.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    if k < 1:
        raise ValueError(f"clicks per object must be >= 1, got {k}")
    W = label.shape[1]
    chosen = []
    for c in np.unique(label[label != IGNORE_INDEX]):
        mask = label == c
        objects, n = ndimage.label(mask, structure=FOUR_CONNECTED)
        depth = ndimage.distance_transform_edt(mask) if not mask.all() else \
            ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]  # one class everywhere: border-deep
        depth = depth.reshape(-1)
        flat = objects.reshape(-1)
        inside = np.flatnonzero(flat)
        by_object = inside[np.argsort(flat[inside], kind="stable")]  # pixels of object 1, then 2, ...
        ends = np.cumsum(np.bincount(flat[inside], minlength=n + 1)[1:])
        for pix in np.split(by_object, ends[:-1]):
            chosen.append(_clicks_in_object(pix, depth[pix], W, k, rng, margin))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _clicks_in_object(pix, depth, width, k, rng, margin):
    """Up to k clicks (flat indices) among one object's pixels `pix` with their depths (see object_clicks)."""
    deepest = depth.max()
    if deepest < 2 * margin:  # small: its most interior pixel (ties broken by the seed)
        return np.array([rng.choice(pix[depth == deepest])])
    core = pix[depth >= deepest / 2]
    rows, cols = np.divmod(core, width)
    picks = [int(rng.integers(core.size))]
    gap = (rows - rows[picks[0]]) ** 2 + (cols - cols[picks[0]]) ** 2  # squared distance to the nearest click
    while len(picks) < k:
        far = int(gap.argmax())
        if gap[far] < (2 * margin) ** 2:
            break
        picks.append(far)
        gap = np.minimum(gap, (rows - rows[far]) ** 2 + (cols - cols[far]) ** 2)
    return core[picks]


def points_to_grid(label, flat_points, out_hw):
    """Carry points drawn on the native label grid onto an (h, w) processing grid.

    A point labels the cell it falls in. Where points of different classes fall in one cell, the majority
    wins; a tie leaves the cell unlabelled (the annotation is ambiguous at that resolution).
    """
    H, W = label.shape
    h, w = out_hw
    rows, cols = np.divmod(flat_points, W)
    cells = (rows * h // H) * w + (cols * w // W)
    cls = label.reshape(-1)[flat_points].astype(np.int64)
    C = int(cls.max()) + 1 if cls.size else 1
    votes = np.bincount(cells * C + cls, minlength=h * w * C).reshape(h * w, C)
    best = votes.argmax(1)
    top = votes.max(1)
    tie = (votes == top[:, None]).sum(1) > 1
    grid = np.where((top > 0) & ~tie, best, IGNORE_INDEX).astype(np.uint8)
    return grid.reshape(h, w)


# --------------------------------------------------------------------------- datasets

def clicks_per_object(points):
    """k for a budget of k clicks per object ('k/object'), else None."""
    return int(points.split("/")[0]) if isinstance(points, str) and points.endswith("/object") else None


def point_count(points, height, width, path="<image>"):
    """Points for one image of height x width native pixels: a count as it is, a share 'p%' as
    round(p/100 x pixels) (at least 1). A count above the pixel count is an error: it would be dense.
    A 'k/object' budget has no count before the label is seen: it is an error here (see object_clicks)."""
    n = height * width
    if clicks_per_object(points) is not None:
        raise ValueError(f"a budget of {points} depends on the objects in the label of {path}, not on its size; "
                         f"object_clicks(label, k) draws it")
    if isinstance(points, str):
        return max(1, round(float(points[:-1]) / 100 * n))
    if points > n:
        raise ValueError(f"{points} points per image but {path} has only {n} pixels ({width}x{height}); "
                         f"use --points dense, or a share such as --points 1%")
    return int(points)


class SegmentationDataset(Dataset):
    """Image/label pairs with a fixed point annotation per image, read under a preprocessing contract.

    Args:
        pairs: list of (image_id, image_path, label_path).
        spec: the DataSpec (classes, bands, intensity, scale); spec.load_input and spec.to_grid turn each file
            into model input exactly as infer.py does.
        points: per image at native label resolution: a count, a share like "1%", k clicks in every object
            like "1/object" (object_clicks; `strategy` does not apply), or None (dense).
        strategy: "uniform" (published) or "balanced".
        seed: annotation seed; points depend only on (seed, image id), never on epoch or order.
        resample_each_epoch: redraw points every epoch (the published code's behaviour; for comparison only).
        augment: random flips and 90-degree rotations, applied to image, points and label together.
        cache: keep decoded, resized samples in memory.
        clicks: a person's clicks instead of drawn points: {image file stem: annotations.ImageClicks} (native flat
            pixels and their classes); an image without an entry has no click. Each click keeps its own class,
            whatever the dense label says. `points` and `strategy` then do not apply.

    A pair's label path may be None (images without labels, with `clicks`): its dense label is all IGNORE_INDEX.

    A sample is a dict: image (B, h, w) float in [0, 1], points (h, w) long with IGNORE_INDEX where
    unlabelled, label (h, w) long dense (evaluation only), id. Images of different sizes give samples of
    different sizes (aspect kept); `pad_collate` batches them. Nodata pixels are undefined in the label.
    """

    def __init__(self, pairs, spec=None, points=20000, strategy="uniform", seed=0, resample_each_epoch=False,
                 augment=False, cache=True, clicks=None):
        if not pairs:
            raise ValueError("the dataset has no images")
        if clicks is not None and resample_each_epoch:
            raise ValueError("given clicks are a fixed annotation; they cannot be redrawn every epoch")
        if strategy not in ("uniform", "balanced"):
            raise ValueError(f"unknown point strategy {strategy!r}; use 'uniform' or 'balanced'")
        if isinstance(points, str):
            points = parse_points(points)
        elif points is not None and points < 1:
            raise ValueError(f"points must be >= 1, a share like '1%', clicks like '1/object', or None (dense), "
                             f"got {points}")
        self.pairs = list(pairs)
        self.spec = spec if spec is not None else DataSpec()
        self.points = points
        self.strategy = strategy
        self.seed = seed
        self.resample_each_epoch = resample_each_epoch
        self.augment = augment
        self.cache = cache
        self.clicks = clicks
        self.has_labels = all(p[2] is not None for p in self.pairs)
        self.epoch = 0
        self._cache = {}  # (image, native label, dense label) per image; native None: seeded (seed_sample), unread
        self._points = {}
        self._clicks = {}  # native pixels clicked per image (annotation_stats)
        self._drawn = {}  # the drawn annotation's native flat indices, once click_pixels asked for them
        self._added = {}  # native flat indices clicked after the start (add_clicks), per image
        self._pseudo = {}  # pseudo-labels on the processing grid (set_pseudo), per image
        self._grown = {}  # labels grown from the clicks on the processing grid (set_grown), per image
        self.annotation_version = 0  # counts the changes of add_clicks / set_pseudo / set_grown (ResidentLoader)

    @property
    def classes(self):
        return self.spec.classes

    def __len__(self):
        return len(self.pairs)

    @property
    def ids(self):
        return [p[0] for p in self.pairs]

    def set_epoch(self, epoch):
        """Only matters with resample_each_epoch: fixed annotations ignore the epoch."""
        self.epoch = epoch

    def _load(self, i, native=True):
        """(image, native label, dense label) of sample i, decoded once (kept with `cache`). A seeded sample
        (seed_sample) reads its files only when its native label is asked for; native=False gives None then."""
        item = self._cache.get(i)
        if item is not None and (item[1] is not None or not native):
            return item
        image_id, image_path, label_path = self.pairs[i]
        inp = load_input(image_path, self.spec, strict=True)
        label = read_label(label_path, self.spec.classes) if label_path is not None else \
            np.full(inp.image.shape[:2], IGNORE_INDEX, np.uint8)  # no labels: nothing dense ever scores
        if inp.image.shape[:2] != label.shape:
            raise ValueError(f"{image_path} is {inp.image.shape[1]}x{inp.image.shape[0]} but its label "
                             f"{label_path} is {label.shape[1]}x{label.shape[0]}; they must match")
        if inp.valid is not None:
            label = np.where(inp.valid, label, IGNORE_INDEX).astype(np.uint8)  # nodata is never a target
        image = to_grid(inp.image, self.spec.scale)
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255)
        item = (image, label, to_grid(label, self.spec.scale, nearest=True))
        if self.cache:
            self._cache[i] = item
        return item

    def native_label(self, i):
        """The dense (H, W) class map of sample i at its file's resolution."""
        return self._load(i)[1]

    def dense_label(self, i):
        """The dense class map of sample i at processing resolution (what evaluation compares with)."""
        return self._load(i, native=False)[2]

    def image(self, i):
        """The (B, h, w) float image of sample i on the processing grid, in [0, 1], not augmented."""
        return self._load(i, native=False)[0]

    def defined(self, i):
        """(h, w) bool: the processing-grid pixels of sample i that may carry a target: labelled in the dense label,
        or, without labels, every pixel that is not nodata (a nodata pixel is 0 in every band, as padding)."""
        if self.has_labels:
            return self.dense_label(i) != IGNORE_INDEX
        return (self.image(i) != 0).any(0).numpy()

    def given_clicks(self, i):
        """Sample i's given clicks (an annotations.ImageClicks) or None (no `clicks`, or none on this image)."""
        return None if self.clicks is None else self.clicks.get(Path(self.pairs[i][1]).stem)

    def _click_classes(self, i, native_label):
        """The native label the clicks of sample i take their class from: the dense label with the given clicks'
        own classes written over it (the rounds' clicks read the dense label)."""
        given = self.given_clicks(i)
        if given is None or not len(given):
            return native_label
        label = native_label.copy()
        label.reshape(-1)[given.flat] = given.classes
        return label

    def seed_sample(self, i, image, label, points, clicks):
        """Hold sample i as if decoded already (resident.seed_dataset, from a cache file): its processing-grid
        image (B, h, w) float in [0, 1], dense label and drawn annotation (click_grid) as (h, w) uint8, and
        `clicks` = (native pixels clicked, native pixels) for annotation_stats. Its files are read only when
        its native label is asked for (native_label, add_clicks, object clicks of the rounds)."""
        if self.resample_each_epoch or not self.cache:
            raise ValueError("only a cached dataset with a fixed annotation can be seeded")
        self._cache[i] = (image, None, label)
        self._points[i] = points
        self._clicks[i] = tuple(int(c) for c in clicks)

    def click_count(self, i):
        """(native pixels clicked, native pixels) of sample i's annotation, as annotation_stats counts them."""
        self.click_grid(i)
        return self._clicks[i]

    def _draw(self, i, native_label):
        """The drawn annotation of sample i: sorted native flat indices (see point_grid), or its given clicks."""
        H, W = native_label.shape
        if self.clicks is not None:
            given = self.given_clicks(i)
            if given is None:
                return np.zeros(0, np.int64)
            if tuple(given.image.shape) != (H, W):
                raise ValueError(f"the clicks of {self.pairs[i][1]} were read for a {given.image.shape[1]}x"
                                 f"{given.image.shape[0]} image; the file is {W}x{H}")
            return given.flat
        fixed = not self.resample_each_epoch
        rng = np.random.default_rng(_image_seed(self.seed, self.pairs[i][0], None if fixed else self.epoch))
        k = clicks_per_object(self.points)
        if k is not None:
            return object_clicks(native_label, k, rng)
        n = None if self.points is None else point_count(self.points, H, W, self.pairs[i][1])
        return sample_points(native_label, n, self.strategy, rng)

    def click_grid(self, i, native_label=None):
        """The clicks of sample i on the processing grid, (h, w) uint8: the drawn annotation plus the clicks
        add_clicks added (points_to_grid of all of them together); no pseudo-labels."""
        fixed = not self.resample_each_epoch
        if fixed and i in self._points:
            return self._points[i]
        if native_label is None:
            native_label = self._load(i)[1]
        H, W = native_label.shape
        flat = self._drawn[i].astype(np.int64) if i in self._drawn else self._draw(i, native_label)
        if i in self._added:
            flat = np.concatenate([flat, self._added[i]])
        self._clicks[i] = (flat.size, native_label.size)
        grid = points_to_grid(self._click_classes(i, native_label), flat, grid_size(H, W, self.spec.scale))
        if fixed and self.cache:  # a fixed annotation is drawn once
            self._points[i] = grid
        return grid

    def point_grid(self, i, native_label=None):
        """The training target of sample i on the processing grid, (h, w) uint8: its clicks (click_grid), then
        on the cells that hold no click its grown labels (set_grown), then its pseudo-labels (set_pseudo)."""
        grid = self.click_grid(i, native_label)
        for layer in (self._grown.get(i), self._pseudo.get(i)):  # an earlier one wins
            if layer is not None:
                grid = np.where((grid == IGNORE_INDEX) & (layer != IGNORE_INDEX), layer, grid).astype(np.uint8)
        return grid

    def click_pixels(self, i):
        """Native flat indices of every click on sample i: the drawn annotation, then those add_clicks added."""
        if i not in self._drawn:  # kept once asked for (the rounds ask every round); int32 is enough
            drawn = self._draw(i, self._load(i)[1]).astype(np.int32)
            if self.resample_each_epoch or not self.cache:
                return np.concatenate([drawn, self.added_clicks(i)]).astype(np.int64)
            self._drawn[i] = drawn
        return np.concatenate([self._drawn[i], self.added_clicks(i)]).astype(np.int64)

    def clicked_cells(self, i):
        """(h, w) bool: the processing-grid cells of sample i that hold at least one click (points_to_grid's
        cell rule), whether or not their clicks agree on a class."""
        H, W = self._load(i)[1].shape
        h, w = grid_size(H, W, self.spec.scale)
        rows, cols = np.divmod(self.click_pixels(i), W)
        cells = np.zeros(h * w, bool)
        cells[(rows * h // H) * w + cols * w // W] = True
        return cells.reshape(h, w)

    def add_clicks(self, i, flat):
        """Add clicks to sample i's annotation: native flat pixel indices into its label, whose classes the
        dense label reveals (a simulated annotator). A pixel outside the image, undefined, already clicked or
        given twice is an error. Pseudo-labels on the cells they fall in are dropped: a click always wins."""
        if self.resample_each_epoch:
            raise ValueError("clicks cannot be added to an annotation that is redrawn every epoch")
        flat = np.asarray(flat, np.int64).reshape(-1)
        native = self._load(i)[1]
        name = self.pairs[i][1]
        if flat.size and (flat.min() < 0 or flat.max() >= native.size):
            raise ValueError(f"{name}: clicks {flat[(flat < 0) | (flat >= native.size)][:5]} are outside its "
                             f"{native.size} pixels")
        if (native.reshape(-1)[flat] == IGNORE_INDEX).any():
            raise ValueError(f"{name}: clicks on undefined pixels {flat[native.reshape(-1)[flat] == IGNORE_INDEX][:5]}")
        again = np.intersect1d(flat, self.click_pixels(i))
        if again.size or np.unique(flat).size < flat.size:
            raise ValueError(f"{name}: pixels clicked twice {again[:5] if again.size else flat[:5]}")
        self._added[i] = np.concatenate([self._added.get(i, np.zeros(0, np.int64)), flat])
        self._points.pop(i, None)
        self.annotation_version += 1
        for layer in (self._pseudo, self._grown):
            if i in layer:
                layer[i] = np.where(self.clicked_cells(i), IGNORE_INDEX, layer[i]).astype(np.uint8)

    def added_clicks(self, i):
        """The native flat indices add_clicks added to sample i, in order."""
        return self._added.get(i, np.zeros(0, np.int64))

    def set_pseudo(self, i, grid):
        """Pseudo-labels of sample i on the processing grid ((h, w), IGNORE_INDEX where none), replacing the
        earlier ones; None removes them. Cells that hold a click and pixels that are not `defined` are left
        unlabelled, so a click always wins and an undefined pixel is never a target."""
        self._set_layer(self._pseudo, i, grid, "pseudo-labels")

    def set_grown(self, i, grid):
        """Labels grown from sample i's clicks (e.g. over superpixels), as set_pseudo; they win over
        pseudo-labels, and clicks win over them."""
        self._set_layer(self._grown, i, grid, "grown labels")

    def _set_layer(self, layer, i, grid, what):
        self.annotation_version += 1
        if grid is None:
            layer.pop(i, None)
            return
        grid = np.asarray(grid)
        defined = self.defined(i)
        if grid.shape != defined.shape:
            raise ValueError(f"{what} of {self.pairs[i][1]} are {grid.shape}, its processing grid is {defined.shape}")
        if ((grid >= self.classes.num_classes) & (grid != IGNORE_INDEX)).any() or (grid < 0).any():
            raise ValueError(f"{what} of {self.pairs[i][1]} hold values that are no class")
        keep = ~self.clicked_cells(i) & defined
        layer[i] = np.where(keep, grid, IGNORE_INDEX).astype(np.uint8)

    def pseudo_grid(self, i):
        """Sample i's pseudo-labels (set_pseudo) or None."""
        return self._pseudo.get(i)

    def grown_grid(self, i):
        """Sample i's grown labels (set_grown) or None."""
        return self._grown.get(i)

    def __getitem__(self, i):
        image, native_label, label = self._load(i, native=False)
        points = self.point_grid(i, native_label)  # reads the native label only when the grid is not held
        image = image.clone()
        points = torch.from_numpy(points.astype(np.int64))
        label = torch.from_numpy(label.astype(np.int64))
        if self.augment:
            image, points, label = augment_sample(image, points, label)
        return {"image": image, "points": points, "label": label, "id": str(self.pairs[i][0])}

    def labelled_fraction(self):
        """Fraction of processing-grid pixels that carry a click label (pseudo-labels not counted), over the
        whole dataset."""
        labelled = total = 0
        for i in range(len(self)):
            grid = self.click_grid(i)
            labelled += int((grid != IGNORE_INDEX).sum())
            total += grid.size
        return labelled / total

    def annotation_stats(self):
        """The annotation budget as an annotator pays it, over the whole dataset: `clicks_per_image` (mean
        native pixels clicked per image), `clicked_fraction` (clicks / native pixels) and
        `labelled_fraction` (share of processing-grid pixels that carry a click label, as labelled_fraction())
        and `pseudo_fraction` / `grown_fraction` (share that carries a pseudo-label / grown label where no click
        is, set_pseudo / set_grown). Added clicks (add_clicks) count."""
        clicks = pixels = labelled = pseudo = grown = total = 0
        for i in range(len(self)):
            grid = self.click_grid(i)
            labelled += int((grid != IGNORE_INDEX).sum())
            total += grid.size
            if i in self._pseudo:
                pseudo += int((self._pseudo[i] != IGNORE_INDEX).sum())
            if i in self._grown:
                grown += int((self._grown[i] != IGNORE_INDEX).sum())
            clicks += self._clicks[i][0]
            pixels += self._clicks[i][1]
        return {"clicks_per_image": clicks / len(self), "clicked_fraction": clicks / pixels,
                "labelled_fraction": labelled / total, "pseudo_fraction": pseudo / total,
                "grown_fraction": grown / total}


def augment_batch(image, points, label, k=None, flip=None):
    """The training augmentation, for both data paths: rotate sample i of a batch by k[i] x 90 degrees and flip
    it horizontally where flip[i], the same for its image (B, C, h, w), points and label (B, h, w). Without k and
    flip, both are drawn per sample from torch's global RNG (seeded by train.py): k first, then flip. Samples
    with the same (k, flip) move together. A non-square batch whose samples turn by odd and even k is first
    padded to a square (image 0, points and labels IGNORE_INDEX), as pad_collate pads rotated samples, so that
    every sample keeps one shape; padding is never a target nor scored."""
    if k is None:
        k = torch.randint(0, 4, (image.shape[0],))
        flip = torch.randint(0, 2, (image.shape[0],)).bool()
    k, flip = k.cpu(), flip.cpu()
    h, w = image.shape[-2:]
    odd = k % 2 == 1
    if h != w and odd.any() and not odd.all():
        pad = (0, max(h, w) - w, 0, max(h, w) - h)
        image = torch.nn.functional.pad(image, pad, value=0)
        points, label = (torch.nn.functional.pad(t, pad, value=IGNORE_INDEX) for t in (points, label))
        h = w = max(h, w)
    elif odd.all():  # every sample turns a quarter: the batch takes the turned shape
        h, w = w, h
    code = k * 2 + flip.long()
    out = [t.new_empty((*t.shape[:-2], h, w)) for t in (image, points, label)]
    for c in code.unique().tolist():
        sel = (code == c).nonzero().squeeze(1).to(image.device, non_blocking=True)
        turns, flipped = divmod(c, 2)
        for src, dst in zip((image, points, label), out):
            part = torch.rot90(src.index_select(0, sel), turns, dims=(-2, -1))
            dst.index_copy_(0, sel, part.flip(-1) if flipped else part)
    return tuple(out)


def augment_sample(image, points, label):
    """augment_batch on one sample: image (B, h, w), points and label (h, w)."""
    return tuple(t[0].contiguous() for t in augment_batch(image[None], points[None], label[None]))


def pad_collate(samples):
    """Batch samples of different sizes by padding at the bottom/right to the largest: images with 0, points
    and labels with IGNORE_INDEX, so padding is never a target nor scored. Same-size samples: plain stack."""
    h = max(s["image"].shape[-2] for s in samples)
    w = max(s["image"].shape[-1] for s in samples)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=value)
    return {"image": torch.stack([pad(s["image"], 0.0) for s in samples]),
            "points": torch.stack([pad(s["points"], IGNORE_INDEX) for s in samples]),
            "label": torch.stack([pad(s["label"], IGNORE_INDEX) for s in samples]),
            "id": [s["id"] for s in samples]}


def patch_pairs(root, ids):
    """(id, image, label) paths in the patch layout <root>/Images/Image_{id}.tif, <root>/Labels/Label_{id}.tif.
    A missing file is an error naming it."""
    root = Path(root)
    if not (root / "Images").is_dir():
        raise FileNotFoundError(f"no Images/ folder in {root}: expected {root}/Images/Image_<id>.tif and "
                                f"{root}/Labels/Label_<id>.tif (make demo-data builds a synthetic set)")
    pairs = []
    for i in ids:
        image, label = root / "Images" / f"Image_{i}.tif", root / "Labels" / f"Label_{i}.tif"
        if not image.is_file():
            raise FileNotFoundError(f"image {image} not found (id {i} is in the split)")
        if not label.is_file():
            raise FileNotFoundError(f"label {label} not found for image {image}; every image needs its label")
        pairs.append((i, image, label))
    return pairs


def available_ids(root):
    """All patch ids under <root>/Images, numeric ids sorted numerically."""
    root = Path(root)
    names = sorted(p.stem[len("Image_"):] for p in (root / "Images").glob("Image_*.tif"))
    if not names:
        raise FileNotFoundError(f"no patches found in {root}/Images (expected Image_<id>.tif files)")
    have = set(names)
    note_orphans([p.name for p in (root / "Labels").glob("Label_*.tif") if p.stem[len("Label_"):] not in have],
                 root / "Labels")
    return sorted((int(n) if n.isdigit() else n for n in names), key=lambda v: (isinstance(v, str), v))


def folder_pairs(image_dir, label_dir):
    """Own data: two folders with matching file stems (TIF/PNG/JPG). An image without a label is an error."""
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if image_dir.is_dir() else []
    if not images:
        raise FileNotFoundError(f"no images (.tif/.png/.jpg) found in {image_dir}")
    labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES} \
        if label_dir.is_dir() else {}
    missing = [p.name for p in images if p.stem not in labels]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images in {image_dir} have no label of the same name in "
                                f"{label_dir}: {missing[:5]}")
    stems = {p.stem for p in images}
    note_orphans([p.name for p in labels.values() if p.stem not in stems], label_dir)
    return [(p.stem, p, labels[p.stem]) for p in images]


_NOTED = set()  # (folder, names) already said in this process: experiments.py lists a folder for every run


def note_orphans(names, folder):
    """Say which labels have no image (a deleted or renamed image): they are left out, never silently; once per
    folder and set of names in a process."""
    seen = (str(folder), tuple(sorted(names)))
    if names and seen not in _NOTED:
        _NOTED.add(seen)
        print(f"note: {len(names)} labels in {folder} have no image and are left out: {sorted(names)[:5]}"
              f"{' ...' if len(names) > 5 else ''}", flush=True)


def load_split(path):
    """A split file (JSON): {"train": [ids], "val": [ids], "test": [ids], ...}."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"split file {path} not found") from None
    except ValueError as e:
        raise ValueError(f"split file {path} is not valid JSON: {e}") from None
    for key in ("train", "val"):
        if key not in split:
            raise ValueError(f"split file {path} has no {key!r} list")
    return split


class PotsdamDataset(SegmentationDataset):
    """Potsdam patches: <root>/Images/Image_{id}.tif + <root>/Labels/Label_{id}.tif (see SegmentationDataset)."""

    def __init__(self, root, ids=None, **kwargs):
        ids = available_ids(root) if ids is None else list(ids)
        super().__init__(patch_pairs(root, ids), **kwargs)
        self.root = Path(root)
