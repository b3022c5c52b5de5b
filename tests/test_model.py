import pytest
import torch
import torchvision

from dataset import POTSDAM
from model import RESNET18_WEIGHTS_FILE, ResNet18Segmentation, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("decoder", ["plain", "skip"])
@pytest.mark.parametrize("size", [(150, 150), (300, 300), (37, 61)])
def test_output_size_equals_input(decoder, size):
    m = ResNet18Segmentation(decoder=decoder).eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, *size))
    assert out.shape == (1, 6, *size)


@pytest.mark.parametrize("decoder", ["plain", "skip"])
def test_backward_reaches_encoder_and_decoder(decoder):
    m = ResNet18Segmentation(num_classes=4, decoder=decoder)
    m(torch.rand(2, 3, 40, 40)).mean().backward()
    assert m.stem[0].weight.grad.abs().sum() > 0
    assert m.head.weight.grad.abs().sum() > 0


def test_normalisation_is_inside_the_model():
    m = ResNet18Segmentation().eval()
    x = torch.rand(1, 3, 32, 32)
    manual = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(m.stem(manual), m.stem((x - m.mean) / m.std), atol=1e-6)
    assert m.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_extra_band_starts_from_mean_of_rgb_filters():
    m = ResNet18Segmentation(in_channels=4)
    w = m.stem[0].weight
    assert w.shape[1] == 4
    assert torch.allclose(w[:, 3], w[:, :3].mean(1))
    assert m.eval()(torch.rand(1, 4, 32, 32)).shape == (1, 6, 32, 32)


def test_pretrained_offline_names_file_and_way_out(tmp_path, monkeypatch):
    # an empty torch home and no network: the weights cannot be had
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as e:
        ResNet18Segmentation(pretrained=True)
    msg = str(e.value)
    assert RESNET18_WEIGHTS_FILE in msg and str(tmp_path / "hub") in msg and "pretrained=False" in msg


@pytest.mark.parametrize("decoder", ["plain", "skip"])
def test_checkpoint_round_trip(tmp_path, decoder):
    m = ResNet18Segmentation(decoder=decoder).eval()
    save_checkpoint(tmp_path / "m.pth", m, classes=POTSDAM, scale=0.5, config={"epochs": 3},
                    metrics={"miou": 0.42})
    m2, ck = load_checkpoint(tmp_path / "m.pth")
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    assert ck["scale"] == 0.5 and ck["metrics"]["miou"] == 0.42
    assert ck["classes"]["names"] == list(POTSDAM.names)
    assert ck["model_args"]["decoder"] == decoder


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.py"):
        load_checkpoint(tmp_path / "none.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pth")
    m = ResNet18Segmentation(decoder="plain")
    ck = save_checkpoint(tmp_path / "m.pth", m, classes=POTSDAM, scale=0.5)
    ck["model_args"]["decoder"] = "skip"  # weights of a plain decoder described as skip
    torch.save(ck, tmp_path / "mismatch.pth")
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint(tmp_path / "mismatch.pth")
