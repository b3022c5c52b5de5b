"""Real clicks in: point, line and polygon annotations from a GIS layer, a CSV, Label Studio or CVAT, as per-image
clicks in native pixels and the sparse label (IGNORE_INDEX except at clicks) that training uses.

    from annotations import read_clicks, split_clicks, click_metrics, write_clicks
    clicks = read_clicks("clicks.gpkg", "images/", classes, class_field="class")   # or .csv / .json / .xml
    train, held = split_clicks(clicks, 0.2, seed=0)
    label = train.images["tile_03"].label()          # (H, W) uint8, IGNORE_INDEX except at clicks

Formats `read_clicks` takes (by the file's extension, then its content):
- any vector layer the vector library opens (GeoPackage, GeoJSON, Shapefile, FlatGeobuf, ...): points,
  lines (scribbles, rasterised along their length, `line_width` pixels wide) and polygons (every pixel whose
  centre is inside is that class: a partial label). With a CRS, coordinates are map coordinates: the layer is
  reprojected to each image's CRS and each feature goes to every image it falls in (one layer may span many
  GeoTIFFs), or, when the layer has an `image_field` column naming the given images, to the named image only.
  Without a CRS over georeferenced images the layer is refused; over non-georeferenced images it is pixel
  coordinates (x = column, y = row, y down) and needs `image_field` unless there is one image. A GeoJSON
  without a "crs" member is WGS 84 (RFC 7946) over georeferenced images, pixel coordinates over plain ones.
- CSV in pixel coordinates, UTF-8: columns `image,x,y,class` (x = column, y = row of the image as viewers show it;
  a fractional coordinate is the pixel it falls in); for PNG/JPEG/non-georeferenced images.
- Label Studio JSON export (a list of tasks): KeyPointLabels results (x, y in percent of the image) and
  PolygonLabels results (filled).
- CVAT for images 1.1 XML: `<points>` (each point a click), `<polyline>` (a line; of one vertex: a click),
  `<polygon>` and `<box>` (filled). The class is the shape's label, or its `<attribute name=class_field>` when it
  has one.
- a folder of sparse label rasters (`read_sparse_labels`): label files named like the images, the ignore value
  (or colour) except at clicks, read exactly like dense labels (dataset.read_label). `clicks_from_label`
  turns one such array into clicks.

Every pixel a click or shape covers is one click. Pixels on nodata (GDAL_NODATA, NaN) are left out and counted;
a pixel given two different classes is left out (every click on it) and counted; the same class twice counts
once. Both are reported in `ClickSet.notes`. Bad input raises before any work, in one line: the file, the place
(line, task, image and shape, feature) and what to do. An image name matches as written (`a%20b.png` is not
`a b.png`); only a path or URL (Label Studio's) that does not is URL-decoded.
"""

import csv
import io
import json
import math
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import pyogrio
import pyproj
import rasterio
import rasterio.features
import shapely
from rasterio.transform import Affine, rowcol, xy
from rasterio.windows import Window

from config import parse_fraction
from raster import IMAGE_SUFFIXES, TIFF_SUFFIXES, ImageRef, atomic_path, image_refs, open_image
from spec import IGNORE_INDEX, POTSDAM, grid_size

KINDS = ("point", "line", "polygon", "raster")  # where a click came from; its code is its index here
POINT, LINE, POLYGON, RASTER = range(4)
VECTOR_SUFFIXES = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG"}  # what write_clicks writes
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


# --------------------------------------------------------------------------- clicks

@dataclass
class ImageClicks:
    """The clicks of one image in native pixels: `rows`, `cols` (int64), `classes` (uint8 class indices), `kinds`
    (uint8 codes into KINDS: point, line, polygon or raster pixel), sorted by flat pixel index, one per pixel."""

    image: ImageRef
    rows: np.ndarray
    cols: np.ndarray
    classes: np.ndarray
    kinds: np.ndarray

    def __post_init__(self):
        self.rows = np.asarray(self.rows, np.int64).reshape(-1)
        self.cols = np.asarray(self.cols, np.int64).reshape(-1)
        self.classes = np.asarray(self.classes, np.uint8).reshape(-1)
        self.kinds = np.broadcast_to(np.asarray(self.kinds, np.uint8), self.rows.shape).copy()
        order = np.argsort(self.flat, kind="stable")
        self.rows, self.cols, self.classes, self.kinds = (a[order] for a in
                                                          (self.rows, self.cols, self.classes, self.kinds))

    def __len__(self):
        return int(self.rows.size)

    @property
    def flat(self):
        """Native flat pixel indices (row * W + col), what dataset.points_to_grid takes."""
        return self.rows * self.image.shape[1] + self.cols

    def label(self):
        """The sparse label: (H, W) uint8, IGNORE_INDEX except at clicks (native size)."""
        lab = np.full(self.image.shape, IGNORE_INDEX, np.uint8)
        lab[self.rows, self.cols] = self.classes
        return lab

    def grid(self, scale):
        """The clicks on the processing grid of `scale` (spec.grid_size), (h, w) uint8, by dataset.points_to_grid's
        rule: a click labels the cell it falls in; clicks of different classes in one cell: the majority wins,
        a tie leaves the cell unlabelled (`conflicting_cells` counts such cells)."""
        from dataset import points_to_grid  # torch comes with it: only when a grid is wanted
        return points_to_grid(self.label(), self.flat, grid_size(*self.image.shape, scale))

    def conflicting_cells(self, scale):
        """Cells of the processing grid of `scale` that hold clicks of more than one class."""
        H, W = self.image.shape
        h, w = grid_size(H, W, scale)
        cells = (self.rows * h // H) * w + self.cols * w // W
        pairs = np.unique(cells * 256 + self.classes)
        return int((np.bincount(pairs // 256) > 1).sum())

    def subset(self, keep):
        """The clicks where the boolean (or index) array `keep` says so."""
        return ImageClicks(self.image, self.rows[keep], self.cols[keep], self.classes[keep], self.kinds[keep])

    def same(self, other):
        """Same image shape and the same (row, col, class, kind) clicks."""
        return (self.image.shape == other.image.shape and len(self) == len(other)
                and all(np.array_equal(a, b) for a, b in zip(
                    (self.rows, self.cols, self.classes, self.kinds),
                    (other.rows, other.cols, other.classes, other.kinds))))


@dataclass
class ClickSet:
    """Clicks of many images: `images` {name (file stem): ImageClicks} for every image given (some may hold
    none), `classes` (spec.ClassSpec), `source` (the file read), `notes` (what was left out and why)."""

    images: dict
    classes: object = POTSDAM
    source: str = ""
    notes: list = field(default_factory=list)

    def __len__(self):
        return sum(len(c) for c in self.images.values())

    def labels(self):
        """{name: sparse label (H, W) uint8} of every image that holds a click."""
        return {n: c.label() for n, c in self.images.items() if len(c)}

    def same(self, other):
        """The same images with the same clicks (ImageClicks.same)."""
        return self.images.keys() == other.images.keys() and all(
            c.same(other.images[n]) for n, c in self.images.items())


def clicks_from_label(label, image, kind=RASTER):
    """ImageClicks from a sparse label array (H, W): every pixel that is not IGNORE_INDEX is a click of that
    class. `image`: an ImageRef or a path. The label must have the image's size."""
    ref = image if isinstance(image, ImageRef) else open_image(image)
    label = np.asarray(label)
    if label.shape != ref.shape:
        raise ValueError(f"sparse label of {ref.path} is {label.shape[1]}x{label.shape[0]}, the image "
                         f"{ref.shape[1]}x{ref.shape[0]}; a label must have its image's size")
    rows, cols = np.nonzero(label != IGNORE_INDEX)
    return ImageClicks(ref, rows, cols, label[rows, cols], kind)


# --------------------------------------------------------------------------- classes

def class_indices(values, classes, source):
    """Class values (names or indices, as text or numbers) -> uint8 class indices. Values that are neither a
    class name nor an index 0..k-1 raise a ValueError naming `source`, the values and the class list."""
    names = {n: i for i, n in enumerate(classes.names)}
    lower = {n.lower(): i for n, i in names.items()}
    out, unknown = np.zeros(len(values), np.uint8), {}
    for j, v in enumerate(values):
        text = "" if v is None else str(v).strip()
        if text in names:
            out[j] = names[text]
        elif text.lower() in lower:
            out[j] = lower[text.lower()]
        elif re.fullmatch(r"\d+(\.0*)?", text) and int(float(text)) < classes.num_classes:
            out[j] = int(float(text))
        else:
            unknown[text] = unknown.get(text, 0) + 1
    if unknown:
        found = ", ".join(f"{v!r} ({n}x)" for v, n in list(unknown.items())[:10])
        raise ValueError(f"{source}: class values {found} are not among the classes "
                         f"{', '.join(f'{i}={n}' for i, n in enumerate(classes.names))}; give class names or indices "
                         f"0..{classes.num_classes - 1} (or a class file that names these classes)")
    return out


# --------------------------------------------------------------------------- shapes -> pixels

def _pixel_window(geom, transform, shape, pad=1):
    """The pixel window (row0, row1, col0, col1) around a geometry's bounds, clipped to the image; None if empty."""
    x0, y0, x1, y1 = geom.bounds
    cols, rows = ~transform @ (np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
    r0, r1 = int(np.floor(rows.min())) - pad, int(np.ceil(rows.max())) + pad
    c0, c1 = int(np.floor(cols.min())) - pad, int(np.ceil(cols.max())) + pad
    r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, shape[0]), min(c1, shape[1])
    return None if r0 >= r1 or c0 >= c1 else (r0, r1, c0, c1)


def rasterise_shape(geom, transform, shape, line_width=1.0):
    """(rows, cols) of the pixels a line or polygon covers in an image of `shape` with `transform` (identity:
    pixel coordinates). Lines: `line_width` <= 1 -> every pixel the line passes through; wider -> the pixels
    whose centre is within line_width / 2 pixels of it. Polygons: the pixels whose centre is inside."""
    pixel = float(np.sqrt(abs(transform.determinant)))
    touched = False
    if geom.geom_type in ("LineString", "LinearRing", "MultiLineString"):
        if line_width <= 1:
            touched = True
        else:
            geom = geom.buffer(line_width / 2 * pixel)
    win = _pixel_window(geom, transform, shape)
    if win is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    r0, r1, c0, c1 = win
    wt = transform @ Affine.translation(c0, r0)
    burnt = rasterio.features.rasterize([(geom, 1)], out_shape=(r1 - r0, c1 - c0), transform=wt, fill=0,
                                        all_touched=touched, dtype="uint8")
    rows, cols = np.nonzero(burnt)
    return rows + r0, cols + c0


def _pixels_of(geoms, classes, kinds, transform, shape, line_width):
    """Rasterise geometries (any type, multi-parts exploded) onto one image: (rows, cols, classes, kinds,
    points outside the image, shapes that cover no pixel)."""
    parts, idx = shapely.get_parts(geoms, return_index=True)
    out, outside, empty = [], 0, 0
    is_point = shapely.get_type_id(parts) == 0
    if is_point.any():
        xy_ = shapely.get_coordinates(parts[is_point])
        r, c = rowcol(transform, xy_[:, 0], xy_[:, 1])
        r, c = np.asarray(r, np.int64), np.asarray(c, np.int64)
        inside = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
        outside += int((~inside).sum())
        j = idx[is_point][inside]
        out.append((r[inside], c[inside], classes[j], kinds[j]))
    for geom, j in zip(parts[~is_point], idx[~is_point]):
        r, c = rasterise_shape(geom, transform, shape, line_width)
        empty += r.size == 0
        kind = kinds[j] if kinds[j] != POINT else (LINE if "Line" in geom.geom_type else POLYGON)
        out.append((r, c, np.full(r.size, classes[j], np.uint8), np.full(r.size, kind, np.uint8)))
    return out, outside, empty


def _nodata_pixels(ref, rows, cols, block=256):
    """Boolean per click: True where every band equals the image's nodata value or any band is NaN. Reads only the
    row windows that hold clicks (TIFFs; other files have no nodata)."""
    bad = np.zeros(rows.size, bool)
    if ref.path.suffix.lower() not in TIFF_SUFFIXES or rows.size == 0:
        return bad
    with rasterio.open(ref.path) as ds:
        if ds.nodata is None and not np.issubdtype(np.dtype(ds.dtypes[0]), np.floating):
            return bad
        for r0 in np.unique(rows // block) * block:
            sel = (rows >= r0) & (rows < r0 + block)
            win = ds.read(window=Window(0, int(r0), ds.width, int(min(block, ds.height - r0))))
            vals = win[:, rows[sel] - r0, cols[sel]]  # (bands, n)
            hit = np.isnan(vals).any(0) if np.issubdtype(vals.dtype, np.floating) else np.zeros(vals.shape[1], bool)
            if ds.nodata is not None:
                hit |= (vals == np.asarray(ds.nodata).astype(vals.dtype)).all(0) if not np.isnan(ds.nodata) else False
            bad[sel] = hit
    return bad


def _assemble(source, refs, pieces, classes, notes, allow_empty=False):
    """ClickSet from per-image pieces [(rows, cols, classes, kinds)]: nodata clicks and pixels with two classes
    left out and reported, one click per pixel (a point wins over a line over a polygon). No click at all: an
    error that suggests why, or with `allow_empty` a ClickSet without clicks that says so in its notes."""
    images, nodata, conflicts, conflict_images = {}, 0, 0, []
    for ref in refs:
        got = pieces.get(ref.name, [])
        if not got:
            images[ref.name] = ImageClicks(ref, [], [], [], [])
            continue
        rows, cols, cls, kinds = (np.concatenate([p[i] for p in got]) for i in range(4))
        bad = _nodata_pixels(ref, rows, cols)
        nodata += int(bad.sum())
        rows, cols, cls, kinds = rows[~bad], cols[~bad], cls[~bad].astype(np.uint8), kinds[~bad].astype(np.uint8)
        flat = rows * ref.shape[1] + cols
        order = np.lexsort((kinds, flat))  # per pixel, the lowest kind first: point < line < polygon
        flat, rows, cols, cls, kinds = flat[order], rows[order], cols[order], cls[order], kinds[order]
        first = np.r_[True, flat[1:] != flat[:-1]] if flat.size else np.zeros(0, bool)
        start = np.cumsum(first) - 1
        lo = np.minimum.reduceat(cls, np.flatnonzero(first)) if flat.size else cls
        hi = np.maximum.reduceat(cls, np.flatnonzero(first)) if flat.size else cls
        mixed = (lo != hi)[start]
        keep = first & ~mixed
        if mixed.any():
            conflicts += int((first & mixed).sum())
            conflict_images.append(ref.name)
        images[ref.name] = ImageClicks(ref, rows[keep], cols[keep], cls[keep], kinds[keep])
    if nodata:
        notes.append(f"{source}: {nodata} clicked pixels lie on nodata and were left out")
    if conflicts:
        notes.append(f"{source}: {conflicts} pixels were given two different classes and were left out "
                     f"(images {conflict_images[:5]}); fix those clicks")
    result = ClickSet(images, classes, str(source), notes)
    if len(result) == 0:
        why = (f"{source}: no click falls on a valid pixel of any of the {len(refs)} images "
               f"({', '.join(r.name for r in refs[:5])}{', ...' if len(refs) > 5 else ''})")
        if not allow_empty:
            raise ValueError(f"{why}. " + "; ".join(notes))
        notes.append(why)
    return result


# --------------------------------------------------------------------------- readers

def _image_lookup(refs):
    """{file name, stem: ref}, for matching the image names annotation tools write."""
    out = {}
    for r in refs:
        out[r.path.name] = r
        out[r.path.stem] = r
    return out


def _match(name, lookup):
    """The ref an annotation tool's image name means, first as written (a file name, a stem or a path's last part,
    also without Label Studio's 8-hex-digit upload prefix `1a2b3c4d-tile.png`); only a path or URL (it holds a
    `/`) that does not match so is URL-decoded (Label Studio's `/data/upload/...`, `/data/local-files/?d=...`),
    so that `a%20b.png` stays itself beside `a b.png`. None when nothing matches."""
    text = str(name)
    bases = [Path(text).name]
    if "/" in text:
        url = urlparse(text, allow_fragments=False)
        d = parse_qs(url.query).get("d")
        bases.append(Path(d[0] if d else unquote(url.path)).name)
    for base in bases:
        bare = re.sub(r"^[0-9a-f]{8}-", "", base)
        for cand in (base, Path(base).stem, bare, Path(bare).stem):
            if cand in lookup:
                return lookup[cand]
    return None


def _missing_images(source, missing, refs):
    folder = refs[0].path.parent
    return FileNotFoundError(f"{source} names images that are not among the {len(refs)} images given (in {folder}): "
                             f"{sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}; put them there or fix "
                             f"the image names")


def _text(path):
    """The file's text: UTF-8 (a byte-order mark allowed). Another encoding is refused, naming the line: guessing
    it (Latin-1? Windows-1252?) could turn an image or class name into another."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8 "
                         f"(Excel: CSV UTF-8; iconv -f latin1 -t utf-8)") from None


def _json(path):
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _number(value, where, what, text=False):
    """`value` as a finite float: a number, or with `text` (CSV cells, XML attributes) text that reads as one.
    Anything else (missing, NaN, a string in JSON) raises '<where>: <what> must be a number, got ...'."""
    if (isinstance(value, (int, float)) and not isinstance(value, bool)) or (text and isinstance(value, str)):
        try:
            f = float(value)
        except (ValueError, OverflowError):
            f = math.nan
        if math.isfinite(f):
            return f
    got = ("nothing" if value is None else f"the text {value!r} (write it without quotes)"
           if isinstance(value, str) and not text else repr(value))
    raise ValueError(f"{where}: {what} must be a number, got {got}; correct it there")


def _vertices(pairs, where, text=False):
    """[(x, y), ...] from a list of pairs of numbers (`text`: of text, as CVAT writes them); else an error."""
    if not isinstance(pairs, list):
        raise ValueError(f"{where}: points must be a list of [x, y], got {pairs!r:.40}; correct it there")
    bad = next((p for p in pairs if not (isinstance(p, (list, tuple)) and len(p) == 2)), None)
    if bad is not None:
        raise ValueError(f"{where}: a vertex must be a pair x, y, got {bad!r:.40}; correct it there")
    return [(_number(x, where, "x", text), _number(y, where, "y", text)) for x, y in pairs]


def _shape(kind, pts, where):
    """The geometries of a tool's shape of `kind` from its pixel vertices [(x, y), ...]: 'points' -> a point each;
    'polyline' -> a line (of one vertex: a point, the pixel it lies on); 'polygon' -> a polygon (3 vertices or
    more). Fewer vertices are an error at `where`."""
    need = 3 if kind == "polygon" else 1
    if len(pts) < need:
        raise ValueError(f"{where}: a {kind} needs {need} or more vertices, has {len(pts)}; correct or delete it")
    if kind == "points" or len(pts) == 1:
        return [shapely.Point(p) for p in pts]
    return [shapely.LineString(pts) if kind == "polyline" else shapely.Polygon(pts)]


def _crs(value):
    return None if value is None else pyproj.CRS.from_user_input(value.to_wkt() if hasattr(value, "to_wkt") else value)


def _reproject(geoms, src, dst):
    if src == dst:
        return geoms
    t = pyproj.Transformer.from_crs(src, dst, always_xy=True)
    return shapely.transform(geoms, lambda c: np.column_stack(t.transform(c[:, 0], c[:, 1])))


def read_layer(path, refs, classes=POTSDAM, *, class_field="class", image_field="image", layer=None,
               line_width=1.0, allow_empty=False, unlabelled=False):
    """A vector layer (anything pyogrio opens) -> ClickSet. See the module docstring for the rules."""
    path = Path(path)
    try:
        meta, _, wkb, values = pyogrio.raw.read(path, layer=layer)
    except Exception as e:
        raise ValueError(f"cannot read {path} as a vector layer ({type(e).__name__}: {e})") from None
    fields = list(meta["fields"])
    if len(wkb) == 0:
        raise ValueError(f"{path}: the layer holds no features; add clicks to it (or pick the right --layer)")
    if class_field not in fields:
        raise ValueError(f"{path}: no class field {class_field!r}; its fields are {fields}; pass the field "
                         f"that holds the class (--class-field)")
    geoms = shapely.from_wkb(np.asarray(wkb, dtype=object), on_invalid="ignore")
    broken = np.flatnonzero(shapely.is_missing(geoms) & np.array([b is not None for b in wkb]))
    if broken.size:
        raise ValueError(f"{path}: features {(broken + 1).tolist()[:5]} (counted from 1) hold geometries that cannot "
                         f"be read (a line of one point, a ring that does not close, ...); fix them (QGIS: Check "
                         f"Geometries) or delete them")
    notes = []
    keep = ~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)
    if not keep.all():
        notes.append(f"{path}: {int((~keep).sum())} features without geometry were skipped")
    if unlabelled:
        keep &= _labelled(values[fields.index(class_field)], path, notes)
        if not keep.any():
            return _assemble(path, refs, {}, classes, notes, allow_empty)
    cls = class_indices(values[fields.index(class_field)][keep], classes, f"{path} field {class_field!r}")
    geoms = geoms[keep]
    kinds = np.full(geoms.size, POINT, np.uint8)
    if "kind" in fields:  # written by write_clicks: where each click came from
        kinds = np.array([KINDS.index(k) if k in KINDS else POINT for k in values[fields.index("kind")][keep]],
                         np.uint8)
    lookup = _image_lookup(refs)
    named, unknown = None, set()
    if image_field in fields:
        names = values[fields.index(image_field)][keep]
        found = [_match(n, lookup) for n in names]
        unknown = {str(n) for n, f in zip(names, found) if f is None}
        if not unknown:
            named = np.array([f.name for f in found], dtype=object)
    src = _crs(meta.get("crs"))
    geo = [r for r in refs if r.georeferenced]
    if src is not None and not geo and path.suffix.lower() in (".geojson", ".json") \
            and "crs" not in _json(path):
        src = None  # GDAL calls every GeoJSON without a "crs" member WGS 84; over plain images it is pixels
    pieces, outside, empty = {}, 0, 0
    if src is None:
        if geo:
            raise ValueError(f"{path}: the layer has no CRS but images such as {geo[0].path} are georeferenced; "
                             f"set the layer's CRS (QGIS: Layer > Set CRS; ogr2ogr -a_srs EPSG:<code>), "
                             f"never guessed here")
        if unknown:
            raise _missing_images(path, unknown, refs)
        if named is None and len(refs) > 1:
            raise ValueError(f"{path}: a layer without CRS is pixel coordinates, and then needs an {image_field!r} "
                             f"field naming each feature's image (fields: {fields})")
        targets, sel = [], {}
        for r in refs:
            mine = shapely.intersects(geoms, shapely.box(0, 0, r.shape[1], r.shape[0]))
            if named is not None:
                mine &= named == r.name
            sel[r.name] = mine
            targets.append((r, Affine.identity(), geoms[mine]))
    else:
        if not geo:
            raise ValueError(f"{path}: the layer is in map coordinates ({src.to_string()}) but none of the images "
                             f"is georeferenced; give GeoTIFFs, or pixel coordinates in a CSV (image,x,y,class)")
        targets, sel, cache = [], {}, {}
        for r in geo:
            if r.crs is None:
                raise ValueError(f"{r.path} has a transform but no CRS: clicks in {src.to_string()} cannot be "
                                 f"placed on it; give the image a CRS (gdal_edit.py -a_srs)")
            dst = _crs(r.crs)
            key = dst.to_wkt()
            if key not in cache:
                cache[key] = _reproject(geoms, src, dst)
            mine = shapely.intersects(cache[key], shapely.box(*r.bounds()))
            if named is not None:
                mine &= named == r.name
            sel[r.name] = mine
            targets.append((r, r.transform, cache[key][mine]))
    placed = np.zeros(geoms.size, bool)
    for r, transform, g in targets:
        s = sel[r.name]
        got, out, emp = _pixels_of(g, cls[s], kinds[s], transform, r.shape, line_width)
        empty += emp
        placed |= s
        pieces[r.name] = got
    outside = int((~placed).sum())
    if outside:
        notes.append(f"{path}: {outside} of {geoms.size} features fall outside every image")
    if empty:
        notes.append(f"{path}: {empty} lines or polygons cover no pixel centre (too small) and add no click")
    if not any(len(p[0]) for got in pieces.values() for p in got):
        lb = shapely.total_bounds(geoms)
        extent = lambda r: tuple(round(v, 3) for v in _reproject(shapely.box(*r.bounds()), _crs(r.crs), src).bounds)
        where = "; ".join(f"{r.name}: {extent(r)}"
                          for r in geo[:3]) if src is not None else ""
        raise ValueError(f"{path}: no click falls inside any image. The layer spans {tuple(round(v, 3) for v in lb)}"
                         + (f" in {src.to_string()}, the images {where}. Swapped lon/lat (x must be longitude) or "
                            f"a wrong CRS on the layer?" if src is not None else "; check the coordinates"))
    return _assemble(path, refs, pieces, classes, notes, allow_empty)


def read_csv(path, refs, classes=POTSDAM, *, class_field="class", image_field="image", allow_empty=False,
             unlabelled=False):
    """A CSV of clicks in pixel coordinates, `image,x,y,class` (x = column, y = row) -> ClickSet, UTF-8. An optional
    `kind` column (point/line/polygon/raster, as write_clicks writes it) is kept. Blank lines are skipped."""
    path = Path(path)
    lines = csv.reader(io.StringIO(_text(path), newline=""))
    cols = next(lines, [])
    need = [image_field, "x", "y", class_field]
    if any(c not in cols for c in need):
        raise ValueError(f"{path}: needs the columns {need} (x = column, y = row in pixels), found {cols}")
    rows, where = [], []
    for fields in lines:
        if not any(f.strip() for f in fields):
            continue
        r = dict(zip(cols, fields))
        if any(c not in r for c in need) or any(f.strip() for f in fields[len(cols):]):
            raise ValueError(f"{path}: line {lines.line_num} has {len(fields)} fields, the header {len(cols)} "
                             f"({','.join(cols)}); give {','.join(need)} on every line (quote a value with a comma)")
        rows.append(r)
        where.append(f"{path}: line {lines.line_num}")
    if not rows:
        raise ValueError(f"{path}: no clicks (only a header); add rows image,x,y,class")
    if unlabelled:
        notes = []
        labelled = _labelled([r[class_field] for r in rows], path, notes)
        rows, where = [r for r, k in zip(rows, labelled) if k], [w for w, k in zip(where, labelled) if k]
        if not rows:
            return _assemble(path, refs, {}, classes, notes, allow_empty)
    lookup = _image_lookup(refs)
    missing = {r[image_field] for r in rows if _match(r[image_field], lookup) is None}
    if missing:
        raise _missing_images(path, missing, refs)
    x = np.array([_number(r["x"], w, "x (pixels)", text=True) for r, w in zip(rows, where)])
    y = np.array([_number(r["y"], w, "y (pixels)", text=True) for r, w in zip(rows, where)])
    cls = class_indices([r[class_field] for r in rows], classes, f"{path} column {class_field!r}")
    kinds = np.array([KINDS.index(r["kind"]) if r.get("kind") in KINDS else POINT for r in rows], np.uint8)
    names = np.array([_match(r[image_field], lookup).name for r in rows], dtype=object)
    pieces, notes, outside = {}, notes if unlabelled else [], 0
    for ref in refs:
        s = names == ref.name
        if s.any():
            got, out, _ = _pixels_of(shapely.points(x[s], y[s]), cls[s], kinds[s], Affine.identity(), ref.shape, 1)
            outside += out
            pieces[ref.name] = got
    if outside:
        notes.append(f"{path}: {outside} clicks lie outside their image and were left out")
    return _assemble(path, refs, pieces, classes, notes, allow_empty)


def _labelled(values, path, notes):
    """Boolean per value: True where a class is given. The points of an assessment sample not yet labelled have an
    empty class: counted in `notes`, left out (read_clicks(unlabelled=True))."""
    given = np.array([v is not None and str(v).strip() != "" for v in values], bool)
    if not given.all():
        notes.append(f"{path}: {int((~given).sum())} of {given.size} points have no class yet (not labelled) and "
                     f"were left out")
    return given


def read_label_studio(path, refs, classes=POTSDAM, *, line_width=1.0, allow_empty=False):
    """A Label Studio JSON export (list of tasks) -> ClickSet: KeyPointLabels (x, y in percent of the image
    width / height) as clicks, PolygonLabels filled; other result types are counted in the notes. Cancelled
    annotations are skipped. The task's image is matched by file name (Label Studio's upload prefix removed)."""
    path = Path(path)
    tasks = _json(path)
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: holds {tasks!r:.40}, not a list of tasks; export the Label Studio project as JSON")
    lookup = _image_lookup(refs)
    geoms, labels, names, missing, other = [], [], [], set(), {}
    for i, task in enumerate(tasks, 1):
        where = f"{path}: task {i}" + (f" (id {task['id']})" if isinstance(task, dict) and "id" in task else "")
        try:  # a task laid out otherwise (a string, a list where an object belongs) fails here, named below
            data = task.get("data", {})
            image = data.get("image") or next((v for v in data.values() if isinstance(v, str)), None)
            ref = _match(image, lookup) if image else None
            results = [r for a in task.get("annotations", task.get("completions", []))
                       if not a.get("was_cancelled") for r in a.get("result", [])]
            if ref is None:
                if results:
                    missing.add(str(image))
                continue
            H, W = ref.shape
            for j, r in enumerate(results, 1):
                v, kind, at = r.get("value", {}), r.get("type", ""), f"{where} result {j}"
                if kind == "keypointlabels":
                    found = _shape("points", [(_number(v.get("x"), at, "x (percent)") / 100 * W,
                                               _number(v.get("y"), at, "y (percent)") / 100 * H)], at)
                elif kind == "polygonlabels":
                    found = _shape("polygon", [(x / 100 * W, y / 100 * H) for x, y in _vertices(v.get("points"), at)],
                                   at)
                else:
                    other[kind] = other.get(kind, 0) + 1
                    continue
                geoms += found
                lab = v.get(kind)
                labels.append(lab[0] if isinstance(lab, list) and lab else lab)
                names.append(ref.name)
        except (AttributeError, TypeError) as e:
            raise ValueError(f"{where} is not laid out as Label Studio exports a task ({e}); export the project as "
                             f"JSON") from None
    return _pixel_shapes(path, refs, geoms, labels, names, classes, line_width, missing,
                         empty=f"no KeyPointLabels or PolygonLabels results in this Label Studio export (result "
                               f"types found: {other or 'none'}); export the project as JSON",
                         notes=[f"{path}: {n} results of type {k!r} ignored" for k, n in other.items()],
                         allow_empty=allow_empty)


def read_cvat(path, refs, classes=POTSDAM, *, class_field="class", line_width=1.0, allow_empty=False):
    """A CVAT for images 1.1 XML export -> ClickSet: `<points>` (every point a click), `<polyline>` (a line),
    `<polygon>` and `<box>` (filled), in pixels. The class: the shape's `<attribute name=class_field>` when it has
    one, else its label. An image whose size differs from the file's is an error."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML ({e})") from None
    lookup = _image_lookup(refs)
    geoms, labels, names, missing, other = [], [], [], set(), {}
    for im in root.iter("image"):
        ref = _match(im.get("name", ""), lookup)
        if ref is None:
            if len(im):
                missing.add(im.get("name"))
            continue
        where = f"{path}: image {im.get('name')}"
        size = tuple(_number(im.get(k, n), where, k, text=True) for k, n in zip(("height", "width"), ref.shape))
        if size != ref.shape:
            raise ValueError(f"{where} is {im.get('width')}x{im.get('height')} there but {ref.path} is "
                             f"{ref.shape[1]}x{ref.shape[0]}; annotate the same images")
        for j, shape in enumerate(im, 1):
            at = f"{where} shape {j} <{shape.tag}>"
            attr = {a.get("name"): (a.text or "").strip() for a in shape.findall("attribute")}
            label = attr.get(class_field, shape.get("label"))
            if shape.tag == "box":
                x0, y0, x1, y1 = (_number(shape.get(k), at, k, text=True) for k in ("xtl", "ytl", "xbr", "ybr"))
                found = [shapely.box(x0, y0, x1, y1)]
            elif shape.tag in ("points", "polyline", "polygon"):
                pairs = [p.split(",") for p in shape.get("points", "").split(";") if p.strip()]
                found = _shape(shape.tag, _vertices(pairs, at, text=True), at)
            else:
                other[shape.tag] = other.get(shape.tag, 0) + 1
                continue
            geoms += found
            labels += [label] * len(found)
            names += [ref.name] * len(found)
    return _pixel_shapes(path, refs, geoms, labels, names, classes, line_width, missing,
                         empty=f"no points, polylines, polygons or boxes in this CVAT XML (found {other or 'nothing'})"
                               f"; export as 'CVAT for images 1.1'",
                         notes=[f"{path}: {n} <{k}> shapes ignored" for k, n in other.items()],
                         allow_empty=allow_empty)


def _pixel_shapes(path, refs, geoms, labels, names, classes, line_width, missing, empty, notes, allow_empty=False):
    """The ClickSet of shapes in pixel coordinates read from a tool's export (Label Studio, CVAT): `geoms` with
    their `labels` on the images `names`. Images the export names but `refs` lacks (`missing`) are an error, and
    so is an export without any shape (`empty` says what was looked for)."""
    if missing:
        raise _missing_images(path, missing, refs)
    if not geoms:
        raise ValueError(f"{path}: {empty}")
    geoms = np.array(geoms, dtype=object)
    cls = class_indices(labels, classes, f"{path} labels")
    names = np.array(names, dtype=object)
    kinds = np.full(geoms.size, POINT, np.uint8)
    pieces, outside, small = {}, 0, 0
    for ref in refs:
        s = names == ref.name
        if s.any():
            pieces[ref.name], out, emp = _pixels_of(geoms[s], cls[s], kinds[s], Affine.identity(), ref.shape,
                                                    line_width)
            outside, small = outside + out, small + emp
    if outside:
        notes.append(f"{path}: {outside} points lie outside their image and were left out")
    if small:
        notes.append(f"{path}: {small} lines or polygons cover no pixel centre of their image (too small or outside "
                     f"it) and add no click")
    return _assemble(path, refs, pieces, classes, notes, allow_empty)


def read_sparse_labels(folder, images, classes=POTSDAM, *, allow_empty=False):
    """Sparse label rasters -> ClickSet: in `folder`, one label per image with the image's stem (TIF/PNG), the
    ignore value (or colour) except at clicks, read like any label (dataset.read_label, per `classes`). An image
    without a label holds no click; a label without its image is an error."""
    from dataset import read_label
    folder = Path(folder)
    refs = image_refs(images)
    labels = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES} if folder.is_dir() else {}
    if not labels:
        raise FileNotFoundError(f"no sparse label rasters (.tif/.png) found in {folder}")
    missing = set(labels) - {r.name for r in refs}
    if missing:
        raise _missing_images(folder, missing, refs)
    pieces = {}
    for r in refs:
        if r.name in labels:
            c = clicks_from_label(read_label(labels[r.name], classes), r)
            pieces[r.name] = [(c.rows, c.cols, c.classes, c.kinds)]
    return _assemble(folder, refs, pieces, classes, [], allow_empty)


def read_clicks(path, images, classes=POTSDAM, *, class_field="class", image_field="image", layer=None,
                line_width=1.0, allow_empty=False, unlabelled=False):
    """Read clicks for `images` (a folder or a list of image paths) from `path`: a vector layer (.gpkg, .geojson,
    .shp, ...), a CSV (.csv), a Label Studio export or GeoJSON (.json, told apart by content), a CVAT XML (.xml),
    or a folder of sparse label rasters. `class_field`: the attribute / column with the class (names or indices
    of `classes`); `line_width`: lines' width in pixels. Returns a ClickSet; see the module docstring. When every
    click is left out (on nodata, or two classes on one pixel): an error, or with `allow_empty` (the annotation
    page) a ClickSet without clicks whose notes say why. `unlabelled` (CSV and layers: an assessment sample being
    labelled): points whose class is still empty are left out and counted in the notes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotation file {path} not found")
    if path.is_dir() and path.suffix.lower() != ".gdb":
        return read_sparse_labels(path, images, classes, allow_empty=allow_empty)
    refs = image_refs(images)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path, refs, classes, class_field=class_field, image_field=image_field,
                        allow_empty=allow_empty, unlabelled=unlabelled)
    if suffix == ".xml":
        return read_cvat(path, refs, classes, class_field=class_field, line_width=line_width,
                         allow_empty=allow_empty)
    if suffix == ".json":
        doc = _json(path)
        if not (isinstance(doc, dict) and doc.get("type") in ("FeatureCollection", "Feature")):
            return read_label_studio(path, refs, classes, line_width=line_width, allow_empty=allow_empty)
    return read_layer(path, refs, classes, class_field=class_field, image_field=image_field, layer=layer,
                      line_width=line_width, allow_empty=allow_empty, unlabelled=unlabelled)


# --------------------------------------------------------------------------- writing

def write_clicks(path, clicks):
    """Write a ClickSet so that read_clicks gives the same clicks back, one feature / row per clicked pixel, by
    the file's extension (write_points): `.csv` -> image,x,y,class,kind in pixels (x = column, y = row);
    `.geojson`/`.json`/`.gpkg` -> points at pixel centres in map coordinates with the CRS and properties image,
    class (name), class_index, kind, or pixel coordinates without CRS when no image is georeferenced."""
    names = clicks.classes.names
    items = [c for c in clicks.images.values() if len(c)]
    columns = {"class": [names[k] for c in items for k in c.classes],
               "class_index": np.concatenate([c.classes for c in items] or [np.zeros(0, np.uint8)]).astype(np.int32),
               "kind": [KINDS[k] for c in items for k in c.kinds]}
    return write_points(path, [(c.image, c.rows, c.cols) for c in items], columns, csv_leaves=("class_index",))


def write_points(path, pieces, columns, csv_leaves=()):
    """Write pixels as points, one feature / row each, atomically. `pieces`: [(ImageRef, rows, cols)]; `columns`:
    {name: one value per point, in the order of `pieces`}. By the file's extension: `.csv` -> image,x,y,<columns>
    in pixels (x = column, y = row; `csv_leaves`: columns not written there); `.geojson`/`.json`/`.gpkg` -> points
    at pixel centres in map coordinates with the CRS (every image reprojected to the first georeferenced image's
    CRS), fields image and `columns`; when no image is georeferenced, pixel coordinates (x = column + 0.5,
    y = row + 0.5, y down) without CRS. read_clicks reads either back."""
    path = Path(path)
    suffix = path.suffix.lower()
    images = [ref.path.name for ref, rows, _ in pieces for _ in range(len(rows))]
    if suffix == ".csv":
        kept = [k for k in columns if k not in csv_leaves]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "x", "y", *kept])
            cols = np.concatenate([c for _, _, c in pieces] or [[]]).astype(np.int64)
            rows = np.concatenate([r for _, r, _ in pieces] or [[]]).astype(np.int64)
            for j, (name, col, r) in enumerate(zip(images, cols, rows)):
                w.writerow([name, int(col), int(r), *(columns[k][j] for k in kept)])
        return path
    if suffix not in VECTOR_SUFFIXES:
        raise ValueError(f"{path}: write points as .csv, .geojson or .gpkg")
    geo = [ref.georeferenced for ref, _, _ in pieces]
    if any(geo) and not all(geo):
        raise ValueError(f"{path}: some images are georeferenced, some not; one layer cannot hold map and pixel "
                         f"coordinates: write a .csv (pixels) instead")
    dst = next((_crs(ref.crs) for ref, _, _ in pieces if ref.georeferenced), None)
    geoms = []
    for ref, rows, cols in pieces:
        if ref.georeferenced:
            x, y = xy(ref.transform, rows, cols, offset="center")
            geoms.append(_reproject(shapely.points(np.asarray(x), np.asarray(y)), _crs(ref.crs), dst))
        else:
            geoms.append(shapely.points(np.asarray(cols) + 0.5, np.asarray(rows) + 0.5))
    geoms = np.concatenate(geoms) if geoms else np.zeros(0, object)
    data = [np.array(images, dtype=object)] + [v if isinstance(v, np.ndarray) else np.array(v, dtype=object)
                                               for v in columns.values()]
    with atomic_path(path, keep_suffix=True) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'crs' was not provided")  # pixel coordinates: no CRS, said so
        pyogrio.raw.write(tmp, shapely.to_wkb(geoms), data, ["image", *columns], driver=VECTOR_SUFFIXES[suffix],
                          geometry_type="Point", crs=None if dst is None else dst.to_wkt(), layer=path.stem)
    return path


# --------------------------------------------------------------------------- checks

def class_counts(clicks):
    """{class name: clicks} over every image, every class listed (0 for a class nobody clicked)."""
    counts = np.zeros(clicks.classes.num_classes, np.int64)
    for c in clicks.images.values():
        counts += np.bincount(c.classes, minlength=clicks.classes.num_classes)[:clicks.classes.num_classes]
    return dict(zip(clicks.classes.names, counts.tolist()))


def unclicked_classes(clicks):
    """Names of the classes with no click."""
    return [n for n, k in class_counts(clicks).items() if k == 0]


def check_unclicked(clicks, allow_unclicked=False):
    """Refuse (ValueError naming the file and the classes) when a class has no click: the model would never be
    told about it. `allow_unclicked` (train.py --allow-unclicked): return the names instead, for a warning."""
    missing = unclicked_classes(clicks)
    if missing and not allow_unclicked:
        raise ValueError(f"{clicks.source}: classes {missing} have no click (counts {class_counts(clicks)}); "
                         f"click them, drop them from the class file, or pass --allow-unclicked")
    return missing


# --------------------------------------------------------------------------- click-based validation

def split_clicks(clicks, fraction, seed=0, *, min_images=5, blocks=4):
    """Split a ClickSet into (train, held_out) ClickSets, spatially blocked so that held-out clicks are not the
    neighbours of training clicks. With at least `min_images` clicked images: whole images, shuffled by `seed`,
    held out until `fraction` of the clicks is reached (at least one image stays for training). Fewer: each
    image is cut into blocks x blocks rectangles, and whole rectangles are held out the same way. Both sets keep
    every image (with the clicks they got); a note says which rule was used."""
    fraction = parse_fraction(fraction) if isinstance(fraction, str) else float(fraction)
    rng = np.random.default_rng(seed)
    clicked = [n for n, c in clicks.images.items() if len(c)]
    total = len(clicks)
    held_mask = {n: np.zeros(len(c), bool) for n, c in clicks.images.items()}
    if len(clicked) >= min_images:
        units = [(n, slice(None)) for n in clicked]
        rule = f"whole images ({len(clicked)} clicked)"
    else:
        units = []
        for n in clicked:
            c = clicks.images[n]
            H, W = c.image.shape
            cell = (c.rows * blocks // H) * blocks + c.cols * blocks // W
            units += [(n, cell == b) for b in np.unique(cell)]
        rule = f"{blocks}x{blocks} blocks of each image ({len(clicked)} clicked images, < {min_images})"
    held = 0
    for j in rng.permutation(len(units)):
        n, sel = units[j]
        k = int(held_mask[n][sel].size if isinstance(sel, slice) else sel.sum())
        if held >= fraction * total or held + k >= total:
            continue
        held_mask[n][sel] = True
        held += k
    if held == 0:
        raise ValueError(f"{clicks.source}: cannot hold out {fraction:.0%} of {total} clicks by {rule}; "
                         f"add clicks or images")
    note = f"held out {held} of {total} clicks ({held / total:.0%}) by {rule}, seed {seed}"
    train = ClickSet({n: c.subset(~held_mask[n]) for n, c in clicks.images.items()}, clicks.classes,
                     clicks.source, clicks.notes + [note])
    test = ClickSet({n: c.subset(held_mask[n]) for n, c in clicks.images.items()}, clicks.classes,
                    clicks.source, clicks.notes + [note])
    return train, test


def split_clicks_by_images(clicks, train, val, source):
    """(train, held-out) ClickSets by a split's image names (`source`: the split, for the note): the clicks on the
    `val` images are held out, the clicks on the `train` images train; clicks on images in neither are left out
    and counted in the note."""
    train, val = {str(i) for i in train}, {str(i) for i in val}
    held = sum(len(c) for n, c in clicks.images.items() if n in val)
    unused = sum(len(c) for n, c in clicks.images.items() if n not in val | train)
    if not held:
        raise ValueError(f"{clicks.source}: none of the {len(clicks)} clicks lies on the {len(val)} val images of "
                         f"{source}; click on them too, or leave out --split to hold out a share of the clicks")
    note = (f"held out the {held} clicks on the {len(val)} val images of {source}"
            + (f"; {unused} clicks on images in neither part left out" if unused else ""))
    part = lambda names: ClickSet({n: c for n, c in clicks.images.items() if n in names}, clicks.classes,  # noqa
                                  clicks.source, clicks.notes + [note])
    return part(train), part(val)


def wilson_interval(k, n, z=Z95):
    """Wilson score interval (low, high) for k successes in n trials (95 % by default); (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def predicted_at_clicks(predictions, clicks):
    """(true classes, predicted classes) at every click: `predictions` {image name: class map}, at native size or
    on the processing grid (a click reads the cell it falls in, points_to_grid's rule). A clicked image without
    a prediction is an error."""
    true, pred = [], []
    for n, c in clicks.images.items():
        if not len(c):
            continue
        if n not in predictions:
            raise ValueError(f"no prediction for image {n}, which holds {len(c)} held-out clicks")
        p = np.asarray(predictions[n])
        H, W = c.image.shape
        h, w = p.shape[:2]
        true.append(c.classes)
        pred.append(p[c.rows * h // H, c.cols * w // W])
    if not true:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(true).astype(np.int64), np.concatenate(pred).astype(np.int64)


def click_metrics(predictions, clicks, exclude=(), bootstrap=1000, seed=0):
    """Accuracy, per-class recall and mIoU over held-out clicks, with 95 % intervals.

    From one metrics.ConfusionMatrix over the clicks (rows true, columns predicted). `accuracy` and `recall`
    {class: value} come with Wilson score intervals (`accuracy_ci`, `recall_ci`); `miou` (IoU of each class from
    the click counts: a false positive is a clicked pixel of another class predicted as this one) with a
    percentile bootstrap interval over clicks (`miou_ci`, `bootstrap` resamples, `seed`). Clicks near each
    other are not independent: the intervals are narrower than the truth when clicks cluster. A pixel predicted
    as IGNORE_INDEX (nodata) counts as wrong."""
    from metrics import ConfusionMatrix  # torch comes with it
    names = clicks.classes.names
    k = len(names)
    true, pred = predicted_at_clicks(predictions, clicks)
    if true.size == 0:
        raise ValueError(f"{clicks.source}: no held-out click to measure on")
    pred = np.where((pred >= 0) & (pred < k), pred, np.where(true == 0, 1, 0) if k > 1 else 0)  # never right
    cm = ConfusionMatrix(k, names)
    cm.update(pred, true)
    res = cm.compute(exclude=exclude)
    mat = cm.mat.numpy()
    tp, support = np.diag(mat), mat.sum(1)
    out = {"clicks": int(true.size), "accuracy": res["oa"],
           "accuracy_ci": wilson_interval(int(tp.sum()), int(true.size)),
           "recall": {}, "recall_ci": {}, "support": dict(zip(names, support.tolist())),
           "miou": res["miou"], "iou": res["iou"]}
    for i, n in enumerate(names):
        out["recall"][n] = float(tp[i] / support[i]) if support[i] else float("nan")
        out["recall_ci"][n] = wilson_interval(int(tp[i]), int(support[i]))
    keep = np.array([n not in exclude for n in names])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        s = rng.integers(0, true.size, true.size)
        m = np.bincount(true[s] * k + pred[s], minlength=k * k).reshape(k, k)
        d = np.diag(m)
        denom = m.sum(0) + m.sum(1) - d
        iou = np.where(denom > 0, d / np.maximum(denom, 1), np.nan)[keep]
        if np.isfinite(iou).any():
            draws.append(np.nanmean(iou))
    out["miou_ci"] = tuple(float(v) for v in np.percentile(draws, [2.5, 97.5])) if draws else (np.nan, np.nan)
    return out
