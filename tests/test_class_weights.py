import numpy as np
import pytest
import torch

from class_weights import (compute_class_weights, estimate_pixel_shares, load_class_weights, pixel_shares,
                           save_class_weights, weights_from_counts, weights_from_shares)
from dataset import PotsdamDataset
from spec import CLASSES, IGNORE_INDEX, DataSpec
from tests.conftest import ToyClicks


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
    wp, cp, no_shares = compute_class_weights(ds, "points", "inverse")
    wd, cd, _ = compute_class_weights(ds, "dense", "inverse")
    assert no_shares is None  # only the pixels source estimates shares
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


# --------------------------------------------------------------------------- weights that follow the pixels

def test_em_recovers_the_pixel_shares_behind_posteriors_learnt_under_other_shares():
    """Two overlapping 1-D Gaussian classes, 10 % / 90 % of the pixels; a classifier's calibrated posteriors learnt
    where the clicks made them 60 % / 40 %. The EM finds the pixel shares; posteriors learnt under the right
    shares leave them where they are."""
    rng = np.random.default_rng(0)
    truth = np.array([0.1, 0.9])
    y = rng.random(200_000) < truth[1]
    x = rng.normal(np.where(y, 1.5, 0.0), 1.0)

    def posteriors(prior):
        like = np.stack([np.exp(-x ** 2 / 2), np.exp(-(x - 1.5) ** 2 / 2)]) * np.asarray(prior)[:, None]
        return like / like.sum(0)

    clicks = np.array([0.6, 0.4])
    est = estimate_pixel_shares(posteriors(clicks), clicks)
    assert est == pytest.approx(truth, abs=0.01)
    assert estimate_pixel_shares(posteriors(truth), truth) == pytest.approx(truth, abs=0.01)
    with pytest.raises(ValueError, match="classes, pixels"):
        estimate_pixel_shares(posteriors(clicks)[:1], clicks)


def test_weights_from_shares_make_clicks_count_as_their_pixels():
    names = ("background", "building")
    clicks = np.array([40, 60])  # one click per object: the rare class has most clicks
    shares = np.array([0.95, 0.05])
    sqrt = weights_from_shares(shares, clicks, names, "sqrt")
    assert sqrt.sum().item() == pytest.approx(2)
    # each class's clicks x weight ~ its pixels x the scheme's weight for its share
    w_pixels = weights_from_counts(shares * 1000, names, "sqrt")
    click_mass, pixel_mass = clicks * sqrt.numpy(), shares * w_pixels.numpy()
    assert click_mass / click_mass.sum() == pytest.approx(pixel_mass / pixel_mass.sum())
    assert sqrt[1] < weights_from_counts(clicks, names, "sqrt")[1]  # the clicks overstated the building class
    # inverse frequency makes every class count the same: the shares cancel out
    assert torch.allclose(weights_from_shares(shares, clicks, names, "inverse"),
                          weights_from_counts(clicks, names, "inverse"))


class ObjectClicks(ToyClicks):
    """Dark images with small bright objects (6x6 pixels, about 5 % of the pixels), each clicked once at a random
    pixel of it, and two background clicks per image: the clicks say the objects are the common class."""

    def __init__(self, n=6, seed=0):
        from spec import ClassSpec
        rng = np.random.default_rng(seed)
        self.classes = ClassSpec(names=("background", "object"), palette=((0, 0, 0), (255, 255, 255)))
        self.images, self.labels, self.targets = [], [], []
        for _ in range(n):
            label = np.zeros((60, 60), np.uint8)
            target = np.full((60, 60), IGNORE_INDEX, np.uint8)
            for k, c in enumerate(rng.integers(1, 8, 5) * 7):
                r = 3 + 11 * k
                label[r:r + 6, c:c + 6] = 1
                dr, dc = rng.integers(0, 6, 2)
                target[r + dr, c + dc] = 1
            for r, c in np.argwhere(label == 0)[rng.choice(int((label == 0).sum()), 2, replace=False)]:
                target[r, c] = 0
            image = np.where(label, 0.8, 0.2)[None] + rng.normal(0, 0.05, (1, 60, 60))
            self.images.append(torch.from_numpy(image.astype(np.float32)))
            self.labels.append(label)
            self.targets.append(target)


@pytest.mark.slow
def test_pixels_source_estimates_the_shares_from_the_clicks_alone(capsys):
    ds = ObjectClicks()
    truth = np.mean([lab.mean() for lab in ds.labels])
    clicked = sum((t == 1).sum() for t in ds.targets) / sum((t != IGNORE_INDEX).sum() for t in ds.targets)
    shares, counts = pixel_shares(ds, seed=0)
    assert clicked > 0.7 and truth < 0.1
    assert abs(shares[1] - truth) < 0.03  # the forest separates the classes: the EM finds the share
    w, c, s = compute_class_weights(ds, "pixels", "sqrt", seed=0)
    assert "estimated pixel shares from the clicks" in capsys.readouterr().out
    quiet = compute_class_weights(ds, "pixels", "sqrt", seed=0, say=False)[0]  # what torchrun's other ranks do
    assert torch.equal(quiet, w)
    assert capsys.readouterr().out == ""
    assert np.array_equal(c, counts) and np.array_equal(s, shares)
    assert torch.equal(w, weights_from_shares(shares, counts, ds.classes.names, "sqrt"))
    assert w[1] < w[0] < compute_class_weights(ds, "points", "sqrt")[0][0] + 1  # objects weigh less than the clicks say
    ds.labels = [lab * 0 + IGNORE_INDEX for lab in ds.labels]  # nothing defined: nothing to estimate from
    with pytest.raises(ValueError, match="no defined pixel"):
        pixel_shares(ds)
