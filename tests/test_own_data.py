"""Own data end to end: index labels, a class file, 4-band images -> train one epoch -> infer."""

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

import infer
from checkpoint import read_checkpoint
from config import TrainConfig
from train import train


@pytest.mark.slow
def test_index_labels_four_bands_train_and_infer(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for k in range(5):
        lab = np.zeros((40, 40), np.uint8)
        lab[:, rng.integers(10, 30):] = 1
        lab[rng.integers(0, 30):, :8] = 2
        lab[0, :] = 99  # undefined
        img = np.stack([lab * 80, 255 - lab * 80, lab * 40, (lab == 2) * 200], -1).astype(np.uint8)
        img = np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)
        tifffile.imwrite(tmp_path / "images" / f"field_{k}.tif", img, photometric="minisblack", planarconfig="contig")
        Image.fromarray(lab).save(tmp_path / "labels" / f"field_{k}.png")
    palette = [[10, 20, 30], [200, 0, 0], [0, 200, 0]]
    (tmp_path / "classes.json").write_text(json.dumps(
        {"names": ["soil", "crop", "hedge"], "palette": palette, "label_format": "index", "ignore_value": 99}))

    history = train(TrainConfig(data=None, images=str(tmp_path / "images"), labels=str(tmp_path / "labels"),
                                classes=str(tmp_path / "classes.json"), bands=[0, 1, 2, 3], points=50, size=32,
                                epochs=1, batch_size=2, arch="tiny", out=str(tmp_path / "ck"), figures=False,
                                progress=False, exclude=("hedge",)))
    assert set(history[0]["val_iou"]) == {"soil", "crop", "hedge"}
    ck = read_checkpoint(tmp_path / "ck" / "best_model.pth")
    assert ck.model_args["in_channels"] == 4 and ck.spec.bands == (0, 1, 2, 3)
    assert ck.spec.classes.names == ("soil", "crop", "hedge") and ck.spec.scale == 32 / 40

    out = tmp_path / "masks"
    code = infer.main(infer.get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path / "ck" / "best_model.pth"), "--input", str(tmp_path / "images"),
         "--output", str(out), "--no-progress"]))
    assert code == 0
    masks = sorted(out.glob("*_mask.png"))
    assert len(masks) == 5
    with Image.open(masks[0]) as m:
        assert m.size == (40, 40)
        # the mask is coloured with the class file's palette, not Potsdam's
        assert m.getpalette()[:9] == sum(palette, [])
