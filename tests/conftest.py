"""Tiny data made in tmp_path (patch folders in the Potsdam layout with known labels, click files, a map to assess)
and every helper more than one test module uses: test modules import them from here (`from tests.conftest import
...`), never from one another (tests/test_suite.py checks)."""

import http.client
import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import TrainConfig  # noqa: E402
from research import experiments as E  # noqa: E402
from spec import CLASSES, IGNORE_INDEX, PALETTE, ClassSpec, default_palette  # noqa: E402


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


# --------------------------------------------------------------------------- the tiny patch folders
# Each written once per session (once per xdist worker) and only ever copied: every test gets its own copy in its
# tmp_path, so that no test sees another's changes, and copying is cheaper than encoding the TIFFs again.

@pytest.fixture(scope="session")
def pristine_patches(tmp_path_factory):
    """`patches`' folder and class maps, never handed to a test itself."""
    root = tmp_path_factory.mktemp("pristine") / "patches"
    return root, write_patches(root)


@pytest.fixture(scope="session")
def pristine_data(tmp_path_factory):
    """`data`'s folder and class maps, never handed to a test itself."""
    root = tmp_path_factory.mktemp("pristine") / "patches"
    return root, write_patches(root, n=8, size=(48, 48))


def fresh_copy(pristine, tmp_path):
    """A copy of a pristine folder at <tmp>/patches, its files new as if just written (shutil.copy: the times are
    the copy's own)."""
    return Path(shutil.copytree(pristine, tmp_path / "patches", copy_function=shutil.copy))


@pytest.fixture
def patches(tmp_path, pristine_patches):
    """Six 48x48 patches in <tmp>/patches (ids 0-5) and their class maps."""
    root, labels = pristine_patches
    return fresh_copy(root, tmp_path), [lab.copy() for lab in labels]


@pytest.fixture
def data(tmp_path, pristine_data):
    """Eight 48x48 patches in <tmp>/patches (ids 0-7): the training tests' data."""
    return fresh_copy(pristine_data[0], tmp_path)


@pytest.fixture
def data_labels(pristine_data):
    """The class maps of `data`'s eight patches."""
    return [lab.copy() for lab in pristine_data[1]]


# --------------------------------------------------------------------------- training

def cfg_for(root, tmp_path, **kw):
    """The training tests' TrainConfig: the tiny network at 32 pixels on `root` (ids 0-5 train, 6 and 7 validate),
    2 epochs of 100 points per image, checkpoints in <tmp>/ck, no figures; `kw` overrides any of it."""
    base = dict(data=str(root), arch="tiny", pretrained=False, epochs=2, batch_size=4, size=32, points=100,
                out=str(tmp_path / "ck"), figures=False, progress=False, train_ids=list(range(6)),
                val_ids=[6, 7])
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- click files (annotations.py)

CLICK_CLASSES = ClassSpec(names=("road", "building", "tree"), palette=default_palette(3), label_format="index")
UTM = "EPSG:32616"
LEFT, TOP, RES = 500000.0, 4000000.0, 0.5


def geotiff(path, left=LEFT, top=TOP, size=(40, 40), nodata=None, data=None):
    """A 3-band uint8 GeoTIFF in UTM 16N with 0.5 m pixels, its top-left corner at (left, top)."""
    import rasterio
    from rasterio.transform import Affine

    H, W = size
    data = np.full((3, H, W), 100, np.uint8) if data is None else data
    with rasterio.open(path, "w", driver="GTiff", height=H, width=W, count=3, dtype="uint8", crs=UTM,
                       transform=Affine(RES, 0, left, 0, -RES, top), nodata=nodata) as ds:
        ds.write(data)
    return path


def nodata_geotiff(folder):
    """`<folder>/a.tif`: a 40x40 GeoTIFF (geotiff) whose top-left 10x10 pixels are nodata (0)."""
    data = np.full((3, 40, 40), 100, np.uint8)
    data[:, 0:10, 0:10] = 0
    Path(folder).mkdir(exist_ok=True)
    return geotiff(Path(folder) / "a.tif", nodata=0, data=data)


def write_layer(path, geoms, values, crs=UTM, field="class", extra=None, layer=None):
    """Write a layer with pyogrio (the driver from the extension); `crs` None: no CRS."""
    import pyogrio
    import pyproj
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    if crs not in (None, UTM):
        t = pyproj.Transformer.from_crs(UTM, crs, always_xy=True)
        geoms = shapely.transform(geoms, lambda c: np.column_stack(t.transform(c[:, 0], c[:, 1])))
    fields, data = [field], [np.asarray(values, dtype=object)]
    for k, v in (extra or {}).items():
        fields.append(k)
        data.append(np.asarray(v, dtype=object))
    kinds = {g.geom_type for g in geoms}
    pyogrio.raw.write(path, shapely.to_wkb(geoms), data, fields, crs=crs, layer=layer,
                      geometry_type=kinds.pop() if len(kinds) == 1 else "Unknown")
    return path


def pngs(tmp_path, names=("tile_a", "tile_b"), size=(30, 40)):
    """Black PNGs <tmp>/png/<name>.png (a plain function; test_annotate has a fixture of this name of its own)."""
    folder = tmp_path / "png"
    folder.mkdir(exist_ok=True)
    for n in names:
        Image.fromarray(np.zeros(size + (3,), np.uint8)).save(folder / f"{n}.png")
    return folder


def pixels(c):
    """{(row, col): class} of an ImageClicks."""
    return {(int(r), int(k)): int(v) for r, k, v in zip(c.rows, c.cols, c.classes)}


# --------------------------------------------------------------------------- experiments.py on fake runs

SETTINGS = dict(E.PRESETS["demo"], data="nowhere/patches", n_train=None, n_val=None)
KEYS = E.Keys(SETTINGS, (None, None), "data-id")  # what Keys.read would make of a folder, without one


def fake_history(miou, oa=0.8, epochs=2):
    iou = {c: miou for c in CLASSES}
    return [{"epoch": e, "val_oa": oa, "val_miou": miou - 0.1 * (epochs - e), "val_mf1": miou + 0.05,
             "val_iou": iou} for e in range(1, epochs + 1)]


class FakeRunner:
    """Records the configs it is asked to train; mIoU 0.5 + 0.1 * seed, no training."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg):
        self.calls.append(cfg)
        return {"history": fake_history(0.5 + 0.1 * cfg.seed), "labelled_fraction": 0.25, "n_train": 7, "n_val": 1}


def fake_row(run, seed, miou, oa=0.8, fraction=0.5, seconds=10.0, keys=KEYS):
    """A row as read_rows returns it."""
    row = {f: "" for f in E.FIELDS}
    row.update(key=keys.run_key(run, seed), config_key=keys.config_key(run), seed=float(seed),
               miou=miou, oa=oa, mf1=miou, labelled_fraction=fraction, seconds=seconds, device="cpu",
               settings=E.json.dumps(keys.settings, sort_keys=True))
    for c in E.CLASSES:
        row[f"iou_{c}"] = miou
    return row


# --------------------------------------------------------------------------- annotate.py's server

def train_command(tmp_path):
    """The page's own train.py command with the tiny network at 32 pixels and a larger step (seconds, not minutes)."""
    import page.training
    return page.training.DEFAULT_TRAIN_COMMAND.replace("--arch resnet18", "--arch tiny --size 32 --lr 0.02")


def tiny_loop_scene(tmp_path, monkeypatch):
    """The loop presets' `synthetic` scene made tiny (a 60x60 scene of make_label's rectangles, 3 x 3 patches of 20:
    columns 0-1 are the training patches, column 2 the val ones) and the page's command the tiny network, for
    research/benchmark.py loop and research/click_response.py; returns the scene's class map."""
    import page.training
    from research import benchmark
    rng = np.random.default_rng(0)
    label = make_label(rng, (60, 60), undefined=0)
    colour = np.asarray(PALETTE, np.uint8)[label]
    tifffile.imwrite(tmp_path / "scene.tif", np.clip(colour * 0.6 + rng.normal(40, 15, colour.shape), 0, 255)
                     .astype(np.uint8))
    tifffile.imwrite(tmp_path / "label.tif", colour)
    monkeypatch.setitem(benchmark.LOOP_PRESETS, "synthetic", dict(
        benchmark.LOOP_PRESETS["synthetic"], scene=str(tmp_path / "scene.tif"), label=str(tmp_path / "label.tif"),
        side=60, patch=20))
    monkeypatch.setattr(page.training, "DEFAULT_TRAIN_COMMAND", train_command(tmp_path))
    return label


def colour_image(h, w, seed=0):
    """Left half green-brown, right half grey, with noise: two classes a tiny model tells apart."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (110, 150, 60)
    img[:, w // 2:] = (150, 150, 150)
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def conditioned_tiny(path, num_classes=6, radius=3.0):
    """A tiny click-conditioned network (untrained, seeded) whose clicks are wired by hand, saved at `path` (scale
    1.0): click plane c feeds channel c of both hidden layers and class c's logit, so a click paints its class around
    itself; with no clicks it is the plain tiny network."""
    import torch
    from checkpoint import save_checkpoint
    from model import build_model
    from spec import DataSpec
    torch.manual_seed(0)
    model = build_model("tiny", num_classes, click_channels=num_classes, click_encoding="disc", click_radius=radius)
    conv1, conv2, out = model.net[0][0], model.net[1][0], model.net[2]
    with torch.no_grad():
        for c in range(num_classes):
            conv1.weight[c, 3 + c, 1, 1] = 5.0
            conv2.weight[c, c, 1, 1] += 5.0
            out.weight[c, c, 0, 0] += 10.0
    save_checkpoint(path, model, DataSpec(scale=1.0))
    return path


class Server:
    """annotate's server on a free port in a thread; `request` answers (status, headers, body)."""

    def __init__(self, images, clicks, runs, **kw):
        import annotate
        args = annotate.get_args_parser().parse_args(
            ["--images", str(images), "--clicks", str(clicks), "--runs", str(runs), "--port", "0"])
        for k, v in kw.items():
            setattr(args, k, v)
        self.server = annotate.make_server(args)
        self.app = self.server.app
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        conn.close()
        return out

    def json(self, method, path, body=None, status=200):
        code, _, data = self.request(method, path, body)
        assert code == status, (code, data)
        return json.loads(data)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- infer.py

def run(ckpt, inp, out, *extra):
    """infer.py's command line on these arguments; its exit code."""
    import infer
    args = infer.get_args_parser().parse_args(
        ["--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out), "--no-progress", *extra])
    return infer.main(args)


def smooth_image(h, w, seed=0, bands=3):
    """Blobs, not white noise: neighbouring pixels agree, as in a photo."""
    coarse = np.random.default_rng(seed).integers(0, 256, (h // 8 + 2, w // 8 + 2, bands), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(coarse[:, :, b]).resize((w, h), Image.BICUBIC))
                     for b in range(bands)], -1)


def ctrl_c_on_second_image(monkeypatch):
    """Make infer.py's prediction raise KeyboardInterrupt on the second image, as Ctrl-C would."""
    import infer
    real, calls = infer._predict_file, []

    def interrupted(model, job, *args, **kwargs):
        calls.append(job.path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, job, *args, **kwargs)
    monkeypatch.setattr(infer, "_predict_file", interrupted)


# --------------------------------------------------------------------------- a map to assess (annotate.py, assess.py)


def write_assessment_scene(root):
    """A map to assess, as tests of annotate.py's Assess mode need it: two 40x40 GeoTIFFs (EPSG:32616, 0.5 m) in
    <root>/images, a building block in each (the truth), infer.py-style masks in <root>/maps of a map that paints
    buildings over a halo around each (palette PNG, `Source` naming the input, 255 nodata in a corner) and
    <root>/classes.json (background, building). Returns (images, masks, classes file, {image name: truth})."""
    import rasterio
    from PIL import PngImagePlugin
    from rasterio.transform import Affine

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
