"""The preprocessing contract shared by training and inference, stored in every checkpoint as one object.

    python checkpoint.py checkpoints/best_model.pth  # the contract a trained model carries

A `DataSpec` says what a model eats and what its outputs mean:
- classes (`ClassSpec`): names, palette, how a label file encodes them (colours or index values, a value
  map such as {0: 0, 255: 1} for 0/255 masks) and which label value is undefined;
- bands: which bands of a file feed the model (None: every band but a declared alpha band);
- intensity (`Intensity`): how pixel values become 0..255. `uint8` keeps 8-bit data as it is (today's
  Potsdam behaviour); `range` maps per-band [low, high] linearly to [0, 255] and clips, with low/high the
  0.5th/99.5th percentiles of the training images (nodata left out), so 11-/12-/16-bit and float rasters
  keep their contrast whatever their largest value;
- scale: processing pixels per file pixel, the same along both axes (aspect ratio kept).

`load_input(path, spec)` applies bands and intensity to a file; `to_grid(array, scale)` resizes to the
processing grid (bilinear with antialiasing for images, nearest for labels). `SegmentationDataset` and
`infer.predict_image` both go through these two functions, so the same file gives the same model input.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from raster import (MAX_PIXELS, RasterError, bit_depth_of, is_8bit, keep_bands, read_raster, resize, scale_note,
                    select_bands, to_uint8)

# --------------------------------------------------------------------------- classes and colours

IGNORE_INDEX = 255  # one sentinel for sampling, loss, metrics and padding

CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
UNDEFINED_COLOUR = (0, 0, 0)  # black: undefined, never a training target
# colours for index labels whose class file gives no palette (tab10, without black)
DEFAULT_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                   (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))

NATIVE_SIZE = 300  # published Potsdam patches are 300x300
PROCESSING_SIZE = 150  # published processing size: scale 0.5
MAX_SCALE = 16  # processing pixels per file pixel: upsampling beyond this is a mistake, not a setting
PERCENTILES = (0.5, 99.5)  # the `range` intensity rule's low / high, per band, over the training images


def default_palette(n):
    """n distinct colours (cycled past ten), none of them the undefined black."""
    return tuple(DEFAULT_PALETTE[i % len(DEFAULT_PALETTE)] for i in range(n))


def check_scale(scale):
    """True for a usable scale (processing pixels per file pixel): a number in (0, MAX_SCALE]. The one rule that
    training, the contract and inference apply."""
    return isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) \
        and 0 < scale <= MAX_SCALE


def tokens(text):
    """Command-line text or tokens (a flag given several values) -> the items, split at commas and spaces."""
    return [t for t in re.split(r"[,\s]+", " ".join(map(str, text)) if isinstance(text, (list, tuple)) else str(text))
            if t]


def parse_bands(text):
    """'0,1,2', '0 1 2' or the tokens of `--bands 0 1 2` -> (0, 1, 2): one form for every command."""
    try:
        return tuple(int(b) for b in tokens(text))
    except ValueError:
        shown = " ".join(map(str, text)) if isinstance(text, (list, tuple)) else text
        raise ValueError(f"--bands takes band indices like 0,1,2,3 or 0 1 2 3; got {shown!r}") from None


@dataclass(frozen=True)
class ClassSpec:
    """What the label values mean: class names, their colours and how a label file encodes them.

    `label_format` "colour": RGB labels, one palette colour per class, `ignore_colour` undefined.
    `label_format` "index": single-band labels; `value_map` {file value: class index} when given (e.g.
    {0: 0, 255: 1} for a 0/255 mask), else value i = class i; `ignore_value` (None: none) is undefined.
    Any other value is an error, never a class.
    """

    names: tuple = CLASSES
    palette: tuple = PALETTE
    label_format: str = "colour"
    ignore_colour: tuple = UNDEFINED_COLOUR
    ignore_value: int = IGNORE_INDEX
    value_map: tuple = None  # ((file value, class index), ...) for index labels

    def __post_init__(self):
        if not self.names:
            raise ValueError("no class names")
        if len(self.names) > IGNORE_INDEX:
            raise ValueError(f"at most {IGNORE_INDEX} classes, got {len(self.names)}")
        if len(self.names) != len(self.palette):
            raise ValueError(f"{len(self.names)} class names but {len(self.palette)} palette colours")
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in self.palette):
            raise ValueError("every palette colour must be [r, g, b] with values 0..255")
        if self.label_format not in ("colour", "index"):
            raise ValueError(f"label_format must be 'colour' or 'index', got {self.label_format!r}")
        if self.label_format == "colour" and len(set(map(tuple, self.palette))) != len(self.palette):
            raise ValueError("two classes share a palette colour")
        if self.value_map is not None:
            if self.label_format != "index":
                raise ValueError("value_map is for index labels (label_format 'index')")
            bad = [c for _, c in self.value_map if not 0 <= c < len(self.names)]
            if bad:
                raise ValueError(f"value_map sends values to classes {bad}, not 0..{len(self.names) - 1}")
            if self.ignore_value is not None and self.ignore_value in dict(self.value_map):
                raise ValueError(f"value {self.ignore_value} is both the ignore value and in value_map")

    @property
    def num_classes(self):
        return len(self.names)

    def to_dict(self):
        d = {"names": list(self.names), "palette": [list(c) for c in self.palette],
             "label_format": self.label_format, "ignore_colour": list(self.ignore_colour),
             "ignore_value": None if self.ignore_value is None else int(self.ignore_value)}
        if self.value_map is not None:
            d["value_map"] = {str(v): int(c) for v, c in self.value_map}
        return d

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise TypeError(f"a class file holds a JSON object, not a {type(d).__name__}")
        unknown = sorted(set(d) - CLASS_FILE_KEYS)
        if unknown:
            raise KeyError(f"unknown keys {unknown} (the keys are {sorted(CLASS_FILE_KEYS)})")
        if not isinstance(d.get("names"), list) or not d["names"] or \
                not all(isinstance(n, str) and n.strip() for n in d["names"]):
            raise TypeError(f"'names' must be a list of class names (strings), got {d.get('names')!r}")
        twice = sorted({n for n in d["names"] if d["names"].count(n) > 1})
        if twice:
            raise ValueError(f"class names {twice} appear twice; each class needs its own name")
        if d.get("label_format", "colour") not in LABEL_FORMATS:
            raise ValueError(f"'label_format' must be one of {LABEL_FORMATS}, got {d['label_format']!r}")
        names = tuple(str(n) for n in d["names"])
        palette = d.get("palette")
        if palette is None:
            if d.get("label_format", "colour") != "index":
                raise KeyError("palette (colour labels need one colour per class)")
            palette = default_palette(len(names))
        vm = d.get("value_map")
        value_map = None if vm is None else tuple(sorted((int(v), int(c)) for v, c in vm.items()))
        ignore = d["ignore_value"] if "ignore_value" in d else (None if vm is not None else IGNORE_INDEX)
        return cls(names=names, palette=tuple(tuple(int(v) for v in c) for c in palette),
                   label_format=d.get("label_format", "colour"),
                   ignore_colour=tuple(int(v) for v in d.get("ignore_colour", UNDEFINED_COLOUR)),
                   ignore_value=None if ignore is None else int(ignore), value_map=value_map)


POTSDAM = ClassSpec()
LABEL_FORMATS = ("colour", "index")
CLASS_FILE_KEYS = {"names", "palette", "label_format", "ignore_colour", "ignore_value", "value_map"}


def load_class_file(path):
    """Read a JSON class file: {"names": [...], "palette": [[r,g,b], ...], "label_format": "colour"|"index",
    "ignore_colour": [0,0,0], "ignore_value": 255, "value_map": {"0": 0, "255": 1}}. For index labels the
    palette is optional (default colours) and only colours the output."""
    path = Path(path)
    try:
        return ClassSpec.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"class file {path} not found") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        e = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's text comes quoted
        raise ValueError(f"class file {path} is not valid ({e}); it needs 'names' and, for colour labels, "
                         f"'palette' (one [r, g, b] per name), optionally 'label_format', 'ignore_colour', "
                         f"'ignore_value', 'value_map'") from None


# --------------------------------------------------------------------------- intensity

@dataclass(frozen=True)
class Intensity:
    """How pixel values become 0..255. `uint8`: 8-bit data as they are (wider integers by the bit-depth rule
    of raster.to_uint8, with a note); `range`: per band, [low, high] -> [0, 255] linearly, clipped."""

    kind: str = "uint8"
    low: tuple = ()
    high: tuple = ()

    def __post_init__(self):
        if self.kind not in ("uint8", "range"):
            raise ValueError(f"intensity kind must be 'uint8' or 'range', got {self.kind!r}")
        if self.kind == "range":
            if not self.low or len(self.low) != len(self.high):
                raise ValueError("a 'range' intensity needs one low and one high value per band")
            if not all(math.isfinite(a) and math.isfinite(b) and b > a for a, b in zip(self.low, self.high)):
                raise ValueError(f"intensity range needs finite low < high per band, got {self.low} / {self.high}")

    def apply(self, arr, valid=None, bit_depth=None):
        """(H, W, B) any dtype -> ((H, W, B) uint8, notes)."""
        if self.kind == "uint8":
            return to_uint8(arr, bit_depth, valid)
        if arr.shape[2] != len(self.low):
            raise RasterError(f"{arr.shape[2]} bands, the intensity rule has {len(self.low)}")
        out = np.empty(arr.shape, np.uint8)
        low = np.asarray(self.low, np.float32)
        k = 255 / (np.asarray(self.high, np.float32) - low)
        for r in range(0, arr.shape[0], 512):  # row chunks keep float temporaries small
            chunk = (arr[r:r + 512].astype(np.float32) - low) * k
            out[r:r + 512] = np.clip(np.nan_to_num(np.round(chunk), nan=0.0), 0, 255)
        if valid is not None:
            out[~valid] = 0
        return out, []

    def to_dict(self):
        return {"kind": self.kind, "low": list(self.low), "high": list(self.high)}

    @classmethod
    def from_dict(cls, d):
        return cls(d["kind"], tuple(float(v) for v in d.get("low", ())), tuple(float(v) for v in d.get("high", ())))


def fit_intensity(paths, bands=None, samples=200_000, seed=0):
    """The intensity rule for a training set: `uint8` when every image is 8-bit, else `range` with per-band
    PERCENTILES over (up to `samples` pixels of) each image, nodata pixels left out."""
    if all(is_8bit(p) is True for p in paths):  # the headers say it: no pixel needs reading
        return Intensity("uint8")
    rng = np.random.default_rng(seed)
    picks, all_uint8, dtypes = [], True, {}
    for path in paths:
        raster = read_raster(path)
        arr, _ = file_bands(raster, bands, None, path)
        dtypes.setdefault(arr.dtype.name, path)
        if len(dtypes) > 1:  # one rule fitted on a mix would crush one kind (8-bit under a 16-bit range: 0..7)
            (a, first), (b, other) = list(dtypes.items())[:2]
            raise ValueError(f"the training images mix pixel types: {first} is {a}, {other} is {b}; one intensity "
                             f"rule cannot fit both (8-bit images under a range fitted on wider ones keep almost no "
                             f"contrast). Convert them to one type (e.g. gdal_translate -ot Byte -scale) or train on "
                             f"one kind")
        if arr.dtype == np.uint8:
            continue
        all_uint8 = False
        flat = arr.reshape(-1, arr.shape[2])
        valid = valid_mask(raster, arr).reshape(-1)
        if np.issubdtype(flat.dtype, np.floating):
            valid &= np.isfinite(flat).all(1)
        idx = np.flatnonzero(valid)
        if idx.size > samples:
            idx = rng.choice(idx, samples, replace=False)
        picks.append(flat[idx].astype(np.float64))
    if all_uint8:
        return Intensity("uint8")
    data = np.concatenate(picks) if picks else np.zeros((0, 1))
    if data.shape[0] == 0:
        raise ValueError("the training images hold no valid pixel (all nodata or NaN)")
    low, high = np.percentile(data, PERCENTILES, axis=0)
    high = np.maximum(high, low + 1e-6 * np.maximum(1, np.abs(low)))  # a constant band: avoid a zero range
    return Intensity("range", tuple(float(v) for v in low), tuple(float(v) for v in high))


# --------------------------------------------------------------------------- the contract

@dataclass(frozen=True)
class DataSpec:
    """Everything between a file and the model: classes, bands, channels, intensity rule, scale."""

    classes: ClassSpec = POTSDAM
    bands: tuple = None  # band indices of the file; None = every band but a declared alpha band
    channels: int = 3  # bands the model takes
    intensity: Intensity = field(default_factory=Intensity)
    scale: float = PROCESSING_SIZE / NATIVE_SIZE

    def __post_init__(self):
        if not check_scale(self.scale):
            raise ValueError(f"scale must be a number in (0, {MAX_SCALE}], got {self.scale!r}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        if self.bands is not None and len(self.bands) != self.channels:
            raise ValueError(f"{len(self.bands)} bands {list(self.bands)} but {self.channels} channels")
        if self.intensity.kind == "range" and len(self.intensity.low) != self.channels:
            raise ValueError(f"the intensity rule has {len(self.intensity.low)} bands, the model {self.channels}")

    def to_dict(self):
        return {"classes": self.classes.to_dict(), "bands": None if self.bands is None else list(self.bands),
                "channels": int(self.channels), "intensity": self.intensity.to_dict(), "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d):
        return cls(classes=ClassSpec.from_dict(d["classes"]),
                   bands=None if d.get("bands") is None else tuple(int(b) for b in d["bands"]),
                   channels=int(d["channels"]), intensity=Intensity.from_dict(d["intensity"]),
                   scale=float(d["scale"]))


def fit_spec(paths, classes=POTSDAM, bands=None, scale=None, size=PROCESSING_SIZE):
    """The contract fitted on training images (train.py) or on the images an encoder pretrains on (pretrain.py):
    every band but alpha unless `bands` (the rule load_input(strict) applies), the intensity rule over all of
    `paths` (uint8 for 8-bit data, else per-band percentiles), and `scale`, or `size` over the first image's longer
    side."""
    first = read_raster(paths[0])
    channels = file_bands(first, bands, None, first.path)[0].shape[2]
    scale = scale if scale is not None else size / max(first.array.shape[:2])
    return DataSpec(classes=classes, bands=bands, channels=channels, intensity=fit_intensity(paths, bands),
                    scale=scale)


def file_bands(raster, bands, channels, path):
    """Training (`channels` None): the file's bands as they are (raster.keep_bands). Inference: what a model
    of `channels` bands takes (raster.select_bands: gray replicated, extra bands dropped, with notes)."""
    try:
        if channels is None:
            return keep_bands(raster.array, bands, raster.alpha), []
        return select_bands(raster.array, channels, bands, raster.alpha)
    except RasterError as e:
        raise RasterError(e if str(path) in str(e) else f"{path}: {e}") from None


def valid_mask(raster, arr):
    """(H, W) bool: False where every band equals the file's nodata value (GDAL_NODATA)."""
    if raster.nodata is None:
        return np.ones(arr.shape[:2], bool)
    if np.isnan(raster.nodata):
        return ~np.isnan(arr.astype(np.float32)).all(2) if np.issubdtype(arr.dtype, np.floating) \
            else np.ones(arr.shape[:2], bool)
    return ~(arr == np.asarray(raster.nodata).astype(arr.dtype)).all(2)


@dataclass
class ModelInput:
    """A file as the model eats it: `image` (H, W, channels) uint8, `valid` (H, W) bool or None (nodata),
    `raster` (the file's tags, without pixels), `notes` (remarks to print next to the file name), `warnings`
    (mismatches between the file and the model that may cost accuracy: for the run's summary too)."""

    image: np.ndarray
    valid: np.ndarray
    raster: object
    notes: list
    warnings: list = field(default_factory=list)


def wide_input_warning(dtype, bit_depth):
    """The warning for `dtype` integer pixels wider than 8 bits under a model trained on 8-bit images (`uint8`
    intensity), scaled by the bit-depth rule as `bit_depth`-bit data: the model does not know how its training
    images were made 8-bit, so the user must say it."""
    return (f"the model was trained on 8-bit images and this image is {dtype}: it was scaled as {bit_depth}-bit "
            f"data (x 255/{2 ** bit_depth - 1}), the bit depth of its own largest value, which need not be how "
            f"the training images were made 8-bit. Pass --bit-depth N to scale every image by 255/(2^N - 1) "
            f"(e.g. --bit-depth 11 for x 255/2047), or train on the original files so the model stores their range")


def load_input(path, spec, *, strict=False, bit_depth=None, max_pixels=MAX_PIXELS):
    """Read a file under the contract: bands, then intensity. `strict` (training): the file must have the
    bands the spec names (or exactly `channels` bands), no replication or dropping. Integer pixels wider than 8
    bits under `uint8` intensity without `bit_depth`: scaled by the image's own bit depth (nodata left out),
    with a warning (wide_input_warning). `max_pixels`: raster.read_raster's bound on a whole-image decode.
    Errors name the file."""
    raster = read_raster(path, max_pixels)
    if strict:
        arr, notes = file_bands(raster, spec.bands, None, path)
        if arr.shape[2] != spec.channels:
            raise RasterError(f"{path} has {arr.shape[2]} bands (alpha dropped), the other training images "
                              f"{spec.channels}; give --bands or make the images alike")
    else:
        arr, notes = file_bands(raster, spec.bands, spec.channels, path)
    valid = valid_mask(raster, arr) if raster.nodata is not None else None
    if np.issubdtype(arr.dtype, np.floating):  # NaN / inf are never pixels, whatever the intensity rule
        finite = np.isfinite(arr).all(2)
        if not finite.all():
            valid = finite if valid is None else valid & finite
            notes.append(f"{int((~finite).sum())} pixels are NaN or infinite: no prediction there")
            arr = np.where(finite[..., None], arr, 0)
    warnings = []
    if (spec.intensity.kind == "uint8" and bit_depth is None and np.issubdtype(arr.dtype, np.integer)
            and arr.dtype.itemsize > 1):
        bit_depth = bit_depth_of(arr if valid is None else arr[valid])
        warnings.append(wide_input_warning(arr.dtype, bit_depth))
    try:
        image, more = spec.intensity.apply(arr, valid, bit_depth)
    except RasterError as e:
        raise RasterError(f"{path}: {e}") from None
    if warnings:  # the warning says it: no note besides
        more = [n for n in more if n != scale_note(arr.dtype, bit_depth)]
    if valid is not None and not valid.all():
        more.append(f"{int((~valid).sum())} nodata pixels ({100 * (~valid).mean():.1f} %): no prediction there")
    raster.array = None  # the caller holds the pixels it needs
    return ModelInput(np.ascontiguousarray(image), valid, raster, notes + more, warnings)


def grid_size(height, width, scale):
    """(h, w) on the processing grid of an (height, width) image: round(side * scale), at least 1."""
    return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))


def to_grid(array, scale, nearest=False):
    """Resize an (H, W, B) uint8 image (bilinear, antialiased) or an (H, W) label (`nearest`) by `scale`,
    aspect kept. The one resize rule of training and inference."""
    h, w = grid_size(array.shape[0], array.shape[1], scale)
    if array.shape[:2] == (h, w):
        return array
    if nearest:
        return np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((w, h), Image.NEAREST))
    return resize(array, (h, w))
