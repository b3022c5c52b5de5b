"""prepare_potsdam.py on small fake tiles with the official names (650x600 instead of 6000x6000)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import prepare_potsdam  # noqa: E402
from dataset import load_split, patch_pairs, read_label  # noqa: E402
from raster import read_raster  # noqa: E402
from spec import IGNORE_INDEX, PALETTE  # noqa: E402

H, W, SIZE = 650, 600, 300  # rows 0, 300, 350 (last shifted to the border) x cols 0, 300 -> 6 patches


def fake_label(rng, boundary=False):
    """Blocks of palette colours; with `boundary`, black lines between them (the noBoundary labels)."""
    classes = rng.integers(0, len(PALETTE), size=(H // 50 + 1, W // 50 + 1))
    label = np.asarray(PALETTE, dtype=np.uint8)[classes.repeat(50, 0).repeat(50, 1)[:H, :W]]
    if boundary:
        label[::50] = 0
        label[:, ::50] = 0
    return label


def make_tile(raw, tile, seed=0, label=True, bands=("RGB", "IRRG", "RGBIR"), overlay=False):
    """Write one tile in the official folders; returns the full label colours."""
    rng = np.random.default_rng(seed)
    for b in bands:
        folder = {"RGB": "2_Ortho_RGB", "IRRG": "3_Ortho_IRRG", "RGBIR": "4_Ortho_RGBIR"}[b]
        image = rng.integers(0, 256, size=(H, W, 4 if b == "RGBIR" else 3), dtype=np.uint8)
        (raw / folder).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(raw / folder / f"top_potsdam_{tile}_{b}.tif", image, photometric="rgb")
    full = fake_label(np.random.default_rng(seed))
    if overlay:  # an image blended over the mask: thousands of colours
        full = (full // 2 + rng.integers(0, 128, size=full.shape, dtype=np.uint8)).astype(np.uint8)
    if label:
        for folder, name, lab in (("5_Labels_all", "label", full),
                                  ("5_Labels_all_noBoundary", "label_noBoundary",
                                   fake_label(np.random.default_rng(seed), boundary=True))):
            (raw / folder).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(raw / folder / f"top_potsdam_{tile}_{name}.tif", lab, photometric="rgb")
    return full


def run(raw, out, *extra):
    args = prepare_potsdam.get_args_parser().parse_args(["--raw", str(raw), "--out", str(out), *extra])
    return prepare_potsdam.main(args)


@pytest.fixture
def raw(tmp_path):
    raw = tmp_path / "Potsdam"
    for seed, tile in enumerate(("2_10", "2_11", "2_13", "3_10")):  # 2_13 is a test tile
        make_tile(raw, tile, seed, bands=("RGB",))
    return raw


def test_patches_cover_tile_and_read_back(tmp_path, raw):
    out = tmp_path / "patches"
    assert run(raw, out, "--size", str(SIZE), "--val-tiles", "3_10") == 0
    split = load_split(out / "split.json")
    ids = split["train"] + split["val"] + split["test"]
    assert len(ids) == 4 * 6
    assert [i for i in ids if i.startswith("2_10_")] == [f"2_10_{k:04d}" for k in range(6)]
    # the last row is shifted to end at the border: patch 4 (third row, first column) is the bottom-left corner
    image = tifffile.imread(raw / "2_Ortho_RGB" / "top_potsdam_2_10_RGB.tif")
    np.testing.assert_array_equal(read_raster(out / "Images" / "Image_2_10_0004.tif").array, image[H - SIZE:, :SIZE])
    with tifffile.TiffFile(out / "Labels" / "Label_2_10_0005.tif") as f:
        assert f.pages[0].compression == tifffile.COMPRESSION.LZW
    full = tifffile.imread(raw / "5_Labels_all" / "top_potsdam_2_10_label.tif")
    np.testing.assert_array_equal(tifffile.imread(out / "Labels" / "Label_2_10_0005.tif"), full[H - SIZE:, W - SIZE:])
    for _, _, label_path in patch_pairs(out, ids):  # dataset reads every patch
        assert read_label(label_path).shape == (SIZE, SIZE)


def test_split_is_by_tile(tmp_path, raw):
    out = tmp_path / "patches"
    assert run(raw, out, "--size", str(SIZE), "--val-tiles", "3_10") == 0
    split = load_split(out / "split.json")
    tile = lambda i: i.rsplit("_", 1)[0]  # noqa: E731
    assert {tile(i) for i in split["train"]} == {"2_10", "2_11"}
    assert {tile(i) for i in split["val"]} == {"3_10"}
    assert {tile(i) for i in split["test"]} == {"2_13"}
    assert split["tiles"] == {"train": ["2_10", "2_11"], "val": ["3_10"], "test": ["2_13"]}
    assert split["settings"] == {"size": SIZE, "stride": SIZE, "labels": "full", "bands": "RGB", "border": "shift"}


def test_val_tile_must_not_be_a_test_tile(tmp_path, raw):
    with pytest.raises(ValueError, match="2_13"):
        prepare_potsdam.prepare(raw, tmp_path / "patches", size=SIZE, val_tiles=["2_13"], progress=False)
    assert not (tmp_path / "patches").exists()


@pytest.mark.slow
def test_eroded_labels_read_back_as_ignored(tmp_path, raw):
    out = tmp_path / "patches"
    assert run(raw, out, "--size", str(SIZE), "--labels", "eroded") == 0
    label = read_label(out / "Labels" / "Label_2_10_0000.tif")
    assert (label[0] == IGNORE_INDEX).all() and (label[:, 50] == IGNORE_INDEX).all()
    assert (label[1:50, 1:50] != IGNORE_INDEX).all()
    full = tmp_path / "full"
    assert run(raw, full, "--size", str(SIZE), "--labels", "full") == 0
    assert (read_label(full / "Labels" / "Label_2_10_0000.tif") != IGNORE_INDEX).all()


def test_overlay_label_is_reported_and_skipped(tmp_path, raw, capsys):
    make_tile(raw, "2_12", seed=9, bands=("RGB",), overlay=True)
    out = tmp_path / "patches"
    assert run(raw, out, "--size", str(SIZE)) == 1
    printed = capsys.readouterr().out
    assert "bad 2_12" in printed and "not in the palette" in printed
    assert not list((out / "Images").glob("Image_2_12_*"))
    split = load_split(out / "split.json")
    assert len(split["train"] + split["val"] + split["test"]) == 4 * 6  # the good tiles are all there
    assert "2_12" in split["bad_tiles"]


def test_missing_label_is_reported_and_others_done(tmp_path, raw, capsys):
    make_tile(raw, "4_10", bands=("RGB",), label=False)
    out = tmp_path / "patches"
    assert run(raw, out, "--size", str(SIZE)) == 1
    assert "bad 4_10: no label top_potsdam_4_10_label.tif" in capsys.readouterr().out
    assert len(list((out / "Images").glob("Image_2_10_*"))) == 6


def test_rgbir_gives_four_band_patches(tmp_path):
    raw = tmp_path / "Potsdam"
    make_tile(raw, "2_10", bands=("RGBIR",))
    out = tmp_path / "patches"
    assert run(raw, out, "--size", str(SIZE), "--bands", "RGBIR") == 0
    patch = tifffile.imread(out / "Images" / "Image_2_10_0000.tif")
    source = tifffile.imread(raw / "4_Ortho_RGBIR" / "top_potsdam_2_10_RGBIR.tif")
    assert patch.shape == (SIZE, SIZE, 4)
    np.testing.assert_array_equal(patch, source[:SIZE, :SIZE])


def test_resume_skips_done_tiles(tmp_path, raw, monkeypatch):
    out = tmp_path / "patches"
    assert run(raw, out, "--size", str(SIZE)) == 0
    before = {p: p.stat().st_mtime_ns for p in (out / "Images").iterdir()}
    (out / "Labels" / "Label_2_11_0003.tif").unlink()  # an interrupted tile must be cut again
    written = []
    real_write = prepare_potsdam._write_tif
    monkeypatch.setattr(prepare_potsdam, "_write_tif", lambda path, arr: (written.append(path.name),
                                                                         real_write(path, arr)))
    summary = prepare_potsdam.prepare(raw, out, size=SIZE, progress=False)
    assert summary["cut"] == ["2_11"] and sorted(summary["already_done"]) == ["2_10", "2_13", "3_10"]
    assert {name.split("_", 1)[1].rsplit("_", 1)[0] for name in written} == {"2_11"}
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if "2_11" not in p.name)
    assert (out / "Labels" / "Label_2_11_0003.tif").is_file()


def test_other_settings_into_same_out_refused(tmp_path, raw):
    out = tmp_path / "patches"
    assert run(raw, out, "--size", str(SIZE)) == 0
    with pytest.raises(ValueError, match="already holds patches"):
        prepare_potsdam.prepare(raw, out, size=200, progress=False)


def test_name_variants_and_nesting_are_found(tmp_path):
    raw = tmp_path / "downloads"
    make_tile(raw / "Potsdam" / "nested", "2_10", bands=("RGB",))
    (raw / "Potsdam" / "nested" / "2_Ortho_RGB" / "top_potsdam_2_10_RGB.tif").rename(
        raw / "Potsdam" / "nested" / "2_Ortho_RGB" / "top_potsdam_02_10_RGB.tif")
    found = prepare_potsdam.find_tiles(raw, "RGB", "eroded")
    assert list(found) == ["2_10"]
    assert found["2_10"][0].name == "top_potsdam_02_10_RGB.tif"
    assert found["2_10"][1].name == "top_potsdam_2_10_label_noBoundary.tif"


def test_missing_or_empty_raw_is_a_clear_error(tmp_path, capsys):
    assert run(tmp_path / "nope", tmp_path / "out") == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="top_potsdam_<row>_<col>_RGB.tif"):
        prepare_potsdam.find_tiles(tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def test_out_inside_raw_refused(tmp_path, raw):
    with pytest.raises(ValueError, match="inside --raw"):
        prepare_potsdam.prepare(raw, raw / "patches", size=SIZE, progress=False)
    assert not (raw / "patches").exists()


@pytest.mark.parametrize("sub", ["Images", "Labels", ".done"])
def test_out_subfolder_linked_into_raw_refused(tmp_path, raw, capsys, sub):
    out = tmp_path / "patches"
    out.mkdir()
    (out / sub).symlink_to(raw / "2_Ortho_RGB", target_is_directory=True)
    before = sorted(p.name for p in (raw / "2_Ortho_RGB").iterdir())
    assert run(raw, out, "--size", str(SIZE)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "inside --raw" in err and str(out / sub) in err
    assert sorted(p.name for p in (raw / "2_Ortho_RGB").iterdir()) == before
    assert not (out / "split.json").exists()


@pytest.mark.parametrize("content", [b"", b'{"tile": "2_10", "settings"', b'{"tile": "2_10"}', b"\xff\xfe\x00"])
def test_damaged_done_marker_means_not_done(tmp_path, raw, capsys, content):
    out = tmp_path / "patches"
    assert run(raw, out, "--size", str(SIZE)) == 0
    marker = out / ".done" / "2_10.json"
    marker.write_bytes(content)  # e.g. a disk that filled up, or a hand edit
    capsys.readouterr()
    summary = prepare_potsdam.prepare(raw, out, size=SIZE, progress=False)
    assert summary["cut"] == ["2_10"] and sorted(summary["already_done"]) == ["2_11", "2_13", "3_10"]
    assert f"warning: {marker}" in capsys.readouterr().out
    split = load_split(out / "split.json")
    assert len(split["train"] + split["val"] + split["test"]) == 4 * 6 and "2_10_0000" in split["train"]
    assert prepare_potsdam.prepare(raw, out, size=SIZE, progress=False)["already_done"] == ["2_10", "2_11",
                                                                                           "2_13", "3_10"]


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path, raw, capsys):
    out = tmp_path / "patches"
    assert run(raw, out, "--size", str(SIZE)) == 0
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid that is dead once waited for
    child.wait()
    stale = [out / f".split.json.{child.pid}.tmp", out / "Images" / f".Image_2_10_0000.tif.{child.pid}.tmp",
             out / "Labels" / f".Label_2_10_0000.tif.{child.pid}.tmp", out / ".done" / f".2_10.json.{child.pid}.tmp"]
    alive = out / "Images" / f".Image_2_10_0001.tif.{os.getpid()}.tmp"
    for path in stale + [alive]:
        path.write_bytes(b"half")
    assert run(raw, out, "--size", str(SIZE)) == 0
    assert not any(p.exists() for p in stale) and alive.exists()
    assert "removed 4 temporary files" in capsys.readouterr().out
