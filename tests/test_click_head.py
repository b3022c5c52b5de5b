"""click_head.py: the network's features reproduce its map through its own classifier, a head anchored there paints
that map with no clicks and follows the clicks it is given, the plain head knows only the clicked classes; and the
page's `live` layer (page/live.py) repaints after a click without a Train."""

import numpy as np
import pytest
import torch
from PIL import Image

from page import head as click_head
from checkpoint import load_model, save_checkpoint
from model import TinySegmentation
from predict import predict_probabilities
from spec import DataSpec
from tests.conftest import colour_image


@pytest.fixture
def tiny(tmp_path):
    """A tiny network's checkpoint (6 Potsdam classes, scale 1) and a 40 x 52 PNG."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    save_checkpoint(path, TinySegmentation(6), DataSpec(scale=1.0))
    image = tmp_path / "im.png"
    Image.fromarray(colour_image(40, 52, 0)).save(image)
    return path, image


def test_the_network_classifier_on_its_features_is_its_map(tiny):
    path, image = tiny
    feats = click_head.Features(path)
    f = feats.of("im", image)
    assert f.shape == (16, 40, 52) and f.dtype == np.float16
    assert feats.of("im", image) is f  # cached
    model, _ = load_model(path)
    net = predict_probabilities(model, np.asarray(Image.open(image)), 1.0).argmax(0)
    head = click_head.fit_head(np.zeros((0, 16)), np.zeros(0), feats.weight, feats.bias)  # no clicks
    assert (head.predict(f) == net).mean() > 0.99  # float16 features: a tie may flip


def test_an_anchored_head_follows_its_clicks_and_keeps_a_map_they_agree_with(tiny):
    path, image = tiny
    feats = click_head.Features(path)
    f = feats.of("im", image)
    before = click_head.fit_head(np.zeros((0, 16)), np.zeros(0), feats.weight, feats.bias).predict(f)
    rows, cols = np.arange(0, 40, 4), np.full(10, 5)
    target = (before[rows, cols].astype(int) + 1) % 6  # every click says the map is wrong there
    head = click_head.fit_head(feats.at("im", image, rows, cols), target, feats.weight, feats.bias)
    after = head.predict(f)
    assert (after[rows, cols] == target).mean() >= 0.8 and (after != before).any()
    agree = click_head.fit_head(feats.at("im", image, rows, cols), before[rows, cols], feats.weight, feats.bias)
    kept = (agree.predict(f) == before).mean()  # clicks that say the map is right leave most of it
    assert kept > 0.8 and kept > (after == before).mean()


def test_the_plain_head_paints_only_the_clicked_classes(tiny):
    path, image = tiny
    feats = click_head.Features(path)
    rows, cols = np.array([2, 3, 30, 31]), np.array([2, 40, 10, 45])
    head = click_head.fit_head(feats.at("im", image, rows, cols), np.array([1, 1, 4, 4]), feats.weight, feats.bias,
                               anchored=False)
    assert set(np.unique(head.predict(feats.of("im", image)))) <= {1, 4}
    assert (head.predict(feats.window("im", image, rows, cols))[np.arange(4), np.arange(4)] == [1, 1, 4, 4]).all()


def test_grid_cells_follow_points_to_grid():
    r, c = click_head.grid_cells([0, 5, 9], [0, 10, 19], (10, 20), (5, 10))
    assert r.tolist() == [0, 2, 4] and c.tolist() == [0, 5, 9]
