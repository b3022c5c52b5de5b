import json

import pytest
import torch

from checkpoint import load_model, read_checkpoint
from tests.conftest import write_patches
from train import TrainConfig, config_from_args, get_args_parser, train


def cfg_for(root, tmp_path, **kw):
    base = dict(data=str(root), arch="tiny", pretrained=False, epochs=2, batch_size=4, size=32, points=100,
                out=str(tmp_path / "ck"), figures=False, progress=False, train_ids=list(range(6)),
                val_ids=[6, 7])
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "patches"
    write_patches(root, n=8, size=(48, 48))
    return root


def test_history_checkpoints_and_figures(data, tmp_path):
    figures = tmp_path / "ck"  # figures go with the run's checkpoints
    history = train(cfg_for(data, tmp_path, figures=True))
    assert [h["epoch"] for h in history] == [1, 2]
    for key in ("train_loss", "val_loss", "val_oa", "val_miou", "lr", "seconds"):
        assert all(key in h for h in history)
    best = max(history, key=lambda h: h["val_miou"])
    model, ck = load_model(tmp_path / "ck" / "best_model.pth")
    assert ck.metrics["miou"] == pytest.approx(best["val_miou"]) and ck.epoch == best["epoch"]
    assert ck.spec.scale == pytest.approx(32 / 48)
    assert ck.config["points"] == 100 and ck.model_args == {"arch": "tiny", "num_classes": 6, "in_channels": 3}
    assert (figures / "output.png").stat().st_size > 0 and (figures / "results.png").stat().st_size > 0
    assert json.loads((tmp_path / "ck" / "history.json").read_text())[-1]["epoch"] == 2


def test_loss_decreases_when_training_longer(data, tmp_path):
    history = train(cfg_for(data, tmp_path, epochs=6, points=None, augment=False, lr=3e-3))
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_reproducible_on_cpu(data, tmp_path):
    a = train(cfg_for(data, tmp_path, out=str(tmp_path / "a")))
    b = train(cfg_for(data, tmp_path, out=str(tmp_path / "b")))
    assert [h["train_loss"] for h in a] == [h["train_loss"] for h in b]
    assert [h["val_miou"] for h in a] == [h["val_miou"] for h in b]


def test_resume_continues_where_it_stopped(data, tmp_path):
    straight = train(cfg_for(data, tmp_path, out=str(tmp_path / "s"), epochs=2))
    train(cfg_for(data, tmp_path, out=str(tmp_path / "r"), epochs=1))
    resumed = train(cfg_for(data, tmp_path, out=str(tmp_path / "r"), epochs=2, resume=True))
    assert [h["epoch"] for h in resumed] == [1, 2]
    assert resumed[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"], rel=1e-5)
    sa = read_checkpoint(tmp_path / "s" / "last.pth").state_dict
    sb = read_checkpoint(tmp_path / "r" / "last.pth").state_dict
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5) for k in sa)


def test_resume_with_another_model_is_refused(data, tmp_path):
    train(cfg_for(data, tmp_path, epochs=1, arch="resnet18", size=32))
    with pytest.raises(ValueError, match="decoder: 'skip' -> 'plain'"):
        train(cfg_for(data, tmp_path, epochs=2, arch="resnet18", decoder="plain", resume=True))


def test_class_weights_options_and_saved_weights(data, tmp_path):
    train(cfg_for(data, tmp_path, epochs=1, class_weights="dense"))
    w = torch.load(tmp_path / "ck" / "class_weights.pt", weights_only=True)
    assert w["source"] == "dense" and w["weights"].sum().item() == pytest.approx(6)
    history = train(cfg_for(data, tmp_path, epochs=1, class_weights=str(tmp_path / "ck" / "class_weights.pt"),
                            out=str(tmp_path / "ck2")))
    assert len(history) == 1


def test_cli_maps_to_config():
    args = get_args_parser().parse_args(["--data", "d", "--points", "dense", "--class-weights", "none",
                                         "--decoder", "plain", "--epochs", "3", "--no-pretrained", "--points", "dense",
                                         "--bands", "0,1,2,3", "--exclude", "clutter"])
    cfg = config_from_args(args)
    assert cfg.points is None and cfg.class_weights == "none" and cfg.decoder == "plain"
    assert cfg.epochs == 3 and cfg.pretrained is False and cfg.bands == [0, 1, 2, 3]
    assert cfg.exclude == ("clutter",)
    assert config_from_args(get_args_parser().parse_args([])).points == 20000
