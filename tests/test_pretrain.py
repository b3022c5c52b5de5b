"""pretrain.py: masked image modelling lowers the reconstruction loss, the encoder file round-trips into a
segmentation model (head left alone, other models refused), the CLI's user errors, and what the loss counts."""

import numpy as np
import pytest
import tifffile
import torch

import pretrain
from checkpoint import save_checkpoint
from model import build_model
from pretrain import (apply_encoder, block_mask, draw_batch, find_images, fit_spec, get_args_parser, load_images,
                      main, masked_loss, read_encoder, reconstruction_loss, reconstruction_model, standardise)
from spec import DataSpec


def write_images(folder, n=4, size=(40, 40), bands=3, seed=0):
    """n uint8 TIFFs of stripes (random period, angle and phase per band) plus noise: structure a model can
    paint back into a hidden square from its surroundings."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size[0], :size[1]]
    for i in range(n):
        img = np.empty((*size, bands), np.uint8)
        for b in range(bands):
            angle, period, phase = rng.uniform(0, np.pi), rng.uniform(6, 10), rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
            img[..., b] = np.clip(128 + 90 * wave + rng.normal(0, 8, size), 1, 255)
        tifffile.imwrite(folder / f"tile_{i}.tif", img if bands > 1 else img[..., 0], compression="lzw")
    return folder


def run(*argv):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


TINY = ("--arch", "tiny", "--steps", 3, "--batch-size", 4, "--crop", 16, "--block", 4, "--no-progress")


# --------------------------------------------------------------------------- learning

def test_pretraining_lowers_the_masked_reconstruction_loss(tmp_path):
    train_paths = find_images([write_images(tmp_path / "train", n=6)])
    held_paths = find_images([write_images(tmp_path / "held", n=3, seed=1)])
    spec = fit_spec(train_paths, size=40)
    torch.manual_seed(123)  # fixed held-out crops and masks
    x, valid = draw_batch(load_images(held_paths, spec, progress=False), 16, 16)
    mask = block_mask(16, 16, 4, 0.5)

    def held_out_loss(model):
        with torch.no_grad():
            return reconstruction_loss(model.eval(), x, valid, mask).item()

    torch.manual_seed(0)  # pretrain's own initialisation (seed 0)
    before = held_out_loss(reconstruction_model("tiny", 3))
    model, final = pretrain.pretrain(load_images(train_paths, spec, progress=False), "tiny", steps=100,
                                     batch_size=8, crop=16, mask_ratio=0.5, block=4, lr=3e-3, warmup=5,
                                     progress=False)
    after = held_out_loss(model)
    assert after < 0.85 * before and after < 0.9  # predicting the mean (0 after standardising) scores 1
    assert np.isfinite(final)


# --------------------------------------------------------------------------- the file

def test_encoder_file_round_trips_into_a_segmentation_model(tmp_path):
    images, out = write_images(tmp_path / "img"), tmp_path / "enc" / "encoder.pth"
    assert run("--images", images, "--out", out, *TINY) == 0
    d = read_encoder(out)
    assert d["format"] == "pretrained-encoder" and d["model_args"] == {"arch": "tiny", "in_channels": 3}
    assert d["spec"]["channels"] == 3 and d["pretraining"]["images"] == 4 and d["pretraining"]["steps"] == 3
    torch.manual_seed(5)
    seg = build_model("tiny", num_classes=2, in_channels=3)
    head = seg.output_layer
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    line = apply_encoder(seg, out, channels=3)
    assert str(out) in line and "masked image modelling" in line and "3 steps on 4 images" in line
    after = seg.state_dict()
    heads = [k for k in after if k.startswith(head + ".")]
    assert heads and all(torch.equal(after[k], before[k]) for k in heads)  # the segmentation head as it was
    assert sorted(d["state_dict"]) == sorted(k for k in after if k not in heads)
    assert all(torch.equal(after[k], v) for k, v in d["state_dict"].items())
    assert any(not torch.equal(before[k], v) for k, v in d["state_dict"].items())  # it did change the model


def test_other_bands_or_arch_are_refused_naming_the_file(tmp_path):
    out = tmp_path / "encoder.pth"
    assert run("--images", write_images(tmp_path / "gray", bands=1), "--out", out, *TINY) == 0
    apply_encoder(build_model("tiny", num_classes=2, in_channels=1), out, channels=1)  # the same bands: fine
    with pytest.raises(ValueError, match=f"{out}.*1-band"):
        apply_encoder(build_model("tiny", num_classes=2, in_channels=3), out, channels=3)
    with pytest.raises(ValueError, match=f"{out}.*resnet18"):
        apply_encoder(build_model("resnet18", num_classes=2, in_channels=1), out, channels=1)


def test_read_encoder_refuses_checkpoints_truncated_and_missing_files(tmp_path):
    ck = tmp_path / "best_model.pth"
    save_checkpoint(ck, build_model("tiny", 6), DataSpec())
    with pytest.raises(ValueError, match=f"{ck} is a training checkpoint.*pretrain.py"):
        read_encoder(ck)
    assert run("--images", write_images(tmp_path / "img"), "--out", tmp_path / "enc.pth", *TINY) == 0
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "enc.pth").read_bytes()[:2000])
    with pytest.raises(ValueError, match=f"{cut} is not a readable encoder file"):
        read_encoder(cut)
    with pytest.raises(ValueError, match=f"{tmp_path / 'none.pth'} not found"):
        read_encoder(tmp_path / "none.pth")


def test_output_layer_names_the_final_convolution():
    for m in (build_model("tiny", num_classes=5, in_channels=2), build_model("resnet18", num_classes=5)):
        layer = dict(m.named_modules())[m.output_layer]
        assert isinstance(layer, torch.nn.Conv2d) and layer.out_channels == 5 and layer.kernel_size == (1, 1)


def test_resnet18_encoder_keys_round_trip(tmp_path):
    out = tmp_path / "encoder.pth"
    assert run("--images", write_images(tmp_path / "img", n=2), "--out", out, "--arch", "resnet18", "--steps", 2,
               "--batch-size", 2, "--crop", 32, "--no-progress") == 0
    d = read_encoder(out)
    assert d["model_args"] == {"arch": "resnet18", "decoder": "skip", "in_channels": 3}
    seg = build_model("resnet18", num_classes=6, in_channels=3, decoder="skip")
    apply_encoder(seg, out, channels=3)
    assert torch.equal(seg.layer4[1].conv2.weight, d["state_dict"]["layer4.1.conv2.weight"])
    assert not any(k.startswith("head.") for k in d["state_dict"])
    with pytest.raises(ValueError, match=f"{out}.*plain"):
        apply_encoder(build_model("resnet18", num_classes=6, decoder="plain"), out, channels=3)


# --------------------------------------------------------------------------- CLI

def test_existing_out_is_kept_unless_overwrite(tmp_path, capsys):
    images, out = write_images(tmp_path / "img"), tmp_path / "encoder.pth"
    out.write_bytes(b"someone's file")
    assert run("--images", images, "--out", out, *TINY) == 2
    assert out.read_bytes() == b"someone's file"
    assert f"error: {out} exists" in capsys.readouterr().err
    assert run("--images", images, "--out", out, *TINY, "--overwrite") == 0
    assert read_encoder(out)["pretraining"]["steps"] == 3


@pytest.mark.parametrize("bad", [("--mask-ratio", 1.5), ("--mask-ratio", 0), ("--steps", 0),
                                 ("--arch", "resnet18", "--crop", 16), ("--crop", 3), ("--missing-folder",),
                                 ("--empty-folder",)])
def test_bad_arguments_exit_2_before_reading_anything(tmp_path, capsys, monkeypatch, bad):
    images = write_images(tmp_path / "img")
    if bad == ("--missing-folder",):
        images, bad = tmp_path / "nowhere", ()
    elif bad == ("--empty-folder",):
        (tmp_path / "empty").mkdir()
        images, bad = tmp_path / "empty", ()

    def no_reading(*args, **kwargs):
        raise AssertionError("an image was read before the arguments were checked")
    monkeypatch.setattr(pretrain, "fit_spec", no_reading)
    assert run("--images", images, "--out", tmp_path / "enc.pth", *TINY, *bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and not (tmp_path / "enc.pth").exists()
    if not bad:
        assert str(images) in err


# --------------------------------------------------------------------------- what the loss counts

def test_loss_counts_hidden_valid_pixels_only():
    torch.manual_seed(0)
    x = torch.rand(2, 2, 8, 8)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[:, :, 6:] = False  # padding on the right
    x[:, :, :, 6:] = 0
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :4, 4:] = True  # one hidden 4x4 block, half of it over the padding
    target = standardise(x, valid)
    pred = torch.where(mask[:, None] & valid[:, None], target, torch.full_like(x, 5.0))  # wrong elsewhere
    assert masked_loss(pred, x, valid, mask).item() == 0
    pred[0, 1, 0, 4] += 1  # one band of one hidden valid pixel off by 1: 1/2 over 2 x 8 such pixels
    assert masked_loss(pred, x, valid, mask).item() == pytest.approx(0.5 / 16)
    # the padding does not move the target's statistics either
    assert torch.allclose(target[..., :6], standardise(x[..., :6], valid[..., :6]), atol=1e-5)
    assert torch.allclose(target[..., :6].mean((2, 3)), torch.zeros(2, 2), atol=1e-5)


def test_small_images_are_padded_and_the_padding_is_never_valid(tmp_path):
    spec = fit_spec(find_images([write_images(tmp_path / "img", n=2, size=(10, 12))]), scale=1)
    images = load_images(find_images([tmp_path / "img"]), spec, progress=False)
    torch.manual_seed(0)
    x, valid = draw_batch(images, 8, 16)
    assert x.shape == (8, 3, 16, 16) and (valid.sum((1, 2)) == 120).all()  # the 10x12 image, nothing more
    assert (x.permute(1, 0, 2, 3)[:, ~valid] == 0).all()


def test_block_mask_hides_the_asked_share_in_whole_blocks():
    torch.manual_seed(0)
    mask = block_mask(4, 16, 4, 0.6)
    cells = mask[:, ::4, ::4]
    assert (cells.sum((1, 2)) == round(0.6 * 16)).all()
    assert torch.equal(mask, cells.repeat_interleave(4, 1).repeat_interleave(4, 2))


# --------------------------------------------------------------------------- train.py --encoder

def test_train_starts_from_the_encoder_and_refuses_one_that_does_not_fit(data, tmp_path, capsys):
    from dataclasses import replace

    from tests.conftest import cfg_for
    from train import train
    enc = tmp_path / "enc.pth"
    assert run("--images", data / "Images", "--out", enc, *TINY, "--size", 32) == 0
    pre = read_encoder(enc)["state_dict"]
    cfg = cfg_for(data, tmp_path, epochs=1, encoder=str(enc), lr=1e-12)  # learns nothing: the start shows
    train(cfg)
    out = capsys.readouterr().out
    assert f"encoder from {enc}: masked image modelling, 3 steps" in out and "tiny pretrained encoder" in out
    state = torch.load(tmp_path / "ck" / "last.pth", weights_only=True)["state_dict"]
    assert torch.allclose(state["net.0.0.weight"], pre["net.0.0.weight"], atol=1e-6)
    with pytest.raises(ValueError, match="add --no-pretrained"):
        train(replace(cfg, arch="resnet18", pretrained=True, out=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="pretrained on 3-band images, this model takes 2"):
        train(replace(cfg, bands=(0, 1), out=str(tmp_path / "y")))
    assert not (tmp_path / "y").exists()  # refused before anything was written
