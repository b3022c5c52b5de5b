"""Reading and writing rasters of any kind: PNG (8- and 16-bit), JPEG (turned by its EXIF orientation), TIFF
(any codec imagecodecs knows, tiled, BigTIFF, planar or interleaved), GeoTIFF georeferencing, 16-bit and
multi-band data, atomic writes and the clean-up of what a killed run left (`clean_stale_temporaries`). Images too
large to hold go by bands of rows: `Rows` reads a window of a TIFF, `png_rows` and `tiles_of_rows` +
`write_index_tiff` write a mask. `open_image` reads a header alone: an `ImageRef`, the size as viewers show it and
the place (transform, CRS, nodata) that clicks, polygons and areas are mapped through.

    python infer.py --input folder_of_images --checkpoint checkpoints/best_model.pth    # reads through here

The steps here are the building blocks: `read_raster` (the pixels as stored, turned as viewers show them when
the file has an EXIF orientation, plus alpha band, GeoTIFF tags and nodata value), `select_bands` (which bands,
given what the model needs) and `to_uint8` (the bit-depth rule). Each returns notes (warnings as text) for the
caller to print next to the file name. What a model eats is decided in one place, spec.py (`load_input`,
`to_grid`), for training and inference alike.

Bit depth rule (spec.py's `uint8` intensity, for models trained on 8-bit data): integer images wider than 8
bits are scaled linearly from [0, 2**b - 1] to [0, 255], b being the image's bit depth: the smallest of 8..16
bits (or the dtype's width) that holds its largest value. Pass `bit_depth` (infer.py --bit-depth) to fix b
for a constant scale across images. Float images must hold values in [0, 1] (multiplied by 255). Models
trained on wider data carry a `range` intensity rule fitted on their training set instead (spec.py).
"""

import contextlib
import itertools
import json
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import imagecodecs
import numpy as np
import rasterio
import tifffile
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine


# --------------------------------------------------------------------------- GeoTIFF tags

GDAL_NODATA = 42113  # ASCII tag: the value of pixels that hold no data
GEOTIFF_TAGS = {  # code -> name; what places a GeoTIFF on the ground
    33550: "ModelPixelScaleTag",
    33922: "ModelTiepointTag",
    34264: "ModelTransformationTag",
    34735: "GeoKeyDirectoryTag",
    34736: "GeoDoubleParamsTag",
    34737: "GeoAsciiParamsTag",
}
TIFF_SUFFIXES = (".tif", ".tiff")
JPEG_CODES = (6, 7, 34892, 33007)  # TIFF compressions that are JPEG (tifffile decodes their chroma subsampling)
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MASK_TILE = 256  # tile side of the mask TIFFs
MAX_PIXELS = 180_000_000  # whole-image decodes above this are refused (Pillow's own bomb limit); infer.py --max-pixels
DEFLATE_RATIO = 1032  # deflate (PNG) inflates a byte to at most this many: a header claiming more is a lie
EXIF_ORIENTATION = 0x0112  # EXIF tag: how viewers turn the stored pixels (1 = as stored, 2..8 flips/rotations)
_ORIENT = {  # orientation -> stored (H, W, ...) pixels as viewers show them (PIL.ImageOps.exif_transpose)
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: a[::-1].swapaxes(0, 1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: a[:, ::-1].swapaxes(0, 1),
}


class RasterError(ValueError):
    """A file that cannot be turned into model input; the message names the file and what is wrong."""


@dataclass
class Raster:
    """Pixels as stored: `array` (H, W, B) in the file's dtype; `alpha` the index of an alpha band (or None);
    `geotags` {tag code: (TIFF datatype, count, value)} of the GeoTIFF tags found (empty if none)."""

    path: Path
    array: np.ndarray
    alpha: int = None
    geotags: dict = field(default_factory=dict)
    nodata: float = None  # the GDAL_NODATA value (TIFF tag 42113), None when the file declares none

    @property
    def is_georeferenced(self):
        """Any GeoTIFF tag: whatever places the image (tie points, transformation, keys) is carried over."""
        return bool(self.geotags)


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of a TIFF, usable wherever a path is: `read_raster(Rows(path, 0, 512))` decodes only
    the strips or tiles that hold those rows. spec.load_input takes it too, so a window of a large image goes
    through the same contract as a whole file (infer.py streams large TIFFs this way). str() is the file's
    path: messages name the file."""

    path: Path
    start: int
    stop: int

    def __fspath__(self):
        return os.fspath(self.path)

    def __str__(self):
        return str(self.path)


def _tiff_rows(tif, page, start, stop):
    """Rows [start, stop) of a TIFF page, in the layout page.asarray() returns, decoding only the strips or
    tiles that hold them (uncompressed data: only the bytes of those rows)."""
    planes, _, height, width, samples = page.shaped
    out = np.empty((planes, 1, stop - start, width, samples), page.dtype)
    fh = tif.filehandle
    if page.is_contiguous and page.fillorder == 1 and page.predictor == 1:  # raw pixels in one run of bytes
        row = width * samples
        for s in range(planes):
            fh.seek(page.dataoffsets[0] + (s * height + start) * row * page.dtype.itemsize)
            out[s, 0] = fh.read_array(tif.byteorder + page.dtype.char, (stop - start) * row).reshape(-1, width, samples)
    else:
        seg_rows = page.tilelength if page.is_tiled else page.rowsperstrip
        across = -(-width // page.tilewidth) if page.is_tiled else 1
        down = -(-height // seg_rows)
        indices = [(s * down + r) * across + c for s in range(planes)
                   for r in range(start // seg_rows, (stop - 1) // seg_rows + 1) for c in range(across)]
        jpeg = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader} if page.compression in JPEG_CODES else {}
        offsets = [page.dataoffsets[i] for i in indices]
        counts = [page.databytecounts[i] for i in indices]
        for data, index in fh.read_segments(offsets, counts, indices=indices, sort=True):
            segment, (s, _, y, x, _), shape = page.decode(data, index, **jpeg)
            y0, y1, x1 = max(y, start), min(y + shape[1], stop), min(x + shape[2], width)
            if segment is None:  # an empty strip or tile: the file's fill value
                out[s, 0, y0 - start:y1 - start, x:x1] = page.nodata
            else:
                out[s, 0, y0 - start:y1 - start, x:x1] = segment[0, y0 - y:y1 - y, :x1 - x]
    return out.reshape([stop - start if axis == "Y" else n for axis, n in zip(page.axes, page.shape)])


def _check_tiff_layout(page, path, size):
    """RasterError unless the page lists every strip or tile its header's size needs and they lie inside the file
    (`size` bytes): a header that claims more pixels than the file holds fails here, before anything is decoded."""
    planes, depth, height, width, _ = page.shaped
    if page.is_tiled:
        needed = planes * -(-depth // page.tiledepth) * -(-height // page.tilelength) * -(-width // page.tilewidth)
    else:
        needed = planes * depth * -(-height // max(1, page.rowsperstrip))
    kind = "tiles" if page.is_tiled else "strips"
    have = len(page.dataoffsets)
    if have < needed:
        raise RasterError(f"{path}: its header says {width} x {height} pixels, which take {needed} {kind}, but it "
                          f"lists {have}: truncated or corrupt (or a decompression bomb); export it again")
    end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
    if end > size:
        raise RasterError(f"{path}: its {kind} run to byte {end}, the file has {size}: truncated; copy or export "
                          f"it again")


def readable_by_rows(path):
    """(height, width, rows per strip or tile) of a TIFF whose rows `read_raster(Rows(...))` reads without
    decoding the rest: one image page (no page per band, no volume), plain strips or tiles. None for any other
    file (and for a file that cannot be parsed: reading it whole then reports why)."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file():
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            series, page = tif.series[0], tif.pages.first
            if (len(series.pages) != 1 or series.pages[0] is not page or series.shape != page.shape
                    or page.imagedepth != 1 or page.dtype is None
                    or (page.is_subsampled and page.compression not in JPEG_CODES)
                    or "Y" not in page.axes or len(page.dataoffsets) == 0):
                return None
            _check_tiff_layout(page, path, path.stat().st_size)
            if page.is_contiguous and page.fillorder == 1 and page.predictor == 1:
                seg_rows = 1
            else:
                seg_rows = page.tilelength if page.is_tiled else page.rowsperstrip
            return page.imagelength, page.imagewidth, max(1, min(seg_rows, page.imagelength))
    except Exception:  # not a TIFF tifffile parses: read_raster says why
        return None


def _read_tiff(path, rows=None):
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        series = tif.series[0]
        if rows is None:
            arr = series.asarray()  # level 0 of a pyramid, all strips/tiles, any codec imagecodecs decodes
        else:
            arr = _tiff_rows(tif, page, max(0, rows[0]), min(rows[1], page.imagelength))
        axes = series.axes
        tags = page.tags
        geotags = {code: (int(tags[code].dtype), int(tags[code].count), tags[code].value)
                   for code in GEOTIFF_TAGS if code in tags}
        nodata = _parse_nodata(tags[GDAL_NODATA].value) if GDAL_NODATA in tags else None
        photometric, colormap, extrasamples = page.photometric, page.colormap, tuple(page.extrasamples or ())
    if photometric == tifffile.PHOTOMETRIC.PALETTE and colormap is not None and arr.ndim == 2:
        cmap = np.asarray(colormap)
        cmap = (cmap // 257).astype(np.uint8) if cmap.max() > 255 else cmap.astype(np.uint8)
        return cmap.T[arr], None, geotags, None  # indexed colour -> RGB
    if arr.ndim == 3 and axes[-1] not in "SC" and axes.endswith("YX"):
        arr = np.moveaxis(arr, 0, -1)  # planar (bands, H, W) or one page per band
    alpha = None
    if arr.ndim == 3 and extrasamples and int(extrasamples[-1]) in (1, 2):  # associated / unassociated alpha
        alpha = arr.shape[2] - 1
    return arr, alpha, geotags, nodata


def _parse_nodata(value):
    """GDAL writes the nodata value as ASCII ("-99999", "nan", "0 "); None when it is not a number."""
    try:
        return float(str(value).strip().strip("\x00"))
    except ValueError:
        return None


@contextlib.contextmanager
def no_pixel_limit():
    """Lift Pillow's decompression-bomb limit (about 179 megapixels) while reading: these are the user's own
    files, and a 20000x20000 PNG or JPEG is read whole like a TIFF of that size. Restored afterwards."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def exif_orientation(im):
    """The EXIF orientation (1..8) of an open PIL image (JPEG, PNG, ...); 1 (as stored) when it has none. Read
    it after the pixels: a damaged EXIF block does not make the pixels unreadable, so it counts as none."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:
        return 1


def orient(arr, orientation):
    """Stored (H, W, ...) pixels -> as every viewer shows them, given the file's EXIF orientation, so that a
    mask lines up with the photo the user sees. Orientation 1 (or an unknown value): `arr` as it is."""
    turn = _ORIENT.get(orientation)
    return arr if turn is None else np.ascontiguousarray(turn(arr))


def _png_bit_depth(path):
    """Bits per sample of a PNG (its IHDR's byte 24), None for a file that is no PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[24]


def _read_png16(path):
    """A PNG of 16 bits per sample at full depth: Pillow keeps only the high byte of 16-bit colour (12-bit
    data come out near black), imagecodecs (libpng) keeps all 16."""
    data = path.read_bytes()
    arr = imagecodecs.png_decode(data)
    alpha = {4: 1, 6: 3}.get(data[25])  # IHDR colour type: gray + alpha, RGBA
    orientation = 1
    if b"eXIf" in data or b"Raw profile type exif" in data:  # EXIF in a PNG is rare: Pillow reads it
        with no_pixel_limit(), Image.open(path) as im:
            orientation = exif_orientation(im)
    return orient(arr, orientation), alpha, {}, None


def _read_pil(path):
    with no_pixel_limit(), Image.open(path) as src:
        im = src
        if im.mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            has_alpha = im.mode in ("PA",) or (im.mode == "P" and "transparency" in im.info)
            im = im.convert("RGBA" if has_alpha else ("L" if im.mode == "1" else "RGB"))
        arr = np.asarray(im)  # decodes here: a truncated file raises now
        alpha = {"LA": 1, "RGBA": 3}.get(im.mode)
        orientation = exif_orientation(src)
    return orient(arr, orientation), alpha, {}, None


def is_8bit(path):
    """True when the file's pixels are 8-bit (uint8 as read_raster gives them), False when they are not, None
    when the header does not say (read the file). Reads the header only: TIFF tags, the PNG IHDR, Pillow's
    mode."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                return tif.series[0].dtype == np.uint8
        depth = _png_bit_depth(path)
        if depth is not None:
            return depth <= 8
        with no_pixel_limit(), Image.open(path) as im:
            return im.mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")
    except Exception:  # unreadable header: reading the file says why
        return None


def _png_header(data):
    """(width, height, bytes the decoder inflates) from a PNG's first 26 bytes, None for a file that is no PNG.
    The inflated size counts one filter byte per row (interlaced images have a few more)."""
    if len(data) < 26 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4)
    return width, height, height * (1 + -(-width * samples * depth // 8))


def _check_decode_size(path, rows, max_pixels):
    """Before any pixel is decoded: RasterError when the header claims more than the file can hold (a TIFF's
    strips or tiles, a PNG's deflate ratio) or, for a whole-image decode, more than `max_pixels` pixels (None or
    0: no limit). Windows of rows (`Rows`) are not bounded: they are how large images are read."""
    size = path.stat().st_size
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                _check_tiff_layout(page, path, size)
                height, width = page.imagelength, page.imagewidth
        except RasterError:
            raise
        except Exception:  # not a TIFF tifffile parses: reading it says why
            return
    else:
        with open(path, "rb") as f:
            png = _png_header(f.read(26))
        if png is not None:
            width, height, inflated = png
            if inflated > DEFLATE_RATIO * size + 4096:
                raise RasterError(f"{path}: its header says {width} x {height} pixels, more than its {size} bytes "
                                  f"can hold (PNG compresses at most {DEFLATE_RATIO}:1): truncated, corrupt or a "
                                  f"decompression bomb; export it again")
        else:
            try:
                with no_pixel_limit(), Image.open(path) as im:  # reads the header only
                    width, height = im.size
            except Exception:  # reading it says why
                return
    if rows is None and max_pixels and width * height > max_pixels:
        raise RasterError(f"{path}: {width} x {height} pixels ({width * height / 1e6:.0f} MP) is more than the "
                          f"{max_pixels / 1e6:g} MP decoded whole at most (a guard against decompression bombs); "
                          f"if the image is real, pass --max-pixels {width * height} (or --max-pixels 0: no limit), "
                          f"or save it as a tiled or striped GeoTIFF, which is read by windows")


def read_raster(path, max_pixels=MAX_PIXELS):
    """Read an image file as a Raster: 16-bit PNGs at full depth, EXIF orientation applied, no Pillow pixel
    limit but our own: a whole image over `max_pixels` pixels (None or 0: no limit) is refused before decoding,
    as is a header that claims more pixels than the file can hold (a decompression bomb). `Rows(path, start,
    stop)` reads only those rows of a TIFF (readable_by_rows says which TIFFs), unbounded. Errors (RasterError)
    name the file: missing, empty, truncated, corrupt, too large, or a layout that is not (H, W) or (H, W,
    bands)."""
    rows = (path.start, path.stop) if isinstance(path, Rows) else None
    path = Path(path)
    if not path.is_file():
        raise RasterError(f"{path}: not found")
    if path.stat().st_size == 0:
        raise RasterError(f"{path}: empty file (0 bytes)")
    if rows is not None and readable_by_rows(path) is None:
        raise RasterError(f"{path}: rows can only be read from a one-page TIFF of strips or tiles")
    _check_decode_size(path, rows, max_pixels)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            arr, alpha, geotags, nodata = _read_tiff(path, rows)
        elif _png_bit_depth(path) == 16:
            arr, alpha, geotags, nodata = _read_png16(path)
        else:
            arr, alpha, geotags, nodata = _read_pil(path)
    except Exception as e:  # codec errors come in many types
        raise RasterError(f"{path}: cannot read it, corrupt or truncated? ({type(e).__name__}: {e})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise RasterError(f"{path}: unsupported layout {arr.shape}; expected (H, W) or (H, W, bands)")
    return Raster(path, arr, alpha, geotags, nodata)


# --------------------------------------------------------------------------- image headers: size and place

@dataclass(frozen=True)
class ImageRef:
    """An image's header as clicks, polygons and areas see it: `shape` (H, W) as viewers show it (EXIF orientation applied), its affine
    `transform` (pixel -> map; identity when not georeferenced) and `crs` (rasterio CRS, None when none),
    `nodata` (the GDAL_NODATA value, None when none). `name` (the file's stem) keys it everywhere."""

    path: Path
    shape: tuple
    transform: Affine = Affine.identity()
    crs: object = None
    nodata: float = None
    georeferenced: bool = False

    @property
    def name(self):
        return self.path.stem

    def bounds(self):
        """(left, bottom, right, top) in map coordinates (pixels when not georeferenced)."""
        H, W = self.shape
        xs, ys = self.transform @ (np.array([0, W, 0, W]), np.array([0, 0, H, H]))
        return float(np.min(xs)), float(np.min(ys)), float(np.max(xs)), float(np.max(ys))


def open_image(path):
    """An ImageRef from the file's header (no pixels read): GeoTIFFs through rasterio (transform, CRS, nodata),
    PNG/JPEG through Pillow (size after EXIF orientation, never georeferenced)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    if path.suffix.lower() in TIFF_SUFFIXES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                geo = ds.crs is not None or ds.transform != Affine.identity()
                return ImageRef(path, (ds.height, ds.width), ds.transform if geo else Affine.identity(),
                                ds.crs, ds.nodata, geo)
    with no_pixel_limit(), Image.open(path) as im:
        w, h = im.size
        if exif_orientation(im) in (5, 6, 7, 8):  # turned a quarter: viewers show it h x w
            w, h = h, w
    return ImageRef(path, (h, w))


def image_refs(images):
    """ImageRefs of a folder's images (TIF/PNG/JPG) or of a list of paths, in order. None found: an error."""
    if isinstance(images, (str, Path)) and Path(images).is_dir():
        folder = Path(images)
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                        and not p.name.startswith("."))
        if not images:
            raise FileNotFoundError(f"no images (.tif/.png/.jpg) found in {folder}")
    elif isinstance(images, (str, Path)):
        images = [images]
    refs = [im if isinstance(im, ImageRef) else open_image(im) for im in images]
    if not refs:
        raise FileNotFoundError("no images given for the clicks")
    names = [r.name for r in refs]
    if len(set(names)) < len(names):
        raise ValueError(f"two images share a name (file stem): {sorted({n for n in names if names.count(n) > 1})}")
    return refs


# --------------------------------------------------------------------------- bands and bit depth

def keep_bands(arr, bands=None, alpha=None):
    """The chosen bands (0-based `bands`), or every band but a declared alpha band. No guessing: used where
    the band count must come out as the file has it (training images, patches cut from tiles)."""
    n = arr.shape[2]
    if bands is not None:
        bands = [int(b) for b in bands]
        if min(bands) < 0 or max(bands) >= n:
            raise RasterError(f"it has {n} bands (0..{n - 1}); bands {bands} were asked for")
        return arr[:, :, bands]
    if alpha is not None and n > 1:
        return np.delete(arr, alpha, axis=2)
    return arr


def select_bands(arr, channels=3, bands=None, alpha=None):
    """Pick the bands a model with `channels` input bands gets. Returns (array (H, W, channels), notes).

    `bands` (0-based indices) wins when given. Otherwise: an alpha band is dropped; a single band is
    replicated (with a note); exactly `channels` bands are taken as they are; more bands: the first
    `channels` (with a note); fewer (but more than one): an error that asks for `bands`.
    """
    n = arr.shape[2]
    if bands is not None:
        bands = [int(b) for b in bands]
        if len(bands) != channels:
            raise RasterError(f"{len(bands)} bands {bands} were asked for, the model takes {channels}")
        if min(bands) < 0 or max(bands) >= n:
            raise RasterError(f"bands {bands} were asked for, the image has {n} (0..{n - 1})")
        return arr[:, :, bands], []
    notes = []
    if alpha is not None:
        arr = np.delete(arr, alpha, axis=2) if n > 1 else arr
        n = arr.shape[2]
    if n == channels:
        return arr, notes
    if n == 1:
        notes.append(f"single-band (grayscale) image: its band is replicated to {channels} bands")
        return np.repeat(arr, channels, axis=2), notes
    if n > channels:
        notes.append(f"{n} bands: using the first {channels} (0..{channels - 1}); pass --bands to choose")
        return arr[:, :, :channels], notes
    raise RasterError(f"unsupported band layout: {n} bands, the model takes {channels}; "
                      f"pass --bands with {channels} band indices")


def bit_depth_of(arr):
    """Smallest bit depth from 8 up to the dtype's width that holds the largest value of an integer array."""
    top = int(arr.max()) if arr.size else 0
    return min(max(8, top.bit_length()), arr.dtype.itemsize * 8)


def scale_note(dtype, bit_depth):
    """The note of to_uint8 on scaling `dtype` pixels as `bit_depth`-bit data."""
    return f"{dtype} pixels scaled to 8 bits as {bit_depth}-bit data (x 255/{2 ** bit_depth - 1})"


def _count_pixels(mask):
    """Pixels of an (H, W, B) boolean mask with any band set (elements of a mask of another shape)."""
    return int((mask.any(axis=2) if mask.ndim == 3 else mask).sum())


def to_uint8(arr, bit_depth=None, valid=None):
    """Scale pixels to uint8 by the module's bit-depth rule. Returns (uint8 array, notes). `valid` ((H, W) bool,
    False at nodata) leaves nodata pixels out of every range check: the bit depth, the negatives counted, the
    float range (they come out 0). Negative values of a signed integer image are clipped to 0 with a note that
    counts them; a float image with NaN is an error (spec.load_input marks NaN pixels as nodata before it gets
    here)."""
    if arr.dtype == np.uint8:
        return arr, []
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255, []
    nodata = valid is not None and not valid.all()
    if nodata:
        arr = np.where(valid[..., None], arr, np.zeros((), arr.dtype))  # nodata: 0, out of every check
    if np.issubdtype(arr.dtype, np.integer):
        b = int(bit_depth) if bit_depth else bit_depth_of(arr)
        top = 2 ** b - 1
        notes = [] if b == 8 else [scale_note(arr.dtype, b)]
        if arr.dtype == np.uint16:  # a lookup table: one pass, no large temporary
            lut = np.clip(np.round(np.arange(65536) * (255 / top)), 0, 255).astype(np.uint8)
            return lut[arr], notes
        out = np.empty(arr.shape, np.uint8)
        negative = 0
        for r in range(0, arr.shape[0], 512):  # row chunks keep float temporaries small
            chunk = arr[r:r + 512]
            if np.issubdtype(arr.dtype, np.signedinteger):
                negative += _count_pixels(chunk < 0)
            out[r:r + 512] = np.clip(np.round(chunk * (255 / top)), 0, 255)
        if negative:
            notes.append(f"{negative} pixels hold negative {arr.dtype} values: clipped to 0")
        return out, notes
    if np.issubdtype(arr.dtype, np.floating):
        nan = np.isnan(arr)
        n_nan = _count_pixels(nan)
        values = arr[~nan] if n_nan else arr
        if nodata:
            values = arr[valid & ~nan.any(axis=2)]
        lo, hi = (float(values.min()), float(values.max())) if values.size else (np.nan, np.nan)
        if n_nan or not (0 <= lo and hi <= 1):
            found = f"values in [{lo:g}, {hi:g}]" if values.size else "no value but NaN"
            found += f", {n_nan} NaN pixels" if n_nan else ""
            if values.size and 0 <= lo and hi <= 255:  # 8-bit data stored as float: say what converts it
                todo = ("it looks like 8-bit data stored as float: convert it to 8-bit, e.g. gdal_translate -ot "
                        "Byte in.tif out.tif (the georeferencing is kept), or train on such files so the model "
                        "stores their range")
            else:
                todo = ("convert the file to 8-bit (gdal_translate -ot Byte -scale LOW HIGH 0 255 in.tif out.tif), "
                        "scale it to [0, 1], or train on such files so the model stores their range")
            found += " (nodata pixels left out)" if nodata else ""
            raise RasterError(f"unsupported pixel values: {arr.dtype}, {found}; float images "
                              f"must be in [0, 1] without NaN for a model trained on 8-bit images: {todo}")
        out = np.empty(arr.shape, np.uint8)
        for r in range(0, arr.shape[0], 512):
            out[r:r + 512] = np.round(arr[r:r + 512] * 255)
        return out, ["float pixels in [0, 1] scaled to 8 bits"]
    raise RasterError(f"unsupported pixel type {arr.dtype}")


def resize(arr, size):
    """(H, W, B) uint8 -> (h, w, B) uint8, bilinear with antialiasing (PIL, band by band); spec.to_grid is
    the rule that calls it for training and inference alike."""
    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    out = np.empty((h, w, arr.shape[2]), np.uint8)
    for b in range(arr.shape[2]):
        out[:, :, b] = np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, b])).resize((w, h), Image.BILINEAR))
    return out


def is_image_file(path):
    path = Path(path)
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


# --------------------------------------------------------------------------- writing

@contextlib.contextmanager
def atomic_path(path, keep_suffix=False):
    """Yield a temporary path next to `path`; rename it onto `path` when the block succeeds, delete it when
    it fails. Readers never see a half-written file. `keep_suffix`: the temporary ends in `path`'s suffix too
    (`.tmp.gpkg`), for writers that pick a format by it (GDAL)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix if keep_suffix else ''}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_TEMPORARY = re.compile(r"\.(.+)\.([1-9][0-9]*)\.tmp(\.gpkg|\.geojson)?")  # atomic_path's `.{name}.{pid}.tmp[.suffix]`


def clean_stale_temporaries(folder):
    """Delete the temporaries that killed runs left in `folder` (not its subfolders): files named as
    atomic_path names them, `.{name}.{pid}.tmp`, whose pid is no running process on this machine (kill -9
    skips atomic_path's clean-up; a checkpoint's temporary is hundreds of MB). Returns the removed paths.

    Other files and the temporaries of living processes are never touched. A process of another machine
    writing into the same (network) folder looks dead from here: call this where one machine writes a folder,
    at the start of a run. Does nothing where processes cannot be probed with signal 0 (not POSIX).
    """
    folder = Path(folder)
    if os.name != "posix" or not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        m = _TEMPORARY.fullmatch(path.name)
        if m is None or path.is_symlink() or not path.is_file() or _is_running(int(m.group(2))):
            continue
        path.unlink(missing_ok=True)  # another cleaner may have been first
        removed.append(path)
    return removed


def _is_running(pid):
    """Whether `pid` is a process on this machine (signal 0 probes it and sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, as another user
    except (OverflowError, OSError):
        return True  # not a pid this system can have: keep the file, it may not be ours
    return True


def palette_image(index_map, palette):
    """(H, W) uint8 class indices -> a PIL palette image: viewers show the class colours, the pixel values
    stay the class indices."""
    im = Image.fromarray(np.ascontiguousarray(index_map, dtype=np.uint8))  # "L", sharing the array's memory
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(palette)] = np.asarray(palette, np.uint8)
    im.putpalette(flat.reshape(-1).tolist())  # "L" becomes "P" in place: no copy of a 400 MB mask
    return im


def write_png(path, image, compress_level=1):
    """Write an (H, W), (H, W, 3) uint8 array or a PIL image as PNG, atomically."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", compress_level=compress_level)


class PngRows:
    """An (height, width) uint8 PNG written to an open binary file band of rows by band of rows (`write(rows)`,
    top to bottom, then `close()`): gray, or with a `palette` a palette PNG (viewers show the colours, the
    values stay the indices; colours past the palette's are black). Only the zlib state is held, so masks too
    large to hold whole can be written; the bytes do not depend on how the rows were split. `text` {keyword:
    value} goes into iTXt chunks before the pixels (png_text reads them back). png_rows() writes a file
    atomically with it."""

    def __init__(self, file, height, width, palette=None, compress_level=1, idat_bytes=1 << 20, text=None):
        self.file, self.height, self.width, self.idat_bytes = file, int(height), int(width), idat_bytes
        self.zip, self.pending, self.rows = zlib.compressobj(compress_level), b"", 0
        file.write(PNG_SIGNATURE)
        colour_type = 0 if palette is None else 3  # gray / palette, 8 bits per pixel
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, colour_type, 0, 0, 0))
        if palette is not None:
            flat = np.zeros((256, 3), np.uint8)
            flat[: len(palette)] = np.asarray(palette, np.uint8)
            self._chunk(b"PLTE", flat.tobytes())
        for key, value in (text or {}).items():  # keyword, compression flag and method, language, translation
            self._chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + _text_bytes(value))

    def write(self, rows):
        """Append (n, width) uint8 rows."""
        rows = np.asarray(rows, np.uint8)
        if rows.ndim != 2 or rows.shape[1] != self.width or self.rows + len(rows) > self.height:
            raise ValueError(f"rows {rows.shape} do not fit a {self.height}x{self.width} PNG after row {self.rows}")
        lines = np.zeros((len(rows), self.width + 1), np.uint8)  # each line: filter type 0 (none), pixels
        lines[:, 1:] = rows
        self._idat(self.zip.compress(lines.tobytes()))
        self.rows += len(rows)

    def close(self):
        if self.rows != self.height:
            raise ValueError(f"{self.rows} rows written of the PNG's {self.height}")
        self._idat(self.zip.flush(), last=True)
        self._chunk(b"IEND", b"")

    def _idat(self, data, last=False):
        """IDAT chunks of `idat_bytes`: the same file however the rows came in."""
        self.pending += data
        while len(self.pending) >= self.idat_bytes or (last and self.pending):
            self._chunk(b"IDAT", self.pending[: self.idat_bytes])
            self.pending = self.pending[self.idat_bytes:]

    def _chunk(self, kind, data):
        self.file.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))


def _text_bytes(value):
    """UTF-8 of a text for file metadata; a file name's undecodable bytes (Linux allows any) kept as they are."""
    return str(value).encode("utf-8", "surrogateescape")


def png_text(path):
    """{keyword: text} of the tEXt / iTXt chunks before a PNG's pixels ({} for no PNG): what PngRows wrote."""
    out = {}
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            return out
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I", head[:4])[0], head[4:]
            if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                break
            data = f.read(length)
            f.seek(4, 1)  # the CRC
            key, _, rest = data.partition(b"\0")
            if kind == b"iTXt" and rest[:1] == b"\0":  # uncompressed international text
                out[key.decode("latin-1")] = rest[2:].split(b"\0", 2)[-1].decode("utf-8", "surrogateescape")
            elif kind == b"tEXt":
                out[key.decode("latin-1")] = rest.decode("latin-1")
    return out


@contextlib.contextmanager
def png_rows(path, height, width, palette=None, compress_level=1, text=None):
    """A PngRows writing `path` atomically: the file appears when the block ends with every row written."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        png = PngRows(file, height, width, palette, compress_level, text=text)
        yield png
        png.close()


def tiles_of_rows(bands, width, tile=MASK_TILE):
    """The (tile, tile) tiles, row by row of tiles, of an image given as bands of rows (n, width) top to bottom,
    for tifffile's writer; holds one row of tiles."""
    held = np.zeros((0, width), np.uint8)
    for rows in itertools.chain(bands, [None]):
        if rows is not None:
            held = np.concatenate([held, rows])
        while len(held) >= tile or (rows is None and len(held)):
            for x in range(0, width, tile):
                yield held[:tile, x:x + tile]
            held = held[tile:]


def write_jpeg(path, image, quality=90):
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="JPEG", quality=quality)


def write_index_tiff(path, index_map, palette=None, geotags=None, shape=None, text=None):
    """Write an (H, W) uint8 class map as a (Geo)TIFF, atomically: deflate-compressed, tiled when large,
    with the palette as TIFF colour map (a GIS shows the class colours, values stay class indices) and the
    given GeoTIFF tags copied verbatim (same size as the input -> same georeferencing). `index_map` may also
    be an iterator of MASK_TILE tiles (tiles_of_rows) of an image of `shape`: a mask too large to hold. `text`
    {keyword: value} goes into the ImageDescription tag as JSON (ASCII, as TIFF requires)."""
    if shape is None:
        index_map = np.ascontiguousarray(index_map, dtype=np.uint8)
        shape = index_map.shape
    kwargs = {"shape": shape, "dtype": np.uint8}
    if palette is not None:
        cmap = np.zeros((3, 256), np.uint16)
        cmap[:, : len(palette)] = np.asarray(palette, np.uint16).T * 257
        kwargs.update(photometric="palette", colormap=cmap)
    else:
        kwargs.update(photometric="minisblack")
    if min(shape) >= 2 * MASK_TILE or not isinstance(index_map, np.ndarray):
        kwargs["tile"] = (MASK_TILE, MASK_TILE)
    extratags = [(code, dtype, count, value, True) for code, (dtype, count, value) in sorted((geotags or {}).items())]
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, index_map, compression="zlib", extratags=extratags, metadata=None,
                         description=json.dumps(text) if text else None,
                         bigtiff=shape[0] * shape[1] > 2 ** 31, **kwargs)
