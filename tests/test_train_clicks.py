"""train.py --clicks: a person's clicks in (CSV, GeoPackage), with dense labels or without any, validation on
held-out clicks, --export-clicks, and bad input refused before anything is written."""

import csv
import json
import math

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from annotations import read_clicks
from checkpoint import read_checkpoint
from config import annotation_of, check_config
from spec import IGNORE_INDEX, POTSDAM
from tests.conftest import cfg_for
from train import build_datasets, get_args_parser, main, train


def click_rows(labels, per_class=4, seed=0, shift=0, skip=()):
    """CSV rows image,x,y,class: `per_class` random labelled pixels of every class in each patch label; the class
    written is (true class + shift) % 6; classes in `skip` get no click."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, lab in enumerate(labels):
        for c in np.unique(lab[lab != IGNORE_INDEX]):
            if c in skip:
                continue
            ys, xs = np.nonzero(lab == c)
            for j in rng.choice(ys.size, size=min(per_class, ys.size), replace=False):
                rows.append([f"Image_{i}.tif", int(xs[j]), int(ys[j]), POTSDAM.names[(c + shift) % 6]])
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x", "y", "class"])
        w.writerows(rows)
    return path


@pytest.fixture
def clicked(data, data_labels, tmp_path):
    """Eight 48x48 patches (tmp/patches, dense labels in Labels/) and a CSV of clicks on every one of them."""
    return data, data_labels, write_csv(tmp_path / "clicks.csv", click_rows(data_labels))


def no_labels(root, tmp_path, clicks, **kw):
    """A run on the images alone (no label folder) and the clicks."""
    return cfg_for(root, tmp_path, images=str(root / "Images"), clicks=str(clicks), train_ids=None, val_ids=None,
                   **kw)


@pytest.mark.slow
def test_without_labels_it_validates_on_held_out_clicks_with_intervals(clicked, tmp_path, capsys):
    root, labels, clicks = clicked
    cfg = no_labels(root, tmp_path, clicks, figures=True)
    train_ds, val_ds, how, _ = build_datasets(cfg)
    assert not set(train_ds.ids) & set(val_ds.ids) and len(val_ds) >= 1  # 8 clicked images: whole images held out
    assert "held-out clicks" in how and not val_ds.has_labels
    assert all((val_ds.dense_label(i) == IGNORE_INDEX).all() for i in range(len(val_ds)))  # nothing dense scores
    history = train(cfg)
    out = capsys.readouterr().out
    for h in history:
        assert h["val_kind"] == "held-out clicks" and "val_mf1" not in h and h["val_clicks"] > 0
        lo, hi = h["val_miou_ci"]
        assert 0 <= lo <= h["val_miou"] <= hi <= 1
        lo, hi = h["val_oa_ci"]
        assert 0 <= lo <= h["val_oa"] <= hi <= 1
        assert set(h["val_recall"]) == set(POTSDAM.names) and set(h["val_recall_ci"]) == set(POTSDAM.names)
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 2 and all("held-out clicks" in line and "(dense)" not in line for line in epoch_lines)
    ck = read_checkpoint(tmp_path / "ck" / "best_model.pth")
    best = max(history, key=lambda h: h["val_miou"])
    assert ck.metrics["kind"] == "held-out clicks" and ck.metrics["miou"] == pytest.approx(best["val_miou"])
    assert ck.config["clicks"] == str(clicks) and ck.config["labels"] is None
    assert json.loads((tmp_path / "ck" / "history.json").read_text())[0]["val_kind"] == "held-out clicks"
    assert (tmp_path / "ck" / "output.png").stat().st_size > 0


def test_with_dense_labels_the_clicks_train_and_the_labels_validate(clicked, tmp_path):
    root, labels, _ = clicked
    shifted = write_csv(tmp_path / "shifted.csv", click_rows(labels, shift=1))  # every click names another class
    cfg = cfg_for(root, tmp_path, clicks=str(shifted), epochs=1)
    train_ds, val_ds, _, _ = build_datasets(cfg)
    given = read_clicks(shifted, sorted((root / "Images").glob("*.tif")), POTSDAM)
    for i in range(len(train_ds)):
        c = given.images[f"Image_{train_ds.ids[i]}"]
        # the clicks' classes, not the label's
        assert np.array_equal(train_ds.point_grid(i), c.grid(train_ds.spec.scale))
    assert val_ds.has_labels and val_ds.given_clicks(0) is None
    history = train(cfg)
    assert "val_mf1" in history[0] and "val_kind" not in history[0]  # dense metrics, as without clicks


@pytest.mark.parametrize("suffix", [".csv", ".gpkg"])
def test_exported_simulated_clicks_read_back_as_the_same_grids(data, tmp_path, suffix):
    path = tmp_path / f"exported{suffix}"
    simulated = cfg_for(data, tmp_path, points=30, epochs=1, export_clicks=str(path))
    train(simulated)
    assert path.is_file()
    a, _, _, _ = build_datasets(simulated)
    b, _, _, _ = build_datasets(cfg_for(data, tmp_path, clicks=str(path)))
    assert all(b.given_clicks(i) is not None for i in range(len(b)))
    for i in range(len(a)):
        assert np.array_equal(a.click_grid(i), b.click_grid(i))
        assert np.array_equal(a.click_pixels(i), b.click_pixels(i))


def test_self_training_and_region_growing_run_on_clicks_without_labels(clicked, tmp_path, capsys):
    root, _, clicks = clicked
    cfg = no_labels(root, tmp_path, clicks, epochs=2, points=None, self_training=1, region_growing=True,
                    pseudo_threshold=0.2)
    check_config(cfg)  # points dense, but the clicks are a fixed annotation
    history = train(cfg)
    out = capsys.readouterr().out
    assert len(history) == 2 and "no dense labels to check them" in out
    grown = float(out.split("superpixels label ")[1].split("%")[0])
    assert grown > 0  # grown labels are kept although no dense label says where pixels are defined
    pseudo = out.split("self-training round 1/1")[1]
    assert "pixels (0)" not in pseudo


def test_model_chosen_rounds_need_dense_labels(clicked, tmp_path, capsys):
    root, _, clicks = clicked
    with pytest.raises(ValueError, match="--rounds reveals the class .* dense labels"):
        check_config(no_labels(root, tmp_path, clicks, epochs=3, rounds=1))
    check_config(cfg_for(root, tmp_path, clicks=str(clicks), epochs=3, rounds=1))  # with labels: allowed
    out = tmp_path / "refused"
    code = main(get_args_parser().parse_args(["--images", str(root / "Images"), "--clicks", str(clicks),
                                              "--rounds", "1", "--epochs", "3", "--out", str(out)]))
    assert code == 2 and "error: --rounds" in capsys.readouterr().err and not out.exists()


def test_a_class_without_click_is_refused_unless_allowed(clicked, tmp_path, capsys):
    root, labels, _ = clicked
    partial = write_csv(tmp_path / "partial.csv", click_rows(labels, skip=(5,)))
    with pytest.raises(ValueError, match=r"\['clutter'\] have no click .*'clutter': 0"):
        train(no_labels(root, tmp_path, partial))
    assert not (tmp_path / "ck").exists()  # refused before anything is written
    history = train(no_labels(root, tmp_path, partial, epochs=1, allow_unclicked=True))
    assert len(history) == 1 and "training without them (--allow-unclicked)" in capsys.readouterr().out


def test_bad_click_files_exit_2_before_anything_is_written(clicked, tmp_path, capsys):
    root, labels, _ = clicked
    bad = write_csv(tmp_path / "bad.csv", [["Image_0.tif", 3, 4, "lava"]])
    for clicks, says in ((tmp_path / "nowhere.csv", "not found"), (bad, "'lava'")):
        out = tmp_path / "out"
        code = main(get_args_parser().parse_args(["--images", str(root / "Images"), "--clicks", str(clicks),
                                                  "--arch", "tiny", "--no-pretrained", "--out", str(out)]))
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and says in err
        assert not out.exists()
    with pytest.raises(ValueError, match="--images and --labels folders, or --clicks"):
        check_config(cfg_for(root, tmp_path, images=str(root / "Images"), train_ids=None, val_ids=None))


def test_the_resident_cache_key_follows_the_click_file_content(clicked, tmp_path):
    root, labels, clicks = clicked
    cfg = no_labels(root, tmp_path, clicks)
    before = annotation_of(cfg)
    write_csv(clicks, click_rows(labels, seed=1))  # edited in place: same path, other clicks
    assert annotation_of(cfg) != before and annotation_of(cfg)["clicks"] == str(clicks)
    assert "clicks" not in annotation_of(cfg_for(root, tmp_path))  # runs without clicks keep their caches


def test_a_georeferenced_geopackage_over_geotiffs_trains(tmp_path):
    """Six 32x32 GeoTIFFs (EPSG:32616, 0.5 m) side by side and a GeoPackage of points in map coordinates."""
    images = tmp_path / "tiles"
    images.mkdir()
    rng = np.random.default_rng(0)
    x0, y0, pixel, size = 733601.0, 3725139.0, 0.5, 32
    points, classes = [], []
    for t in range(6):
        left = x0 + t * size * pixel
        building = np.zeros((size, size), bool)
        building[8:20, 10:24] = True
        img = np.where(building, 200, 60).astype(np.uint8)[None] + rng.integers(0, 20, (3, size, size), np.uint8)
        with rasterio.open(images / f"tile_{t}.tif", "w", driver="GTiff", width=size, height=size, count=3,
                           dtype="uint8", crs="EPSG:32616", transform=from_origin(left, y0, pixel, pixel)) as ds:
            ds.write(img)
        for (r, c), name in (((14, 17), "building"), ((2, 2), "background"), ((28, 28), "background"),
                             ((12, 12), "building")):
            points.append(shapely.Point(left + (c + 0.5) * pixel, y0 - (r + 0.5) * pixel))
            classes.append(name)
    gpkg = tmp_path / "clicks.gpkg"
    pyogrio.raw.write(gpkg, shapely.to_wkb(np.array(points)), [np.array(classes, dtype=object)], ["class"],
                      driver="GPKG", geometry_type="Point", crs="EPSG:32616")
    class_file = tmp_path / "classes.json"
    class_file.write_text(json.dumps({"names": ["background", "building"], "palette": [[128, 128, 128], [255, 0, 0]]}))
    cfg = cfg_for(tmp_path, tmp_path, images=str(images), clicks=str(gpkg), classes=str(class_file), train_ids=None,
                  val_ids=None, export_clicks=str(tmp_path / "again.gpkg"))
    history = train(cfg)
    assert history[-1]["val_kind"] == "held-out clicks" and history[-1]["val_clicks"] == 8  # two whole tiles of 6
    assert math.isfinite(history[-1]["val_oa"])
    meta = pyogrio.read_info(tmp_path / "again.gpkg")  # the export stays in map coordinates
    assert "32616" in meta["crs"] and meta["features"] == 16  # the clicks of the 4 training tiles


def test_export_never_overwrites_the_click_file_or_an_earlier_export(tmp_path):
    from config import TrainConfig, check_config
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("image,x,y,class\n")
    with pytest.raises(ValueError, match="is the --clicks file this run reads"):
        check_config(TrainConfig(images=str(tmp_path), clicks=str(clicks), export_clicks=str(clicks), data=None))
    earlier = tmp_path / "export.csv"
    earlier.write_text("kept")
    with pytest.raises(ValueError, match="exists already"):
        check_config(TrainConfig(export_clicks=str(earlier)))
    check_config(TrainConfig(export_clicks=str(earlier), overwrite=True))
    assert earlier.read_text() == "kept"  # nothing was written by a check


@pytest.mark.slow
def test_a_rerun_trains_on_the_same_clicks_not_the_held_out_ones(clicked, tmp_path, capsys):
    """With fewer than 5 clicked images the held-out clicks come from the training images themselves: the two
    caches then held the same images, got one key, and the validation cache replaced the training one, so the
    next identical run trained on the held-out clicks (the page's second Train too)."""
    import re
    root, labels, _ = clicked
    rows = click_rows(labels[:2], per_class=6)  # two clicked images: blocks of each image are held out
    clicks = write_csv(tmp_path / "two.csv", rows)
    cfg = no_labels(root, tmp_path, clicks, epochs=1, loader="resident")
    train_ds, val_ds, how, _ = build_datasets(cfg)
    assert set(train_ds.ids) == set(val_ds.ids) and "held-out clicks" in how
    counts = []
    for _ in range(2):  # the same command twice, into the same run folder
        history = train(cfg)
        out = capsys.readouterr().out
        counts.append(float(re.search(r"\(([\d.]+) clicks per image", out).group(1)))
        assert history[-1]["val_clicks"] < len(rows) / 2  # validated on the held-out share only
    assert counts[0] == counts[1] == pytest.approx(train_ds.annotation_stats()["clicks_per_image"])
    assert "reused" in out  # the rerun read its caches back: the right one for each part


@pytest.mark.slow
def test_a_clicks_run_says_what_its_scores_cover_and_keeps_the_last_model(clicked, tmp_path, capsys):
    """Clicks are not a probability sample of the map: every held-out-click score says it covers the clicked kind of
    pixels, the run points to the assessment, and best_model.pth is the last model (--select auto), not the epoch
    that scored best on a handful of clicks."""
    root, labels, clicks = clicked
    history = train(no_labels(root, tmp_path, clicks, epochs=3))
    out = capsys.readouterr().out
    assert "not a probability sample of the map" in out and "python assess.py sample" in out
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3 and all("held-out clicks: clicked pixels, not the map" in line for line in lines)
    assert all(h["val_scope"] == "the kind of pixels that were clicked, not the map" for h in history)
    assert read_checkpoint(tmp_path / "ck" / "best_model.pth").epoch == 3
    train(no_labels(root, tmp_path, clicks, epochs=3, select="best", out=str(tmp_path / "best")))
    best = max(history, key=lambda h: h["val_miou"])["epoch"]
    assert read_checkpoint(tmp_path / "best" / "best_model.pth").epoch == best
    capsys.readouterr()
    train(cfg_for(root, tmp_path, epochs=2, out=str(tmp_path / "dense")))  # dense labels: the best, as always
    dense = json.loads((tmp_path / "dense" / "history.json").read_text())
    assert read_checkpoint(tmp_path / "dense" / "best_model.pth").epoch == \
        max(dense, key=lambda h: h["val_miou"])["epoch"]
    assert "not a probability sample" not in capsys.readouterr().out


def test_with_a_split_the_clicks_on_its_val_images_are_held_out(clicked, tmp_path, capsys):
    """A clicks-only run trained on the split's val images without a word; with --split they are held out."""
    root, labels, clicks = clicked
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [f"Image_{i}" for i in range(5)], "val": ["Image_6", "Image_7"]}))
    cfg = no_labels(root, tmp_path, clicks, split=str(split))
    check_config(cfg)
    train_ds, val_ds, how, _ = build_datasets(cfg)
    assert sorted(train_ds.ids) == [f"Image_{i}" for i in range(5)] and sorted(val_ds.ids) == ["Image_6", "Image_7"]
    rows = list(csv.reader(open(clicks)))[1:]
    assert sum(len(c) for c in val_ds.clicks.values()) == sum(r[0] in ("Image_6.tif", "Image_7.tif") for r in rows)
    assert "held out the" in how and "Image_5" not in train_ds.ids and "left out" in how  # Image_5: in neither
    with pytest.raises(ValueError, match="--split holds out the clicks on its val images; --val-clicks"):
        check_config(no_labels(root, tmp_path, clicks, split=str(split), val_clicks=0.2))
    (root / "split.json").write_text(split.read_text())  # beside the images folder, not given: said, not used
    build_datasets(no_labels(root, tmp_path, clicks))
    assert f"note: {root / 'split.json'} is not used" in capsys.readouterr().out


@pytest.mark.slow
def test_a_persons_clicks_give_the_saved_model_the_prior_they_imply(clicked, tmp_path, capsys):
    """Clicks chosen by a person misstate how common each class is; the saved model predicts under the class
    shares the clicks imply (--prior auto), not the clicks' own; --prior off, or points drawn at random, keep the
    model as trained."""
    root, labels, clicks = clicked
    train(no_labels(root, tmp_path, clicks, epochs=1))
    out = capsys.readouterr().out
    ck = read_checkpoint(tmp_path / "ck" / "best_model.pth")
    assert ck.prior is not None and "prior: the saved model predicts under" in out
    assert len(ck.prior["map"]) == len(ck.prior["train"]) == 6 and abs(sum(ck.prior["map"]) - 1) < 1e-9
    assert read_checkpoint(tmp_path / "ck" / "last.pth").prior == ck.prior
    counts = np.bincount(np.concatenate([lab[lab != IGNORE_INDEX] for lab in labels]), minlength=6)
    common = int(np.argmax(counts))  # the clicks give every class the same count; the pixels do not
    assert ck.prior["map"][common] > ck.prior["train"][common]
    train(no_labels(root, tmp_path, clicks, epochs=1, prior="off", out=str(tmp_path / "off")))
    assert read_checkpoint(tmp_path / "off" / "best_model.pth").prior is None
    train(cfg_for(root, tmp_path, epochs=1, points=20, out=str(tmp_path / "random")))  # a random sample
    assert read_checkpoint(tmp_path / "random" / "best_model.pth").prior is None
    train(cfg_for(root, tmp_path, epochs=1, points="1/object", out=str(tmp_path / "objects")))  # simulated: measured
    assert read_checkpoint(tmp_path / "objects" / "best_model.pth").prior is None  # against on the synthetic set
