"""spec.py: one preprocessing contract. The same file gives the same model input through training and
through infer.py; the intensity rule follows the training data; classes, value maps and scales."""

import json

import numpy as np
import pytest
import tifffile
import torch
import torch.nn as nn

import predict
from dataset import SegmentationDataset, read_label
from spec import (IGNORE_INDEX, PERCENTILES, ClassSpec, DataSpec, Intensity, default_palette, fit_intensity,
                  grid_size, load_class_file, load_input, to_grid)
from config import TrainConfig
from train import build_datasets


class Recorder(nn.Module):
    """Records what it is fed; predicts class 0 everywhere."""

    def __init__(self, classes=2):
        super().__init__()
        self.classes, self.inputs = classes, []
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return torch.zeros(x.shape[0], self.classes, *x.shape[-2:]) + self.w


def sixteen_bit_scene(tmp_path, h=37, w=61, n=3):
    """Own data: 4-band 16-bit non-square images (12-bit sensor values mostly below 2048, a few bright
    pixels up to 6615, as on the Atlanta tile) and 0/255 masks."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for k in range(n):
        lab = np.zeros((h, w), np.uint8)
        lab[5:20, 10 + k:40] = 255
        img = (rng.normal(600, 150, (h, w, 4)) + (lab[..., None] > 0) * 700).clip(0, 4000).astype(np.uint16)
        img[0, 0] = 6615  # one bright outlier, as real sensors have
        tifffile.imwrite(tmp_path / "images" / f"s{k}.tif", np.moveaxis(img, -1, 0), photometric="minisblack",
                         planarconfig="separate")
        tifffile.imwrite(tmp_path / "labels" / f"s{k}.tif", lab)
    (tmp_path / "classes.json").write_text(json.dumps(
        {"names": ["ground", "building"], "label_format": "index", "value_map": {"0": 0, "255": 1}}))
    return tmp_path


def test_training_and_infer_feed_the_model_the_same_tensor(tmp_path):
    root = sixteen_bit_scene(tmp_path)
    cfg = TrainConfig(data=None, images=str(root / "images"), labels=str(root / "labels"),
                      classes=str(root / "classes.json"), scale=0.75, points=None, augment=False,
                      train_ids=["s0", "s1"], val_ids=["s2"])
    train_ds, _, _, spec = build_datasets(cfg)
    assert spec.channels == 4 and spec.intensity.kind == "range"
    trained_on = train_ds[0]["image"]
    assert trained_on.shape == (4, *grid_size(37, 61, 0.75)) == (4, 28, 46)  # aspect kept, not squashed

    model = Recorder().eval()
    inp = load_input(root / "images" / "s0.tif", spec)
    predict.predict_image(model, inp.image, spec.scale, tile=512)
    assert len(model.inputs) == 1
    torch.testing.assert_close(model.inputs[0][0], trained_on, rtol=0, atol=0)


def test_intensity_follows_the_data_not_the_maximum(tmp_path):
    root = sixteen_bit_scene(tmp_path)
    paths = sorted((root / "images").glob("*.tif"))
    rule = fit_intensity(paths)
    pixels = np.concatenate([tifffile.imread(p).reshape(4, -1).T for p in paths])
    np.testing.assert_allclose(rule.low, np.percentile(pixels, PERCENTILES[0], axis=0), rtol=1e-6)
    np.testing.assert_allclose(rule.high, np.percentile(pixels, PERCENTILES[1], axis=0), rtol=1e-6)
    image = load_input(paths[0], DataSpec(channels=4, intensity=rule)).image
    assert image.max() == 255 and image.min() == 0 and image.std() > 40  # contrast kept
    # the old per-image maximum rule crushes the same pixels into a sliver of the range
    crushed = load_input(paths[0], DataSpec(channels=4)).image
    assert np.percentile(crushed, 99) < 60


def test_8bit_data_keep_todays_behaviour(patches):
    root, _ = patches
    assert fit_intensity(sorted((root / "Images").glob("*.tif"))) == Intensity("uint8")
    arr = tifffile.imread(root / "Images" / "Image_0.tif")
    np.testing.assert_array_equal(load_input(root / "Images" / "Image_0.tif", DataSpec()).image, arr)


def test_nodata_is_left_out_of_the_statistics_and_the_labels(tmp_path):
    img = np.full((20, 30), 100.0, np.float32)
    img[:, 15:] = 200.0
    img[:5] = -99999.0  # nodata rows
    tifffile.imwrite(tmp_path / "f.tif", img, extratags=[(42113, "s", 0, "-99999", True)])
    rule = fit_intensity([tmp_path / "f.tif"])
    assert rule.low == (100.0,) and rule.high == (200.0,)
    inp = load_input(tmp_path / "f.tif", DataSpec(channels=1, intensity=rule))
    assert inp.valid[:5].sum() == 0 and inp.valid[5:].all()
    assert (inp.image[5:, 0] == 0).all() and (inp.image[5:, 29] == 255).all()
    lab = np.ones((20, 30), np.uint8)
    tifffile.imwrite(tmp_path / "l.tif", lab)
    classes = ClassSpec(names=("a", "b"), palette=default_palette(2), label_format="index")
    ds = SegmentationDataset([("f", tmp_path / "f.tif", tmp_path / "l.tif")],
                             DataSpec(classes=classes, channels=1, intensity=rule, scale=1.0), points=None)
    assert (ds.native_label(0)[:5] == IGNORE_INDEX).all() and (ds.native_label(0)[5:] == 1).all()


def test_to_grid_keeps_the_aspect_ratio_and_labels_stay_labels():
    image = np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8)
    assert to_grid(image, 0.5).shape == (20, 40, 3)
    label = np.zeros((40, 80), np.uint8)
    label[:, 40:] = 3
    small = to_grid(label, 0.5, nearest=True)
    assert small.shape == (20, 40) and set(np.unique(small)) == {0, 3}


def test_value_map_and_optional_palette(tmp_path):
    (tmp_path / "c.json").write_text('{"names": ["bg", "roof"], "label_format": "index", '
                                     '"value_map": {"0": 0, "255": 1}}')
    classes = load_class_file(tmp_path / "c.json")
    assert classes.palette == default_palette(2) and (0, 0, 0) not in classes.palette
    assert classes.ignore_value is None
    mask = np.zeros((4, 4), np.uint8)
    mask[2:] = 255
    tifffile.imwrite(tmp_path / "m.tif", mask)
    assert read_label(tmp_path / "m.tif", classes).tolist() == (mask // 255).tolist()
    mask[0, 0] = 7
    tifffile.imwrite(tmp_path / "m.tif", mask)
    with pytest.raises(ValueError, match=r"m\.tif.*\[7\]"):
        read_label(tmp_path / "m.tif", classes)


@pytest.mark.parametrize("bad, match", [({"scale": 0.0}, "scale"), ({"scale": float("nan")}, "scale"),
                                        ({"bands": (0, 1)}, "channels")])
def test_bad_contracts_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        DataSpec(**bad)


def test_spec_round_trips_through_a_dict():
    spec = DataSpec(classes=ClassSpec(names=("a", "b"), palette=((1, 2, 3), (4, 5, 6)), label_format="index",
                                      value_map=((0, 0), (255, 1)), ignore_value=None),
                    bands=(3, 1), channels=2, intensity=Intensity("range", (1.0, 2.0), (10.0, 20.0)), scale=0.3)
    assert DataSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_nan_pixels_are_invalid_under_the_range_rule_too(tmp_path):
    """A float image without a nodata tag: its NaN pixels are no prediction and no target, also when the
    intensity rule is a fitted range (before, only the uint8 rule marked them)."""
    img = np.linspace(0, 3000, 8 * 9 * 3, dtype=np.float32).reshape(8, 9, 3)
    img[2, 3] = np.nan
    img[5, 1, 0] = np.inf
    tifffile.imwrite(tmp_path / "a.tif", img, photometric="rgb")
    spec = DataSpec(intensity=Intensity("range", (0.0,) * 3, (3000.0,) * 3), channels=3)
    inp = load_input(tmp_path / "a.tif", spec)
    assert inp.valid is not None and not inp.valid[2, 3] and not inp.valid[5, 1]
    assert inp.valid.sum() == 8 * 9 - 2
    assert inp.image[2, 3].tolist() == [0, 0, 0]
    assert any("NaN" in n for n in inp.notes)


def test_8bit_training_sets_are_recognised_from_the_headers(tmp_path, monkeypatch):
    """fit_intensity reads no pixel when every header says 8 bits (a 2,100-patch set is fitted in no time), and
    still fits a range as soon as one file is deeper (here a 16-bit PNG among 8-bit files)."""
    from PIL import Image
    import spec as spec_module
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", rgb, photometric="rgb", compression="zlib")
    Image.fromarray(rgb).save(tmp_path / "b.png")
    Image.fromarray(rgb).save(tmp_path / "c.jpg")
    Image.fromarray(rgb).convert("P").save(tmp_path / "d.png")
    eight = [tmp_path / n for n in ("a.tif", "b.png", "c.jpg", "d.png")]
    reads = []
    real = spec_module.read_raster
    monkeypatch.setattr(spec_module, "read_raster", lambda p: reads.append(p) or real(p))
    assert fit_intensity(eight) == Intensity("uint8") and reads == []
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 16)).save(tmp_path / "e.png")  # 16-bit gray PNG
    assert fit_intensity([tmp_path / "e.png"], bands=[0]).kind == "range" and len(reads) == 1
    with pytest.raises(ValueError, match="mix pixel types"):  # one rule cannot fit 8-bit and 16-bit files at once
        fit_intensity(eight[:1] + [tmp_path / "e.png"], bands=[0])


@pytest.mark.parametrize("content, match", [
    ({"names": ["a", "b"], "label_format": "index", "ignore_color": [0, 0, 0]}, r"unknown keys \['ignore_color'\]"),
    ({"names": ["a", "a"], "label_format": "index"}, r"class names \['a'\] appear twice"),
    ({"names": ["a", 3], "label_format": "index"}, "'names' must be a list of class names"),
    ({"names": ["a", "b"], "label_format": "idx"}, "'label_format' must be one of"),
    (["a", "b"], "JSON object, not a list"),
])
def test_a_class_file_names_its_bad_key_or_value(tmp_path, content, match):
    import json
    from spec import load_class_file
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match) as e:
        load_class_file(path)
    assert str(path) in str(e.value) and "palette" not in str(e.value).split("(")[1].split(")")[0]


def test_mixed_bit_depths_in_one_training_set_are_refused(tmp_path):
    import tifffile
    from spec import fit_intensity
    tifffile.imwrite(tmp_path / "a.tif", np.full((8, 8, 3), 200, np.uint8))
    tifffile.imwrite(tmp_path / "b.tif", np.full((8, 8, 3), 6000, np.uint16))
    with pytest.raises(ValueError, match=r"mix pixel types: .*a.tif is uint8, .*b.tif is uint16"):
        fit_intensity([tmp_path / "a.tif", tmp_path / "b.tif"])
    assert fit_intensity([tmp_path / "a.tif"]).kind == "uint8"
