"""The click-conditioned model (DISIR, Lenczner et al. 2020; model.add_click_input, train.py --click-input): clicks
encoded as planes, drawn from the points in training, given to predict.py, and what the network does with them."""

import copy

import numpy as np
import pytest
import tifffile
import torch

from checkpoint import CheckpointError, load_model, read_checkpoint
from config import TrainConfig, check_config, config_from_args
from model import ClickDraw, add_click_input, build_model, click_planes, draw_clicks
from predict import TTA_MODES, predict_image, predict_probabilities
from spec import IGNORE_INDEX, PALETTE
from tests.conftest import cfg_for
from train import get_args_parser, main, train


def reference_planes(clicks, shape, k, encoding, radius):
    """The planes by brute force: every pixel's distance to every click of each class."""
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    out = np.zeros((k,) + shape, np.float32)
    for r, c, cls in clicks:
        d = np.hypot(rows - r, cols - c)
        out[cls] = np.maximum(out[cls], (d <= radius) if encoding == "disc" else np.clip(1 - d / radius, 0, None))
    return out


# --------------------------------------------------------------------------- clicks as planes

@pytest.mark.parametrize("encoding, radius", [("disc", 2.0), ("disc", 0.5), ("distance", 4.0), ("distance", 2.5)])
def test_each_click_lands_in_its_class_plane_at_its_place(encoding, radius):
    clicks = [(2, 3, 0), (10, 12, 2), (11, 12, 2), (0, 19, 1), (15, 0, 2)]  # two of class 2 overlap; two at the edges
    planes = click_planes(clicks, (16, 20), 4, encoding, radius)
    assert planes.shape == (4, 16, 20) and planes.dtype == torch.float32
    assert np.allclose(planes.numpy(), reference_planes(clicks, (16, 20), 4, encoding, radius), atol=1e-6)
    for r, c, cls in clicks:
        assert planes[cls, r, c] == 1  # the clicked pixel, in its class's plane
    assert planes[3].abs().sum() == 0  # a class nobody clicked: an empty plane
    assert click_planes([], (16, 20), 4, encoding, radius).abs().sum() == 0
    if encoding == "disc" and radius == 2.0:
        assert planes[0, 2, 5] == 1 and planes[0, 2, 6] == 0 and planes[0, 4, 5] == 0  # d = 2, 3, 2.8
    for bad in ([(16, 0, 0)], [(0, -1, 0)], [(0, 0, 4)]):
        with pytest.raises(ValueError, match="off the 16x20 grid"):
            click_planes(bad, (16, 20), 4, encoding, radius)


def sparse_target(b=8, h=24, w=20, points=(0, 1, 5, 30), seed=0, k=4):
    """(B, H, W) targets with the given number of labelled pixels per image (cycled), IGNORE_INDEX elsewhere."""
    rng = np.random.default_rng(seed)
    y = np.full((b, h * w), IGNORE_INDEX, np.int64)
    for i in range(b):
        n = points[i % len(points)]
        y[i, rng.choice(h * w, n, replace=False)] = rng.integers(0, k, n)
    return torch.from_numpy(y.reshape(b, h, w))


def test_the_draw_never_leaves_a_clicked_pixel_in_the_target_and_repeats_per_seed():
    y = sparse_target()
    planes, target = draw_clicks(y, 4, torch.Generator().manual_seed(3), max_clicks=6, p_none=0.0, radius=0.5)
    assert planes.shape == (8, 4, 24, 20) and target.shape == y.shape
    removed = (y != IGNORE_INDEX) & (target == IGNORE_INDEX)
    assert torch.equal(target[~removed], y[~removed])  # nothing else changes
    # radius 0.5: a click is its own pixel, so the planes are exactly the removed points, each in its class's plane
    assert torch.equal(planes.sum(1) > 0, removed) and planes.sum() == removed.sum()
    for b, r, c in removed.nonzero().tolist():
        assert planes[b, y[b, r, c], r, c] == 1
    labelled, clicked = (y != IGNORE_INDEX).sum((1, 2)), removed.sum((1, 2))
    assert (clicked[labelled < 2] == 0).all()  # an image with fewer than 2 points keeps them for the loss
    assert ((clicked >= 1) & (clicked <= torch.clamp(labelled - 1, max=6)))[labelled >= 2].all()
    again = draw_clicks(y, 4, torch.Generator().manual_seed(3), max_clicks=6, p_none=0.0, radius=0.5)
    other = draw_clicks(y, 4, torch.Generator().manual_seed(4), max_clicks=6, p_none=0.0, radius=0.5)
    assert torch.equal(again[0], planes) and torch.equal(again[1], target)
    assert not torch.equal(other[1], target)
    wide, wide_target = draw_clicks(y, 4, torch.Generator().manual_seed(3), max_clicks=6, p_none=0.0, radius=3)
    assert torch.equal(wide_target, target) and (wide >= planes).all()  # the same clicks, larger discs


def test_p_none_one_gives_empty_planes_and_the_whole_target_and_a_share_in_between():
    y = sparse_target(b=64, points=(30,))
    planes, target = draw_clicks(y, 4, torch.Generator().manual_seed(0), max_clicks=5, p_none=1.0)
    assert planes.abs().sum() == 0 and torch.equal(target, y)
    planes, _ = draw_clicks(y, 4, torch.Generator().manual_seed(0), max_clicks=5, p_none=0.5)
    without = int((planes.flatten(1).sum(1) == 0).sum())
    assert 16 <= without <= 48  # about half the images get none (binomial 64 x 0.5: 8 standard deviations wide)


def test_click_draw_appends_the_planes_to_the_image():
    model = build_model("tiny", 4, 3, click_channels=4, click_radius=0.5)
    y, x = sparse_target(), torch.rand(8, 3, 24, 20)
    xin, target = ClickDraw(model, 6, 0.0, torch.Generator().manual_seed(3))(x, y)
    planes, expected = draw_clicks(y, 4, torch.Generator().manual_seed(3), 6, 0.0, "disc", 0.5)
    assert torch.equal(xin[:, :3], x) and torch.equal(xin[:, 3:], planes) and torch.equal(target, expected)


# --------------------------------------------------------------------------- the network

@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_zero_click_filters_leave_the_no_click_output_exactly_unchanged(arch):
    torch.manual_seed(0)
    plain = build_model(arch, 5, 4, decoder="plain").eval()
    state = torch.get_rng_state()
    conditioned = add_click_input(copy.deepcopy(plain), "distance", 6).eval()
    assert torch.equal(torch.get_rng_state(), state)  # no random number drawn: an off run's draws cannot move
    conv = conditioned.get_submodule(conditioned.input_layer)
    assert conv.weight.shape[1] == 4 + 5 and conv.weight[:, 4:].abs().sum() == 0
    assert torch.equal(conv.weight[:, :4], plain.get_submodule(plain.input_layer).weight)
    x = torch.rand(2, 4, 40, 36)
    with torch.no_grad():
        expected = plain(x)
        assert torch.equal(conditioned(x), expected)  # the bands alone: empty planes appended
        assert torch.equal(conditioned(torch.cat([x, torch.zeros(2, 5, 40, 36)], 1)), expected)
        assert torch.equal(conditioned(torch.cat([x, torch.rand(2, 5, 40, 36)], 1)), expected)  # zero filters
    assert conditioned.model_args == {**plain.model_args, "click_channels": 5, "click_encoding": "distance",
                                      "click_radius": 6.0}
    again = build_model(**conditioned.model_args)
    again.load_state_dict(conditioned.state_dict())
    assert again.model_args == conditioned.model_args
    with pytest.raises(ValueError, match="takes 4 bands and 5 click planes"):
        conditioned(torch.rand(1, 6, 8, 8))


def test_click_planes_reach_the_first_convolution_as_they_are():
    """The bands are normalised (ImageNet statistics for ResNet18, x * 2 - 1 for the tiny one), the planes are not."""
    for model in (build_model("resnet18", 3, 3, click_channels=3), build_model("tiny", 3, 3, click_channels=3)):
        seen = []
        model.get_submodule(model.input_layer).register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
        x, planes = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            model.eval()(torch.cat([x, planes], 1))
        assert torch.equal(seen[0][:, 3:], planes)
        assert not torch.allclose(seen[0][:, :3], x)


def test_a_checkpoint_with_bad_click_settings_is_refused(tmp_path):
    from checkpoint import save_checkpoint
    from spec import DataSpec
    model = build_model("tiny", 6, 3, click_channels=6)
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, DataSpec(scale=1.0))
    assert read_checkpoint(path).model_args["click_channels"] == 6
    for change in ({"click_channels": 3}, {"click_encoding": "spiral"}, {"click_radius": 0}):
        d = torch.load(path, weights_only=True)
        d["model_args"].update(change)
        torch.save(d, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError, match="click input"):
            read_checkpoint(tmp_path / "bad.pth")


# --------------------------------------------------------------------------- predict.py

def random_click_model(seed=0):
    """The tiny network with click input whose click filters are random: a click changes its output."""
    torch.manual_seed(seed)
    model = build_model("tiny", 3, 3, click_channels=3, click_radius=2.0)
    with torch.no_grad():
        model.net[0][0].weight[:, 3:] = torch.randn_like(model.net[0][0].weight[:, 3:])
    return model.eval()


def test_predict_with_clicks_is_the_model_on_the_image_and_its_planes():
    model = random_click_model()
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    clicks = [(5, 7, 2), (30, 40, 0)]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    xin = torch.cat([x, click_planes(clicks, (40, 48), 3, "disc", 2.0)[None]], 1)
    with torch.no_grad():
        direct = torch.softmax(model(xin), 1)[0].numpy()
        flips = []  # the planes flip with the image
        for k, flip in TTA_MODES["flip"]:
            t = torch.rot90(torch.flip(xin, (-1,)) if flip else xin, k, (-2, -1))
            p = torch.rot90(torch.softmax(model(t), 1), -k, (-2, -1))
            flips.append(torch.flip(p, (-1,)) if flip else p)
    assert np.allclose(predict_probabilities(model, image, 1.0, clicks=clicks), direct, atol=1e-5)
    assert np.allclose(predict_probabilities(model, image, 1.0, clicks=clicks, tta="flip"),
                       torch.stack(flips).mean(0)[0].numpy(), atol=1e-5)
    assert np.array_equal(predict_probabilities(model, image, 1.0, clicks=[]), predict_probabilities(model, image, 1.0))


def test_a_click_on_a_tiled_image_changes_the_map_where_it_is_after_the_scale():
    """A 200 x 160 image at scale 0.5 (100 x 80 on the grid) in 32-pixel tiles: a click at input pixel (150, 30) is
    grid cell (75, 15); the map changes around it (disc 2 + the tiny network's 2-pixel reach, in grid cells) only."""
    model = random_click_model()
    image = np.random.default_rng(1).integers(0, 256, (200, 160, 3), dtype=np.uint8)
    kw = dict(tile=32, overlap=8, batch_size=3)
    before = predict_probabilities(model, image, 0.5, **kw)
    after = predict_probabilities(model, image, 0.5, clicks=[(150, 30, 1)], **kw)
    changed = np.abs(after - before).max(0) > 1e-6
    rows, cols = np.nonzero(changed)
    assert changed[150, 30] and after[1, 150, 30] != before[1, 150, 30]
    assert np.all(np.abs(rows - 151) <= 2 * 5 + 2) and np.all(np.abs(cols - 31) <= 2 * 5 + 2)
    assert predict_image(model, image, 0.5, clicks=[(150, 30, 1)], **kw).shape == (200, 160)
    with pytest.raises(ValueError, match="outside the 200x160 image"):
        predict_image(model, image, 0.5, clicks=[(200, 0, 1)], **kw)


# --------------------------------------------------------------------------- training

def blank_patches(root, n=8, side=32):
    """Patches whose images are one flat grey (nothing in them tells a class) and whose labels are four quadrants of
    classes (i, i + 1, i + 2, i + 3) mod 6: only clicks can say which class a pixel is."""
    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir()
    palette, h = np.asarray(PALETTE, np.uint8), side // 2
    for i in range(n):
        label = np.zeros((side, side), np.uint8)
        for q, (r, c) in enumerate(((0, 0), (0, h), (h, 0), (h, h))):
            label[r:r + h, c:c + h] = (i + q) % 6
        tifffile.imwrite(root / "Images" / f"Image_{i}.tif", np.full((side, side, 3), 120, np.uint8))
        tifffile.imwrite(root / "Labels" / f"Label_{i}.tif", palette[label])
    return root


@pytest.mark.parametrize("encoding", ["disc", "distance"])
def test_after_training_a_click_of_class_c_makes_its_pixel_class_c(tmp_path, encoding):
    """On flat grey images the no-click map cannot tell the classes apart, so anything a click does is learnt from
    the clicks drawn in training: for every one of the six classes, at two places, a click of that class raises its
    probability at the clicked pixel by far and makes it the predicted class there. A model that ignored its click
    planes (zero filters) would change nothing; chance would not pick the clicked class twelve times out of twelve."""
    root = blank_patches(tmp_path / "blank")
    train(cfg_for(root, tmp_path, points=None, size=32, epochs=20, lr=0.02, class_weights="none", gamma=0.0,
                  click_input=encoding, click_none=0.0))
    model, ck = load_model(tmp_path / "ck" / "last.pth")
    image = np.full((32, 32, 3), 120, np.uint8)
    before = predict_probabilities(model, image, ck.spec.scale)
    for c in range(6):
        for r, col in ((8, 8), (20, 24)):
            after = predict_probabilities(model, image, ck.spec.scale, clicks=[(r, col, c)])
            assert after[c, r, col] > before[c, r, col] + 0.3 and after[:, r, col].argmax() == c, (c, r, col)


def test_a_resumed_click_run_draws_the_clicks_an_unbroken_one_draws(data, tmp_path):
    kw = dict(click_input="disc", click_max=4)
    straight = train(cfg_for(data, tmp_path, out=str(tmp_path / "s"), epochs=2, **kw))
    train(cfg_for(data, tmp_path, out=str(tmp_path / "r"), epochs=1, **kw))
    resumed = train(cfg_for(data, tmp_path, out=str(tmp_path / "r"), epochs=2, resume=True, **kw))
    assert resumed[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"], rel=1e-6)
    other = train(cfg_for(data, tmp_path, out=str(tmp_path / "o"), epochs=2, click_input="disc", click_max=3))
    assert other[-1]["train_loss"] != straight[-1]["train_loss"]  # the draw depends on the settings


def test_the_command_line_trains_a_click_model_that_predicts_with_clicks(data, tmp_path, capsys):
    base = ["--data", str(data), "--arch", "tiny", "--no-pretrained", "--size", "32", "--points", "100", "--epochs",
            "1", "--batch-size", "4", "--max-train", "6", "--max-val", "2", "--no-progress", "--no-figures"]
    flags = ["--click-input", "disc", "--click-radius", "2", "--click-max", "5", "--click-none", "0.25"]
    args = get_args_parser().parse_args(base + flags + ["--out", str(tmp_path / "on")])
    cfg = config_from_args(args)
    assert (cfg.click_input, cfg.click_radius, cfg.click_max, cfg.click_none) == ("disc", 2.0, 5, 0.25)
    assert main(args) == 0
    assert "input clicks: disc r 2, up to 5 an image, none on 25% of them" in capsys.readouterr().out
    model, ck = load_model(tmp_path / "on" / "best_model.pth")
    assert ck.model_args["click_channels"] == 6 and model.click_channels == 6
    assert (model.click_encoding, model.click_radius) == ("disc", 2.0)
    assert (ck.config["click_max"], ck.config["click_none"]) == (5, 0.25)
    image = tifffile.imread(data / "Images" / "Image_6.tif")
    mask = predict_image(model, image, ck.spec.scale, clicks=[(10, 12, 3), (40, 5, 1)])
    assert mask.shape == image.shape[:2] and mask.max() < 6
    assert not np.array_equal(predict_probabilities(model, image, ck.spec.scale, clicks=[(10, 12, 3)]),
                              predict_probabilities(model, image, ck.spec.scale))

    assert main(get_args_parser().parse_args(base + ["--out", str(tmp_path / "off")])) == 0  # off: as before
    plain, ck = load_model(tmp_path / "off" / "best_model.pth")
    assert ck.model_args == {"arch": "tiny", "num_classes": 6, "in_channels": 3} and plain.click_channels == 0
    with pytest.raises(ValueError, match="trained without --click-input"):
        predict_image(plain, image, ck.spec.scale, clicks=[(10, 12, 3)])
    capsys.readouterr()
    for extra, match in ((["--click-radius", "2"], "--click-radius sets the input clicks"),
                         (["--click-input", "disc", "--click-none", "1.5"], "--click-none must be in [0, 1]"),
                         (["--click-input", "disc", "--click-max", "0"], "--click-max must be a whole number >= 1"),
                         (["--click-input", "disc", "--click-radius", "0"], "--click-radius must be a positive")):
        assert main(get_args_parser().parse_args(base + extra + ["--out", str(tmp_path / "bad")])) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_init_from_a_click_model_goes_on_and_a_plain_one_is_refused(data, tmp_path):
    train(cfg_for(data, tmp_path, epochs=1, out=str(tmp_path / "a"), click_input="distance", click_radius=4.0))
    train(cfg_for(data, tmp_path, epochs=1, out=str(tmp_path / "b"), click_input="distance", click_radius=4.0,
                  init=str(tmp_path / "a" / "last.pth")))
    assert read_checkpoint(tmp_path / "b" / "last.pth").model_args["click_encoding"] == "distance"
    with pytest.raises(ValueError, match="give the same --arch, --decoder and --click-input"):
        train(cfg_for(data, tmp_path, epochs=1, out=str(tmp_path / "c"), init=str(tmp_path / "a" / "last.pth")))


def test_the_click_settings_stay_out_of_the_keys_of_runs_without_them():
    from config import key_settings
    assert not {"click_input", "click_radius", "click_max", "click_none"} & set(key_settings(TrainConfig()))
    assert key_settings(TrainConfig(click_input="disc"))["click_input"] == "disc"
    check_config(TrainConfig(click_input="distance", click_radius=12.0, click_max=1, click_none=1.0))
