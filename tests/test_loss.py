import pytest
import torch
import torch.nn.functional as F

from spec import IGNORE_INDEX
from partial_ce_loss import PartialCrossEntropyLoss, partial_cross_entropy


def random_batch(seed=0, n=2, c=6, h=5, w=7, unlabelled=0.7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < unlabelled] = IGNORE_INDEX
    return logits, target


def test_gamma_zero_equals_cross_entropy():
    logits, target = random_batch()
    ours = partial_cross_entropy(logits, target, gamma=0.0)
    ref = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_gamma_zero_with_weights_equals_weighted_cross_entropy():
    logits, target = random_batch(1)
    w = torch.tensor([0.5, 1.0, 2.0, 0.7, 1.3, 0.5])
    ours = partial_cross_entropy(logits, target, weight=w, gamma=0.0)
    ref = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE_INDEX)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_points_normalisation_divides_by_point_count():
    logits, target = random_batch(2)
    w = torch.tensor([0.5, 1.0, 2.0, 0.7, 1.3, 0.5])
    per_pixel = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE_INDEX, reduction="none")
    expected = per_pixel.sum() / (target != IGNORE_INDEX).sum()
    ours = partial_cross_entropy(logits, target, weight=w, gamma=0.0, normalization="points")
    assert torch.allclose(ours, expected, atol=1e-6)


def test_focal_term_down_weights_easy_pixels():
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    easy = torch.tensor([4.0, -4.0]).view(1, 2, 1, 1)
    hard = torch.tensor([0.2, 0.0]).view(1, 2, 1, 1)
    ratio = lambda g: (partial_cross_entropy(hard, target, gamma=g) / partial_cross_entropy(easy, target, gamma=g))
    # with gamma 2 an easy pixel counts far less relative to a hard one than with plain CE
    assert ratio(2.0) > 100 * ratio(0.0)
    # and focal never exceeds CE
    assert partial_cross_entropy(hard, target, gamma=2.0) < partial_cross_entropy(hard, target, gamma=0.0)


def test_good_prediction_scores_lower_than_bad():
    target = torch.tensor([[[0, 1], [2, IGNORE_INDEX]]])
    good = F.one_hot(torch.tensor([[[0, 1], [2, 0]]]), 3).permute(0, 3, 1, 2).float() * 5
    bad = F.one_hot(torch.tensor([[[1, 2], [0, 0]]]), 3).permute(0, 3, 1, 2).float() * 5
    assert partial_cross_entropy(good, target) < partial_cross_entropy(bad, target)


def test_unlabelled_pixels_get_zero_gradient():
    logits, target = random_batch(3)
    logits.requires_grad_(True)
    PartialCrossEntropyLoss(gamma=2.0)(logits, target).backward()
    unlabelled = (target == IGNORE_INDEX).unsqueeze(1).expand_as(logits)
    assert logits.grad[unlabelled].abs().max() == 0
    assert logits.grad[~unlabelled].abs().max() > 0


def test_batch_without_labels_is_finite_zero_with_zero_gradient():
    logits = torch.randn(2, 6, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE_INDEX)
    loss = PartialCrossEntropyLoss(weight=torch.ones(6))(logits, target)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().max() == 0


def test_class_weight_scales_a_class_contribution():
    # two labelled pixels of different classes, equally wrong; up-weighting class 1 moves the loss toward it
    logits = torch.tensor([[[[0.0, 3.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    l0 = F.cross_entropy(logits, target, reduction="none")[0, 0]
    w = torch.tensor([1.0, 3.0])
    loss = partial_cross_entropy(logits, target, weight=w, gamma=0.0)
    expected = (l0[0] * 1 + l0[1] * 3) / 4
    assert torch.allclose(loss, expected)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="expected logits"):
        partial_cross_entropy(torch.randn(2, 6, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))
