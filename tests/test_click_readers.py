"""The click readers under careless or hostile input: every malformed file is a one-line ValueError that starts
with the file and names the place (line, task, shape); nothing is matched to the wrong image or dropped unsaid."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import shapely

from annotations import POINT, ClickSet, ImageClicks, read_clicks, write_clicks
from raster import image_refs
from tests.conftest import CLICK_CLASSES, geotiff, nodata_geotiff, pixels, pngs, write_layer, write_patches

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- nothing left: allow_empty

def test_a_file_whose_every_click_is_on_nodata_reads_empty_when_allowed(tmp_path):
    folder = tmp_path / "nd"
    nodata_geotiff(folder)
    geotiff(folder / "b.tif", nodata=0)
    path = tmp_path / "clicks.csv"
    path.write_text("image,x,y,class\na.tif,2,3,road\n")
    with pytest.raises(ValueError, match=r"clicks\.csv: no click falls on a valid pixel"):
        read_clicks(path, folder, CLICK_CLASSES)
    clicks = read_clicks(path, folder, CLICK_CLASSES, allow_empty=True)
    assert len(clicks) == 0 and set(clicks.images) == {"a", "b"}
    assert all(len(c) == 0 for c in clicks.images.values())
    assert any("1 clicked pixels lie on nodata" in n for n in clicks.notes)
    assert any("no click falls on a valid pixel" in n for n in clicks.notes)
    path.write_text("image,x,y,class\na.tif,2,3,road\na.tif,20,20,tree\n")  # one valid click: read as ever
    clicks = read_clicks(path, folder, CLICK_CLASSES, allow_empty=True)
    assert pixels(clicks.images["a"]) == {(20, 20): 2}
    assert not any("no click falls" in n for n in clicks.notes)


# --------------------------------------------------------------------------- image names as written

@pytest.mark.parametrize("suffix", [".csv", ".geojson"])
def test_percent_signs_in_image_names_stay_on_their_own_image(tmp_path, suffix):
    folder = pngs(tmp_path, names=("a b", "a%20b", "%2e%2e"))
    refs = image_refs(folder)
    at = {"a b": (1, 2, 0), "a%20b": (5, 6, 1), "%2e%2e": (7, 8, 2)}  # (row, col, class) of each image's click
    clicks = ClickSet({r.name: ImageClicks(r, [at[r.name][0]], [at[r.name][1]], [at[r.name][2]], POINT)
                       for r in refs}, CLICK_CLASSES)
    back = read_clicks(write_clicks(tmp_path / f"clicks{suffix}", clicks), folder, CLICK_CLASSES)
    assert {n: pixels(c) for n, c in back.images.items()} == {n: {(r, k): v} for n, (r, k, v) in at.items()}


def test_label_studio_urls_are_still_decoded(tmp_path):
    folder = pngs(tmp_path, names=("a b", "tile"))
    tasks = [{"data": {"image": url}, "annotations": [{"result": [
        {"type": "keypointlabels", "value": {"x": 50, "y": 50, "keypointlabels": ["tree"]}}]}]}
        for url in ("/data/local-files/?d=images/a%20b.png", "http://ls:8080/data/upload/3/1a2b3c4d-tile.png?x=1")]
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(tasks))
    clicks = read_clicks(path, folder, CLICK_CLASSES)
    assert pixels(clicks.images["a b"]) == {(15, 20): 2} and pixels(clicks.images["tile"]) == {(15, 20): 2}


# --------------------------------------------------------------------------- a pixel layer's image field

@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_a_pixel_layer_over_one_image_uses_its_image_field(tmp_path):
    folder = pngs(tmp_path, names=("img0",))
    pts = [shapely.Point(3.5, 4.5), shapely.Point(5.5, 6.5), shapely.Point(7.5, 8.5)]
    good = write_layer(tmp_path / "good.gpkg", pts[:1], ["road"], crs=None, extra={"image": ["img0.png"]})
    assert pixels(read_clicks(good, folder, CLICK_CLASSES).images["img0"]) == {(4, 3): 0}
    layer = write_layer(tmp_path / "l.gpkg", pts, ["road", "tree", "road"], crs=None,
                        extra={"image": ["img0.png", "img1.png", "nope"]})
    with pytest.raises(FileNotFoundError) as got:
        read_clicks(layer, folder, CLICK_CLASSES)
    path = tmp_path / "l.csv"
    path.write_text("image,x,y,class\nimg0.png,3,4,road\nimg1.png,5,6,tree\nnope,7,8,road\n")
    with pytest.raises(FileNotFoundError) as same:
        read_clicks(path, folder, CLICK_CLASSES)  # the CSV reader's words
    assert "['img1.png', 'nope']" in str(got.value)
    assert str(got.value).replace(str(layer), "X") == str(same.value).replace(str(path), "X")


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_a_pixel_layer_over_several_images_names_the_unknown_ones(tmp_path):
    folder = pngs(tmp_path, names=("img0", "img1"))
    pts = [shapely.Point(3.5, 4.5), shapely.Point(5.5, 6.5), shapely.Point(7.5, 8.5)]
    layer = write_layer(tmp_path / "l.gpkg", pts, ["road", "tree", "road"], crs=None,
                        extra={"image": ["img0", "img1.png", "nope"]})
    with pytest.raises(FileNotFoundError, match=r"l\.gpkg names images that are not among the 2 images .*\['nope'\]"):
        read_clicks(layer, folder, CLICK_CLASSES)
    ok = write_layer(tmp_path / "ok.gpkg", pts[:2], ["road", "tree"], crs=None, extra={"image": ["img0", "img1.png"]})
    clicks = read_clicks(ok, folder, CLICK_CLASSES)
    assert pixels(clicks.images["img0"]) == {(4, 3): 0} and pixels(clicks.images["img1"]) == {(6, 5): 2}


# --------------------------------------------------------------------------- malformed files: one located line

def label_studio(*results, top=None):
    """A Label Studio export of one task on tile_a.png with these results (or `top` as the whole file)."""
    return json.dumps([{"id": 7, "data": {"image": "/data/upload/3/1a2b3c4d-tile_a.png"},
                        "annotations": [{"result": list(results)}]}] if top is None else top)


def keypoint(**value):
    return {"type": "keypointlabels", "value": {"keypointlabels": ["road"], **value}}


def polygon(points):
    return {"type": "polygonlabels", "value": {"polygonlabels": ["road"], "points": points}}


def cvat(shape, width="40"):
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version>\n'
            f'<image id="0" name="tile_a.png" width="{width}" height="30">\n'
            f'<points label="tree" points="1,1"/>\n{shape}\n</image></annotations>\n')


MALFORMED = [
    ("short.csv", "image,x,y,class\ntile_a.png,5,3,road\ntile_a,5\n", r"line 3 has 2 fields, the header 4"),
    ("text.csv", "image,x,y,class\ntile_a.png,5,3,road\n\ntile_a.png,five,3,road\n",
     r"line 4: x \(pixels\) must be a number, got 'five'"),
    ("latin1.csv", "image,x,y,class\ntile_a.png,5,3,road\ntile_a.png,6,3,forêt\n".encode("latin-1"),
     r"line 3 is not UTF-8 text .*save the file as UTF-8"),
    ("no_x.json", label_studio(keypoint(y=10)),
     r"task 1 \(id 7\) result 1: x \(percent\) must be a number, got nothing"),
    ("strings.json", label_studio(top=["tile_a.png", "tile_b.png"]), r"task 1 is not laid out as Label Studio"),
    ("number.json", label_studio(top=5), r"holds 5, not a list of tasks"),
    ("string_x.json", label_studio(keypoint(x="10", y=10)),
     r"task 1 \(id 7\) result 1: x \(percent\) must be a number, got the text '10'"),
    ("no_points.json", label_studio(keypoint(x=10, y=10), polygon([])),
     r"task 1 \(id 7\) result 2: a polygon needs 3 or more vertices, has 0"),
    ("two_points.json", label_studio(polygon([[10, 10], [50, 50]])),
     r"task 1 \(id 7\) result 1: a polygon needs 3 or more vertices, has 2"),
    ("empty_line.xml", cvat('<polyline label="road" points=""/>'),
     r"image tile_a\.png shape 2 <polyline>: a polyline needs 1 or more vertices, has 0"),
    ("box.xml", cvat('<box label="road" xtl="1" ytl="1" ybr="5"/>'),
     r"image tile_a\.png shape 2 <box>: xbr must be a number, got nothing"),
    ("letters.xml", cvat('<points label="road" points="a,b"/>'),
     r"image tile_a\.png shape 2 <points>: x must be a number, got 'a'"),
    ("one_number.xml", cvat('<points label="road" points="7"/>'),
     r"image tile_a\.png shape 2 <points>: a vertex must be a pair x, y, got \['7'\]"),
    ("width.xml", cvat("", width="abc"), r"image tile_a\.png: width must be a number, got 'abc'"),
    ("two_points.xml", cvat('<polygon label="road" points="1,1;5,5"/>'),
     r"image tile_a\.png shape 2 <polygon>: a polygon needs 3 or more vertices, has 2"),
    ("broken.geojson", json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"class": "road"}, "geometry": {"type": "Point", "coordinates": [1, 1]}},
        {"type": "Feature", "properties": {"class": "road"},
         "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [5, 5]]]}}]}),
     r"features \[2\] \(counted from 1\) hold geometries that cannot be read"),
]


@pytest.mark.filterwarnings("ignore:Non closed ring detected")
@pytest.mark.parametrize("name, content, place", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_file_is_one_line_that_names_the_file_and_the_place(tmp_path, name, content, place):
    folder = pngs(tmp_path)
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as got:
        read_clicks(path, folder, CLICK_CLASSES)
    message = str(got.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(place, message), message


def test_a_polyline_of_one_vertex_is_a_click_on_its_pixel(tmp_path):
    path = tmp_path / "dot.xml"
    path.write_text(cvat('<polyline label="road" points="5.5,3.2"/>'))
    assert pixels(read_clicks(path, pngs(tmp_path), CLICK_CLASSES).images["tile_a"]) == {(1, 1): 2, (3, 5): 0}


@pytest.mark.slow
def test_train_exits_2_with_one_line_naming_a_malformed_click_file(tmp_path):
    images = tmp_path / "patches"
    write_patches(images, n=2, size=(32, 32))
    bad = tmp_path / "bad.csv"
    bad.write_text("image,x,y,class\nImage_0.tif,5,3,impervious_surfaces\nImage_1.tif,5\n")
    run = subprocess.run([sys.executable, "train.py", "--images", str(images / "Images"), "--clicks", str(bad),
                          "--no-pretrained", "--arch", "tiny", "--out", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(f"error: {bad}: line 3 has 2 fields") and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "out").exists()
