import math

import pytest
import torch

from spec import IGNORE_INDEX
from metrics import ConfusionMatrix


def test_against_hand_computed_confusion_matrix():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, IGNORE_INDEX, IGNORE_INDEX])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1, 2])
    cm = ConfusionMatrix(3, names=("a", "b", "c")).update(pred, target)
    assert cm.mat.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    r = cm.compute()
    assert r["pixels"] == 8
    assert r["oa"] == pytest.approx(5 / 8)
    # IoU: a 2/(2+1+1), b 1/(1+1+1), c 2/(2+1+1)
    assert r["iou"] == pytest.approx({"a": 0.5, "b": 1 / 3, "c": 0.5})
    assert r["miou"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    # F1: a 4/6, b 2/4, c 4/6
    assert r["f1"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 2 / 3})
    assert r["mf1"] == pytest.approx((2 / 3 + 0.5 + 2 / 3) / 3)


def test_excluding_a_class_changes_means_not_oa():
    target = torch.tensor([0, 0, 1, 2])
    pred = torch.tensor([0, 0, 1, 1])
    cm = ConfusionMatrix(3, names=("a", "b", "clutter")).update(pred, target)
    full, without = cm.compute(), cm.compute(exclude=("clutter",))
    assert without["oa"] == full["oa"] == pytest.approx(0.75)
    assert without["miou"] == pytest.approx((1.0 + 0.5) / 2)
    assert full["miou"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    with pytest.raises(ValueError, match="cannot exclude"):
        cm.compute(exclude=("cars",))


def test_absent_class_is_left_out_of_means():
    cm = ConfusionMatrix(3, names=("a", "b", "c")).update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    r = cm.compute()
    assert math.isnan(r["iou"]["c"]) and r["miou"] == 1.0


def test_accumulates_over_batches():
    cm = ConfusionMatrix(2, names=("a", "b"))
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    cm.update(torch.tensor([[1]]), torch.tensor([[1]]))
    assert cm.mat.tolist() == [[1, 1], [0, 1]]


def test_target_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(2, names=("a", "b")).update(torch.tensor([0]), torch.tensor([5]))
