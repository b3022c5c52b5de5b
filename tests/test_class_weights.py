import numpy as np
import pytest
import torch

from class_weights import compute_class_weights, load_class_weights, save_class_weights, weights_from_counts
from dataset import PotsdamDataset
from spec import CLASSES, DataSpec


def test_inverse_frequency_sums_to_num_classes():
    w = weights_from_counts([100, 300, 600], ("a", "b", "c"), "inverse")
    assert w.sum().item() == pytest.approx(3)
    # inverse frequency: w ~ 1/f -> ratio a:b = 3
    assert (w[0] / w[1]).item() == pytest.approx(3)
    assert (w[1] / w[2]).item() == pytest.approx(2)


def test_unseen_class_gets_finite_weight_and_warning():
    with pytest.warns(UserWarning, match="never seen"):
        w = weights_from_counts([100, 0, 50], ("a", "b", "c"), "inverse")
    assert torch.isfinite(w).all() and w[1] == w.max()


def test_points_vs_dense(patches):
    root, _ = patches
    ds = PotsdamDataset(root, points=30, spec=DataSpec(scale=1.0))
    wp, cp = compute_class_weights(ds, "points", "inverse")
    wd, cd = compute_class_weights(ds, "dense", "inverse")
    # points count only the annotated pixels; dense counts every defined pixel
    assert cp.sum() <= 30 * len(ds) < cd.sum()
    assert cd.sum() == sum(int((ds.dense_label(i) != 255).sum()) for i in range(len(ds)))
    assert not torch.allclose(wp, wd)


def test_save_load_round_trip_and_class_check(tmp_path):
    w = torch.tensor([1.0, 2, 3, 0.5, 0.25, 0.25])
    save_class_weights(tmp_path / "w.pt", w, np.arange(6), "points", CLASSES, "inverse")
    assert torch.equal(load_class_weights(tmp_path / "w.pt", CLASSES), w)
    with pytest.raises(ValueError, match="classes"):
        load_class_weights(tmp_path / "w.pt", names=("x", "y"))


def test_schemes_order_and_tame_the_rare_class():
    counts = [9600, 300, 100]  # 96 / 3 / 1 %
    w = {s: weights_from_counts(counts, names=("a", "b", "c"), scheme=s) for s in
         ("inverse", "sqrt", "median", "effective", "capped")}
    for s, v in w.items():
        assert v.sum().item() == pytest.approx(3), s
        assert v[0] < v[1] <= v[2], s  # rarer, heavier (capped: b and c both hit the cap)
    ratio = {s: (v[2] / v[0]).item() for s, v in w.items()}
    assert ratio["inverse"] == pytest.approx(96)
    assert ratio["sqrt"] == pytest.approx(96 ** 0.5)
    assert ratio["capped"] == pytest.approx(10)
    assert (w["median"][1] / w["median"][0]).item() == pytest.approx(32)  # median / f: same ratios as inverse
    assert ratio["sqrt"] < ratio["inverse"] and ratio["effective"] < ratio["inverse"]
    with pytest.raises(ValueError, match="unknown class weighting"):
        weights_from_counts(counts, names=("a", "b", "c"), scheme="focal")


@pytest.mark.parametrize("content, match", [
    (torch.ones(3), "holds a Tensor; class weights must be a dict"),
    ({"weights": torch.ones(2), "classes": ["a", "b", "c"]}, r"\(2,\) weights for 3 classes"),
    ({"weights": torch.tensor([1.0, float("nan"), 1.0]), "classes": ["a", "b", "c"]}, "finite"),
    ({"weights": torch.tensor([1.0, -1.0, 1.0]), "classes": ["a", "b", "c"]}, ">= 0"),
    ({"classes": ["a", "b", "c"]}, "without weights or classes"),
])
def test_a_bad_class_weights_file_is_refused_with_what_it_must_hold(tmp_path, content, match):
    torch.save(content, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=match) as e:
        load_class_weights(tmp_path / "w.pt", ("a", "b", "c"))
    assert str(tmp_path / "w.pt") in str(e.value)
