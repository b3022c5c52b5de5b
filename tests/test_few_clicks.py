"""few_clicks.py: self-training and model-chosen clicks as rounds inside one run; the dataset's growing
annotation; resume; the experiments' keys and figure."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from research import experiments as E
from research import reports
import few_clicks
from checkpoint import read_checkpoint
from dataset import SegmentationDataset, patch_pairs, points_to_grid
from spec import IGNORE_INDEX, DataSpec
from config import CLICK_STRATEGIES, TrainConfig, check_config, config_from_args
from train import get_args_parser, train


def dataset(root, ids=range(4), points=10, scale=0.5, seed=0):
    return SegmentationDataset(patch_pairs(root, list(ids)), spec=DataSpec(scale=scale), points=points, seed=seed)


def config(**kw):
    return TrainConfig(**{"epochs": 8, "batch_size": 4, "annotation_seed": 0, **kw})


class Fixed(torch.nn.Module):
    """A 'model' that predicts the same logits (C,) or (C, h, w) for every image."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.as_tensor(logits, dtype=torch.float32)
        self.weight = torch.nn.Parameter(torch.zeros(()))  # something to be in train or eval mode

    def forward(self, x):
        n, _, h, w = x.shape
        logits = self.logits if self.logits.dim() == 3 else self.logits[:, None, None].expand(-1, h, w)
        return logits.expand(n, -1, -1, -1)


def one_hot_logits(c, k=6, sure=20.0):
    logits = torch.zeros(k)
    logits[c] = sure
    return logits


# --------------------------------------------------------------------------- schedule and choice

def test_rounds_split_the_epochs_evenly():
    assert few_clicks.round_epochs(8, 3) == [2, 4, 6]
    assert few_clicks.round_epochs(20, 3) == [5, 10, 15]
    assert few_clicks.round_epochs(2, 1) == [1]
    assert few_clicks.round_epochs(8, 0) == []
    with pytest.raises(ValueError, match="at least 4 epochs"):
        few_clicks.round_epochs(3, 3)


@pytest.mark.slow
@pytest.mark.parametrize("H, W, h, w", [(48, 48, 24, 24), (300, 300, 75, 75), (37, 53, 12, 17), (10, 7, 20, 14)])
def test_a_cell_centre_falls_in_its_own_cell(H, W, h, w):
    centres = few_clicks.cell_centres(H, W, h, w)
    label = np.zeros((H, W), np.uint8)
    for cell in np.flatnonzero(centres.reshape(-1) >= 0):
        label.reshape(-1)[:] = 0
        label.reshape(-1)[centres.reshape(-1)[cell]] = 1
        grid = points_to_grid(label, centres.reshape(-1)[cell:cell + 1], (h, w))
        assert np.flatnonzero(grid.reshape(-1) == 1).tolist() == [cell]
    if h > H:  # a finer grid than the file: some cells hold no native pixel
        assert (centres < 0).any()


def test_uncertain_takes_the_smallest_margins_of_a_hand_made_map():
    prob = np.zeros((3, 6, 6), np.float32)
    prob[0] = 0.9
    prob[1] = 0.05
    prob[2] = 0.05
    for (y, x), (a, b) in {(1, 1): (0.40, 0.39), (4, 4): (0.45, 0.40), (0, 5): (0.5, 0.3), (5, 0): (0.6, 0.3)}.items():
        prob[:, y, x] = (a, b, 1 - a - b)
    cand = np.ones((6, 6), bool)
    picks = few_clicks.choose_cells(prob, cand, 3, spacing=1)
    assert [divmod(int(j), 6) for j in picks] == [(1, 1), (4, 4), (0, 5)]  # margins 0.01, 0.05, 0.2
    cand[1, 1] = False  # already clicked: never again
    assert [divmod(int(j), 6) for j in few_clicks.choose_cells(prob, cand, 2, spacing=1)] == [(4, 4), (0, 5)]


def test_choices_keep_their_spacing_and_stay_on_candidates():
    rng = np.random.default_rng(0)
    prob = rng.dirichlet(np.ones(4), size=(40, 50)).transpose(2, 0, 1)
    cand = rng.random((40, 50)) > 0.3
    for strategy in CLICK_STRATEGIES:
        picks = few_clicks.choose_cells(prob, cand, 12, spacing=5, strategy=strategy, rng=np.random.default_rng(1))
        assert picks.size == 12 and cand.reshape(-1)[picks].all() and np.unique(picks).size == 12
        yx = np.stack(np.divmod(picks, 50), 1)
        d = np.sqrt(((yx[:, None] - yx[None]) ** 2).sum(-1)) + np.eye(12) * 99
        assert d.min() >= 5


def test_margin_is_the_old_uncertain_and_entropy_ranks_by_all_the_classes():
    prob = np.zeros((3, 4, 4))
    prob[0] = 1.0  # sure everywhere but three cells
    prob[:, 0, 0] = (0.5, 0.5, 0.0)  # margin 0, entropy ln 2 = 0.69
    prob[:, 3, 3] = (0.4, 0.3, 0.3)  # margin 0.1, entropy 1.09
    prob[:, 0, 3] = (0.8, 0.1, 0.1)  # margin 0.7, entropy 0.64
    cand = np.ones((4, 4), bool)
    pick = lambda s: [divmod(int(j), 4) for j in few_clicks.choose_cells(prob, cand, 3, spacing=1, strategy=s)]
    assert pick("margin") == pick("uncertain") == [(0, 0), (3, 3), (0, 3)]
    assert pick("entropy") == [(3, 3), (0, 0), (0, 3)]


def test_spread_takes_the_least_sure_cells_far_apart_and_never_within_the_spacing():
    prob = np.zeros((2, 30, 30))
    prob[0] = 0.95
    prob[1] = 0.05
    unsure = [(y, x) for y in range(0, 6) for x in range(0, 6)] + [(25, 25), (2, 27), (27, 2)]
    for i, (y, x) in enumerate(unsure):
        prob[:, y, x] = (0.5 + 0.001 * i, 0.5 - 0.001 * i)  # a cluster in one corner, three alone
    cand = np.ones((30, 30), bool)
    spread = few_clicks.choose_cells(prob, cand, 4, spacing=2, strategy="spread")
    margin = few_clicks.choose_cells(prob, cand, 4, spacing=2, strategy="margin")
    yx = lambda picks, w=30: np.stack(np.divmod(picks, w), 1)
    assert {divmod(int(j), 30) for j in spread} == {(0, 0), (25, 25), (2, 27), (27, 2)}  # the corner, then the far
    assert all(y < 6 and x < 6 for y, x in yx(margin))  # margin stays in the cluster
    rng = np.random.default_rng(0)
    for _ in range(5):
        prob = rng.dirichlet(np.ones(3), size=(30, 40)).transpose(2, 0, 1)
        cand = rng.random((30, 40)) > 0.2
        picks = few_clicks.choose_cells(prob, cand, 15, spacing=6, strategy="spread")
        p = yx(picks, 40)
        d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1)) + np.eye(len(p)) * 99
        assert len(p) > 1 and d.min() >= 6 and cand.reshape(-1)[picks].all()


def test_balanced_takes_each_predicted_class_in_turn_rarest_first():
    prob = np.zeros((3, 10, 10))
    prob[0] = 0.6  # class 0 predicted on most cells, the least sure of all
    prob[1] = 0.4
    prob[:, 8:, :] = np.array([0.1, 0.2, 0.7])[:, None, None]  # class 2 on 20 cells, sure
    prob[:, 5:8, :] = np.array([0.3, 0.65, 0.05])[:, None, None]  # class 1 on 30 cells
    prob[:, 6, 4] = (0.3, 0.55, 0.15)  # the least sure of class 1
    cand = np.ones((10, 10), bool)
    picks = few_clicks.choose_cells(prob, cand, 6, spacing=1, strategy="balanced")
    predicted = prob.argmax(0).reshape(-1)[picks]
    assert predicted.tolist() == [2, 1, 0, 2, 1, 0]
    assert divmod(int(picks[1]), 10) == (6, 4)
    # margin alone takes class 0 only (its margin 0.2 is the smallest)
    assert set(prob.argmax(0).reshape(-1)[few_clicks.choose_cells(prob, cand, 6, spacing=1)].tolist()) == {0}
    cand[5:, :] = False  # classes 1 and 2 have no candidate left: class 0 takes every turn
    assert set(prob.argmax(0).reshape(-1)[few_clicks.choose_cells(prob, cand, 4, spacing=1,
                                                                  strategy="balanced")].tolist()) == {0}


def test_fewer_clicks_only_when_fewer_candidates_keep_the_spacing():
    prob = np.full((2, 10, 10), 0.5, np.float32)
    cand = np.zeros((10, 10), bool)
    cand[0, 0] = cand[0, 1] = cand[9, 9] = True  # (0, 1) is too close to (0, 0) at spacing 3
    assert few_clicks.choose_cells(prob, cand, 5, spacing=3).size == 2
    assert few_clicks.choose_cells(prob, cand, 5, spacing=1).size == 3
    assert few_clicks.choose_cells(prob, np.zeros((10, 10), bool), 5).size == 0


def test_random_choices_depend_on_the_seed_only():
    prob = np.full((2, 30, 30), 0.5, np.float32)
    cand = np.ones((30, 30), bool)
    a = few_clicks.choose_cells(prob, cand, 8, strategy="random", rng=np.random.default_rng(3))
    assert np.array_equal(a, few_clicks.choose_cells(prob, cand, 8, strategy="random", rng=np.random.default_rng(3)))
    assert not np.array_equal(a, few_clicks.choose_cells(prob, cand, 8, strategy="random",
                                                         rng=np.random.default_rng(4)))


# --------------------------------------------------------------------------- the dataset's growing annotation

def test_added_clicks_get_their_true_class_and_count_in_the_stats(patches):
    root, labels = patches
    ds = dataset(root)
    before = ds.annotation_stats()
    native = ds.native_label(0)
    free = np.setdiff1d(np.flatnonzero(native.reshape(-1) != IGNORE_INDEX), ds.click_pixels(0))[:3]
    ds.add_clicks(0, free)
    after = ds.annotation_stats()
    assert after["clicks_per_image"] == pytest.approx(before["clicks_per_image"] + 3 / 4)
    grid = ds.point_grid(0)
    rows, cols = np.divmod(free, native.shape[1])
    h, w = grid.shape
    cells = grid[rows * h // native.shape[0], cols * w // native.shape[1]]
    assert np.array_equal(cells[cells != IGNORE_INDEX], labels[0].reshape(-1)[free][cells != IGNORE_INDEX])
    undefined = np.flatnonzero(native.reshape(-1) == IGNORE_INDEX)[:1]
    for bad, match in ((undefined, "undefined"), (free[:1], "clicked twice"), ([native.size], "outside")):
        with pytest.raises(ValueError, match=match):
            ds.add_clicks(0, bad)


def test_a_click_always_beats_a_pseudo_label(patches):
    root, _ = patches
    ds = dataset(root)
    clicks, clicked = ds.click_grid(0).copy(), ds.clicked_cells(0)
    wrong = np.where(clicks == IGNORE_INDEX, 0, (clicks.astype(int) + 1) % 6).astype(np.uint8)
    ds.set_pseudo(0, wrong)  # every clicked cell pseudo-labelled with another class
    grid = ds.point_grid(0)
    assert np.array_equal(grid[clicked], clicks[clicked])
    assert (grid[(ds.dense_label(0) == IGNORE_INDEX) & ~clicked] == IGNORE_INDEX).all()  # undefined: no pseudo
    # a click added later wins over the pseudo-label already on its cell
    native = ds.native_label(0)
    free = np.setdiff1d(np.flatnonzero(native.reshape(-1) != IGNORE_INDEX), ds.click_pixels(0))
    target = next(p for p in free if ds.point_grid(0)[p // 48 // 2, p % 48 // 2] != native.reshape(-1)[p])
    ds.add_clicks(0, [target])
    assert ds.point_grid(0)[target // 48 // 2, target % 48 // 2] == native.reshape(-1)[target]
    assert ds.annotation_stats()["labelled_fraction"] < ds.annotation_stats()["pseudo_fraction"]


# --------------------------------------------------------------------------- rounds through end_of_epoch

def test_self_training_keeps_the_clicks_and_labels_only_confident_pixels(patches, capsys):
    root, _ = patches
    ds = dataset(root)
    clicks = [ds.click_grid(i).copy() for i in range(len(ds))]
    wrong = Fixed(one_hot_logits(5))  # sure of class 5 (clutter) everywhere, clicked pixels included
    assert not few_clicks.end_of_epoch(config(self_training=3), 1, wrong, ds, "cpu")  # no round after epoch 1
    assert few_clicks.end_of_epoch(config(self_training=3), 2, wrong, ds, "cpu")
    for i in range(len(ds)):
        grid, clicked, dense = ds.point_grid(i), ds.clicked_cells(i), ds.dense_label(i)
        assert np.array_equal(grid[clicked], clicks[i][clicked])  # every click kept its class
        assert (grid[~clicked & (dense != IGNORE_INDEX)] == 5).all()
        assert (grid[(dense == IGNORE_INDEX) & ~clicked] == IGNORE_INDEX).all()
    assert "self-training round 1/3 after epoch 2" in capsys.readouterr().out
    unsure = Fixed(torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.0]))  # softmax max about 0.25
    few_clicks.end_of_epoch(config(self_training=3, pseudo_threshold=0.9), 4, unsure, ds, "cpu")
    assert all(np.array_equal(ds.point_grid(i), clicks[i]) for i in range(len(ds)))  # replaced: none left
    few_clicks.end_of_epoch(config(self_training=3, pseudo_threshold=0.2), 6, unsure, ds, "cpu")
    assert (ds.point_grid(0)[~ds.clicked_cells(0) & (ds.dense_label(0) != IGNORE_INDEX)] == 0).all()


def test_model_chosen_clicks_are_new_revealed_spread_and_where_the_model_is_unsure(patches):
    root, labels = patches
    ds = dataset(root)
    before = [ds.click_pixels(i) for i in range(len(ds))]
    logits = torch.zeros(6, 24, 24)
    logits[0] = 10.0
    logits[0, 2:22:6, 2:22:6] = 0.0  # 16 unsure cells, 6 apart, on a sure background
    cfg = config(rounds=3, clicks_per_round=5, click_spacing=4)
    assert few_clicks.end_of_epoch(cfg, 2, Fixed(logits), ds, "cpu")
    unsure = set(np.flatnonzero((logits[0] == 0).numpy().reshape(-1)))
    for i in range(len(ds)):
        new = ds.added_clicks(i)
        native = labels[i].reshape(-1)
        assert new.size == 5 and not np.isin(new, before[i]).any() and (new >= 0).all() and (new < 48 * 48).all()
        assert (native[new] != IGNORE_INDEX).all()
        rows, cols = np.divmod(new, 48)
        cells = (rows // 2) * 24 + cols // 2
        grid = ds.click_grid(i).reshape(-1)
        assert np.array_equal(grid[cells], native[new])  # the annotator told the true class
        candidates = few_clicks.click_candidates(ds, i)[1]  # after the round: free cells
        assert set(cells) <= unsure or not (candidates.reshape(-1)[list(unsure)]).any()
        yx = np.stack(np.divmod(cells, 24), 1)
        assert (np.sqrt(((yx[:, None] - yx[None]) ** 2).sum(-1)) + np.eye(5) * 99).min() >= 4
    assert ds.annotation_stats()["clicks_per_image"] == pytest.approx(15)


def test_random_clicks_are_reproducible_per_seed(patches):
    root, _ = patches
    model = Fixed(one_hot_logits(0))
    runs = []
    for seed in (0, 0, 1):
        ds = dataset(root, seed=0)
        few_clicks.end_of_epoch(config(rounds=1, click_strategy="random", annotation_seed=seed), 4, model, ds, "cpu")
        runs.append([ds.added_clicks(i) for i in range(len(ds))])
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_state_restores_clicks_and_pseudo_labels_on_a_fresh_dataset(patches):
    root, _ = patches
    ds = dataset(root)
    few_clicks.end_of_epoch(config(rounds=1, self_training=1), 4, Fixed(one_hot_logits(2)), ds, "cpu")
    fresh = dataset(root)
    few_clicks.restore(fresh, few_clicks.state(ds))
    for i in range(len(ds)):
        assert np.array_equal(fresh.point_grid(i), ds.point_grid(i))
        assert np.array_equal(fresh.added_clicks(i), ds.added_clicks(i))
    assert fresh.annotation_stats() == ds.annotation_stats()


# --------------------------------------------------------------------------- train.py

def cfg_for(root, tmp_path, **kw):
    base = dict(data=str(root), arch="tiny", pretrained=False, epochs=6, batch_size=4, size=32, points=10,
                out=str(tmp_path / "ck"), figures=False, progress=False, train_ids=list(range(6)), val_ids=[6, 7],
                augment=False, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_self_training_run_learns_and_keeps_its_pseudo_labels(data, tmp_path, capsys):
    history = train(cfg_for(data, tmp_path, self_training=2, pseudo_threshold=0.3))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    out = capsys.readouterr().out
    assert "self-training round 1/2 after epoch 2" in out and "self-training round 2/2 after epoch 4" in out
    st = read_checkpoint(tmp_path / "ck" / "last.pth").train_state["few_clicks"]
    assert st["pseudo"] and not st["clicks"]


@pytest.mark.slow
def test_click_rounds_run_learns_and_the_stats_count_the_new_clicks(data, tmp_path, capsys):
    history = train(cfg_for(data, tmp_path, rounds=2, clicks_per_round=5))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert "now 20.0 clicks per image" in capsys.readouterr().out
    ds = dataset(data, ids=range(6), scale=32 / 48)
    few_clicks.restore(ds, read_checkpoint(tmp_path / "ck" / "last.pth").train_state["few_clicks"])
    assert ds.annotation_stats()["clicks_per_image"] == pytest.approx(20)
    # the history records the clicked share as each epoch ends: it grows at the rounds, and ends at the final
    # annotation's (what experiments.py reports as the run's budget)
    shares = [h["labelled_fraction"] for h in history]
    assert shares == sorted(shares) and shares[0] < shares[-1]
    assert shares[-1] == pytest.approx(ds.labelled_fraction())


@pytest.mark.slow
def test_resume_restores_the_added_clicks(data, tmp_path, monkeypatch):
    cfg = cfg_for(data, tmp_path, epochs=4, rounds=1, self_training=1, pseudo_threshold=0.3)
    straight = train(replace(cfg, out=str(tmp_path / "s")))
    original = few_clicks.end_of_epoch

    def killed_after_epoch_2(cfg, epoch, *args):
        if epoch == 3:
            raise KeyboardInterrupt
        return original(cfg, epoch, *args)
    monkeypatch.setattr(few_clicks, "end_of_epoch", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, out=str(tmp_path / "r")))
    monkeypatch.setattr(few_clicks, "end_of_epoch", original)
    resumed = train(replace(cfg, out=str(tmp_path / "r"), resume=True))
    assert resumed[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"], rel=1e-5)
    a, b = (read_checkpoint(tmp_path / d / "last.pth").train_state["few_clicks"] for d in ("s", "r"))
    assert a["clicks"].keys() == b["clicks"].keys() and a["clicks"]
    assert all(torch.equal(a["clicks"][k], b["clicks"][k]) for k in a["clicks"])
    assert all(torch.equal(a["pseudo"][k], b["pseudo"][k]) for k in a["pseudo"]) and a["pseudo"]


def test_resume_with_other_epochs_is_refused_while_rounds_are_on(data, tmp_path):
    """Rounds are placed by --epochs: resuming with more epochs would run another round (more clicks than the
    run was asked for), fewer could skip one. Without rounds, training longer stays allowed."""
    cfg = cfg_for(data, tmp_path, epochs=3, rounds=1, clicks_per_round=2)
    train(cfg)
    with pytest.raises(ValueError, match="rounds placed over 3 epochs; resume it with --epochs 3"):
        train(replace(cfg, epochs=9, resume=True))
    plain = cfg_for(data, tmp_path, epochs=2, out=str(tmp_path / "plain"))
    train(plain)
    assert len(train(replace(plain, epochs=3, resume=True))) == 3


def test_cli_and_checks_of_the_round_settings():
    args = get_args_parser().parse_args(["--self-training", "2", "--pseudo-threshold", "0.8", "--rounds", "3",
                                         "--clicks-per-round", "4", "--click-strategy", "random",
                                         "--click-spacing", "3", "--region-growing"])
    cfg = config_from_args(args)
    assert (cfg.self_training, cfg.pseudo_threshold, cfg.rounds, cfg.clicks_per_round, cfg.click_strategy,
            cfg.click_spacing, cfg.region_growing) == (2, 0.8, 3, 4, "random", 3.0, True)
    assert config_from_args(get_args_parser().parse_args([])).region_growing is False
    for bad, match in ((dict(rounds=8), "below the epochs"), (dict(self_training=-1), "self-training must"),
                       (dict(rounds=2, points=None), "fixed point annotation"),
                       (dict(self_training=2, resample_each_epoch=True), "fixed point annotation"),
                       (dict(pseudo_threshold=0.0), "--pseudo-threshold must"),
                       (dict(rounds=2, clicks_per_round=0), "--clicks-per-round must"),
                       (dict(click_strategy="nearest"), "--click-strategy must be one of uncertain, margin, entropy"),
                       (dict(click_spacing=0.5), "spacing"),
                       (dict(region_growing=True, points=None), "region-growing needs a fixed point annotation")):
        with pytest.raises(ValueError, match=match):
            check_config(TrainConfig(**{"epochs": 8, "points": 10, **bad}))


# --------------------------------------------------------------------------- experiments.py

SETTINGS = dict(E.PRESETS["demo"], data="nowhere/patches", n_train=None, n_val=None)
KEYS = E.Keys(SETTINGS, (None, None), "data-id")


def test_finished_runs_keep_their_keys_and_the_new_rows_get_new_ones():
    # keys of runs finished before the rounds existed (computed on the commit before them)
    assert KEYS.config_key(E.BASELINE) == "ff1c25311c"
    assert KEYS.config_key(replace(E.BASELINE, points=10)) == "b46d70fe44"
    assert KEYS.config_key(replace(E.BASELINE, points="1/object", affinity_weight=1.0)) == "82ae07ba31"
    nine = next(e for e in E.EXPERIMENTS if e.number == 9)
    eight = next(e for e in E.EXPERIMENTS if e.number == 8)
    new = [run for _, run in nine.rows + eight.rows if run.rounds or run.self_training]
    assert len(new) == 10  # 4 click-round rows, self-training by level and by per-class share at 3 budgets
    keys = {KEYS.config_key(run) for _, run in nine.rows + eight.rows}
    assert len(keys) == len(set(run for _, run in nine.rows + eight.rows))  # one key per distinct configuration
    cfg = KEYS.config(nine.rows[1][1], 0)
    assert (cfg.points, cfg.rounds, cfg.clicks_per_round, cfg.click_strategy) == (10, 3, 10, "random")
    check_config(cfg)


def test_low_budget_figure(tmp_path):
    nine = next(e for e in E.EXPERIMENTS if e.number == 9)
    rows = [E.json and {**{f: "" for f in E.FIELDS}, "key": KEYS.run_key(run, 0), "config_key": KEYS.config_key(run),
                        "seed": 0.0, "miou": m, "oa": 0.8, "mf1": m, "labelled_fraction": f, "seconds": 1.0}
            for (_, run), m, f in zip(nine.rows, (0.5, 0.45, 0.55, 0.5, 0.48, 0.4, 0.8),
                                      (0.004, 0.004, 0.02, 0.02, 0.004, 0.01, 1.0))]
    written = reports.write_figures(rows, KEYS, "demo", tmp_path)
    assert tmp_path / "low_budget.png" in written and (tmp_path / "low_budget.png").stat().st_size > 0
    assert reports.write_figures([], KEYS, "demo", tmp_path / "none") == []


# --------------------------------------------------------------------------- region growing

def test_a_click_labels_its_superpixel_unless_its_clicks_disagree():
    segments = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 3, 0), 3, 1)  # four 3x3 superpixels
    clicks = np.full((6, 6), IGNORE_INDEX, np.uint8)
    clicks[0, 0] = 3  # superpixel 0: one class
    clicks[1, 4], clicks[2, 5] = 1, 2  # superpixel 1: two classes
    clicks[4, 1] = clicks[5, 2] = 4  # superpixel 2: one class twice; superpixel 3: no click
    grown = few_clicks.grow(clicks, segments)
    assert (grown[:3, :3] == 3).all() and (grown[3:, :3] == 4).all()
    assert (grown[:3, 3:] == IGNORE_INDEX).all() and (grown[3:, 3:] == IGNORE_INDEX).all()


def test_superpixels_follow_the_image():
    image = torch.zeros(3, 16, 16)
    image[:, :, 8:] = 1.0  # two flat halves
    segments = few_clicks.superpixels(image, area=32)
    assert not np.isin(segments[:, :8], segments[:, 8:]).any()  # no superpixel crosses the edge


def test_clicks_beat_grown_labels_and_grown_labels_beat_pseudo_labels(patches):
    root, _ = patches
    ds = dataset(root)
    clicks, clicked, dense = ds.click_grid(0).copy(), ds.clicked_cells(0), ds.dense_label(0)
    few_clicks.grow_regions(ds)
    grown = ds.grown_grid(0)
    assert (grown[clicked] == IGNORE_INDEX).all() and (grown != IGNORE_INDEX).sum() > (clicks != IGNORE_INDEX).sum()
    ds.set_pseudo(0, np.full(dense.shape, 5, np.uint8))
    grid = ds.point_grid(0)
    assert np.array_equal(grid[clicked], clicks[clicked])
    on_grown = grown != IGNORE_INDEX
    assert np.array_equal(grid[on_grown], grown[on_grown])
    assert (grid[~clicked & ~on_grown & (dense != IGNORE_INDEX)] == 5).all()
    assert (grid[~clicked & (dense == IGNORE_INDEX)] == IGNORE_INDEX).all()
    share = sum(int((ds.grown_grid(i) != IGNORE_INDEX).sum()) for i in range(4)) / (4 * grown.size)
    assert ds.annotation_stats()["grown_fraction"] == pytest.approx(share) and share > 0


@pytest.mark.slow
def test_region_growing_run_grows_again_after_each_click_round(data, tmp_path, capsys):
    history = train(cfg_for(data, tmp_path, region_growing=True, rounds=1, clicks_per_round=4, epochs=4))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert "region growing: the clicks' superpixels label" in capsys.readouterr().out
    st = read_checkpoint(tmp_path / "ck" / "last.pth").train_state["few_clicks"]
    ds = dataset(data, ids=range(6), scale=32 / 48)
    few_clicks.restore(ds, st)
    for i in range(len(ds)):  # the grown labels saved are those of all the clicks, the added ones included
        expected = few_clicks.grow(ds.click_grid(i), few_clicks.superpixels(ds.image(i)))
        keep = ~ds.clicked_cells(i) & (ds.dense_label(i) != IGNORE_INDEX)
        assert np.array_equal(ds.grown_grid(i), np.where(keep, expected, IGNORE_INDEX))


# --------------------------------------------------------------------------- the batch paths

def test_resident_batches_follow_the_annotation_the_rounds_change(patches):
    """No module writes into the loader's tensors: the loader reads the dataset's point grids again at the start
    of a pass when its annotation changed (and only then)."""
    from resident import ResidentLoader, build_tensors
    root, _ = patches
    ds = dataset(root)
    loader = ResidentLoader(build_tensors(ds), batch_size=2, follow=ds)
    before = loader.data.points.clone()
    list(loader)
    assert torch.equal(loader.data.points, before) and loader.version == ds.annotation_version == 0
    few_clicks.end_of_epoch(config(rounds=1, self_training=1, pseudo_threshold=0.5), 4, Fixed(one_hot_logits(1)),
                            ds, "cpu")
    assert ds.annotation_version > 0
    assert not all(np.array_equal(before[i].numpy(), ds.point_grid(i)) for i in range(len(ds)))
    batch = next(iter(loader))
    assert all(np.array_equal(loader.data.points[i].numpy(), ds.point_grid(i)) for i in range(len(ds)))
    assert np.array_equal(batch["points"][0].numpy(), ds.point_grid(0))


@pytest.mark.parametrize("loader", ["resident", "dataloader"])
def test_both_batch_paths_train_on_the_grids_the_rounds_made(data, tmp_path, monkeypatch, loader):
    import train as T
    grids, seen = [], []
    original_round, original_epoch = few_clicks.end_of_epoch, T.run_epoch

    def round_then_remember(cfg, epoch, model, ds, device):
        changed = original_round(cfg, epoch, model, ds, device)
        if changed:
            grids.append({str(ds.pairs[i][0]): np.sort(ds.point_grid(i).ravel()) for i in range(len(ds))})
        return changed

    def epoch_seen(model, batches, criterion, device, optimizer=None, *args, **kw):
        if optimizer is not None and grids:  # a training pass after the round: what did it train on?
            batches = list(batches)
            seen.append(all(np.array_equal(np.sort(p.numpy().ravel()), grids[-1][i])  # sorted: rotated, flipped
                            for b in batches for i, p in zip(b["id"], b["points"])))
        return original_epoch(model, batches, criterion, device, optimizer, *args, **kw)
    monkeypatch.setattr(few_clicks, "end_of_epoch", round_then_remember)
    monkeypatch.setattr(T, "run_epoch", epoch_seen)
    history = train(cfg_for(data, tmp_path, epochs=3, rounds=1, self_training=1, pseudo_threshold=0.3, loader=loader,
                            augment=True))
    assert len(grids) == 1 and len(history) == 3
    assert seen == [True, True]  # epochs 2 and 3 trained on the grids of the round after epoch 1


# --------------------------------------------------------------------------- relative pseudo-labels, forest teacher

def test_the_surest_share_of_every_class_is_kept_however_rare_or_unsure_it_is():
    """Class 0 is predicted on most pixels and surely, class 1 on a few and unsurely: a fixed level (0.9) would
    label none of class 1; the per-class share labels the same share of both, always the surest ones."""
    classes = np.zeros((10, 10), np.uint8)
    classes[:, 8:] = 1  # 20 pixels of class 1
    conf = np.where(classes == 1, 0.3, 0.95) + np.arange(100).reshape(10, 10) * 1e-4  # distinct within a class
    usable = np.ones((10, 10), bool)
    usable[0, :] = False  # e.g. clicked or undefined cells: never labelled, not counted
    grid, = few_clicks.surest_share([(classes, conf, usable)], 0.25)
    for c, n in ((0, 8 * 9), (1, 2 * 9)):
        got = (grid == c)
        assert got.sum() == pytest.approx(0.25 * n, abs=1)
        assert conf[got].min() >= conf[(classes == c) & usable & ~got].max()  # the surest of the class
    assert (grid[0] == IGNORE_INDEX).all()
    # over several images together: the cut is one per class, not one per image
    a, b = few_clicks.surest_share([(classes, conf, usable), (classes, conf - 0.2, usable)], 0.5)
    assert (a != IGNORE_INDEX).sum() > 0.5 * usable.sum() > (b != IGNORE_INDEX).sum()


def test_self_training_by_share_labels_what_a_fixed_level_would_not(patches):
    root, _ = patches
    ds = dataset(root)
    logits = torch.zeros(6, 24, 24)
    logits[2] = torch.linspace(0.1, 1, 24 * 24).reshape(24, 24)  # class 2 everywhere, softmax max 0.18 to 0.35
    unsure = Fixed(logits)
    few_clicks.end_of_epoch(config(self_training=3), 2, unsure, ds, "cpu")
    assert all(ds.pseudo_grid(i).max() == IGNORE_INDEX for i in range(len(ds)))  # 0.9: nothing
    few_clicks.end_of_epoch(config(self_training=3, pseudo_share=0.4), 4, unsure, ds, "cpu")
    for i in range(len(ds)):
        grid, open_ = ds.pseudo_grid(i), few_clicks.open_cells(ds, i)
        assert set(np.unique(grid[open_])) == {2, IGNORE_INDEX}
        assert (grid != IGNORE_INDEX).sum() == pytest.approx(0.4 * open_.sum(), rel=0.1)
        assert (grid[:12] != IGNORE_INDEX).sum() < (grid[12:] != IGNORE_INDEX).sum()  # the surer bottom half


def test_the_forest_teacher_labels_its_surest_pixels_from_the_clicks_alone(patches, capsys):
    root, _ = patches
    ds = dataset(root, points=20)
    clicks = [ds.click_grid(i).copy() for i in range(len(ds))]
    few_clicks.forest_teacher(ds, 0.4, seed=0)
    out = capsys.readouterr().out
    assert "forest teacher: a random forest fitted on the clicks labels" in out and "right by the dense" in out
    labelled = right = usable = 0
    for i in range(len(ds)):
        grid, open_, dense = ds.point_grid(i), few_clicks.open_cells(ds, i), ds.dense_label(i)
        clicked = ds.clicked_cells(i)
        assert np.array_equal(grid[clicked], clicks[i][clicked])  # the clicks win
        assert (grid[(dense == IGNORE_INDEX) & ~clicked] == IGNORE_INDEX).all()  # never on an undefined pixel
        got = (ds.pseudo_grid(i) != IGNORE_INDEX)
        labelled, usable = labelled + got.sum(), usable + open_.sum()
        right += (grid[got] == dense[got]).sum()
    assert 0.4 * usable <= labelled <= 0.5 * usable  # the share, and the pixels tied at its cut (votes of 100 trees)
    assert right / labelled > 0.9  # the images are the label colours plus noise: the surest pixels are right
    again = dataset(root, points=20)
    few_clicks.forest_teacher(again, 0.4, seed=0)
    assert all(np.array_equal(again.pseudo_grid(i), ds.pseudo_grid(i)) for i in range(len(ds)))  # repeatable


def test_forest_teacher_run_keeps_its_labels_and_may_resume_with_more_epochs(data, tmp_path, capsys):
    """The teacher labels once, before the first epoch: nothing is placed by --epochs, so a resume may train
    longer; it gets the teacher's labels back from last.pth instead of fitting the forest again."""
    cfg = cfg_for(data, tmp_path, epochs=2, forest_teacher=0.5)
    train(cfg)
    assert capsys.readouterr().out.count("forest teacher:") == 1
    first = read_checkpoint(tmp_path / "ck" / "last.pth").train_state["few_clicks"]["pseudo"]
    assert len(first) == 6
    assert len(train(replace(cfg, epochs=3, resume=True))) == 3
    assert "forest teacher:" not in capsys.readouterr().out
    again = read_checkpoint(tmp_path / "ck" / "last.pth").train_state["few_clicks"]["pseudo"]
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_checks_of_the_share_settings():
    args = get_args_parser().parse_args(["--forest-teacher", "0.3", "--self-training", "2", "--pseudo-share", "0.2"])
    cfg = config_from_args(args)
    assert (cfg.forest_teacher, cfg.self_training, cfg.pseudo_share) == (0.3, 2, 0.2)
    for bad, match in ((dict(pseudo_share=0.3), "--pseudo-share chooses the pseudo-labels of --self-training"),
                       (dict(self_training=2, pseudo_share=1.5), "--pseudo-share must be in"),
                       (dict(forest_teacher=-0.1), "--forest-teacher must be in"),
                       (dict(forest_teacher=0.3, points=None), "forest-teacher needs a fixed point annotation")):
        with pytest.raises(ValueError, match=match):
            check_config(TrainConfig(**{"epochs": 8, "points": 10, **bad}))


# --------------------------------------------------------------------------- --sparse auto (experiment 8's evidence)

def test_sparse_auto_adds_region_growing_or_the_affinity_loss_only_to_sparse_fixed_clicks():
    cfg = TrainConfig(points=10)
    assert cfg.sparse == "auto"  # the default
    assert few_clicks.sparse_additions(cfg, 0.0004) == {"region_growing": True}  # 10 clicks on a real tile
    assert few_clicks.sparse_additions(cfg, 0.0001) == {"region_growing": True}  # 1 per object on the real tile
    assert few_clicks.sparse_additions(cfg, 0.0018) == {"affinity_weight": 1.0}  # 10 per image, synthetic patches
    assert few_clicks.sparse_additions(cfg, 0.0044) == {}  # 100 per image on the real tile: it tied there
    assert few_clicks.sparse_additions(cfg, 0.0176) == {}  # 100 per image on the synthetic patches
    for other in (dict(sparse="off"), dict(points=None), dict(resample_each_epoch=True), dict(region_growing=True)):
        for share in (0.0004, 0.0018):
            assert few_clicks.sparse_additions(replace(cfg, **other), share) == {}
    assert few_clicks.sparse_additions(replace(cfg, affinity_weight=0.5), 0.0018) == {}  # the user's weight stays
    assert few_clicks.sparse_additions(replace(cfg, affinity_weight=0.5), 0.0004) == {"region_growing": True}


def test_a_sparse_run_grows_its_clicks_as_if_asked_and_resumes(data, tmp_path, capsys):
    """1 click per 48 x 48 image labels 0.098 % of the 32 x 32 grid: the default run is the run that asks for region
    growing, epoch for epoch; the checkpoint records what was asked, so a resume decides the same again."""
    auto = train(cfg_for(data, tmp_path, points=1, allow_unclicked=True, epochs=2, out=str(tmp_path / "auto")))
    assert "sparse clicks: they label 0.098% of the training pixels (under 0.10%), so region growing is on" in \
        capsys.readouterr().out
    asked = train(cfg_for(data, tmp_path, points=1, allow_unclicked=True, epochs=2, region_growing=True, sparse="off",
                          out=str(tmp_path / "asked")))
    assert [h["train_loss"] for h in auto] == pytest.approx([h["train_loss"] for h in asked], rel=1e-6)
    assert [h["val_miou"] for h in auto] == [h["val_miou"] for h in asked]
    ck = read_checkpoint(tmp_path / "auto" / "last.pth")
    assert ck.config["region_growing"] is False and ck.config["sparse"] == "auto"
    assert ck.train_state["few_clicks"]["grown"]  # the grown labels are kept for a resume
    resumed = cfg_for(data, tmp_path, points=1, allow_unclicked=True, epochs=3, out=str(tmp_path / "auto"), resume=True)
    assert len(train(resumed)) == 3
    assert "so region growing is on" in capsys.readouterr().out  # decided again, the same way
    train(cfg_for(data, tmp_path, points=3, allow_unclicked=True, epochs=1, out=str(tmp_path / "denser")))  # 0.29 %
    assert "sparse clicks" not in capsys.readouterr().out


def test_a_run_between_the_thresholds_trains_with_the_affinity_loss_as_if_asked(data, tmp_path, capsys):
    """2 clicks per 48 x 48 image label 0.195 % of the 32 x 32 grid: over 0.1 %, under 0.25 %, so the default run is
    the run that asks for --affinity-weight 1, epoch for epoch, and the checkpoint keeps what was asked."""
    auto = train(cfg_for(data, tmp_path, points=2, allow_unclicked=True, epochs=2, out=str(tmp_path / "auto")))
    assert "they label 0.195% of the training pixels (under 0.25%), so the affinity loss (--affinity-weight 1) " \
           "is on" in capsys.readouterr().out
    asked = train(cfg_for(data, tmp_path, points=2, allow_unclicked=True, epochs=2, affinity_weight=1.0, sparse="off",
                          out=str(tmp_path / "asked")))
    assert [h["train_loss"] for h in auto] == pytest.approx([h["train_loss"] for h in asked], rel=1e-6)
    assert [h["val_miou"] for h in auto] == [h["val_miou"] for h in asked]
    assert read_checkpoint(tmp_path / "auto" / "last.pth").config["affinity_weight"] == 0.0
    off = train(cfg_for(data, tmp_path, points=2, allow_unclicked=True, epochs=2, sparse="off",
                        out=str(tmp_path / "off")))
    assert [h["train_loss"] for h in off] != pytest.approx([h["train_loss"] for h in auto], rel=1e-6)
