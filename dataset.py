"""Potsdam patches, their colour labels and simulated point annotations.

The one home of the class list, the palette and the ignore sentinel. A dataset sample holds the image, the
point annotation (IGNORE_INDEX where nobody clicked) and the dense label (for evaluation only).

    python dataset.py --data demo_data/patches --points 20000      # prints the labelled fraction
"""

import argparse
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from torch.utils.data import Dataset

from raster import IMAGE_SUFFIXES, RasterError, read_raster, resize

# --------------------------------------------------------------------------- classes and colours

IGNORE_INDEX = 255  # one sentinel for sampling, loss, metrics and padding

CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
UNDEFINED_COLOUR = (0, 0, 0)  # black: undefined, never a training target

NATIVE_SIZE = 300  # published Potsdam patches are 300x300
PROCESSING_SIZE = 150  # published processing size

PUBLISHED_TRAIN_IDS = list(range(0, 2100))
PUBLISHED_VAL_IDS = list(range(2100, 2400))


@dataclass(frozen=True)
class ClassSpec:
    """What the label values mean: class names, their colours and how a label file encodes them.

    `label_format` is "colour" (RGB labels, one colour per class, `ignore_colour` undefined) or "index"
    (single-band labels, value i = class i, `ignore_value` undefined).
    """

    names: tuple = CLASSES
    palette: tuple = PALETTE
    label_format: str = "colour"
    ignore_colour: tuple = UNDEFINED_COLOUR
    ignore_value: int = IGNORE_INDEX

    def __post_init__(self):
        if len(self.names) != len(self.palette):
            raise ValueError(f"{len(self.names)} class names but {len(self.palette)} palette colours")
        if self.label_format not in ("colour", "index"):
            raise ValueError(f"label_format must be 'colour' or 'index', got {self.label_format!r}")
        if len(set(map(tuple, self.palette))) != len(self.palette):
            raise ValueError("two classes share a palette colour")

    @property
    def num_classes(self):
        return len(self.names)

    def to_dict(self):
        return {"names": list(self.names), "palette": [list(c) for c in self.palette],
                "label_format": self.label_format, "ignore_colour": list(self.ignore_colour),
                "ignore_value": int(self.ignore_value)}

    @classmethod
    def from_dict(cls, d):
        return cls(names=tuple(d["names"]), palette=tuple(tuple(int(v) for v in c) for c in d["palette"]),
                   label_format=d.get("label_format", "colour"),
                   ignore_colour=tuple(d.get("ignore_colour", UNDEFINED_COLOUR)),
                   ignore_value=int(d.get("ignore_value", IGNORE_INDEX)))


POTSDAM = ClassSpec()


def load_class_file(path):
    """Read a JSON class file: {"names": [...], "palette": [[r,g,b], ...], "label_format": "colour"|"index",
    "ignore_colour": [0,0,0], "ignore_value": 255}. For index labels the palette only colours the output."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        return ClassSpec.from_dict(d)
    except FileNotFoundError:
        raise FileNotFoundError(f"class file {path} not found") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"class file {path} is not valid ({e}); it needs 'names' and 'palette' "
                         f"(one [r, g, b] per name), optionally 'label_format', 'ignore_colour', "
                         f"'ignore_value'") from None


# --------------------------------------------------------------------------- reading files

def read_image(path, bands=None):
    """Read a training image as an (H, W, B) uint8 array (raster.read_raster: any TIFF codec, PNG, JPEG).
    `bands` picks band indices; by default every band but a declared alpha band is kept (so RGBIR stays 4
    bands). Errors name the file."""
    raster = read_raster(path)
    arr = raster.array
    if bands is not None:
        if max(bands) >= arr.shape[2]:
            raise RasterError(f"{path} has {arr.shape[2]} bands; bands {list(bands)} were asked for")
        arr = arr[:, :, list(bands)]
    elif raster.alpha is not None and arr.shape[2] > 1:
        arr = np.delete(arr, raster.alpha, axis=2)
    if arr.dtype != np.uint8:
        raise RasterError(f"{path}: training images must be 8-bit, this one is {arr.dtype}; convert it "
                          f"(infer.py reads 16-bit, see raster.py for its scaling rule)")
    return np.ascontiguousarray(arr)


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
    """Validate a single-band index label: values 0..C-1 are classes, `ignore_value` -> IGNORE_INDEX."""
    arr = arr[..., 0] if arr.ndim == 3 else arr
    out = arr.astype(np.int64)
    ignore = out == classes.ignore_value
    bad = ~ignore & ((out < 0) | (out >= classes.num_classes))
    if bad.any():
        vals = np.unique(out[bad])[:8].tolist()
        raise ValueError(f"{path}: label values {vals} are not classes 0..{classes.num_classes - 1} nor the "
                         f"ignore value {classes.ignore_value}. Fix the label or the class file.")
    out[ignore] = IGNORE_INDEX
    return out.astype(np.uint8)


def read_label(path, classes=POTSDAM):
    """Read a label file (colour or index, per `classes`) as an (H, W) uint8 class map."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label {path} not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB") if classes.label_format == "colour" else im)
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

def _resize_image(arr, size):
    """(H, W, B) uint8 -> (B, h, w) float in [0, 1], antialiased."""
    out = resize(arr, tuple(size))
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).float().div_(255)


def _resize_label(label, size):
    if label.shape == tuple(size):
        return label
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.NEAREST))


class SegmentationDataset(Dataset):
    """Image/label pairs with a fixed point annotation per image.

    Args:
        pairs: list of (image_id, image_path, label_path).
        points: points per image at native label resolution; None = dense (every labelled pixel).
        strategy: "uniform" (published) or "balanced".
        size: processing size (h, w) or an int; None keeps the native size.
        seed: annotation seed; points depend only on (seed, image id), never on epoch or order.
        resample_each_epoch: redraw points every epoch (the published code's behaviour; for comparison only).
        augment: random flips and 90-degree rotations, applied to image, points and label together.
        classes: a ClassSpec (default Potsdam colours).
        bands: band indices to read from the images (default: RGB).
        cache: keep decoded, resized samples in memory.

    A sample is a dict: image (B, h, w) float in [0, 1], points (h, w) long with IGNORE_INDEX where
    unlabelled, label (h, w) long dense (evaluation only), id.
    """

    def __init__(self, pairs, points=20000, strategy="uniform", size=PROCESSING_SIZE, seed=0,
                 resample_each_epoch=False, augment=False, classes=POTSDAM, bands=None, cache=True):
        if not pairs:
            raise ValueError("the dataset has no images")
        if strategy not in ("uniform", "balanced"):
            raise ValueError(f"unknown point strategy {strategy!r}; use 'uniform' or 'balanced'")
        if points is not None and points < 1:
            raise ValueError(f"points must be >= 1 or None (dense), got {points}")
        self.pairs = list(pairs)
        self.points = points
        self.strategy = strategy
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        self.seed = seed
        self.resample_each_epoch = resample_each_epoch
        self.augment = augment
        self.classes = classes
        self.bands = tuple(bands) if bands is not None else None
        self.cache = cache
        self.epoch = 0
        self._cache = {}
        self._points = {}

    def __len__(self):
        return len(self.pairs)

    @property
    def ids(self):
        return [p[0] for p in self.pairs]

    def set_epoch(self, epoch):
        """Only matters with resample_each_epoch: fixed annotations ignore the epoch."""
        self.epoch = epoch

    def _load(self, i):
        if i in self._cache:
            return self._cache[i]
        image_id, image_path, label_path = self.pairs[i]
        image = read_image(image_path, self.bands)
        label = read_label(label_path, self.classes)
        if image.shape[:2] != label.shape:
            raise ValueError(f"{image_path} is {image.shape[1]}x{image.shape[0]} but its label {label_path} "
                             f"is {label.shape[1]}x{label.shape[0]}; they must match")
        size = self.size or label.shape
        item = (_resize_image(image, size), label, _resize_label(label, size))
        if self.cache:
            self._cache[i] = item
        return item

    def native_label(self, i):
        """The dense (H, W) class map of sample i at its file's resolution."""
        return self._load(i)[1]

    def dense_label(self, i):
        """The dense class map of sample i at processing resolution (what evaluation compares with)."""
        return self._load(i)[2]

    def point_grid(self, i, native_label=None):
        """The point annotation of sample i on the processing grid, (h, w) uint8."""
        fixed = not self.resample_each_epoch
        if fixed and i in self._points:
            return self._points[i]
        if native_label is None:
            native_label = self._load(i)[1]
        rng = np.random.default_rng(_image_seed(self.seed, self.pairs[i][0], None if fixed else self.epoch))
        flat = sample_points(native_label, self.points, self.strategy, rng)
        grid = points_to_grid(native_label, flat, self.size or native_label.shape)
        if fixed and self.cache:  # a fixed annotation is drawn once
            self._points[i] = grid
        return grid

    def __getitem__(self, i):
        image, native_label, label = self._load(i)
        points = self.point_grid(i, native_label)
        image = image.clone()
        points = torch.from_numpy(points.astype(np.int64))
        label = torch.from_numpy(label.astype(np.int64))
        if self.augment:
            k = int(torch.randint(0, 4, (1,)))  # torch's global RNG: seeded by train.py
            flip = bool(torch.randint(0, 2, (1,)))
            image, points, label = (torch.rot90(t, k, dims=(-2, -1)) for t in (image, points, label))
            if flip:
                image, points, label = (torch.flip(t, dims=(-1,)) for t in (image, points, label))
            image, points, label = image.contiguous(), points.contiguous(), label.contiguous()
        return {"image": image, "points": points, "label": label, "id": str(self.pairs[i][0])}

    def labelled_fraction(self):
        """Fraction of processing-grid pixels that carry a point label, over the whole dataset."""
        labelled = total = 0
        for i in range(len(self)):
            grid = self.point_grid(i)
            labelled += int((grid != IGNORE_INDEX).sum())
            total += grid.size
        return labelled / total


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
    return [(p.stem, p, labels[p.stem]) for p in images]


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


def published_split(root, **kwargs):
    """The published split: ids 0-2099 train, 2100-2399 val."""
    return PotsdamDataset(root, PUBLISHED_TRAIN_IDS, **kwargs), PotsdamDataset(root, PUBLISHED_VAL_IDS, **kwargs)


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    p = argparse.ArgumentParser(description="Report the point annotation of a patch folder.")
    p.add_argument("--data", default="demo_data/patches", help="patch folder (Images/, Labels/)")
    p.add_argument("--points", default="20000", help="points per image, or 'dense'")
    p.add_argument("--strategy", default="uniform", choices=["uniform", "balanced"])
    p.add_argument("--size", type=int, default=PROCESSING_SIZE, help="processing size")
    p.add_argument("--limit", type=int, default=100, help="look at the first N patches")
    return p


def main(args):
    points = None if args.points == "dense" else int(args.points)
    ids = available_ids(args.data)[: args.limit]
    ds = PotsdamDataset(args.data, ids, points=points, strategy=args.strategy, size=args.size)
    print(f"{len(ds)} patches, {args.points} points/image ({args.strategy}) -> "
          f"labelled fraction at {args.size}x{args.size}: {ds.labelled_fraction():.2%}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
