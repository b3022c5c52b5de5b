"""Real clicks in: GIS layers, CSV, Label Studio and CVAT exports -> per-image clicks in native pixels."""

import json
from pathlib import Path

import numpy as np
import pyogrio
import pyproj
import pytest
import shapely
from PIL import Image

from annotations import (ImageClicks, check_unclicked, class_counts, click_metrics, clicks_from_label, read_clicks,
                         split_clicks, wilson_interval, write_clicks)
from raster import image_refs
from spec import IGNORE_INDEX
from tests.conftest import CLICK_CLASSES, LEFT, RES, TOP, UTM, geotiff, nodata_geotiff, pixels, pngs, write_layer

FIXTURES = Path(__file__).parent / "fixtures" / "annotations"


def centre(row, col, left=LEFT, top=TOP):
    """Map coordinates of a pixel's centre."""
    return left + (col + 0.5) * RES, top - (row + 0.5) * RES


@pytest.fixture
def two_tiles(tmp_path):
    """Two 40x40 tiles side by side (b starts 20 m east of a)."""
    folder = tmp_path / "images"
    folder.mkdir()
    geotiff(folder / "a.tif")
    geotiff(folder / "b.tif", left=LEFT + 40 * RES)
    return folder


# --------------------------------------------------------------------------- georeferenced layers

@pytest.mark.parametrize("crs", [UTM, "EPSG:4326"])
@pytest.mark.parametrize("suffix", [".geojson", ".gpkg", ".shp"])
def test_georeferenced_clicks_land_on_their_pixels_in_every_format_and_crs(two_tiles, tmp_path, suffix, crs):
    pts = [shapely.Point(centre(3, 5)), shapely.Point(centre(10, 2, left=LEFT + 20)),
           shapely.Point(centre(39, 39)), shapely.Point(LEFT - 100, TOP + 100)]  # the last: outside both
    layer = write_layer(tmp_path / f"clicks{suffix}", pts, ["building", "2", "road", "tree"], crs=crs)
    clicks = read_clicks(layer, two_tiles, CLICK_CLASSES)
    assert pixels(clicks.images["a"]) == {(3, 5): 1, (39, 39): 0}
    assert pixels(clicks.images["b"]) == {(10, 2): 2}
    assert any("1 of 4 features fall outside every image" in n for n in clicks.notes)


def test_a_line_across_two_tiles_goes_to_both(two_tiles, tmp_path):
    line = shapely.LineString([centre(5, 30), centre(5, 50)])  # columns 30..50 of a; b starts at a's column 40
    clicks = read_clicks(write_layer(tmp_path / "l.gpkg", [line], ["road"]), two_tiles, CLICK_CLASSES)
    a, b = clicks.images["a"], clicks.images["b"]
    assert set(a.cols.tolist()) == set(range(30, 40)) and set(a.rows.tolist()) == {5}
    assert set(b.cols.tolist()) == set(range(0, 11)) and set(b.rows.tolist()) == {5}
    assert (a.kinds == 1).all() and (a.classes == 0).all()


def test_polygon_fills_the_pixels_inside(two_tiles, tmp_path):
    x0, y1 = LEFT + 3 * RES, TOP - 2 * RES  # pixel edges: rows 2..5, columns 3..7
    poly = shapely.box(x0, TOP - 6 * RES, LEFT + 8 * RES, y1)
    c = read_clicks(write_layer(tmp_path / "p.gpkg", [poly], ["tree"]), two_tiles, CLICK_CLASSES).images["a"]
    assert set(pixels(c)) == {(r, k) for r in range(2, 6) for k in range(3, 8)}
    assert (c.classes == 2).all() and (c.kinds == 2).all()
    label = c.label()
    assert (label == 2).sum() == 20 and (label == IGNORE_INDEX).sum() == 40 * 40 - 20


def test_layer_without_crs_over_georeferenced_images_is_refused(two_tiles, tmp_path):
    layer = write_layer(tmp_path / "nocrs.gpkg", [shapely.Point(centre(1, 1))], ["road"], crs=None)
    with pytest.raises(ValueError, match=r"nocrs\.gpkg.*no CRS.*Set CRS"):
        read_clicks(layer, two_tiles, CLICK_CLASSES)


def test_swapped_lon_lat_is_named(two_tiles, tmp_path):
    lon, lat = pyproj.Transformer.from_crs(UTM, "EPSG:4326", always_xy=True).transform(*centre(3, 3))
    layer = write_layer(tmp_path / "swapped.geojson", [shapely.Point(lat, lon)], ["road"], crs="EPSG:4326")
    with pytest.raises(ValueError, match=r"swapped\.geojson: no click falls inside any image.*Swapped lon/lat"):
        read_clicks(layer, two_tiles, CLICK_CLASSES)


def test_empty_layer_is_refused(two_tiles, tmp_path):
    path = tmp_path / "empty.gpkg"
    pyogrio.raw.write(path, np.zeros(0, object), [np.zeros(0, object)], ["class"], crs=UTM, geometry_type="Point")
    with pytest.raises(ValueError, match=r"empty\.gpkg: the layer holds no features"):
        read_clicks(path, two_tiles, CLICK_CLASSES)


def test_unknown_class_values_are_listed_with_the_classes(two_tiles, tmp_path):
    layer = write_layer(tmp_path / "c.gpkg", [shapely.Point(centre(1, 1)), shapely.Point(centre(2, 2))],
                        ["building", "car"], field="kind_of")
    with pytest.raises(ValueError, match=r"c\.gpkg field 'kind_of'.*'car'.*0=road, 1=building, 2=tree"):
        read_clicks(layer, two_tiles, CLICK_CLASSES, class_field="kind_of")
    with pytest.raises(ValueError, match=r"no class field 'class'.*kind_of"):
        read_clicks(layer, two_tiles, CLICK_CLASSES)


def test_clicks_on_nodata_are_counted_and_left_out(tmp_path):
    folder = tmp_path / "nd"
    nodata_geotiff(folder)
    layer = write_layer(tmp_path / "n.gpkg", [shapely.Point(centre(2, 2)), shapely.Point(centre(5, 5)),
                                              shapely.Point(centre(20, 20))], ["road", "road", "tree"])
    clicks = read_clicks(layer, folder, CLICK_CLASSES)
    assert pixels(clicks.images["a"]) == {(20, 20): 2}
    assert any("2 clicked pixels lie on nodata" in n for n in clicks.notes)
    only_nodata = write_layer(tmp_path / "only.gpkg", [shapely.Point(centre(2, 2))], ["road"])
    with pytest.raises(ValueError, match=r"only\.gpkg: no click falls on a valid pixel.*nodata"):
        read_clicks(only_nodata, folder, CLICK_CLASSES)


def test_two_classes_on_one_pixel_are_reported_and_left_out(two_tiles, tmp_path):
    x, y = centre(4, 4)
    pts = [shapely.Point(x, y), shapely.Point(x + 0.1, y - 0.1), shapely.Point(*centre(7, 7)),
           shapely.Point(*centre(7, 7))]
    clicks = read_clicks(write_layer(tmp_path / "d.gpkg", pts, ["road", "tree", "building", "building"]),
                         two_tiles, CLICK_CLASSES)
    assert pixels(clicks.images["a"]) == {(7, 7): 1}  # the same class twice counts once
    assert any("1 pixels were given two different classes" in n for n in clicks.notes)


# --------------------------------------------------------------------------- pixel formats

def test_csv_in_pixel_coordinates(tmp_path):
    folder = pngs(tmp_path)
    path = tmp_path / "c.csv"
    path.write_text("image,x,y,class\ntile_a.png,5,3,building\ntile_a,7.9,0.2,0\ntile_b.png,39,29,tree\n")
    clicks = read_clicks(path, folder, CLICK_CLASSES)
    assert pixels(clicks.images["tile_a"]) == {(3, 5): 1, (0, 7): 0}
    assert pixels(clicks.images["tile_b"]) == {(29, 39): 2}
    assert not clicks.images["tile_a"].image.georeferenced


def test_csv_naming_a_missing_image_is_refused(tmp_path):
    folder = pngs(tmp_path)
    path = tmp_path / "bad.csv"
    path.write_text("image,x,y,class\ntile_a.png,5,3,building\nnowhere.png,1,1,road\n")
    with pytest.raises(FileNotFoundError, match=r"bad\.csv names images.*'nowhere\.png'"):
        read_clicks(path, folder, CLICK_CLASSES)
    missing = tmp_path / "gone.csv"
    with pytest.raises(FileNotFoundError, match="gone.csv not found"):
        read_clicks(missing, folder, CLICK_CLASSES)


def test_label_studio_export(tmp_path):
    clicks = read_clicks(FIXTURES / "label_studio_export.json", pngs(tmp_path), CLICK_CLASSES)
    a = clicks.images["tile_a"]
    got = pixels(a)
    polygon = {(r, k) for r in range(15, 18) for k in range(20, 24)}
    assert got == {(15, 5): 1, (3, 30): 2, **{p: 0 for p in polygon}}  # the cancelled annotation is skipped
    assert len(clicks.images["tile_b"]) == 0
    assert any("'choices' ignored" in n for n in clicks.notes)


def test_cvat_points_and_polyline(tmp_path):
    clicks = read_clicks(FIXTURES / "cvat_for_images.xml", pngs(tmp_path), CLICK_CLASSES)
    a = clicks.images["tile_a"]
    assert pixels(a) == {(3, 5): 1, (12, 10): 1, **{(20, k): 0 for k in range(2, 12)}}
    assert set(a.kinds[a.classes == 0].tolist()) == {1}  # the polyline's pixels are a line
    assert pixels(clicks.images["tile_b"]) == {(25, 30): 2}


def test_line_width(tmp_path):
    clicks = read_clicks(FIXTURES / "cvat_for_images.xml", pngs(tmp_path), CLICK_CLASSES, line_width=3)
    road = {p for p, v in pixels(clicks.images["tile_a"]).items() if v == 0}
    assert road == {(r, k) for r in (19, 20, 21) for k in range(1, 13)}


def test_cvat_image_of_another_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"cvat_for_images\.xml: image tile_a\.png is 40x30 there"):
        read_clicks(FIXTURES / "cvat_for_images.xml", pngs(tmp_path, size=(31, 40)), CLICK_CLASSES)


def test_sparse_label_raster_is_a_format(tmp_path):
    folder = pngs(tmp_path)
    labels = tmp_path / "sparse"
    labels.mkdir()
    lab = np.full((30, 40), IGNORE_INDEX, np.uint8)
    lab[4, 6], lab[10, 20], lab[29, 0] = 2, 0, 1
    Image.fromarray(lab).save(labels / "tile_a.png")
    clicks = read_clicks(labels, folder, CLICK_CLASSES)
    assert pixels(clicks.images["tile_a"]) == {(4, 6): 2, (10, 20): 0, (29, 0): 1}
    assert np.array_equal(clicks.images["tile_a"].label(), lab)
    assert len(clicks.images["tile_b"]) == 0
    c = clicks_from_label(lab, folder / "tile_a.png")
    assert c.same(clicks.images["tile_a"])


# --------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("suffix", [".geojson", ".gpkg", ".csv"])
def test_write_then_read_gives_the_same_clicks(two_tiles, tmp_path, suffix):
    shapes = [shapely.Point(centre(3, 5)), shapely.Point(centre(10, 2, left=LEFT + 20)),
              shapely.LineString([centre(20, 35), centre(20, 45)]),
              shapely.box(LEFT + 10 * RES, TOP - 6 * RES, LEFT + 15 * RES, TOP - 2 * RES)]
    layer = tmp_path / "mixed.gpkg"
    write_layer(layer, shapes[:2], ["building", "tree"], layer="points")
    write_layer(layer, shapes[2:], ["road", "tree"], layer="shapes")
    first = read_clicks(layer, two_tiles, CLICK_CLASSES, layer="points")
    shapes_layer = read_clicks(layer, two_tiles, CLICK_CLASSES, layer="shapes")
    for n, c in shapes_layer.images.items():  # one set with points, line and polygon pixels
        old = first.images[n]
        first.images[n] = ImageClicks(c.image, np.r_[old.rows, c.rows], np.r_[old.cols, c.cols],
                                      np.r_[old.classes, c.classes], np.r_[old.kinds, c.kinds])
    assert len(first) == 2 + 11 + 20
    out = write_clicks(tmp_path / f"out{suffix}", first)
    again = read_clicks(out, two_tiles, CLICK_CLASSES)
    assert again.same(first)
    if suffix != ".csv":
        assert pyproj.CRS(pyogrio.read_info(out)["crs"]) == pyproj.CRS(UTM)


def test_round_trip_in_pixel_coordinates(tmp_path):
    folder = pngs(tmp_path)
    first = read_clicks(FIXTURES / "cvat_for_images.xml", folder, CLICK_CLASSES)
    out = write_clicks(tmp_path / "pix.geojson", first)
    assert "crs" not in json.loads(out.read_text())  # no CRS: pixel coordinates over these images
    assert read_clicks(out, folder, CLICK_CLASSES).same(first)
    assert read_clicks(write_clicks(tmp_path / "pix.csv", first), folder, CLICK_CLASSES).same(first)


# --------------------------------------------------------------------------- checks and validation

def test_unclicked_classes_are_refused_unless_allowed(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("image,x,y,class\ntile_a.png,5,3,building\ntile_a.png,6,3,building\n")
    clicks = read_clicks(path, pngs(tmp_path), CLICK_CLASSES)
    assert class_counts(clicks) == {"road": 0, "building": 2, "tree": 0}
    with pytest.raises(ValueError, match=r"c\.csv: classes \['road', 'tree'\] have no click.*--allow-unclicked"):
        check_unclicked(clicks)
    assert check_unclicked(clicks, allow_unclicked=True) == ["road", "tree"]


def _many_clicks(tmp_path, n_images):
    folder = pngs(tmp_path, names=[f"t{i}" for i in range(n_images)], size=(32, 32))
    rng = np.random.default_rng(1)
    lines = ["image,x,y,class"] + [f"t{i}.png,{x},{y},{rng.integers(3)}" for i in range(n_images)
                                   for x in range(1, 32, 4) for y in range(1, 32, 4)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return read_clicks(tmp_path / "m.csv", folder, CLICK_CLASSES)


def test_split_by_whole_images(tmp_path):
    clicks = _many_clicks(tmp_path, 6)
    train, held = split_clicks(clicks, "20%", seed=3)
    held_images = {n for n, c in held.images.items() if len(c)}
    train_images = {n for n, c in train.images.items() if len(c)}
    assert held_images and train_images and not held_images & train_images
    assert len(train) + len(held) == len(clicks)
    assert 0.15 <= len(held) / len(clicks) <= 0.35
    again = split_clicks(clicks, 0.2, seed=3)[1]
    assert again.same(held)


def test_split_by_blocks_of_one_image(tmp_path):
    clicks = _many_clicks(tmp_path, 1)
    train, held = split_clicks(clicks, 0.25, seed=0, blocks=4)
    t, h = train.images["t0"], held.images["t0"]
    block = lambda c: set(((c.rows * 4 // 32) * 4 + c.cols * 4 // 32).tolist())
    assert len(h) and len(t) and not block(t) & block(h)
    assert len(t) + len(h) == len(clicks)
    assert any("blocks" in n for n in held.notes)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(3, 4)
    assert lo == pytest.approx(0.3006, abs=2e-4) and hi == pytest.approx(0.9544, abs=2e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=2e-4)


def test_click_metrics_on_native_and_processing_grids(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("image,x,y,class\ntile_a.png,0,0,road\ntile_a.png,3,0,road\ntile_a.png,0,3,building\n"
                    "tile_a.png,3,3,tree\n")
    clicks = read_clicks(path, pngs(tmp_path, names=("tile_a",), size=(4, 4)), CLICK_CLASSES)
    pred = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [1, 1, 2, 2], [1, 1, 2, 2]])  # (0, 3) says tree: wrong
    m = click_metrics({"tile_a": pred}, clicks)
    assert m["accuracy"] == 0.75 and m["accuracy_ci"] == pytest.approx(wilson_interval(3, 4))
    assert m["recall"] == {"road": 0.5, "building": 1.0, "tree": 1.0}
    assert m["iou"]["road"] == 0.5 and m["iou"]["tree"] == 0.5 and m["iou"]["building"] == 1.0
    assert m["miou"] == pytest.approx(2 / 3)
    assert m["miou_ci"][0] <= m["miou"] <= m["miou_ci"][1]
    small = pred[::2, ::2]  # the processing grid at scale 0.5: a click reads the cell it falls in
    assert click_metrics({"tile_a": small}, clicks)["accuracy"] == 0.75
    grid = clicks.images["tile_a"].grid(0.5)
    assert grid.tolist() == [[0, 0], [1, 2]]
    assert clicks.images["tile_a"].conflicting_cells(0.25) == 1  # one cell, three classes


def test_images_that_share_a_name_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    a = pngs(tmp_path)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x" / "tile_a.png")
    with pytest.raises(ValueError, match="share a name"):
        image_refs([a / "tile_a.png", tmp_path / "x" / "tile_a.png"])
