"""Pretrain the encoder on every image you have, labelled or not, by masked image modelling.

    python pretrain.py --images tiles/ more_tiles/ --out encoder.pth --steps 1000
    python train.py --images tiles/ --clicks clicks.gpkg --encoder encoder.pth     # starts from it

Masked image modelling for convnets (SparK, simplified): each crop is cut into --block x --block squares, a share
--mask-ratio of them is set to 0 in the input (the model normalises its input itself, so 0 is simply a value it
learns to read as "hidden"; SparK's sparse convolutions are left out), and the segmentation network, with one
output per band, learns to paint the hidden squares back. The loss is the mean squared error on the hidden, valid
pixels only, against the crop standardised per band (MAE's normalised pixel loss). The images go through the
training contract (spec.load_input, spec.to_grid), so the encoder sees what training will feed it.

The file holds every weight but the output layer (its shape depends on the number of classes), the
preprocessing it was pretrained under and how; `train.py --encoder encoder.pth` starts from it (apply_encoder).
"""

import argparse
import dataclasses
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from checkpoint import FORMAT as CHECKPOINT, non_finite_tensors
from config import (TrainConfig, add_arguments, check_settings, from_args, optional, reuse, schedule_factor, setting,
                    whole)
from dataset import augment_batch
from model import build_model, resolve_device
from raster import TIFF_SUFFIXES, atomic_path
from resident import draw_windows
from spec import fit_spec, load_input, to_grid

FORMAT = "pretrained-encoder"
VERSION = 1
METHOD = "masked image modelling"
MIN_CROP = {"resnet18": 32, "tiny": 4}  # the encoder's total stride: a crop must hold one bottleneck pixel


# --------------------------------------------------------------------------- images

def find_images(folders):
    """Every *.tif / *.tiff in the folders (not their subfolders), sorted. A missing folder or none found: error."""
    paths = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        paths += sorted(p for p in folder.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in TIFF_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no .tif/.tiff images in {', '.join(map(str, folders))}")
    return paths


def load_images(paths, spec, progress=True):
    """Each file as training reads it (SegmentationDataset._load): (C, h, w) uint8 tensors on the processing grid."""
    return [torch.from_numpy(np.ascontiguousarray(to_grid(load_input(p, spec, strict=True).image,
                                                          spec.scale).transpose(2, 0, 1)))
            for p in tqdm(paths, desc="reading", leave=False, disable=not progress)]


def draw_batch(images, batch_size, crop):
    """Random crop x crop windows of images drawn by area (resident.draw_windows, as train.py --crop draws them),
    flipped / turned by the training augmentation
    (torch's global RNG). Returns x (B, C, crop, crop) float in [0, 1] and valid (B, crop, crop) bool. Images
    smaller than the crop are padded with 0; a pixel 0 in every band (padding, nodata) is not valid, the rule
    SegmentationDataset.defined applies to images without labels."""
    x = torch.zeros(batch_size, images[0].shape[0], crop, crop, dtype=torch.uint8)
    sizes = torch.tensor([im.shape[-2:] for im in images])
    for b, (i, y0, x0) in enumerate(zip(*(t.tolist() for t in draw_windows(sizes, batch_size, crop)))):
        part = images[i][:, y0:y0 + crop, x0:x0 + crop]
        x[b, :, :part.shape[1], :part.shape[2]] = part
    x = x.float().div_(255)
    valid = (x != 0).any(1)
    x, valid, _ = augment_batch(x, valid, valid)  # square crops: no padding added
    return x, valid


# --------------------------------------------------------------------------- masking and the loss

def block_mask(batch_size, size, block, ratio):
    """(B, size, size) bool, True where hidden: round(ratio * cells) of each sample's block x block cells."""
    cells = math.ceil(size / block)
    hidden = round(ratio * cells * cells)
    order = torch.rand(batch_size, cells * cells).argsort(1)
    mask = (order < hidden).view(batch_size, cells, cells)
    return mask.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :size, :size]


def standardise(x, valid, eps=1e-6):
    """x (B, C, H, W) with each image's bands brought to mean 0, std 1 over its valid (B, H, W) pixels."""
    w = valid[:, None].float()
    n = w.sum((2, 3), keepdim=True).clamp(min=1)
    mean = (x * w).sum((2, 3), keepdim=True) / n
    var = ((x - mean) ** 2 * w).sum((2, 3), keepdim=True) / n
    return (x - mean) / (var + eps).sqrt()


def masked_loss(pred, x, valid, mask):
    """Mean squared error of pred (B, C, H, W) against standardise(x, valid), over the pixels both hidden (mask,
    (B, H, W) bool) and valid; 0 when there are none. Visible and invalid pixels never count."""
    keep = mask & valid
    err = ((pred - standardise(x, valid)) ** 2).mean(1)
    return err[keep].mean() if keep.any() else pred.sum() * 0


def reconstruction_loss(model, x, valid, mask):
    """The pretraining loss of a batch: hide the masked squares (0), predict, score the hidden valid pixels."""
    return masked_loss(model(x * ~mask[:, None]), x, valid, mask)


# --------------------------------------------------------------------------- training

def reconstruction_model(arch, channels):
    """The segmentation network with one output per band: what pretraining trains."""
    return build_model(arch, num_classes=channels, in_channels=channels, decoder="skip", pretrained=False)


def pretrain(images, arch="resnet18", steps=1000, batch_size=16, crop=64, mask_ratio=0.6, block=16, lr=1e-3,
             warmup=50, seed=0, device="cpu", progress=True):
    """Train a reconstruction model on `images` ((C, h, w) uint8 tensors). Returns (model, final loss: the mean
    loss of the last log interval). Adam, a linear warm-up over `warmup` steps (at most half the steps), then half
    a cosine down to 0."""
    torch.manual_seed(seed)
    warmup = min(warmup, steps // 2)
    model = reconstruction_model(arch, images[0].shape[0]).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor("cosine", warmup, steps))
    every, total, count, start = max(1, steps // 10), 0.0, 0, time.time()
    for step in tqdm(range(1, steps + 1), desc="pretraining", leave=False, disable=not progress):
        x, valid = draw_batch(images, batch_size, crop)
        mask = block_mask(batch_size, crop, block, mask_ratio)
        loss = reconstruction_loss(model, x.to(device), valid.to(device), mask.to(device))
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss is {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_now = schedule.get_last_lr()[0]
        schedule.step()
        total, count = total + loss.item(), count + 1
        if step % every == 0 or step == steps:
            final = total / count
            tqdm.write(f"step {step}/{steps}  loss {final:.4f}  lr {lr_now:.2e}  {time.time() - start:.1f} s")
            total = count = 0
    return model.eval(), final


# --------------------------------------------------------------------------- the file

def without_head(state, model):
    """`state` without the entries of the model's output layer (model.output_layer: its name prefix)."""
    head = model.output_layer.split(".")
    return {k: v for k, v in state.items() if k.split(".")[:len(head)] != head}


def save_encoder(path, model, spec, pretraining):
    """Write the encoder file atomically: every weight but the output layer. Refuses non-finite weights."""
    state = {k: v.detach().cpu() for k, v in without_head(model.state_dict(), model).items()}
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(f"refusing to save {path}: {len(bad)} weight tensors hold NaN or infinity ({bad[0]}, ...)")
    args = {k: v for k, v in model.model_args.items() if k != "num_classes"}
    d = {"format": FORMAT, "version": VERSION, "model_args": args, "state_dict": state,
         "spec": {k: v for k, v in spec.to_dict().items() if k != "classes"}, "pretraining": pretraining}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(d, tmp)
    return d


def read_encoder(path):
    """Load and check an encoder file (torch.load weights_only). ValueError naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"encoder file {path} not found; make one with python pretrain.py --images DIR --out {path}")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable encoder file ({type(e).__name__}); it may be truncated or "
                         f"hold code: make it again with python pretrain.py") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        what = "a training checkpoint" if isinstance(d, dict) and d.get("format") == CHECKPOINT else "not an encoder"
        raise ValueError(f"{path} is {what}, not a pretrained encoder (no '{FORMAT}' header); make one with "
                         f"python pretrain.py, or pass the checkpoint where a checkpoint is asked for")
    if d.get("version") != VERSION or not all(isinstance(d.get(k), dict) for k in
                                              ("model_args", "state_dict", "spec", "pretraining")):
        raise ValueError(f"{path}: encoder version {d.get('version')!r} or a malformed header; this code reads "
                         f"version {VERSION}: make it again with python pretrain.py")
    bad = non_finite_tensors(d["state_dict"])
    if bad:
        raise ValueError(f"{path}: {len(bad)} weight tensors hold NaN or infinity; pretrain again")
    return d


def apply_encoder(model, path, channels, scale=None):
    """Load the pretrained weights of `path` into `model` (every tensor but its output layer, which stays as
    initialised), for a model fed `channels` bands. Returns a one-line description for the log. ValueError naming
    the file when the architecture, decoder or band count differ. `scale`: the run's processing scale; a warning
    is printed when the file was pretrained at more than 1.5 times another scale."""
    d = read_encoder(path)
    have, want = d["model_args"], {k: v for k, v in model.model_args.items() if k != "num_classes"}
    if d["spec"]["channels"] != channels:
        raise ValueError(f"{path} was pretrained on {d['spec']['channels']}-band images, this model takes "
                         f"{channels}; pretrain on these images (python pretrain.py --images ...)")
    if have != want:
        raise ValueError(f"{path} holds an encoder for {have}, this model is {want}; pretrain with the same "
                         f"--arch (and decoder) or train without --encoder")
    own, pre = model.state_dict(), d["state_dict"]
    body = without_head(own, model)
    wrong = sorted(k for k in set(body) | set(pre) if k not in body or k not in pre or body[k].shape != pre[k].shape)
    if wrong:  # the same arguments but other weights: the model code changed since
        raise ValueError(f"{path}: its weights do not fit this model ({len(wrong)} names or shapes differ, e.g. "
                         f"{wrong[0]}); pretrain again with this code")
    model.load_state_dict({**own, **pre}, strict=True)
    trained_at = d["spec"]["scale"]
    if scale is not None and not 2 / 3 <= trained_at / scale <= 3 / 2:
        print(f"warning: {path} was pretrained at scale {trained_at:g}, this run processes at {scale:g}: objects "
              f"appear at another size than the encoder learnt them", flush=True)
    p = d["pretraining"]
    return (f"encoder from {path}: {p['method']}, {p['steps']} steps on {p['images']} images (crop {p['crop']}, "
            f"{p['mask_ratio']:g} of {p['block']}-pixel blocks hidden), final loss {p['final_loss']:.4f}, "
            f"scale {d['spec']['scale']:g}")


# --------------------------------------------------------------------------- CLI

@dataclass
class PretrainConfig:
    """pretrain.py's settings: a flag that train.py takes too is train's own declaration (config.reuse), so it has
    one help, one parser and one check in every command; defaults are pretraining's."""
    images: tuple[str, ...] = reuse(TrainConfig, "images", (), required=True)
    out: Optional[str] = reuse(TrainConfig, "out", None, required=True)
    size: int = reuse(TrainConfig, "size")
    scale: Optional[float] = reuse(TrainConfig, "scale")
    bands: Optional[tuple[int, ...]] = reuse(TrainConfig, "bands")
    max_images: Optional[int] = setting(None, "use at most this many images (a seeded random choice)", "data",
                                        check=optional(whole(1)), must="be >= 1")
    arch: str = reuse(TrainConfig, "arch")
    steps: Optional[int] = reuse(TrainConfig, "steps", 1000)
    batch_size: int = reuse(TrainConfig, "batch_size", 16)
    crop: int = reuse(TrainConfig, "crop", 64)
    mask_ratio: float = setting(0.6, "share of the blocks hidden, in (0, 1)", "masking")
    block: int = setting(16, "side of a hidden square, processing pixels", "masking")
    lr: float = reuse(TrainConfig, "lr")
    warmup: int = reuse(TrainConfig, "warmup", 50)
    seed: int = reuse(TrainConfig, "seed")
    device: str = reuse(TrainConfig, "device")
    overwrite: bool = reuse(TrainConfig, "overwrite")
    progress: bool = reuse(TrainConfig, "progress")


def get_args_parser():
    """The options are PretrainConfig's fields (declared once: train.py's where they are train's too)."""
    return add_arguments(argparse.ArgumentParser(description="Pretrain the encoder by masked image modelling (see the "
                                                             "module docstring)."), PretrainConfig, grouped=False)


def check_args(args):
    """The user errors found before any image is read (ValueError)."""
    check_settings(args)  # each field's own check (train.py's, where the flag is train's)
    cells = math.ceil(args.crop / args.block) ** 2 if args.block >= 1 else 0
    problems = [
        (Path(args.out).exists() and not args.overwrite, f"{args.out} exists; pass --overwrite to replace it"),
        (not 0 < args.mask_ratio < 1, f"--mask-ratio must be in (0, 1), got {args.mask_ratio}"),
        (args.crop < MIN_CROP[args.arch], f"--crop must be >= {MIN_CROP[args.arch]} for --arch {args.arch}, "
                                          f"got {args.crop}"),
        (args.block < 1, f"--block must be >= 1, got {args.block}"),
        (cells and not 1 <= round(args.mask_ratio * cells) < cells,
         f"--mask-ratio {args.mask_ratio} of the {cells} blocks of a {args.crop}-pixel crop hides none or all"),
        (not isinstance(args.steps, int), f"--steps takes a whole number of steps here, got {args.steps!r}"),
        (args.batch_size < 2, f"--batch-size must be >= 2 (batch normalisation), got {args.batch_size}"),
        (not args.lr > 0 or args.warmup < 0, "--lr must be > 0 and --warmup >= 0"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)
    return find_images(args.images)


def command_line(args):
    """The command that redoes this run, every option spelled out."""
    parts = ["python", "pretrain.py"]
    for key, value in dataclasses.asdict(args).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts += ([flag] if value else []) if key != "progress" else ([] if value else ["--no-progress"])
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)] if key == "images" else [flag, ",".join(map(str, value))]
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def main(args):
    """Returns the exit code: 0 written, 1 training diverged, 2 a user error (nothing written)."""
    start = time.time()
    try:
        args = from_args(PretrainConfig, args) if not isinstance(args, PretrainConfig) else args
        paths = check_args(args)
        if args.max_images is not None and len(paths) > args.max_images:
            keep = np.random.default_rng(args.seed).choice(len(paths), args.max_images, replace=False)
            paths = [paths[i] for i in sorted(keep)]
        spec = fit_spec(paths, bands=args.bands, scale=args.scale, size=args.size)
        images = load_images(paths, spec, progress=args.progress)
        print(f"{len(images)} images, {spec.channels} bands, scale {spec.scale:g}, intensity {spec.intensity.kind}; "
              f"read in {time.time() - start:.1f} s", flush=True)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model, final = pretrain(images, args.arch, args.steps, args.batch_size, args.crop, args.mask_ratio,
                                args.block, args.lr, args.warmup, args.seed, resolve_device(args.device),
                                progress=args.progress)
        save_encoder(args.out, model.cpu(), spec, {
            "method": METHOD, "steps": args.steps, "crop": args.crop, "mask_ratio": args.mask_ratio,
            "block": args.block, "images": len(images), "final_loss": final,
            "seconds": round(time.time() - start, 1), "command": command_line(args)})
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (final loss {final:.4f}, {time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
