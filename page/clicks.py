"""What the page writes: the click file, changed one operation at a time (add / remove pixels) under a lock, so two
pages or servers on one file never lose each other's clicks; and the blind assessment sample of --assess, labelled
one point at a time.
"""

import fcntl
import threading
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pyogrio
import shapely
from rasterio.transform import Affine

import assess
from annotations import (KINDS, LINE, POINT, ClickSet, ImageClicks, _nodata_pixels, rasterise_shape, read_clicks,
                         write_clicks)
from page import bounds
from page.bounds import HTTPError, is_number


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
        if len(pts) > (bounds.MAX_LINE_VERTICES if kind_name == "line" else bounds.MAX_PIXELS_PER_OP):
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"at most {bounds.MAX_PIXELS_PER_OP} points (a line: "
                                                                 f"{bounds.MAX_LINE_VERTICES} vertices) per operation")
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
        if len(pixels) > bounds.MAX_PIXELS_PER_OP:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"a line of more than {bounds.MAX_PIXELS_PER_OP} pixels")
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
        """assess.estimates_json of the labels so far; 409 with assess's message while a stratum has < 2 labelled
        points."""
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
