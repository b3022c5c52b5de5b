"""Reference rows of the experiments: a random forest on the same clicks, and the all-background baseline."""

from dataclasses import replace

import numpy as np
import pytest

from research import experiments as E
from research import reports
from tests.conftest import KEYS, fake_row, write_patches
from config import TrainConfig
from train import build_datasets


def test_a_reference_row_keys_off_its_cnn_run_and_leaves_cnn_keys_alone():
    run = replace(E.BASELINE, points=10)
    forest = E.Reference(run, "forest-multiscale")
    import forest as F
    assert KEYS.config_key(forest) == KEYS.config_key(run) + "-forest-multiscale-" + F.settings_id()
    assert KEYS.run_key(forest, 2) == KEYS.config_key(forest) + "-s2"
    assert KEYS.config_key(E.Reference(run, "majority")) == KEYS.config_key(run) + "-majority"
    assert forest.points == 10 and forest.name == "forest-multiscale-" + run.name
    planned = E.plan_runs(KEYS, {8}, seeds=1)
    refs = [p for p in planned if isinstance(p.run, E.Reference)]
    assert {p.run.method for p in refs} == {"forest-multiscale", "forest-bands", "majority"}
    assert all(p.config == KEYS.config(p.run.run, 0) for p in refs)  # trains on exactly the CNN row's clicks


def test_measured_references_use_the_runs_clicks_and_the_dense_val_labels(tmp_path):
    write_patches(tmp_path / "p", n=6, size=(32, 32))
    cfg = TrainConfig(data=str(tmp_path / "p"), size=32, points=30, train_ids=[0, 1, 2, 3], val_ids=[4, 5],
                      figures=False, progress=False)
    forest = E.measure_reference(cfg, "forest-bands")
    train_ds, val_ds, _, _ = build_datasets(cfg)
    assert forest["labelled_fraction"] == pytest.approx(train_ds.labelled_fraction()) and forest["n_val"] == 2
    assert 0 <= forest["history"][0]["val_miou"] <= 1
    majority = E.measure_reference(cfg, "majority")["history"][0]
    targets = np.concatenate([train_ds.point_grid(i).ravel() for i in range(4)])
    top = np.bincount(targets[targets < 6], minlength=6).argmax()
    labels = np.concatenate([val_ds.dense_label(i).ravel() for i in range(2)])
    labels = labels[labels < 6]
    share = float((labels == top).mean())
    assert majority["val_oa"] == pytest.approx(share)  # the majority class everywhere: OA is its val share
    name = train_ds.classes.names[top]
    assert majority["val_iou"][name] == pytest.approx(share)
    assert majority["val_miou"] == pytest.approx(share / len([c for c in range(6) if (labels == c).any() or c == top]))


def test_the_verdict_compares_the_best_cnn_with_the_forest_on_the_same_clicks():
    ce = replace(E.BASELINE, points=10)
    forest = E.Reference(ce, "forest-multiscale")
    rows = [fake_row(ce, s, m) for s, m in enumerate((0.60, 0.62, 0.64))]
    rows += [fake_row(forest, s, m) for s, m in enumerate((0.58, 0.60, 0.62))]  # 2 points below the CNN
    text = reports.few_clicks_verdict(rows, KEYS)
    assert ("- 10: best CNN '10 points, partial CE' minus the random forest on multiscale features (same clicks): "
            "+2.0 ± 0.0 mIoU points (paired, 3 seeds; forest 60.0 ± 2.0 %); goal >= +5: NOT met, short by 3.0.") \
        in text
    rows += [fake_row(forest, 3, 0.5), fake_row(ce, 3, 0.7)]  # a fourth seed: +20 points, mean +6.5
    assert "+6.5 ± 9.0 mIoU points (paired, 4 seeds; forest 57.5 ± 5.3 %); goal >= +5: met." in \
        reports.few_clicks_verdict(rows, KEYS)
