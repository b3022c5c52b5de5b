"""Tiny data made in tmp_path: patch folders in the Potsdam layout with known labels."""

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spec import IGNORE_INDEX, PALETTE  # noqa: E402


class ToyClicks:
    """What forest.py and class_weights.py read of a SegmentationDataset, held in lists: `images` ((B, h, w)
    tensors in [0, 1]), `labels` (dense (h, w) class maps) and `targets` (the clicks, IGNORE_INDEX elsewhere).
    Subclasses draw them."""

    def __len__(self):
        return len(self.images)

    def image(self, i):
        return self.images[i]

    def point_grid(self, i):
        return self.targets[i]

    click_grid = point_grid

    def dense_label(self, i):
        return self.labels[i]

    def defined(self, i):
        return self.labels[i] != IGNORE_INDEX

    def labelled_fraction(self):
        return float(np.mean([(t != IGNORE_INDEX).mean() for t in self.targets]))


def make_label(rng, size, undefined=0.05):
    """A class map of random rectangles over all six classes, with a few undefined (255) pixels."""
    h, w = size
    lab = np.zeros((h, w), np.uint8)
    for c in range(len(PALETTE)):
        for _ in range(3):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            lab[y:y + rng.integers(4, h // 2), x:x + rng.integers(4, w // 2)] = c
    lab[rng.random((h, w)) < undefined] = 255
    return lab


def write_patches(root, n=6, size=(48, 48), seed=0, undefined=0.05):
    """Write n patches <root>/Images/Image_{i}.tif, <root>/Labels/Label_{i}.tif (LZW). Images are the label
    colours darkened plus noise, so a model can learn them. Returns the class maps."""
    root = Path(root)
    (root / "Images").mkdir(parents=True, exist_ok=True)
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pal = np.vstack([np.asarray(PALETTE, np.uint8), np.zeros((256 - len(PALETTE), 3), np.uint8)])
    labels = []
    for i in range(n):
        lab = make_label(rng, size, undefined)
        colour = pal[lab]
        img = np.clip(colour * 0.6 + rng.normal(40, 15, colour.shape), 0, 255).astype(np.uint8)
        tifffile.imwrite(root / "Images" / f"Image_{i}.tif", img, compression="lzw")
        tifffile.imwrite(root / "Labels" / f"Label_{i}.tif", colour, compression="lzw")
        labels.append(lab)
    return labels


@pytest.fixture
def patches(tmp_path):
    root = tmp_path / "patches"
    labels = write_patches(root)
    return root, labels


@pytest.fixture
def data(tmp_path):
    """Eight 48x48 patches in <tmp>/patches (ids 0-7): the training tests' data."""
    root = tmp_path / "patches"
    write_patches(root, n=8, size=(48, 48))
    return root


def write_assessment_scene(root):
    """A map to assess, as tests of annotate.py's Assess mode need it: two 40x40 GeoTIFFs (EPSG:32616, 0.5 m) in
    <root>/images, a building block in each (the truth), infer.py-style masks in <root>/maps of a map that paints
    buildings over a halo around each (palette PNG, `Source` naming the input, 255 nodata in a corner) and
    <root>/classes.json (background, building). Returns (images, masks, classes file, {image name: truth})."""
    import json

    import rasterio
    from PIL import Image, PngImagePlugin
    from rasterio.transform import Affine

    from spec import ClassSpec, default_palette
    root = Path(root)
    images, masks = root / "images", root / "maps"
    images.mkdir(parents=True)
    masks.mkdir()
    truth = {}
    for k, left in enumerate((500000.0, 500020.0)):
        t = np.zeros((40, 40), np.uint8)
        t[10:20, 10 + 5 * k:22 + 5 * k] = 1
        m = t.copy()
        m[5:28, 5:30] = 1
        m[20:25, 12:14] = 0
        if k == 0:
            m[:4, :4] = IGNORE_INDEX
        with rasterio.open(images / f"tile{k}.tif", "w", driver="GTiff", height=40, width=40, count=3, dtype="uint8",
                           crs="EPSG:32616", transform=Affine(0.5, 0, left, 0, -0.5, 4000000.0)) as ds:
            ds.write(np.stack([np.where(t, 200, 90)] * 3).astype(np.uint8))
        info = PngImagePlugin.PngInfo()
        info.add_text("Source", f"tile{k}.tif")
        Image.fromarray(m).save(masks / f"tile{k}_tif_mask.png", pnginfo=info)
        truth[f"tile{k}"] = t
    classes = ClassSpec(names=("background", "building"), palette=default_palette(2), label_format="index")
    (root / "classes.json").write_text(json.dumps(classes.to_dict()))
    return images, masks, root / "classes.json", truth
