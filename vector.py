"""GIS maps out: a class mask as class polygons (GeoPackage or GeoJSON, in the raster's CRS, with the class index
and name), one layer of a folder's polygons merged across image seams, and a per-class table of the map's pixel
counts (pixels, m^2 and ha where the CRS is in metres) as CSV.

    from vector import polygons_for_image, write_polygons, write_folder_layer, class_areas, write_area_table
    polys = polygons_for_image(mask, "images/tile_03.tif", classes.names, min_area=2.0, simplify=0.5)
    write_polygons("output/tile_03_tif_polygons.gpkg", polys, image="tile_03.tif")
    write_folder_layer("output/polygons.gpkg", sorted(Path("output").glob("*_polygons.gpkg")))
    write_area_table("output/areas.csv", {"tile_03": class_areas(mask, classes.names, polys.transform, polys.crs)})

Polygons are the 4-connected regions of one class (rasterio.features.shapes), IGNORE_INDEX (nodata) left out.
Unsimplified, they follow pixel edges and rasterise back (pixel centres) to the mask exactly. A non-georeferenced
mask gives polygons in pixel coordinates (x = column, y = row, y down) and no CRS.

Large rasters go by bands of rows: each band is polygonised alone, then, per class, the pieces that touch a seam
between bands are unioned (shapely) and split into their parts again, which gives the polygons of the whole mask.
Memory: one band of the mask plus every polygon found (the output) and, per class, the pieces on seams; a class
that covers most of a huge raster is one huge polygon, and that polygon is held whole.

The folder layer (write_folder_layer) is made from per-image files the same way: polygons of one class that touch or
overlap across two images (tiles cut from one raster: their edges meet exactly) are unioned into one, the others
copied. One file is read at a time; held are its polygons and those near another image's polygons.

The background class (background_classes: the one rule) gets no polygons unless asked; areas count every class.

infer.py's map outputs of a folder are made here (docs/maps.md). While an input's masks are written, `_Maps` hands
each band of mask rows to polygons_from_bands (in blocks of VECTOR_ROWS rows) and class_areas, each pulling in its
own thread, so neither holds the mask; `_place` gives the input's transform and CRS. The folder's `areas.csv` and
`areas.md` (update_area_table, read_area_table, check_area_table, area_line) and its layer `polygons.gpkg`
(update_polygon_layer, from polygon_files) keep the rows and polygons of images that a run did not segment.
"""

import contextlib
import csv
import queue
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyogrio
import pyproj
import rasterio.features
import shapely
from rasterio.transform import Affine

from raster import RasterError, atomic_path, open_image
from spec import IGNORE_INDEX

DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
BLOCK_ROWS = 1024  # rows per band when vectorising a whole mask
BACKGROUND = re.compile(r"[\W_]*(background|bg)[\W_]*", re.IGNORECASE)  # class names taken as the background
FOLDER_LAYER = "polygons"  # --vector: <output>/polygons.<format>, layer polygons: every image's, merged at seams
AREAS_NAME = "areas.csv"  # --vector / --areas: the per-class pixel counts of the output folder's masks
AREA_NOTES_NAME = "areas.md"  # beside it: what the table is (pixel counts, not estimates), where estimates are
ESTIMATES_PATTERN = "*_estimates.csv"  # assess.py's error-adjusted areas, when written into the output folder
AREA_COLUMNS = ["image", "class_index", "class", "pixels", "m2", "ha"]  # write_area_table's
VECTOR_ROWS = BLOCK_ROWS  # mask rows polygonised at once: the bands of a prediction are regrouped into these
BANDS_WAITING = 2  # bands of mask rows queued for each of _Maps's threads (polygons, areas)


@dataclass
class Polygons:
    """Class polygons: `geometries` (shapely Polygons, map coordinates or pixels), `classes` (int class index per
    polygon), `names` (class names), `crs` (pyproj CRS, None when not georeferenced), `transform` (pixel -> map)."""

    geometries: np.ndarray
    classes: np.ndarray
    names: tuple
    crs: object = None
    transform: Affine = Affine.identity()

    def __len__(self):
        return int(self.geometries.size)


def _crs(crs):
    return None if crs is None else pyproj.CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)


def _to_map(geoms, transform):
    """Pixel coordinates -> map coordinates through the affine transform."""
    if transform == Affine.identity():
        return geoms
    a, b, c, d, e, f = transform[:6]
    return shapely.transform(geoms, lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                                                d * xy[:, 0] + e * xy[:, 1] + f]))


def _bands(mask, block_rows):
    step = mask.shape[0] if not block_rows else int(block_rows)
    for y0 in range(0, mask.shape[0], step):
        yield y0, min(y0 + step, mask.shape[0]), mask[y0:y0 + step]


def background_classes(names, background="auto"):
    """The class indices that get no polygons, the one rule: `background` "auto" leaves out the first class named
    like background ("background", "Background", "_background_", "bg"; the Potsdam classes have none), "none" no
    class, a class name that class. Another name is a ValueError listing the classes."""
    if background == "none":
        return ()
    if background == "auto":
        return next(((i,) for i, n in enumerate(names) if BACKGROUND.fullmatch(n)), ())
    if background not in names:
        raise ValueError(f"--background {background!r} is no class of the checkpoint ({', '.join(names)}); name one "
                         f"of them, or none (every class gets polygons), or auto")
    return (list(names).index(background),)


def polygons_from_bands(bands, names, transform=None, crs=None, *, min_area=0.0, simplify=0.0,
                        ignore=IGNORE_INDEX, skip=()):
    """Class polygons of a mask given as bands of rows `(y0, y1, rows)` top to bottom (rows: (y1 - y0, W) uint8
    class indices; infer.py's streamed prediction gives them so), merged across the seams between bands.

    `transform`/`crs`: the raster's (None: pixel coordinates, no CRS). `min_area`: polygons smaller than this
    (square CRS units, m^2 for UTM; pixels when not georeferenced) are dropped, leaving holes. `simplify`:
    tolerance in CRS units (pixels when not georeferenced) for shapely.coverage_simplify, which moves shared
    edges together (no gaps or overlaps between neighbours); simplified polygons no longer rasterise back
    exactly. `skip`: class indices that get no polygons (background_classes). Class values outside `names` (other
    than `ignore`) are an error."""
    transform = Affine.identity() if transform is None else transform
    k = len(names)
    pieces, cls, top, bottom, seams, height = [], [], [], [], set(), 0
    for y0, y1, rows in bands:
        rows = np.ascontiguousarray(rows, np.uint8)
        bad = np.setdiff1d(np.unique(rows), list(range(k)) + [ignore])
        if bad.size:
            raise ValueError(f"mask rows {y0}..{y1} hold values {bad[:8].tolist()}, not classes 0..{k - 1} "
                             f"nor the ignore value {ignore}")
        if y0 > 0:
            seams.add(y0)
        height = y1
        wanted = (rows != ignore) & ~np.isin(rows, skip) if len(skip) else rows != ignore
        for geom, value in rasterio.features.shapes(rows, mask=wanted, connectivity=4,
                                                    transform=Affine.translation(0, y0)):
            g = shapely.geometry.shape(geom)
            pieces.append(g)
            cls.append(int(value))
            _, gy0, _, gy1 = g.bounds
            top.append(gy0 == y0 and y0 in seams)
            bottom.append(gy1 == y1)
    seams.discard(height)
    geoms, cls = np.array(pieces, dtype=object), np.array(cls, np.int64)
    on_seam = np.array(top, bool) | (np.array(bottom, bool) & np.isin(
        np.array([p.bounds[3] for p in pieces]), list(seams))) if pieces else np.zeros(0, bool)
    out_g, out_c = [geoms[~on_seam]], [cls[~on_seam]]
    for c in np.unique(cls[on_seam]):
        merged = shapely.get_parts(shapely.union_all(geoms[on_seam & (cls == c)]))
        out_g.append(merged)
        out_c.append(np.full(merged.size, c, np.int64))
    geoms, cls = np.concatenate(out_g), np.concatenate(out_c)
    order = np.lexsort((shapely.bounds(geoms)[:, 0], shapely.bounds(geoms)[:, 1], cls)) if geoms.size else []
    geoms, cls = _to_map(geoms[order], transform), cls[order]
    if min_area > 0 and geoms.size:
        keep = shapely.area(geoms) >= min_area
        geoms, cls = geoms[keep], cls[keep]
    if simplify > 0 and geoms.size:
        geoms = shapely.coverage_simplify(geoms, simplify)
        keep = ~shapely.is_empty(geoms)
        geoms, cls = geoms[keep], cls[keep]
    return Polygons(geoms, cls, tuple(names), _crs(crs), transform)


def mask_to_polygons(mask, names, transform=None, crs=None, *, min_area=0.0, simplify=0.0, block_rows=BLOCK_ROWS,
                     ignore=IGNORE_INDEX, skip=()):
    """Class polygons of an (H, W) class-index mask (numpy, or a memmap), by bands of `block_rows` rows (None: in
    one go). See polygons_from_bands for the options."""
    return polygons_from_bands(_bands(np.asarray(mask), block_rows), names, transform, crs, min_area=min_area,
                               simplify=simplify, ignore=ignore, skip=skip)


def polygons_for_image(mask, image, names, **kwargs):
    """Class polygons of the mask predicted for `image` (its path): the image's transform and CRS (pixel
    coordinates when it has none). kwargs: mask_to_polygons's."""
    ref = open_image(image)
    if tuple(np.shape(mask)[:2]) != ref.shape:
        raise ValueError(f"the mask is {np.shape(mask)[1]}x{np.shape(mask)[0]}, the image {ref.path} "
                         f"{ref.shape[1]}x{ref.shape[0]}; vectorise the native-size mask")
    return mask_to_polygons(mask, names, ref.transform if ref.georeferenced else None, ref.crs, **kwargs)


def _driver(path):
    driver = DRIVERS.get(Path(path).suffix.lower())
    if driver is None:
        raise ValueError(f"{path}: write polygons as .gpkg (default) or .geojson")
    return driver


def _write(tmp, path, geoms, columns, crs, append=False):
    """Write Polygons `geoms` with `columns` {field: values} into the file `tmp` (a temporary of `path`, whose
    suffix and stem give the format and the layer name), or append them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'crs' was not provided")  # pixel coordinates: no CRS, said so
        pyogrio.raw.write(tmp, shapely.to_wkb(geoms), list(columns.values()), list(columns), driver=_driver(path),
                          geometry_type="Polygon", layer=Path(path).stem, crs=None if crs is None else crs.to_wkt(),
                          append=append)


def write_polygons(path, polygons, image=None):
    """Write Polygons as GeoPackage (.gpkg) or GeoJSON (.geojson/.json) by the extension, atomically: fields
    class_index, class (name), area (square CRS units; pixels when there is no CRS), and `image` (the input's file
    name, which write_folder_layer reads) when given; the CRS with them."""
    path = Path(path)
    _driver(path)
    columns = {"class_index": polygons.classes.astype(np.int32),
               "class": np.array([polygons.names[c] for c in polygons.classes], dtype=object),
               "area": shapely.area(polygons.geometries).astype(np.float64)}
    if image is not None:
        columns["image"] = np.full(len(polygons), image, dtype=object)
    with atomic_path(path, keep_suffix=True) as tmp:
        _write(tmp, path, polygons.geometries, columns, polygons.crs)
    return path


# --------------------------------------------------------------------------- the folder layer

def _crs_name(crs):
    auth = crs.to_authority()
    return f"{auth[0]}:{auth[1]}" if auth else crs.name


def one_crs(named):
    """The one CRS of `named`, [(file name, CRS or None)], the Nones left out (None when all are). Several CRSs are
    a ValueError naming each with its files: one layer holds one CRS."""
    groups = []  # [(pyproj CRS, [file names])]
    for name, crs in named:
        crs = _crs(crs)
        if crs is None:
            continue
        names = next((names for c, names in groups if c == crs), None)
        if names is None:
            names = []
            groups.append((crs, names))
        names.append(name)
    if len(groups) > 1:
        listed = "; ".join(f"{_crs_name(c)}: {', '.join(n[:3])}{f' and {len(n) - 3} more' if len(n) > 3 else ''}"
                           for c, n in groups)
        raise ValueError(f"the images are in {len(groups)} CRSs ({listed}), and one polygons layer holds one CRS: "
                         f"segment the images of each CRS into their own --output folder, or reproject them first")
    return groups[0][0] if groups else None


def layer_crs(path):
    """The CRS (pyproj) of a polygons file; None when it has none."""
    return _crs(pyogrio.read_info(path)["crs"])


def _read_image_polygons(path):
    """(geometries, class_index, class, image name) of a per-image file of write_polygons; the image name falls
    back on the file's name (`a_tif` of a_tif_polygons.gpkg) for a file without the `image` field."""
    meta, _, wkb, values = pyogrio.raw.read(path)
    columns = dict(zip(meta["fields"].tolist(), values))
    if not {"class_index", "class"} <= set(columns):
        raise ValueError(f"{path} has no class_index and class fields: not polygons of infer.py")
    image = columns["image"][0] if "image" in columns and len(wkb) else Path(path).stem.removesuffix("_polygons")
    return shapely.from_wkb(wkb), columns["class_index"].astype(np.int64), columns["class"].astype(object), image


def _merge(geoms, classes, names, images):
    """Union the polygons of each class (those near another image), split into parts: (parts, class index, class
    name, the images whose polygons each part holds joined by ', '), and how many parts hold several images."""
    out, merged = [[], [], [], []], 0
    for c in np.unique(classes):
        pieces, owner = geoms[classes == c], images[classes == c]
        parts = shapely.get_parts(shapely.union_all(pieces))
        piece, part = shapely.STRtree(parts).query(shapely.point_on_surface(pieces), predicate="intersects")
        out[0] += list(parts)
        out[1] += [c] * len(parts)
        out[2] += [names[classes == c][0]] * len(parts)
        covered = [sorted(set(owner[piece[part == j]])) for j in range(len(parts))]
        out[3] += [", ".join(inputs) for inputs in covered]
        merged += sum(len(inputs) > 1 for inputs in covered)
    return (np.array(out[0], dtype=object), np.array(out[1], np.int32), np.array(out[2], dtype=object),
            np.array(out[3], dtype=object)), merged


def write_folder_layer(path, sources):
    """Write the polygons of per-image files `sources` (write_polygons's) as one layer at `path` (.gpkg/.geojson,
    the layer named by its stem), atomically: fields class_index, class, area (square CRS units, counted once where
    images overlap) and images (the input names a polygon covers, joined by ', '). Polygons of one class that touch
    or overlap across images are unioned into one; the others are copied. Files without a CRS (pixel coordinates)
    are left out, and a file that cannot be read; several CRSs are a ValueError (one_crs).

    One file is read at a time: held are its polygons and those that reach another image's polygons (their bounding
    box), which alone a merge can need. Returns (polygons written, of them merged across images, {file: why left
    out}); when no source has a CRS no file is written and the count is None."""
    path, infos, left_out = Path(path), [], {}
    for p in sources:
        try:
            infos.append((p, pyogrio.read_info(p, force_total_bounds=True)))
        except Exception as e:  # GDAL's own errors: this file is reported and left out
            left_out[p] = f"cannot be read ({e})"
    left_out.update({p: "no CRS: its polygons are in pixel coordinates" for p, i in infos if not i["crs"]})
    placed = [(p, i) for p, i in infos if i["crs"]]
    crs = one_crs([(Path(p).name, i["crs"]) for p, i in placed])
    if crs is None:
        return None, 0, left_out
    placed = [(p, i) for p, i in placed if i["features"]]
    tree = shapely.STRtree(shapely.box(*np.array([i["total_bounds"] for _, i in placed], float).reshape(-1, 4).T))
    held, written, started = [], 0, False
    with atomic_path(path, keep_suffix=True) as tmp:
        def put(geoms, classes, names, images, last=False):
            """Append polygons; the first ones make the file (a GeoJSON made empty keeps no fields), or the end."""
            nonlocal written, started
            if len(geoms) or (last and not started):
                _write(tmp, path, geoms, {"class_index": classes.astype(np.int32), "class": names,
                                          "area": shapely.area(geoms).astype(np.float64), "images": images}, crs,
                       append=started)
                written, started = written + len(geoms), True

        for k, (p, _) in enumerate(placed):
            try:
                geoms, classes, names, image = _read_image_polygons(p)
            except (ValueError, RuntimeError) as e:  # pyogrio's errors are RuntimeErrors
                left_out[p] = str(e)
                continue
            g, box = tree.query(geoms, predicate="intersects")
            near = np.zeros(len(geoms), bool)
            near[g[box != k]] = True
            put(geoms[~near], classes[~near], names[~near], np.full((~near).sum(), image, dtype=object))
            held.append((geoms[near], classes[near], names[near], np.full(near.sum(), image, dtype=object)))
        merged, n_merged = _merge(*(np.concatenate([h[i] for h in held]) if held else np.zeros(0, object)
                                    for i in range(4)))
        put(*merged, last=True)
    return written, n_merged, left_out


def polygon_files(output, vector):
    """The per-image polygons files in `output` of the format `vector`: <stem>_polygons.<format>."""
    return sorted(p for p in Path(output).glob(f"*_polygons.{vector}") if not p.name.startswith("."))


def update_polygon_layer(output, vector, log):
    """Write <output>/polygons.<vector> from every per-image polygons file in `output` (write_folder_layer):
    images of earlier runs and inputs skipped stay in it, like their areas.csv rows. Logs what it wrote and left
    out. Returns its path, or None where no image has a CRS (no layer)."""
    path = Path(output) / f"{FOLDER_LAYER}.{vector}"
    sources = polygon_files(output, vector)
    written, merged, left_out = write_folder_layer(path, sources)
    for p, why in left_out.items():
        log(f"{p}: left out of {path.name}: {why}")
    if written is None:
        log(f"no {path.name}: no image has a CRS; each one's polygons are in pixel coordinates in its own file")
        return None
    log(f"{written} polygons of {len(sources) - len(left_out)} images in one layer, {merged} of them merged across "
        f"image seams -> {path} (layer {FOLDER_LAYER})")
    return path


# --------------------------------------------------------------------------- areas

def metres_per_unit(crs):
    """Metres per CRS unit when the CRS is projected (UTM: 1.0), else None (geographic degrees, or no CRS)."""
    crs = _crs(crs)
    if crs is None or not crs.is_projected:
        return None
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else None
    return float(factor) if factor else None


def class_areas(mask, names, transform=None, crs=None, ignore=IGNORE_INDEX):
    """Per-class area of an (H, W) mask (or bands of rows (y0, y1, rows)): a list of rows {class_index, class,
    pixels, m2, ha}; m2 / ha are None unless the CRS is projected (pixel area |det(transform)| x metres^2)."""
    k = len(names)
    counts = np.zeros(k + 1, np.int64)
    bands = _bands(np.asarray(mask), BLOCK_ROWS) if isinstance(mask, np.ndarray) else mask
    for _, _, rows in bands:
        v = np.asarray(rows).reshape(-1).astype(np.int64)
        v = np.where(v == ignore, k, v)
        if v.size and (v.min() < 0 or v.max() > k):
            raise ValueError(f"mask values outside classes 0..{k - 1} and the ignore value {ignore}")
        counts += np.bincount(v, minlength=k + 1)
    m = metres_per_unit(crs) if transform is not None else None
    pixel_m2 = abs(transform.determinant) * m * m if m else None
    return [{"class_index": i, "class": n, "pixels": int(counts[i]),
             "m2": None if pixel_m2 is None else float(counts[i] * pixel_m2),
             "ha": None if pixel_m2 is None else float(counts[i] * pixel_m2 / 1e4)} for i, n in enumerate(names)]


def write_area_table(path, tables):
    """Write {image name: class_areas rows} as CSV (image, class_index, class, pixels, m2, ha), then TOTAL rows
    summed over the images (m2 / ha blank unless every image has them). Atomic."""
    path = Path(path)
    cols = AREA_COLUMNS
    fmt = lambda v: "" if v is None else (f"{v:.10g}" if isinstance(v, float) else v)  # exact for any area
    totals = {}
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for name, rows in tables.items():
            for r in rows:
                w.writerow([name] + [fmt(r[c]) for c in cols[1:]])
                t = totals.setdefault(r["class_index"], {"class_index": r["class_index"], "class": r["class"],
                                                         "pixels": 0, "m2": 0.0, "ha": 0.0})
                t["pixels"] += r["pixels"]
                for c in ("m2", "ha"):
                    t[c] = None if t[c] is None or r[c] is None else t[c] + r[c]
        for t in totals.values():
            w.writerow(["TOTAL"] + [fmt(t[c]) for c in cols[1:]])
    return path


AREA_NOTES = """# What {table} is

`{table}` counts the pixels of the map: for every image, and in the TOTAL rows for them all, how many pixels
infer.py put in each class (`pixels`) and what they cover (`m2`, `ha`, where the CRS is in metres). That is the
mapped area, not an estimate of how much of each class there is: the map's errors (a building missed, a roof called
a road) are in it, uncorrected.

Class areas adjusted for the map's errors, with 95 % intervals, come from an accuracy assessment: a sample drawn
from the map (`python assess.py sample ...`) and labelled blind, then `python assess.py estimate ...`
(docs/assessment.md in the repository).

{estimates}
"""


def write_area_notes(path, table, estimates=()):
    """Write `path` (areas.md beside the table): the table is the map's pixel counts, not area estimates, and where
    the error-adjusted areas are: `estimates`, the assessment estimate files in the folder, else how to make them."""
    estimates = [Path(e).name for e in estimates]
    said = (f"Error-adjusted areas of this map: {', '.join(f'`{e}`' for e in estimates)} (in this folder)."
            if estimates else "No assessment estimates (`<sample>_estimates.csv`) are in this folder yet.")
    with atomic_path(path) as tmp:
        Path(tmp).write_text(AREA_NOTES.format(table=Path(table).name, estimates=said))
    return Path(path)


def read_area_table(path):
    """{input file name: class_areas rows} of an areas.csv written by this tool, TOTAL rows left out; {}
    when there is none. A file that is not such a table is a ValueError naming it."""
    path = Path(path)
    if not path.exists():
        return {}
    number = lambda v: float(v) if v else None  # noqa: E731
    table = {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0] != AREA_COLUMNS:
            raise ValueError(f"its columns are not {', '.join(AREA_COLUMNS)}")
        for r in rows[1:]:
            image, index, name, pixels, m2, ha = r
            if image != "TOTAL":
                table.setdefault(image, []).append({"class_index": int(index), "class": name, "pixels": int(pixels),
                                                    "m2": number(m2), "ha": number(ha)})
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} exists but is not an area table of this tool ({e}); move it away or choose "
                         f"another --output") from None
    return table


def check_area_table(path, names):
    """An existing areas.csv is this tool's, with the classes `names`: checked before any work, as its rows are
    kept and added to."""
    for image, rows in read_area_table(path).items():
        if [r["class"] for r in rows] != list(names):
            raise ValueError(f"{path} holds the classes {[r['class'] for r in rows]} for {image}, not this "
                             f"checkpoint's {list(names)}; move it away or choose another --output")


def update_area_table(output, areas):
    """Write {input file name: class_areas rows} into <output>/areas.csv: these images' rows replace theirs, the
    rows of other images (earlier runs, inputs skipped with --skip-existing) stay, TOTAL rows sum them all.
    Returns the table's path."""
    path = Path(output) / AREAS_NAME
    table = read_area_table(path)
    table.update(areas)
    write_area_table(path, dict(sorted(table.items())))
    write_area_notes(path.with_name(AREA_NOTES_NAME), path, sorted(path.parent.glob(ESTIMATES_PATTERN)))
    return path


def area_line(output, done):
    """The run's last word on the area table: how many images it holds, that it counts the map's pixels, and where
    the error-adjusted areas are (an assessment's estimates in the folder, or how to make them)."""
    path = Path(output) / AREAS_NAME
    estimates = sorted(path.parent.glob(ESTIMATES_PATTERN))
    where = (f"error-adjusted areas: {', '.join(str(e) for e in estimates)}" if estimates else
             "error-adjusted areas come from an accuracy assessment: python assess.py (docs/assessment.md)")
    return (f"class areas of {len(read_area_table(path))} images ({done} from this run) -> {path}: pixel counts of "
            f"the map, not area estimates ({AREA_NOTES_NAME}); {where}")


# --------------------------------------------------------------------------- polygons and areas, as masks are written

def _place(path, raster):
    """(transform, crs, note) for an input's polygons and areas: a GeoTIFF's from rasterio, the same georeferencing
    as its mask TIFF; (None, None, note) for any other image: pixel coordinates, no CRS."""
    if not raster.is_georeferenced:
        return None, None, ("not georeferenced: polygons in pixel coordinates (x = column, y = row, down), no CRS; "
                            "areas in pixels")
    try:
        ref = open_image(path)
    except Exception as e:  # rasterio's own errors: this file cannot be placed
        raise RasterError(f"{path}: its GeoTIFF tags cannot be read as a transform and CRS ({e}); run without "
                          f"--vector/--areas, or fix its georeferencing") from None
    if ref.crs is not None and ref.transform == ref.transform.identity():
        raise RasterError(f"{path}: has a CRS but no transform, so its polygons have no place; run without "
                          f"--vector/--areas, or fix its georeferencing")
    if ref.crs is None:
        return ref.transform, None, "no CRS: polygons in its map coordinates without a CRS; areas in pixels"
    if metres_per_unit(ref.crs) is None:
        return ref.transform, ref.crs, (f"its CRS ({ref.crs}) is not projected: areas in pixels only, --min-area "
                                        f"and --simplify in its units")
    return ref.transform, ref.crs, None


_LAST_BAND = object()  # a _Consumer's queue ends with it


class _Abandoned(Exception):
    """The masks' writing stopped: a _Consumer leaves its work."""


class _Consumer(threading.Thread):
    """Thread: `fn(bands)`, a function that pulls bands of rows (polygons_from_bands, class_areas), fed by `put`
    from the loop that writes the masks, at most BANDS_WAITING bands waiting. `finish()` returns fn's
    result (or raises its exception); `stop()` makes it leave its work."""

    def __init__(self, fn, name):
        super().__init__(name=name, daemon=True)
        self.fn, self.queue, self.stopped = fn, queue.Queue(BANDS_WAITING), threading.Event()
        self.result = self.error = None

    def _bands(self):
        while True:
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                if self.stopped.is_set():
                    raise _Abandoned from None
                continue
            if self.stopped.is_set():
                raise _Abandoned
            if item is _LAST_BAND:
                return
            yield item

    def run(self):
        try:
            self.result = self.fn(self._bands())
        except _Abandoned:
            pass
        except BaseException as e:  # handed to the thread that writes the masks
            self.error = e

    def put(self, item):
        while self.is_alive():
            with contextlib.suppress(queue.Full):
                self.queue.put(item, timeout=0.05)
                return
        raise self.error or RuntimeError(f"{self.name} ended before the last band")

    def finish(self):
        self.put(_LAST_BAND)
        self.join()
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self):
        self.stopped.set()
        self.join()


def _blocks(bands, rows):
    """Bands of rows (y0, y1, rows) regrouped into blocks of `rows` rows top to bottom (the last one shorter):
    the same blocks whether the mask comes whole or band by band, so the polygons are the same too."""
    held, n, y = [], 0, 0  # pieces of the block being filled, its rows, its first row
    for _, _, band in bands:
        while len(band):
            take = min(rows - n, len(band))
            held.append(band[:take])
            n, band = n + take, band[take:]
            if n == rows:
                yield y, y + n, held[0] if len(held) == 1 else np.concatenate(held)
                held, n, y = [], 0, y + n
    if n:
        yield y, y + n, held[0] if len(held) == 1 else np.concatenate(held)


class _Maps:
    """A job's polygons (written to job.polygons_path) and class areas (job.area_rows), made from the bands of
    rows its masks are written from while they are written: `feed(bands)` hands each band on to
    polygons_from_bands (in blocks of VECTOR_ROWS rows) and class_areas, each pulling in its own thread
    (infer-polygons, infer-areas). Neither holds the mask: one block of rows, the polygons found and the
    per-class counts. A context: leaving it on an exception stops both threads."""

    def __init__(self, job):
        self.job, names, place = job, job.spec.classes.names, (job.transform, job.crs)
        skip = background_classes(names, job.background)
        fns = {}
        if job.polygons_path:
            fns["polygons"] = lambda bands: polygons_from_bands(_blocks(bands, VECTOR_ROWS), names, *place,
                                                                min_area=job.min_area, simplify=job.simplify,
                                                                skip=skip)
        if job.areas:
            fns["areas"] = lambda bands: class_areas(bands, names, *place)
        self.consumers = {k: _Consumer(fn, f"infer-{k}") for k, fn in fns.items()}

    def __enter__(self):
        for c in self.consumers.values():
            c.start()
        return self

    def feed(self, bands):
        for band in bands:
            for c in self.consumers.values():
                c.put(band)
            yield band

    def finish(self):
        """Wait for the polygons and areas of every band fed; write the polygons."""
        done = {k: c.finish() for k, c in self.consumers.items()}
        if "polygons" in done:
            write_polygons(self.job.polygons_path, done["polygons"], image=self.job.path.name)
        self.job.area_rows = done.get("areas")

    def __exit__(self, *exc):
        for c in self.consumers.values():
            c.stop()
