"""Click in the browser, see the map learn: a local web page to click points (and short scribbles) of a class on
the images of a folder, train a short model on them, see its prediction over the image and click where it is
least sure; and, in its Assess mode, label the points of a blind accuracy assessment sample one at a time.
Train adapts the model shown to the clicks as they are now (a few optimizer steps from its weights, --adapt-steps)
and repaints; Retrain from scratch trains anew; the "changed" layer shows the pixels whose class the last round
changed; the "live" layer repaints at each click with no training: a small head re-fitted on the shown model's
per-pixel features at the clicks (click_head.py, `Live`).

    python annotate.py --images input_images --clicks clicks.csv          # then open the address it prints
    python annotate.py --images tiles/ --clicks clicks.geojson --classes classes.json
    python annotate.py --images tiles/ --assess assessment.gpkg --classes classes.json   # assess.py sample wrote it

Every click is saved at once, atomically, to the click file (`annotations.write_clicks`: GeoJSON in map
coordinates for georeferenced images, CSV image,x,y,class otherwise), so the same file trains with
`python train.py --images DIR --clicks FILE`. Several tabs (or people) on one file do not lose each other's
clicks: a page sends each change as an operation (add / remove pixels) and the server applies it to the file as
it is on disk, under a file lock.

`--assess SAMPLE` adds the Assess mode: the page shows the points of a sample drawn by `assess.py sample` one at a
time, zoomed in, without the prediction, the clicks or the suggestions, and saves each label at once in the sample
layer (assess.Assessment.set_reference). The page never learns a point's map class (it stays in
`<sample>.design.json`), and the sample never trains a model: it may not be the click file, and no click file
with a `.design.json` beside it opens. The estimates (assess.Assessment.estimates) come with their 95 % intervals.

The server reads and writes only the images folder, the click file (and its `.lock` beside it), the assessment
sample (its `.lock`, its design, its `_estimates.csv`/`.md`), its static files and its run folder (`--runs`); it
binds to 127.0.0.1 unless told otherwise. The HTTP API and its bounds are in docs/annotate.md.
"""

import argparse
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyogrio
import rasterio
import shapely
from PIL import Image
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from rasterio.windows import Window

import assess
from annotations import (KINDS, LINE, POINT, ClickSet, ImageClicks, _nodata_pixels, rasterise_shape, read_clicks,
                         write_clicks)
from config import Shared, TrainConfig, add_arguments, check_settings, from_args, reuse, setting, whole
from raster import IMAGE_SUFFIXES, TIFF_SUFFIXES, atomic_path, open_image, read_raster
from spec import POTSDAM, load_class_file

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
MAX_TILE = 1024  # pixels a side of a served tile; larger: 400
MIN_TILE = 16
MAX_ZOOM = 20  # a tile at zoom z shows 2**z image pixels per tile pixel
MAX_BODY = 256 << 10  # bytes of a request body; larger: 413
MAX_PIXELS_PER_OP = 20_000  # pixels one add / remove may name; more: 413
MAX_LINE_VERTICES = 1000
MAX_EPOCHS = 1000  # of a training started from the page; more: 400
MAX_SUGGESTIONS = 200
# Suggest's rules; the default is random: with the page adapting, no model-driven rule beat random clicks at equal
# clicks (results/annotate_suggest_demo.md, SYNTHETIC, 3 seeds: margin -5.5 +- 8.9 mIoU at 20 clicks per image, the
# others lower still); `rule=margin` keeps the least-sure places for whoever wants them.
SUGGEST_RULES = ("random", "margin")
SUGGEST_RULE = "random"
REQUEST_QUEUE = 64  # connections waiting to be accepted (socketserver's 5 reset some of 16 busy clients)
WHOLE_READ_PIXELS = 100_000_000  # PNG/JPEG (and TIFFs GDAL cannot window) are read whole up to this many pixels
PREDICT_GRID_PIXELS = 16_000_000  # processing-grid pixels of an image predicted here; larger: run infer.py
# --allow-unclicked: mid-annotation, classes nobody has clicked yet must not stop the loop (train.py names them).
# --no-figures: the page draws its own overlay; the run's figures would add seconds to every round.
# {budget}: `--epochs E` for a training anew, `--init MODEL --steps N --schedule cosine --val-every N` to adapt the
# page's model (Training.budget); a command that names {epochs} instead always trains anew.
DEFAULT_TRAIN_COMMAND = ("{python} train.py --images {images} --clicks {clicks} --classes {classes} --no-pretrained "
                         "--arch resnet18 --out {out} {budget} --overwrite --allow-unclicked --no-figures")
TRAIN_FIELDS = ("python", "images", "clicks", "classes", "out", "epochs", "budget")  # the {...} a command may name
BUDGET = "{budget}"  # a token of its own: it expands into several arguments
ADAPT_STEPS = 5  # optimizer steps of an adaptation; docs/annotate.md says how it was chosen (results/annotate_latency_*)
CHANGED_COLOUR = (255, 0, 255)  # the "changed" layer: pixels whose class differs from the previous model's
STATIC_NAME = re.compile(r"[A-Za-z0-9_-]+\.(html|js|css|png|svg)")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


class HTTPError(Exception):
    """An answer other than 200: `status` and a message the page shows."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def not_found(what="not found"):
    return HTTPError(HTTPStatus.NOT_FOUND, what)


# --------------------------------------------------------------------------- images

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
    if not MIN_TILE <= size <= MAX_TILE:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"tile size must be {MIN_TILE}..{MAX_TILE} pixels, got {size}")
    if not 0 <= z <= MAX_ZOOM:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"zoom must be 0..{MAX_ZOOM}, got {z}")
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


# --------------------------------------------------------------------------- the click file

@contextmanager
def file_lock(thread_lock, lock_path):
    """One writer at a time: `thread_lock` for this server's threads, `fcntl.flock` on `lock_path` for other
    processes (a second server on the same file)."""
    with thread_lock, open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def file_version(path):
    """Changes whenever the file is replaced: (mtime ns, size, inode) as text; '' while there is none."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return ""
    return f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"


class ClickFile:
    """The click file, changed one operation at a time: under a lock (threads here, `fcntl.flock` on
    `<file>.lock` for other processes) the file is read as it is now, the operation applied and the result
    written atomically (annotations.write_clicks: temporary + rename). So two pages never lose each other's
    clicks, and a reader (train.py) never sees half a file."""

    def __init__(self, path, images, classes):
        self.path = Path(path).resolve()
        self.images, self.classes = images, classes
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = threading.Lock()
        self.notes = []  # what the last read left out and why (read_clicks' notes)
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".geojson", ".json", ".gpkg"):
            raise ValueError(f"{path}: the click file must be .csv, .geojson or .gpkg")
        geo = {r.georeferenced for r in images.refs.values()}
        if suffix != ".csv" and len(geo) > 1:
            raise ValueError(f"{path}: some images are georeferenced, some not; one layer cannot hold both: "
                             f"use a .csv click file (pixels)")
        if self.path.exists():
            self.read()  # a file that is not a click file of these images stops here, before any page opens

    def locked(self):
        return file_lock(self._lock, self.lock_path)

    def version(self):
        return file_version(self.path)

    def _empty(self):
        if not self.path.exists():
            return True
        if self.path.suffix.lower() == ".csv":
            with open(self.path, encoding="utf-8-sig") as f:
                return sum(1 for line in f if line.strip()) <= 1
        return pyogrio.read_info(self.path)["features"] == 0

    def read(self):
        """{image name: {(row, col): (class, kind)}} as the file holds it now. Clicks read_clicks leaves out (on
        nodata, edited in elsewhere) are not there and `self.notes` says so; a file of such clicks only reads as no
        clicks (allow_empty), so the page still opens on it."""
        out = {n: {} for n in self.images.refs}
        if self._empty():
            self.notes = []
            return out
        cs = read_clicks(self.path, list(self.images.refs.values()), self.classes, allow_empty=True)
        self.notes = list(cs.notes)
        for n, c in cs.images.items():
            out[n] = {(int(r), int(k)): (int(cl), int(kd)) for r, k, cl, kd in zip(c.rows, c.cols, c.classes, c.kinds)}
        return out

    def write(self, clicks):
        items = {}
        for n, ref in self.images.refs.items():
            px = clicks.get(n, {})
            rc = np.array(list(px.keys()), np.int64).reshape(-1, 2)
            ck = np.array(list(px.values()), np.int64).reshape(-1, 2)
            items[n] = ImageClicks(ref, rc[:, 0], rc[:, 1], ck[:, 0], ck[:, 1])
        write_clicks(self.path, ClickSet(items, self.classes, str(self.path)))

    def apply(self, op):
        """Apply {"op": "add"|"remove", "image", "points": [[x, y], ...], "class", "kind": "point"|"line"} to the
        file as it is now. A line's points are its vertices, rasterised as read_clicks rasterises lines. Nodata
        pixels (annotations' rule) take no click: an add with a point on one is refused (400, nothing saved); a
        line leaves its nodata pixels out and counts them (400 when that is every pixel). Returns
        {"changed": [[x, y, old class or None, new class or None], ...], "count": clicks in the file,
        "nodata": pixels left out, "version"}."""
        kind_name = op.get("kind", "point")
        if op.get("op") not in ("add", "remove") or kind_name not in ("point", "line"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "op must be 'add' or 'remove', kind 'point' or 'line'")
        ref = self.images.get(str(op.get("image")))
        pts = op.get("points")
        if not isinstance(pts, list) or not pts:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "points: a list of [x, y] pixel coordinates")
        if len(pts) > (MAX_LINE_VERTICES if kind_name == "line" else MAX_PIXELS_PER_OP):
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"at most {MAX_PIXELS_PER_OP} points (a line: "
                                                                 f"{MAX_LINE_VERTICES} vertices) per operation")
        if not all(isinstance(p, list) and len(p) == 2 and all(is_number(v) for v in p) for p in pts):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "points: a list of [x, y] pixel coordinates (two numbers each)")
        xy = np.array(pts, np.float64)
        if not np.isfinite(xy).all():
            raise HTTPError(HTTPStatus.BAD_REQUEST, "points must be finite numbers")
        H, W = ref.shape
        if kind_name == "line" and len(xy) > 1:
            rows, cols = rasterise_shape(shapely.LineString(xy), Affine.identity(), ref.shape)
        else:
            cols, rows = np.floor(xy[:, 0]).astype(np.int64), np.floor(xy[:, 1]).astype(np.int64)
        inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
        if not inside.all() and kind_name == "point":
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"a point lies outside {ref.path.name} ({W} x {H} pixels)")
        pixels = list(dict.fromkeys(zip(rows[inside].tolist(), cols[inside].tolist())))
        if len(pixels) > MAX_PIXELS_PER_OP:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a line of more than {MAX_PIXELS_PER_OP} pixels")
        new, nodata = None, 0
        if op["op"] == "add":
            cls = op.get("class")
            if not isinstance(cls, int) or isinstance(cls, bool) or not 0 <= cls < self.classes.num_classes:
                raise HTTPError(HTTPStatus.BAD_REQUEST,
                                f"class must be a whole number 0..{self.classes.num_classes - 1}, got {cls!r}")
            new = (cls, LINE if kind_name == "line" else POINT)
            pixels, nodata = self._valid(ref, pixels, kind_name)
        with self.locked():
            clicks = self.read()
            mine = clicks[ref.name]
            changed = []
            for p in pixels:
                old = mine.get(p)
                if new is None and old is not None:
                    del mine[p]
                elif new is not None and old != new:
                    mine[p] = new
                else:
                    continue
                changed.append([p[1], p[0], None if old is None else old[0], None if new is None else new[0]])
            if changed:
                self.write(clicks)
            return {"changed": changed, "count": sum(len(v) for v in clicks.values()), "nodata": nodata,
                    "version": self.version()}

    def _valid(self, ref, pixels, kind_name):
        """(pixels not on nodata, how many were): a point on nodata refuses the whole add (400), a line's nodata
        pixels are left out and counted, a line on nodata only is refused."""
        rc = np.array(pixels, np.int64).reshape(-1, 2)
        bad = _nodata_pixels(ref, rc[:, 0], rc[:, 1])
        if not bad.any():
            return pixels, 0
        where = ", ".join(f"({c}, {r})" for r, c in rc[bad][:5]) + (", ..." if bad.sum() > 5 else "")
        if kind_name == "point" or bad.all():
            what = f"{int(bad.sum())} of the {len(pixels)} points lie" if kind_name == "point" else "the line lies"
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"{what} on nodata in {ref.path.name} (x, y: {where}): no click "
                                                    f"can go there (train.py leaves such clicks out); nothing saved")
        return [p for p, b in zip(pixels, bad) if not b], int(bad.sum())

    def points(self, name=None):
        """({image name: [[x, y, class, kind], ...]} of one image or all, the read's notes)."""
        with self.locked():
            clicks = self.read()
            notes = list(self.notes)
        names = [self.images.get(name).name] if name is not None else list(clicks)
        return {n: [[c, r, cl, KINDS[kd]] for (r, c), (cl, kd) in sorted(clicks[n].items())] for n in names}, notes


def is_number(v):
    """A JSON number (int or float), not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------- the assessment sample (--assess)

BLIND_FIELDS = ("id", "image", "row", "col")  # all the page learns of a sample point: never its map class or stratum


def check_not_a_sample(clicks, sample=None):
    """Assessment points never train a model: refuse (ValueError) a click file that is the --assess sample, or that
    is any assessment sample (its .design.json beside it), before the page or a training could write or read it."""
    clicks = Path(clicks).resolve()
    if sample is not None and clicks == Path(sample).resolve():
        raise ValueError(f"--clicks {clicks} is the --assess sample: assessment points measure the map and never "
                         f"train a model; give another click file")
    design = assess.design_path(clicks)
    if design.is_file():
        raise ValueError(f"--clicks {clicks} is an assessment sample ({design.name} beside it): its points measure "
                         f"the map and never train a model; label it with --assess {clicks}, click into another file")


class AssessSample:
    """The assessment sample of --assess (a layer `assess.py sample` wrote, `<sample>.design.json` beside it),
    labelled blind on the page: its points one at a time (BLIND_FIELDS, never the map class), each label saved at
    once in the layer (assess.Assessment.set_reference: atomic), the design-based estimates. Under a lock (threads,
    and `fcntl.flock` on `<sample>.lock` for other processes) the labels are read again whenever the layer changed
    on disk, so two pages or servers on one sample keep each other's labels."""

    def __init__(self, sample, images, classes):
        self.path = Path(sample).resolve()
        self.a = assess.Assessment.open(self.path, [r.path for r in images.refs.values()], classes)
        self.ids = [p["id"] for p in self.a.design["points"]]  # the labelling order
        self.at = {pid: k for k, pid in enumerate(self.ids)}
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = threading.Lock()
        self._seen = file_version(self.path)

    @contextmanager
    def locked(self):
        with file_lock(self._lock, self.lock_path):
            if file_version(self.path) != self._seen:  # labelled elsewhere meanwhile (another server, QGIS)
                self.a.reload()
                self._seen = file_version(self.path)
            yield

    def point_id(self, value, what="id", query=False):
        """The id of a sample point from a request: a whole number in a JSON body, its digits in a `query`
        parameter; 400 for anything else."""
        if query and isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if value is None:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"missing {what}: the id of a sample point")
        if not isinstance(value, int) or isinstance(value, bool) or value not in self.at:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"{what} must be the id of one of the {len(self.ids)} sample "
                                                    f"points, got {value!r}")
        return value

    def _point(self, k):
        p = self.a.design["points"][k]
        return {f: p[f] for f in BLIND_FIELDS}

    def _summary(self, after=None):
        """Counts and the first unlabelled point in labelling order after the point `after` (wrapping round; from
        the start without one), or None when every point is labelled."""
        n = len(self.ids)
        start = 0 if after is None else self.at[after] + 1
        unlabelled = [k % n for k in range(start, start + n) if self.ids[k % n] not in self.a.reference]
        return {"sample": self.path.name, "points": n, "labelled": len(self.a.reference),
                "next": self._point(unlabelled[0]) if unlabelled else None, "classes": list(self.a.classes.names)}

    def summary(self, after=None):
        with self.locked():
            return self._summary(after)

    def point(self, pid):
        """One point: BLIND_FIELDS, its place in the labelling order (`index` 1..N, the ids before and after it)
        and its label so far (`reference`: class index or None)."""
        k = self.at[pid]
        with self.locked():
            reference = self.a.reference.get(pid)
        return {**self._point(k), "index": k + 1, "reference": reference,
                "previous": self.ids[k - 1] if k > 0 else None,
                "following": self.ids[k + 1] if k + 1 < len(self.ids) else None}

    def label(self, data):
        """{"id", "reference": class index, or null to clear it}: saved at once; answers the new counts and the
        next unlabelled point after this one."""
        pid = self.point_id(data.get("id"))
        if "reference" not in data:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "missing reference: a class index, or null to clear the label")
        cls, k = data["reference"], self.a.classes.num_classes
        if cls is not None and (not isinstance(cls, int) or isinstance(cls, bool) or not 0 <= cls < k):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"reference must be a whole number 0..{k - 1} or null, got {cls!r}")
        with self.locked():
            self.a.set_reference(pid, cls)
            self._seen = file_version(self.path)
            return {"id": pid, "reference": cls, **self._summary(after=pid)}

    def estimates(self):
        """assess.estimates_json of the labels so far; 409 with assess's message while a stratum has < 2 labelled points."""
        with self.locked():
            try:
                result = self.a.estimates()
            except ValueError as e:
                raise HTTPError(HTTPStatus.CONFLICT, str(e)) from None
            return assess.estimates_json(result, self.a.design, self.a.classes.names, len(self.a.reference))

    def write(self, overwrite=False):
        """`<sample>_estimates.csv` / `.md` (assess.Assessment.write); 409 when they exist and not `overwrite`, or
        while too few points are labelled."""
        if not isinstance(overwrite, bool):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"overwrite must be true or false, got {overwrite!r}")
        with self.locked():
            try:
                paths = self.a.write(overwrite=overwrite)
            except ValueError as e:
                raise HTTPError(HTTPStatus.CONFLICT, str(e)) from None
            except FileExistsError:
                prefix = assess.estimates_prefix(self.path).name
                raise HTTPError(HTTPStatus.CONFLICT, f"{prefix}.csv / .md exist beside {self.path.name}: send "
                                                     f"{{\"overwrite\": true}} to replace them") from None
            return {"csv": paths[0].name, "markdown": paths[1].name, "labelled": len(self.a.reference),
                    "points": len(self.ids)}


# --------------------------------------------------------------------------- training and prediction

def check_train_command(command, source="--train-command"):
    """Refuse (ValueError "--train-command ...: what") a train command whose {...} fields are not TRAIN_FIELDS, whose
    {budget} is not a token of its own or comes with {epochs} (an adaptation's --steps would meet --epochs), or whose
    program cannot be found (on PATH, or a path from the repository folder, where it runs): found at start, not at
    the first Train."""
    try:
        tokens = shlex.split(command)
    except ValueError as e:
        raise ValueError(f"{source} {command!r}: {e}") from None
    if not tokens:
        raise ValueError(f"{source} is empty: give the training command")
    known = ", ".join("{" + f + "}" for f in TRAIN_FIELDS)
    for tok in tokens:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(tok) if f is not None]
            unknown = [f for f in fields if f not in TRAIN_FIELDS]
            if unknown:
                raise ValueError(f"unknown field {{{unknown[0]}}}")
            tok.format(**{f: "x" for f in TRAIN_FIELDS})
        except (ValueError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"{source} {command!r}: {tok!r}: {e}; the fields are {known} (write {{{{ and }}}} for a "
                             f"literal brace)") from None
        if "budget" in fields and tok != BUDGET:
            raise ValueError(f"{source} {command!r}: {tok!r}: {BUDGET} stands alone (it expands into several "
                             f"arguments: --epochs E, or --init MODEL --steps N ...)")
    named = {f for tok in tokens for _, f, _, _ in string.Formatter().parse(tok) if f}
    if {"budget", "epochs"} <= named:
        raise ValueError(f"{source} {command!r}: name {BUDGET} or {{epochs}}, not both ({BUDGET} gives --epochs when "
                         f"training anew, and --steps when adapting, which train.py refuses beside --epochs)")
    program = tokens[0].format(python=sys.executable, **{f: "" for f in TRAIN_FIELDS if f != "python"})
    path = HERE / program  # an absolute path stays itself
    if not (shutil.which(program) if "/" not in program else path.is_file() and os.access(path, os.X_OK)):
        raise ValueError(f"{source} {command!r}: the program {program!r} is not found "
                         + ("on PATH" if "/" not in program else f"(or not executable) from {HERE}"))


class Training:
    """One training at a time in a background process (the train command), then the prediction of every image
    (class map and margin on the processing grid) for the overlay and for suggestions. The command trains on the
    images the page serves: `<runs>/images` holds a link to each (remade at each Train), so a file the page lists
    as not served (unreadable, a link out of the folder) never reaches train.py. Progress comes from the run's
    progress file (checkpoint.read_progress).

    A Train adapts the page's model when there is one: the model shown is kept as `<runs>/model.pth` (a hard link
    to the checkpoint it was predicted from, or a copy where links cannot be made; train.py replaces checkpoints by
    rename, never in place, so the next run's --overwrite leaves it as it is) and the command's {budget} becomes
    `--init <runs>/model.pth --steps N --schedule cosine --val-every N`: the weights and preprocessing contract of
    that model, fine-tuned on the clicks as they are now for `adapt_steps` optimizer steps (a fresh optimizer: its
    state is not carried over), scored once on the held-out clicks at the end. The first Train, a restart
    (Retrain from scratch) and any Train of a command without {budget} train anew: {budget} is `--epochs E`.
    After each prediction the class maps are compared with the previous model's (`changed`): the "changed"
    overlay layer and, per image, the number of image pixels whose class changed."""

    def __init__(self, command, images, click_file, classes, classes_path, runs, epochs, device="cpu",
                 adapt_steps=ADAPT_STEPS):
        self.command, self.images, self.click_file = command, images, click_file
        self.classes, self.classes_path, self.runs = classes, classes_path, Path(runs).resolve()
        self.epochs, self.device, self.adapt_steps = epochs, device, adapt_steps
        self.out = self.runs / "run"
        self.model_path = self.runs / "model.pth"  # the page's model: what the next Train adapts
        self.served = self.runs / "images"
        self.log_path = self.runs / "train.log"
        self.state = {"state": "idle", "epoch": 0, "epochs": epochs, "step": 0, "steps": None, "unit": None,
                      "loss": None, "val": {}, "message": "", "log": [], "metrics": {}, "model": 0, "predicted": [],
                      "skipped": {}, "how": None, "from_model": None, "changed": None, "seconds": {}}
        self.predictions = {}  # name -> {"classes": (h, w) uint8, "margin": (h, w) float32, "prob": (C, h, w)}
        self.changed = {}  # name -> (h, w) bool: class differs from the previous model's (on this model's grid)
        self._lock = threading.Lock()
        self._proc = None

    @property
    def adapts(self):
        """Whether the command can adapt a model: it names {budget} (one that names {epochs} always trains anew)."""
        return BUDGET in shlex.split(self.command)

    def budget(self, epochs, init=None):
        """The arguments {budget} stands for: `--epochs E` to train anew; to adapt the model `init`, its weights
        and a budget of `adapt_steps` optimizer steps on a cosine schedule, validated once, at the end."""
        if init is None:
            return ["--epochs", str(epochs)]
        n = str(self.adapt_steps)
        return ["--init", str(init), "--steps", n, "--schedule", "cosine", "--val-every", n]

    def argv(self, epochs, init=None):
        subs = {"python": sys.executable, "images": str(self.served), "clicks": str(self.click_file.path),
                "classes": str(self.classes_path), "out": str(self.out), "epochs": str(epochs)}
        argv = []
        for tok in shlex.split(self.command):
            argv += self.budget(epochs, init) if tok == BUDGET else [tok.format(**subs)]
        return argv

    def link_served_images(self):
        """Make `<runs>/images` hold one link per served image, nothing else (links left from before removed)."""
        self.served.mkdir(parents=True, exist_ok=True)
        for p in self.served.iterdir():
            if not p.is_symlink():
                raise HTTPError(HTTPStatus.CONFLICT, f"{p}: not a link; {self.served} is annotate's own folder of "
                                                     f"links to the served images: move that file away")
            p.unlink()
        for ref in self.images.refs.values():
            (self.served / ref.path.name).symlink_to(ref.path)

    def status(self):
        with self._lock:
            if self.state["state"] == "running":
                self._progress()
            return json.loads(json.dumps(self.state))

    def _progress(self):
        """Fold the progress file into the state (under the lock)."""
        from checkpoint import PROGRESS_FILE, read_progress  # torch comes with it: the server starts without
        try:
            run = read_progress(self.out / PROGRESS_FILE)
        except (OSError, ValueError) as e:
            self.state["message"] = f"progress unreadable: {e}"
            return
        if run:
            self.state.update({k: run[k] for k in ("unit", "epoch", "epochs", "step", "steps", "loss", "val")})

    def start(self, epochs=None, restart=False):
        """Start a training: adapt the model shown (unless `restart`, or the command cannot adapt, or there is none
        yet), else train anew for `epochs` epochs (default --epochs). 400 for a bad value or no clicks, 409 while one
        runs."""
        if epochs is None:
            epochs = self.epochs
        if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= MAX_EPOCHS:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"epochs must be a whole number 1..{MAX_EPOCHS}, got {epochs!r}")
        if not isinstance(restart, bool):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"restart must be true or false, got {restart!r}")
        with self._lock:
            if self.state["state"] in ("running", "predicting"):
                raise HTTPError(HTTPStatus.CONFLICT, "a training is already running; wait for it to finish")
            if sum(len(v) for v in self.click_file.read().values()) == 0:
                raise HTTPError(HTTPStatus.BAD_REQUEST, "no clicks yet: click some points of each class first")
            shown = self.state["model"]
            adapt = not restart and shown > 0 and self.adapts and self.model_path.is_file()
            self.runs.mkdir(parents=True, exist_ok=True)
            if not Path(self.classes_path).exists():
                Path(self.classes_path).write_text(json.dumps(self.classes.to_dict(), indent=1))
            self.link_served_images()
            from checkpoint import PROGRESS_FILE  # torch comes with it: imported when a training starts
            (self.out / PROGRESS_FILE).unlink(missing_ok=True)  # no progress of the last run shown as this one's
            argv = self.argv(epochs, self.model_path if adapt else None)
            log = open(self.log_path, "w")
            log.write("$ " + shlex.join(argv) + "\n")
            log.flush()
            self._proc = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if adapt:
                how = f"adapting model {shown}: {self.adapt_steps} steps on the clicks as they are now"
            else:
                how = f"training anew: {epochs} epochs" + (
                    f" (the train command names {{epochs}}, not {BUDGET}: it cannot adapt a model)"
                    if shown and not restart and not self.adapts else "")
            self.state.update(state="running", epoch=0, epochs=epochs, step=0, steps=None, unit=None, loss=None,
                              val={}, message=how, log=[], metrics={}, how="adapt" if adapt else "anew",
                              from_model=shown if adapt else None, seconds={})
            started = time.monotonic()
        threading.Thread(target=self._watch, args=(self._proc, log, started), daemon=True).start()
        return self.status()

    def _watch(self, proc, log, started):
        tail = []
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail = (tail + [line.rstrip()])[-15:]
            with self._lock:
                self.state["log"] = tail
        rc = proc.wait()
        log.close()
        trained = time.monotonic()
        with self._lock:
            self._progress()
            self.state["seconds"] = {"train": round(trained - started, 2)}
        if rc != 0:
            with self._lock:
                self.state.update(state="failed", message=f"training stopped with exit code {rc}; see {self.log_path}")
            return
        with self._lock:
            self.state.update(state="predicting", message="predicting the images")
        try:
            self.predict_all()
        except Exception as e:  # shown on the page; the server goes on
            with self._lock:
                self.state.update(state="failed", message=f"prediction failed: {type(e).__name__}: {e}")
            return
        with self._lock:
            s = self.state
            s["seconds"]["predict"] = round(time.monotonic() - trained, 2)
            s.update(state="done", model=s["model"] + 1,
                     message=f"adapted from model {s['from_model']} ({self.adapt_steps} steps)" if s["how"] == "adapt"
                     else f"trained anew ({s['epochs']} epochs)" if s["unit"] == "epoch" else "trained anew")

    def checkpoint_path(self):
        """The model at the end of the training: it has learnt from every click. (best_model.pth is chosen on a
        handful of held-out clicks: noisy, often an early epoch, so the overlay would lag behind the clicks.)"""
        for name in ("last.pth", "best_model.pth"):
            if (self.out / name).is_file():
                return self.out / name
        raise FileNotFoundError(f"the training wrote no checkpoint into {self.out}")

    def keep_model(self, checkpoint):
        """Make `<runs>/model.pth` the checkpoint shown (a hard link, or a copy where links cannot be made), so the
        next Train can adapt it whatever the next run writes into its folder."""
        checkpoint = Path(checkpoint).resolve()
        if checkpoint == self.model_path:
            return
        self.runs.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.model_path) as tmp:
            try:
                os.link(checkpoint, tmp)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(checkpoint, tmp)

    def predict_all(self, checkpoint=None):
        import torch  # the server starts without it; only a prediction needs it
        from checkpoint import load_model
        from few_clicks import margin
        from predict import predict_probabilities
        from spec import grid_size, load_input, to_grid
        checkpoint = Path(checkpoint or self.checkpoint_path())
        model, ck = load_model(checkpoint, self.device)
        check_classes(checkpoint, ck.spec.classes, self.classes)
        metrics = held_out_metrics(checkpoint.parent / "history.json", ck.epoch)
        preds, skipped = {}, {}
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        for name, ref in self.images.refs.items():
            h, w = grid_size(*ref.shape, ck.spec.scale)
            if h * w > PREDICT_GRID_PIXELS:
                skipped[name] = f"{h} x {w} processing pixels: too large to predict here; run infer.py on it"
                continue
            try:
                small = to_grid(load_input(ref.path, ck.spec).image, ck.spec.scale)
                prob = predict_probabilities(model, small, 1.0)  # (C, h, w) on the processing grid
            except Exception as e:  # one bad image does not stop the others
                skipped[name] = f"{type(e).__name__}: {e}"
                continue
            preds[name] = {"classes": prob.argmax(0).astype(np.uint8), "margin": margin(prob).astype(np.float32),
                           "prob": prob}
        self.keep_model(checkpoint)
        with self._lock:
            changed = changed_maps(self.predictions, preds, self.images.refs)
            self.changed = changed
            self.state.update(metrics=metrics, predicted=sorted(preds), skipped=skipped,
                              checkpoint=checkpoint.name,
                              changed=changed_summary(changed, self.images.refs, self.state["model"]))
            self.predictions = preds

    def show(self, checkpoint):
        """Show a model before any training (`--checkpoint`): its prediction, kept as model 1, which Train
        adapts."""
        self.predict_all(checkpoint)
        self.state.update(state="done", model=1, message=f"showing {checkpoint}")


def changed_maps(before, after, refs):
    """{image name: (h, w) bool}: the cells of `after`'s class maps (on its processing grid) whose class differs
    from `before`'s, for each image both predicted. Where the grids differ (another scale), `before` is looked up
    at the image pixel each cell of `after` starts at (the overlay's rule, points_to_grid's)."""
    out = {}
    for name, new in after.items():
        old = before.get(name)
        if old is None:
            continue
        a, b = old["classes"], new["classes"]
        if a.shape != b.shape:
            H, W = refs[name].shape
            rows = (np.arange(b.shape[0]) * H // b.shape[0]) * a.shape[0] // H
            cols = (np.arange(b.shape[1]) * W // b.shape[1]) * a.shape[1] // W
            a = a[np.ix_(rows, cols)]
        out[name] = a != b
    return out


def image_pixels(cells, shape):
    """How many pixels of an image of `shape` (H, W) show the True cells of `cells` (h, w) in the overlay (image row
    y shows grid row y * h // H, column alike)."""
    (H, W), (h, w) = shape, cells.shape
    rows = np.bincount(np.arange(H) * h // H, minlength=h)
    cols = np.bincount(np.arange(W) * w // W, minlength=w)
    return int(rows @ cells.astype(np.int64) @ cols)


def changed_summary(changed, refs, since):
    """The status's `changed`: the model compared with (`since`: its number; None for the first model), and per
    image the pixels whose class changed and their share of the image."""
    if not since:
        return {"since": None, "pixels": {}, "share": {},
                "note": "the first model: no earlier prediction to compare with"}
    pixels = {n: image_pixels(c, refs[n].shape) for n, c in sorted(changed.items())}
    return {"since": since, "pixels": pixels,
            "share": {n: p / (refs[n].shape[0] * refs[n].shape[1]) for n, p in pixels.items()},
            "note": f"pixels whose class differs from model {since}'s"}


def check_classes(checkpoint, model_classes, classes):
    """Refuse (ValueError naming both lists) a model whose classes are not the page's: its suggestions would name
    the wrong classes and its class indices would run past the page's palette."""
    if tuple(model_classes.names) != tuple(classes.names):
        raise ValueError(f"{checkpoint}: the model's {model_classes.num_classes} classes {list(model_classes.names)} "
                         f"are not the page's {classes.num_classes} classes {list(classes.names)}; pass the class "
                         f"file the model was trained with (--classes), or another checkpoint")


def held_out_metrics(path, epoch=None):
    """The validation numbers of the epoch the checkpoint is from (else the last): every `val_*` key of
    history.json, as train.py --clicks writes them (accuracy on held-out clicks and its interval)."""
    try:
        history = json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(history, list) or not history:
        return {}
    row = next((h for h in history if isinstance(h, dict) and h.get("epoch") == epoch), history[-1])
    out = {k: v for k, v in row.items() if k.startswith("val_")}
    out["epoch"] = row.get("epoch")
    from checkpoint import json_ready  # torch comes with it: called once a model is predicted
    return json_ready(out)


def tile_cells(shape, grid_shape, x0, y0, x1, y1, step):
    """(rows, cols): the processing-grid cells that image pixels [y0, y1) x [x0, x1), every `step`-th, of an image
    of `shape` (H, W) show in the overlay (points_to_grid's rule)."""
    (H, W), (h, w) = shape, grid_shape
    return (np.arange(y0, y1, step) * h // H).clip(0, h - 1), (np.arange(x0, x1, step) * w // W).clip(0, w - 1)


def overlay_tile(pred, ref, x0, y0, x1, y1, step, layer, palette, changed=None):
    """RGBA (h, w, 4) uint8 of the prediction (class colours), of the least-sure map (red where the margin is
    small) or of `changed` (the cells whose class changed since the previous model, CHANGED_COLOUR; the others
    transparent) over image pixels [y0, y1) x [x0, x1) every `step`-th; cells are looked up by points_to_grid's
    rule."""
    grid = pred["classes"]
    rows, cols = tile_cells(ref.shape, grid.shape, x0, y0, x1, y1, step)
    out = np.zeros((rows.size, cols.size, 4), np.uint8)
    if layer == "classes":
        out[..., :3] = np.asarray(palette, np.uint8)[grid[np.ix_(rows, cols)]]
        out[..., 3] = 255
    elif layer == "changed":
        out[changed[np.ix_(rows, cols)]] = (*CHANGED_COLOUR, 255)
    else:
        unsure = 1 - pred["margin"][np.ix_(rows, cols)]
        out[..., 0] = 255
        out[..., 3] = (unsure ** 2 * 255).astype(np.uint8)
    return out


def suggest(training, click_file, n, rule=SUGGEST_RULE, spacing=5.0):
    """n places to click next, over all predicted images, on cells without a click, `spacing` cells apart on one image
    (few_clicks.choose_cells): `random` draws them uniformly (seeded by the click file's version: the same clicks
    give the same places, a new click new ones), `margin` takes the n smallest margins (the model's least sure)."""
    from few_clicks import cell_centres, choose_cells
    if rule not in SUGGEST_RULES:
        raise ValueError(f"rule must be one of {', '.join(SUGGEST_RULES)}, got {rule!r}")
    with click_file.locked():
        clicks, version = click_file.read(), zlib.crc32(str(click_file.version()).encode())
    found = []
    for name, pred in sorted(training.predictions.items()):
        ref = click_file.images.refs[name]
        H, W = ref.shape
        h, w = pred["classes"].shape
        centres = cell_centres(H, W, h, w)
        candidates = centres >= 0
        for r, c in clicks.get(name, {}):
            candidates[r * h // H, c * w // W] = False
        rng = np.random.default_rng([version, zlib.crc32(name.encode())])
        for j in choose_cells(pred["prob"], candidates, n, spacing=spacing, strategy=rule, rng=rng):
            r, c = divmod(int(centres.flat[j]), W)
            found.append({"image": name, "x": c, "y": r, "margin": float(pred["margin"].flat[j]),
                          "predicted": int(pred["classes"].flat[j])})
    if rule == "random":  # every image drew n: n of them, each place equally likely
        order = np.random.default_rng(version).permutation(len(found))
        return [found[i] for i in order[:n]]
    return sorted(found, key=lambda t: t["margin"])[:n]


# --------------------------------------------------------------------------- the live layer: a click repaints at once

class Live:
    """The `live` overlay layer: a small head (click_head.fit_head, the logistic regression anchored at the network's
    own classifier) re-fitted on the shown model's per-pixel features at every click of every image, and painted over
    the tiles asked for, with no training. It is fitted when a tile or /api/live asks and the click file or the model
    changed since the last fit (a fit of hundreds of clicks takes milliseconds); the model's features are extracted
    once per image (click_head.Features caches them) and thrown away when another model is shown. Only the images the
    model predicted (Training.predictions) are painted or read for clicks."""

    def __init__(self, training, click_file):
        self.training, self.click_file = training, click_file
        self._lock = threading.Lock()
        self.features, self.model, self.key, self.head = None, 0, None, None
        self.state = {}

    def fitted(self):
        """(head, features) for the model shown and the clicks as they are now; 409 before a model is shown."""
        training = self.training
        with training._lock:
            model, predicted = training.state["model"], set(training.predictions)
        if not model or not predicted:
            raise HTTPError(HTTPStatus.CONFLICT, "no model yet: train first (the live layer re-fits the shown "
                                                 "model's head on the clicks)")
        from click_head import fit_head, Features  # torch comes with it: the server starts without
        with self._lock:
            if self.features is None or self.model != model:
                self.features, self.model, self.key = Features(training.model_path, training.device), model, None
            with self.click_file.locked():
                version = self.click_file.version()
                clicks = self.click_file.read() if self.key != (model, version) else None
            if clicks is not None:
                t0 = time.perf_counter()
                seconds = self.features.seconds
                xs, ys = [], []
                for name, px in clicks.items():
                    if px and name in predicted:
                        rc = np.array(list(px), np.int64)
                        xs.append(self.features.at(name, self.click_file.images.refs[name].path, rc[:, 0], rc[:, 1]))
                        ys.append(np.array([cl for cl, _ in px.values()], np.int64))
                D = self.features.weight.shape[1]
                x = np.concatenate(xs) if xs else np.zeros((0, D), np.float32)
                y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
                t1 = time.perf_counter()
                self.head = fit_head(x, y, self.features.weight, self.features.bias)
                t2 = time.perf_counter()
                self.key = (model, version)
                self.state = {"model": model, "version": version, "clicks": int(len(y)),
                              "head": "logistic regression anchored at the model's classifier",
                              "seconds": {"features": round(self.features.seconds - seconds, 3),
                                          "gather": round(t1 - t0 - (self.features.seconds - seconds), 3),
                                          "fit": round(t2 - t1, 3)}}
            return self.head, self.features

    def status(self):
        self.fitted()
        with self._lock:
            return dict(self.state)

    def tile(self, name, ref, x0, y0, x1, y1, step, palette):
        """RGBA (h, w, 4) uint8: the head's classes over image pixels [y0, y1) x [x0, x1) every `step`-th, looked up
        on the processing grid by the overlay's rule (only the grid block the tile covers is predicted)."""
        with self.training._lock:
            predicted = name in self.training.predictions
        if not predicted:
            raise not_found(f"no prediction for {name}")
        head, features = self.fitted()
        with self._lock:
            f = features.of(name, ref.path)
        return head_tile(head, f, ref.shape, x0, y0, x1, y1, step, palette)


def head_tile(head, features, shape, x0, y0, x1, y1, step, palette):
    """RGBA (h, w, 4) uint8 of `head`'s classes over image pixels [y0, y1) x [x0, x1) every `step`-th of an image of
    `shape` (H, W) whose processing-grid features are `features` (D, h, w): the cells by the overlay's rule, only the
    block of cells the tile covers predicted."""
    rows, cols = tile_cells(shape, features.shape[1:], x0, y0, x1, y1, step)
    grid = head.predict(features[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    out = np.empty((rows.size, cols.size, 4), np.uint8)
    out[..., :3] = np.asarray(palette, np.uint8)[grid[np.ix_(rows - rows[0], cols - cols[0])]]
    out[..., 3] = 255
    return out


# --------------------------------------------------------------------------- HTTP

class App:
    """What the request handler needs: images, click file, training, classes, the assessment sample (None without
    --assess), the allowed Host names."""

    def __init__(self, args):
        self.images = Images(args.images)
        self.classes = load_class_file(args.classes) if args.classes else POTSDAM
        clicks = args.clicks or default_click_file(self.images)
        check_not_a_sample(clicks, args.assess)
        self.assessment = AssessSample(args.assess, self.images, self.classes) if args.assess else None
        self.click_file = ClickFile(clicks, self.images, self.classes)
        runs = Path(args.runs)
        classes_path = Path(args.classes).resolve() if args.classes else runs.resolve() / "classes.json"
        command = args.train_command or os.environ.get("ANNOTATE_TRAIN_COMMAND") or DEFAULT_TRAIN_COMMAND
        from_env = not args.train_command and os.environ.get("ANNOTATE_TRAIN_COMMAND")
        check_train_command(command, "--train-command ($ANNOTATE_TRAIN_COMMAND)" if from_env else "--train-command")
        self.training = Training(command, self.images, self.click_file, self.classes, classes_path, runs,
                                 args.epochs, args.device, args.adapt_steps)
        self.live = Live(self.training, self.click_file)
        self.hosts = set()

    def config(self):
        return {"images": self.images.listing(), "errors": self.images.errors,
                "classes": {"names": list(self.classes.names), "palette": [list(c) for c in self.classes.palette]},
                "clicks_file": self.click_file.path.name, "epochs": self.training.epochs,
                "adapt_steps": self.training.adapt_steps if self.training.adapts else None,
                "suggest": {"rules": list(SUGGEST_RULES), "default": SUGGEST_RULE},
                "assess": None if self.assessment is None else {"sample": self.assessment.path.name,
                                                                "points": len(self.assessment.ids),
                                                                "first": self.assessment.ids[0]},
                "bounds": {"max_tile": MAX_TILE, "max_zoom": MAX_ZOOM, "max_body": MAX_BODY, "max_epochs": MAX_EPOCHS,
                           "max_suggestions": MAX_SUGGESTIONS, "max_line_vertices": MAX_LINE_VERTICES,
                           "max_pixels_per_op": MAX_PIXELS_PER_OP}}


def default_click_file(images):
    """clicks.geojson (map coordinates) when every image is georeferenced, clicks.csv (pixels) otherwise."""
    geo = [r.georeferenced for r in images.refs.values()]
    return "clicks.geojson" if geo and all(geo) else "clicks.csv"


def _int(q, key, default=None):
    v = q.get(key, [None])[0]
    if v is None:
        if default is None:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"missing parameter {key}")
        return default
    try:
        return int(v)
    except ValueError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{key} must be an integer, got {v!r}") from None


class Handler(BaseHTTPRequestHandler):
    app = None  # set by make_server
    server_version = "annotate"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: errors are answered, not printed
        pass

    def _send(self, status, body, ctype, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status=HTTPStatus.OK):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _handle(self, method):
        try:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if self.app.hosts and host not in self.app.hosts:  # DNS rebinding: only our own name
                raise HTTPError(HTTPStatus.FORBIDDEN, "unknown Host header")
            length = self.headers.get("Content-Length") or "0"
            if not length.isascii() or not length.isdigit():
                self.close_connection = True  # where this body ends is unknown: the connection cannot go on
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"Content-Length must be a whole number of bytes, got "
                                                        f"{length[:40]!r}")
            length = int(length)
            if length > MAX_BODY:
                self.close_connection = True
                raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes")
            body = self.rfile.read(length) if length > 0 else b""
            url = urlsplit(self.path)
            route(self, method, url.path, parse_qs(url.query), body)
        except HTTPError as e:
            self._json({"error": str(e)}, e.status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug or an unreadable file: answered, the server goes on
            self._json({"error": f"{type(e).__name__}: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


def route(h, method, path, q, body):
    """Every URL the server answers; anything else is 404 (no path from a request ever reaches the disk:
    images are looked up by name, static files by a plain file name in static/)."""
    app = h.app
    if method == "GET":
        if path in ("/", "/index.html"):
            return static_file(h, "index.html")
        if path.startswith("/static/"):
            return static_file(h, path[len("/static/"):])
        if path == "/api/config":
            return h._json(app.config())
        if path == "/api/clicks":
            name = q.get("image", [None])[0]
            clicks, notes = app.click_file.points(name)
            return h._json({"clicks": clicks, "notes": notes, "version": app.click_file.version()})
        if path == "/api/version":
            return h._json({"version": app.click_file.version(), "model": app.training.status()["model"]})
        if path in ("/api/tile", "/api/overlay"):
            return tile(h, path, q)
        if path == "/api/train":
            return h._json(app.training.status())
        if path == "/api/live":
            return h._json(app.live.status())
        if path == "/api/assess":
            after = q.get("after", [None])[0]
            sample = assessment_of(app)
            return h._json(sample.summary(None if after is None else sample.point_id(after, "after", query=True)))
        if path == "/api/assess/point":
            sample = assessment_of(app)
            return h._json(sample.point(sample.point_id(q.get("id", [None])[0], query=True)))
        if path == "/api/assess/estimates":
            return h._json(assessment_of(app).estimates())
        if path == "/api/suggest":
            n = _int(q, "n", 10)
            if not 1 <= n <= MAX_SUGGESTIONS:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"n must be 1..{MAX_SUGGESTIONS}")
            if not app.training.predictions:
                raise HTTPError(HTTPStatus.CONFLICT, "no prediction yet: train first")
            rule = q.get("rule", [SUGGEST_RULE])[0]
            if rule not in SUGGEST_RULES:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"rule must be one of {', '.join(SUGGEST_RULES)}")
            return h._json({"suggestions": suggest(app.training, app.click_file, n, rule), "rule": rule})
        raise not_found()
    if method == "POST":
        if path not in ("/api/clicks", "/api/train", "/api/assess", "/api/assess/write"):
            raise not_found()
        if (h.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)")
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        if path == "/api/clicks":
            return h._json(app.click_file.apply(data))
        if path == "/api/assess":
            return h._json(assessment_of(app).label(data))
        if path == "/api/assess/write":
            return h._json(assessment_of(app).write(data.get("overwrite", False)))
        return h._json(app.training.start(data.get("epochs"), data.get("restart", False)))
    raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "GET or POST")


def assessment_of(app):
    if app.assessment is None:
        raise not_found("no assessment sample: start annotate.py with --assess SAMPLE")
    return app.assessment


def static_file(h, name):
    if not STATIC_NAME.fullmatch(name):
        raise not_found()
    path = (STATIC / name).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file():
        raise not_found()
    h._send(HTTPStatus.OK, path.read_bytes(), CONTENT_TYPES[path.suffix])


def tile(h, path, q):
    app = h.app
    name = q.get("image", [""])[0]
    ref = app.images.get(name)
    x0, y0, x1, y1, step = tile_window(ref, _int(q, "z"), _int(q, "x"), _int(q, "y"), _int(q, "size", 256))
    if path == "/api/tile":
        arr = app.images.window(name, x0, y0, x1, y1, step)
    else:
        layer = q.get("layer", ["classes"])[0]
        if layer not in ("classes", "unsure", "changed", "live"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "layer must be 'classes', 'unsure', 'changed' or 'live'")
        if layer == "live":
            return h._send(HTTPStatus.OK, png_bytes(app.live.tile(name, ref, x0, y0, x1, y1, step,
                                                                  app.classes.palette)), "image/png")
        training = app.training
        with training._lock:  # one model's prediction and changes, not one of each
            pred, changed = training.predictions.get(name), training.changed.get(name)
        if pred is None:
            raise not_found(f"no prediction for {name}")
        if layer == "changed" and changed is None:
            raise not_found(f"no earlier prediction of {name} to compare with: the changes show from the second "
                            f"model on")
        arr = overlay_tile(pred, ref, x0, y0, x1, y1, step, layer, app.classes.palette, changed)
    h._send(HTTPStatus.OK, png_bytes(arr), "image/png")


class Server(ThreadingHTTPServer):
    request_queue_size = REQUEST_QUEUE


def make_server(args):
    """A ThreadingHTTPServer for `args` (not started); its address is server.server_address."""
    args = settings_of(args)
    app = App(args)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = Server((args.host, args.port), handler)
    server.daemon_threads = True
    if args.host in ("127.0.0.1", "localhost", "::1"):
        app.hosts = {"127.0.0.1", "localhost", "::1"}
    server.app = app
    return server


# --------------------------------------------------------------------------- CLI

@dataclass
class AnnotateSettings:
    """annotate.py's command line: a flag that train.py (or infer.py) takes too is that declaration (config.reuse),
    so it has one help, one parser and one check in every command."""
    images: Optional[str] = reuse(TrainConfig, "images", required=True)
    clicks: Optional[str] = reuse(TrainConfig, "clicks")
    classes: Optional[str] = reuse(TrainConfig, "classes")
    assess: Optional[str] = setting(None, "an assessment sample to label blind in the page's Assess mode: the layer "
                                          "`python assess.py sample` wrote, its .design.json beside it; never a click "
                                          "file, never trained on", "page")
    checkpoint: Optional[str] = reuse(Shared, "checkpoint")
    runs: str = setting("checkpoints/annotate", "run folder: the training's checkpoints and log", "page")
    epochs: int = reuse(TrainConfig, "epochs", 10)
    adapt_steps: int = setting(ADAPT_STEPS, "optimizer steps of a Train that adapts the model shown to the clicks as "
                                            "they are now (train.py --init --steps N --schedule cosine, the train "
                                            "command's {budget}); Retrain from scratch trains --epochs anew", "page",
                               check=whole(1), must="be >= 1")
    train_command: Optional[str] = setting(
        None, "the training command ({python} {images} {clicks} {classes} {out} {budget} filled in; {budget} is "
              "--epochs E, or --init MODEL --steps N ... when adapting; a command with {epochs} instead always "
              "trains anew); default (or $ANNOTATE_TRAIN_COMMAND): " + DEFAULT_TRAIN_COMMAND, "page")
    device: str = reuse(TrainConfig, "device", "cpu")
    host: str = setting("127.0.0.1", "address to bind (127.0.0.1: this machine only)", "page")
    port: int = setting(8765, "port (0: any free one)", "page", check=lambda v: whole(0)(v) and v < 65536,
                        must="be in 0..65535")


def get_args_parser():
    """The options are AnnotateSettings' fields (declared once: train.py's where the flag is train's too)."""
    return add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                 formatter_class=argparse.RawDescriptionHelpFormatter),
                         AnnotateSettings, grouped=False)


def settings_of(args):
    """AnnotateSettings of a parsed command line (or given), each setting checked (ValueError naming the flag)."""
    args = args if isinstance(args, AnnotateSettings) else from_args(AnnotateSettings, args)
    check_settings(args)
    return args


def main(args):
    try:
        args = settings_of(args)
        server = make_server(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = server.app
    if args.checkpoint:
        try:
            app.training.show(args.checkpoint)
        except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
            print(f"error: {e}", file=sys.stderr)
            server.server_close()
            return 2
    for note in app.click_file.notes:
        print(f"note: {note}", flush=True)
    host, port = server.server_address[:2]
    print(f"{len(app.images.refs)} images ({len(app.images.errors)} unreadable), clicks in {app.click_file.path}")
    if app.assessment:
        a = app.assessment.summary()
        print(f"assessment sample {app.assessment.path}: {a['labelled']} of {a['points']} points labelled (the page's "
              f"Assess mode; blind: the map classes stay in {assess.design_path(app.assessment.path).name})")
    print(f"annotate: open http://{'[' + host + ']' if ':' in host else host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
