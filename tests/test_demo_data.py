"""demo_data.py: synthetic patches in the real layout, deterministic, every class present, never over real data."""

import json

import numpy as np
import pytest
import tifffile

from dataset import PotsdamDataset, read_label
from raster import read_raster
from spec import CLASSES, IGNORE_INDEX, DataSpec


def read_image(path):
    return read_raster(path).array
from tools.demo_data import MARKER, TARGET_SHARES, draw_scene, get_args_parser, main, make_demo_data, measure_shares


def test_files_read_back_in_the_patch_layout(tmp_path):
    s = make_demo_data(tmp_path / "demo", patches=8, scenes=1, scene_size=300, seed=0)
    root = tmp_path / "demo" / "patches"
    assert [p.name for p in s["images"]] == [f"Image_{i}.tif" for i in range(8)]
    assert sorted(p.name for p in (root / "Images").iterdir()) == sorted(f"Image_{i}.tif" for i in range(8))
    for image, label in zip(s["images"], s["labels"]):
        assert read_image(image).shape == (300, 300, 3)
        lab = read_label(label)  # raises on any colour outside the palette
        assert lab.shape == (300, 300)
        assert set(np.unique(lab)) <= set(range(len(CLASSES))) | {IGNORE_INDEX}
        with tifffile.TiffFile(label) as tif:
            assert tif.pages[0].compression == 5  # LZW
    ds = PotsdamDataset(root, points=50, spec=DataSpec(scale=1.0))
    assert len(ds) == 8
    sample = ds[0]
    assert sample["image"].shape == (3, 300, 300) and sample["label"].shape == (300, 300)
    assert read_image(s["scenes"][0]).shape == (300, 300, 3)
    assert read_label(s["scene_labels"][0]).shape == (300, 300)
    assert (tmp_path / "demo" / MARKER).read_text().startswith("SYNTHETIC")
    shares, _ = measure_shares(s["labels"])  # the summary counts what the files hold
    assert shares == pytest.approx(s["class_shares"])


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_scene(tmp_path):
    a = make_demo_data(tmp_path / "a", patches=3, scenes=1, scene_size=300, seed=1)
    b = make_demo_data(tmp_path / "b", patches=2, scenes=1, scene_size=300, seed=1)  # fewer: the same first two
    c = make_demo_data(tmp_path / "c", patches=2, scenes=0, seed=2)
    for p, q in zip(a["images"][:2] + a["labels"][:2] + a["scenes"], b["images"] + b["labels"] + b["scenes"]):
        assert p.read_bytes() == q.read_bytes()
    assert not np.array_equal(read_image(a["images"][0]), read_image(c["images"][0]))
    assert not np.array_equal(read_label(a["labels"][0]), read_label(c["labels"][0]))
    assert not np.array_equal(read_image(a["images"][0]), read_image(a["images"][1]))


def test_every_class_appears_with_a_plausible_share():
    counts = np.zeros(256, np.int64)
    for seed in (0, 1):  # two 1500x1500 tiles: 50 patches' worth
        _, label = draw_scene(np.random.default_rng(seed), 1500)
        counts += np.bincount(label.ravel(), minlength=256)
    labelled = counts[: len(CLASSES)].sum()
    for name, n, target in zip(CLASSES, counts, TARGET_SHARES):
        assert 0.4 * target <= n / labelled <= target + 0.08, (name, n / labelled)
    assert counts[IGNORE_INDEX] / counts.sum() < 0.01


def test_draw_scene_shapes_and_classes():
    image, label = draw_scene(np.random.default_rng(0), 600)
    assert image.shape == (600, 600, 3) and image.dtype == np.uint8
    assert label.shape == (600, 600) and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(range(len(CLASSES))) | {IGNORE_INDEX}
    assert image.std() > 20  # textured, not flat colours


@pytest.mark.parametrize("where", ["archive", "archive/patches", "data/archive/patches/new"])
def test_refuses_archive(tmp_path, where):
    with pytest.raises(ValueError, match="archive"):
        make_demo_data(tmp_path / where, patches=2, scenes=0)
    assert not (tmp_path / where / "patches").exists()


def test_refuses_a_folder_it_did_not_write(tmp_path):
    real = tmp_path / "out" / "patches" / "Images"
    real.mkdir(parents=True)
    (real / "Image_0.tif").write_bytes(b"real data")
    with pytest.raises(FileExistsError, match="not written by demo_data"):
        make_demo_data(tmp_path / "out", patches=2, scenes=0)
    assert (real / "Image_0.tif").read_bytes() == b"real data"
    assert not (tmp_path / "out" / MARKER).exists()


@pytest.mark.slow
def test_skips_when_done_redraws_when_settings_change(tmp_path):
    out = tmp_path / "demo"
    first = make_demo_data(out, patches=5, scenes=1, scene_size=300)
    stamp = first["images"][0].stat().st_mtime_ns
    again = make_demo_data(out, patches=5, scenes=1, scene_size=300)
    assert again["skipped"] and not first["skipped"]
    assert again["class_shares"] == first["class_shares"]
    assert first["images"][0].stat().st_mtime_ns == stamp
    fewer = make_demo_data(out, patches=3, scenes=0)
    assert not fewer["skipped"]
    assert sorted(p.name for p in (out / "patches" / "Images").iterdir()) == ["Image_0.tif", "Image_1.tif",
                                                                              "Image_2.tif"]
    assert not (out / "scenes" / "scene_0.tif").exists()
    record = json.loads((out / MARKER).read_text().splitlines()[-1])
    assert record["settings"]["patches"] == 3 and record["complete"]


@pytest.mark.slow
def test_an_interrupted_run_is_redrawn(tmp_path):
    out = tmp_path / "demo"
    s = make_demo_data(out, patches=2, scenes=0)
    record = json.loads((out / MARKER).read_text().splitlines()[-1])
    (out / MARKER).write_text((out / MARKER).read_text().replace(json.dumps(record),
                                                                 json.dumps({**record, "complete": False})))
    s["images"][1].unlink()
    again = make_demo_data(out, patches=2, scenes=0)
    assert not again["skipped"] and again["images"][1].is_file()


def test_cli_prints_synthetic_shares_and_refuses_archive(tmp_path, capsys):
    main(get_args_parser().parse_args(["--out", str(tmp_path / "demo"), "--patches", "2", "--scenes", "0",
                                       "--check"]))
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and all(name in printed for name in CLASSES)
    with pytest.raises(SystemExit, match="archive"):
        main(get_args_parser().parse_args(["--out", str(tmp_path / "archive" / "patches"), "--patches", "2"]))
