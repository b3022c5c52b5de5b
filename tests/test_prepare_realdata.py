"""prepare_realdata.py on a tiny fake solaris wheel (60x60 image, 3 buildings) made in tmp_path; no network."""

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import prepare_realdata as pr  # noqa: E402
from raster import read_raster  # noqa: E402

H = W = 60
PATCH = 20  # -> 3x3 grid
ORIGIN = (733601.0, 3725139.0)
PIXEL = 0.5
GEOKEYS = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32616)
GEOTAGS = [(33550, 12, 3, (PIXEL, PIXEL, 0.0), True),
           (33922, 12, 6, (0.0, 0.0, 0.0, *ORIGIN, 0.0), True),
           (34735, 3, len(GEOKEYS), GEOKEYS, True)]


def fake_sources(seed=0):
    """(image uint16, instance bands (H, W, 3) uint8 0/255, footprint mask 0/255). Building 0 straddles the
    patch border between columns 0 and 1 and rows 0 and 1."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 7000, size=(H, W), dtype=np.uint16)
    inst = np.zeros((H, W, 3), np.uint8)
    inst[15:25, 15:25, 0] = 255  # across four patches
    inst[2:8, 42:50, 1] = 255  # row 0, column 2
    inst[45:55, 5:12, 2] = 255  # row 2, column 0
    mask = np.where(inst.any(axis=2), 255, 0).astype(np.uint8)
    return image, inst, mask


def make_wheel(path, image, inst, mask, members=None):
    """A zip with the three members at the wheel's paths (`members` renames or drops them)."""
    tmp = path.parent / "src"
    tmp.mkdir(exist_ok=True)
    tifffile.imwrite(tmp / "img.tif", image, photometric="minisblack", extratags=GEOTAGS, metadata=None)
    tifffile.imwrite(tmp / "mask.tif", mask, photometric="minisblack", metadata=None)
    tifffile.imwrite(tmp / "inst.tif", inst, photometric="minisblack", planarconfig="contig",
                     extratags=GEOTAGS, metadata=None)
    members = members if members is not None else {pr.IMAGE_MEMBER: "img.tif", pr.LABEL_MEMBER: "mask.tif",
                                                   pr.INSTANCE_MEMBER: "inst.tif"}
    with zipfile.ZipFile(path, "w") as zf:
        for member, name in members.items():
            zf.write(tmp / name, member)
        zf.writestr("solaris/__init__.py", "")
    return path


def run(wheel, out, *extra, cache=None):
    argv = ["--wheel", str(wheel), "--out", str(out), "--patch-size", str(PATCH), "--val-columns", "2", *extra]
    if cache is not None:
        argv = argv[2:] + ["--cache", str(cache)]
    return pr.main(pr.get_args_parser().parse_args(argv))


@pytest.fixture
def source(tmp_path):
    image, inst, mask = fake_sources()
    return make_wheel(tmp_path / "fake.whl", image, inst, mask), image, inst, mask


def test_patches_keep_values_ids_and_georeferencing(source, tmp_path):
    wheel, image, inst, mask = source
    out = tmp_path / "out"
    assert run(wheel, out) == 0
    ids = sorted(p.stem for p in (out / "images").glob("*.tif"))
    assert ids == sorted(f"r{r}_c{c}" for r in range(3) for c in range(3))
    for sub in ("labels", "instances"):
        assert sorted(p.stem for p in (out / sub).glob("*.tif")) == ids
    for r in range(3):
        for c in range(3):
            i, win = f"r{r}_c{c}", np.s_[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
            img = tifffile.imread(out / "images" / f"{i}.tif")
            assert img.dtype == np.uint16 and np.array_equal(img, image[win])
            lab = tifffile.imread(out / "labels" / f"{i}.tif")
            assert lab.dtype == np.uint8 and np.array_equal(lab, mask[win])  # 0/255 as in the source
            tags = read_raster(out / "images" / f"{i}.tif").geotags
            tie = tags[33922][2]
            assert tie == pytest.approx((0, 0, 0, ORIGIN[0] + c * PATCH * PIXEL, ORIGIN[1] - r * PATCH * PIXEL, 0))
            assert tags[33550][2] == pytest.approx((PIXEL, PIXEL, 0.0))
            assert tuple(tags[34735][2]) == GEOKEYS
            assert read_raster(out / "labels" / f"{i}.tif").geotags[33922][2] == pytest.approx(tie)
    assert set(np.unique(tifffile.imread(out / "labels" / "r0_c0.tif"))) == {0, 255}


def test_instance_ids_are_global_across_patches(source, tmp_path):
    wheel, image, inst, mask = source
    out = tmp_path / "out"
    assert run(wheel, out) == 0
    full = np.block([[tifffile.imread(out / "instances" / f"r{r}_c{c}.tif") for c in range(3)] for r in range(3)])
    assert full.dtype == np.uint16
    expected = np.zeros((H, W), np.uint16)
    for k in range(inst.shape[2]):
        expected[inst[:, :, k] > 0] = k + 1
    assert np.array_equal(full, expected)
    # building 1 is cut into four patches and has id 1 in each
    for i in ("r0_c0", "r0_c1", "r1_c0", "r1_c1"):
        assert set(np.unique(tifffile.imread(out / "instances" / f"{i}.tif"))) >= {1}


def test_split_holds_out_columns_and_class_file(source, tmp_path, capsys):
    wheel, *_ = source
    out = tmp_path / "out"
    assert run(wheel, out, "--val-columns", "0,2") == 0
    split = json.loads((out / "split.json").read_text())
    assert split["val_columns"] == [0, 2]
    assert sorted(split["val"]) == sorted(f"r{r}_c{c}" for r in range(3) for c in (0, 2))
    assert sorted(split["train"]) == [f"r{r}_c1" for r in range(3)]
    assert not set(split["train"]) & set(split["val"])
    classes = json.loads((out / "classes.json").read_text())
    assert classes["names"] == ["background", "building"] and classes["label_format"] == "index"
    assert classes["value_map"] == {"0": 0, "255": 1}
    assert [0, 0, 0] not in classes["palette"]
    printed = capsys.readouterr().out
    # val (columns 0, 2): buildings 1, 2, 3 touch it; train (column 1): building 1 only, 50 of 1200 pixels
    assert "val     6 patches" in printed and "3 buildings touch it" in printed
    assert "train   3 patches, building pixels 4.17%, 1 buildings touch it" in printed


def test_mismatched_footprint_mask_is_refused(tmp_path, capsys):
    image, inst, mask = fake_sources()
    other = mask.copy()
    other[30:40, 30:40] = 255  # a building that no instance band has (another chip's mask)
    wheel = make_wheel(tmp_path / "bad.whl", image, inst, other)
    assert run(wheel, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and pr.LABEL_MEMBER in err and "100 pixels" in err
    assert not (tmp_path / "out").exists()


def test_wheel_without_members_is_refused(tmp_path, capsys):
    image, inst, mask = fake_sources()
    wheel = make_wheel(tmp_path / "partial.whl", image, inst, mask,
                       members={pr.IMAGE_MEMBER: "img.tif", "solaris/data/sample_fp_mask.tif": "mask.tif"})
    assert run(wheel, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert pr.LABEL_MEMBER in err and pr.INSTANCE_MEMBER in err


@pytest.mark.parametrize("extra, words", [(("--val-columns", "x"), "--val-columns"),
                                          (("--val-columns", "3"), "columns 0..2"),
                                          (("--val-columns", "0,1,2"), "every column"),
                                          (("--patch-size", "0"), "--patch-size"),
                                          (("--patch-size", "61"), "larger than")])
def test_bad_arguments_exit_2_and_write_nothing(source, tmp_path, capsys, extra, words):
    wheel, *_ = source
    out = tmp_path / "out"
    assert run(wheel, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err
    assert not out.exists()


def test_missing_wheel_path_is_refused(tmp_path, capsys):
    assert run(tmp_path / "nope.whl", tmp_path / "out") == 2
    assert "nope.whl" in capsys.readouterr().err


def test_second_run_is_a_no_op(source, tmp_path, capsys):
    wheel, *_ = source
    out = tmp_path / "out"
    assert run(wheel, out) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert run(wheel, out) == 0
    assert "complete already" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_cached_wheel_is_used_without_download(source, tmp_path, monkeypatch):
    wheel, *_ = source
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / pr.WHEEL_NAME).write_bytes(wheel.read_bytes())
    monkeypatch.setattr(pr, "download_wheel", lambda cache: pytest.fail("downloaded although cached"))
    assert run(wheel, tmp_path / "out", cache=cache) == 0
    assert (tmp_path / "out" / ".done").is_file()


def test_existing_other_out_is_refused_without_overwrite(source, tmp_path, capsys):
    wheel, *_ = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    assert run(wheel, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not (out / "images").exists()
    assert run(wheel, out, "--overwrite") == 0
    assert (out / ".done").is_file() and (out / "notes.txt").is_file()


def test_other_settings_need_overwrite_and_stale_patches_go(source, tmp_path, capsys):
    wheel, *_ = source
    out = tmp_path / "out"
    assert run(wheel, out) == 0
    assert run(wheel, out, "--patch-size", "30", "--val-columns", "1") == 2
    assert "was made with {'patch_size': 20" in capsys.readouterr().err
    assert run(wheel, out, "--patch-size", "30", "--val-columns", "1", "--overwrite") == 0
    assert sorted(p.stem for p in (out / "images").glob("*.tif")) == ["r0_c0", "r0_c1", "r1_c0", "r1_c1"]
    assert json.loads((out / ".done").read_text())["settings"] == {"patch_size": 30, "val_columns": [1]}


def test_remainder_is_cropped_and_reported(tmp_path, capsys):
    image, inst, mask = fake_sources()
    wheel = make_wheel(tmp_path / "w.whl", image, inst, mask)
    assert run(wheel, tmp_path / "out", "--patch-size", "25", "--val-columns", "1") == 0
    assert "the last 10 columns and 10 rows of pixels are cropped" in capsys.readouterr().out  # 60 % 25
    assert len(list((tmp_path / "out" / "images").glob("*.tif"))) == 4


@pytest.mark.parametrize("version, refuses", [("23.2.1", False), ("24.0", False), ("24.1", True),
                                              ("24.1b1", True), ("25.0.1", True), ("9.0.3", False)])
def test_pip_version_rule(version, refuses):
    assert pr.pip_refuses_wheel(version) is refuses


def test_overlapping_instance_bands_are_refused(tmp_path, capsys):
    image, inst, mask = fake_sources()
    inst[15:20, 15:20, 1] = 255  # building 2 over building 1
    wheel = make_wheel(tmp_path / "w.whl", image, inst, np.where(inst.any(axis=2), 255, 0).astype(np.uint8))
    assert run(wheel, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert pr.INSTANCE_MEMBER in err and "25 pixels" in err


@pytest.mark.parametrize("pip_version, throwaway", [("23.2.1", False), ("24.1", True)])
def test_download_uses_old_pip(tmp_path, monkeypatch, pip_version, throwaway):
    """The commands download_wheel runs (recorded, not run): a too-new pip downloads from a throwaway venv."""
    calls = []

    def fake_run(cmd, check=False):
        calls.append([str(c) for c in cmd])
        if "download" in cmd:
            (Path(cmd[-1]) / pr.WHEEL_NAME).write_bytes(b"zip")
        return pr.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(pr.importlib.metadata, "version", lambda name: pip_version)
    monkeypatch.setattr(pr.subprocess, "run", fake_run)
    assert pr.download_wheel(tmp_path / "cache") == tmp_path / "cache" / pr.WHEEL_NAME
    download = calls[-1]
    assert download[1:5] == ["-m", "pip", "download", "--no-deps"] and pr.PACKAGE in download
    if throwaway:
        assert calls[0][1:3] == ["-m", "venv"] and "pip<24.1" in calls[1]
        assert download[0] == calls[1][0] != sys.executable
    else:
        assert len(calls) == 1 and download[0] == sys.executable


def test_clicks_layer_has_one_click_inside_every_building_and_as_many_on_the_background(source, tmp_path):
    from annotations import read_clicks
    from spec import load_class_file
    wheel, image, inst, mask = source
    out = tmp_path / "out"
    assert run(wheel, out) == 0
    info = pyogrio_info(out / "clicks.gpkg")
    assert "32616" in info["crs"] and info["geometry_type"] == "Point" and "class" in list(info["fields"])
    clicks = read_clicks(out / "clicks.gpkg", out / "images", load_class_file(out / "classes.json"))
    ids = np.zeros((H, W), np.uint16)
    for k in range(inst.shape[2]):
        ids[inst[:, :, k] > 0] = k + 1
    hit, background = [], 0
    for name, c in clicks.images.items():
        r, col = (int(v) for v in name[1:].split("_c"))
        rows, cols = c.rows + r * PATCH, c.cols + col * PATCH
        for y, x, k in zip(rows, cols, c.classes):
            if k == 1:  # building: inside its footprint, away from the edge (all 4 neighbours the same building)
                assert mask[y, x] == 255 and ids[y, x] and (ids[y - 1:y + 2, x] == ids[y, x]).all() \
                    and (ids[y, x - 1:x + 2] == ids[y, x]).all()
                hit.append(int(ids[y, x]))
            else:
                assert mask[max(0, y - 3):y + 4, max(0, x - 3):x + 4].max() == 0  # clear of every building
                background += 1
    assert sorted(hit) == [1, 2, 3] and background == 3  # one per building, as many on the background


def pyogrio_info(path):
    import pyogrio
    return pyogrio.read_info(path)
