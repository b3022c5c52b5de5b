"""Speed and memory, measured on the current device. Numbers go here, never into tests.

    python -m research.benchmark infer                    # 6000x6000 synthetic GeoTIFF, end to end vs the model alone
    python -m research.benchmark infer --image-size 2000        # smaller, for a slow CPU
    python -m research.benchmark infer --image-size 20000 --e2e-only   # peak RSS of a 20000x20000 tile, streamed
    python -m research.benchmark infer --image-size 20000 --e2e-only --stream-pixels 1e12    # the same tile read whole
    python -m research.benchmark infer --files 16 --image-size 6000    # a folder: pipelined vs serial vs the model
    python -m research.benchmark train              # training images/s: published-style loader, train.py, the model
    python -m research.benchmark train --patches 32 --size 64 --epochs 2 --workers 2    # a couple of minutes on a CPU
    python -m research.benchmark train --device cuda --amp --patches 2400 --epochs 3

`infer` reports megapixels (of the input images) per second for infer.segment_folder on a folder of --files
synthetic tiles (read, resize, tiles, blending, upsampling, argmax, PNG + GeoTIFF written), pipelined (infer.py's
default) and serial (--no-pipeline), each in a fresh process with its peak RSS, whether both wrote the same
bytes, the same for the model alone on tensors already on the device covering the same model-input area without
overlap (the limit), and the ratios. Weights are random: speed does not depend on them.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import tifffile
import torch
from PIL import Image

import annotate
import page.training
import raster
import spec
import infer
import predict
from checkpoint import load_model, save_checkpoint
from config import (Shared, TrainConfig, add_arguments, check_config, check_settings, config_from_args, from_args,
                    parse_names, reuse, setting, whole)
from model import ResNet18Segmentation, build_model, resolve_device
from partial_ce_loss import PartialCrossEntropyLoss

# --------------------------------------------------------------------------- helpers


def peak_rss_mb():
    """Peak resident set size of this process so far, in MB: VmHWM on Linux (ru_maxrss would also count the
    parent's memory a spawned child was forked from), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_image(size, seed=0):
    """(size, size, 3) uint8 with structure at several scales (not white noise, which no camera produces). The
    noise is added in row chunks: a 20000x20000 image needs its 1.2 GB, no int16 copies of it."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 64 + 2, size // 64 + 2, 3), dtype=np.uint8)
    img = np.array(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
    for r in range(0, size, 1024):
        noise = rng.integers(-20, 21, (min(1024, size - r), size, 1), dtype=np.int16)
        img[r:r + 1024] = np.clip(img[r:r + 1024].astype(np.int16) + noise, 0, 255)
    return img


# --------------------------------------------------------------------------- infer

def device_name(device):
    """The accelerator's or the CPU's name, for the output."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def _end_to_end(opts, ckpt_path, inp, out, pipeline, queue):
    """Child process: load the checkpoint, segment the folder, report (seconds, RSS before, peak RSS)."""
    infer.STREAM_PIXELS = opts["stream_pixels"]
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    device = resolve_device(opts["device"])
    model, ckpt = load_model(ckpt_path, device)
    rss_before = peak_rss_mb()
    sync(device)
    t0 = time.perf_counter()
    summary = infer.segment_folder(inp, out, model, ckpt, infer.InferOptions(
        tile=opts["tile"], overlap=opts["overlap"], batch_size=opts["batch_size"], tta=opts["tta"], device=device,
        progress=opts["progress"], pipeline=pipeline))
    sync(device)
    seconds = time.perf_counter() - t0
    if summary.done != opts["files"] or summary.failed:
        raise RuntimeError(f"the end-to-end run failed: {summary.failed}")
    queue.put((seconds, rss_before, peak_rss_mb()))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def bench_infer(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt_path, inp = tmp / "model.pth", tmp / "in"
        inp.mkdir()
        save_checkpoint(ckpt_path, ResNet18Segmentation(decoder=args.decoder), spec.DataSpec(scale=args.scale))
        geo = [(33550, "d", 3, (0.05, 0.05, 0.0), True), (33922, "d", 6, (0, 0, 0, 368000.0, 5808000.0, 0), True),
               (34735, "H", 8, (1, 1, 0, 1, 3072, 0, 1, 25833), True)]
        layout = {"strip": {}, "tiled-lzw": {"compression": "lzw", "tile": (256, 256)}}[args.layout]
        for i in range(args.files):  # different pixels per file: no cache makes a later file cheaper
            name = "tile.tif" if args.files == 1 else f"tile_{i:03d}.tif"
            tifffile.imwrite(inp / name, synthetic_image(args.image_size, seed=i), photometric="rgb", extratags=geo,
                             **layout)
        H = W = args.image_size
        streamed = H * W > args.stream_pixels
        h, w = spec.grid_size(H, W, args.scale)
        ys, th = predict.tile_starts(h, args.tile, args.overlap)
        xs, tw = predict.tile_starts(w, args.tile, args.overlap)
        print(f"device {device}: {device_name(device)} ({torch.get_num_threads()} torch CPU threads), {args.decoder} "
              f"decoder, {args.files} x {W}x{H} input ({args.layout} TIFF, "
              f"{'streamed by rows' if streamed else 'read whole'}), scale {args.scale:g} -> model input {w}x{h} = "
              f"{w * h / 1e6:.2f} MP per file, {len(ys) * len(xs)} tiles of {tw}x{th} (overlap >= {args.overlap}), "
              f"batch {args.batch_size}, TTA {args.tta}")

        # end to end in a fresh process per mode, so its peak RSS is inference's alone (imports and model included)
        ctx = multiprocessing.get_context("spawn")
        mp = args.files * H * W / 1e6
        e2e = {}
        for mode in args.modes:
            queue = ctx.Queue()
            child = ctx.Process(target=_end_to_end, args=(vars(args) | {"func": None}, ckpt_path, inp,
                                                          tmp / f"out_{mode}", mode == "pipelined", queue))
            child.start()
            e2e[mode], rss_before, rss = queue.get()
            child.join()
            print(f"{mode + ' end to end':22s}: {e2e[mode]:7.2f} s  {mp / e2e[mode]:8.3f} MP/s  (input megapixels); "
                  f"peak RSS {rss:.0f} MB ({rss_before:.0f} MB after imports and loading the model; goal < 2048)")
        if len(e2e) == 2:
            same = _digest(tmp / "out_pipelined") == _digest(tmp / "out_serial")
            print(f"pipelined vs serial   : {e2e['serial'] / e2e['pipelined']:.2f}x the speed; masks byte-identical: "
                  f"{'yes' if same else 'NO'}")
        if args.e2e_only:
            return

        # the model alone: tensors already on the device, timed per pixel and scaled to the model-input area
        model, _ = load_model(ckpt_path, device)
        bs = min(args.batch_size, len(ys) * len(xs))  # the batches infer.py runs
        x = torch.rand(bs, 3, th, tw, device=device)
        n_batches = max(1, math.ceil(args.files * h * w / (bs * th * tw)))
        passes = len(predict.TTA_MODES[predict._tta_mode(args.tta)])
        with torch.inference_mode():
            model(x)  # warm-up (cuDNN autotuning, allocator)
            sync(device)
            t0 = time.perf_counter()
            runs = max(3, n_batches * passes)  # a few at least: one short run is noise
            for _ in range(runs):
                model(x)
            sync(device)
        alone = (time.perf_counter() - t0) / runs * n_batches * passes * args.files * h * w / (n_batches * bs * th * tw)
    print(f"{'model alone':22s}: {alone:7.2f} s  {mp / alone:8.3f} MP/s  (timed on {runs} batches of "
          f"{bs}x3x{th}x{tw})")
    for mode, seconds in e2e.items():
        print(f"{'ratio, ' + mode:22s}: {alone / seconds:.2f}   (end to end / model alone; goal >= 0.7 on CPU)")


# --------------------------------------------------------------------------- train

class PublishedStyleDataset(torch.utils.data.Dataset):
    """The per-item pipeline of the published code and most point-supervision repos: every __getitem__ reads
    both files, resizes them and draws points again; a DataLoader with workers batches the items."""

    def __init__(self, pairs, size, points):
        self.pairs, self.size, self.points = pairs, size, points

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        from dataset import colour_to_index, points_to_grid, sample_points
        _, image_path, label_path = self.pairs[i]
        image = raster.resize(tifffile.imread(image_path), (self.size, self.size))
        native = colour_to_index(tifffile.imread(label_path))
        flat = sample_points(native, self.points, rng=np.random.default_rng())
        label = np.asarray(Image.fromarray(native).resize((self.size, self.size), Image.NEAREST))
        return (torch.from_numpy(image.transpose(2, 0, 1).copy()).float().div_(255),
                torch.from_numpy(points_to_grid(native, flat, (self.size, self.size)).astype(np.int64)),
                torch.from_numpy(label.astype(np.int64)))


def _train_setup(args, device, num_classes=len(spec.CLASSES)):
    """The model, loss and optimizer train.py builds (random init), on `device`."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes, 3, args.decoder, pretrained=False).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    criterion = PartialCrossEntropyLoss(2.0, torch.ones(num_classes)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True if device.type == "cuda" else None)
    return model, criterion, opt


def _step(model, criterion, opt, x, y, use_amp, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        logits = model(x)
    loss = criterion(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _published_style(args, pairs_tr, pairs_va, device, use_amp):
    """(a): images/s of train + val epochs fed by PublishedStyleDataset through a DataLoader with workers."""
    from metrics import ConfusionMatrix
    model, criterion, opt = _train_setup(args, device)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    tr = torch.utils.data.DataLoader(PublishedStyleDataset(pairs_tr, args.size, args.points), shuffle=True,
                                     drop_last=len(pairs_tr) > args.batch_size, **kw)
    va = torch.utils.data.DataLoader(PublishedStyleDataset(pairs_va, args.size, args.points), **kw)
    sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(args.epochs):
        model.train()
        for x, y, _ in tr:
            _step(model, criterion, opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True), use_amp,
                  device)
            n += x.shape[0]
        model.eval()
        cm = ConfusionMatrix(len(spec.CLASSES))
        with torch.no_grad():
            for x, y, label in va:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(x.to(device, non_blocking=True))
                criterion(logits, y.to(device, non_blocking=True))
                cm.update(logits.argmax(1).cpu(), label)
                n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def _project_loop(args, root, n_train, device):
    """(b): train.train() on the patch folder. Returns (images/s over its epochs, setup + saving seconds,
    wall seconds, the line saying which data path it took)."""
    import contextlib
    import io

    from train import train
    cfg = config_from_args(args, data=str(root), train_ids=list(range(n_train)),
                           val_ids=list(range(n_train, args.patches)), device=str(device), out=str(run_folder(root)),
                           figures=False, progress=False, overwrite=True)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        history = train(cfg)
    wall = time.perf_counter() - t0
    epochs = sum(h["seconds"] for h in history)
    n_val = args.patches - n_train
    n = args.epochs * ((n_train // args.batch_size * args.batch_size if n_train > args.batch_size else n_train)
                       + n_val)
    path = next((line for line in log.getvalue().splitlines() if line.startswith("data path")), "?")
    return n / epochs, wall - epochs, wall, path


def run_folder(root):
    """The project run's folder (b) beside the patch folder `root`; its resident caches are read by (c)."""
    return root.parent / "run"


def _model_alone(args, root, n_train, device, use_amp):
    """(c): the same train steps and val forwards on float tensors already on the device (the resident cache
    the project run built), nothing else: the limit of (b)."""
    model, criterion, opt = _train_setup(args, device)
    caches = [sorted((run_folder(root) / ".resident-cache").glob(f"resident-{part}-*.pt")) for part in ("train", "val")]
    if all(caches):
        tr, va = (torch.load(found[0], weights_only=True) for found in caches)
        x_tr, y_tr = tr["images"].to(device).float().div_(255), tr["points"].to(device).long()
        x_va, y_va = va["images"].to(device).float().div_(255), va["points"].to(device).long()
    else:  # (b) took the DataLoader path, no cache: random tensors of the same shapes (speed is alike)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.patches, 3, args.size, args.size, generator=g)
        y = torch.randint(0, len(spec.CLASSES), (args.patches, args.size, args.size), generator=g)
        x_tr, y_tr, x_va, y_va = (t.to(device) for t in (x[:n_train], y[:n_train], x[n_train:], y[n_train:]))
    if device.type == "cuda":
        x_tr, x_va = (t.contiguous(memory_format=torch.channels_last) for t in (x_tr, x_va))
    bs = args.batch_size
    train_batches = max(1, len(x_tr) // bs)
    _step(model, criterion, opt, x_tr[:bs], y_tr[:bs], use_amp, device)  # warm-up (cuDNN, allocator)
    sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(args.epochs):
        model.train()
        for b in range(train_batches):
            _step(model, criterion, opt, x_tr[b * bs:(b + 1) * bs], y_tr[b * bs:(b + 1) * bs], use_amp, device)
            n += len(x_tr[b * bs:(b + 1) * bs])
        model.eval()
        with torch.no_grad():
            for b in range(0, len(x_va), bs):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(x_va[b:b + bs])
                criterion(logits, y_va[b:b + bs])
                n += len(x_va[b:b + bs])
    sync(device)
    return n / (time.perf_counter() - t0)


def bench_train(args):
    from tools.demo_data import make_demo_data
    from dataset import patch_pairs
    if config_from_args(args).steps is not None or config_from_args(args).crop:
        raise ValueError("benchmark.py train counts images of whole-image epochs; leave out --steps and --crop")
    check_config(config_from_args(args))
    args.points = config_from_args(args).points  # parsed ('dense', '1%', ...) as train.py parses it
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_amp = args.amp and device.type == "cuda"
    n_train = args.patches - max(1, round(args.patches * args.val_fraction))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    print(f"device {device} ({name}); {n_train} train + {args.patches - n_train} val synthetic 300x300 patches at "
          f"{args.size}x{args.size}, {args.points} points, batch {args.batch_size}, {args.decoder} decoder, "
          f"{args.epochs} epochs, AMP {'bf16' if use_amp else 'off'}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = make_demo_data(Path(tmp) / "data", patches=args.patches, scenes=0)["out"] / "patches"
        print(f"data written in {time.perf_counter() - t0:.1f} s")
        pairs = patch_pairs(root, range(args.patches))
        a = _published_style(args, pairs[:n_train], pairs[n_train:], device, use_amp)
        print(f"(a) published-style per-item DataLoader ({args.workers} workers): {a:8.1f} images/s")
        b, setup, wall, path = _project_loop(args, root, n_train, device)
        print(f"(b) train.train() end to end, val every epoch  : {b:8.1f} images/s over its epochs; "
              f"+{setup:.1f} s set-up and checkpoints ({wall:.1f} s in all)\n    {path}")
        c = _model_alone(args, root, n_train, device, use_amp)
        print(f"(c) the model alone on resident tensors        : {c:8.1f} images/s")
    per_epoch = 2100 + 300
    print(f"b/c {b / c:.2f} (goal >= 0.9), b/a {b / a:.2f}")
    print("100 epochs x 2,100 train + 300 val patches: " + ", ".join(
        f"{k} {100 * per_epoch / v / 60:.0f} min" for k, v in (("(a)", a), ("(b)", b), ("(c)", c))) +
        f" (b: + about {setup * per_epoch / args.patches / 60:.1f} min set-up, scaled from this run)")


# --------------------------------------------------------------------------- loop: the annotation page, timed

LOOP_PRESETS = {
    # REAL: the SpaceNet Atlanta tile as the repository holds it (make realdata): 36 patches of 150x150 of one
    # 900x900 tile, georeferenced; the split's 24 training patches are clicked, its 12 val patches score
    "atlanta": dict(images="realdata/atlanta/images", labels="realdata/atlanta/labels",
                    classes="realdata/atlanta/classes.json", split="realdata/atlanta/split.json", synthetic=False),
    # SYNTHETIC: the top-left 900x900 of demo_data/scenes/scene_0.tif (make demo-data), cut into the same 6 x 6
    # patches of 150x150 (PNG, no georeferencing); columns 0-3 are clicked, columns 4-5 score, as Atlanta's split
    "synthetic": dict(scene="demo_data/scenes/scene_0.tif", label="demo_data/scenes/labels/scene_0_label.tif",
                      side=900, patch=150, classes=None, synthetic=True),
}
LOOP_POLL = 0.1  # seconds between status requests of the timed client (the page asks every 0.7 s)


def loop_data(preset, folder):
    """The preset's images in `folder` (copies: the page serves no link out of its folder): (images folder,
    {name: dense class map}, training names, val names, ClassSpec, classes file or None)."""
    from dataset import read_label
    folder.mkdir(parents=True)
    if not preset["synthetic"]:
        images, labels = Path(preset["images"]), Path(preset["labels"])
        if not images.is_dir():
            raise ValueError(f"no folder {images}: make realdata builds it")
        classes = spec.load_class_file(preset["classes"])
        split = json.loads(Path(preset["split"]).read_text())
        maps = {}
        for name in split["train"] + split["val"]:
            image = next(images.glob(f"{name}.*"))
            shutil.copyfile(image, folder / image.name)
            maps[name] = read_label(next(labels.glob(f"{name}.*")), classes)
        return folder, maps, split["train"], split["val"], classes, Path(preset["classes"]).resolve()
    scene, label, side, patch = Path(preset["scene"]), Path(preset["label"]), preset["side"], preset["patch"]
    if not scene.is_file():
        raise ValueError(f"no {scene}: make demo-data builds it")
    image, truth = tifffile.imread(scene)[:side, :side], read_label(label, spec.POTSDAM)[:side, :side]
    maps, train, val = {}, [], []
    for r in range(side // patch):
        for c in range(side // patch):
            name, window = f"r{r}_c{c}", np.s_[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            Image.fromarray(image[window]).save(folder / f"{name}.png")
            maps[name] = truth[window]
            (train if c < (side // patch) * 2 // 3 else val).append(name)
    return folder, maps, train, val, spec.POTSDAM, None


def wrong_clicks(client, maps, names, clicked, k, rng, palette):
    """k clicks where the overlay is wrong (the dense label says so), at most one per training image in a random
    order of the images, then again round them; where too few are wrong, anywhere unclicked. [(name, row, col)]."""
    from research.annotate_loop import pick
    wrong = {}
    for name in names:
        free = (maps[name] != spec.IGNORE_INDEX) & ~clicked[name]
        shown = client.prediction(name, maps[name].shape, palette)
        wrong[name] = (free & (shown != maps[name]), free)
    chosen = []
    for use in (0, 1):  # the mistakes first, then anywhere
        while len(chosen) < k:
            before = len(chosen)
            for name in rng.permutation(names):
                mask = wrong[name][use].copy()
                for n, r, c in chosen:
                    mask[r, c] &= n != name
                rows, cols = pick(mask, 1, rng)
                if len(rows) and len(chosen) < k:
                    chosen.append((str(name), int(rows[0]), int(cols[0])))
            if len(chosen) == before:
                break
    return chosen


def timed_train(client, restart, image):
    """Press Train (or Retrain from scratch) right after the last click was answered and wait until the updated
    overlay of `image` (the one clicked last) has come back, as the page asks for it: (seconds, status)."""
    t0 = time.perf_counter()
    client.call("POST", "/api/train", {"restart": restart})
    while True:
        st = client.call("GET", "/api/train")
        if st["state"] in ("done", "failed"):
            break
        time.sleep(LOOP_POLL)
    if st["state"] == "failed":
        raise RuntimeError(f"training failed: {st['message']}: {st['log'][-3:]}")
    client.call("GET", f"/api/overlay?image={image}&z=0&x=0&y=0&size=256&layer=classes&model={st['model']}")
    return time.perf_counter() - t0, st


def wait_warm(client, since, timeout=120):
    """Wait until the page's next train.py, started ahead once a round is shown (page.training.WarmTrainer), has done
    its imports, as a person looking at the map before the next clicks would: the seconds since `since`."""
    while not client.call("GET", "/api/train")["warm_ready"]:
        if time.perf_counter() - since > timeout:
            raise RuntimeError(f"the page's next train.py was not ready {timeout} s after the round")
        time.sleep(LOOP_POLL)
    return time.perf_counter() - since


def held_out_clicks(click_file, images, classes):
    """(pixels that trained, pixels held out) of the page's next run: train.py's split of the click file
    (annotations.split_clicks: train.VAL_CLICKS, seed 0, the page's command sets neither)."""
    from annotations import read_clicks, split_clicks
    from train import VAL_CLICKS
    trained, held = split_clicks(read_clicks(click_file, images, classes), VAL_CLICKS, seed=0)
    as_set = lambda s: {(n, int(r), int(c)) for n, ic in s.images.items() for r, c in zip(ic.rows, ic.cols)}  # noqa
    return as_set(trained), as_set(held)


def bench_loop(args):
    from research.annotate_loop import Client, majority_miou, pick, score
    preset = LOOP_PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the train command's process: as many threads
    rng = np.random.default_rng(args.annotation_seed)
    command = page.training.DEFAULT_TRAIN_COMMAND
    load = [os.getloadavg()[0]]
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, maps, train, val, classes, classes_path = loop_data(preset, tmp / "images")
        palette = [tuple(c) for c in classes.palette]
        background = majority_miou(*([(n, None, None) for n in part] for part in (train, val)), maps,
                                   list(classes.names))
        click_file = tmp / ("clicks.csv" if preset["synthetic"] else "clicks.geojson")
        client = Client(images, click_file, tmp / "runs", classes_path, command, args.epochs, args.adapt_steps)
        print(f"loop: {args.preset}, {len(train)} training + {len(val)} val images; {device_name(torch.device('cpu'))}"
              f", load average {load[0]:.1f}; command {command}", flush=True)
        try:
            clicked = {n: np.zeros(maps[n].shape, bool) for n in train}
            last = None
            for name in train:  # the first clicks: anywhere labelled
                r, c = pick(maps[name] != spec.IGNORE_INDEX, args.start_clicks, rng)
                client.add(name, r, c, maps[name][r, c])
                clicked[name][r, c] = True
                last = name
            chain = set()  # the clicks the models since the last training anew trained on
            done = None
            for k in range(args.loop_rounds + 2):  # anew, adapted x rounds, anew again on the last clicks
                restart = k in (0, args.loop_rounds + 1)
                ready = None if done is None else wait_warm(client, done)
                if 0 < k <= args.loop_rounds:
                    for name, r, c in wrong_clicks(client, maps, train, clicked, args.round_clicks, rng, palette):
                        client.add(name, np.array([r]), np.array([c]), maps[name][[r], [c]])
                        clicked[name][r, c] = True
                        last = name
                trained, held = held_out_clicks(click_file, images, classes)
                chain = set() if restart else chain
                seen = len(held & chain)
                seconds, st = timed_train(client, restart, last)
                done = time.perf_counter()
                if st["metrics"].get("val_clicks") != len(held):
                    raise RuntimeError(f"round {k}: train.py held out {st['metrics'].get('val_clicks')} clicks, the "
                                       f"split here {len(held)}: the count of clicks trained on before would be wrong")
                chain |= trained
                row = dict(round=k, how=st["how"], clicks=int(sum(m.sum() for m in clicked.values())),
                           latency=seconds, train=st["seconds"]["train"], predict=st["seconds"]["predict"],
                           warm=st["warm"], ready=ready,
                           steps=st["steps"], oa=st["metrics"].get("val_oa"), oa_ci=st["metrics"].get("val_oa_ci"),
                           held=st["metrics"].get("val_clicks"), seen=seen,
                           changed=sum((st["changed"] or {}).get("pixels", {}).values()) if k else None,
                           miou=score(client, [(n, None, None) for n in val], maps, list(classes.names), palette))
                rows.append(row)
                load.append(os.getloadavg()[0])
                print(f"  round {k} ({row['how']}): {row['clicks']} clicks, {seconds:.1f} s from the last click to the "
                      f"overlay (train {row['train']:.1f} s, predict {row['predict']:.1f} s, {row['steps']} steps); "
                      f"held-out-click accuracy {fmt(row['oa'])} on {row['held']} ({seen} trained on before); "
                      f"val mIoU {row['miou']:.3f}; changed {row['changed']}", flush=True)
        finally:
            client.close()
    out = Path(args.out or f"results/annotate_latency_{args.preset}.md")
    write_latency(out, args, preset, rows, command, load, time.perf_counter() - t_start, len(train), len(val),
                  background)
    print(f"wrote {out}")


def fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def command_line(program, settings_class, args):
    """The command line that measured: `program` and every setting of `settings_class` that is set, spelled out."""
    parts = [program]
    for f in dataclasses.fields(settings_class):
        v = getattr(args, f.name)
        if v is not None:
            parts.append(f"--{f.name.replace('_', '-')} {shlex.quote(str(v))}")
    return " ".join(parts)


def preset_kind(preset):
    """What a loop preset's data is, as its reports' titles say it."""
    return "SYNTHETIC demo scene" if preset["synthetic"] else "REAL data: SpaceNet Atlanta, 0.5 m"


def write_latency(path, args, preset, rows, command, load, seconds, n_train, n_val, background):
    kind = preset_kind(preset)
    adapted = [r for r in rows if r["how"] == "adapt"]
    anew = [r for r in rows if r["how"] == "anew"]
    lat = np.array([r["latency"] for r in adapted])
    final, last = rows[-1], adapted[-1] if adapted else None
    ci = lambda r: "" if not r["oa_ci"] or None in r["oa_ci"] else f" [{r['oa_ci'][0]:.2f}, {r['oa_ci'][1]:.2f}]"  # noqa
    measured = command_line("python -m research.benchmark loop", LoopBench, args)
    lines = [f"# The annotation page's loop, timed: preset `{args.preset}` ({kind})", "",
             f"Written by `{measured}` in {seconds / 60:.0f} min on {device_name(torch.device('cpu'))}, "
             f"shared with other jobs (load average {min(load):.1f} to {max(load):.1f} during the run), "
             f"{args.threads} torch threads in the page and in its train command. Timings, not a test: they move with "
             f"the machine's load.", "",
             f"The page (annotate.py's server, its default train command `{command}`) serves {n_train + n_val} patches; "
             f"a simulated person clicks {args.start_clicks} random pixels on each of the {n_train} training patches, "
             f"presses Train (a first model, trained anew for {args.epochs} epochs), then, {args.loop_rounds} times, clicks "
             f"{args.round_clicks} pixels where the overlay is wrong (the dense labels say so; at most one per patch "
             f"and round) and presses Train, which adapts the model shown ({args.adapt_steps} optimizer steps); last, "
             f"Retrain from scratch on the final clicks. **Latency**: from the answer to the last click to the updated "
             f"overlay of the patch clicked last (POST /api/train, train.py in its own process, the prediction of "
             f"every patch, GET /api/overlay); the page asks for the status every 0.7 s, this client every "
             f"{LOOP_POLL} s, so on the page add up to 0.7 s. From the second round on, train.py was started ahead "
             f"once the round before was shown (page.training.WarmTrainer: its imports done while the person looks "
             f"and clicks); the person here waits until it is ready before clicking ('ready after': seconds from "
             f"the overlay to a ready train.py, this client's scoring of the val patches running meanwhile).", "",
             "| training | rounds | latency median (s) | range (s) |", "|---|---:|---:|---:|"]
    if len(lat):
        lines.append(f"| Train: adapted ({args.adapt_steps} steps) | {len(lat)} | {np.median(lat):.1f} | "
                     f"{lat.min():.1f} - {lat.max():.1f} |")
    for r, what in ((anew[0], f"first model, trained anew ({args.epochs} epochs)"),
                    (final, f"Retrain from scratch on the final clicks ({args.epochs} epochs)")):
        lines.append(f"| {what} | 1 | {r['latency']:.1f} | - |")
    lines += ["", "| round | training | clicks | latency (s) | train.py started ahead (ready after, s) | "
                  "train.py (s) | prediction (s) | optimizer steps | "
                  "held-out-click accuracy [95 % CI] | held-out clicks (of them trained on by an earlier model) | "
                  "pixels changed | val mIoU (dense labels) |",
              "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ahead = f"yes ({r['ready']:.1f})" if r["warm"] else "no"
        lines.append(f"| {r['round']} | {r['how']} | {r['clicks']} | {r['latency']:.1f} | {ahead} | {r['train']:.1f} | "
                     f"{r['predict']:.1f} | {r['steps']} | {fmt(r['oa'])}{ci(r)} | {r['held']} ({r['seen']}) | "
                     f"{'-' if r['changed'] is None else r['changed']} | {r['miou']:.3f} |")
    from train import VAL_CLICKS
    lines += ["", f"Held-out-click accuracy: train.py's own score on the {VAL_CLICKS:.0%} of the clicks it holds out (blocked "
                  f"by image), the kind of pixels people click, not the map. The split is drawn again at every run "
                  f"from the clicks as they are, so an adapted model may be scored on clicks an earlier model of its "
                  f"chain trained on (the count in brackets): there the score flatters. Val mIoU: the prediction read "
                  f"back through the overlay on the {n_val} val patches, never clicked, against their dense labels; "
                  f"**all-background** (the training patches' commonest class everywhere) scores {background:.3f} "
                  f"there."]
    if last is not None:
        lines += ["", f"Same clicks ({final['clicks']}), adapted (round {last['round']}) vs Retrain from scratch: "
                      f"latency {last['latency']:.1f} s vs {final['latency']:.1f} s, held-out-click accuracy "
                      f"{fmt(last['oa'])} vs {fmt(final['oa'])}, val mIoU {last['miou']:.3f} vs {final['miou']:.3f}."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- CLI

@dataclass
class InferBench:
    """`benchmark.py infer`: a flag infer.py or train.py takes too is that declaration (config.reuse)."""
    image_size: int = setting(6000, "side of the synthetic square tile in input pixels", "bench", check=whole(64),
                              must="be >= 64 pixels")
    scale: Optional[float] = reuse(TrainConfig, "scale", spec.PROCESSING_SIZE / spec.NATIVE_SIZE)
    decoder: str = reuse(TrainConfig, "decoder", "plain")
    tile: int = reuse(infer.InferOptions, "tile")
    overlap: int = reuse(infer.InferOptions, "overlap")
    batch_size: int = reuse(infer.InferOptions, "batch_size")
    tta: str = reuse(infer.InferOptions, "tta")
    files: int = setting(1, "synthetic tiles in the folder, each --image-size square; several show the pipeline's "
                            "overlap of reading, the model and writing", "bench", check=whole(1), must="be >= 1")
    modes: tuple[str, ...] = setting(("pipelined", "serial"), "end-to-end runs: infer.py's default pipeline and/or "
                                                              "--no-pipeline", "bench", parse=parse_names,
                                     check=lambda v: bool(v) and set(v) <= {"pipelined", "serial"},
                                     must="be pipelined and/or serial")
    threads: Optional[int] = reuse(Shared, "threads")
    device: str = reuse(TrainConfig, "device")
    layout: str = setting("strip", "the synthetic GeoTIFF: uncompressed in one strip, or LZW in 256x256 tiles as GIS "
                                   "tools write large rasters", "bench", choices=("strip", "tiled-lzw"))
    stream_pixels: float = setting(infer.STREAM_PIXELS, "infer.STREAM_PIXELS for the run: TIFFs above it are "
                                                        "streamed by rows; 1e12 reads the tile whole", "bench",
                                   check=lambda v: v > 0, must="be > 0")
    e2e_only: bool = setting(False, "only the end-to-end run (time, peak RSS); skip timing the model alone", "bench")
    progress: bool = reuse(TrainConfig, "progress")


@dataclass
class TrainBench:
    """`benchmark.py train`: its own settings; every train.py setting comes with them (TrainConfig)."""
    patches: int = setting(96, "synthetic 300x300 patches, train + val", "bench", check=whole(4), must="be >= 4")
    threads: Optional[int] = reuse(Shared, "threads")


@dataclass
class LoopBench:
    """`benchmark.py loop`: the annotation page's loop, timed (results/annotate_latency_<preset>.md); the page's own
    settings (--epochs, --adapt-steps) are annotate.py's declarations."""
    preset: str = setting("atlanta", "the data: atlanta (REAL: realdata/atlanta's 36 patches of one 900x900 tile) or "
                                     "synthetic (demo_data/scenes/scene_0.tif's top-left 900x900, cut alike)", "bench",
                          choices=tuple(LOOP_PRESETS))
    loop_rounds: int = setting(10, "rounds of clicks and Train (adapting) after the first model", "bench", check=whole(1),
                          must="be >= 1")
    start_clicks: int = setting(2, "random clicks on each training patch before the first Train", "bench",
                                check=whole(1), must="be >= 1")
    round_clicks: int = setting(6, "clicks per round where the overlay is wrong (at most one per patch)", "bench",
                                check=whole(1), must="be >= 1")
    epochs: int = reuse(annotate.AnnotateSettings, "epochs")
    adapt_steps: int = reuse(annotate.AnnotateSettings, "adapt_steps")
    annotation_seed: int = reuse(TrainConfig, "annotation_seed")  # the simulated person's clicks
    threads: Optional[int] = reuse(Shared, "threads", 2)
    out: Optional[str] = reuse(TrainConfig, "out", None)


def get_args_parser():
    """`infer`, `train` and `loop`, their options InferBench's, TrainBench's (+ TrainConfig's) and LoopBench's
    fields."""
    p = argparse.ArgumentParser(description="Measure inference and training speed on the current device.")
    sub = p.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("infer", help="end-to-end inference on synthetic tiles vs the model alone"),
                  InferBench, grouped=False)
    t = sub.add_parser("train", help="training images/s: published-style DataLoader, train.py, the model alone")
    add_arguments(t, TrainBench, grouped=False)
    add_arguments(t)  # every train.py setting (config.py), with the benchmark's own defaults below
    t.set_defaults(epochs=2, pretrained=False, workers=min(8, os.cpu_count() or 1))
    add_arguments(sub.add_parser("loop", help="the annotation page: from the last click to the updated overlay, "
                                              "adapted vs trained anew"), LoopBench, grouped=False)
    return p


def main(args):
    """Returns the exit code: 0 measured, 2 a user error (nothing measured)."""
    try:
        if args.command in ("infer", "loop"):
            settings = from_args(InferBench if args.command == "infer" else LoopBench, args)
            check_settings(settings)
            (bench_infer if args.command == "infer" else bench_loop)(settings)
        else:
            bench_train(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
