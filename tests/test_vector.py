"""GIS maps out: class polygons that rasterise back to the mask, block-wise = whole, the folder layer merged across
image seams, the background rule, area tables and their notes."""

import csv

import numpy as np
import pyogrio
import pyproj
import pytest
import rasterio.features
import shapely
from PIL import Image
from rasterio.transform import Affine

from spec import CLASSES, IGNORE_INDEX
from vector import (background_classes, class_areas, mask_to_polygons, polygons_for_image, write_area_notes,
                    write_area_table, write_folder_layer, write_polygons)

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


# --------------------------------------------------------------------------- the folder layer

def per_image_files(folder, masks, suffix=".gpkg", crs=UTM, skip=()):
    """Write {name: (mask, transform)} as write_polygons's per-image files; returns their paths."""
    folder.mkdir(exist_ok=True)
    paths = []
    for name, (mask, transform) in masks.items():
        polys = mask_to_polygons(mask, NAMES, transform, crs, skip=skip)
        paths.append(write_polygons(folder / f"{name.replace('.', '_')}_polygons{suffix}", polys, image=name))
    return paths


def read_layer(path):
    meta, _, wkb, values = pyogrio.raw.read(path)
    return meta, shapely.from_wkb(np.asarray(wkb, dtype=object)), dict(zip(meta["fields"].tolist(), values))


def seam_masks():
    """Two 10 x 12 tiles side by side (b's left edge is a's right edge): a building (1) across the seam, one in a
    alone, road (0) elsewhere, a tree (2) in b, a few nodata pixels."""
    a, b = np.zeros((10, 12), np.uint8), np.zeros((10, 12), np.uint8)
    a[2:6, 8:12] = 1  # 16 pixels, to a's right edge ...
    b[3:7, 0:5] = 1  # ... and 20 in b from its left edge: one building of 36 pixels, 9 m^2
    a[7:9, 1:3] = 1  # 4 pixels, off the seam
    b[6:9, 8:11] = 2
    a[0, 0] = b[9, 11] = IGNORE_INDEX
    return {"a.tif": (a, T), "b.tif": (b, T @ Affine.translation(12, 0))}


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_folder_layer_merges_a_building_across_the_seam_and_rasterises_back_to_each_mask(tmp_path, suffix):
    masks = seam_masks()
    sources = per_image_files(tmp_path, masks, suffix)
    written, merged, left_out = write_folder_layer(tmp_path / f"polygons{suffix}", sources)
    meta, geoms, columns = read_layer(tmp_path / f"polygons{suffix}")
    assert pyproj.CRS(meta["crs"]) == pyproj.CRS(UTM) and left_out == {}
    assert list(meta["fields"]) == ["class_index", "class", "area", "images"]
    buildings = columns["class_index"] == 1
    assert sorted(columns["images"][buildings]) == ["a.tif", "a.tif, b.tif"]
    across = geoms[buildings & (columns["images"] == "a.tif, b.tif")]
    assert len(across) == 1 and across[0].area == 36 * 0.25 and across[0].geom_type == "Polygon"
    np.testing.assert_allclose(columns["area"], shapely.area(geoms))
    assert merged >= 2  # the building and the road that wraps around it
    assert written == len(geoms) < sum(len(read_layer(p)[1]) for p in sources)
    for mask, transform in masks.values():  # each image's mask, exactly
        assert np.array_equal(burn_layer(geoms, columns, mask.shape, transform), mask)


def burn_layer(geoms, columns, shape, transform):
    return rasterio.features.rasterize(list(zip(geoms, columns["class_index"].tolist())), out_shape=shape,
                                       transform=transform, fill=IGNORE_INDEX, dtype="uint8")


def test_images_apart_are_not_merged_and_overlapping_ones_count_a_class_once(tmp_path):
    masks = seam_masks()
    apart = {"a.tif": masks["a.tif"], "b.tif": (masks["b.tif"][0], T @ Affine.translation(13, 0))}  # a 1-pixel gap
    _, merged, _ = write_folder_layer(tmp_path / "apart.gpkg", per_image_files(tmp_path / "apart", apart))
    _, _, columns = read_layer(tmp_path / "apart.gpkg")
    assert merged == 0 and set(columns["images"]) == {"a.tif", "b.tif"}
    a = np.full((4, 6), 0, np.uint8)
    a[1:3, 2:6] = 1  # 8 building pixels
    over = {"a.tif": (a, T), "b.tif": (a.copy(), T @ Affine.translation(2, 0))}  # b shifted by 2 columns
    write_folder_layer(tmp_path / "over.gpkg", per_image_files(tmp_path / "over", over))
    _, geoms, columns = read_layer(tmp_path / "over.gpkg")
    building = geoms[columns["class_index"] == 1]
    assert len(building) == 1 and building[0].area == (8 + 8 - 4) * 0.25  # the 4 pixels both hold, once


def test_files_without_crs_are_left_out_of_the_layer_and_several_crs_are_refused(tmp_path):
    masks = seam_masks()
    plain = per_image_files(tmp_path / "plain", masks, crs=None)
    geo = per_image_files(tmp_path / "geo", masks)
    written, _, left_out = write_folder_layer(tmp_path / "layer.gpkg", plain + geo[:1])
    assert written == len(read_layer(geo[0])[1]) and set(left_out) == set(plain)
    assert all("pixel coordinates" in why for why in left_out.values())
    assert write_folder_layer(tmp_path / "none.gpkg", plain)[0] is None and not (tmp_path / "none.gpkg").exists()
    other = per_image_files(tmp_path / "other", {"c.tif": masks["b.tif"]}, crs="EPSG:32617")
    with pytest.raises(ValueError, match=r"2 CRSs \(EPSG:32616: a_tif_polygons.gpkg.*EPSG:32617: c_tif_polygons"):
        write_folder_layer(tmp_path / "mixed.gpkg", geo + other)
    assert not (tmp_path / "mixed.gpkg").exists()


def test_the_background_rule_and_polygons_without_it():
    assert background_classes(("background", "building")) == (0,)
    assert background_classes(("building", "_Background_", "background")) == (1,)  # the first one
    assert background_classes(CLASSES) == ()  # Potsdam: six classes, no background
    assert background_classes(("background", "building"), "none") == ()
    assert background_classes(CLASSES, "clutter") == (5,)
    with pytest.raises(ValueError, match="'sky' is no class"):
        background_classes(CLASSES, "sky")
    mask = blob_mask()
    every, without = mask_to_polygons(mask, NAMES, T, UTM), mask_to_polygons(mask, NAMES, T, UTM, skip=(0,))
    assert 0 not in without.classes.tolist()
    kept = every.classes != 0
    assert len(without) == kept.sum() and all(a.equals(b) for a, b in zip(
        sorted(every.geometries[kept], key=lambda g: g.bounds), sorted(without.geometries, key=lambda g: g.bounds)))


def test_area_notes_say_pixel_counts_and_point_to_the_estimates(tmp_path):
    notes = write_area_notes(tmp_path / "areas.md", tmp_path / "areas.csv").read_text()
    assert "counts the pixels of the map" in notes and "not an estimate" in notes
    assert "python assess.py" in notes and "docs/assessment.md" in notes and "No assessment estimates" in notes
    notes = write_area_notes(tmp_path / "areas.md", tmp_path / "areas.csv",
                             [tmp_path / "assessment_estimates.csv"]).read_text()
    assert "`assessment_estimates.csv`" in notes and "No assessment" not in notes
