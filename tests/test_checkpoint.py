"""checkpoint.py: one writer, one reader; headers checked once with messages that say what to do."""

import math

import pytest
import torch

from checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from model import ResNet18Segmentation, TinySegmentation
from spec import ClassSpec, DataSpec, Intensity

SPEC = DataSpec(scale=0.5, intensity=Intensity("range", (10.0, 20.0, 30.0), (400.0, 500.0, 600.0)))


@pytest.mark.parametrize("decoder", ["plain", "skip"])
def test_round_trip_keeps_weights_and_contract(tmp_path, decoder):
    m = ResNet18Segmentation(decoder=decoder).eval()
    save_checkpoint(tmp_path / "m.pth", m, SPEC, config={"epochs": 3}, metrics={"miou": 0.42}, epoch=3)
    m2, ck = load_model(tmp_path / "m.pth")
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    assert ck.spec == SPEC and ck.metrics["miou"] == 0.42 and ck.epoch == 3
    assert ck.model_args == m.model_args and ck.config == {"epochs": 3} and ck.train_state is None


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.py"):
        read_checkpoint(tmp_path / "none.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        read_checkpoint(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")


class Payload:
    pass


def test_code_carrying_file_is_refused_without_torch_advice(tmp_path):
    torch.save({"format": "pointseg-checkpoint", "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "evil.pth")
    assert "code" in str(e.value) and "refused" in str(e.value) and "weights_only=False" not in str(e.value)


def _tamper(tmp_path, change):
    ck = save_checkpoint(tmp_path / "m.pth", TinySegmentation(), DataSpec())
    change(ck)
    torch.save(ck, tmp_path / "bad.pth")
    return tmp_path / "bad.pth"


@pytest.mark.parametrize("change, match", [
    (lambda ck: ck["spec"]["classes"].update(names=["a", "b"], palette=[[1, 1, 1], [2, 2, 2]]), "6 outputs"),
    (lambda ck: ck["spec"].update(scale=0.0), "scale"),
    (lambda ck: ck["spec"].update(scale=math.nan), "scale"),
    (lambda ck: ck["spec"].pop("classes"), "classes"),
    (lambda ck: ck.update(model_args="tiny"), "malformed"),
    (lambda ck: ck["model_args"].update(in_channels=4), "4 bands"),
    (lambda ck: ck.update(version=99), "version"),
])
def test_malformed_headers_are_refused_clearly(tmp_path, change, match):
    with pytest.raises(CheckpointError, match=match) as e:
        read_checkpoint(_tamper(tmp_path, change))
    assert "bad.pth" in str(e.value)


def test_weights_that_do_not_fit_the_description(tmp_path):
    ck = save_checkpoint(tmp_path / "m.pth", ResNet18Segmentation(decoder="plain"), DataSpec())
    ck["model_args"]["decoder"] = "skip"  # weights of a plain decoder described as skip
    torch.save(ck, tmp_path / "mismatch.pth")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "mismatch.pth")


def test_non_finite_weights_are_never_saved_nor_loaded(tmp_path):
    m = TinySegmentation()
    with torch.no_grad():
        m.net[0][0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_checkpoint(tmp_path / "nan.pth", m, DataSpec())
    assert not (tmp_path / "nan.pth").exists()
    path = _tamper(tmp_path, lambda ck: ck["state_dict"]["net.2.bias"].fill_(float("inf")))
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        read_checkpoint(path)


def test_version_1_checkpoints_still_load(tmp_path):
    m = ResNet18Segmentation(num_classes=3, decoder="plain", in_channels=4)
    classes = ClassSpec(names=("a", "b", "c"), palette=((1, 1, 1), (2, 2, 2), (3, 3, 3)))
    torch.save({"format": "pointseg-checkpoint", "version": 1, "model_args": {
        "num_classes": 3, "decoder": "plain", "in_channels": 4}, "classes": classes.to_dict(), "scale": 0.25,
        "bands": [0, 1, 2, 3], "config": {}, "metrics": {"miou": 0.5, "epoch": 7}, "state_dict": m.state_dict()},
        tmp_path / "v1.pth")
    model, ck = load_model(tmp_path / "v1.pth")
    assert ck.spec == DataSpec(classes=classes, bands=(0, 1, 2, 3), channels=4, scale=0.25)
    assert ck.epoch == 7 and model.model_args == m.model_args


def test_the_cli_refuses_what_infer_refuses(tmp_path, capsys):
    import checkpoint
    ck = save_checkpoint(tmp_path / "m.pth", TinySegmentation(), DataSpec())
    assert checkpoint.main(checkpoint.get_args_parser().parse_args([str(tmp_path / "m.pth")])) == 0
    del ck["state_dict"]["net.2.bias"]  # a weight missing
    torch.save(ck, tmp_path / "bad.pth")
    capsys.readouterr()
    assert checkpoint.main(checkpoint.get_args_parser().parse_args([str(tmp_path / "bad.pth")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.pth" in err and "do not fit" in err
    with pytest.raises(CheckpointError, match="do not fit"):  # infer.py's check: the same
        load_model(tmp_path / "bad.pth")


def test_a_checkpoint_with_a_prior_predicts_under_it(tmp_path):
    """The posterior correction (Saerens et al. 2002): a model trained under one class prior predicts under another
    by adding log(map / train) to its logits, in every model load_model rebuilds; without a prior, as trained."""
    from checkpoint import prior_shift
    torch.manual_seed(0)
    model = TinySegmentation(num_classes=2)
    spec = DataSpec(scale=1.0, classes=ClassSpec(names=("background", "building"), palette=((0, 0, 0), (0, 0, 255)),
                                                 label_format="index"))
    prior = {"train": [0.5, 0.5], "map": [0.9, 0.1], "source": "test"}
    save_checkpoint(tmp_path / "plain.pth", model, spec)
    save_checkpoint(tmp_path / "prior.pth", model, spec, prior=prior)
    x = torch.rand(1, 3, 16, 16)
    plain, ck0 = load_model(tmp_path / "plain.pth")
    shifted, ck1 = load_model(tmp_path / "prior.pth")
    assert ck0.prior is None and ck1.prior == prior
    with torch.no_grad():
        a, b = plain(x), shifted(x)
    expected = torch.tensor([math.log(0.9 / 0.5), math.log(0.1 / 0.5)])
    assert torch.allclose(b - a, expected.view(1, 2, 1, 1).expand_as(a), atol=1e-6)
    assert (b.argmax(1) == 0).sum() >= (a.argmax(1) == 0).sum()  # more of the common class, never less
    with pytest.raises(ValueError, match="one positive share per class"):
        prior_shift({"train": [0.5, 0.5], "map": [1.0, 0.0]})
