"""Train a segmentation model from point annotations and validate it on dense labels.

    python train.py --data archive/patches --points 20000 --class-weights points --decoder skip --epochs 100
    python train.py --data demo_data/patches --no-pretrained --epochs 5      # synthetic demo, random init
    python train.py --data archive/patches --points 1/object --affinity-weight 1 --consistency-weight 1   # clicks
    python train.py --data archive/patches --points 10 --rounds 3 --clicks-per-round 10   # model-chosen clicks

Per epoch: one log line (loss, OA and mIoU on the training points, val loss on the val points, val OA / mIoU
on the dense val labels, lr, seconds). Keeps `<out>/best_model.pth` (best val mIoU) and `<out>/last.pth`
(with optimizer state, for --resume), `<out>/history.json`, and draws `<out>/output.png` (curves) and
`<out>/results.png` (image | ground truth | points | prediction). A run never replaces another run's
checkpoints: a folder that holds some needs --resume (same settings) or --overwrite; only a rerun with
exactly the same settings replaces them by itself.
"""

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import distributed
import few_clicks
from checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from class_weights import SCHEMES, compute_class_weights, load_class_weights, save_class_weights
from dataset import (PUBLISHED_TRAIN_IDS, PUBLISHED_VAL_IDS, SegmentationDataset, available_ids,
                     clicks_per_object, folder_pairs, index_to_colour, load_split, pad_collate, parse_points,
                     patch_pairs)
from metrics import ConfusionMatrix
from model import ARCHS, DECODERS, build_model, resolve_device
from partial_ce_loss import NORMALIZATIONS, PartialCrossEntropyLoss
from raster import clean_stale_temporaries, read_raster
from resident import (ANNOTATION_FIELDS, LOADERS, ResidentLoader, choose_path, estimate_bytes, find_cache,
                      load_or_build, memory_budget, seed_dataset)
from spec import (IGNORE_INDEX, POTSDAM, PROCESSING_SIZE, DataSpec, file_bands, fit_intensity, load_class_file,
                  load_input)
from weak_losses import AffinityLoss, ConsistencyLoss, valid_pixels


# --------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    # data: a patch folder (Images/, Labels/) or two folders of matching names (images + labels)
    data: Optional[str] = "demo_data/patches"
    images: Optional[str] = None
    labels: Optional[str] = None
    split: Optional[str] = None  # JSON {"train": [ids], "val": [ids]}; default <data>/split.json if present
    train_ids: Optional[list] = None
    val_ids: Optional[list] = None
    val_fraction: float = 0.125  # without split or published ids: the last 12.5 % of sorted ids (300/2400)
    max_train: Optional[int] = None  # use only the first N training / validation images (quick runs)
    max_val: Optional[int] = None
    classes: Optional[str] = None  # JSON class file; default ISPRS Potsdam colours
    bands: Optional[list] = None  # image band indices; default every band but alpha
    # annotation
    points: Union[int, str, None] = 20000  # per image at native resolution, a share like "1%", clicks per
    # object like "1/object" (dataset.object_clicks), None = dense
    strategy: str = "uniform"  # or "balanced" (not used by "k/object")
    resample_each_epoch: bool = False  # the published code's behaviour: comparison only
    annotation_seed: int = 0
    # loss
    class_weights: str = "points"  # "points", "dense", "none" or a path to class_weights.pt
    # how class counts become weights (class_weights.SCHEMES). sqrt, not the published inverse frequency: it won
    # on the synthetic and the real set (experiments.py, experiment 7), and inverse lost OA to the majority class
    class_weighting: str = "sqrt"
    gamma: float = 2.0
    normalization: str = "weighted"
    # losses on the unlabelled pixels (weak_losses.py), added to the partial CE times their weight; 0 = off
    affinity_weight: float = 0.0  # gated CRF pairwise loss
    affinity_kernel: int = 5  # window side (odd), before dilation
    affinity_dilation: int = 2
    affinity_sigma_rgb: float = 0.1  # colour bandwidth, image in [0, 1]
    affinity_sigma_xy: float = 4.0  # spatial bandwidth, processing pixels
    consistency_weight: float = 0.0  # FixMatch-style: confident pseudo-labels of the batch vs a strong view
    consistency_threshold: float = 0.95
    # rounds inside the run (few_clicks.py); 0 = off
    self_training: int = 0  # R rounds of pseudo-labels from the model's confident pixels
    pseudo_threshold: float = 0.9  # softmax max a pixel needs to become a pseudo-label
    rounds: int = 0  # R rounds of clicks the model chooses (revealed from the dense labels)
    clicks_per_round: int = 10  # per image and round
    click_strategy: str = "uncertain"  # smallest top-2 margin first, or "random" (the baseline)
    click_spacing: float = 5.0  # processing pixels between the clicks of one round
    region_growing: bool = False  # a click labels its SLIC superpixel (where the superpixel's clicks agree)
    # model
    arch: str = "resnet18"  # "tiny": a three-layer stand-in for tests and smoke runs
    decoder: str = "skip"  # "plain" is the published decoder
    pretrained: bool = True  # ImageNet encoder through torchvision (needs the weights file or internet)
    size: int = PROCESSING_SIZE  # processing size of the first training image's longer side (300 -> 150)
    scale: Optional[float] = None  # processing pixels per file pixel; overrides size (mixed image sizes)
    # optimisation (published: Adam + StepLR)
    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    step_size: int = 30
    lr_gamma: float = 0.1
    augment: bool = True  # flips and 90-degree rotations of the training patches
    # run
    seed: int = 0
    device: str = "auto"
    amp: bool = False  # bfloat16 autocast on CUDA
    workers: int = 0  # DataLoader path only
    # "auto": batches from uint8 tensors held on the device (resident.py) unless points are redrawn every epoch
    # or the data do not fit; "resident" insists; "dataloader": the per-item DataLoader of dataset.py
    loader: str = "auto"
    out: str = "checkpoints"
    figures: bool = True  # output.png and results.png in `out`
    exclude: tuple = ()  # classes left out of the means (e.g. ("clutter",))
    resume: bool = False
    overwrite: bool = False  # start afresh in an `out` that holds another run's checkpoints
    progress: bool = True


# settings that may differ between a run and its --resume: they do not change what is trained
RESUMABLE = ("epochs", "device", "workers", "progress", "resume", "overwrite", "figures", "out", "amp", "loader")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or weights); the message says what to change."""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_config(cfg):
    """Argument errors before any work (ValueError naming the setting)."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
    need(isinstance(cfg.epochs, int) and cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"batch size must be >= 1, got {cfg.batch_size}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a positive number, got {cfg.lr}")
    need(cfg.step_size >= 1, f"step size must be >= 1 epoch, got {cfg.step_size}")
    need(0 < cfg.lr_gamma <= 1, f"lr gamma must be in (0, 1], got {cfg.lr_gamma}")
    need(cfg.gamma >= 0, f"focal gamma must be >= 0, got {cfg.gamma}")
    need(cfg.weight_decay >= 0, f"weight decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.size >= 8, f"size must be >= 8 pixels, got {cfg.size}")
    need(cfg.scale is None or (math.isfinite(cfg.scale) and 0 < cfg.scale <= 16),
         f"scale must be in (0, 16], got {cfg.scale}")
    need(0 < cfg.val_fraction < 1, f"val fraction must be in (0, 1), got {cfg.val_fraction}")
    for name in ("max_train", "max_val"):
        v = getattr(cfg, name)
        need(v is None or v >= 1, f"{name.replace('_', '-')} must be >= 1 (leave it out for all), got {v}")
    need(cfg.workers >= 0, f"workers must be >= 0, got {cfg.workers}")
    need(cfg.loader in LOADERS, f"unknown loader {cfg.loader!r}; use one of {LOADERS}")
    need(not (cfg.loader == "resident" and cfg.resample_each_epoch),
         "--loader resident holds fixed points; points redrawn every epoch need --loader dataloader (or auto)")
    need(cfg.strategy in ("uniform", "balanced"), f"unknown point strategy {cfg.strategy!r}")
    need(cfg.class_weighting in SCHEMES, f"unknown class weighting {cfg.class_weighting!r}; use one of {SCHEMES}")
    need(cfg.normalization in NORMALIZATIONS, f"normalization must be one of {NORMALIZATIONS}")
    for name in ("affinity_weight", "consistency_weight"):
        v = getattr(cfg, name)
        need(math.isfinite(v) and v >= 0, f"{name.replace('_', '-')} must be >= 0 (0 = off), got {v}")
    need(cfg.affinity_kernel >= 3 and cfg.affinity_kernel % 2 == 1,
         f"affinity kernel must be odd and >= 3, got {cfg.affinity_kernel}")
    need(cfg.affinity_dilation >= 1, f"affinity dilation must be >= 1, got {cfg.affinity_dilation}")
    need(cfg.affinity_sigma_rgb > 0 and cfg.affinity_sigma_xy > 0,
         f"affinity sigmas must be > 0, got {cfg.affinity_sigma_rgb} and {cfg.affinity_sigma_xy}")
    need(0 <= cfg.consistency_threshold <= 1, f"consistency threshold must be in [0, 1], got "
                                              f"{cfg.consistency_threshold}")
    for name in ("self_training", "rounds"):
        v = getattr(cfg, name)
        need(isinstance(v, int) and 0 <= v < cfg.epochs,
             f"{name.replace('_', '-')} must be a whole number of rounds below the epochs ({cfg.epochs}; 0 = off), "
             f"got {v}")
    for name in ("self_training", "rounds", "region_growing"):
        need(not getattr(cfg, name) or (cfg.points is not None and not cfg.resample_each_epoch),
             f"{name.replace('_', '-')} needs a fixed point annotation (not dense labels, not redrawn every epoch)")
    need(0 < cfg.pseudo_threshold <= 1, f"pseudo threshold must be in (0, 1], got {cfg.pseudo_threshold}")
    need(cfg.clicks_per_round >= 1, f"clicks per round must be >= 1, got {cfg.clicks_per_round}")
    need(cfg.click_strategy in few_clicks.CLICK_STRATEGIES,
         f"unknown click strategy {cfg.click_strategy!r}; use one of {few_clicks.CLICK_STRATEGIES}")
    need(cfg.click_spacing >= 1, f"click spacing must be >= 1 pixel, got {cfg.click_spacing}")
    need(cfg.arch in ARCHS, f"unknown arch {cfg.arch!r}; use one of {ARCHS}")
    need(cfg.decoder in DECODERS, f"unknown decoder {cfg.decoder!r}; use one of {DECODERS}")
    need(cfg.bands is None or (len(cfg.bands) > 0 and min(cfg.bands) >= 0), f"bad bands {cfg.bands}")
    if cfg.points is not None:
        parse_points(cfg.points)
    cw = cfg.class_weights
    need(cw in ("points", "dense", "none") or Path(cw).is_file(),
         f"class weights must be points, dense, none or an existing .pt file; {cw} is none of these")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device}: no CUDA GPU is available here; use --device cpu or auto")


# --------------------------------------------------------------------------- data

def resolve_split(cfg):
    """(train pairs, val pairs, description) from the config. Without --split, `<data>/split.json` is used
    when it exists (prepare_potsdam.py writes one). Overlapping train and val ids are an error."""
    if cfg.images or cfg.labels:
        if not (cfg.images and cfg.labels):
            raise ValueError("own data needs both --images and --labels folders")
        pairs = folder_pairs(cfg.images, cfg.labels)
        by_id = {p[0]: p for p in pairs}
        get = lambda ids: [by_id[str(i)] if str(i) in by_id else _missing(i, cfg.images) for i in ids]
        ids = sorted(by_id)
    else:
        get = lambda ids: patch_pairs(cfg.data, ids)
        ids = None
    split = cfg.split
    if split is None and cfg.train_ids is None and cfg.data and not (cfg.images or cfg.labels) \
            and (Path(cfg.data) / "split.json").is_file():
        split = str(Path(cfg.data) / "split.json")
    if split:
        s = load_split(split)
        tr, va, how = s["train"], s["val"], f"split file {split}"
    elif cfg.train_ids is not None or cfg.val_ids is not None:
        if cfg.train_ids is None or cfg.val_ids is None:
            raise ValueError("give both train_ids and val_ids")
        tr, va, how = cfg.train_ids, cfg.val_ids, "explicit ids"
    else:
        ids = ids if ids is not None else available_ids(cfg.data)
        if not (cfg.images or cfg.labels) and set(PUBLISHED_TRAIN_IDS + PUBLISHED_VAL_IDS) <= set(ids):
            tr, va, how = PUBLISHED_TRAIN_IDS, PUBLISHED_VAL_IDS, "published split (0-2099 / 2100-2399)"
        else:
            if len(ids) < 2:
                raise ValueError(f"need at least 2 images to split into train and val, found {len(ids)}")
            n_val = min(len(ids) - 1, max(1, int(round(len(ids) * cfg.val_fraction))))
            tr, va, how = ids[:-n_val], ids[-n_val:], f"last {n_val} of {len(ids)} sorted ids as val"
    both = sorted({str(i) for i in tr} & {str(i) for i in va})
    if both:
        raise ValueError(f"{how}: {len(both)} ids are in both train and val ({both[:5]}); a split must not "
                         f"validate on training images")
    if not tr or not va:
        raise ValueError(f"{how}: {len(tr)} train and {len(va)} val ids; both parts need images")
    return get(tr), get(va), how


def _missing(i, folder):
    raise FileNotFoundError(f"id {i} from the split has no image in {folder}")


def fit_spec(cfg, train_pairs):
    """The preprocessing contract of this run, fitted on the training images: classes, bands (every band
    but alpha unless --bands), the intensity rule (uint8 for 8-bit data, else per-band percentiles) and the
    scale (--scale, or --size over the first image's longer side)."""
    classes = load_class_file(cfg.classes) if cfg.classes else POTSDAM
    first = read_raster(train_pairs[0][1])
    bands = tuple(cfg.bands) if cfg.bands is not None else None
    channels = file_bands(first, bands, None, first.path)[0].shape[2]  # the rule load_input(strict) applies
    scale = cfg.scale if cfg.scale is not None else cfg.size / max(first.array.shape[:2])
    intensity = fit_intensity([p[1] for p in train_pairs], bands)
    return DataSpec(classes=classes, bands=bands, channels=channels, intensity=intensity, scale=scale)


def split_pairs(cfg):
    """(train pairs, val pairs, description): resolve_split cut to --max-train / --max-val. Reads no image."""
    train_pairs, val_pairs, how = resolve_split(cfg)
    if cfg.max_train or cfg.max_val:
        train_pairs, val_pairs = train_pairs[: cfg.max_train], val_pairs[: cfg.max_val]
        how += f", first {len(train_pairs)} / {len(val_pairs)} used"
    return train_pairs, val_pairs, how


def build_datasets(cfg, spec=None):
    """(train dataset, val dataset, split description, spec). The spec is fitted on the training images
    unless given (a resumed run reuses its checkpoint's)."""
    train_pairs, val_pairs, how = split_pairs(cfg)
    spec = spec or fit_spec(cfg, train_pairs)
    common = dict(spec=spec, points=cfg.points, strategy=cfg.strategy, seed=cfg.annotation_seed)
    train_ds = SegmentationDataset(train_pairs, resample_each_epoch=cfg.resample_each_epoch,
                                   augment=cfg.augment, **common)
    val_ds = SegmentationDataset(val_pairs, **common)
    return train_ds, val_ds, how, spec


def check_data(cfg, train_ds, val_ds):
    """Read every label and annotation before the first epoch, so bad files and empty classes fail now, not
    after an epoch: every class needs a training point; val needs labelled pixels. The share of undefined
    training pixels (a warning, and a hint when a class has no point) is counted on the processing-grid labels,
    which a cache hit holds without reading a file (resident.seed_dataset)."""
    seen = np.zeros(train_ds.classes.num_classes, np.int64)
    undefined = total = 0
    for i in range(len(train_ds)):
        grid = train_ds.point_grid(i)
        seen += np.bincount(grid[grid != IGNORE_INDEX].astype(np.int64), minlength=len(seen))[: len(seen)]
        label = train_ds.dense_label(i)
        undefined += int((label == IGNORE_INDEX).sum())
        total += label.size
    names = train_ds.classes.names
    missing = [names[c] for c in np.flatnonzero(seen == 0)]
    if missing:
        hint = ""
        spec = train_ds.classes
        if undefined and spec.label_format == "index" and spec.ignore_value is not None:
            hint = (f" {100 * undefined / total:.1f} % of the training label pixels hold the ignore value "
                    f"{spec.ignore_value}: if that value is a class (a 0/255 mask), map it with "
                    f'"value_map": {{"0": 0, "{spec.ignore_value}": 1}} in the class file.')
        raise ValueError(f"classes {missing} have no labelled point in the {len(train_ds)} training images "
                         f"(points {cfg.points}); the model could never learn them. Fix the labels or the class "
                         f"file, or drop those classes from it.{hint}")
    if undefined > total / 2:
        print(f"warning: {100 * undefined / total:.0f} % of the training label pixels are undefined", flush=True)
    labelled = sum(int((val_ds.dense_label(i) != IGNORE_INDEX).sum()) for i in range(len(val_ds)))
    if labelled == 0:
        raise ValueError(f"the {len(val_ds)} validation images have no labelled pixel: mIoU cannot be measured. "
                         f"Choose other val images (--split) or fix their labels")
    unknown = set(cfg.exclude) - set(names)
    if unknown:
        raise ValueError(f"--exclude names unknown classes {sorted(unknown)}; the classes are {list(names)}")


def class_weight_tensor(cfg, train_ds, out_dir):
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights in ("points", "dense"):
        w, counts = compute_class_weights(train_ds, cfg.class_weights, cfg.class_weighting)
        save_class_weights(out_dir / "class_weights.pt", w, counts, cfg.class_weights, train_ds.classes.names,
                           cfg.class_weighting)
        return w
    return load_class_weights(cfg.class_weights, train_ds.classes.names)


# --------------------------------------------------------------------------- one epoch

def weak_terms(cfg):
    """The enabled losses on the unlabelled pixels as {name: (weight, fn(model, image, logits, points))}.
    Padding (all bands 0) never counts; consistency uses the unlabelled pixels only."""
    terms = {}
    if cfg.affinity_weight:
        affinity = AffinityLoss(cfg.affinity_kernel, cfg.affinity_dilation, cfg.affinity_sigma_rgb,
                                cfg.affinity_sigma_xy)
        terms["affinity"] = (cfg.affinity_weight, lambda model, x, logits, y: affinity(logits, x, valid_pixels(x)))
    if cfg.consistency_weight:
        consistency = ConsistencyLoss(cfg.consistency_threshold)

        def fixmatch(model, x, logits, y):
            valid = valid_pixels(x)
            return consistency(model, x, logits.detach(), valid & (y == IGNORE_INDEX), valid)
        terms["consistency"] = (cfg.consistency_weight, fixmatch)
    return terms


def make_loaders(cfg, train_ds, val_ds, device, gen, out_dir, ctx=None, cached=None):
    """(train loader, val loader). Batches gathered on the device from cached uint8 tensors (resident.py) when
    the points are fixed and the data fit (--loader auto), else the per-item DataLoader; one line says which.
    `cached`: what train() found of the two caches, ((data, where) or None, (data, where) or None); None: not
    looked for yet. The memory the tensors need is a hit's own size, else resident.estimate_bytes (every
    sample's size, from the samples check_data decoded). Under torchrun (`ctx`, distributed.Context) each
    loader yields this rank's share of every global batch: the one place the data are sharded."""
    rank, world = (ctx.rank, ctx.world) if ctx is not None else (0, 1)
    hits = cached if cached is not None else (None, None)
    need = sum(hit[0].nbytes if hit else estimate_bytes(ds) for ds, hit in zip((train_ds, val_ds), hits)) \
        if cfg.loader != "dataloader" else 0
    path, why = choose_path(cfg.loader, cfg.resample_each_epoch, need, memory_budget(device))
    drop_last = len(train_ds) > cfg.batch_size
    if path == "resident":
        annotation = {name: getattr(cfg, name) for name in ANNOTATION_FIELDS}
        (tr, tr_where), (va, va_where) = (hit or load_or_build(ds, annotation, out_dir, look=cached is None)
                                          for ds, hit in zip((train_ds, val_ds), hits))
        fast = device.type == "cuda"  # channels_last pays on GPUs only
        train_loader = ResidentLoader(tr.to(device), cfg.batch_size, shuffle=True, drop_last=drop_last,
                                      generator=gen, augment=cfg.augment, channels_last=fast, rank=rank,
                                      world_size=world)
        val_loader = ResidentLoader(va.to(device), cfg.batch_size, channels_last=fast, rank=rank, world_size=world)
        print(f"data path: resident batches on {device} ({why}); train {tr_where}; val {va_where}", flush=True)
        return train_loader, val_loader
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                     persistent_workers=cfg.workers > 0 and not cfg.resample_each_epoch and not few_clicks.enabled(cfg),
                     collate_fn=pad_collate)  # persistent workers would keep their copy of an annotation rounds change
    train_loader = DataLoader(train_ds, shuffle=True, drop_last=drop_last, generator=gen, **loader_kw)
    val_loader = DataLoader(val_ds, shuffle=False, **loader_kw)
    if world > 1:  # this rank's share of every batch (distributed.RankBatches)
        train_loader, val_loader = (distributed.shard_loader(loader, ctx) for loader in (train_loader, val_loader))
    print(f"data path: per-item DataLoader, {cfg.workers} workers ({why})", flush=True)
    return train_loader, val_loader


def run_epoch(model, loader, criterion, device, optimizer=None, amp=False, progress=True, desc="", extra=None,
              names=None):
    """Train (optimizer given) or evaluate over a loader (a DataLoader or a resident.ResidentLoader). Returns
    (mean loss, points confusion matrix, dense confusion matrix or None, {name: mean} of the `extra` terms).
    Dense labels are only looked at when evaluating. `extra` ({name: (weight, fn)}, see weak_terms) adds
    weight x fn(...) to the loss when training; the mean loss stays the partial CE alone. A non-finite loss
    (extras included) stops training (TrainingError) before the step that would spread it into the weights.
    Sums and confusion matrices stay on the device: evaluating waits for it once, at the end."""
    train = optimizer is not None
    model.train(train)
    k = model.num_classes
    names = names or loader.dataset.classes.names
    cm_points, cm_dense = ConfusionMatrix(k, names, device=device), \
        (None if train else ConfusionMatrix(k, names, device=device))
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    extra = extra if train and extra else {}
    extra_sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in extra}
    use_amp = amp and device.type == "cuda"
    with torch.set_grad_enabled(train):
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["points"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = criterion(logits, y)
            value = loss.detach()
            for name, (weight, term) in extra.items():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    term_value = term(model, x, logits, y)
                loss = loss + weight * term_value
                extra_sums[name] += term_value.detach() * x.shape[0]
            if train:  # one wait a step (the partial CE waits once already, for its mask)
                _check_finite(float(loss.detach()), desc, batch["id"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            pred = logits.argmax(1)
            cm_points.update(pred, y)
            if cm_dense is not None:
                cm_dense.update(pred, batch["label"])
            total += value * x.shape[0]
            n += x.shape[0]
    mean = float(total) / max(n, 1)
    _check_finite(mean, desc, "of this epoch")
    return mean, cm_points, cm_dense, {name: float(v) / max(n, 1) for name, v in extra_sums.items()}


def _check_finite(loss_value, desc, ids):
    if not math.isfinite(loss_value):
        raise TrainingError(f"{desc}: the loss is {loss_value} (images {ids[:4] if isinstance(ids, list) else ids}): "
                            f"training diverged, the learning rate is probably too high; nothing was saved from "
                            f"this epoch. Lower --lr and start again")


# --------------------------------------------------------------------------- figures

def plot_history(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("loss", "oa", "miou"), ("partial CE loss (points)", "overall accuracy",
                                                             "mIoU")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train (points)")
        ax.plot(ep, [h[f"val_{key}"] for h in history], "o-",
                label="val (points)" if key == "loss" else "val (dense labels)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_results(model, dataset, path, n=4, device="cpu", title=None):
    """Grid of image | ground truth | points | prediction for the first n samples of a dataset. The
    prediction is what infer.py makes of the file (spec.load_input + infer.predict_image), at its size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infer import display_rgb, predict_image

    model.eval()
    palette = dataset.classes.palette
    n = min(n, len(dataset))
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n), squeeze=False)
    for r in range(n):
        image_id, image_path, _ = dataset.pairs[r]
        image = load_input(image_path, dataset.spec).image
        label = dataset.native_label(r)
        pred = predict_image(model, image, dataset.spec.scale, device=device)
        pts = dataset.point_grid(r)
        panels = (display_rgb(image), index_to_colour(label, palette), index_to_colour(pts, palette),
                  index_to_colour(pred, palette))
        titles = (f"image {image_id}", "ground truth", f"points ({(pts != IGNORE_INDEX).mean():.1%} of pixels)",
                  "prediction (infer.py)")
        for ax, p, t in zip(axes[r], panels, titles):
            ax.imshow(p, interpolation="nearest")
            ax.set_title(t, fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- training

def comparable_config(config):
    """The settings that decide what is trained; a field an older checkpoint lacks counts as its default."""
    defaults = _jsonable(dataclasses.asdict(TrainConfig()))
    return {k: config.get(k, defaults.get(k)) for k in set(config) | set(defaults) if k not in RESUMABLE}


def prepare_out(cfg, out_dir):
    """Refuse to replace another run's checkpoints; with --resume, the settings must be the same."""
    last_path = out_dir / "last.pth"
    if cfg.resume:
        ck = read_checkpoint(last_path)
        old, new = comparable_config(ck.config), comparable_config(_jsonable(dataclasses.asdict(cfg)))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise ValueError(f"{last_path} was trained with other settings ({shown}); resume with the same "
                             f"settings (only {', '.join(RESUMABLE[:4])}, ... may change) or train into a new --out")
        if ck.train_state is None:
            raise ValueError(f"{last_path} holds no training state to resume from")
        return ck
    taken = [p.name for p in (out_dir / "best_model.pth", last_path) if p.is_file()]
    if taken and not cfg.overwrite and _same_run(cfg, last_path):
        print(f"{out_dir} holds the checkpoints of a run with the same settings: they are replaced by this rerun")
        return None
    if taken and not cfg.overwrite:
        raise ValueError(f"{out_dir} already holds another run's {' and '.join(taken)}; continue it with --resume, "
                         f"start afresh with --overwrite (they are replaced), or choose another --out")
    return None


def _same_run(cfg, last_path):
    """True when last_path was written by a run with exactly these settings (a rerun loses nothing)."""
    try:
        old = read_checkpoint(last_path).config
    except (FileNotFoundError, CheckpointError):
        return False
    return comparable_config(old) == comparable_config(_jsonable(dataclasses.asdict(cfg)))


def _jsonable(config):
    return json.loads(json.dumps(config))


def train(cfg):
    """Train as configured; returns the history (one dict per epoch)."""
    check_config(cfg)
    ctx = distributed.init_from_env(cfg.device)  # under torchrun: this rank and its device; else one process
    if cfg.batch_size % ctx.world:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {ctx.world} processes: the global "
                         f"batch is shared out equally, so give a multiple of {ctx.world}")
    seed_everything(cfg.seed)  # the same on every rank: the same model init (DDP broadcasts rank 0's anyway)
    device = ctx.device
    out_dir = Path(cfg.out)
    resumed = prepare_out(cfg, out_dir)
    removed = clean_stale_temporaries(out_dir) if ctx.is_main else []
    if removed:
        print(f"removed {len(removed)} temporary files that killed runs left in {out_dir}")
    train_ds, val_ds, how, spec = build_datasets(cfg, resumed.spec if resumed else None)
    cached = None  # the resident caches, looked for first: a hit seeds the datasets, so nothing below decodes a file
    if cfg.loader != "dataloader" and not cfg.resample_each_epoch:  # choose_path's first rules; it decides the rest
        annotation = {name: getattr(cfg, name) for name in ANNOTATION_FIELDS}
        cached = tuple(find_cache(ds, annotation, out_dir) for ds in (train_ds, val_ds))
        for ds, hit in zip((train_ds, val_ds), cached):
            if hit:
                seed_dataset(ds, hit[0])
    check_data(cfg, train_ds, val_ds)
    if len(train_ds) < ctx.world:
        raise ValueError(f"{len(train_ds)} training images cannot feed {ctx.world} processes; use fewer processes")
    model = build_model(cfg.arch, train_ds.classes.num_classes, spec.channels, cfg.decoder,
                        pretrained=cfg.pretrained).to(device)  # before anything is written: weights may be missing
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main or cfg.class_weights not in ("points", "dense"):
        weights = class_weight_tensor(cfg, train_ds, out_dir)  # rank 0 writes class_weights.pt
    else:  # the same numbers, not written again
        weights = compute_class_weights(train_ds, cfg.class_weights, cfg.class_weighting)[0]
    stats = train_ds.annotation_stats()
    labelled = stats["labelled_fraction"]
    if cfg.points is None:
        budget = "dense labels"
    else:
        budget = f"{cfg.points} clicks" if clicks_per_object(cfg.points) else \
            f"{cfg.points} {cfg.strategy} points per image"
        budget += f" ({stats['clicks_per_image']:.1f} clicks per image, {stats['clicked_fraction']:.3%} of the pixels)"
    print(f"data: {len(train_ds)} train / {len(val_ds)} val images ({how}); {budget}"
          f"{' redrawn every epoch (published code, comparison only)' if cfg.resample_each_epoch else ''}; "
          f"labelled {stats['labelled_fraction']:.2%} of the training pixels; scale {spec.scale:g}; "
          f"{spec.channels} bands, intensity {spec.intensity.kind}; device {device}; "
          f"{cfg.arch}{' ImageNet' if cfg.pretrained and cfg.arch == 'resnet18' else ' random init'}", flush=True)
    if ctx.world > 1:
        print(f"distributed: {ctx.world} processes ({torch.distributed.get_backend()}), {cfg.batch_size // ctx.world} "
              f"of each batch of {cfg.batch_size} per process", flush=True)
    if weights is not None:
        print(f"class weights ({cfg.class_weights}, {cfg.class_weighting}): " +
              ", ".join(f"{n} {w:.2f}" for n, w in zip(train_ds.classes.names, weights.tolist())))

    criterion = PartialCrossEntropyLoss(cfg.gamma, weights, normalization=cfg.normalization).to(device)
    extra = weak_terms(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=True if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.lr_gamma)
    history, start, best = [], 1, -math.inf
    gen = torch.Generator().manual_seed(cfg.seed)

    config = _jsonable(dataclasses.asdict(cfg))
    last_path, best_path = out_dir / "last.pth", out_dir / "best_model.pth"
    if resumed:
        if resumed.model_args != model.model_args:
            raise ValueError(f"{last_path} holds a {resumed.model_args} model; this run asks for "
                             f"{model.model_args}: resume with the same settings or a new --out")
        st = resumed.train_state
        model.load_state_dict(resumed.state_dict)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        gen.set_state(st["loader_rng"])
        history, best = list(st["history"]), st["best_miou"]
        start = resumed.epoch + 1
        print(f"resumed from {last_path} at epoch {resumed.epoch}")

    train_loader, val_loader = make_loaders(cfg, train_ds, val_ds, device, gen, out_dir, ctx, cached)
    # after the loaders (a resident cache holds the drawn annotation only): grown labels, or a resumed run's rounds
    if few_clicks.start(cfg, train_ds, resumed.train_state if resumed else None):
        few_clicks.refresh(train_loader, train_ds)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    names = train_ds.classes.names
    net = distributed.wrap(model, ctx)  # DDP under torchrun: gradients averaged over the ranks

    for epoch in range(start, cfg.epochs + 1):
        t0 = time.time()
        train_ds.set_epoch(epoch)
        if ctx.world > 1:  # augmentation draws differ per rank, and a resumed run draws the same again
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, ctx.rank]).generate_state(1)[0]))
        lr = optimizer.param_groups[0]["lr"]
        tr_loss, tr_cm, _, tr_extra = run_epoch(net, train_loader, criterion, device, optimizer, cfg.amp,
                                                cfg.progress and ctx.is_main, f"epoch {epoch} train", extra, names)
        tr_loss, tr_cm, tr_extra = distributed.reduce_epoch(train_loader, tr_loss, tr_cm, tr_extra)
        scheduler.step()
        distributed.sync_buffers(model)  # every rank validates rank 0's model, the one saved
        va_loss, _, va_cm, _ = run_epoch(model, val_loader, criterion, device, None, cfg.amp,
                                         cfg.progress and ctx.is_main, f"epoch {epoch} val", names=names)
        va_loss, va_cm, _ = distributed.reduce_epoch(val_loader, va_loss, va_cm, {})
        tr, va = tr_cm.compute(cfg.exclude), va_cm.compute(cfg.exclude)
        h = {"epoch": epoch, "train_loss": tr_loss, "train_oa": tr["oa"], "train_miou": tr["miou"],
             "val_loss": va_loss, "val_oa": va["oa"], "val_miou": va["miou"], "val_mf1": va["mf1"],
             "val_iou": va["iou"], "val_f1": va["f1"], "lr": lr, "seconds": time.time() - t0}
        h.update({f"train_{name}": v for name, v in tr_extra.items()})  # only the enabled terms
        history.append(h)
        improved = va["miou"] > best
        terms = "".join(f" {name} {v:.4f}" for name, v in tr_extra.items())
        print(f"epoch {epoch:3d}/{cfg.epochs} | loss {tr_loss:.4f}{terms} OA {tr['oa']:.3f} mIoU {tr['miou']:.3f} "
              f"(train points) | val loss {va_loss:.4f} OA {va['oa']:.3f} mIoU {va['miou']:.3f} "
              f"mF1 {va['mf1']:.3f} (dense) | lr {lr:.2e} | {h['seconds']:.1f}s{' *' if improved else ''}",
              flush=True)
        if few_clicks.end_of_epoch(cfg, epoch, model, train_ds, device):  # a round changed the annotation
            few_clicks.refresh(train_loader, train_ds)  # --- the batches read the new point grids from here on
            labelled = train_ds.labelled_fraction()
        h["labelled_fraction"] = labelled  # share of training pixels clicked as the epoch ends (rounds add some)
        try:
            if improved:
                best = va["miou"]
                if ctx.is_main:  # only rank 0 writes; the others hold the same weights
                    save_checkpoint(best_path, model, spec, config=config, metrics=va, epoch=epoch)
            if ctx.is_main:
                save_checkpoint(last_path, model, spec, config=config, metrics=va, epoch=epoch, train_state={
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "loader_rng": gen.get_state(), "history": history, "best_miou": best,
                    **({"few_clicks": few_clicks.state(train_ds)} if few_clicks.enabled(cfg) else {})})
        except ValueError as e:  # non-finite weights: never saved
            raise TrainingError(f"epoch {epoch}: {e}. Training diverged; lower --lr and start again") from None

    if not ctx.is_main:
        distributed.barrier()  # rank 0 writes the history and figures
        return history
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    if cfg.figures and history:
        plot_history(history, out_dir / "output.png")
        if best_path.is_file():
            best_model, ck = load_model(best_path, device)
            plot_results(best_model, val_ds, out_dir / "results.png", device=device,
                         title=f"best epoch {ck.epoch}: val mIoU {ck.metrics['miou']:.3f}")
    distributed.barrier()
    return history


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train from point annotations (see the module docstring).")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="patch folder with Images/ and Labels/")
    g.add_argument("--images", help="own data: folder of images (with --labels; matching file names)")
    g.add_argument("--labels", help="own data: folder of labels")
    g.add_argument("--split", help="split JSON {'train': [ids], 'val': [ids]} (default: <data>/split.json when it "
                                   "exists, else the published split when ids 0-2399 exist, else the last "
                                   "--val-fraction of the sorted ids)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction)
    g.add_argument("--max-train", type=int, help="use only the first N training images (quick runs)")
    g.add_argument("--max-val", type=int, help="use only the first N validation images")
    g.add_argument("--classes", help="class file JSON (default: ISPRS Potsdam classes and colours)")
    g.add_argument("--bands", help="image bands to use, e.g. 0,1,2,3 (default: every band but alpha)")
    g = p.add_argument_group("annotation and loss")
    g.add_argument("--points", default=str(d.points),
                   help="points per image at native resolution, a share of its pixels like 1%%, clicks in every "
                        "object like 1/object (object = connected region of one class), or 'dense'")
    g.add_argument("--strategy", default=d.strategy, choices=["uniform", "balanced"],
                   help="how a number or share of points is drawn (not used by k/object)")
    g.add_argument("--resample-each-epoch", action="store_true",
                   help="redraw points every epoch, as the published code did (comparison only)")
    g.add_argument("--annotation-seed", type=int, default=d.annotation_seed)
    g.add_argument("--class-weights", default=d.class_weights, help="points, dense, none, or a .pt file")
    g.add_argument("--class-weighting", default=d.class_weighting, choices=list(SCHEMES),
                   help="how class counts become weights (see class_weights.py; default sqrt, from experiment 7; "
                        "inverse = published)")
    g.add_argument("--gamma", type=float, default=d.gamma, help="focal exponent (0 = cross-entropy)")
    g.add_argument("--normalization", default=d.normalization, choices=list(NORMALIZATIONS))
    g = p.add_argument_group("losses on the unlabelled pixels (weak_losses.py; weight 0 = off)")
    g.add_argument("--affinity-weight", type=float, default=d.affinity_weight,
                   help="gated CRF pairwise loss: similar neighbouring colours, same class")
    g.add_argument("--affinity-kernel", type=int, default=d.affinity_kernel, help="window side (odd)")
    g.add_argument("--affinity-dilation", type=int, default=d.affinity_dilation, help="window step in pixels")
    g.add_argument("--affinity-sigma-rgb", type=float, default=d.affinity_sigma_rgb,
                   help="colour bandwidth (image in [0, 1])")
    g.add_argument("--affinity-sigma-xy", type=float, default=d.affinity_sigma_xy,
                   help="spatial bandwidth (processing pixels)")
    g.add_argument("--consistency-weight", type=float, default=d.consistency_weight,
                   help="FixMatch-style consistency between the batch and a jittered, rotated/flipped view")
    g.add_argument("--consistency-threshold", type=float, default=d.consistency_threshold,
                   help="pseudo-labels only where the softmax max reaches this")
    g = p.add_argument_group("rounds inside the run (few_clicks.py; 0 = off)")
    g.add_argument("--self-training", type=int, default=d.self_training,
                   help="R rounds: the model's confident pixels become pseudo-labels (clicks always win)")
    g.add_argument("--pseudo-threshold", type=float, default=d.pseudo_threshold,
                   help="softmax max a pixel needs to become a pseudo-label")
    g.add_argument("--rounds", type=int, default=d.rounds,
                   help="R rounds of new clicks the model chooses, revealed from the dense labels (simulated)")
    g.add_argument("--clicks-per-round", type=int, default=d.clicks_per_round, help="K new clicks per image")
    g.add_argument("--click-strategy", default=d.click_strategy, choices=list(few_clicks.CLICK_STRATEGIES),
                   help="uncertain: smallest margin between the two top classes first; random: the baseline")
    g.add_argument("--click-spacing", type=float, default=d.click_spacing,
                   help="least distance between the new clicks of a round (processing pixels)")
    g.add_argument("--region-growing", action="store_true",
                   help="a click labels its SLIC superpixel (where that superpixel's clicks agree on a class)")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--arch", default=d.arch, choices=list(ARCHS), help="tiny: a 3-layer stand-in for smoke runs")
    g.add_argument("--decoder", default=d.decoder, choices=list(DECODERS), help="plain = published")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="random encoder init (offline); default: ImageNet weights through torchvision")
    g.add_argument("--size", type=int, default=d.size,
                   help="processing size of the first training image's longer side (default 150: 300 -> 150)")
    g.add_argument("--scale", type=float, default=None,
                   help="processing pixels per image pixel, e.g. 0.5 (overrides --size; for mixed image sizes)")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--step-size", type=int, default=d.step_size, help="StepLR step (epochs)")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="StepLR factor")
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers (--loader dataloader)")
    g.add_argument("--loader", default=d.loader, choices=list(LOADERS),
                   help="auto: batches from uint8 tensors cached on the device (resident.py) unless points are "
                        "redrawn every epoch or the data do not fit; dataloader: the per-item DataLoader")
    g.add_argument("--out", default=d.out, help="folder for checkpoints, history and figures of this run")
    g.add_argument("--no-figures", dest="figures", action="store_false", help="no output.png / results.png")
    g.add_argument("--exclude", default="", help="classes left out of the means, e.g. clutter")
    g.add_argument("--resume", action="store_true", help="continue from <out>/last.pth (same settings)")
    g.add_argument("--overwrite", action="store_true", help="replace the checkpoints a folder holds")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(args):
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    kw["points"] = parse_points(args.points)
    try:
        kw["bands"] = [int(b) for b in args.bands.split(",")] if args.bands else None
    except ValueError:
        raise ValueError(f"--bands takes comma-separated band indices like 0,1,2,3; got {args.bands!r}") from None
    kw["exclude"] = tuple(c for c in args.exclude.split(",") if c)
    return TrainConfig(**kw)


def main(args):
    """Returns the exit code: 0 trained, 1 training failed (diverged), 2 a user error (nothing trained)."""
    try:
        history = train(config_from_args(args))
        best = max(history, key=lambda h: h["val_miou"]) if history else None
        if best:  # under torchrun rank 0 alone prints (distributed.init_from_env)
            print(f"best val mIoU {best['val_miou']:.3f} (OA {best['val_oa']:.3f}) at epoch {best['epoch']}")
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, CheckpointError, OSError, RuntimeError) as e:  # RuntimeError: weights
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()  # under torchrun: leave the process group (no-op in one process)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
