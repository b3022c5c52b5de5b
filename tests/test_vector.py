"""GIS maps out: class polygons that rasterise back to the mask, block-wise = whole, area tables."""

import csv

import numpy as np
import pyogrio
import pyproj
import pytest
import rasterio.features
import shapely
from PIL import Image
from rasterio.transform import Affine

from spec import IGNORE_INDEX
from vector import class_areas, mask_to_polygons, polygons_for_image, write_area_table, write_polygons

NAMES = ("road", "building", "tree")
UTM = "EPSG:32616"
T = Affine(0.5, 0, 500000.0, 0, -0.5, 4000000.0)  # 0.5 m pixels, north up


def blob_mask(shape=(37, 29), seed=0):
    """Blocky regions of three classes with holes, diagonal touches and a few ignored pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 3, (shape[0] // 3 + 1, shape[1] // 3 + 1))
    mask = np.kron(small, np.ones((3, 3), np.int64))[: shape[0], : shape[1]].astype(np.uint8)
    mask[rng.random(shape) < 0.05] = IGNORE_INDEX
    return mask


def burn(polys, shape, transform):
    return rasterio.features.rasterize(list(zip(polys.geometries, polys.classes.tolist())), out_shape=shape,
                                       transform=transform, fill=IGNORE_INDEX, dtype="uint8")


@pytest.mark.parametrize("transform", [T, None])
def test_unsimplified_polygons_rasterise_back_exactly(transform):
    mask = blob_mask()
    polys = mask_to_polygons(mask, NAMES, transform, UTM if transform else None)
    assert len(polys) > 10 and set(polys.classes.tolist()) == {0, 1, 2}
    assert shapely.is_valid(polys.geometries).all()
    assert np.array_equal(burn(polys, mask.shape, transform or Affine.identity()), mask)


def test_block_wise_equals_whole_image():
    mask = blob_mask((61, 40), seed=3)
    whole = mask_to_polygons(mask, NAMES, T, UTM, block_rows=None)
    for rows in (5, 7, 16):
        blocks = mask_to_polygons(mask, NAMES, T, UTM, block_rows=rows)
        assert len(blocks) == len(whole)
        # each polygon of one has one topologically equal polygon of the same class in the other
        left = sorted(zip(whole.classes.tolist(), shapely.normalize(whole.geometries).tolist()),
                      key=lambda p: (p[0], p[1].bounds, p[1].area))
        right = sorted(zip(blocks.classes.tolist(), shapely.normalize(blocks.geometries).tolist()),
                       key=lambda p: (p[0], p[1].bounds, p[1].area))
        for (ca, a), (cb, b) in zip(left, right):
            assert ca == cb and a.equals(b)


def test_a_class_region_spanning_many_blocks_is_one_polygon():
    mask = np.full((20, 10), 1, np.uint8)
    mask[5:15, 3:7] = 2  # building around a tree: a polygon with a hole, across four seams
    polys = mask_to_polygons(mask, NAMES, block_rows=4)
    assert sorted(polys.classes.tolist()) == [1, 2]
    building = polys.geometries[polys.classes == 1][0]
    assert len(building.interiors) == 1 and building.area == 200 - 40


def test_min_area_and_simplify():
    mask = np.zeros((30, 30), np.uint8)
    mask[2:4, 2:4] = 1  # 4 pixels = 1 m^2
    yy, xx = np.mgrid[:30, :30]
    mask[(yy - 18) ** 2 + (xx - 18) ** 2 < 64] = 2  # a staircase disc
    polys = mask_to_polygons(mask, NAMES, T, UTM, min_area=1.5)
    assert 1 not in polys.classes.tolist() and 2 in polys.classes.tolist()
    plain = mask_to_polygons(mask, NAMES, T, UTM)
    simple = mask_to_polygons(mask, NAMES, T, UTM, simplify=0.6)
    count = lambda p: int(shapely.get_num_coordinates(p.geometries).sum())
    assert count(simple) < count(plain)
    union = shapely.union_all(simple.geometries)  # a coverage: no overlaps between neighbours
    assert union.area == pytest.approx(shapely.area(simple.geometries).sum(), rel=1e-9)


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_written_polygons_carry_crs_and_class(tmp_path, suffix):
    mask = blob_mask()
    polys = mask_to_polygons(mask, NAMES, T, UTM)
    path = write_polygons(tmp_path / f"tile{suffix}", polys)
    meta, _, wkb, values = pyogrio.raw.read(path)
    assert pyproj.CRS(meta["crs"]) == pyproj.CRS(UTM)
    assert list(meta["fields"]) == ["class_index", "class", "area"]
    assert len(wkb) == len(polys)
    assert [NAMES[i] for i in values[0]] == list(values[1])
    back = shapely.from_wkb(np.asarray(wkb, dtype=object))
    burnt = rasterio.features.rasterize(list(zip(back, values[0].tolist())), out_shape=mask.shape, transform=T,
                                        fill=IGNORE_INDEX, dtype="uint8")
    assert np.array_equal(burnt, mask)
    assert values[2].sum() == pytest.approx((mask != IGNORE_INDEX).sum() * 0.25)


def test_non_georeferenced_image_gives_pixel_polygons_without_crs(tmp_path):
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "plain.png")
    mask = np.zeros((6, 8), np.uint8)
    mask[:, 4:] = 1
    polys = polygons_for_image(mask, tmp_path / "plain.png", NAMES)
    assert polys.crs is None
    assert sorted(g.bounds for g in polys.geometries) == [(0, 0, 4, 6), (4, 0, 8, 6)]
    with pytest.raises(ValueError, match="plain.png 8x6"):
        polygons_for_image(mask[:5], tmp_path / "plain.png", NAMES)


def test_area_table_on_a_hand_made_mask(tmp_path):
    mask = np.array([[0, 0, 1, 1, 1],
                     [0, 2, 1, 1, IGNORE_INDEX],
                     [2, 2, 2, 2, IGNORE_INDEX],
                     [0, 0, 0, 0, 0]], np.uint8)  # road 8, building 5, tree 5 pixels
    rows = class_areas(mask, NAMES, T, UTM)
    assert [r["pixels"] for r in rows] == [8, 5, 5]
    assert [r["m2"] for r in rows] == [2.0, 1.25, 1.25]  # 0.5 m x 0.5 m pixels
    assert rows[0]["ha"] == pytest.approx(2e-4)
    geographic = class_areas(mask, NAMES, Affine(1e-5, 0, -84, 0, -1e-5, 36), "EPSG:4326")
    assert geographic[0]["pixels"] == 8 and geographic[0]["m2"] is None
    path = write_area_table(tmp_path / "areas.csv", {"a": rows, "b": class_areas(mask[:2], NAMES, T, UTM)})
    table = list(csv.DictReader(open(path)))
    total = {r["class"]: r for r in table if r["image"] == "TOTAL"}
    assert int(total["road"]["pixels"]) == 8 + 3 and float(total["road"]["m2"]) == pytest.approx(2.75)
    assert int(total["building"]["pixels"]) == 5 + 5 and float(total["tree"]["ha"]) == pytest.approx(1.5e-4)
    assert len(table) == 3 * 3
    plain = write_area_table(tmp_path / "plain.csv", {"p": class_areas(mask, NAMES)})
    assert [r["m2"] for r in csv.DictReader(open(plain))] == [""] * 6


def test_values_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match=r"values \[7\], not classes 0..2"):
        mask_to_polygons(np.full((3, 3), 7, np.uint8), NAMES)
