"""The random-forest baseline learns from exactly the clicks a run trains on and is scored like the CNN."""

import numpy as np
import pytest
import torch

import forest
from metrics import ConfusionMatrix
from spec import IGNORE_INDEX
from tests.conftest import ToyClicks


class Toy(ToyClicks):
    """A two-class dataset: class 1 where the image is bright, 0 where dark; clicks on a few pixels only."""

    def __init__(self, n, clicks=4, seed=0, num_classes=2):
        from spec import ClassSpec
        rng = np.random.default_rng(seed)
        self.classes = ClassSpec(names=("dark", "bright"), palette=((0, 0, 0), (255, 255, 255)))
        self.images, self.labels, self.targets = [], [], []
        for _ in range(n):
            label = np.zeros((24, 24), np.uint8)
            r, c = rng.integers(2, 12, 2)
            label[r:r + 10, c:c + 10] = 1
            image = np.where(label, 0.8, 0.2)[None].repeat(3, 0) + rng.normal(0, 0.05, (3, 24, 24))
            target = np.full((24, 24), IGNORE_INDEX, np.uint8)
            for cls in (0, 1):
                rows, cols = np.nonzero(label == cls)
                pick = rng.choice(len(rows), clicks, replace=False)
                target[rows[pick], cols[pick]] = cls
            self.images.append(torch.from_numpy(image.astype(np.float32)))
            self.labels.append(label)
            self.targets.append(target)


def test_features_have_the_documented_shape():
    image = torch.rand(3, 16, 20)
    assert forest.pixel_features(image, "bands").shape == (16, 20, 3)
    multi = forest.pixel_features(image, "multiscale")
    assert multi.shape[:2] == (16, 20) and multi.shape[2] == 3 * 6 * 4  # bands x sigmas x (int, edge, 2 texture)
    with pytest.raises(ValueError, match="unknown forest features"):
        forest.pixel_features(image, "hog")


@pytest.mark.slow
def test_the_forest_learns_only_from_the_clicks_and_scores_like_the_cnn():
    train, val = Toy(4), Toy(3, seed=1)
    x, y = forest.training_pixels(train, "bands")
    assert len(y) == 4 * 8 and set(y.tolist()) == {0, 1}  # the clicks, nothing else
    out = forest.forest_baseline(train, val, "multiscale")
    cm = ConfusionMatrix(2, ("dark", "bright"))
    model = forest.fit_forest(train, "multiscale")
    for i in range(len(val)):
        cm.update(forest.predict(model, val.image(i), "multiscale"), val.dense_label(i))
    assert out["miou"] == pytest.approx(cm.compute()["miou"]) and out["miou"] > 0.8  # separable by brightness
    assert out["labelled_fraction"] == pytest.approx(train.labelled_fraction())


def test_the_forest_is_repeatable_and_caps_its_samples(monkeypatch):
    train, val = Toy(3), Toy(2, seed=1)
    a, b = (forest.forest_baseline(train, val, "bands", seed=3) for _ in range(2))
    assert a["miou"] == b["miou"] and a["iou"] == b["iou"]
    monkeypatch.setattr(forest, "MAX_SAMPLES", 5)
    assert len(forest.training_pixels(train, "bands")[1]) == 5
    empty = Toy(1)
    empty.targets = [np.full((24, 24), IGNORE_INDEX, np.uint8)]
    with pytest.raises(ValueError, match="no labelled training pixel"):
        forest.fit_forest(empty)
