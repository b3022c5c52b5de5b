"""Losses on the unlabelled pixels: the affinity (gated CRF) loss, FixMatch-style consistency, and short
training runs with each."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from checkpoint import read_checkpoint
from config import TrainConfig, config_from_args
from tests.conftest import cfg_for
from train import get_args_parser, train
from weak_losses import (AffinityLoss, ConsistencyLoss, affinity_loss, consistency_loss, geometric,
                         geometric_inverse, photometric, valid_pixels)


def two_colours(h=8, w=8, edge=4):
    """An (1, 3, h, w) image: dark grey left of column `edge`, light grey from it on."""
    image = torch.full((1, 3, h, w), 0.2)
    image[..., edge:] = 0.8
    return image


def split_at(column, h=8, w=8, c=3):
    """Confident logits: class 0 left of `column`, class 1 from it on."""
    logits = torch.full((1, c, h, w), -10.0)
    logits[:, 0, :, :column] = 10.0
    logits[:, 1, :, column:] = 10.0
    return logits


# --------------------------------------------------------------------------- affinity

def test_affinity_is_zero_for_a_prediction_constant_inside_uniform_regions():
    image = two_colours()
    assert affinity_loss(split_at(4), image).item() < 1e-6  # changes only at the colour edge
    assert affinity_loss(split_at(8), image).item() < 1e-6  # one class everywhere


def test_affinity_costs_more_inside_a_uniform_region_than_at_a_colour_edge():
    image = two_colours()
    at_edge, inside = affinity_loss(split_at(4), image), affinity_loss(split_at(2), image)
    assert inside > 100 * at_edge and inside > 1e-3
    # 1 - P_i.P_j also charges agreeing but unsure neighbours: a soft prediction costs everywhere
    assert affinity_loss(split_at(4) / 20, image) > 100 * at_edge


def test_affinity_equals_the_sum_over_pixel_pairs():
    """Against a direct double loop over every valid pixel and its dilated window neighbours."""
    g = torch.Generator().manual_seed(0)
    logits, image = torch.randn(2, 3, 5, 6, generator=g), torch.rand(2, 4, 5, 6, generator=g)
    valid = torch.rand(2, 5, 6, generator=g) > 0.2
    K, d, s_rgb, s_xy = 3, 2, 0.3, 1.5
    p = logits.softmax(1)
    total = 0.0
    for n in range(2):
        for y in range(5):
            for x in range(6):
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        yy, xx = y + dy * d, x + dx * d
                        if (dy, dx) == (0, 0) or not (0 <= yy < 5 and 0 <= xx < 6):
                            continue
                        if not (valid[n, y, x] and valid[n, yy, xx]):
                            continue
                        k = math.exp(-float(((image[n, :, y, x] - image[n, :, yy, xx]) ** 2).sum()) / (2 * s_rgb ** 2)
                                     - ((dy * d) ** 2 + (dx * d) ** 2) / (2 * s_xy ** 2))
                        total += k * (1 - float((p[n, :, y, x] * p[n, :, yy, xx]).sum()))
    expected = total / (int(valid.sum()) * (K * K - 1))
    got = AffinityLoss(K, d, s_rgb, s_xy)(logits, image, valid)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_affinity_ignores_padding():
    image, logits = two_colours(), split_at(2)
    padded_image = F.pad(image, (0, 4, 0, 3))  # what pad_collate does: zeros at the bottom / right
    padded_logits = torch.randn(1, 3, 11, 12) * 5
    padded_logits[..., :8, :8] = logits
    valid = valid_pixels(padded_image)
    assert valid.sum() == 64 and valid[0, :8, :8].all()
    assert affinity_loss(padded_logits, padded_image, valid).item() == pytest.approx(
        affinity_loss(logits, image).item(), rel=1e-6)
    assert affinity_loss(padded_logits, padded_image).item() != pytest.approx(affinity_loss(logits, image).item())


def test_affinity_gradient_flows_and_is_finite():
    logits = split_at(2).div(5).requires_grad_()
    affinity_loss(logits, two_colours()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert affinity_loss(logits, two_colours(), torch.zeros(1, 8, 8, dtype=torch.bool)).item() == 0


# --------------------------------------------------------------------------- consistency

@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_geometric_inverse_undoes_every_rotation_and_flip(k, flip):
    x = torch.arange(2 * 3 * 4 * 5.0).view(2, 3, 4, 5)  # non-square: a wrong inverse changes the shape
    y = geometric(x, k, flip)
    assert torch.equal(geometric_inverse(y, k, flip), x)
    if (k, flip) != (0, False):
        assert y.shape != x.shape or not torch.equal(y, x)
    # a per-pixel model sees the same pixels: its prediction of the view, turned back, is its prediction of x
    conv = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        assert torch.allclose(geometric_inverse(conv(y), k, flip), conv(x), atol=1e-6)


def test_consistency_is_zero_when_nothing_passes_the_threshold():
    strong = torch.randn(2, 3, 4, 4, requires_grad=True)
    weak = torch.zeros(2, 3, 4, 4)  # probability 1/3 everywhere
    loss = consistency_loss(strong, weak, threshold=0.95)
    loss.backward()
    assert loss.item() == 0 and strong.grad is not None and (strong.grad == 0).all()
    confident = torch.randn(2, 3, 4, 4) * 100
    assert consistency_loss(strong, confident, torch.zeros(2, 4, 4, dtype=torch.bool)).item() == 0  # no candidate


def test_consistency_is_the_cross_entropy_on_confident_candidates():
    weak = torch.zeros(1, 3, 2, 2)
    weak[0, 2, 0, 0] = 10.0  # confident: class 2
    weak[0, 1, 0, 1] = 10.0  # confident: class 1, but a labelled point
    weak[0, 0, 1, 0] = 0.5  # not confident
    strong = torch.randn(1, 3, 2, 2)
    mask = torch.tensor([[[True, False], [True, True]]])  # (0, 1) is labelled
    expected = F.cross_entropy(strong[..., 0, 0], torch.tensor([2])) / 3
    assert consistency_loss(strong, weak, mask, 0.95).item() == pytest.approx(expected.item(), rel=1e-6)


def test_consistency_gradient_reaches_the_model_and_padding_stays_black():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1)
    image = F.pad(torch.rand(2, 3, 6, 6) * 0.8 + 0.1, (0, 3, 0, 2))
    valid = valid_pixels(image)
    jittered = photometric(image, valid)
    assert (jittered[:, :, 6:] == 0).all() and (jittered[..., 6:] == 0).all()
    assert 0 <= jittered.min() and jittered.max() <= 1 and not torch.equal(jittered, image)
    weak = model(image).detach() * 50  # confident everywhere
    loss = ConsistencyLoss(threshold=0.95)(model, image, weak, valid)
    loss.backward()
    assert loss.item() > 0 and model.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- training with them

def test_affinity_training_lowers_the_loss_and_is_recorded(data, tmp_path, capsys):
    history = train(cfg_for(data, tmp_path, points="1/object", affinity_weight=0.5, epochs=3, augment=False,
                            lr=3e-3))
    total = [h["train_loss"] + 0.5 * h["train_affinity"] for h in history]
    assert total[-1] < total[0] and all(h["train_affinity"] > 0 for h in history)
    assert re.search(r"\| loss \d\.\d{4} affinity \d\.\d{4} OA", capsys.readouterr().out)
    config = read_checkpoint(tmp_path / "ck" / "last.pth").config
    assert config["affinity_weight"] == 0.5 and config["consistency_weight"] == 0


def test_consistency_training_lowers_the_loss_and_is_recorded(data, tmp_path, capsys):
    history = train(cfg_for(data, tmp_path, points="1/object", consistency_weight=1.0, consistency_threshold=0.5,
                            epochs=3, augment=False, lr=3e-3))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert any(h["train_consistency"] > 0 for h in history) and "train_affinity" not in history[0]
    assert re.search(r"\| loss \d\.\d{4} consistency \d\.\d{4} OA", capsys.readouterr().out)
    config = read_checkpoint(tmp_path / "ck" / "last.pth").config
    assert config["consistency_weight"] == 1.0 and config["consistency_threshold"] == 0.5


def test_terms_are_off_by_default_and_the_epoch_line_unchanged(data, tmp_path, capsys):
    history = train(cfg_for(data, tmp_path, epochs=1))
    assert not any(k in history[0] for k in ("train_affinity", "train_consistency"))
    assert re.search(r"\| loss \d\.\d{4} OA", capsys.readouterr().out)
    cfg = config_from_args(get_args_parser().parse_args(["--affinity-weight", "2", "--affinity-kernel", "7",
                                                         "--consistency-weight", "0.5",
                                                         "--consistency-threshold", "0.9"]))
    assert (cfg.affinity_weight, cfg.affinity_kernel, cfg.consistency_weight, cfg.consistency_threshold) == \
        (2.0, 7, 0.5, 0.9)
    d = TrainConfig()
    assert d.affinity_weight == 0 and d.consistency_weight == 0 and d.consistency_threshold == 0.95


@pytest.mark.parametrize("change, match", [
    (dict(affinity_weight=-1.0), "affinity-weight must be >= 0"), (dict(affinity_kernel=4), "odd"),
    (dict(consistency_threshold=1.5), "threshold"), (dict(consistency_weight=float("nan")), "consistency-weight"),
])
def test_bad_weak_settings_fail_before_training(data, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        train(cfg_for(data, tmp_path, **change))
    assert not (tmp_path / "ck").exists()
