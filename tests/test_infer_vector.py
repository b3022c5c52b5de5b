"""infer.py --vector / --areas: class polygons in the raster's CRS that rasterise back to the written mask, the folder
layer merged across the seam of adjacent GeoTIFFs, the background rule, the area table and its notes, the streamed
path giving the whole-image answer, pixel coordinates for a plain PNG, the argument and --skip-existing rules."""

import csv

import numpy as np
import pyogrio
import pyproj
import pytest
import rasterio
import rasterio.features
import shapely
import torch
from PIL import Image
from rasterio.transform import Affine

import infer
import predict
import vector
from checkpoint import load_model, save_checkpoint
from model import ResNet18Segmentation
from raster import RasterError
from spec import CLASSES, IGNORE_INDEX, PALETTE, ClassSpec, DataSpec
from tests.conftest import ctrl_c_on_second_image, run, smooth_image

UTM = "EPSG:32616"
PIXEL = 0.5  # metres


def steep_checkpoint(path, classes=None):
    """test_infer's tiny checkpoint with its head made 50x steeper: the untrained network then predicts every
    class in blobs (the plain one predicts one class everywhere, which makes one rectangle per image)."""
    torch.manual_seed(0)
    model = ResNet18Segmentation(decoder="plain")
    with torch.no_grad():
        model.head.weight.mul_(50)
        model.head.bias.zero_()
    save_checkpoint(path, model, DataSpec(scale=0.5) if classes is None else DataSpec(classes=classes, scale=0.5))
    return path


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    return steep_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth")


def write_geotiff(path, image, nodata=None, x0=500000.0, crs=UTM):
    """An RGB GeoTIFF in UTM 16N (or `crs`) at 0.5 m, its left edge at `x0`, in strips of 8 rows (so it can be
    streamed by rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, _ = image.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=3, dtype="uint8", crs=crs,
                       transform=Affine(PIXEL, 0, x0, 0, -PIXEL, 4000000.0), nodata=nodata, tiled=False,
                       blockysize=8) as ds:
        ds.write(np.moveaxis(image, -1, 0))
    return path


def geo_image(h=48, w=40, seed=0):
    """Smooth colours with a nodata (0) stripe and a cut-off corner: holes and a few tiny pieces."""
    image = smooth_image(h, w, seed=seed)
    image[image == 0] = 1  # 0 is nodata: only where set here
    image[20:23, :] = 0
    image[:, 30] = 0
    return image


def read_polygons(path):
    meta, _, wkb, fields = pyogrio.raw.read(path)
    columns = dict(zip(meta["fields"].tolist(), fields))
    return meta, shapely.from_wkb(wkb), columns


def burn(geoms, classes, shape, transform):
    return rasterio.features.rasterize(list(zip(geoms, classes)), out_shape=shape, transform=transform,
                                       fill=IGNORE_INDEX, dtype="uint8")


def index_mask(path):
    with Image.open(path) as im:
        return np.asarray(im)


def area_table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- polygons

@pytest.mark.parametrize("fmt", ["gpkg", "geojson"])
def test_polygons_are_in_the_rasters_crs_and_rasterise_back_to_the_mask(ckpt_path, tmp_path, capsys, fmt):
    tif = write_geotiff(tmp_path / "in" / "scene.tif", geo_image(), nodata=0)
    write_geotiff(tmp_path / "in" / "other.tif", geo_image(seed=1), nodata=0)
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", "--vector", fmt, "--index") == 0
    assert "2 polygons files written" in capsys.readouterr().out
    mask = index_mask(tmp_path / "out" / "scene_tif_mask.index.png")
    assert len(set(np.unique(mask).tolist()) - {IGNORE_INDEX}) >= 3 and (mask == IGNORE_INDEX).any()
    meta, geoms, columns = read_polygons(tmp_path / "out" / f"scene_tif_polygons.{fmt}")
    assert pyproj.CRS.from_user_input(meta["crs"]) == pyproj.CRS.from_user_input(UTM)
    classes = columns["class_index"].astype(int)
    assert [CLASSES[c] for c in classes] == columns["class"].tolist()
    assert len(geoms) > 10 and shapely.is_valid(geoms).all()
    with rasterio.open(tif) as ds:
        assert np.array_equal(burn(geoms, classes.tolist(), mask.shape, ds.transform), mask)
    np.testing.assert_allclose(columns["area"], shapely.area(geoms))  # m^2: map units of UTM


def polygons_without_and_with(ckpt_path, tmp_path, *option):
    """The polygons infer.py --vector gpkg writes for one GeoTIFF scene, plain and with `option`."""
    write_geotiff(tmp_path / "in" / "scene.tif", geo_image(), nodata=0)
    assert run(ckpt_path, tmp_path / "in", tmp_path / "plain", "--vector", "gpkg") == 0
    assert run(ckpt_path, tmp_path / "in", tmp_path / "option", "--vector", "gpkg", *option) == 0
    return tuple(read_polygons(tmp_path / out / "scene_tif_polygons.gpkg")[1] for out in ("plain", "option"))


@pytest.mark.slow
def test_min_area_drops_small_polygons(ckpt_path, tmp_path):
    every, big = polygons_without_and_with(ckpt_path, tmp_path, "--min-area", "1.5")
    small = shapely.area(every) < 1.5  # 1.5 m^2 = 6 pixels of 0.5 m
    assert small.any() and (~small).any()
    assert len(big) == (~small).sum() and (shapely.area(big) >= 1.5).all()


@pytest.mark.slow
def test_simplify_makes_fewer_vertices(ckpt_path, tmp_path):
    plain, simple = polygons_without_and_with(ckpt_path, tmp_path, "--simplify", "0.6")
    assert shapely.get_num_coordinates(simple).sum() < shapely.get_num_coordinates(plain).sum()


def test_png_gets_pixel_coordinates_and_no_crs(ckpt_path, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(smooth_image(30, 26, seed=3)).save(tmp_path / "in" / "photo.png")
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", "--vector", "gpkg", "--index") == 0
    assert "photo.png: not georeferenced: polygons in pixel coordinates" in capsys.readouterr().out
    meta, geoms, columns = read_polygons(tmp_path / "out" / "photo_png_polygons.gpkg")
    assert meta["crs"] is None
    mask = index_mask(tmp_path / "out" / "photo_png_mask.index.png")
    assert shapely.total_bounds(geoms).tolist() == [0, 0, 26, 30]  # pixels: x = column, y = row
    assert np.array_equal(burn(geoms, columns["class_index"].astype(int).tolist(), mask.shape, Affine.identity()),
                          mask)
    rows = area_table(tmp_path / "out" / "areas.csv")
    assert [int(r["pixels"]) for r in rows if r["image"] == "photo.png"] == np.bincount(mask.ravel(), minlength=6)[
        :6].tolist()
    assert all(r["m2"] == "" and r["ha"] == "" for r in rows)  # no CRS: pixels only


def test_geojson_without_crs_is_said_to_be_read_as_degrees(ckpt_path, tmp_path, capsys):
    """GeoJSON has no way to say "no CRS": readers take its coordinates as WGS84 degrees. The log says so."""
    (tmp_path / "in").mkdir()
    Image.fromarray(smooth_image(30, 26, seed=3)).save(tmp_path / "in" / "photo.png")
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", "--vector", "geojson") == 0
    assert "WGS84" in capsys.readouterr().out
    assert '"crs"' not in (tmp_path / "out" / "photo_png_polygons.geojson").read_text()


# --------------------------------------------------------------------------- the folder layer

def two_tiles(folder):
    """One scene cut into two GeoTIFFs side by side: right.tif's left edge is left.tif's right edge."""
    image = geo_image(48, 80)
    write_geotiff(folder / "left.tif", image[:, :40], nodata=0)
    write_geotiff(folder / "right.tif", image[:, 40:], nodata=0, x0=500000.0 + 40 * PIXEL)


def test_adjacent_geotiffs_make_one_layer_merged_across_the_seam(ckpt_path, tmp_path, capsys):
    two_tiles(tmp_path / "in")
    out = tmp_path / "out"
    assert run(ckpt_path, tmp_path / "in", out, "--vector", "gpkg", "--index") == 0
    log = capsys.readouterr().out
    assert pyogrio.list_layers(out / "polygons.gpkg")[:, 0].tolist() == ["polygons"]
    meta, geoms, columns = read_polygons(out / "polygons.gpkg")
    assert pyproj.CRS.from_user_input(meta["crs"]) == pyproj.CRS.from_user_input(UTM)
    assert meta["fields"].tolist() == ["class_index", "class", "area", "images"]
    across = columns["images"] == "left.tif, right.tif"
    assert across.any() and set(columns["images"]) == {"left.tif", "right.tif", "left.tif, right.tif"}
    assert f"{len(geoms)} polygons of 2 images in one layer, {across.sum()} of them merged across image seams" in log
    pieces = [read_polygons(out / f"{n}_tif_polygons.gpkg")[1] for n in ("left", "right")]
    assert len(geoms) <= sum(map(len, pieces)) - across.sum()  # each merged polygon was two pieces or more
    assert shapely.area(geoms).sum() == pytest.approx(sum(shapely.area(p).sum() for p in pieces))
    for name in ("left", "right"):  # the layer over each image gives its mask, exactly
        mask = index_mask(out / f"{name}_tif_mask.index.png")
        with rasterio.open(tmp_path / "in" / f"{name}.tif") as ds:
            assert np.array_equal(burn(geoms, columns["class_index"].tolist(), mask.shape, ds.transform), mask)


def canonical(geoms, columns):
    return sorted((c, i, g.bounds, g.area) for c, i, g in zip(columns["class_index"].tolist(),
                                                               columns["images"].tolist(), geoms))


def test_the_layer_holds_the_images_of_earlier_runs(ckpt_path, tmp_path):
    two_tiles(tmp_path / "in")
    assert run(ckpt_path, tmp_path / "in", tmp_path / "together", "--vector", "gpkg") == 0
    for name in ("left.tif", "right.tif"):  # one image per run into one folder
        assert run(ckpt_path, tmp_path / "in" / name, tmp_path / "apart", "--vector", "gpkg") == 0
    together = canonical(*read_polygons(tmp_path / "together" / "polygons.gpkg")[1:])
    assert canonical(*read_polygons(tmp_path / "apart" / "polygons.gpkg")[1:]) == together


def test_images_in_two_crs_are_refused_before_any_work(ckpt_path, tmp_path, capsys):
    write_geotiff(tmp_path / "in" / "a.tif", geo_image())
    write_geotiff(tmp_path / "in" / "b.tif", geo_image(), crs="EPSG:32617")
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", "--vector", "gpkg") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the images are in 2 CRSs (EPSG:32616: a.tif; EPSG:32617: b.tif)")
    assert "--output" in err and not list((tmp_path / "out").iterdir())


def test_an_image_without_crs_stays_out_of_the_layer(ckpt_path, tmp_path, capsys):
    write_geotiff(tmp_path / "in" / "scene.tif", geo_image())
    Image.fromarray(smooth_image(30, 26, seed=3)).save(tmp_path / "in" / "photo.png")
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", "--vector", "gpkg") == 0
    assert "photo_png_polygons.gpkg: left out of polygons.gpkg: no CRS" in capsys.readouterr().out
    assert set(read_polygons(tmp_path / "out" / "polygons.gpkg")[2]["images"]) == {"scene.tif"}
    assert read_polygons(tmp_path / "out" / "photo_png_polygons.gpkg")[0]["crs"] is None  # its own, in pixels


def test_background_gets_no_polygons_unless_asked(tmp_path, capsys):
    names = ("background",) + CLASSES[1:]
    ckpt = steep_checkpoint(tmp_path / "bg.pth", ClassSpec(names=names, palette=PALETTE))
    write_geotiff(tmp_path / "in" / "scene.tif", geo_image())
    assert run(ckpt, tmp_path / "in", tmp_path / "auto", "--vector", "gpkg", "--index") == 0
    assert "the background class 'background' gets none (--background none writes it)" in capsys.readouterr().out
    mask = index_mask(tmp_path / "auto" / "scene_tif_mask.index.png")
    assert (mask == 0).any()
    for layer in ("scene_tif_polygons.gpkg", "polygons.gpkg"):
        assert 0 not in read_polygons(tmp_path / "auto" / layer)[2]["class_index"].tolist()
    background = [r for r in area_table(tmp_path / "auto" / "areas.csv") if r["class"] == "background"]
    assert int(background[0]["pixels"]) == (mask == 0).sum()  # the areas count every class
    assert run(ckpt, tmp_path / "in", tmp_path / "none", "--vector", "gpkg", "--background", "none") == 0
    _, geoms, columns = read_polygons(tmp_path / "none" / "polygons.gpkg")
    with rasterio.open(tmp_path / "in" / "scene.tif") as ds:
        assert np.array_equal(burn(geoms, columns["class_index"].tolist(), mask.shape, ds.transform), mask)


# --------------------------------------------------------------------------- areas

def test_area_table_counts_the_mask_in_pixels_m2_and_ha(ckpt_path, tmp_path):
    write_geotiff(tmp_path / "in" / "a.tif", geo_image(), nodata=0)
    write_geotiff(tmp_path / "in" / "b.tif", geo_image(40, 36, seed=2))
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", "--areas", "--index") == 0
    assert not list((tmp_path / "out").glob("*_polygons.*"))  # --areas alone: the table only
    rows = area_table(tmp_path / "out" / "areas.csv")
    assert [r["image"] for r in rows] == ["a.tif"] * 6 + ["b.tif"] * 6 + ["TOTAL"] * 6
    total = np.zeros(6, np.int64)
    for name in ("a", "b"):
        counts = np.bincount(index_mask(tmp_path / "out" / f"{name}_tif_mask.index.png").ravel(), minlength=256)[:6]
        mine = [r for r in rows if r["image"] == f"{name}.tif"]
        assert [r["class"] for r in mine] == list(CLASSES)
        assert [int(r["pixels"]) for r in mine] == counts.tolist()
        assert [float(r["m2"]) for r in mine] == (counts * PIXEL * PIXEL).tolist()
        assert [float(r["ha"]) for r in mine] == pytest.approx((counts * PIXEL * PIXEL / 1e4).tolist())
        total += counts
    totals = [r for r in rows if r["image"] == "TOTAL"]
    assert [int(r["pixels"]) for r in totals] == total.tolist() and total.sum() > 0
    assert [float(r["m2"]) for r in totals] == (total * 0.25).tolist()


def test_area_table_keeps_the_rows_of_other_images(ckpt_path, tmp_path):
    write_geotiff(tmp_path / "in" / "a.tif", geo_image(), nodata=0)
    write_geotiff(tmp_path / "in" / "b.tif", geo_image(seed=2))
    assert run(ckpt_path, tmp_path / "in" / "a.tif", tmp_path / "out", "--areas") == 0
    first = [r for r in area_table(tmp_path / "out" / "areas.csv") if r["image"] == "a.tif"]
    assert run(ckpt_path, tmp_path / "in" / "b.tif", tmp_path / "out", "--areas") == 0
    rows = area_table(tmp_path / "out" / "areas.csv")
    assert [r for r in rows if r["image"] == "a.tif"] == first
    assert {r["image"] for r in rows} == {"a.tif", "b.tif", "TOTAL"}


def test_ctrl_c_keeps_the_areas_of_the_images_done(ckpt_path, tmp_path, monkeypatch):
    for i in range(3):
        write_geotiff(tmp_path / "in" / f"t{i}.tif", geo_image(seed=i))
    ctrl_c_on_second_image(monkeypatch)
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", "--vector", "gpkg", "--no-pipeline") == 130
    assert {r["image"] for r in area_table(tmp_path / "out" / "areas.csv")} == {"t0.tif", "TOTAL"}
    assert not (tmp_path / "out" / "polygons.gpkg").exists()  # the folder layer waits for a run that ends


def test_areas_md_says_pixel_counts_and_points_to_the_estimates(ckpt_path, tmp_path, capsys):
    write_geotiff(tmp_path / "in" / "a.tif", geo_image())
    out = tmp_path / "out"
    assert run(ckpt_path, tmp_path / "in", out, "--areas") == 0
    log = capsys.readouterr().out
    assert "pixel counts of the map, not area estimates (areas.md)" in log and "python assess.py" in log
    notes = (out / "areas.md").read_text()
    assert "counts the pixels of the map" in notes and "docs/assessment.md" in notes
    (out / "assessment_estimates.csv").write_text("class,area_ha\n")  # as assess.py estimate writes it here
    assert run(ckpt_path, tmp_path / "in", out, "--areas", "--skip-existing") == 0
    assert f"error-adjusted areas: {out / 'assessment_estimates.csv'}" in capsys.readouterr().out
    assert "`assessment_estimates.csv`" in (out / "areas.md").read_text()


def test_an_area_table_of_another_kind_is_refused_before_any_work(ckpt_path, tmp_path, capsys):
    write_geotiff(tmp_path / "in" / "a.tif", geo_image())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "areas.csv").write_text("parcel,hectares\n1,2.5\n")
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", "--vector", "gpkg") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "areas.csv" in err
    assert (tmp_path / "out" / "areas.csv").read_text() == "parcel,hectares\n1,2.5\n"
    assert not list((tmp_path / "out").glob("*_mask.*"))


# --------------------------------------------------------------------------- streamed

@pytest.mark.slow
def test_a_streamed_run_gives_the_whole_image_polygons_and_areas(ckpt_path, tmp_path, monkeypatch):
    write_geotiff(tmp_path / "in" / "scene.tif", geo_image(70, 44), nodata=0)
    assert run(ckpt_path, tmp_path / "in", tmp_path / "whole", "--vector", "gpkg") == 0
    calls = []
    real = infer.predict_streamed
    monkeypatch.setattr(infer, "predict_streamed", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(infer, "STREAM_PIXELS", 0)  # every TIFF read by rows is streamed
    monkeypatch.setattr(predict, "STREAM_CHUNK_BYTES", 2000)  # in windows of a few rows
    monkeypatch.setattr(vector, "VECTOR_ROWS", 9)  # polygonised in blocks of 9 rows: seams to merge
    assert run(ckpt_path, tmp_path / "in", tmp_path / "streamed", "--vector", "gpkg") == 0
    assert calls == [1]
    assert area_table(tmp_path / "streamed" / "areas.csv") == area_table(tmp_path / "whole" / "areas.csv")
    _, whole, wc = read_polygons(tmp_path / "whole" / "scene_tif_polygons.gpkg")
    _, streamed, sc = read_polygons(tmp_path / "streamed" / "scene_tif_polygons.gpkg")

    def canonical(geoms, classes):
        return sorted((c, g.bounds, g.area, g) for c, g in zip(classes.tolist(), shapely.normalize(geoms)))

    left, right = canonical(whole, wc["class_index"]), canonical(streamed, sc["class_index"])
    assert len(left) == len(right) > 10
    assert all(a[:3] == b[:3] and a[3].equals(b[3]) for a, b in zip(left, right))


def test_blocks_regroup_bands_whatever_their_size():
    mask = np.arange(23 * 3, dtype=np.uint8).reshape(23, 3)
    bands = [(0, 4, mask[:4]), (4, 5, mask[4:5]), (5, 23, mask[5:])]
    blocks = list(vector._blocks(bands, 7))
    assert [(y0, y1) for y0, y1, _ in blocks] == [(0, 7), (7, 14), (14, 21), (21, 23)]
    assert np.array_equal(np.concatenate([b for _, _, b in blocks]), mask)
    assert [(y0, y1) for y0, y1, _ in vector._blocks([(0, 23, mask)], 7)] == [(y0, y1) for y0, y1, _ in blocks]


# --------------------------------------------------------------------------- arguments, --skip-existing

@pytest.mark.parametrize("extra, match", [
    (["--vector", "shp"], "--vector"),
    (["--vector", "gpkg", "--min-area", "-1"], "--min-area"),
    (["--vector", "gpkg", "--simplify", "nan"], "--simplify"),
    (["--min-area", "2"], "add --vector"),
    (["--background", "none"], "add --vector"),
    (["--vector", "gpkg", "--background", "sky"], "'sky' is no class"),
])
def test_bad_vector_arguments_exit_2_before_any_work(ckpt_path, tmp_path, capsys, extra, match):
    write_geotiff(tmp_path / "in" / "a.tif", geo_image())
    try:
        code = run(ckpt_path, tmp_path / "in", tmp_path / "out", *extra)
    except SystemExit as e:  # argparse's own check of a choice
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error: " in err and match in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_skip_existing_writes_the_polygons_not_asked_before(ckpt_path, tmp_path, capsys):
    write_geotiff(tmp_path / "in" / "a.tif", geo_image(), nodata=0)
    out = tmp_path / "out"
    assert run(ckpt_path, tmp_path / "in", out) == 0  # masks, no polygons
    capsys.readouterr()
    assert run(ckpt_path, tmp_path / "in", out, "--skip-existing", "--vector", "gpkg") == 0
    assert "1 images done, 0 skipped" in capsys.readouterr().out  # polygons asked: not skipped
    polygons = out / "a_tif_polygons.gpkg"
    assert polygons.is_file() and [r["image"] for r in area_table(out / "areas.csv")][0] == "a.tif"
    inode = polygons.stat().st_ino
    assert run(ckpt_path, tmp_path / "in", out, "--skip-existing", "--vector", "gpkg") == 0
    printed = capsys.readouterr().out
    assert "0 images done, 1 skipped" in printed and "class areas of 1 images (0 from this run)" in printed
    assert polygons.stat().st_ino == inode  # kept, not written again
    (out / "areas.csv").unlink()  # its area rows are asked too
    assert run(ckpt_path, tmp_path / "in", out, "--skip-existing", "--vector", "gpkg") == 0
    assert "1 images done, 0 skipped" in capsys.readouterr().out
    assert {r["image"] for r in area_table(out / "areas.csv")} == {"a.tif", "TOTAL"}


def test_the_polygons_path_is_checked_against_the_inputs(ckpt_path, tmp_path):
    tif = write_geotiff(tmp_path / "in" / "a.tif", geo_image())
    _, ckpt = load_model(ckpt_path, "cpu")
    with pytest.raises(RasterError, match="refusing to write .*a_tif_polygons.gpkg"):
        infer._read_file(tif, tmp_path / "in", ckpt.spec, infer.InferOptions(vector="gpkg"),
                         protect=[tmp_path / "in" / "a_tif_polygons.gpkg"])
