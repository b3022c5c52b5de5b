import json

import numpy as np

import pytest
import torch

from checkpoint import load_model, read_checkpoint
from class_weights import compute_class_weights
from config import config_from_args
from tests.conftest import cfg_for, write_patches
from train import build_datasets, get_args_parser, train


@pytest.mark.slow
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


@pytest.mark.slow
def test_loss_decreases_when_training_longer(data, tmp_path):
    history = train(cfg_for(data, tmp_path, epochs=6, points=None, augment=False, lr=3e-3))
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.slow
def test_reproducible_on_cpu(data, tmp_path):
    a = train(cfg_for(data, tmp_path, out=str(tmp_path / "a")))
    b = train(cfg_for(data, tmp_path, out=str(tmp_path / "b")))
    assert [h["train_loss"] for h in a] == [h["train_loss"] for h in b]
    assert [h["val_miou"] for h in a] == [h["val_miou"] for h in b]


@pytest.mark.slow
def test_resume_continues_where_it_stopped(data, tmp_path):
    straight = train(cfg_for(data, tmp_path, out=str(tmp_path / "s"), epochs=2))
    train(cfg_for(data, tmp_path, out=str(tmp_path / "r"), epochs=1))
    resumed = train(cfg_for(data, tmp_path, out=str(tmp_path / "r"), epochs=2, resume=True))
    assert [h["epoch"] for h in resumed] == [1, 2]
    assert resumed[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"], rel=1e-5)
    sa = read_checkpoint(tmp_path / "s" / "last.pth").state_dict
    sb = read_checkpoint(tmp_path / "r" / "last.pth").state_dict
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5) for k in sa)


@pytest.mark.slow
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
    # clicks that are not a random sample: the weights follow the pixel shares the clicks imply (class_weights.py)
    cfg = cfg_for(data, tmp_path, epochs=1, points="1/object", class_weights="pixels", out=str(tmp_path / "ck3"))
    train(cfg)
    w = torch.load(tmp_path / "ck3" / "class_weights.pt", weights_only=True)
    expected, clicks, shares = compute_class_weights(build_datasets(cfg)[0], "pixels", cfg.class_weighting,
                                                     cfg.seed)
    assert w["source"] == "pixels" and torch.equal(w["weights"], expected) and torch.equal(w["counts"],
                                                                                         torch.as_tensor(clicks))
    assert torch.allclose(w["shares"], torch.as_tensor(shares)) and w["shares"].sum().item() == pytest.approx(1)
    assert not torch.allclose(expected, compute_class_weights(build_datasets(cfg)[0], "points", "sqrt")[0])


def test_cli_maps_to_config():
    args = get_args_parser().parse_args(["--data", "d", "--points", "dense", "--class-weights", "none",
                                         "--decoder", "plain", "--epochs", "3", "--no-pretrained", "--points", "dense",
                                         "--bands", "0,1,2,3", "--exclude", "clutter"])
    cfg = config_from_args(args)
    assert cfg.points is None and cfg.class_weights == "none" and cfg.decoder == "plain"
    assert cfg.epochs == 3 and cfg.pretrained is False and cfg.bands == (0, 1, 2, 3)
    assert cfg.exclude == ("clutter",)
    assert config_from_args(get_args_parser().parse_args([])).points == 20000
    assert config_from_args(get_args_parser().parse_args([])).loader == "auto"
    assert config_from_args(get_args_parser().parse_args(["--loader", "dataloader"])).loader == "dataloader"


# --------------------------------------------------------------------------- the data path and its checks

def test_split_json_in_the_data_folder_is_the_default(data, tmp_path, capsys):
    (data / "split.json").write_text(json.dumps({"train": [0, 1, 2, 3], "val": [7]}))
    train(cfg_for(data, tmp_path, epochs=1, train_ids=None, val_ids=None))
    assert f"split file {data / 'split.json'}" in capsys.readouterr().out
    ck = read_checkpoint(tmp_path / "ck" / "last.pth")
    assert ck.config["split"] is None  # the default, resolved at run time
    (data / "split.json").write_text(json.dumps({"train": [0, 1, 2, 7], "val": [7]}))
    with pytest.raises(ValueError, match=r"in both train and val \(\['7'\]"):
        train(cfg_for(data, tmp_path, epochs=1, train_ids=None, val_ids=None, out=str(tmp_path / "other")))


def test_mixed_image_sizes_train_with_padding(tmp_path):
    write_patches(tmp_path / "p", n=4, size=(48, 48))
    write_patches(tmp_path / "q", n=4, size=(40, 64), seed=1)
    for k in range(4):  # ids 4..7 are 40x64
        for kind, name in (("Images", "Image"), ("Labels", "Label")):
            (tmp_path / "q" / kind / f"{name}_{k}.tif").rename(tmp_path / "p" / kind / f"{name}_{k + 4}.tif")
    history = train(cfg_for(tmp_path / "p", tmp_path, scale=0.5, train_ids=[0, 1, 4, 5], val_ids=[2, 6]))
    assert len(history) == 2 and 0 <= history[-1]["val_miou"] <= 1


def test_a_new_run_never_replaces_another_runs_checkpoints(data, tmp_path):
    train(cfg_for(data, tmp_path, epochs=1))
    before = (tmp_path / "ck" / "best_model.pth").read_bytes()
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        train(cfg_for(data, tmp_path, epochs=1, lr=5e-3))
    assert (tmp_path / "ck" / "best_model.pth").read_bytes() == before
    train(cfg_for(data, tmp_path, epochs=1, lr=5e-3, overwrite=True))
    assert (tmp_path / "ck" / "best_model.pth").read_bytes() != before


def test_resume_with_changed_settings_names_them(data, tmp_path):
    train(cfg_for(data, tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"points: 100 -> 50.*lr: 0\.001 -> 0\.01|lr: 0\.001 -> 0\.01.*points"):
        train(cfg_for(data, tmp_path, epochs=2, points=50, lr=1e-2, resume=True))


def test_diverging_training_stops_and_saves_no_model(data, tmp_path):
    from train import TrainingError
    with pytest.raises(TrainingError, match="Lower --lr"):
        train(cfg_for(data, tmp_path, epochs=3, lr=1e12, points=None, gamma=0.0))
    for name in ("best_model.pth", "last.pth"):
        path = tmp_path / "ck" / name
        assert not path.exists() or torch.isfinite(torch.cat([v.float().flatten() for v in read_checkpoint(
            path).state_dict.values()])).all()


@pytest.mark.parametrize("change, match", [
    (dict(epochs=0), "epochs must be >= 1"), (dict(epochs=-2), "epochs must be >= 1"),
    (dict(max_train=0), "max-train must be >= 1"), (dict(max_val=-1), "max-val must be >= 1"),
    (dict(val_fraction=-0.5), "--val-fraction must"), (dict(batch_size=0), "--batch-size must"),
    (dict(step_size=0), "--step-size must"), (dict(points=100_000), "only 2304 pixels"),
    (dict(exclude=("trees",)), "unknown classes"), (dict(device="cuda:0"), "no CUDA"),
])
def test_bad_settings_fail_before_anything_is_written(data, tmp_path, change, match, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=match):
        train(cfg_for(data, tmp_path, **change))
    assert not (tmp_path / "ck").exists()


def test_validation_without_labelled_pixels_is_an_error(tmp_path):
    labels = write_patches(tmp_path / "p", n=4, size=(48, 48))
    import tifffile
    tifffile.imwrite(tmp_path / "p" / "Labels" / "Label_3.tif", np.zeros((48, 48, 3), np.uint8))  # all undefined
    with pytest.raises(ValueError, match="no labelled pixel"):
        train(cfg_for(tmp_path / "p", tmp_path, train_ids=[0, 1, 2], val_ids=[3]))
    assert labels


def test_a_class_without_any_training_point_is_an_error(tmp_path):
    import tifffile
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 8:20] = 255  # the buildings
        tifffile.imwrite(tmp_path / "img" / f"a{k}.tif", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        tifffile.imwrite(tmp_path / "lab" / f"a{k}.tif", mask)
    # the README's old advice: 0/255 masks with ignore_value 255 silently lose every building
    (tmp_path / "c.json").write_text('{"names": ["ground", "building"], "palette": [[9, 9, 9], [255, 0, 0]], '
                                     '"label_format": "index", "ignore_value": 255}')
    cfg = dict(data=None, images=str(tmp_path / "img"), labels=str(tmp_path / "lab"), classes=str(tmp_path / "c.json"),
               train_ids=["a0", "a1"], val_ids=["a2"], points=None)
    with pytest.raises(ValueError, match=r"\['building'\] have no labelled point.*value_map"):
        train(cfg_for(None, tmp_path, **cfg))
    (tmp_path / "c.json").write_text('{"names": ["ground", "building"], "label_format": "index", '
                                     '"value_map": {"0": 0, "255": 1}}')
    history = train(cfg_for(None, tmp_path, **cfg))
    counts = torch.load(tmp_path / "ck" / "class_weights.pt", weights_only=True)["counts"]
    assert counts.tolist() == [2 * (32 * 32 - 12 * 12), 2 * 12 * 12]  # every pixel of a0 and a1 trains, buildings too
    assert 0 <= history[-1]["val_iou"]["building"] <= 1  # and a2's buildings are measured: a number, not NaN


def test_cli_user_errors_print_one_line_and_exit_2(data, tmp_path, capsys):
    from train import main
    base = ["--data", str(data), "--out", str(tmp_path / "ck"), "--no-progress", "--arch", "tiny", "--size", "32"]
    for extra, match in ((["--points", "abc"], "points must be"), (["--batch-size", "0"], "--batch-size must be >= 1"),
                         (["--epochs", "0"], "epochs"), (["--bands", "x"], "--bands"),
                         (["--data", str(tmp_path / "nowhere")], "nowhere")):
        with pytest.raises(SystemExit) as e:
            raise SystemExit(main(get_args_parser().parse_args(base + extra)))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and match in err and "Traceback" not in err


def test_a_rerun_with_the_same_settings_may_replace_its_own_checkpoints(data, tmp_path):
    first = train(cfg_for(data, tmp_path, epochs=1))
    again = train(cfg_for(data, tmp_path, epochs=1))  # e.g. make demo twice
    assert [h["val_miou"] for h in first] == [h["val_miou"] for h in again]


def test_temporaries_of_killed_runs_are_cleaned_on_start(data, tmp_path):
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "ck").mkdir()
    stale = tmp_path / "ck" / f".last.pth.{dead.pid}.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(cfg_for(data, tmp_path, epochs=1))
    assert not stale.exists()


def test_a_checkpoint_from_before_a_new_setting_still_resumes(data, tmp_path):
    train(cfg_for(data, tmp_path, epochs=1))
    ck = torch.load(tmp_path / "ck" / "last.pth", weights_only=True)
    del ck["config"]["class_weighting"]  # a field added after this checkpoint was written
    torch.save(ck, tmp_path / "ck" / "last.pth")
    assert len(train(cfg_for(data, tmp_path, epochs=2, resume=True))) == 2


def test_a_share_that_is_not_all_never_reads_as_all():
    """Sparse label files (0.04 % labelled) warned that '100 % of the training label pixels are undefined'."""
    from train import percent
    assert [percent(x) for x in (0.9996, 0.97, 0.0004, 1.0, 0.0, 0.123)] == \
        ["99.96 %", "97 %", "0.04 %", "100 %", "0 %", "12 %"]


def test_init_goes_on_from_a_model_instead_of_starting_afresh(data, tmp_path):
    """--init: a new run that starts from a trained model's weights and contract (the annotation page adapts its
    model to new clicks this way): its first epoch starts where the model ended, far below a fresh start."""
    first = train(cfg_for(data, tmp_path, epochs=4, lr=3e-3, out=str(tmp_path / "a")))
    fresh = train(cfg_for(data, tmp_path, epochs=1, lr=3e-3, out=str(tmp_path / "fresh")))
    go_on = train(cfg_for(data, tmp_path, epochs=1, lr=3e-3, out=str(tmp_path / "b"),
                          init=str(tmp_path / "a" / "last.pth")))
    assert go_on[0]["train_loss"] < fresh[0]["train_loss"]
    assert go_on[0]["train_loss"] < first[0]["train_loss"]  # not a new start
    a, b = read_checkpoint(tmp_path / "a" / "last.pth"), read_checkpoint(tmp_path / "b" / "last.pth")
    assert a.spec == b.spec  # the contract comes with the model, not fitted again
    assert b.config["init"] == str(tmp_path / "a" / "last.pth")
    with pytest.raises(ValueError, match="--init starts from a whole model; leave out --encoder and add --no-pre"):
        train(cfg_for(data, tmp_path, arch="resnet18", pretrained=True, init=str(tmp_path / "a" / "last.pth")))
    with pytest.raises(ValueError, match="holds a .* model; this run builds"):
        train(cfg_for(data, tmp_path, arch="resnet18", init=str(tmp_path / "a" / "last.pth"), out=str(tmp_path / "c")))
