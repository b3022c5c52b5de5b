"""assess.py: a blind sample drawn from a map, labelled in the layer, read back by the click reader, estimated;
assessment points never train a model."""

import csv
import json

import numpy as np
import pyogrio
import pytest
import rasterio
from PIL import Image, PngImagePlugin
from rasterio.transform import Affine

import assess
from annotations import read_clicks
from spec import IGNORE_INDEX, ClassSpec, default_palette

CLASSES = ClassSpec(names=("background", "building"), palette=default_palette(2), label_format="index")
UTM, RES = "EPSG:32616", 0.5


def scene(tmp_path, georeferenced=True):
    """Two 40x40 images side by side, the truth (a building block in each), a map that overstates the buildings
    (a wide halo of false building around each), nodata in a corner of the first; the masks as infer.py writes
    them (palette PNG, 255 nodata, `Source` naming the input)."""
    images, masks = tmp_path / "images", tmp_path / "maps"
    images.mkdir()
    masks.mkdir()
    truth, mapped = {}, {}
    for k, left in enumerate((500000.0, 500020.0)):
        name = f"tile{k}.tif" if georeferenced else f"tile{k}.png"
        t = np.zeros((40, 40), np.uint8)
        t[10:20, 10 + 5 * k:22 + 5 * k] = 1
        m = t.copy()
        m[5:28, 5:30] = 1  # false buildings: the map says 575 of 1600 pixels, the truth 120
        m[20:25, 12:14] = 0  # and a few missed ones
        if k == 0:
            m[:4, :4] = IGNORE_INDEX  # nodata
        if georeferenced:
            with rasterio.open(images / name, "w", driver="GTiff", height=40, width=40, count=3, dtype="uint8",
                               crs=UTM, transform=Affine(RES, 0, left, 0, -RES, 4000000.0)) as ds:
                ds.write(np.full((3, 40, 40), 90, np.uint8))
        else:
            Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(images / name)
        info = PngImagePlugin.PngInfo()
        info.add_text("Source", name)
        Image.fromarray(m).save(masks / f"{name.replace('.', '_')}_mask.png", pnginfo=info)
        truth[name.split(".")[0]], mapped[name.split(".")[0]] = t, m
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES.to_dict()))
    return images, masks, truth, mapped


def run(*argv):
    return assess.main(assess.get_args_parser().parse_args([str(a) for a in argv]))


def label_all(a, truth):
    """The person: each point's class from the truth, one at a time as the page saves them."""
    for p in a.points():
        a.set_reference(p["id"], int(truth[p["image"]][p["row"], p["col"]]))


def test_the_sample_is_blind_avoids_clicks_and_nodata_and_its_labels_come_back(tmp_path):
    images, masks, truth, mapped = scene(tmp_path)
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("image,x,y,class\ntile0.tif,15,12,building\ntile0.tif,30,35,background\n"
                      "tile1.tif,18,14,building\n")
    out = tmp_path / "s.gpkg"
    assert run("sample", "--images", images, "--masks", masks, "--classes", tmp_path / "classes.json", "--clicks",
               clicks, "--n", 80, "--floor", 20, "--seed", 3, "--out", out) == 0
    info = pyogrio.read_info(out)
    assert set(info["fields"]) == {"image", "id", "reference"} and "32616" in info["crs"]  # nothing of the map
    design = json.loads(assess.design_path(out).read_text())
    pts = design["points"]
    assert len(pts) == 80 and sorted(p["id"] for p in pts) == list(range(1, 81))
    per = {c: sum(p["stratum"] == c for p in pts) for c in (0, 1)}
    assert min(per.values()) >= 20  # the floor per map class
    taken = {(p["image"], p["row"], p["col"]) for p in pts}
    assert len(taken) == 80 and not taken & {("tile0", 12, 15), ("tile0", 35, 30), ("tile1", 14, 18)}
    assert all(mapped[p["image"]][p["row"], p["col"]] == p["map_class"] != IGNORE_INDEX for p in pts)
    assert design["pixel_area_m2"] == 0.25 and design["excluded_clicks"] == 3
    # the click reader reads the layer back: nothing labelled yet, every point counted as such
    got = read_clicks(out, images, CLASSES, class_field="reference", unlabelled=True, allow_empty=True)
    assert sum(len(c) for c in got.images.values()) == 0 and any("80 points have no class" in n for n in got.notes)
    a = assess.Assessment.open(out, images, CLASSES)
    first = [next(p for p in a.points() if p["stratum"] == 1)] + [p for p in a.points() if p["stratum"] == 0][:9]
    for p in first:  # one point of the building stratum, nine of the background
        a.set_reference(p["id"], int(truth[p["image"]][p["row"], p["col"]]))
    again = assess.Assessment.open(out, images, CLASSES)
    assert again.reference == a.reference and len(again.reference) == 10  # saved at once, read by read_clicks
    with pytest.raises(ValueError, match=r"10 of 80 points are labelled and the strata \{'building': 1\}"):
        again.estimates()


def test_the_estimates_see_what_the_map_overstates(tmp_path, capsys):
    """The analyst's case: a map that paints buildings over their surroundings. The held-out-click view cannot
    see it; a labelled probability sample does, and its interval covers the truth."""
    images, masks, truth, mapped = scene(tmp_path)
    out = tmp_path / "s.gpkg"
    assert run("sample", "--images", images, "--masks", masks, "--classes", tmp_path / "classes.json", "--n", 200,
               "--floor", 60, "--out", out) == 0
    label_all(assess.Assessment.open(out, images, CLASSES), truth)
    assert run("estimate", "--images", images, "--sample", out, "--classes", tmp_path / "classes.json") == 0
    rows = list(csv.DictReader(open(tmp_path / "s_estimates.csv")))
    area = next(r for r in rows if r["quantity"] == "area" and r["unit"] == "pixels"
                and r["reference_class"] == "building")
    valid = np.concatenate([(m != IGNORE_INDEX).ravel() for m in mapped.values()])
    true_building = sum(int(t.sum()) for t in truth.values())
    mapped_building = sum(int((m == 1).sum()) for m in mapped.values())
    assert mapped_building > 3 * true_building  # the map overstates the buildings ...
    assert float(area["ci95_low"]) <= true_building <= float(area["ci95_high"])  # ... the estimate does not
    assert float(area["ci95_high"]) < mapped_building
    ua = next(r for r in rows if r["quantity"] == "users_accuracy" and r["map_class"] == "building")
    assert float(ua["estimate"]) < 0.4  # most mapped building is not building
    md = (tmp_path / "s_estimates.md").read_text()
    assert "200 of the 200 points drawn are labelled" in md and "share of the map (pixel count)" in md
    assert f"{mapped_building / valid.sum():.4f}" in md  # the map's own share, beside the estimate
    assert "m²" in md and "ha" in md
    assert run("estimate", "--images", images, "--sample", out, "--classes", tmp_path / "classes.json") == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err  # earlier estimates are never replaced unasked


def test_a_csv_sample_over_plain_images_labelled_in_a_spreadsheet(tmp_path):
    images, masks, truth, _ = scene(tmp_path, georeferenced=False)
    out = tmp_path / "s.csv"
    assert run("sample", "--images", images, "--masks", masks, "--classes", tmp_path / "classes.json", "--n", 30,
               "--design", "simple", "--out", out) == 0
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["image", "x", "y", "id", "reference"] and all(r["reference"] == "" for r in rows)
    for r in rows:  # a person fills the column in a spreadsheet, by class name
        r["reference"] = CLASSES.names[truth[r["image"].split(".")[0]][int(r["y"]), int(r["x"])]]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    result = assess.Assessment.open(out, images, CLASSES).estimates()
    assert result.design == "simple" and result.n == 30 and 0 <= result.oa <= 1


def test_bad_arguments_stop_before_any_work(tmp_path, capsys):
    images, masks, _, _ = scene(tmp_path)
    base = ["sample", "--images", images, "--masks", masks]
    for argv, says in ((["--n", "1"], "--n must be >= 2"), (["--n", "50", "--floor", "1"], "--floor must be >= 2"),
                       (["--target-se", "2"], "--target-se must be in (0, 0.5)")):
        assert run(*base, *argv, "--out", tmp_path / "s.gpkg") == 2
        assert says in capsys.readouterr().err
    assert run(*base, "--n", 50, "--out", tmp_path / "s.shp") == 2
    assert "write the sample as .gpkg, .geojson or .csv" in capsys.readouterr().err
    assert not list(tmp_path.glob("s.*"))
    (tmp_path / "other").mkdir()
    assert run("sample", "--images", images, "--masks", tmp_path / "other", "--n", 50, "--out",
               tmp_path / "s.gpkg") == 2
    assert "holds no infer.py mask of 2 images" in capsys.readouterr().err
    good = [*base, "--n", 50, "--floor", 20, "--classes", tmp_path / "classes.json", "--out", tmp_path / "s.gpkg"]
    assert run(*good) == 0
    assert run(*good) == 2
    assert "exists (a sample, perhaps labelled already)" in capsys.readouterr().err  # labels are never lost


@pytest.mark.slow
def test_assessment_points_never_train_a_model(tmp_path):
    """A labelled sample given to train.py as clicks is refused before anything is written."""
    import subprocess
    import sys
    from pathlib import Path
    images, masks, truth, _ = scene(tmp_path)
    out = tmp_path / "s.gpkg"
    assert run("sample", "--images", images, "--masks", masks, "--classes", tmp_path / "classes.json", "--n", 40,
               "--floor", 10, "--out", out) == 0
    label_all(assess.Assessment.open(out, images, CLASSES), truth)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "train.py", "--images", str(images), "--clicks", str(out), "--classes",
                           str(tmp_path / "classes.json"), "--class-field", "reference", "--no-pretrained", "--arch",
                           "tiny", "--out", str(tmp_path / "run")], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 2 and "is an assessment sample" in proc.stderr
    assert not (tmp_path / "run").exists()
