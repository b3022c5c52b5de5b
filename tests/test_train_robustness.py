"""What a careless or hostile user does to train.py: each case must stop with a message that names the cause,
before anything is written or lost."""

import fcntl
import json
from dataclasses import replace

import numpy as np
import pytest
import tifffile

from checkpoint import read_checkpoint
from tests.conftest import cfg_for, write_patches
from train import claim_out, train


def test_a_second_run_into_a_folder_in_use_stops_before_it_writes(data, tmp_path):
    out = tmp_path / "ck"
    held = claim_out(out)  # a run is training into `out` (this process stands in for it)
    try:
        assert "pid" in (out / "run.lock").read_text()
        with pytest.raises(ValueError, match="in use by another run"):
            train(cfg_for(data, tmp_path, points=50))
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing of the second run
    finally:
        held.close()
    train(cfg_for(data, tmp_path, epochs=1))  # the lock goes with its process: the folder is free again
    with open(out / "run.lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and the finished run released it


def test_a_resume_whose_split_moved_is_refused(data, tmp_path):
    cfg = cfg_for(data, tmp_path, epochs=1, train_ids=None, val_ids=None, val_fraction=0.25)
    train(cfg)
    write_patches(tmp_path / "more", n=9, size=(48, 48), seed=1)  # an image pair added to the folder
    for sub in ("Images/Image_8.tif", "Labels/Label_8.tif"):
        (data / sub).write_bytes((tmp_path / "more" / sub).read_bytes())
    with pytest.raises(ValueError, match=r"another split .*train \['6'\], val \['6', '8'\]"):
        train(replace(cfg, epochs=2, resume=True))


def test_excluding_every_class_is_refused(data, tmp_path):
    from spec import CLASSES
    with pytest.raises(ValueError, match="leaves no class to measure"):
        train(cfg_for(data, tmp_path, exclude=tuple(CLASSES)))
    assert not (tmp_path / "ck" / "last.pth").exists()


def test_resume_without_a_last_checkpoint_names_the_folder(data, tmp_path):
    with pytest.raises(ValueError, match=r"holds no last.pth to continue from; give the --out") as e:
        train(cfg_for(data, tmp_path, resume=True))
    assert "--checkpoint" not in str(e.value)


def test_out_that_is_a_file_is_refused(data, tmp_path):
    (tmp_path / "ck").write_text("notes")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(cfg_for(data, tmp_path))
    assert (tmp_path / "ck").read_text() == "notes"


def test_a_scale_that_leaves_no_pixels_says_so(data, tmp_path):
    with pytest.raises(ValueError, match=r"scale 0.001 leaves 6 training images at fewer than 4 processing pixels"):
        train(cfg_for(data, tmp_path, scale=1e-3))


def test_infinite_image_pixels_are_not_blamed_on_the_label_values(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 8:20] = 1  # the buildings, correctly labelled 1
        image = rng.random((32, 32, 3)).astype(np.float32)
        image[8:20, 8:20] = np.inf  # ... under infinite image pixels
        tifffile.imwrite(tmp_path / "img" / f"a{k}.tif", image, photometric="rgb")
        tifffile.imwrite(tmp_path / "lab" / f"a{k}.tif", mask)
    (tmp_path / "c.json").write_text(json.dumps({"names": ["ground", "building"], "label_format": "index",
                                                 "ignore_value": 99}))
    cfg = cfg_for(None, tmp_path, data=None, images=str(tmp_path / "img"), labels=str(tmp_path / "lab"),
                  classes=str(tmp_path / "c.json"), train_ids=["a0", "a1"], val_ids=["a2"], points=None)
    with pytest.raises(ValueError, match=r"\['building'\] have no labelled point") as e:
        train(cfg)
    assert "value_map" not in str(e.value) and "NaN or infinite in the images" in str(e.value)
    assert "labelled pixels per class: ground " in str(e.value) and ", building 0)" in str(e.value)
    history = train(replace(cfg, allow_unclicked=True))  # the user's choice: train without the class, said
    assert len(history) == 2 and read_checkpoint(tmp_path / "ck" / "last.pth").config["allow_unclicked"] is True


def test_labels_without_an_image_are_listed(tmp_path, capsys):
    from dataset import available_ids, folder_pairs
    root = tmp_path / "p"
    write_patches(root, n=3, size=(16, 16))
    (root / "Images" / "Image_1.tif").unlink()
    assert available_ids(root) == [0, 2]
    assert "1 labels in" in capsys.readouterr().out
    assert available_ids(root) == [0, 2] and "labels in" not in capsys.readouterr().out  # once per process
    (root / "Images" / "Image_2.tif").unlink()  # another image gone: said again, with both labels
    assert available_ids(root) == [0] and "2 labels in" in capsys.readouterr().out
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / "lab" / f"{name}.tif", np.zeros((4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "img" / "a.tif", np.zeros((4, 4, 3), np.uint8))
    assert [p[0] for p in folder_pairs(tmp_path / "img", tmp_path / "lab")] == ["a"]
    assert "have no image and are left out: ['b.tif']" in capsys.readouterr().out
