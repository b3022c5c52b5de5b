"""Learning-rate schedules: the published StepLR per epoch, or warm-up then cosine / poly decay per step."""

from dataclasses import replace

import pytest
import torch

from checkpoint import read_checkpoint
from config import TrainConfig, check_config
from tests.conftest import cfg_for
import train as train_module
from train import make_scheduler, steps_per_epoch, train


def lrs(cfg, steps, n):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    scheduler, per_step = make_scheduler(cfg, opt, steps)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out, per_step


def test_warm_up_then_decay_to_zero_at_the_last_step():
    cfg = TrainConfig(lr=1.0, epochs=2, schedule="cosine", warmup=2)
    got, per_step = lrs(cfg, 5, 11)  # 2 epochs x 5 steps
    assert per_step and got[:2] == pytest.approx([1 / 3, 2 / 3])
    assert got[2] == pytest.approx(1.0) and got[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(got[2:], got[3:]))  # decays monotonically after the warm-up
    assert got[6] == pytest.approx(0.5)  # half way through the decay: cos(pi/2)
    poly, _ = lrs(replace(cfg, schedule="poly", warmup=0), 5, 11)
    assert poly[0] == 1.0 and poly[5] == pytest.approx(0.5 ** 0.9) and poly[10] == pytest.approx(0.0)
    step, per_step = lrs(TrainConfig(lr=1.0, step_size=1, lr_gamma=0.5), 5, 3)
    assert not per_step and step == [1.0, 0.5, 0.25]  # StepLR, stepped once an epoch
    assert steps_per_epoch(10, 4) == 2 and steps_per_epoch(3, 4) == 1


def test_a_run_ends_its_decay_at_the_last_epoch_and_keeps_it_on_resume(data, tmp_path):
    cfg = cfg_for(data, tmp_path, epochs=2, schedule="cosine", warmup=1, lr=1e-2)  # 6 images, batch 4: 1 step
    history = train(cfg)
    assert history[0]["lr"] == pytest.approx(1e-2 / 2)  # the first step is warm-up
    st = read_checkpoint(tmp_path / "ck" / "last.pth").train_state
    assert st["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="cosine schedule ending after 2 epochs"):
        train(replace(cfg, epochs=4, resume=True))


def test_warm_up_without_a_decay_is_refused():
    with pytest.raises(ValueError, match="--warmup works with --schedule cosine or poly"):
        check_config(TrainConfig(warmup=10))
    with pytest.raises(ValueError, match="--schedule must be one of step, cosine, poly"):
        check_config(TrainConfig(schedule="linear"))


def test_the_plateau_is_the_best_epoch_the_last_ones_did_not_beat():
    def hist(*mious):
        return [{"epoch": e, "val_miou": m} for e, m in enumerate(mious, 1)]
    assert train_module.plateau(hist(0.1, 0.2, 0.3), epochs=2) is None  # still rising
    assert train_module.plateau(hist(0.1, 0.4, 0.402, 0.39), epochs=2) == 2  # +0.002: flat
    assert train_module.plateau(hist(0.1, 0.4, 0.39, 0.41), epochs=2) is None  # +0.01: still improving
    assert train_module.plateau(hist(0.5, 0.5), epochs=2) is None  # too short to tell


def test_the_log_says_once_when_the_validation_curve_stops_improving(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "PLATEAU_EPOCHS", 3)
    monkeypatch.setattr(train_module, "PLATEAU_GAIN", 0.05)
    train(cfg_for(data, tmp_path, epochs=6, lr=1e-9))  # learns next to nothing: flat from the start
    out = capsys.readouterr().out
    assert out.count("the validation curve has stopped improving: the last 3 validations gained less than 0.05") == 1
    line = next(x for x in out.splitlines() if "stopped improving" in x)
    assert "over epoch 3's" in line  # judged once, on the whole curve: the best before the last 3 validations
    assert out.index("stopped improving") > out.index("epoch   6/6")  # at the end, not as it happens


def test_the_plateau_is_judged_after_warm_up_on_the_whole_curve():
    """The dense Atlanta run (300 steps, validation every 6, warm-up 30): the untrained model's all-background
    0.485 at step 6 is no level to beat, and a pause in the climb (steps 102-132) is not the end of it."""
    curve = [0.485, 0.30, 0.278, 0.29, 0.31, 0.35] + [0.35 + 0.01 * k for k in range(11)] + [0.45] * 6 + \
        [0.46 + 0.014 * k for k in range(12)] + [0.634] + [0.63] * 7 + [0.632] * 7
    history = [{"epoch": e, "step": 6 * e, "val_miou": m} for e, m in enumerate(curve, 1)]
    assert len(history) == 50 and history[35]["step"] == 216 and history[35]["val_miou"] == 0.634
    assert train_module.plateau(history[:6], warmup=30) is None  # step 36: only one validation after warm-up
    assert train_module.plateau(history[:6], warmup=0) == 1  # the old false alarm: "over step 6's 0.485"
    assert train_module.plateau(history, warmup=30) == 36  # step 216
