"""GIS maps out: a class mask as class polygons (GeoPackage or GeoJSON, in the raster's CRS, with the class index
and name) and a per-class area table (pixels, m^2 and ha where the CRS is in metres) as CSV.

    from vector import polygons_for_image, write_polygons, class_areas, write_area_table
    polys = polygons_for_image(mask, "images/tile_03.tif", classes.names, min_area=2.0, simplify=0.5)
    write_polygons("output/tile_03.gpkg", polys)
    write_area_table("output/areas.csv", {"tile_03": class_areas(mask, classes.names, polys.transform, polys.crs)})

Polygons are the 4-connected regions of one class (rasterio.features.shapes), IGNORE_INDEX (nodata) left out.
Unsimplified, they follow pixel edges and rasterise back (pixel centres) to the mask exactly. A non-georeferenced
mask gives polygons in pixel coordinates (x = column, y = row, y down) and no CRS.

Large rasters go by bands of rows: each band is polygonised alone, then, per class, the pieces that touch a seam
between bands are unioned (shapely) and split into their parts again, which gives the polygons of the whole mask.
Memory: one band of the mask plus every polygon found (the output) and, per class, the pieces on seams; a class
that covers most of a huge raster is one huge polygon, and that polygon is held whole.
"""

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyogrio
import pyproj
import rasterio.features
import shapely
from rasterio.transform import Affine

from annotations import open_image
from raster import atomic_path
from spec import IGNORE_INDEX

DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
BLOCK_ROWS = 1024  # rows per band when vectorising a whole mask


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


def polygons_from_bands(bands, names, transform=None, crs=None, *, min_area=0.0, simplify=0.0,
                        ignore=IGNORE_INDEX):
    """Class polygons of a mask given as bands of rows `(y0, y1, rows)` top to bottom (rows: (y1 - y0, W) uint8
    class indices; infer.py's streamed prediction gives them so), merged across the seams between bands.

    `transform`/`crs`: the raster's (None: pixel coordinates, no CRS). `min_area`: polygons smaller than this
    (square CRS units, m^2 for UTM; pixels when not georeferenced) are dropped, leaving holes. `simplify`:
    tolerance in CRS units (pixels when not georeferenced) for shapely.coverage_simplify, which moves shared
    edges together (no gaps or overlaps between neighbours); simplified polygons no longer rasterise back
    exactly. Class values outside `names` (other than `ignore`) are an error."""
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
        for geom, value in rasterio.features.shapes(rows, mask=rows != ignore, connectivity=4,
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
                     ignore=IGNORE_INDEX):
    """Class polygons of an (H, W) class-index mask (numpy, or a memmap), by bands of `block_rows` rows (None: in
    one go). See polygons_from_bands for the options."""
    return polygons_from_bands(_bands(np.asarray(mask), block_rows), names, transform, crs, min_area=min_area,
                               simplify=simplify, ignore=ignore)


def polygons_for_image(mask, image, names, **kwargs):
    """Class polygons of the mask predicted for `image` (its path): the image's transform and CRS (pixel
    coordinates when it has none). kwargs: mask_to_polygons's."""
    ref = open_image(image)
    if tuple(np.shape(mask)[:2]) != ref.shape:
        raise ValueError(f"the mask is {np.shape(mask)[1]}x{np.shape(mask)[0]}, the image {ref.path} "
                         f"{ref.shape[1]}x{ref.shape[0]}; vectorise the native-size mask")
    return mask_to_polygons(mask, names, ref.transform if ref.georeferenced else None, ref.crs, **kwargs)


def write_polygons(path, polygons):
    """Write Polygons as GeoPackage (.gpkg) or GeoJSON (.geojson/.json) by the extension, atomically: fields
    class_index, class (name), area (square CRS units; pixels when there is no CRS), the CRS with them."""
    path = Path(path)
    driver = DRIVERS.get(path.suffix.lower())
    if driver is None:
        raise ValueError(f"{path}: write polygons as .gpkg (default) or .geojson")
    fields = ["class_index", "class", "area"]
    data = [polygons.classes.astype(np.int32), np.array([polygons.names[c] for c in polygons.classes], dtype=object),
            shapely.area(polygons.geometries).astype(np.float64)]
    with atomic_path(path, keep_suffix=True) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'crs' was not provided")  # pixel coordinates: no CRS, said so
        pyogrio.raw.write(tmp, shapely.to_wkb(polygons.geometries), data, fields, driver=driver,
                          geometry_type="Polygon", layer=path.stem,
                          crs=None if polygons.crs is None else polygons.crs.to_wkt())
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
    cols = ["image", "class_index", "class", "pixels", "m2", "ha"]
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
