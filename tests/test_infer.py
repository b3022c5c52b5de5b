"""infer.py: masks of the input's size at the training scale, tiles that blend into the whole-image result,
TTA, every input kind, GeoTIFF tags carried over, bad files reported, inputs never overwritten."""

import hashlib
import itertools
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import infer
import predict
import raster
from checkpoint import load_model, save_checkpoint
from model import ResNet18Segmentation
from raster import resize
from spec import PALETTE, ClassSpec, DataSpec, Intensity, grid_size, load_input, to_grid
from tests.conftest import run, smooth_image

ROOT = Path(__file__).resolve().parents[1]
GEOTAGS = [(33550, "d", 3, (0.05, 0.05, 0.0), True),
           (33922, "d", 6, (0.0, 0.0, 0.0, 368000.0, 5808000.0, 0.0), True),
           (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 25833), True),
           (34736, "d", 2, (6378137.0, 298.257222101), True),
           (34737, "s", 0, "ETRS89 / UTM zone 33N|", True)]
TRANSFORM = [(34264, "d", 16, (0.05, 0.0, 0.0, 368000.0, 0.0, -0.05, 0.0, 5808000.0) + (0.0,) * 7 + (1.0,), True),
             (34735, "H", 8, (1, 1, 0, 1, 3072, 0, 1, 25833), True)]


# --------------------------------------------------------------------------- helpers

class PixelModel(nn.Module):
    """A 1x1 convolution: each pixel's prediction depends on that pixel alone, so tiling must not change it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 1)
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.conv(x * 8 - 4)


class LocalModel(nn.Module):
    """Two 3x3 convolutions: a 5-pixel receptive field, zero padding at tile edges like a real network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 6, 3, padding=1))

    def forward(self, x):
        return self.net(x * 8 - 4)


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.manual_seed(0)
    save_checkpoint(path, ResNet18Segmentation(decoder="plain"), DataSpec(scale=0.5))
    return path


def mask_of(path):
    with Image.open(path) as im:
        assert im.mode == "P"
        return np.asarray(im)


def write_inputs(folder):
    """One file of every kind the tool reads; odd sizes. Returns {name: (H, W)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = smooth_image(37, 53)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(smooth_image(41, 30)).save(folder / "photo.jpg")
    Image.fromarray(smooth_image(20, 21)).save(folder / "photo2.JPEG")
    Image.fromarray(np.dstack([rgb, np.full((37, 53), 255, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb[:, :, 0]).save(folder / "gray.png")
    tifffile.imwrite(folder / "lzw_tiled.tif", smooth_image(64, 64), photometric="rgb", compression="lzw",
                     tile=(16, 16))
    tifffile.imwrite(folder / "big.tiff", smooth_image(33, 35), photometric="rgb", bigtiff=True)
    tifffile.imwrite(folder / "sixteen.tif", smooth_image(31, 29).astype(np.uint16) * 16, photometric="rgb")
    tifffile.imwrite(folder / "five_bands.tif", np.moveaxis(smooth_image(25, 27, bands=5), -1, 0),
                     photometric="minisblack", planarconfig="separate")
    return {"rgb": (37, 53), "photo": (41, 30), "photo2": (20, 21), "rgba": (37, 53), "gray": (37, 53),
            "lzw_tiled": (64, 64), "big": (33, 35), "sixteen": (31, 29), "five_bands": (25, 27)}


# --------------------------------------------------------------------------- tiles and blending

@pytest.mark.parametrize("length, tile, overlap", [(100, 512, 64), (513, 512, 64), (3000, 512, 64), (1000, 100, 30),
                                                   (77, 32, 0)])
def test_tiles_cover_the_side_with_the_overlap(length, tile, overlap):
    starts, size = predict.tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + size == length
    if length > tile:
        assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))
        assert size <= tile and (size % 32 == 0 or size == tile)
    else:
        assert starts == [0] and size == length


@pytest.mark.parametrize("scale, size", [(1.0, (150, 173)), (0.5, (151, 173)), (0.7, (97, 120))])
def test_tiled_probabilities_equal_the_whole_image_for_a_pixelwise_model(scale, size):
    image = smooth_image(*size)
    model = PixelModel().eval()
    whole = predict.predict_probabilities(model, image, scale, tile=1024)
    assert len(model.shapes) == 1
    tiled = predict.predict_probabilities(model, image, scale, tile=32, overlap=8, batch_size=3)
    assert len(model.shapes) > 4  # it really tiled
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    assert whole.shape == (6,) + size
    # and the whole-image result is softmax(model(resized)) upsampled bilinearly
    h, w = grid_size(*size, scale)
    x = torch.from_numpy(resize(image, (h, w)).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        ref = F.interpolate(torch.softmax(model(x), 1), size=size, mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(whole, ref.numpy(), atol=1e-5)


def test_tiled_prediction_agrees_with_whole_image():
    image = smooth_image(130, 157, seed=1)
    model = LocalModel().eval()
    whole = predict.predict_image(model, image, 1.0, tile=1024)
    assert len(np.unique(whole)) >= 3  # a prediction with something to disagree about
    tiled = predict.predict_image(model, image, 1.0, tile=48, overlap=16, batch_size=5)
    assert (tiled == whole).mean() >= 0.99


def test_model_sees_the_training_scale_and_mask_has_the_input_size():
    model = PixelModel().eval()
    pred = predict.predict_image(model, smooth_image(37, 53), 0.5)
    assert model.shapes == [(1, 3, 19, 27)]  # round(37 * 0.5), round(53 * 0.5)
    assert pred.shape == (37, 53) and pred.dtype == np.uint8


def test_upsampler_streams_the_same_numbers_as_interpolate():
    torch.manual_seed(0)
    probs = torch.rand(6, 23, 31)
    ref = F.interpolate(probs[None], size=(67, 50), mode="bilinear", align_corners=False)[0]
    out = torch.zeros_like(ref)

    def sink(y0, y1, rows):
        out[:, y0:y1] = rows

    up = predict._Upsampler(23, 31, 67, 50, sink, chunk_bytes=1)  # one output row at a time
    for a, b in [(0, 1), (1, 9), (9, 10), (10, 23)]:  # rows arrive in uneven bands
        up.push(probs[:, a:b])
    assert up.y == 67
    torch.testing.assert_close(out, ref)


def test_class_indices_are_the_argmax_with_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    probs = torch.randint(0, 3, (6, 40, 77), generator=g).float()  # many equal maxima: the first one wins
    probs[2, ::7, ::5] = float("nan")
    for p in (probs, probs[:, :, ::2], probs.permute(0, 2, 1)):
        np.testing.assert_array_equal(predict.class_indices(p), p.argmax(0).numpy())


@pytest.mark.slow
def test_tta_makes_the_prediction_rotation_and_flip_invariant():
    torch.manual_seed(0)
    model = ResNet18Segmentation(decoder="skip").eval()
    image = smooth_image(32, 32)  # a multiple of 32: the model's own padding does not break the symmetry
    p = predict.predict_probabilities(model, image, 1.0, tta=True)
    turned = np.rot90(image[:, ::-1], 1).copy()  # flip, then a quarter turn
    q = predict.predict_probabilities(model, turned, 1.0, tta=True)
    np.testing.assert_allclose(np.rot90(q, -1, axes=(1, 2))[:, :, ::-1], p, atol=1e-5)
    plain = predict.predict_probabilities(model, image, 1.0)
    flipped = predict.predict_probabilities(model, image[:, ::-1].copy(), 1.0)[:, :, ::-1]
    assert not np.allclose(plain, flipped, atol=1e-5)  # without TTA the model is not invariant
    hv = predict.predict_probabilities(model, image[::-1, ::-1].copy(), 1.0, tta="flip")[:, ::-1, ::-1]
    np.testing.assert_allclose(hv, predict.predict_probabilities(model, image, 1.0, tta="flip"), atol=1e-5)


# --------------------------------------------------------------------------- the CLI on files

def test_every_input_kind_gets_a_mask_of_its_size(ckpt_path, tmp_path, capsys):
    sizes = write_inputs(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", "--index", "--overlay") == 0
    out = capsys.readouterr().out
    for path in sorted((tmp_path / "in").iterdir()):
        if path.suffix == ".txt":
            continue
        h, w = sizes[path.stem]
        stem = f"{path.stem}_{path.suffix[1:]}"  # photo2.JPEG -> photo2_JPEG_mask.png
        mask = mask_of(tmp_path / "out" / f"{stem}_mask.png")
        assert mask.shape == (h, w) and mask.max() < 6, stem
        with Image.open(tmp_path / "out" / f"{stem}_mask.index.png") as im:
            np.testing.assert_array_equal(np.asarray(im), mask)
        with Image.open(tmp_path / "out" / f"{stem}_mask.overlay.jpg") as im:
            assert im.size == (w, h)
    assert "gray.png: single-band" in out and "five_bands.tif: 5 bands" in out
    assert "WARNING" in out and "sixteen.tif: the model was trained on 8-bit images and this image is uint16" in out
    assert "notes.txt" in out and f"{len(sizes)} images done, 1 skipped, 0 failed, 1 with warnings" in out
    assert not list((tmp_path / "out").glob("*.tif"))  # no georeferenced input: no mask TIFF


def test_colour_mask_uses_the_checkpoint_palette(ckpt_path, tmp_path):
    palette = ((10, 20, 30), (40, 50, 60), (70, 80, 90), (1, 2, 3), (4, 5, 6), (7, 8, 9))
    classes = ClassSpec(names=tuple("abcdef"), palette=palette)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "own.pth", ResNet18Segmentation(), DataSpec(classes=classes, scale=1.0))
    Image.fromarray(smooth_image(32, 40)).save(tmp_path / "a.png")
    assert run(tmp_path / "own.pth", tmp_path / "a.png", tmp_path / "out") == 0
    with Image.open(tmp_path / "out" / "a_png_mask.png") as im:
        colours = set(map(tuple, np.asarray(im.convert("RGB")).reshape(-1, 3)))
    assert colours and colours <= set(palette)


@pytest.mark.parametrize("tags", [GEOTAGS, TRANSFORM], ids=["tiepoint", "transformation"])
def test_geotiff_mask_keeps_the_georeferencing(ckpt_path, tmp_path, tags):
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "geo.tif", smooth_image(45, 38), photometric="rgb", extratags=tags,
                     compression="lzw")
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out") == 0
    with tifffile.TiffFile(tmp_path / "out" / "geo_tif_mask.tif") as tif:
        page = tif.pages.first
        for code, _, _, value, _ in tags:
            assert page.tags[code].value == value, code
        indices = page.asarray()
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
    assert indices.shape == (45, 38)
    np.testing.assert_array_equal(indices, mask_of(tmp_path / "out" / "geo_tif_mask.png"))


@pytest.mark.parametrize("mode", [[], ["--no-pipeline"]], ids=["pipelined", "serial"])
def test_bad_files_are_named_the_rest_written_and_the_exit_code_is_not_zero(ckpt_path, tmp_path, capsys, mode):
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(smooth_image(30, 31)).save(inp / "good.png")
    Image.fromarray(smooth_image(64, 64)).save(inp / "cut.png")
    (inp / "cut.png").write_bytes((inp / "cut.png").read_bytes()[:300])  # truncated
    (inp / "empty.jpg").write_bytes(b"")
    (inp / "junk.tif").write_bytes(b"II*\x00 definitely not a tiff")
    tifffile.imwrite(inp / "two_bands.tif", smooth_image(20, 20, bands=2), photometric="minisblack",
                     planarconfig="contig")
    Image.fromarray(smooth_image(22, 23)).save(inp / "zz_last.png")
    assert run(ckpt_path, inp, tmp_path / "out", *mode) == 1
    captured = capsys.readouterr()
    for name in ("cut.png", "empty.jpg", "junk.tif", "two_bands.tif"):
        assert name in captured.err, name
        assert not (tmp_path / "out" / f"{name.replace('.', '_')}_mask.png").exists()
    assert "unsupported band layout" in captured.err
    assert "2 images done, 0 skipped, 4 failed" in captured.out
    assert mask_of(tmp_path / "out" / "good_png_mask.png").shape == (30, 31)
    assert mask_of(tmp_path / "out" / "zz_last_png_mask.png").shape == (22, 23)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_exit_code_of_the_script(ckpt_path, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(smooth_image(30, 31)).save(inp / "good.png")
    (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    r = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(ckpt_path), "--input", str(inp),
                        "--output", str(tmp_path / "out"), "--no-progress"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "broken.png" in r.stderr
    assert (tmp_path / "out" / "good_png_mask.png").is_file()


@pytest.mark.slow
def test_inputs_are_never_overwritten_nor_read_back(ckpt_path, tmp_path):
    inp = tmp_path / "data"
    inp.mkdir()
    Image.fromarray(smooth_image(30, 30)).save(inp / "same.png")
    tifffile.imwrite(inp / "same.tif", smooth_image(30, 30, seed=3), photometric="rgb", extratags=GEOTAGS)
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inp.iterdir()}
    before = digest()
    assert run(ckpt_path, inp, inp) == 0
    first = digest()
    assert run(ckpt_path, inp, inp) == 0  # a second run: its own masks are not inputs
    after = digest()
    assert {k: after[k] for k in before} == before
    assert set(after) == set(first)
    assert not [n for n in after if "_mask_mask" in n]
    assert {"same_png_mask.png", "same_tif_mask.png", "same_tif_mask.tif"} <= set(after)  # one stem, two files


def test_missing_checkpoint_says_how_to_train_one(tmp_path, capsys):
    Image.fromarray(smooth_image(30, 31)).save(tmp_path / "a.png")
    assert run(tmp_path / "nope.pth", tmp_path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "nope.pth" in err and "train.py" in err
    assert not (tmp_path / "out").exists()  # nothing was done


def test_foreign_checkpoint_and_bad_input_folders_fail_before_any_work(ckpt_path, tmp_path, capsys):
    Image.fromarray(smooth_image(30, 31)).save(tmp_path / "a.png")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    assert run(tmp_path / "other.pth", tmp_path / "a.png", tmp_path / "out") == 2
    assert "not a checkpoint of this project" in capsys.readouterr().err
    assert run(ckpt_path, tmp_path / "missing", tmp_path / "out") == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert run(ckpt_path, tmp_path / "empty", tmp_path / "out") == 2
    assert "no images in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bands_flag_and_checkpoint_bands(ckpt_path, tmp_path):
    six = smooth_image(26, 28, bands=6)
    tifffile.imwrite(tmp_path / "six.tif", np.moveaxis(six, -1, 0), photometric="minisblack",
                     planarconfig="separate")
    assert run(ckpt_path, tmp_path / "six.tif", tmp_path / "a", "--bands", "3", "4", "5") == 0
    tifffile.imwrite(tmp_path / "last3.tif", six[:, :, 3:], photometric="rgb")
    assert run(ckpt_path, tmp_path / "last3.tif", tmp_path / "b") == 0
    np.testing.assert_array_equal(mask_of(tmp_path / "a" / "six_tif_mask.png"),
                                  mask_of(tmp_path / "b" / "last3_tif_mask.png"))
    torch.manual_seed(0)  # the same weights as ckpt_path, trained (it says) on bands 3, 4, 5
    save_checkpoint(tmp_path / "b345.pth", ResNet18Segmentation(), DataSpec(scale=0.5, bands=(3, 4, 5)))
    assert run(tmp_path / "b345.pth", tmp_path / "six.tif", tmp_path / "c") == 0
    np.testing.assert_array_equal(mask_of(tmp_path / "c" / "six_tif_mask.png"),
                                  mask_of(tmp_path / "a" / "six_tif_mask.png"))


def test_help_explains_every_flag(capsys):
    parser = infer.get_args_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--input", "--output", "--device", "--tile", "--overlap", "--batch-size", "--tta",
                 "--bands", "--index", "--overlay", "--scale", "--no-pipeline", "--skip-existing"):
        assert flag in text
    defaults = parser.parse_args([])
    assert (defaults.checkpoint, defaults.input, defaults.output, defaults.device) == \
        ("checkpoints/best_model.pth", "input_images", "output_images", "auto")


# --------------------------------------------------------------------------- what a careless user still breaks

def test_output_names_never_collide(ckpt_path, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["a.png", "a.tif", "a_png.jpg", "x.png", "x.PNG", "solo.png"]
    for k, name in enumerate(names):
        image = smooth_image(20 + k, 24, seed=k)
        if name.endswith(".tif"):
            tifffile.imwrite(folder / name, image, photometric="rgb")
        else:
            Image.fromarray(image).save(folder / name, format="JPEG" if name.endswith("jpg") else "PNG")
    assert run(ckpt_path, folder, tmp_path / "out") == 0
    masks = sorted(tmp_path.joinpath("out").glob("*_mask.png"))
    assert len(masks) == len(names) and len({m.name.casefold() for m in masks}) == len(names)
    assert (tmp_path / "out" / "solo_png_mask.png").is_file()
    heights = sorted(np.asarray(Image.open(m)).shape[0] for m in masks)
    assert heights == [20 + k for k in range(len(names))]  # one mask per input, none overwritten


@pytest.mark.parametrize("extra, match", [
    (["--scale", "0"], "--scale"), (["--scale", "-1"], "--scale"), (["--tile", "16"], "--tile"),
    (["--batch-size", "0"], "--batch-size"), (["--overlap", "512"], "--overlap"), (["--bit-depth", "3"], "--bit-depth"),
])
def test_bad_arguments_stop_before_any_work(ckpt_path, tmp_path, capsys, extra, match):
    Image.fromarray(smooth_image(40, 40)).save(tmp_path / "a.png")
    assert run(ckpt_path, tmp_path / "a.png", tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_found_before_any_prediction(ckpt_path, tmp_path, capsys, monkeypatch):
    Image.fromarray(smooth_image(40, 40)).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("in the way")
    called = []
    monkeypatch.setattr(predict, "predict_image", lambda *a, **k: called.append(1))
    assert run(ckpt_path, tmp_path / "a.png", tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err and not called


@pytest.mark.parametrize("change, match", [
    (lambda ck: ck["spec"]["classes"].update(names=["a", "b"], palette=[[1, 1, 1], [2, 2, 2]]), "6 outputs"),
    (lambda ck: ck["spec"].update(scale=0.0), "scale"),
    (lambda ck: ck.pop("spec"), "malformed"),
])
def test_bad_checkpoint_header_exits_2_with_a_message(tmp_path, capsys, change, match):
    ck = save_checkpoint(tmp_path / "m.pth", ResNet18Segmentation(decoder="plain"), DataSpec())
    change(ck)
    torch.save(ck, tmp_path / "bad.pth")
    Image.fromarray(smooth_image(40, 40)).save(tmp_path / "a.png")
    assert run(tmp_path / "bad.pth", tmp_path / "a.png", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.pth" in err and match in err and "Traceback" not in err


def test_own_images_named_like_outputs_are_listed_as_skipped(ckpt_path, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(smooth_image(30, 30)).save(tmp_path / "in" / "road_mask.png")
    Image.fromarray(smooth_image(30, 30)).save(tmp_path / "in" / "road.png")
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out") == 0
    out = capsys.readouterr()
    assert "road_mask.png" in out.out + out.err and "rename it" in out.out + out.err
    assert "1 images done, 1 skipped" in out.out


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--no-pipeline"]], ids=["pipelined", "serial"])
def test_skip_existing_continues_an_interrupted_run(ckpt_path, tmp_path, capsys, mode):
    (tmp_path / "in").mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(smooth_image(30, 30)).save(tmp_path / "in" / f"{name}.png")
    assert run(ckpt_path, tmp_path / "in" / "a.png", tmp_path / "out", *mode) == 0  # an earlier run did a.png
    first = (tmp_path / "out" / "a_png_mask.png").stat().st_ino
    capsys.readouterr()
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", "--skip-existing", *mode) == 0
    assert (tmp_path / "out" / "a_png_mask.png").stat().st_ino == first  # kept, not written again
    assert "2 images done, 1 skipped" in capsys.readouterr().out
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out", *mode) == 0  # the default replaces
    assert (tmp_path / "out" / "a_png_mask.png").stat().st_ino != first


def test_nodata_gets_no_class_and_the_tag_is_carried(ckpt_path, tmp_path):
    (tmp_path / "in").mkdir()
    image = smooth_image(40, 36)
    image[:10] = 0
    tifffile.imwrite(tmp_path / "in" / "geo.tif", image, photometric="rgb",
                     extratags=GEOTAGS + [(42113, "s", 0, "0", True)])
    assert run(ckpt_path, tmp_path / "in", tmp_path / "out") == 0
    with tifffile.TiffFile(tmp_path / "out" / "geo_tif_mask.tif") as tif:
        mask = tif.pages.first.asarray()
        assert tif.pages.first.tags[42113].value.strip("\x00") == "255"
    assert (mask[:10] == 255).all() and (mask[10:] < 6).all()
    with Image.open(tmp_path / "out" / "geo_tif_mask.png") as im:
        assert (np.asarray(im.convert("RGB"))[:10] == 0).all()  # black: undefined


def test_single_band_overlay_is_gray_not_false_colour(ckpt_path, tmp_path):
    gray = smooth_image(30, 30)[:, :, 0]
    assert predict.display_rgb(gray[:, :, None]).shape == (30, 30, 3)
    np.testing.assert_array_equal(predict.display_rgb(gray[:, :, None])[:, :, 2], gray)


# --------------------------------------------------------------------------- large TIFFs, streamed by rows

def stream_everything(monkeypatch, chunk_bytes=2000):
    """Stream every TIFF (the threshold of 64 MP lowered to 0) in windows of a few rows; returns the list of
    (start, stop) windows raster decodes."""
    monkeypatch.setattr(infer, "STREAM_PIXELS", 0)
    monkeypatch.setattr(predict, "STREAM_CHUNK_BYTES", chunk_bytes)
    windows = []
    read_rows = raster._tiff_rows

    def spy(tif, page, start, stop):
        windows.append((start, stop))
        return read_rows(tif, page, start, stop)

    monkeypatch.setattr(raster, "_tiff_rows", spy)
    return windows


def outputs(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.5, 0.37, 1.0, 1.5])
@pytest.mark.parametrize("size", [(203, 171), (301, 67)], ids=["wide", "tall"])  # tall: Pillow 13 resizes height first
def test_grid_rows_equal_to_grid_to_the_byte(tmp_path, scale, size):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size + (3,), dtype=np.uint8)  # noise: every rounding difference shows
    tifffile.imwrite(tmp_path / "a.tif", image, photometric="rgb")
    spec = DataSpec(scale=scale)
    whole = to_grid(image, scale)
    grid = predict.StreamedInput(tmp_path / "a.tif", spec, chunk_bytes=7 * size[1] * 3)  # windows of 7 rows
    assert grid.shape == whole.shape and grid.chunk_rows == 7
    rows, y = [], 0
    for step in itertools.cycle([1, 5, 13]):  # rows asked for in uneven bands, as tiles do
        rows.append(grid[y:y + step, 0:whole.shape[1]].copy())
        y += step
        if y >= whole.shape[0]:
            break
    np.testing.assert_array_equal(np.concatenate(rows), whole)
    assert grid.rows_read == size[0] and len(grid.src) <= 7 + 2 * math.ceil(1 / scale) + 2  # a window, no more


@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_streamed_masks_are_the_in_memory_masks(ckpt_path, tmp_path, monkeypatch, scale):
    (tmp_path / "in").mkdir()
    image = smooth_image(300, 400, seed=2)
    image[:30, :70] = 0  # nodata
    tifffile.imwrite(tmp_path / "in" / "geo.tif", image, photometric="rgb", compression="lzw", tile=(32, 48),
                     extratags=GEOTAGS + [(42113, "s", 0, "0", True)])
    _, ckpt = load_model(ckpt_path)
    model = LocalModel().eval()  # a mask of several classes: something to disagree about
    options = infer.InferOptions(scale=scale, index=True, tile=96, overlap=16, progress=False)
    assert infer.segment_folder(tmp_path / "in", tmp_path / "whole", model, ckpt, options, log=print).done == 1
    calls = []
    real = infer.predict_streamed
    monkeypatch.setattr(infer, "predict_streamed", lambda *a, **k: calls.append(1) or real(*a, **k))
    windows = stream_everything(monkeypatch)
    assert infer.segment_folder(tmp_path / "in", tmp_path / "streamed", model, ckpt, options, log=print).done == 1
    assert calls == [1] and len(windows) > 5  # it streamed, in windows of rows
    whole, streamed = outputs(tmp_path / "whole"), outputs(tmp_path / "streamed")
    assert set(whole) == {"geo_tif_mask.png", "geo_tif_mask.index.png", "geo_tif_mask.tif"}
    assert streamed == whole  # byte for byte: PNG masks and the GeoTIFF mask
    mask = mask_of(tmp_path / "streamed" / "geo_tif_mask.png")
    assert (mask[:30, :70] == 255).all() and len(np.unique(mask)) >= 4


def test_streamed_path_never_decodes_the_whole_image(ckpt_path, tmp_path, monkeypatch):
    image = smooth_image(300, 400, seed=4)
    tifffile.imwrite(tmp_path / "a.tif", image, photometric="rgb", compression="lzw", tile=(32, 32))
    windows = stream_everything(monkeypatch)

    def whole(*args, **kwargs):
        raise AssertionError("the whole image was decoded")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", whole)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", whole)
    monkeypatch.setattr(predict, "predict_image", whole)
    assert run(ckpt_path, tmp_path / "a.tif", tmp_path / "out", "--overlay") == 0
    rows = 2000 // (400 * 3)  # STREAM_CHUNK_BYTES // bytes per row, rounded up to whole tile rows (32)
    assert max(b - a for a, b in windows) <= 32 and rows < 32
    starts = sorted({a for a, _ in windows if a > 0})
    assert starts == list(range(32, 300, 32))  # the image read top to bottom, window by window
    assert mask_of(tmp_path / "out" / "a_tif_mask.png").shape == (300, 400)
    assert not (tmp_path / "out" / "a_tif_mask.overlay.jpg").exists()  # no overlay: it would hold the image


@pytest.mark.parametrize("intensity", ["range", "uint8"])
def test_streamed_16_bit_image_under_the_intensity_rule(tmp_path, monkeypatch, intensity):
    """16-bit bands 0, 2, 4 of five, 12-bit data: the `range` rule of a 16-bit model, or the bit-depth rule of
    an 8-bit model, which needs the image's largest value (a first streamed pass finds it)."""
    five = smooth_image(260, 330, seed=5, bands=5).astype(np.uint16) * 16  # values up to 4080: 12-bit
    five[100:140, 50:90] = 4095  # the largest value, in the middle: the first windows alone would miss it
    five[:12] = 7  # nodata rows
    tifffile.imwrite(tmp_path / "a.tif", np.moveaxis(five, -1, 0), photometric="minisblack",
                     planarconfig="separate", compression="zlib", tile=(32, 32), extratags=[(42113, "s", 0, "7", True)])
    rule = Intensity("range", (100.0, 200.0, 300.0), (3000.0, 3500.0, 4000.0)) if intensity == "range" else Intensity()
    model = LocalModel().eval()  # a prediction that varies over the image: something to disagree about
    for scale in (0.5, 1.0):
        spec = DataSpec(scale=scale, bands=(0, 2, 4), intensity=rule)
        inp = load_input(tmp_path / "a.tif", spec)
        expected = predict.predict_image(model, inp.image, scale, tile=64, overlap=16)
        expected[~inp.valid] = 255
        source = predict.StreamedInput(tmp_path / "a.tif", spec, chunk_bytes=5000)
        bands = list(predict.predict_streamed(model, source, tile=64, overlap=16))
        assert [y0 for y0, _, _ in bands] == sorted({y0 for y0, _, _ in bands}) and len(bands) > 1  # in order
        mask = np.concatenate([rows for _, _, rows in bands])
        np.testing.assert_array_equal(mask, expected)
        assert source.masked and (mask[:12] == 255).all() and len(np.unique(mask[12:])) >= 2
        notes = source.notes
        assert sorted(notes) == sorted(inp.notes)  # counts summed over the windows
        assert source.warnings == inp.warnings
    assert any("3960 nodata pixels (4.6 %)" in n for n in notes)  # 12 rows x 330
    if intensity == "uint8":  # an 8-bit model under 16-bit data: a warning, not a note
        assert len(source.warnings) == 1 and "12-bit" in source.warnings[0] and "--bit-depth" in source.warnings[0]


def test_notes_of_windows_are_merged_into_the_image_notes():
    notes = ["single-band (grayscale) image: its band is replicated to 3 bands", "10 nodata pixels (1.0 %): x",
             "single-band (grayscale) image: its band is replicated to 3 bands", "5 nodata pixels (0.5 %): x",
             "3 pixels hold negative int16 values: clipped to 0"]
    assert predict._merge_notes(notes, 1000) == [
        "single-band (grayscale) image: its band is replicated to 3 bands", "15 nodata pixels (1.5 %): x",
        "3 pixels hold negative int16 values: clipped to 0"]


def rows_layouts():
    """TIFF layouts as GIS tools and cameras write them: {name: (array, tifffile.imwrite arguments)}."""
    rng = np.random.default_rng(7)
    a = rng.integers(0, 65535, (101, 83, 4), dtype=np.uint16)
    u8 = (a >> 8).astype(np.uint8)
    return {
        "raw strip": (a[..., :3], dict(photometric="rgb")),
        "raw planar": (np.moveaxis(a, -1, 0), dict(photometric="minisblack", planarconfig="separate")),
        "lzw tiles": (a[..., :3], dict(photometric="rgb", compression="lzw", tile=(32, 16))),
        "zlib planar tiles": (np.moveaxis(a, -1, 0), dict(photometric="minisblack", planarconfig="separate",
                                                          compression="zlib", tile=(16, 16))),
        "predictor strips": (a[..., 0], dict(compression="lzw", predictor=True, rowsperstrip=7)),
        "big-endian strips": (a[..., :3], dict(photometric="rgb", byteorder=">", compression="lzw", rowsperstrip=10)),
        "float tiles": (a[..., :3].astype(np.float32) / 65535, dict(photometric="rgb", compression="zlib",
                                                                    predictor=True, tile=(16, 16))),
        "jpeg tiles": (u8[..., :3], dict(photometric="rgb", compression="jpeg", tile=(32, 32))),
        "rgba bigtiff": (u8, dict(photometric="rgb", extrasamples=["unassalpha"], bigtiff=True, tile=(16, 32))),
        "palette": ((a[..., 0] >> 14).astype(np.uint8), dict(photometric="palette", compression="lzw",
                                                            colormap=rng.integers(0, 65535, (3, 256), np.uint16))),
    }


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(rows_layouts()))
def test_rows_of_a_tiff_are_the_rows_of_the_whole_read(tmp_path, layout):
    data, kwargs = rows_layouts()[layout]
    tifffile.imwrite(tmp_path / "a.tif", data, **kwargs)
    whole = raster.read_raster(tmp_path / "a.tif")
    assert raster.readable_by_rows(tmp_path / "a.tif")[:2] == (101, 83)
    for start, stop in [(0, 1), (0, 101), (5, 40), (31, 33), (100, 101)]:
        part = raster.read_raster(raster.Rows(tmp_path / "a.tif", start, stop))
        np.testing.assert_array_equal(part.array, whole.array[start:stop])
        assert (part.alpha, part.nodata, part.geotags) == (whole.alpha, whole.nodata, whole.geotags)


def test_tiffs_that_are_not_read_by_rows_are_read_whole(ckpt_path, tmp_path, monkeypatch):
    bands = np.moveaxis(smooth_image(40, 50), -1, 0)
    tifffile.imwrite(tmp_path / "pages.tif", bands, photometric="minisblack", metadata=None)  # a page per band
    Image.fromarray(smooth_image(40, 50)).save(tmp_path / "a.png")
    assert raster.readable_by_rows(tmp_path / "pages.tif") is None
    assert raster.readable_by_rows(tmp_path / "a.png") is None
    with pytest.raises(raster.RasterError, match="pages.tif"):
        raster.read_raster(raster.Rows(tmp_path / "pages.tif", 0, 10))
    monkeypatch.setattr(infer, "STREAM_PIXELS", 0)
    assert not infer.streams(tmp_path / "pages.tif") and not infer.streams(tmp_path / "a.png")
    assert run(ckpt_path, tmp_path / "pages.tif", tmp_path / "out") == 0  # read whole, as before
    assert mask_of(tmp_path / "out" / "pages_tif_mask.png").shape == (40, 50)


@pytest.mark.slow
def test_png_rows_write_the_same_file_however_the_rows_come(tmp_path):
    labels = np.random.default_rng(0).integers(0, 6, (70, 90), dtype=np.uint8)
    labels[:10] = 255
    files = []
    for k, cuts in enumerate([[70], [1, 7, 40, 22], [35, 35]]):
        with raster.png_rows(tmp_path / f"{k}.png", 70, 90, PALETTE) as png:
            for a, b in itertools.pairwise([0] + list(itertools.accumulate(cuts))):
                png.write(labels[a:b])
        files.append((tmp_path / f"{k}.png").read_bytes())
    assert files[0] == files[1] == files[2]
    np.testing.assert_array_equal(mask_of(tmp_path / "0.png"), labels)
    with Image.open(tmp_path / "0.png") as im:
        colours = np.asarray(im.convert("RGB"))
    assert tuple(colours[20, 0]) == PALETTE[labels[20, 0]] and (colours[:10] == 0).all()  # 255: black
    with raster.png_rows(tmp_path / "gray.png", 70, 90) as png:
        png.write(labels)
    with Image.open(tmp_path / "gray.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), labels)
    with pytest.raises(ValueError, match="30 rows written"):
        with raster.png_rows(tmp_path / "short.png", 70, 90) as png:
            png.write(labels[:30])
    assert not (tmp_path / "short.png").exists() and not list(tmp_path.glob(".*.tmp"))  # nothing half-written


# --------------------------------------------------------------------------- folders, pipelined

@pytest.mark.slow
def test_pipelined_masks_are_the_serial_masks_byte_for_byte(ckpt_path, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    write_inputs(inp)
    nodata = smooth_image(40, 36, seed=4)
    nodata[:10] = 0
    tifffile.imwrite(inp / "geo_nodata.tif", nodata, photometric="rgb",
                     extratags=GEOTAGS + [(42113, "s", 0, "0", True)])
    tifffile.imwrite(inp / "geo_streamed.tif", smooth_image(70, 66, seed=5), photometric="rgb", extratags=GEOTAGS,
                     rowsperstrip=8)
    monkeypatch.setattr(infer, "STREAM_PIXELS", 4500)  # geo_streamed (4620 pixels) goes the streamed way
    assert infer.streams(inp / "geo_streamed.tif") and not infer.streams(inp / "lzw_tiled.tif")
    assert run(ckpt_path, inp, tmp_path / "pipelined", "--index", "--overlay") == 0
    assert run(ckpt_path, inp, tmp_path / "serial", "--index", "--overlay", "--no-pipeline") == 0
    pipelined = {p.name: p.read_bytes() for p in (tmp_path / "pipelined").iterdir()}
    serial = {p.name: p.read_bytes() for p in (tmp_path / "serial").iterdir()}
    assert len(serial) == 3 * 11 - 1 + 2  # colour, index, overlay each but the streamed one; two mask TIFFs
    assert pipelined.keys() == serial.keys()
    assert [n for n in serial if pipelined[n] != serial[n]] == []


def tiny_folder(folder, n, size=(20, 24)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tifffile.imwrite(folder / f"f{i:02d}.tif", smooth_image(*size, seed=i), photometric="rgb", extratags=GEOTAGS)
    return sorted(folder.iterdir())


def segment(files, out, ckpt_path, model=None, **kwargs):
    _, ckpt = load_model(ckpt_path, "cpu")
    model = model or PixelModel().eval()
    return infer.segment_files(files, infer.output_stems(files), out, model, ckpt,
                               infer.InferOptions(progress=False, **kwargs), log=lambda m: None)


def pipeline_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("infer-")]


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "serial"])
def test_a_file_that_fails_to_write_is_reported_and_the_others_written(ckpt_path, tmp_path, monkeypatch, pipeline):
    files = tiny_folder(tmp_path / "in", 4)
    write_index_tiff = infer.write_index_tiff

    def failing(path, *args, **kwargs):
        if "f01" in Path(path).name:
            raise OSError(f"no space left writing {path}")
        return write_index_tiff(path, *args, **kwargs)

    monkeypatch.setattr(infer, "write_index_tiff", failing)
    summary = segment(files, tmp_path / "out", ckpt_path, pipeline=pipeline)
    assert summary.done == 3 and [p for p, _ in summary.failed] == [files[1]]
    assert "f01_tif_mask.tif" in summary.failed[0][1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        sorted(f"f{i:02d}_tif_mask.{ext}" for i in (0, 2, 3) for ext in ("png", "tif"))  # no temporaries left
    assert pipeline_threads() == []


@pytest.mark.slow
def test_a_slow_writer_holds_the_reader_back(ckpt_path, tmp_path, monkeypatch):
    n = 2 * infer.PIPELINE_DEPTH + 6
    files = tiny_folder(tmp_path / "in", n)
    # files read while the writer holds the first: one in the writer, in the model and in the reader each,
    # PIPELINE_DEPTH in each of the two queues
    bound = 2 * infer.PIPELINE_DEPTH + 3
    read, write = infer._read_file, infer._write_masks
    reads, seen, too_far = [], [], threading.Event()

    def counting_read(path, *args, **kwargs):
        reads.append(path)
        if len(reads) > bound:
            too_far.set()
        return read(path, *args, **kwargs)

    def slow_write(job, *args, **kwargs):
        if not seen:
            too_far.wait(timeout=1)  # the reader has every chance to run ahead: only the queues stop it
        seen.append(len(reads))
        return write(job, *args, **kwargs)

    monkeypatch.setattr(infer, "_read_file", counting_read)
    monkeypatch.setattr(infer, "_write_masks", slow_write)
    summary = segment(files, tmp_path / "out", ckpt_path)
    assert summary.done == n and not summary.failed
    assert len(seen) == n
    assert max(s - k for k, s in enumerate(seen)) <= bound  # when file k is written, at most k + bound were read


def test_an_exception_in_the_model_ends_the_threads(ckpt_path, tmp_path):
    files = tiny_folder(tmp_path / "in", 6)

    class Interrupted(PixelModel):
        def forward(self, x):
            if len(self.shapes) == 2:
                raise KeyboardInterrupt  # Ctrl-C while the third file is predicted
            return super().forward(x)

    with pytest.raises(KeyboardInterrupt):
        segment(files, tmp_path / "out", ckpt_path, model=Interrupted().eval())
    assert pipeline_threads() == []
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / "out" / "f05_tif_mask.png").exists()


@pytest.mark.parametrize("step", ["_read_file", "_write_masks"])
def test_a_bug_in_a_thread_is_raised_not_reported_as_a_bad_file(ckpt_path, tmp_path, monkeypatch, step):
    files = tiny_folder(tmp_path / "in", 6)
    real = getattr(infer, step)

    def buggy(job, *args, **kwargs):
        if "f02" in Path(getattr(job, "path", job)).name:
            raise ZeroDivisionError("a bug")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(infer, step, buggy)
    with pytest.raises(ZeroDivisionError):
        segment(files, tmp_path / "out", ckpt_path)
    assert pipeline_threads() == []


def test_a_share_of_the_files_keeps_the_folder_names_and_protects_every_input(ckpt_path, tmp_path):
    files = tiny_folder(tmp_path / "in", 4)
    stems = infer.output_stems(files)
    _, ckpt = load_model(ckpt_path, "cpu")
    summary = infer.segment_files(files[1::2], stems, tmp_path / "out", PixelModel().eval(), ckpt,
                                  infer.InferOptions(progress=False), protect=files, log=lambda m: None)
    assert summary.done == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*_mask.png")) == ["f01_tif_mask.png", "f03_tif_mask.png"]
