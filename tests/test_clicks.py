"""Object clicks: k clicks inside every connected object, away from its boundary, fixed per image and seed."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from checkpoint import read_checkpoint
from config import parse_points
from dataset import PotsdamDataset, _image_seed, clicks_per_object, object_clicks, point_count
from spec import IGNORE_INDEX, DataSpec
from tests.conftest import cfg_for, make_label
from train import train

FOUR = ndimage.generate_binary_structure(2, 1)


def hand_label():
    """30 x 30: background 0 with a 20 x 20 building (1), a 4 x 4 building apart from it, two 3 x 3 trees (3)
    touching only at a corner (two objects under 4-connectivity), a one-pixel-wide car strip (4) and an
    undefined block."""
    lab = np.zeros((30, 30), np.uint8)
    lab[2:22, 2:22] = 1
    lab[24:28, 2:6] = 1
    lab[23:26, 24:27] = 3
    lab[26:29, 27:30] = 3
    lab[28, 10:20] = 4
    lab[0:2, 24:30] = IGNORE_INDEX
    return lab


def objects_of(label):
    """[(class, flat pixel indices)] of every 4-connected object."""
    out = []
    for c in np.unique(label[label != IGNORE_INDEX]):
        comps, n = ndimage.label(label == c, structure=FOUR)
        out += [(c, np.flatnonzero(comps.reshape(-1) == j)) for j in range(1, n + 1)]
    return out


def boundary(label):
    """(H, W) bool: a pixel with a 4-neighbour of another value (undefined included)."""
    pad = np.pad(label.astype(np.int32), 1, mode="edge")
    centre = pad[1:-1, 1:-1]
    return ((pad[:-2, 1:-1] != centre) | (pad[2:, 1:-1] != centre) | (pad[1:-1, :-2] != centre)
            | (pad[1:-1, 2:] != centre))


def check_clicks(label, clicks):
    flat_b = boundary(label).reshape(-1)
    assert len(np.unique(clicks)) == len(clicks)
    assert (label.reshape(-1)[clicks] != IGNORE_INDEX).all()
    for c, pix in objects_of(label):
        mine = np.intersect1d(clicks, pix)
        assert len(mine) >= 1, f"an object of class {c} with {pix.size} pixels got no click"
        if not flat_b[pix].all():  # an object with an interior: never clicked on its boundary
            assert not flat_b[mine].any(), f"class {c}: a click on the boundary"


def test_every_object_gets_a_click_never_on_undefined_or_boundary():
    lab = hand_label()
    clicks = object_clicks(lab, 1, np.random.default_rng(0))
    check_clicks(lab, clicks)
    assert len(clicks) == len(objects_of(lab)) == 6  # background, 2 buildings, 2 trees, the car strip
    for seed in range(5):  # random labels: rectangles cut into odd shapes, undefined speckle
        rng = np.random.default_rng(seed)
        lab = make_label(rng, (40, 40), undefined=0.03)
        check_clicks(lab, object_clicks(lab, 3, rng))


def test_big_objects_get_k_spread_clicks_small_ones_one_at_their_centre():
    lab = np.zeros((50, 50), np.uint8)
    lab[5:45, 5:45] = 1  # 40 x 40
    lab[1:4, 46:49] = 2  # 3 x 3: its centre is (2, 47)
    clicks = object_clicks(lab, 3, np.random.default_rng(0))
    rows, cols = np.divmod(clicks, 50)
    big = lab[rows, cols] == 1
    assert big.sum() == 3
    pts = np.stack([rows[big], cols[big]], 1)
    gaps = [np.hypot(*(pts[i] - pts[j])) for i in range(3) for j in range(i)]
    assert min(gaps) >= 4  # spread out, not a clump
    assert ((pts >= 14) & (pts <= 35)).all()  # in the core: at least 10 px deep, half the centre's 20 px
    small = lab[rows, cols] == 2
    assert list(zip(rows[small], cols[small])) == [(2, 47)]
    assert (lab[rows, cols] == 0).sum() >= 1  # the background ring is an object too


def test_clicks_fixed_per_image_and_seed_and_different_for_another_seed(patches):
    root, _ = patches
    a = PotsdamDataset(root, [0, 1], points="2/object", spec=DataSpec(scale=1.0), seed=3)
    b = PotsdamDataset(root, [1, 0], points="2/object", spec=DataSpec(scale=1.0), seed=3)
    c = PotsdamDataset(root, [0, 1], points="2/object", spec=DataSpec(scale=1.0), seed=4)
    first = a[0]["points"].clone()
    a.set_epoch(3)
    assert torch.equal(a[0]["points"], first) and torch.equal(b[1]["points"], first)
    assert not torch.equal(c[0]["points"], first)
    lab = a.native_label(0)
    x = object_clicks(lab, 2, np.random.default_rng(_image_seed(3, 0)))
    assert np.array_equal(x, object_clicks(lab, 2, np.random.default_rng(_image_seed(3, 0))))
    assert (first != IGNORE_INDEX).sum() == len(x)  # at native scale every click is its own labelled pixel


def test_budget_parsing_and_stats(patches):
    assert parse_points("1/object") == "1/object" and parse_points(" 2 / Objects ") == "2/object"
    assert parse_points(parse_points("3/obj")) == "3/object"
    assert clicks_per_object("2/object") == 2 and clicks_per_object("2%") is None and clicks_per_object(5) is None
    for bad in ("0/object", "x/object", "1/thing"):
        with pytest.raises(ValueError):
            parse_points(bad)
    with pytest.raises(ValueError, match="object_clicks"):
        point_count("1/object", 30, 30)
    root, labels = patches
    ds = PotsdamDataset(root, [0, 1], points="1/object", spec=DataSpec(scale=0.5))
    stats = ds.annotation_stats()
    n_objects = [len(objects_of(lab)) for lab in labels[:2]]
    assert stats["clicks_per_image"] == pytest.approx(np.mean(n_objects))
    assert stats["clicked_fraction"] == pytest.approx(sum(n_objects) / (2 * 48 * 48))
    assert 0 < stats["labelled_fraction"] == pytest.approx(ds.labelled_fraction())
    uniform = PotsdamDataset(root, [0, 1], points=30, spec=DataSpec(scale=0.5)).annotation_stats()
    assert uniform["clicks_per_image"] == 30


def test_training_from_object_clicks_reports_the_budget(data, tmp_path, capsys):
    history = train(cfg_for(data, tmp_path, points="1/object", epochs=1))
    out = capsys.readouterr().out
    assert "1/object clicks (" in out and "clicks per image" in out and "% of the pixels" in out
    assert read_checkpoint(tmp_path / "ck" / "last.pth").config["points"] == "1/object"
    assert len(history) == 1
