"""Train a segmentation model from point annotations (simulated, or a person's clicks) and validate it.

    python train.py --data archive/patches --points 20000 --class-weights points --decoder skip --epochs 100
    python train.py --data demo_data/patches --no-pretrained --epochs 5      # synthetic demo, random init
    python train.py --data archive/patches --points 1/object --affinity-weight 1 --consistency-weight 1   # clicks
    python train.py --data archive/patches --points 10 --rounds 3 --clicks-per-round 10   # model-chosen clicks
    python train.py --images tiles/ --clicks clicks.gpkg --classes classes.json   # a person's clicks, no labels

Per epoch: one log line (loss, OA and mIoU on the training points, val loss on the val points, val OA / mIoU
on the dense val labels, lr, seconds). With --clicks (annotations.read_clicks: GIS layers, CSV, Label Studio,
CVAT) a person's clicks replace the simulated points of the training images; without dense labels (--images
alone) --val-clicks of them are held out, spatially blocked, and validation reports accuracy, per-class recall
and mIoU over the held-out clicks with 95 % intervals (annotations.click_metrics), marked "held-out clicks" in
the log, the history and the figures; the best model is then the best on them (see docs/clicks.md).
Keeps `<out>/best_model.pth` (best val mIoU) and `<out>/last.pth` (with optimizer state, for --resume),
`<out>/history.json`, and draws `<out>/output.png` (curves) and `<out>/results.png` (image | ground truth |
points | prediction). A run never replaces another run's checkpoints: a folder that holds some needs --resume (same
settings) or --overwrite; only a rerun with exactly the same settings replaces them by itself.
"""

import argparse
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import distributed
import few_clicks
from annotations import (POINT, ClickSet, ImageClicks, check_unclicked, click_metrics, read_clicks, split_clicks,
                         split_clicks_by_images, write_clicks)
from assess import design_path
from config import (MAX_VALIDATIONS, MIN_STEPS, RESUMABLE, STEP_PASSES, TrainConfig, add_arguments, annotation_of,
                    check_config, config_dict, config_from_args, dense_labels, rounds_problems, schedule_factor)
from config import WEIGHT_SOURCES as CLASS_WEIGHT_SOURCES
from checkpoint import (PROGRESS_FILE, CheckpointError, LastCheckpoint, Progress, load_model, read_checkpoint,
                        save_checkpoint)
from class_weights import compute_class_weights, count_classes, load_class_weights, pixel_shares, save_class_weights
from dataset import (PUBLISHED_TRAIN_IDS, PUBLISHED_VAL_IDS, SegmentationDataset, available_ids,
                     clicks_per_object, folder_pairs, load_split, pad_collate, patch_pairs, read_label)
from metrics import ConfusionMatrix
from model import build_model, condition_on_clicks, resolve_device
from partial_ce_loss import PartialCrossEntropyLoss
from predict import plot_history, plot_results
from pretrain import apply_encoder
from raster import clean_stale_temporaries, open_image
from resident import (ResidentLoader, choose_path, estimate_bytes, find_cache, load_or_build, memory_budget,
                      seed_dataset)
from spec import IGNORE_INDEX, POTSDAM, load_class_file
from spec import fit_spec as spec_fitted
from weak_losses import AffinityLoss, ConsistencyLoss, valid_pixels


# --------------------------------------------------------------------------- checks

MIN_GRID = 4  # processing pixels a side an image needs (the tiny network halves it twice)
VAL_CLICKS = 0.2  # share of the clicks held out for validation when there are no dense labels (--val-clicks)
CLICK_VAL = "held-out clicks"  # what validation is on without dense labels, in every log line, history entry, figure
CLICK_SCOPE = "the kind of pixels that were clicked, not the map"  # what a held-out-click score covers
NOT_A_SAMPLE = ("a person's clicks are not a probability sample of the map: scores on held-out clicks cover {scope}, "
                "and no estimate from them can say how good the map is or how large each class is. Assess the map "
                "with a sample drawn from it: python assess.py sample (docs/assessment.md)")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or weights); the message says what to change."""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_device(cfg):
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
    return spec_fitted([p[1] for p in train_pairs], load_class_file(cfg.classes) if cfg.classes else POTSDAM,
                       tuple(cfg.bands) if cfg.bands is not None else None, cfg.scale, cfg.size)


def split_pairs(cfg):
    """(train pairs, val pairs, description): resolve_split cut to --max-train / --max-val. Reads no image."""
    train_pairs, val_pairs, how = resolve_split(cfg)
    if cfg.max_train or cfg.max_val:
        train_pairs, val_pairs = train_pairs[: cfg.max_train], val_pairs[: cfg.max_val]
        how += f", first {len(train_pairs)} / {len(val_pairs)} used"
    return train_pairs, val_pairs, how


def read_run_clicks(cfg):
    """The ClickSet of --clicks over the run's images (--images, or the patch folder's Images/), None without
    --clicks. Read before anything is written: a bad file raises (ValueError / FileNotFoundError naming it), and
    so does a class nobody clicked, unless --allow-unclicked."""
    if not cfg.clicks:
        return None
    if design_path(cfg.clicks).is_file():
        raise ValueError(f"{cfg.clicks} is an assessment sample ({design_path(cfg.clicks).name} beside it): its points "
                         f"measure the map and never train a model; train on your clicks, assess with the sample")
    classes = load_class_file(cfg.classes) if cfg.classes else POTSDAM
    images = cfg.images or sorted((Path(cfg.data) / "Images").glob("Image_*.tif"))
    clicks = read_clicks(cfg.clicks, images, classes, class_field=cfg.class_field, line_width=cfg.line_width)
    for note in clicks.notes:
        print(f"note: {note}", flush=True)
    if not cfg.allow_unclicked:
        check_unclicked(clicks)
    return clicks


def read_init(cfg):
    """The checkpoint of --init (None without it), its classes checked against this run's."""
    if not cfg.init:
        return None
    ck = read_checkpoint(cfg.init)
    classes = load_class_file(cfg.classes) if cfg.classes else POTSDAM
    if tuple(ck.spec.classes.names) != tuple(classes.names):
        raise ValueError(f"--init {cfg.init} was trained on the classes {list(ck.spec.classes.names)}, this run has "
                         f"{list(classes.names)}; give the class file it was trained with (--classes)")
    return ck


def build_datasets(cfg, spec=None, clicks=None):
    """(train dataset, val dataset, split description, spec). The spec is fitted on the training images
    unless given (a resumed run reuses its checkpoint's). With --clicks (`clicks`: their ClickSet, read here when
    not given) the training images' clicks replace the drawn points; without dense labels see click_datasets."""
    if cfg.clicks and clicks is None:
        clicks = read_run_clicks(cfg)
    if cfg.clicks and not dense_labels(cfg):
        return click_datasets(cfg, spec, clicks)
    train_pairs, val_pairs, how = split_pairs(cfg)
    spec = spec or fit_spec(cfg, train_pairs)
    common = dict(spec=spec, points=cfg.points, strategy=cfg.strategy, seed=cfg.annotation_seed)
    train_ds = SegmentationDataset(train_pairs, resample_each_epoch=cfg.resample_each_epoch,
                                   augment=cfg.augment, clicks=clicks.images if clicks else None, **common)
    val_ds = SegmentationDataset(val_pairs, **common)  # dense labels score; val loss on drawn points as always
    if clicks:
        train_stems = {Path(p[1]).stem for p in train_pairs}
        elsewhere = sum(len(c) for n, c in clicks.images.items() if n not in train_stems)
        how += f"; clicks from {cfg.clicks}" + (f" ({elsewhere} on images outside the training set, unused)"
                                                 if elsewhere else "")
    return train_ds, val_ds, how, spec


def click_datasets(cfg, spec, clicks):
    """Images without labels: (train dataset, val dataset, description, spec), both holding clicks only. A share
    --val-clicks (default VAL_CLICKS) of the clicks is held out, spatially blocked (annotations.split_clicks: whole
    images, or blocks of each image when few are clicked; seed --annotation-seed). The training dataset holds the
    images with training clicks, the val dataset those with held-out clicks (as `clicks`, what click_validation
    scores); their dense labels are all undefined, so nothing dense ever scores."""
    if cfg.split:  # the data set's own split: the clicks on its val images are held out
        s = load_split(cfg.split)
        train_clicks, held = split_clicks_by_images(clicks, s["train"], s["val"], cfg.split)
    else:
        fraction = cfg.val_clicks if cfg.val_clicks is not None else VAL_CLICKS
        train_clicks, held = split_clicks(clicks, fraction, seed=cfg.annotation_seed)
        beside = Path(cfg.images).parent / "split.json"
        if beside.is_file():
            print(f"note: {beside} is not used: the held-out clicks are drawn from every image, its val images "
                  f"among them; pass --split {beside} to hold out the clicks on its val images instead", flush=True)
    train_pairs = [(n, c.image.path, None) for n, c in train_clicks.images.items() if len(c)]
    val_pairs = [(n, c.image.path, None) for n, c in held.images.items() if len(c)]
    how = f"validation on {CLICK_VAL}: {held.notes[-1]}"
    if cfg.max_train or cfg.max_val:
        train_pairs, val_pairs = train_pairs[: cfg.max_train], val_pairs[: cfg.max_val]
        how += f", first {len(train_pairs)} / {len(val_pairs)} images used"
    spec = spec or fit_spec(cfg, train_pairs)
    train_ds = SegmentationDataset(train_pairs, spec=spec, points=cfg.points, seed=cfg.annotation_seed,
                                   augment=cfg.augment, clicks=train_clicks.images)
    val_ds = SegmentationDataset(val_pairs, spec=spec, points=cfg.points, seed=cfg.annotation_seed,
                                 clicks={p[0]: held.images[p[0]] for p in val_pairs})
    return train_ds, val_ds, how, spec


def export_clicks(path, train_ds):
    """Write the clicks the training images hold now (a person's or the drawn ones; native pixels, each with its
    class) to `path` with annotations.write_clicks: .gpkg/.geojson in map coordinates where the images have them,
    .csv in pixels. `train.py --clicks path` reads them back as the same clicks."""
    images = {}
    for i in range(len(train_ds)):
        given = train_ds.given_clicks(i)
        if given is not None:
            images[given.image.name] = given
            continue
        flat = train_ds.click_pixels(i)
        native = train_ds.native_label(i)
        rows, cols = np.divmod(flat, native.shape[1])
        ref = open_image(train_ds.pairs[i][1])
        images[ref.name] = ImageClicks(ref, rows, cols, native.reshape(-1)[flat], POINT)
    write_clicks(path, ClickSet(images, train_ds.classes, str(path)))
    n = sum(len(c) for c in images.values())
    print(f"clicks: wrote the {n} clicks of the {len(train_ds)} training images to {path}", flush=True)


def click_validation(model, val_ds, device, exclude=(), batch_size=16):
    """Accuracy, per-class recall and mIoU (with 95 % intervals) over the held-out clicks of a val dataset made by
    click_datasets: the model predicts each val image at processing resolution (few_clicks.predict) and is
    scored at the clicks (annotations.click_metrics)."""
    held = ClickSet(dict(val_ds.clicks), val_ds.classes, CLICK_VAL)
    predictions = {Path(val_ds.pairs[i][1]).stem: prob.argmax(0)
                   for i, prob in few_clicks.predict(model, val_ds, device, batch_size)}
    m = click_metrics(predictions, held, exclude=exclude)
    return {"kind": CLICK_VAL, "oa": m["accuracy"], "oa_ci": list(m["accuracy_ci"]), "miou": m["miou"],
            "miou_ci": list(m["miou_ci"]), "iou": m["iou"], "recall": m["recall"],
            "recall_ci": {n: list(v) for n, v in m["recall_ci"].items()}, "clicks": m["clicks"],
            "support": m["support"]}


def percent(share):
    """A share as '97 %', with the digits it takes not to read as all or none when it is neither: 0.9996 is
    '99.96 %', never '100 %'."""
    for digits in range(5):
        text = f"{100 * share:.{digits}f}"
        if not (0 < share < 1 and float(text) in (0.0, 100.0)):
            return f"{text} %"
    return f"{100 * share:g} %"


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
    unknown = set(cfg.exclude) - set(names)
    if unknown:
        raise ValueError(f"--exclude names unknown classes {sorted(unknown)}; the classes are {list(names)}")
    if set(names) <= set(cfg.exclude):
        raise ValueError(f"--exclude leaves no class to measure (the classes are {list(names)}): every mean would "
                         f"be nan. Exclude fewer classes")
    small = [(train_ds.pairs[i][1], train_ds.dense_label(i).shape) for i in range(len(train_ds))
             if min(train_ds.dense_label(i).shape) < MIN_GRID]
    if small:
        raise ValueError(f"scale {train_ds.spec.scale:g} leaves {len(small)} training images at fewer than {MIN_GRID} "
                         f"processing pixels a side ({small[0][0]}: {small[0][1][1]}x{small[0][1][0]}); raise --scale "
                         f"or --size")
    missing = [names[c] for c in np.flatnonzero(seen == 0)]
    if missing:
        hint = ""
        spec = train_ds.classes
        if not train_ds.has_labels:
            undefined = 0  # no labels: every label pixel is undefined, which says nothing
            if not dense_labels(cfg):
                hint = " Some classes may have clicks in the held-out images only (--val-clicks)."
        if undefined and spec.label_format == "index" and spec.ignore_value is not None:
            in_files = sum(int((read_label(p[2], spec) == IGNORE_INDEX).sum()) for p in train_ds.pairs)  # error path
            if in_files:
                hint = (f" The training label files hold the ignore value {spec.ignore_value} in {in_files} pixels: "
                        f"if that value is a class (a 0/255 mask), map it with "
                        f'"value_map": {{"0": 0, "{spec.ignore_value}": 1}} in the class file.')
        if undefined and not hint:
            hint = (f" {percent(undefined / total)} of the training pixels are undefined: nodata, NaN or infinite "
                    f"in the images, or undefined in the labels; none of them is ever a target.")
        counts = ", ".join(f"{n} {c}" for n, c in zip(names, seen.tolist()))
        if cfg.allow_unclicked:
            print(f"warning: classes {missing} have no labelled point in the {len(train_ds)} training images "
                  f"(labelled pixels per class: {counts}); training without them (--allow-unclicked): the model "
                  f"never predicts them", flush=True)
        else:
            source = f"clicks {cfg.clicks}" if cfg.clicks else f"points {cfg.points}"
            raise ValueError(f"classes {missing} have no labelled point in the {len(train_ds)} training images "
                             f"({source}; labelled pixels per class: {counts}); the model could never "
                             f"learn them. Add clicks of those classes, fix the labels or the class file, or train "
                             f"without them with --allow-unclicked.{hint}")
    if undefined > total / 2 and train_ds.has_labels:
        print(f"warning: {percent(undefined / total)} of the training label pixels are undefined", flush=True)
    if not val_ds.has_labels:  # validation on held-out clicks (click_datasets)
        if not sum(len(c) for c in (val_ds.clicks or {}).values()):
            raise ValueError(f"the {len(val_ds)} validation images hold no held-out click: nothing to measure on")
        return
    labelled = sum(int((val_ds.dense_label(i) != IGNORE_INDEX).sum()) for i in range(len(val_ds)))
    if labelled == 0:
        raise ValueError(f"the {len(val_ds)} validation images have no labelled pixel: mIoU cannot be measured. "
                         f"Choose other val images (--split) or fix their labels")


def class_weight_tensor(cfg, train_ds, out_dir):
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights in CLASS_WEIGHT_SOURCES:
        w, counts, shares = compute_class_weights(train_ds, cfg.class_weights, cfg.class_weighting, cfg.seed)
        save_class_weights(out_dir / "class_weights.pt", w, counts, cfg.class_weights, train_ds.classes.names,
                           cfg.class_weighting, shares)
        return w
    return load_class_weights(cfg.class_weights, train_ds.classes.names)


def map_prior(cfg, train_ds, weights):
    """--prior: None, or the prior the saved model predicts a map under: {"train": the class prior of its weighted
    loss (labelled training pixels per class, grown labels included, times the class weights), "map": the class
    shares the clicks imply (class_weights.pixel_shares: a forest on the clicks and EM), "source"}. For a person's
    clicks (--clicks): their class shares are not the map's. Not for simulated k/object clicks: on the synthetic
    scenes the forest's estimate lost a class there (docs/training.md#the-prior-of-a-persons-clicks)."""
    if cfg.prior == "off" or not cfg.clicks:
        return None
    shares, _ = pixel_shares(train_ds, cfg.seed)
    labelled = count_classes(train_ds, "points").astype(np.float64)
    trained = labelled * (weights.double().numpy() if weights is not None else 1.0)
    if (trained <= 0).any():  # a class nobody clicked (--allow-unclicked): no prior to correct from
        return None
    names = train_ds.classes.names
    print("prior: the saved model predicts under the class shares the clicks imply, " +
          ", ".join(f"{n} {p:.1%}" for n, p in zip(names, shares)) + " (trained under " +
          ", ".join(f"{n} {p:.1%}" for n, p in zip(names, trained / trained.sum())) + "; --prior off: as trained)",
          flush=True)
    return {"train": (trained / trained.sum()).tolist(), "map": [float(x) for x in shares],
            "source": "the class shares the training clicks imply (forest + EM, Saerens et al. 2002)"}


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


def cache_folder(cfg):
    """Where the resident caches of a run live: --cache-dir, else the run's own folder (never the data's)."""
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / ".resident-cache"


def make_loaders(cfg, train_ds, val_ds, device, gen, ctx=None, cached=None, draws=0):
    """(train loader, val loader). Batches gathered on the device from cached uint8 tensors (resident.py) when
    the points are fixed and the data fit (--loader auto), else the per-item DataLoader; one line says which.
    `cached`: what train() found of the two caches, ((data, where) or None, (data, where) or None); None: not
    looked for yet. The memory the tensors need is a hit's own size, else resident.estimate_bytes (every
    sample's size, from the samples check_data decoded). Under torchrun (`ctx`, distributed.Context) each
    loader yields this rank's share of every global batch: the one place the data are sharded. `draws` > 0
    (plan_steps): each training pass is that many batches drawn with replacement, of --crop windows."""
    rank, world = (ctx.rank, ctx.world) if ctx is not None else (0, 1)
    hits = cached if cached is not None else (None, None)
    need = sum(hit[0].nbytes if hit else estimate_bytes(ds) for ds, hit in zip((train_ds, val_ds), hits)) \
        if cfg.loader != "dataloader" else 0
    path, why = choose_path(cfg.loader, cfg.resample_each_epoch, need, memory_budget(device))
    if draws and path != "resident":
        raise ValueError(f"--crop and --steps draw batches from tensors held in memory, and the data do not fit "
                         f"({why}); train on fewer or smaller images (--max-train, --scale)")
    drop_last = len(train_ds) > cfg.batch_size
    if path == "resident":
        annotation = annotation_of(cfg)
        (tr, tr_where), (va, va_where) = (hit or load_or_build(ds, annotation, cache_folder(cfg), part,
                                                               look=cached is None, prune=not cfg.cache_dir)
                                          for ds, hit, part in zip((train_ds, val_ds), hits, ("train", "val")))
        fast = device.type == "cuda"  # channels_last pays on GPUs only
        train_loader = ResidentLoader(tr.to(device), cfg.batch_size, shuffle=True, drop_last=drop_last,
                                      generator=gen, augment=cfg.augment, channels_last=fast, rank=rank,
                                      world_size=world, follow=train_ds,  # rounds change train_ds's annotation
                                      draws=draws, crop=cfg.crop)
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


def steps_per_epoch(n_train, batch_size):
    """Optimizer steps in one epoch: whole batches (the last partial one dropped) when there is more than one."""
    return n_train // batch_size if n_train > batch_size else 1


def step_budget(pass_steps, passes=STEP_PASSES, least=MIN_STEPS):
    """--steps auto: `passes` passes over the training pixels (`pass_steps` optimizer steps each), and at least
    `least` steps, so a small set (24 patches: 3 steps a pass) still trains long enough to settle."""
    return max(least, passes * pass_steps)


def plan_steps(cfg, sizes):
    """How a run is sized: {"epochs", "per_epoch" (optimizer steps between validations), "draws" (batches of a
    pass drawn with replacement, 0 = each image once), "total", "text" (for the log; None for plain epochs)}.
    `sizes`: (h, w) of every training image on the processing grid. Plain --epochs: every image once an epoch.
    --crop: a pass is as many batches of crop x crop windows as cover the training pixels once. --steps N / auto
    (step_budget): validation every --val-every steps (default: one pass, but at most MAX_VALIDATIONS in the run),
    the run rounded up to whole validations."""
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    window = min(cfg.crop, h) * min(cfg.crop, w) if cfg.crop else h * w
    if cfg.crop:
        pass_steps = max(1, math.ceil(sum(a * b for a, b in sizes) / (window * cfg.batch_size)))
    else:
        pass_steps = steps_per_epoch(len(sizes), cfg.batch_size)
    what = f"random {min(cfg.crop, h)}x{min(cfg.crop, w)} windows" if cfg.crop else "whole images"
    if cfg.steps is None:
        text = f"{cfg.epochs} epochs of {pass_steps} batches of {what} ({cfg.epochs * pass_steps} steps)" \
            if cfg.crop else None
        return {"epochs": cfg.epochs, "per_epoch": pass_steps, "draws": pass_steps if cfg.crop else 0,
                "total": cfg.epochs * pass_steps, "text": text}
    steps = step_budget(pass_steps) if cfg.steps == "auto" else cfg.steps
    per = min(cfg.val_every or max(pass_steps, math.ceil(steps / MAX_VALIDATIONS)), steps)
    epochs = math.ceil(steps / per)
    seen = epochs * per * cfg.batch_size * (window if cfg.crop else 1)  # pixels (or images) the batches hold
    passes = seen / (sum(a * b for a, b in sizes) if cfg.crop else len(sizes))
    how = f"auto: {STEP_PASSES} passes, at least {MIN_STEPS} steps; " if cfg.steps == "auto" else ""
    text = (f"{epochs * per} optimizer steps ({how}batches of {what} drawn with replacement: about {passes:.0f} "
            f"passes over the training {'pixels' if cfg.crop else 'images'}), validation every {per} steps")
    return {"epochs": epochs, "per_epoch": per, "draws": per, "total": epochs * per, "text": text}


def make_scheduler(cfg, optimizer, steps):
    """(scheduler, per_step). `step`: StepLR, stepped once an epoch (the published schedule). `cosine` / `poly`:
    a factor of --lr per optimizer step, `steps` a epoch for --epochs: a linear warm-up over --warmup steps, then
    down to 0 at the last step (half a cosine, or (1 - t) ** 0.9)."""
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.lr_gamma), False
    factor = schedule_factor(cfg.schedule, cfg.warmup, max(1, cfg.epochs * steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True


PLATEAU_EPOCHS, PLATEAU_GAIN = 5, 0.005  # "stopped improving": no val mIoU gain of 0.005 in the last 5 epochs


def plateau(history, epochs=PLATEAU_EPOCHS, gain=PLATEAU_GAIN, warmup=0):
    """The epoch of the best val mIoU before the last `epochs` epochs of history, when none of those beat it by
    `gain` or more (the validation curve has stopped improving); None while it still improves. Validations at
    or before optimizer step `warmup` are not judged: an untrained model's score (all-background, often high) is
    no level to beat."""
    history = [h for h in history if h.get("step", h["epoch"]) > warmup]
    if len(history) <= epochs:
        return None
    best = max(history[:-epochs], key=lambda h: h["val_miou"])
    if max(h["val_miou"] for h in history[-epochs:]) >= best["val_miou"] + gain:
        return None
    return best["epoch"]


def run_epoch(model, loader, criterion, device, optimizer=None, amp=False, progress=True, desc="", extra=None,
              names=None, scheduler=None, clicks=None):
    """Train (optimizer given) or evaluate over a loader (a DataLoader or a resident.ResidentLoader). Returns
    (mean loss, points confusion matrix, dense confusion matrix or None, {name: mean} of the `extra` terms).
    Dense labels are only looked at when evaluating. `extra` ({name: (weight, fn)}, see weak_terms) adds
    weight x fn(...) to the loss when training; the mean loss stays the partial CE alone. A non-finite loss
    (extras included) stops training (TrainingError) before the step that would spread it into the weights.
    Sums and confusion matrices stay on the device: evaluating waits for it once, at the end. `scheduler`: a
    per-step learning-rate schedule (make_scheduler), stepped after every optimizer step. `clicks` (model.ClickDraw,
    --click-input): some points of each batch go in as click planes; the loss and train scores count the others."""
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
            x, y = batch["image"].to(device, non_blocking=True), batch["points"].to(device, non_blocking=True)
            xin, y = clicks(x, y) if clicks else (x, y)  # the weak losses below see the image bands alone
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(xin)
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
                if scheduler is not None:  # a per-step schedule (make_scheduler)
                    scheduler.step()
            pred = logits.argmax(1)
            cm_points.update(pred, y)
            if cm_dense is not None:
                cm_dense.update(pred, batch["label"])
            total += value * x.shape[0]
            n += x.shape[0]
    mean = float(total) / max(n, 1)
    _check_finite(mean, desc, "of this epoch")
    return mean, cm_points, cm_dense, {name: float(v) / max(n, 1) for name, v in extra_sums.items()}


def _ci(value, interval):
    """'0.812 [0.741, 0.868]': a value with its 95 % interval."""
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _check_finite(loss_value, desc, ids):
    if not math.isfinite(loss_value):
        raise TrainingError(f"{desc}: the loss is {loss_value} (images {ids[:4] if isinstance(ids, list) else ids}): "
                            f"training diverged, the learning rate is probably too high; nothing was saved from "
                            f"this epoch. Lower --lr and start again")


# --------------------------------------------------------------------------- training

def comparable_config(config):
    """The settings that decide what is trained; a field an older checkpoint lacks counts as its default."""
    defaults = config_dict(TrainConfig())
    return {k: config.get(k, defaults.get(k)) for k in set(config) | set(defaults) if k not in RESUMABLE}


def prepare_out(cfg, out_dir, say=True):
    """Refuse to replace another run's checkpoints; with --resume, the settings must be the same. Returns the
    checkpoint to resume from (or None). `say`: print that a rerun replaces its own checkpoints."""
    last_path = out_dir / "last.pth"
    if cfg.resume:
        if not last_path.is_file():
            raise ValueError(f"--resume: {out_dir} holds no last.pth to continue from; give the --out of the run to "
                             f"continue, or start it without --resume")
        ck = read_checkpoint(last_path)
        old, new = comparable_config(ck.config), comparable_config(config_dict(cfg))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise ValueError(f"{last_path} was trained with other settings ({shown}); resume with the same "
                             f"settings (only {', '.join(RESUMABLE[:4])}, ... may change) or train into a new --out")
        if ck.train_state is None:
            raise ValueError(f"{last_path} holds no training state to resume from")
        if cfg.steps is not None:  # the same --steps and data give the same epochs (steps is compared above)
            return ck
        if few_clicks.placed_by_epochs(cfg) and ck.config.get("epochs") != cfg.epochs:  # rounds placed by --epochs
            raise ValueError(f"{last_path} was trained with few-clicks rounds placed over {ck.config.get('epochs')} "
                             f"epochs; resume it with --epochs {ck.config.get('epochs')} (more epochs would move the "
                             f"rounds still ahead and change how many run), or train into a new --out")
        if cfg.schedule != "step" and ck.config.get("epochs") != cfg.epochs:  # the decay ends at the last epoch
            raise ValueError(f"{last_path} was trained with a {cfg.schedule} schedule ending after "
                             f"{ck.config.get('epochs')} epochs; resume it with --epochs {ck.config.get('epochs')}, or "
                             f"train into a new --out")
        return ck
    taken = [p.name for p in (out_dir / "best_model.pth", last_path) if p.is_file()]
    if taken and not cfg.overwrite and _same_run(cfg, last_path):
        if say:
            print(f"{out_dir} holds the checkpoints of a run with the same settings: they are replaced by this rerun")
        return None
    if taken and not cfg.overwrite:
        raise ValueError(f"{out_dir} already holds another run's {' and '.join(taken)}; continue it with --resume, "
                         f"start afresh with --overwrite (they are replaced), or choose another --out")
    return None


def claim_out(out_dir):
    """Hold `<out>/run.lock` (an flock, with this run's pid, host, start time and command) for the run's lifetime,
    so that a second run started into the same folder stops before it checks or writes anything, instead of
    both passing the checkpoint check and mixing their files. The kernel drops the lock when the process ends
    (kill -9 included), so a dead run never blocks the folder. Returns the open lock file (keep it)."""
    import fcntl
    import os
    import socket
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / "run.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{out_dir} is in use by another run ({holder}); wait for it to end or choose another "
                         f"--out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{' '.join(sys.argv)[:300]}\n")
    f.flush()
    return f


def _same_run(cfg, last_path):
    """True when last_path was written by a run with exactly these settings (a rerun loses nothing)."""
    try:
        old = read_checkpoint(last_path).config
    except (FileNotFoundError, CheckpointError):
        return False
    return comparable_config(old) == comparable_config(config_dict(cfg))


def unit_at(cfg, plan, epoch):
    """'step N' in a --steps run (an epoch is then a validation), else 'epoch N'."""
    return f"step {epoch * plan['per_epoch']}" if cfg.steps is not None else f"epoch {epoch}"


class Run:
    """One training run as it goes, filled in by train()'s steps: the settings (`cfg`, with --steps and --sparse
    resolved; `asked`, what the user asked, which the checkpoints record), the data, the model and its optimisation,
    and what the run writes (`last`, `progress`, `claim`)."""

    def __init__(self, cfg, ctx, out_dir):
        self.cfg, self.asked, self.ctx, self.out_dir = cfg, cfg, ctx, out_dir
        self.claim = self.last = self.progress = None
        self.best_path = out_dir / "best_model.pth"
        self.history, self.best, self.start = [], -math.inf, 1


def train(cfg):
    """Train as configured; returns the history (one dict per epoch)."""
    check_config(cfg)
    check_device(cfg)
    ctx = distributed.init_from_env(cfg.device)  # under torchrun: this rank and its device; else one process
    if cfg.batch_size % ctx.world:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {ctx.world} processes: the global "
                         f"batch is shared out equally, so give a multiple of {ctx.world}")
    seed_everything(cfg.seed)  # the same on every rank: the same model init (DDP broadcasts rank 0's anyway)
    out_dir = Path(cfg.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder; name a folder for this run's checkpoints")
    clicks = read_run_clicks(cfg)  # a bad click file stops here, before anything is written
    fresh, done = not out_dir.exists(), False
    run = Run(cfg, ctx, out_dir)
    try:
        set_up_data(run, clicks)
        set_up_model(run)
        set_up_optimisation(run)
        for epoch in range(run.start, run.cfg.epochs + 1):
            train_block(run, epoch)
        finish(run)
        done = True
        return run.history
    except KeyboardInterrupt:  # Ctrl-C: the last validated state is kept, so --resume loses nothing more
        if run.last is not None and run.last.flush():
            print(f"\ninterrupted: {run.last.path} holds epoch {run.last.epoch}; continue with --resume", flush=True)
        raise
    finally:
        if run.progress is not None:
            run.progress.close("done" if done else "interrupted" if isinstance(sys.exc_info()[1], KeyboardInterrupt)
                               else "failed")
        if run.claim is not None:
            run.claim.close()
            if not done and fresh and [p.name for p in out_dir.iterdir()] == ["run.lock"]:  # failed before writing
                (out_dir / "run.lock").unlink()
                out_dir.rmdir()


def set_up_data(run, clicks):
    """The data sets (from their resident caches when these exist) and their checks; the checkpoint to resume."""
    cfg, out_dir = run.cfg, run.out_dir
    run.resumed = prepare_out(cfg, out_dir)
    run.init = read_init(cfg)
    given = run.resumed.spec if run.resumed else run.init.spec if run.init else None  # else fitted on the data
    run.train_ds, run.val_ds, run.how, run.spec = build_datasets(cfg, given, clicks)
    run.on_clicks = not run.val_ds.has_labels  # validation on held-out clicks
    run.by_last = cfg.select == "last" or cfg.select == "auto" and run.on_clicks  # best_model.pth: the last model
    run.split = split = {"train": [str(i) for i in run.train_ds.ids], "val": [str(i) for i in run.val_ds.ids]}
    if run.resumed and run.resumed.train_state.get("split", split) != split:
        old = run.resumed.train_state["split"]
        moved = {part: sorted(set(split[part]) ^ set(old[part]))[:5] for part in ("train", "val")}
        raise ValueError(f"{out_dir / 'last.pth'} was trained on another split ({run.how} now; images that moved: "
                         f"train {moved['train']}, val {moved['val']}): the data folder changed since. Resuming "
                         f"would train on former val images and compare best models over other val sets; restore "
                         f"the folder, pin the split with --split, or train into a new --out")
    run.cached = None  # the resident caches, looked for first: a hit seeds the datasets, so nothing below decodes
    if cfg.loader != "dataloader" and not cfg.resample_each_epoch:  # choose_path's first rules; it decides the rest
        annotation = annotation_of(cfg)
        run.cached = tuple(find_cache(ds, annotation, cache_folder(cfg), part)
                           for ds, part in zip((run.train_ds, run.val_ds), ("train", "val")))
        for ds, hit in zip((run.train_ds, run.val_ds), run.cached):
            if hit:
                seed_dataset(ds, hit[0])
    check_data(cfg, run.train_ds, run.val_ds)
    if len(run.train_ds) < run.ctx.world:
        raise ValueError(f"{len(run.train_ds)} training images cannot feed {run.ctx.world} processes; use fewer "
                         f"processes")


def set_up_model(run):
    """The model; the run's folder claimed (rank 0); the class weights, the budget and what --sparse adds."""
    cfg, ctx, out_dir, train_ds, spec = run.cfg, run.ctx, run.out_dir, run.train_ds, run.spec
    run.model = build_model(cfg.arch, train_ds.classes.num_classes, spec.channels, cfg.decoder,
                            pretrained=cfg.pretrained).to(ctx.device)  # before anything is written: may be missing
    if cfg.encoder:  # pretrain.py's file: every weight but the output layer
        print(apply_encoder(run.model, cfg.encoder, spec.channels, spec.scale), flush=True)
    run.clicks = condition_on_clicks(run.model, cfg.click_input, cfg.click_radius, cfg.click_max, cfg.click_none)
    if run.init is not None:  # a whole model to go on from (read_init checked its classes)
        if run.init.model_args != run.model.model_args:
            raise ValueError(f"--init {cfg.init} holds a {run.init.model_args} model; this run builds "
                             f"{run.model.model_args}: give the same --arch, --decoder and --click-input")
        run.model.load_state_dict(run.init.state_dict)
        print(f"init: the weights and preprocessing contract of {cfg.init} (epoch {run.init.epoch})", flush=True)
    if ctx.is_main:
        run.claim = claim_out(out_dir)  # a run started into the same folder meanwhile stops here ...
        prepare_out(cfg, out_dir, say=False)  # ... and one that finished meanwhile left checkpoints: again
        removed = clean_stale_temporaries(out_dir)  # no other run writes here now
        if removed:
            print(f"removed {len(removed)} temporary files that killed runs left in {out_dir}")
        if cfg.export_clicks:
            export_clicks(cfg.export_clicks, train_ds)
    if ctx.is_main or cfg.class_weights not in CLASS_WEIGHT_SOURCES:
        run.weights = class_weight_tensor(cfg, train_ds, out_dir)  # rank 0 writes class_weights.pt
    else:  # the same numbers (a seeded forest with `pixels`), not written again
        run.weights = compute_class_weights(train_ds, cfg.class_weights, cfg.class_weighting, cfg.seed, say=False)[0]
    run.plan = plan = plan_steps(cfg, [train_ds.dense_label(i).shape for i in range(len(train_ds))])
    if cfg.steps is not None:  # an "epoch" is now the steps between two validations
        cfg = run.asked = replace(cfg, epochs=plan["epochs"])
        for problem in rounds_problems(cfg, plan["epochs"]):
            raise ValueError(f"{problem} (with --steps: the validations, every {plan['per_epoch']} steps)")
    run.labelled = train_ds.annotation_stats()["labelled_fraction"]
    added = few_clicks.sparse_additions(cfg, run.labelled)  # --sparse auto decides again from the data on resume
    if added:
        cfg = replace(cfg, **added)
        print(few_clicks.sparse_note(added, run.labelled), flush=True)
    run.cfg = cfg
    if cfg.clicks or clicks_per_object(cfg.points):  # chosen by a person (or as one would): not a sample
        print(f"note: {NOT_A_SAMPLE.format(scope=CLICK_SCOPE)}"
              + (f". best_model.pth is the run's last model (--select {cfg.select})" if run.by_last else ""),
              flush=True)
    log_start(run)


def log_start(run):
    """What the run trains on, with what, where: the lines a person reads before the first epoch."""
    cfg, train_ds, spec = run.cfg, run.train_ds, run.spec
    stats = train_ds.annotation_stats()
    if cfg.points is None and not cfg.clicks:
        budget = "dense labels"
    else:
        budget = f"clicks from {cfg.clicks}" if cfg.clicks else f"{cfg.points} clicks" \
            if clicks_per_object(cfg.points) else f"{cfg.points} {cfg.strategy} points per image"
        budget += (f" ({stats['clicks_per_image']:.1f} clicks per image, {stats['clicked_fraction']:.3%} of the "
                   f"pixels)")
    init = "ImageNet" if cfg.pretrained and cfg.arch == "resnet18" else "pretrained encoder" if cfg.encoder \
        else "random init"
    print(f"data: {len(train_ds)} train / {len(run.val_ds)} val images ({run.how}); {budget}"
          f"{' redrawn every epoch (published code, comparison only)' if cfg.resample_each_epoch else ''}; "
          f"labelled {stats['labelled_fraction']:.2%} of the training pixels; scale {spec.scale:g}; "
          f"{spec.channels} bands, intensity {spec.intensity.kind}; device {run.ctx.device}; "
          f"{cfg.arch} {init}" + (f"; input clicks: {cfg.click_input} r {cfg.click_radius:g}, up to {cfg.click_max} "
                                  f"an image, none on {cfg.click_none:.0%} of them" if run.clicks else ""), flush=True)
    if run.ctx.world > 1:
        print(f"distributed: {run.ctx.world} processes ({torch.distributed.get_backend()}), "
              f"{cfg.batch_size // run.ctx.world} of each batch of {cfg.batch_size} per process", flush=True)
    if run.weights is not None:
        print(f"class weights ({cfg.class_weights}, {cfg.class_weighting}): " +
              ", ".join(f"{n} {w:.2f}" for n, w in zip(train_ds.classes.names, run.weights.tolist())))
    if run.plan["text"]:
        print(f"budget: {run.plan['text']}", flush=True)


def set_up_optimisation(run):
    """Loss, optimizer and schedule (a resumed run's state put back), the loaders, the few-clicks rounds, DDP, and
    what the run writes as it goes (last.pth, progress.jsonl)."""
    cfg, ctx, device, model = run.cfg, run.ctx, run.ctx.device, run.model
    run.criterion = PartialCrossEntropyLoss(cfg.gamma, run.weights, normalization=cfg.normalization).to(device)
    run.extra = weak_terms(cfg)
    run.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=True if device.type == "cuda" else None)
    run.scheduler, run.per_step = make_scheduler(cfg, run.optimizer, run.plan["per_epoch"])
    run.gen = torch.Generator().manual_seed(cfg.seed)
    run.config = config_dict(run.asked)
    run.last = LastCheckpoint(run.out_dir / "last.pth", model, run.spec, run.config)
    resumed = run.resumed
    if resumed:
        if resumed.model_args != model.model_args:
            raise ValueError(f"{run.last.path} holds a {resumed.model_args} model; this run asks for "
                             f"{model.model_args}: resume with the same settings or a new --out")
        st = resumed.train_state
        model.load_state_dict(resumed.state_dict)
        run.optimizer.load_state_dict(st["optimizer"])
        run.scheduler.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        run.gen.set_state(st["loader_rng"])
        run.history, run.best, run.start = list(st["history"]), st["best_miou"], resumed.epoch + 1
        print(f"resumed from {run.last.path} at epoch {resumed.epoch}")
    run.train_loader, run.val_loader = make_loaders(cfg, run.train_ds, run.val_ds, device, run.gen, ctx, run.cached,
                                                    run.plan["draws"])
    # after the loaders (a resident cache holds the drawn annotation only): grown labels, or a resumed run's rounds
    few_clicks.start(cfg, run.train_ds, resumed.train_state if resumed else None)  # the loaders follow the changes
    run.prior = map_prior(cfg, run.train_ds, run.weights) if ctx.is_main else None  # after growing: its labels count
    run.last.prior = run.prior
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    run.net = distributed.wrap(model, ctx)  # DDP under torchrun: gradients averaged over the ranks
    if ctx.is_main:
        run.progress = Progress(run.out_dir / PROGRESS_FILE, append=resumed is not None,
                                unit="step" if cfg.steps is not None else "epoch", epochs=cfg.epochs,
                                steps=run.plan["total"], per_epoch=run.plan["per_epoch"], start_epoch=run.start)


def train_block(run, epoch):
    """One epoch (with --steps: the steps between two validations): train, validate, log, the few-clicks round
    due, and keep what is to be kept (keep)."""
    cfg, ctx, device, names = run.cfg, run.ctx, run.ctx.device, run.train_ds.classes.names
    t0 = time.time()
    run.train_ds.set_epoch(epoch)
    if ctx.world > 1:  # augmentation draws differ per rank, and a resumed run draws the same again
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, ctx.rank]).generate_state(1)[0]))
    lr = run.optimizer.param_groups[0]["lr"]
    tr_loss, tr_cm, _, tr_extra = run_epoch(run.net, run.train_loader, run.criterion, device, run.optimizer, cfg.amp,
                                            cfg.progress and ctx.is_main, f"epoch {epoch} train", run.extra, names,
                                            run.scheduler if run.per_step else None, run.clicks)
    tr_loss, tr_cm, tr_extra = distributed.reduce_epoch(run.train_loader, tr_loss, tr_cm, tr_extra)
    if not run.per_step:
        run.scheduler.step()
    distributed.sync_buffers(run.model)  # every rank validates rank 0's model, the one saved
    va_loss, _, va_cm, _ = run_epoch(run.model, run.val_loader, run.criterion, device, None, cfg.amp,
                                     cfg.progress and ctx.is_main, f"epoch {epoch} val", names=names)
    va_loss, va_cm, _ = distributed.reduce_epoch(run.val_loader, va_loss, va_cm, {})
    tr = tr_cm.compute(cfg.exclude)
    va, scores, shown = validation_scores(run, va_cm, va_loss)
    h = {"epoch": epoch, "step": epoch * run.plan["per_epoch"], "train_loss": tr_loss, "train_oa": tr["oa"],
         "train_miou": tr["miou"], "val_loss": va_loss, **scores, "lr": lr, "seconds": time.time() - t0}
    h.update({f"train_{name}": v for name, v in tr_extra.items()})  # only the enabled terms
    run.history.append(h)
    improved = va["miou"] > run.best
    star = " *" if improved and not run.by_last else ""  # a new best_model.pth
    terms = "".join(f" {name} {v:.4f}" for name, v in tr_extra.items())
    when = f"step {h['step']:5d}/{run.plan['total']}" if cfg.steps is not None else f"epoch {epoch:3d}/{cfg.epochs}"
    print(f"{when} | loss {tr_loss:.4f}{terms} OA {tr['oa']:.3f} mIoU {tr['miou']:.3f} (train points) | {shown} | "
          f"lr {lr:.2e} | {h['seconds']:.1f}s{star}", flush=True)
    if few_clicks.end_of_epoch(cfg, epoch, run.model, run.train_ds, device):  # a round changed the annotation
        run.labelled = run.train_ds.labelled_fraction()
    h["labelled_fraction"] = run.labelled  # share of training pixels clicked as the epoch ends (rounds add some)
    keep(run, epoch, h, va, improved)


def validation_scores(run, va_cm, va_loss):
    """(metrics, the history's val_* entries, the log's val part): dense, or at the held-out clicks with intervals
    and what they cover."""
    cfg = run.cfg
    if run.on_clicks:
        va = click_validation(run.model, run.val_ds, run.ctx.device, cfg.exclude, cfg.batch_size)
        scores = {"val_kind": va["kind"], "val_scope": CLICK_SCOPE, "val_oa": va["oa"], "val_oa_ci": va["oa_ci"],
                  "val_miou": va["miou"], "val_miou_ci": va["miou_ci"], "val_iou": va["iou"],
                  "val_recall": va["recall"], "val_recall_ci": va["recall_ci"], "val_clicks": va["clicks"]}
        shown = (f"val ({va['clicks']} {CLICK_VAL}: clicked pixels, not the map) loss {va_loss:.4f} accuracy "
                 f"{_ci(va['oa'], va['oa_ci'])} mIoU {_ci(va['miou'], va['miou_ci'])}")
        return va, scores, shown
    va = va_cm.compute(cfg.exclude)
    scores = {"val_oa": va["oa"], "val_miou": va["miou"], "val_mf1": va["mf1"], "val_iou": va["iou"],
              "val_f1": va["f1"]}
    return va, scores, f"val loss {va_loss:.4f} OA {va['oa']:.3f} mIoU {va['miou']:.3f} mF1 {va['mf1']:.3f} (dense)"


def keep(run, epoch, h, va, improved):
    """After a validation (rank 0 writes): best_model.pth (--select), last.pth at its bounded rate, a progress
    line. Non-finite weights are never saved: the run stops (TrainingError)."""
    cfg, final = run.cfg, epoch == run.cfg.epochs
    try:
        if improved:
            run.best = va["miou"]
        if not run.ctx.is_main:
            return
        if improved and not run.by_last or run.by_last and final:
            save_checkpoint(run.best_path, run.model, run.spec, config=run.config, metrics=va, epoch=epoch,
                            prior=run.prior)
        run.last.hold(epoch, va, final=final, train_state={
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "rng": torch.get_rng_state(), "loader_rng": run.gen.get_state(), "history": run.history,
            "best_miou": run.best, "split": run.split,
            **({"few_clicks": few_clicks.state(run.train_ds)} if few_clicks.enabled(cfg) else {})})
        run.progress.write("validation", epoch=epoch, epochs=cfg.epochs, step=h["step"], steps=run.plan["total"],
                           loss=h["train_loss"], val={k: v for k, v in h.items() if k.startswith("val_")},
                           elapsed=time.time() - run.progress.t0)
    except ValueError as e:  # non-finite weights: never saved
        raise TrainingError(f"epoch {epoch}: {e}. Training diverged; lower --lr and start again") from None


def finish(run):
    """The plateau said once, history.json and the figures (rank 0; the others wait)."""
    cfg, history = run.cfg, run.history
    if not run.ctx.is_main:
        distributed.barrier()  # rank 0 writes the history and figures
        return
    flat = plateau(history, PLATEAU_EPOCHS, PLATEAU_GAIN, cfg.warmup)  # judged once, on the whole curve
    if flat:
        level = next(x["val_miou"] for x in history if x["epoch"] == flat)
        print(f"the validation curve has stopped improving: the last {PLATEAU_EPOCHS} validations gained less "
              f"than {PLATEAU_GAIN} val mIoU over {unit_at(cfg, run.plan, flat)}'s {level:.3f}; a longer run is "
              f"unlikely to help", flush=True)
    (run.out_dir / "history.json").write_text(json.dumps(history, indent=1))
    if cfg.figures and history:
        plot_history(history, run.out_dir / "output.png")
        if run.best_path.is_file():
            best_model, ck = load_model(run.best_path, run.ctx.device)
            plot_results(best_model, run.val_ds, run.out_dir / "results.png", device=run.ctx.device,
                         points_name=CLICK_VAL, title=f"{'last' if run.by_last else 'best'} epoch {ck.epoch}: val mIoU "
                               f"{ck.metrics['miou']:.3f}{f' ({CLICK_VAL})' if run.on_clicks else ''}")
    distributed.barrier()


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    """The options are TrainConfig's fields (config.py: help, choices and defaults declared there)."""
    return add_arguments(argparse.ArgumentParser(description="Train from point annotations (see the module "
                                                             "docstring)."))


def main(args):
    """Returns the exit code: 0 trained, 1 training failed (diverged), 2 a user error (nothing trained), 130
    interrupted (Ctrl-C; last.pth holds the last validated epoch)."""
    try:
        cfg = config_from_args(args)
        history = train(cfg)
        best = max(history, key=lambda h: h["val_miou"]) if history else None
        at = lambda h: f"step {h['step']}" if cfg.steps is not None else f"epoch {h['epoch']}"  # noqa: E731
        if best and "val_kind" in best:  # no dense labels: on held-out clicks, with the 95 % intervals
            kept = history[-1] if cfg.select != "best" else best
            print(f"on {kept['val_clicks']} {kept['val_kind']} ({CLICK_SCOPE}): val mIoU "
                  f"{_ci(kept['val_miou'], kept['val_miou_ci'])}, accuracy {_ci(kept['val_oa'], kept['val_oa_ci'])} "
                  f"at {at(kept)} (best_model.pth; the best there: {best['val_miou']:.3f} at {at(best)}). How good "
                  f"the map is: python assess.py sample (docs/assessment.md)")
        elif best:  # under torchrun rank 0 alone prints (distributed.init_from_env)
            kept = history[-1] if cfg.select == "last" else best
            print(f"{'best' if kept is best else 'last'} val mIoU {kept['val_miou']:.3f} (OA {kept['val_oa']:.3f}) at "
                  f"{at(kept)} (best_model.pth)")
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, CheckpointError, OSError, RuntimeError) as e:  # RuntimeError: weights
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        distributed.cleanup()  # under torchrun: leave the process group (no-op in one process)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
