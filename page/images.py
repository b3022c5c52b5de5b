"""The images of the page's folder: listed once at start, read by windows (GDAL) for the tiles the page asks for,
stretched for display when they are not 8-bit.
"""

import math
import threading
import warnings
from collections import OrderedDict
from http import HTTPStatus
from io import BytesIO
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from page import bounds
from page.bounds import HTTPError, not_found
from raster import IMAGE_SUFFIXES, TIFF_SUFFIXES, open_image, read_raster

WHOLE_READ_PIXELS = 100_000_000  # PNG/JPEG (and TIFFs GDAL cannot window) are read whole up to this many pixels


class Images:
    """The images of one folder: {name (file stem): ImageRef} for the readable ones, [{file, error}] for the
    others (an unreadable file, a name two files share, a link that leads out of the folder)."""

    def __init__(self, folder):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"images folder {folder} not found")
        self.refs, self.errors = {}, []
        for p in sorted(self.folder.iterdir()):
            if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
                continue
            try:
                if not p.resolve().is_relative_to(self.folder):
                    raise ValueError("a link to a file outside the images folder: not served")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    ref = open_image(p)
                if ref.name in self.refs:
                    raise ValueError(f"its name {ref.name!r} is taken by {self.refs[ref.name].path.name}")
                self.refs[ref.name] = ref
            except Exception as e:  # any unreadable file: listed as an error, the others still served
                self.errors.append({"file": p.name, "error": f"{type(e).__name__}: {e}"})
        if not self.refs and not self.errors:
            raise FileNotFoundError(f"no images (.tif/.png/.jpg) found in {self.folder}")
        self._whole = OrderedDict()  # name -> whole display image (small files), a few kept
        self._ranges = {}  # name -> (low, high) per band for display of non-8-bit data
        self._lock = threading.Lock()

    def get(self, name):
        ref = self.refs.get(name)
        if ref is None:
            raise not_found(f"no image named {name!r}")
        return ref

    def listing(self):
        return [{"name": r.name, "file": r.path.name, "width": r.shape[1], "height": r.shape[0],
                 "georeferenced": r.georeferenced, "crs": None if r.crs is None else str(r.crs)}
                for r in self.refs.values()]

    def window(self, name, x0, y0, x1, y1, step):
        """Display pixels (h, w, 3) uint8 of image pixels [y0, y1) x [x0, x1), every `step`-th (nearest)."""
        ref = self.get(name)
        out_h, out_w = -(-(y1 - y0) // step), -(-(x1 - x0) // step)
        if ref.path.suffix.lower() in TIFF_SUFFIXES:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    with rasterio.open(ref.path) as ds:
                        keep = [i + 1 for i, c in enumerate(ds.colorinterp) if c != ColorInterp.alpha] or [1]
                        arr = ds.read(keep[:3], window=Window(x0, y0, x1 - x0, y1 - y0),
                                      out_shape=(min(3, len(keep)), out_h, out_w), resampling=Resampling.nearest)
                return self._display(name, np.moveaxis(arr, 0, -1))
            except rasterio.errors.RasterioError:
                pass  # a TIFF GDAL cannot read: tifffile, whole, if small enough
        whole = self._whole_image(ref)
        return whole[y0:y1:step, x0:x1:step]

    def _whole_image(self, ref):
        with self._lock:
            if ref.name in self._whole:
                self._whole.move_to_end(ref.name)
                return self._whole[ref.name]
        if ref.shape[0] * ref.shape[1] > WHOLE_READ_PIXELS:
            raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{ref.path.name}: too large to read whole and not a "
                                                             f"TIFF that can be read by windows")
        r = read_raster(ref.path)
        arr = r.array if r.alpha is None else np.delete(r.array, r.alpha, axis=2)
        img = self._display(ref.name, arr[:, :, :3])
        with self._lock:
            self._whole[ref.name] = img
            while len(self._whole) > 4:
                self._whole.popitem(last=False)
        return img

    def _display(self, name, arr):
        """(h, w, B) of any dtype -> (h, w, 3) uint8: 8-bit as is; other data stretched between the 0.5 and 99.5
        percentiles of a low-resolution read of the image (fixed per image, so tiles agree)."""
        if arr.dtype != np.uint8:
            if name not in self._ranges:
                ref = self.refs[name]
                step = max(1, math.ceil(max(ref.shape) / 512))
                sample = arr if arr.shape[:2] == ref.shape else self.window_raw(name, step)
                s = sample.reshape(-1, sample.shape[2]).astype(np.float64)
                s = s[np.isfinite(s).all(1)]
                lo, hi = (np.percentile(s, [0.5, 99.5], axis=0) if len(s) else (np.zeros(arr.shape[2]),) * 2)
                self._ranges[name] = (lo, np.maximum(hi, lo + 1e-9))
            lo, hi = self._ranges[name]
            arr = np.clip((np.nan_to_num(arr.astype(np.float64)) - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
        if arr.shape[2] < 3:
            arr = np.repeat(arr[:, :, :1], 3, axis=2)
        return np.ascontiguousarray(arr[:, :, :3])

    def window_raw(self, name, step):
        ref = self.refs[name]
        H, W = ref.shape
        with rasterio.open(ref.path) as ds:
            keep = [i + 1 for i, c in enumerate(ds.colorinterp) if c != ColorInterp.alpha] or [1]
            arr = ds.read(keep[:3], out_shape=(min(3, len(keep)), -(-H // step), -(-W // step)),
                          resampling=Resampling.nearest)
        return np.moveaxis(arr, 0, -1)


def tile_window(ref, z, tx, ty, size):
    """The image window (x0, y0, x1, y1) and step of tile (tx, ty) at zoom z, `size` tile pixels a side.
    Bounds: 400 for a size or zoom out of range, 404 for a tile outside the image."""
    if not bounds.MIN_TILE <= size <= bounds.MAX_TILE:
        raise HTTPError(HTTPStatus.BAD_REQUEST,
                        f"tile size must be {bounds.MIN_TILE}..{bounds.MAX_TILE} pixels, got {size}")
    if not 0 <= z <= bounds.MAX_ZOOM:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"zoom must be 0..{bounds.MAX_ZOOM}, got {z}")
    step = 2 ** z
    side = size * step
    H, W = ref.shape
    x0, y0 = tx * side, ty * side
    if tx < 0 or ty < 0 or x0 >= W or y0 >= H:
        raise not_found(f"tile {tx},{ty} at zoom {z} lies outside {ref.path.name}")
    return x0, y0, min(W, x0 + side), min(H, y0 + side), step


def png_bytes(arr):
    buf = BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
