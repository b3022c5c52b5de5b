import pytest
import torch
import torchvision

from model import (IMAGENET_MEAN, IMAGENET_STD, RESNET18_WEIGHTS_FILE, ResNet18Segmentation, TinySegmentation,
                   build_model)


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
    """forward() normalises with the ImageNet statistics itself: what reaches the first convolution is
    (x - mean) / std, not x."""
    m = ResNet18Segmentation().eval()
    seen = []
    m.stem.register_forward_hook(lambda mod, inputs, output: seen.append(inputs[0]))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        m(x)
    manual = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], manual, atol=1e-6)


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


def test_build_model_rebuilds_from_model_args():
    for m in (ResNet18Segmentation(num_classes=4, decoder="plain", in_channels=5), TinySegmentation(3, 2),
              build_model("tiny", 3, 2, click_channels=3, click_encoding="distance", click_radius=5)):
        again = build_model(**m.model_args)
        assert type(again) is type(m) and again.model_args == m.model_args
        again.load_state_dict(m.state_dict())  # same parameter names and shapes
    with pytest.raises(ValueError, match="unknown arch"):
        build_model(arch="vgg")
    with pytest.raises(ValueError, match="one click plane per class"):
        build_model("tiny", 3, click_channels=2)
    assert "click_channels" not in build_model("tiny", 3).model_args  # a model without clicks: args as before


def weights_file(tmp_path, monkeypatch, seed=0):
    """A torch home in tmp_path holding a resnet18 state dict under torchvision's ImageNet file name, and no
    network: the pretrained path must read that file. The weights are a seeded random init, not ImageNet's (no
    package ships those): the test proves where the encoder's weights come from, never what they are worth."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # get_dir follows TORCH_HOME

    def offline(*args, **kwargs):
        raise OSError("no network in this test")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    torch.manual_seed(seed)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_WEIGHTS_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path, state


def test_pretrained_encoder_is_read_from_the_weights_file_offline(tmp_path, monkeypatch):
    path, state = weights_file(tmp_path, monkeypatch)
    m = ResNet18Segmentation(pretrained=True, decoder="skip")
    assert torch.equal(m.stem[0].weight, state["conv1.weight"])
    assert torch.equal(m.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(m.stem[1].running_mean, state["bn1.running_mean"])
    assert not torch.equal(ResNet18Segmentation(pretrained=False).stem[0].weight, state["conv1.weight"])
    four = ResNet18Segmentation(pretrained=True, in_channels=4)  # a 4th band: the mean of the RGB filters
    assert torch.equal(four.stem[0].weight[:, :3], state["conv1.weight"])
    assert torch.allclose(four.stem[0].weight[:, 3], state["conv1.weight"].mean(1))
    path.write_bytes(path.read_bytes()[:1000])  # a broken download: refused, naming the file and the way out
    with pytest.raises(RuntimeError, match=f"could not load the ImageNet weights {RESNET18_WEIGHTS_FILE}.*"
                                           f"pretrained=False"):
        ResNet18Segmentation(pretrained=True)
