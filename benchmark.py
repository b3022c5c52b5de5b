"""Speed and memory, measured on the current device. Numbers go here, never into tests.

    python benchmark.py infer                    # 6000x6000 synthetic GeoTIFF, end to end vs the model alone
    python benchmark.py infer --size 2000        # smaller, for a slow CPU
    python benchmark.py infer --size 20000 --e2e-only    # peak RSS of a 20000x20000 tile, streamed by rows
    python benchmark.py infer --size 20000 --e2e-only --stream-pixels 1e12    # the same tile read whole
    python benchmark.py infer --files 16 --size 6000     # a folder: pipelined vs serial vs the model alone
    python benchmark.py train --steps 10         # training images/s at 150x150, both decoders, batch 16
    python benchmark.py train --device cuda --amp

`infer` reports megapixels (of the input images) per second for infer.segment_folder on a folder of --files
synthetic tiles (read, resize, tiles, blending, upsampling, argmax, PNG + GeoTIFF written), pipelined (infer.py's
default) and serial (--no-pipeline), each in a fresh process with its peak RSS, whether both wrote the same
bytes, the same for the model alone on tensors already on the device covering the same model-input area without
overlap (the limit), and the ratios. Weights are random: speed does not depend on them.
"""

import argparse
import hashlib
import math
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

import spec
import infer
from checkpoint import load_model, save_checkpoint
from model import ResNet18Segmentation, resolve_device
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
    summary = infer.segment_folder(inp, out, model, ckpt, tile=opts["tile"], overlap=opts["overlap"],
                                   batch_size=opts["batch_size"], tta=opts["tta"], device=device,
                                   progress=opts["progress"], pipeline=pipeline)
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
            tifffile.imwrite(inp / name, synthetic_image(args.size, seed=i), photometric="rgb", extratags=geo,
                             **layout)
        H = W = args.size
        streamed = H * W > args.stream_pixels
        h, w = spec.grid_size(H, W, args.scale)
        ys, th = infer.tile_starts(h, args.tile, args.overlap)
        xs, tw = infer.tile_starts(w, args.tile, args.overlap)
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
        passes = len(infer.TTA_MODES[infer._tta_mode(args.tta)])
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

def bench_train(args):
    device = resolve_device(args.device)
    use_amp = args.amp and device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, len(spec.CLASSES), (args.batch_size, args.size, args.size), generator=g)
    y[torch.rand(y.shape, generator=g) > args.labelled] = spec.IGNORE_INDEX  # sparse points, as in training
    y = y.to(device)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), batch {args.batch_size} x 3 x {args.size} x "
          f"{args.size}, {args.labelled:.0%} of pixels labelled, Adam, AMP {'bf16' if use_amp else 'off'}")
    for decoder in args.decoders:
        torch.manual_seed(0)
        model = ResNet18Segmentation(decoder=decoder).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        criterion = PartialCrossEntropyLoss()

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = criterion(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        dt = time.perf_counter() - t0
        print(f"{decoder:5s}: {args.steps * args.batch_size / dt:8.1f} images/s ({dt / args.steps * 1000:.0f} ms/step)")


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    p = argparse.ArgumentParser(description="Measure inference and training speed on the current device.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("infer", help="end-to-end inference on synthetic tiles vs the model alone")
    q.add_argument("--size", type=int, default=6000,
                   help="side of the synthetic square tile in input pixels (default: %(default)s)")
    q.add_argument("--scale", type=float, default=spec.PROCESSING_SIZE / spec.NATIVE_SIZE,
                   help="processing scale recorded in the synthetic checkpoint (default: %(default)s)")
    q.add_argument("--decoder", default="plain", choices=["plain", "skip"], help="(default: %(default)s)")
    q.add_argument("--tile", type=int, default=512, help="as infer.py --tile (default: %(default)s)")
    q.add_argument("--overlap", type=int, default=64, help="as infer.py --overlap (default: %(default)s)")
    q.add_argument("--batch-size", type=int, default=4, help="as infer.py --batch-size (default: %(default)s)")
    q.add_argument("--tta", default="none", choices=list(infer.TTA_MODES), help="as infer.py --tta (default: none)")
    q.add_argument("--files", type=int, default=1,
                   help="synthetic tiles in the folder, each --size square; several show the pipeline's overlap of "
                        "reading, the model and writing (default: %(default)s)")
    q.add_argument("--modes", nargs="+", default=["pipelined", "serial"], choices=["pipelined", "serial"],
                   help="end-to-end runs: infer.py's default pipeline and/or --no-pipeline (default: both)")
    q.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every run, end to end and the model alone (default: torch's)")
    q.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ... (default: auto)")
    q.add_argument("--layout", default="strip", choices=["strip", "tiled-lzw"],
                   help="the synthetic GeoTIFF: uncompressed in one strip, or LZW in 256x256 tiles as GIS tools "
                        "write large rasters (default: %(default)s)")
    q.add_argument("--stream-pixels", type=float, default=infer.STREAM_PIXELS,
                   help="infer.STREAM_PIXELS for the run: TIFFs above it are streamed by rows; 1e12 reads the tile "
                        "whole, as infer.py did before streaming (default: %(default)s)")
    q.add_argument("--e2e-only", action="store_true",
                   help="only the end-to-end run (time, peak RSS); skip timing the model alone")
    q.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    q.set_defaults(func=bench_infer)

    t = sub.add_parser("train", help="training steps per second with random tensors, both decoders")
    t.add_argument("--size", type=int, default=spec.PROCESSING_SIZE, help="patch side (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    t.add_argument("--steps", type=int, default=10, help="timed steps per decoder (default: %(default)s)")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    t.add_argument("--labelled", type=float, default=0.1,
                   help="fraction of pixels with a point label (default: %(default)s)")
    t.add_argument("--decoders", nargs="+", default=["plain", "skip"], choices=["plain", "skip"],
                   help="(default: both)")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ... (default: auto)")
    t.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA, as train.py --amp")
    t.set_defaults(func=bench_train)
    return p


def main(args):
    args.func(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
