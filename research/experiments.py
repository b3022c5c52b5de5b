"""Run the experiments behind the results table and the point-budget curve; research/reports.py writes their tables
and figures.

    python -m research.experiments --preset demo                     # synthetic demo data, 2 CPU cores, about 3 hours
    python -m research.experiments --preset demo --threads 1         # the same on a CPU shared with other jobs
    python -m research.experiments --preset demo --dry-run           # list the runs and which are done
    python -m research.experiments --preset demo --only 1,3 --seeds 5
    python -m research.experiments --preset potsdam --data archive/patches --device cuda
    python -m research.experiments --preset demo --report            # rebuild the markdown and figures from the csv
    python -m research.experiments --preset atlanta --references-only # the forest and all-background rows alone
    python -m research.experiments --preset demo --epochs 2          # other settings: into results/adhoc-<hash>/
    python -m research.experiments --preset potsdam --data archive/patches --gpus 0,1,2,3    # one run per GPU at once
    python -m research.experiments --preset demo --parallel 2 --threads 1                    # two runs at once on the CPU

Experiments (each configuration trained with --seeds seeds, reported as mean +/- sample std):
  1. class weights from points vs none (the published pair: 20,000 points, focal gamma 2)
  2. class weights from dense labels (the published choice) vs from points
  3. point budget: 10 ... 20,000 points per image, and dense labels as the ceiling
  4. uniform vs class-balanced point sampling at low budgets
  5. plain (published) vs skip decoder
  6. points fixed vs redrawn every epoch (what the published code did)
  7. class weighting schemes on imbalanced data
  8. few clicks: partial CE vs affinity / consistency losses vs self-training, at 10 and 100 points and 1/object
  9. model-chosen vs random clicks at equal budgets (few_clicks.py), and the same clicks all at the start
  10. the loss: focal vs cross-entropy; at 1/object, class weights from the clicks vs the pixel shares they imply

Choices, stated once:
- The baseline: 20,000 uniform points per native 300x300 image, class weights from the points, focal gamma 2
  (the published annotation and loss), points fixed for the whole run, and the *skip* decoder (train.py's
  default). The published *plain* decoder hardly learns in the demo budget (random init, 75x75 input: a 3x3
  bottleneck; val mIoU 8-17 % after 8 epochs vs 61 % with skips), which would have left every other
  comparison in noise. Experiment 1 therefore also runs the published pair on the plain decoder (on Potsdam
  that is the exact published configuration) and experiment 5 compares the decoders. Every experiment changes
  one thing from the baseline, and a configuration that appears in several experiments is trained once.
- A seed sets both the model init / shuffling / augmentation (cfg.seed) and the annotation (annotation_seed):
  the std covers annotation luck too.
- Reported numbers are the val metrics of the LAST epoch. The best epoch's val mIoU is also recorded in the
  csv, but picking the best epoch on val and reporting val is optimistic (there is no separate test split).
- Presets: `demo` (synthetic data, random init, 75x75, 160/48 patches, 8 epochs, 117 runs over experiments
  1-9: about 100 s a run with --threads 1 on the 2 shared cores it was sized on, about 3 hours in all) and
  `potsdam` (the published settings: 150x150, 100 epochs, the 2,100/300 split, ImageNet encoder). Timed with
  the synthetic patches standing in for Potsdam, one potsdam-preset epoch took about 12 s on an H200, so a
  100-epoch run is about 20 minutes with the per-item DataLoader of that round (the resident path is not yet
  timed on a GPU) and the first 42 runs about 14 hours: use --only and --seeds to spend less.
- A run's key is `<config key>-s<seed>`. The config key hashes the whole TrainConfig the run trains with
  (dataclasses.asdict, defaults included) less NOT_IN_KEY (where and how a run goes: out, figures, progress,
  device, workers, resume, overwrite) and the seed fields, plus the data folder's identity (the names and sizes
  of its image and label files, and the split file). A changed TrainConfig default or changed data therefore
  makes new keys, and those runs are done again. Rows of keys this version no longer makes (other defaults,
  other data, or the older key scheme that hashed only the Run fields and the preset settings) stay in the
  csv; the tables just do not match them. A run whose key is already in the csv is not run again, so a killed
  preset resumes where it stopped, and the run it was in continues from its `<results>/runs/<key>/last.pth`
  rather than epoch 1. One csv row is appended per finished run.
- results/ holds the presets' own settings only. Any option that changes them (--data, --split, --size,
  --epochs, --n-train, --n-val, --no-pretrained, --exclude) sends the csv, the markdown and the figures to
  results/adhoc-<hash of the settings>/ (printed) unless --results names a folder.
- Several experiments.py may work on one results folder at once (one per GPU, say). A run is claimed before it
  trains (`<results>/runs/<key>/claim`, created atomically, holding pid, host and start time) and released when
  its row is written; the others skip it as running elsewhere. A claim whose pid is dead on this host is stale
  (a killed run) and is taken over. Rows are appended under a lock, and a key the csv holds twice counts once.
"""

import argparse
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from config import NEUTRAL, NOT_IN_KEY, key_settings  # noqa: F401 (NEUTRAL: read by the tests)
from spec import CLASSES

# --------------------------------------------------------------------------- what differs between runs

# the experiments' baseline differs from train.py's defaults in two settings: the published inverse-frequency
# class weighting (train.py defaults to sqrt, the winner of experiment 7, which compares them), and nothing added
# by itself at sparse budgets (train.py's --sparse auto, which experiment 8's evidence chose): each row runs
# exactly what it names
EXPERIMENT_BASE = {"class_weighting": "inverse", "sparse": "off", "prior": "off"}  # each row runs what it names


@dataclass(frozen=True, init=False)
class Run:
    """One configuration of the experiments: overrides of the baseline TrainConfig (train.py's defaults and
    EXPERIMENT_BASE); the preset adds the data and the schedule. `Run(points=10, affinity_weight=1.0)`; reading
    `run.points` gives the override or the baseline's value; `dataclasses.replace(run, points=100)` makes another
    (the overrides are its one field). Overrides equal to the baseline are dropped, so equal configurations are
    equal Runs."""

    changes: tuple = ()  # sorted (name, value) pairs that differ from the baseline

    def __init__(self, changes=(), **overrides):
        from config import TrainConfig
        base = {**dataclasses.asdict(TrainConfig()), **EXPERIMENT_BASE}
        merged = {**dict(changes), **overrides}
        unknown = sorted(set(merged) - set(base))
        if unknown:
            raise TypeError(f"Run: {unknown} are not TrainConfig settings")
        object.__setattr__(self, "changes", tuple(sorted((k, v) for k, v in merged.items() if v != base[k])))
        object.__setattr__(self, "_base", base)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_base":
            raise AttributeError(name)
        return dict(self.changes).get(name, self._base[name]) if name in self._base else \
            object.__getattribute__(self, name)

    @property
    def settings(self):
        """The TrainConfig settings this configuration sets: EXPERIMENT_BASE and its overrides."""
        return {**EXPERIMENT_BASE, **dict(self.changes)}

    @property
    def name(self):
        if self.points is None:
            pts = "dense"
        elif isinstance(self.points, str):
            pts = self.points.replace("/", "per")
        else:
            pts = f"{self.points}pts-{self.strategy}"
        pts += f"-aff{self.affinity_weight:g}" if self.affinity_weight else ""
        pts += f"-cons{self.consistency_weight:g}" if self.consistency_weight else ""
        pts += (f"-st{self.self_training}" + (f"s{self.pseudo_share:g}" if self.pseudo_share else
                                              f"t{self.pseudo_threshold:g}")) if self.self_training else ""
        pts += f"-ft{self.forest_teacher:g}" if self.forest_teacher else ""
        pts += f"-{self.rounds}x{self.clicks_per_round}{self.click_strategy}" if self.rounds else ""
        pts += "-grown" if self.region_growing else ""
        weights = self.class_weights if self.class_weighting == "inverse" else \
            f"{self.class_weights}-{self.class_weighting}"
        return (f"{pts}-w{weights}-{self.decoder}-g{self.gamma:g}"
                f"-{'redrawn' if self.resample_each_epoch else 'fixed'}")


# rows that train no CNN, beside the CNN rows whose clicks they use: what a person would use instead (forest.py)
REFERENCES = {"forest-multiscale": "random forest, multiscale filter features",
              "forest-bands": "random forest, band values",
              "majority": "all-background (the majority class of the training targets everywhere)"}


@dataclass(frozen=True)
class Reference:
    """A reference row: `method` (REFERENCES) fitted on exactly the training targets the CNN `run` trains on
    (the same data, split, clicks and seed) and scored with the same confusion matrix on the same dense val
    labels. Reads every other setting (points, strategy, ...) from `run`."""

    run: Run
    method: str

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.run, name)

    @property
    def name(self):
        return f"{self.method}-{self.run.name}"


def references(label, run, methods=("forest-multiscale", "forest-bands")):
    """(label, Reference) rows of `methods` on `run`'s clicks."""
    return tuple((f"{label}, {REFERENCES[m]}", Reference(run, m)) for m in methods)


BASELINE = Run()  # published annotation and loss, points fixed, skip decoder
PUBLISHED = replace(BASELINE, decoder="plain")  # the published configuration (with points fixed)
BUDGETS = (10, 100, 1000, 5000, 20000)  # points per native 300x300 image
LOW_BUDGETS = (10, 100)
ROUNDS, CLICKS_PER_ROUND = 3, 10  # experiment 9: 10 points + 3 rounds x 10 clicks = 40 clicks per image
SHARE = 0.3  # per-class share of the surest pixels: self-training's relative rule and the forest teacher
# experiment 8: what each method changes from partial CE alone
FEW_CLICK_METHODS = (("partial CE", {}), ("+ affinity", dict(affinity_weight=1.0)),
                     ("+ consistency", dict(consistency_weight=1.0)),
                     ("+ both", dict(affinity_weight=1.0, consistency_weight=1.0)),
                     ("+ self-training", dict(self_training=ROUNDS)),
                     ("+ self-training, per-class share", dict(self_training=ROUNDS, pseudo_share=SHARE)),
                     ("+ region growing", dict(region_growing=True)),
                     ("+ forest teacher", dict(forest_teacher=SHARE)))


@dataclass(frozen=True)
class Experiment:
    number: int
    title: str
    rows: tuple  # ((label, Run), ...)
    note: str = ""


EXPERIMENTS = (
    Experiment(1, "Class weights (from points) vs none: the published pair, 20,000 points, gamma 2", (
        ("skip decoder, class weights from points", BASELINE),
        ("skip decoder, no class weights", replace(BASELINE, class_weights="none")),
        ("plain decoder (published), class weights from points", PUBLISHED),
        ("plain decoder (published), no class weights", replace(PUBLISHED, class_weights="none"))),
        "The plain rows with an ImageNet encoder (preset potsdam) are the exact published pair. From random init "
        "at 75x75 (preset demo) the plain decoder hardly learns in 8 epochs."),
    Experiment(2, "Class weights from dense labels (published) vs from points", (
        ("from dense labels (published)", replace(BASELINE, class_weights="dense")),
        ("from points", BASELINE)),
        "Uniform points are an unbiased sample of the labels, so at 20,000 points the two sets of weights are "
        "almost the same; the difference is what dense-label weights add beyond what an annotator has."),
    Experiment(3, "Point budget (uniform points, weights from points)", tuple(
        (f"{n:,} points", replace(BASELINE, points=n)) for n in BUDGETS) + (
        ("dense labels (ceiling)", replace(BASELINE, points=None)),
        ("all-background: the majority class everywhere (no model)", Reference(replace(BASELINE, points=None),
                                                                                "majority"))),
        "Points are counted per native 300x300 image; several can fall into one processing pixel. At the demo's "
        "75x75 one processing pixel covers 16 native ones, so 20,000 points label almost every pixel; at the "
        "published 150x150 they label about 63 % (measured on the synthetic patches)."),
    Experiment(4, "Uniform vs class-balanced points at low budgets", tuple(
        (f"{n:,} {s}", replace(BASELINE, points=n, strategy=s)) for n in LOW_BUDGETS
        for s in ("uniform", "balanced"))),
    Experiment(5, "Decoder: plain (published) vs skip", (
        ("plain (published)", PUBLISHED),
        ("skip", BASELINE))),
    Experiment(6, "Points fixed vs redrawn every epoch (the published code)", (
        ("20,000 fixed", BASELINE),
        ("20,000 redrawn every epoch", replace(BASELINE, resample_each_epoch=True)),
        ("100 fixed", replace(BASELINE, points=100)),
        ("100 redrawn every epoch", replace(BASELINE, points=100, resample_each_epoch=True))),
        "'Labelled pixels' is one draw. Redrawn points give the model a new draw every epoch, so over a run it "
        "sees many times the labels the budget claims: the published code's '20,000 points' trained on far more "
        "labelled pixels than 20,000 per image."),
    Experiment(7, "Class weighting on imbalanced data: none vs inverse frequency (published) vs milder schemes", (
        ("no class weights", replace(BASELINE, class_weights="none")),
        ("inverse frequency (published)", BASELINE),
        ("square-root inverse frequency", replace(BASELINE, class_weighting="sqrt")),
        ("median-frequency balancing", replace(BASELINE, class_weighting="median")),
        ("effective number of samples", replace(BASELINE, class_weighting="effective")),
        ("inverse frequency, ratio capped at 10", replace(BASELINE, class_weighting="capped"))),
        "Weights from the training points (class_weights.py). The rare class is car on the synthetic scenes and "
        "building on the Atlanta tile (4 % of the pixels); see the per-class IoU table."),
    Experiment(8, "Few clicks: partial CE vs affinity loss vs consistency vs both vs self-training vs region growing "
                  "vs the forest as a teacher, at 10 and 100 points and 1 click per object",
        tuple((f"{label}, {method}", replace(BASELINE, points=budget, **change))
              for budget, label in ((10, "10 points"), (100, "100 points"), ("1/object", "1 click / object"))
              for method, change in FEW_CLICK_METHODS) + tuple(
        row for budget, label in ((10, "10 points"), (100, "100 points"), ("1/object", "1 click / object"))
        for row in references(label, replace(BASELINE, points=budget))) + (
        ("dense labels (ceiling)", replace(BASELINE, points=None)),
        *references("dense labels", replace(BASELINE, points=None)),
        ("all-background: the majority class everywhere (no model)", Reference(replace(BASELINE, points=None),
                                                                                "majority"))),
        "Affinity: gated CRF loss, 5x5 window (dilation 2), weight 1; consistency: FixMatch-style, threshold 0.95, "
        "weight 1 (weak_losses.py). Self-training: 3 rounds spread over the epochs, pixels of softmax >= 0.9 "
        f"become pseudo-labels, clicks always win; 'per-class share': the surest {SHARE:.0%} of each class's "
        f"predicted pixels instead; forest teacher: before training, a random forest on multiscale filter features "
        f"fitted on the clicks (the reference row's forest) labels the surest {SHARE:.0%} of each class it predicts "
        f"(pseudo-labels); region growing: a click labels its SLIC superpixel (about 8 x 8 "
        "processing pixels) where the superpixel's clicks agree (few_clicks.py). Weights untuned. 10 points are per "
        "native image; '1 click / object' clicks once inside every connected region of one class "
        "(dataset.object_clicks)."),
    Experiment(9, f"Model-chosen vs random clicks at equal budgets: {ROUNDS} rounds x {CLICKS_PER_ROUND} clicks per "
                  f"image", tuple(
        (f"{label}, then {ROUNDS} x {CLICKS_PER_ROUND} {how} clicks",
         replace(BASELINE, points=start, rounds=ROUNDS, clicks_per_round=CLICKS_PER_ROUND, click_strategy=strategy))
        for start, label in ((10, "10 points"), ("1/object", "1 click / object"))
        for strategy, how in (("uncertain", "model-chosen"), ("random", "random"))) + (
        (f"{10 + ROUNDS * CLICKS_PER_ROUND} points from the start",
         replace(BASELINE, points=10 + ROUNDS * CLICKS_PER_ROUND)),
        *references(f"{10 + ROUNDS * CLICKS_PER_ROUND} points from the start",
                    replace(BASELINE, points=10 + ROUNDS * CLICKS_PER_ROUND), ("forest-multiscale",)),
        ("1 click / object, no rounds", replace(BASELINE, points="1/object")),
        ("dense labels (ceiling)", replace(BASELINE, points=None))),
        "The model chooses each image's new clicks after epochs 2, 4, 6 (demo, 8 epochs) or 5, 10, 15 (atlanta, 20): "
        "the cells of smallest margin between its two most likely classes, at least 5 processing pixels apart, "
        "never on a clicked cell or an undefined pixel; the cell's centre pixel is clicked and its class read from "
        "the dense label (a simulated annotator). Random: the same schedule and spacing, a random order. "
        "'Labelled pixels' is what the run ended with (all rounds' clicks)."),
    Experiment(10, "The loss: focal (gamma 2, published) vs cross-entropy; class weights from the clicks vs from the "
                   "pixel shares they imply", (
        ("dense labels, focal gamma 2", replace(BASELINE, points=None)),
        ("dense labels, cross-entropy", replace(BASELINE, points=None, gamma=0.0)),
        ("10 points, focal gamma 2", replace(BASELINE, points=10)),
        ("10 points, cross-entropy", replace(BASELINE, points=10, gamma=0.0)),
        ("1 click / object, sqrt weights from the clicks", replace(BASELINE, points="1/object",
                                                                  class_weighting="sqrt")),
        ("1 click / object, sqrt weights from the pixel shares", replace(BASELINE, points="1/object",
                                                                        class_weighting="sqrt",
                                                                        class_weights="pixels")),
        *((f"{n} points, sqrt weights from the {what}", replace(BASELINE, points=n, class_weighting="sqrt",
                                                                  class_weights=source))
          for n in (10, 100) for what, source in (("clicks", "points"), ("pixel shares", "pixels"))),
        ("all-background: the majority class everywhere (no model)", Reference(replace(BASELINE, points=None),
                                                                                "majority"))),
        "Cross-entropy is the partial CE with --gamma 0. 'From the pixel shares' is --class-weights pixels: a "
        "forest on the clicks and the EM of Saerens et al. (2002) estimate each class's share of the training "
        "pixels, and each class's clicks weigh as its pixels would (class_weights.py). With inverse weights the "
        "shares cancel out, so these rows use sqrt (train.py's default)."),
)

# --------------------------------------------------------------------------- presets

# n_train / n_val: evenly spaced ids from the split's train / val parts (None = all of them).
PRESETS = {
    # 2 CPU cores, random init: processing 75x75 (scale 0.25), a small evenly spread subset, few epochs.
    "demo": dict(data="demo_data/patches", split=None, n_train=160, n_val=48, size=75, epochs=8,
                 batch_size=16, lr=1e-3, step_size=6, lr_gamma=0.1, pretrained=False, exclude=[]),
    # REAL data, 2 CPU cores: `make realdata` (SpaceNet Atlanta, 0.5 m, 36 patches of 150x150, 2 classes, 16-bit),
    # whole patch columns 4-5 validate, processed at full resolution, random init.
    "atlanta": dict(data=None, images="realdata/atlanta/images", labels="realdata/atlanta/labels",
                    classes="realdata/atlanta/classes.json", split="realdata/atlanta/split.json", n_train=None,
                    n_val=None, size=150, epochs=20, batch_size=8, lr=1e-3, step_size=15, lr_gamma=0.1,
                    pretrained=False, exclude=[]),
    # the Atlanta set sized in optimizer steps (train.py --steps auto: 60 passes, at least 300 steps; cosine decay
    # after 30 warm-up steps) instead of the 60 steps of 20 epochs
    "atlanta-steps": dict(data=None, images="realdata/atlanta/images", labels="realdata/atlanta/labels",
                          classes="realdata/atlanta/classes.json", split="realdata/atlanta/split.json", n_train=None,
                          n_val=None, size=150, epochs=100, batch_size=8, lr=1e-3, step_size=15, lr_gamma=0.1,
                          pretrained=False, exclude=[], steps="auto", schedule="cosine", warmup=30),
    # the synthetic demo sized the same way: 60 passes of 10 steps = 600 steps instead of the 80 of 8 epochs
    "demo-steps": dict(data="demo_data/patches", split=None, n_train=160, n_val=48, size=75, epochs=100,
                       batch_size=16, lr=1e-3, step_size=6, lr_gamma=0.1, pretrained=False, exclude=[],
                       steps="auto", schedule="cosine", warmup=30),
    # the published settings: 300 -> 150, 100 epochs, Adam 1e-3 + StepLR(30, 0.1), split 2,100 / 300.
    "potsdam": dict(data="archive/patches", split=None, n_train=None, n_val=None, size=150, epochs=100,
                    batch_size=16, lr=1e-3, step_size=30, lr_gamma=0.1, pretrained=True, exclude=[]),
}
DEMO_DATA = dict(out="demo_data", patches=2400, scenes=3, scene_size=1200, seed=0)  # what `make demo-data` writes
OWN_DATA = dict(data=None, images=None, labels=None, classes=None)  # settings a patch-folder preset leaves unset
for _p in PRESETS.values():
    for _k, _v in OWN_DATA.items():
        _p.setdefault(_k, _v)


def class_names(settings):
    """The class names a preset's data use: its class file's, else the Potsdam classes."""
    if settings.get("classes"):
        from spec import load_class_file
        return load_class_file(settings["classes"]).names
    return CLASSES


def is_synthetic(preset, settings):
    return preset in ("demo", "demo-steps") or "demo_data" in str(settings.get("data"))


# --------------------------------------------------------------------------- run keys

# Read off TrainConfig's declarations (config.py): NOT_IN_KEY, the "how" settings (where and how a run goes), and
# NEUTRAL, the settings added after runs were keyed, which stay out of the key at their default so that a feature
# that is off by default keeps every finished run valid. Any other field is in the key, so a changed TrainConfig
# default (normalisation, augmentation, ...) makes new keys.
SEED_FIELDS = ("seed", "annotation_seed")  # both set from the run's seed, which the key carries as -s<seed>


def data_identity(settings):
    """What the data folder holds, as a hash: the sorted relative names and sizes of the files under its
    Images/ and Labels/, plus the split file's bytes when the settings name one. Stat only: milliseconds for
    the 2,400 Potsdam patches."""
    h = hashlib.sha1()
    if settings.get("images"):  # own data: two folders (and a class file)
        folders = [Path(settings["images"]), Path(settings["labels"])]
        hint = "make realdata builds the Atlanta set" if "realdata" in str(settings["images"]) else "check the path"
    else:
        root = Path(settings["data"])
        folders = [root / "Images", root / "Labels"]
        hint = (f"expected {root}/Images/Image_<id>.tif and {root}/Labels/Label_<id>.tif (make demo-data builds "
                f"a synthetic set)")
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"no folder {folder}: {hint}")
        files = sorted((p.relative_to(folder.parent).as_posix(), p.stat().st_size) for p in folder.rglob("*")
                       if p.is_file())
        h.update("".join(f"{name} {size}\n" for name, size in files).encode())
    if settings.get("classes"):
        h.update(b"classes\n" + Path(settings["classes"]).read_bytes())
    if settings["split"]:
        split = Path(settings["split"])
        if not split.is_file():
            raise FileNotFoundError(f"split file {split} not found")
        h.update(b"split\n" + split.read_bytes())
    return h.hexdigest()[:16]


def subset_ids(settings):
    """(train ids, val ids) for the preset: evenly spaced picks from the split's parts, or (None, None) to let
    train.py use the whole split."""
    if settings["n_train"] is None and settings["n_val"] is None:
        return None, None
    from config import TrainConfig
    from train import resolve_split
    tr, va, _ = resolve_split(TrainConfig(data=settings["data"], images=settings.get("images"),
                                          labels=settings.get("labels"), split=settings["split"]))

    def pick(pairs, n):
        ids = [p[0] for p in pairs]
        if n is None or n >= len(ids):
            return ids
        return [ids[i * len(ids) // n] for i in range(n)]
    return pick(tr, settings["n_train"]), pick(va, settings["n_val"])


# preset settings that are TrainConfig settings (the rest, n_train / n_val, choose the ids)
PRESET_TRAIN_FIELDS = ("data", "images", "labels", "classes", "pretrained", "size", "epochs", "batch_size", "lr",
                       "step_size", "lr_gamma")
BUDGET_FIELDS = ("steps", "schedule", "warmup", "crop")  # only in the presets sized in optimizer steps


def make_config(run, settings, seed, ids):
    """The TrainConfig of one run: the preset's settings, the run's (Run.settings), the seed and the ids;
    execute() fills in the NOT_IN_KEY fields (out, device, resume)."""
    from config import TrainConfig
    train_ids, val_ids = ids
    return TrainConfig(**{k: settings.get(k) for k in PRESET_TRAIN_FIELDS},
                       **{k: settings[k] for k in BUDGET_FIELDS if k in settings}, **run.settings,
                       split=settings["split"] if train_ids is None else None, train_ids=train_ids, val_ids=val_ids,
                       exclude=tuple(settings["exclude"]), seed=seed, annotation_seed=seed, figures=False,
                       progress=False)


def config_hash(cfg, data_id):
    """Hash of a TrainConfig (config.key_settings: every "what" setting, neutral ones at their default left out)
    less SEED_FIELDS, and the data identity."""
    fields = {k: v for k, v in key_settings(cfg).items() if k not in SEED_FIELDS}
    blob = json.dumps({"config": fields, "data": data_id}, sort_keys=True, default=str)  # a Path as its text
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


class Keys:
    """Run keys for one set of settings on one data folder. A run's key is `<config key>-s<seed>`; the config
    key (all seeds) is config_hash of the TrainConfig that make_config builds. The folder is read once, by
    Keys.read: the subset ids and the data identity."""

    def __init__(self, settings, ids, data_id):
        self.settings, self.ids, self.data_id = settings, ids, data_id

    @classmethod
    def read(cls, settings):
        return cls(settings, subset_ids(settings), data_identity(settings))

    def config(self, run, seed):
        return make_config(run.run if isinstance(run, Reference) else run, self.settings, seed, self.ids)

    def config_key(self, run):
        key = config_hash(self.config(run, 0), self.data_id)
        if not isinstance(run, Reference):
            return key
        if run.method.startswith("forest"):
            import forest
            return f"{key}-{run.method}-{forest.settings_id()}"  # the forest's own settings are in its key
        return f"{key}-{run.method}"

    def run_key(self, run, seed):
        return f"{self.config_key(run)}-s{seed}"


@dataclass(frozen=True)
class PlannedRun:
    key: str
    config_key: str
    run: Run
    seed: int
    config: object  # train.TrainConfig, as hashed into the key


def plan_runs(keys, experiments=None, seeds=3, rows=None):
    """The distinct runs the chosen experiments need, seed-major (every configuration gets its first seed
    before any gets its second), each configuration once however many experiments show it. `rows`: a regular
    expression; only the rows whose label it finds (re.search) are planned."""
    chosen = [e for e in EXPERIMENTS if experiments is None or e.number in experiments]
    configs = list(dict.fromkeys(run for e in chosen for label, run in e.rows
                                 if rows is None or re.search(rows, label)))
    return [PlannedRun(keys.run_key(r, s), keys.config_key(r), r, s, keys.config(r, s)) for s in range(seeds)
            for r in configs]


# --------------------------------------------------------------------------- the csv (one row per run)

FIELDS = ["key", "config_key", "preset", "run", "points", "strategy", "class_weights", "class_weighting", "decoder",
          "resample_each_epoch", "gamma", "size", "epochs", "n_train", "n_val", "pretrained", "seed",
          "annotation_seed", "labelled_fraction", "oa", "miou", "mf1", "class_iou", "best_miou", "best_epoch",
          "seconds", "device", "finished", "settings"]
NUMERIC = ["gamma", "size", "epochs", "n_train", "n_val", "seed", "annotation_seed", "labelled_fraction",
           "oa", "miou", "mf1", "best_miou", "best_epoch", "seconds"]
BASE_STATS = ("oa", "miou", "mf1", "labelled_fraction", "seconds")


@contextmanager
def locked(path, shared=False):
    """Hold an flock on the file `path` (created when missing) for the with-block: exclusive for writers,
    shared for readers. The kernel drops it when the process dies, so a killed writer leaves no lock behind.
    Where the lock file cannot be created (a read-only results folder) a reader goes on without it."""
    try:
        f = open(path, "a")
    except OSError:
        if not shared:
            raise
        f = None
    if f is None:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield


def csv_lock(path):
    """The lock file next to the csv, `<csv>.lock`, held by every append (and read) of the csv."""
    return Path(path).with_name(Path(path).name + ".lock")


def read_rows(path, warn=True):
    """The finished runs in the csv, numbers as floats ('dense' points as None), one row per key. A damaged line
    (a run killed while writing) is reported and left out, so that run is done again. A key that is there twice
    (two processes ran it before runs were claimed) is reported and counted once: its first row is kept.
    warn=False reads without those reports (execute reads the csv again before each run)."""
    path = Path(path)
    if not path.is_file():
        return []
    with locked(csv_lock(path), shared=True):  # never half of a row that is being appended
        text = path.read_text()
    if text and not text.endswith("\n"):  # append_row ends every row with a newline in the same write
        if warn:
            print(f"warning: the last line of {path} is incomplete and is ignored (that run will be done again)")
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames and list(reader.fieldnames) != FIELDS:
        raise ValueError(f"{path} has the columns {reader.fieldnames}, not the ones this version writes; "
                         f"move it aside (results are never overwritten) and run again")
    rows = []
    for line, row in enumerate(reader, start=2):
        if None in row or any(v is None for v in row.values()) or not row["key"]:
            if warn:
                print(f"warning: {path} line {line} is incomplete and is ignored (that run will be done again)")
            continue
        for k in NUMERIC:
            row[k] = None if row[k] in ("", "dense") else float(row[k])
        for name, value in json.loads(row["class_iou"] or "{}").items():  # iou_<class> for summarize
            row[f"iou_{name}"] = float(value)
        rows.append(row)
    unique = first_per_key(rows)
    if len(unique) < len(rows) and warn:
        twice = [k for k, n in Counter(r["key"] for r in rows).items() if n > 1]
        print(f"warning: {path} holds the keys {', '.join(twice)} more than once; each is counted once (its "
              f"first row)")
    return unique


def first_per_key(rows):
    """Each key's first row, in order: a run counts once however many rows it has."""
    first = {}
    for r in rows:
        first.setdefault(r["key"], r)
    return list(first.values())


def append_row(path, row):
    """Append one row (header first in a new file) with one write, flushed to disk, under an exclusive lock on
    `<csv>.lock`: runs that finish together in several processes write one after the other, so no row is torn
    or lost and the header is written once. Every row ends with a newline, so a file that does not ends in a
    row cut short by a kill; that fragment is dropped first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
    with locked(csv_lock(path)):
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):  # a row cut short by a kill: drop it (read_rows ignores it too)
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        if not path.is_file() or path.stat().st_size == 0:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in FIELDS})
        with open(path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())


def make_row(planned, settings, preset, result, seconds, device):
    """One csv row from a run's result: last epoch's val metrics, plus the best epoch's mIoU."""
    history = result["history"]
    last = history[-1]
    best = max(history, key=lambda h: h["val_miou"])
    r = planned.run
    row = dict(key=planned.key, config_key=planned.config_key, preset=preset, run=r.name,
               points="dense" if r.points is None else r.points, strategy=r.strategy,
               class_weights=r.class_weights, class_weighting=r.class_weighting, decoder=r.decoder,
               resample_each_epoch=r.resample_each_epoch,
               gamma=r.gamma, size=settings["size"], epochs=len(history), n_train=result.get("n_train", ""),
               n_val=result.get("n_val", ""), pretrained=settings["pretrained"], seed=planned.seed,
               annotation_seed=planned.seed, labelled_fraction=f"{result['labelled_fraction']:.6g}",
               oa=f"{last['val_oa']:.6g}", miou=f"{last['val_miou']:.6g}", mf1=f"{last['val_mf1']:.6g}",
               best_miou=f"{best['val_miou']:.6g}", best_epoch=best["epoch"], seconds=f"{seconds:.1f}",
               device=device, finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
               settings=json.dumps(settings, sort_keys=True),
               class_iou=json.dumps({c: float(f"{v:.6g}") for c, v in last["val_iou"].items()}))
    return row


# --------------------------------------------------------------------------- running

def train_and_measure(cfg):
    """The real runner: train.train(cfg). Returns the history, the labelled fraction of the training pixels at
    processing resolution as the run ended (the history records it each epoch: click rounds add clicks; for
    redrawn points it is the first draw, each draw being alike) and the split sizes. Decodes nothing itself."""
    from train import split_pairs, train
    history = train(cfg)
    fraction = history[-1]["labelled_fraction"] if history else float("nan")
    print(f"labelled fraction of the training pixels at {cfg.size}x{cfg.size} as the run ended: {fraction:.2%}",
          flush=True)
    train_pairs, val_pairs, _ = split_pairs(cfg)
    return {"history": history, "labelled_fraction": fraction, "n_train": len(train_pairs), "n_val": len(val_pairs)}


def measure_reference(cfg, method):
    """A Reference row's result, shaped like train_and_measure's: the datasets train.py builds for `cfg` (the
    same clicks), a forest fitted on the training targets or the majority class of them, scored on the val
    labels."""
    import forest
    from metrics import ConfusionMatrix
    from train import build_datasets
    train_ds, val_ds, _, _ = build_datasets(cfg)
    t0 = time.time()
    if method == "majority":
        counts = np.zeros(train_ds.classes.num_classes, np.int64)
        for i in range(len(train_ds)):
            grid = train_ds.point_grid(i)
            counts += np.bincount(grid[grid < len(counts)].astype(np.int64), minlength=len(counts))
        cm = ConfusionMatrix(val_ds.classes.num_classes, val_ds.classes.names)
        for i in range(len(val_ds)):
            label = val_ds.dense_label(i)
            cm.update(np.full(label.shape, int(counts.argmax())), label)
        m = cm.compute(cfg.exclude)
    else:
        m = forest.forest_baseline(train_ds, val_ds, method.split("-", 1)[1], cfg.seed, cfg.exclude)
    print(f"{method}: val mIoU {m['miou']:.3f} in {time.time() - t0:.1f} s", flush=True)
    history = [{"epoch": 1, "val_oa": m["oa"], "val_miou": m["miou"], "val_mf1": m["mf1"], "val_iou": m["iou"]}]
    return {"history": history, "labelled_fraction": train_ds.labelled_fraction(), "n_train": len(train_ds),
            "n_val": len(val_ds)}


def device_name(device):
    import torch
    from model import resolve_device
    d = resolve_device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    n = torch.get_num_threads()
    return f"{d.type} ({n} thread{'' if n == 1 else 's'})"


def execute(plan, settings, preset, csv_path, runner=train_and_measure, device="auto", runs_dir="results/runs",
            keep_checkpoints=False):
    """Train every planned run whose key is not in the csv yet, appending a row after each. Each run is claimed
    first (claim_run), so several processes on one results folder share the runs; a run another process holds
    is skipped as running elsewhere. A run killed part-way resumes from its last.pth (restart). Returns the keys
    it ran."""
    done = {r["key"] for r in read_rows(csv_path)}
    todo = [p for p in plan if p.key not in done]
    print(f"{len(plan)} runs planned, {len(plan) - len(todo)} already in {csv_path}, {len(todo)} to do", flush=True)
    if not todo:
        return []
    dev = device_name(device)
    ran, elsewhere = [], []
    for i, p in enumerate(todo, 1):
        out = Path(runs_dir) / p.key
        holder = claim_run(out)
        if holder is not None:
            print(f"[{i}/{len(todo)}] {p.key} {p.run.name} seed {p.seed}: running elsewhere "
                  f"({describe_claim(holder)}), skipped", flush=True)
            elsewhere.append(p.key)
            continue
        try:
            if p.key in {r["key"] for r in read_rows(csv_path, warn=False)}:  # read again: it may have changed
                print(f"[{i}/{len(todo)}] {p.key}: finished by another process meanwhile", flush=True)
                continue
            print(f"\n[{i}/{len(todo)}] {p.key} {p.run.name} seed {p.seed}", flush=True)
            cfg = replace(p.config, out=str(out), device=device, cache_dir=str(Path(runs_dir) / ".resident-cache"),
                          **restart(out, p.config))  # the runs of a preset share their decoded data
            t0 = time.time()
            result = measure_reference(cfg, p.run.method) if isinstance(p.run, Reference) else runner(cfg)
            seconds = time.time() - t0
            append_row(csv_path, make_row(p, settings, preset, result, seconds, dev))
            print(f"[{i}/{len(todo)}] done in {seconds:.0f} s: val mIoU {result['history'][-1]['val_miou']:.3f} "
                  f"(last epoch)", flush=True)
            if not keep_checkpoints:
                for f in out.glob("*.pth"):
                    f.unlink()
            ran.append(p.key)
        finally:
            release_run(out)  # the row is written (or the run failed): the run is free again
    if elsewhere:
        print(f"skipped {len(elsewhere)} of {len(todo)} runs as running elsewhere (claimed by another process): "
              f"{', '.join(elsewhere)}", flush=True)
    return ran


def spread(command, slots, env=None):
    """Start `command` (an experiments.py worker) once per slot, all at once, and wait for them: slot = a GPU index
    (the worker sees that GPU alone, CUDA_VISIBLE_DEVICES) or None (CPU). The workers share the runs through
    claim_run and append their rows under append_row's lock. `env`: more environment variables for every worker.
    Each output line is relayed with its worker's tag. Returns the exit codes."""
    def relay(out, tag):
        for line in out:
            print(tag, line, end="", flush=True)

    procs = []
    for i, gpu in enumerate(slots):
        child_env = dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1")
        if gpu is not None:
            child_env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        tag = f"[worker {i}{f' gpu {gpu}' if gpu is not None else ''}]"
        proc = subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", cwd=Path(__file__).resolve().parents[1])  # -m research.experiments
        thread = threading.Thread(target=relay, args=(proc.stdout, tag), daemon=True)
        thread.start()
        procs.append((proc, thread))
    codes = []
    for proc, thread in procs:
        codes.append(proc.wait())
        thread.join()
    return codes


def restart(out, cfg):
    """How a run starts in its folder, as TrainConfig fields: from `<out>/last.pth` when a killed run left one
    (resume=True: train.py continues after its last epoch); over the leftovers of a run killed before its first
    checkpoint (overwrite=True, where TrainConfig has that field: train.py refuses a fresh run over old files
    without it); else fresh."""
    out = Path(out)
    if (out / "last.pth").is_file():
        print(f"resuming from {out / 'last.pth'}", flush=True)
        return {"resume": True}
    leftovers = [f.name for f in out.iterdir() if f.name != "claim"] if out.is_dir() else []
    if leftovers and "overwrite" in {f.name for f in dataclasses.fields(cfg)}:
        print(f"starting afresh over what a killed run left in {out}: {', '.join(sorted(leftovers))}", flush=True)
        return {"overwrite": True}
    return {}


# --------------------------------------------------------------------------- claims: one process per run

def claim_run(folder):
    """Claim the run whose folder this is for this process: create `<folder>/claim` with O_CREAT | O_EXCL (of
    two processes exactly one succeeds), holding pid, host name and start time. Returns None when this process
    holds the run now, or the holder's claim (a dict) when another live process does.

    A claim whose pid is dead on this host is stale (its run was killed) and is taken over, with a message. A
    claim from another host is never judged stale, since its pid cannot be checked from here: delete it by hand
    when that host's run is known to be dead. Claims are checked and taken under a lock on `<runs>/claims.lock`,
    so two processes never take over one stale claim both."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "claim"
    with locked(folder.parent / "claims.lock"):
        if path.exists():
            holder = read_claim(path)
            if not is_stale(holder):
                return holder
            print(f"taking over the stale claim on {folder.name} ({describe_claim(holder)}: that process is dead)",
                  flush=True)
            path.unlink(missing_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
    return None


def read_claim(path):
    """The claim's {pid, host, started}; {} for an unreadable one (its process died while writing it)."""
    try:
        claim = json.loads(Path(path).read_text())
        return claim if isinstance(claim, dict) and {"pid", "host"} <= set(claim) else {}
    except (OSError, ValueError):
        return {}


def is_stale(claim):
    if not claim:
        return True
    if claim["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(claim["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def describe_claim(claim):
    if not claim:
        return "an unreadable claim"
    return f"pid {claim['pid']} on {claim['host']} since {claim.get('started', '?')}"


def release_run(folder):
    """Remove this process's claim on the run (a claim another process holds is left alone)."""
    path = Path(folder) / "claim"
    with locked(path.parent.parent / "claims.lock"):  # never while another process is reading it in claim_run
        claim = read_claim(path)
        if claim.get("pid") == os.getpid() and claim.get("host") == socket.gethostname():
            path.unlink()


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    p = argparse.ArgumentParser(description="Run the experiments and write the tables and figures "
                                            "(see the module docstring).")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--only", help="experiments to run, e.g. 1,3 (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (0 .. N-1)")
    p.add_argument("--data", help="patch folder (default: the preset's)")
    p.add_argument("--split", help="split JSON {'train': [...], 'val': [...]} (default: the published split "
                                   "when ids 0-2399 exist, else the last 12.5 %% of ids as val)")
    p.add_argument("--size", type=int, help="processing size (default: the preset's)")
    p.add_argument("--epochs", type=int, help="epochs (default: the preset's); the learning-rate step scales with "
                                              "them (demo: 8 epochs, step 6; --epochs 24: step 18)")
    p.add_argument("--rows", help="only the rows whose label this regular expression finds, e.g. "
                                  "'^10 points, (\\+ forest teacher|random forest)'")
    p.add_argument("--n-train", type=int, help="evenly spaced training patches from the split (default: preset)")
    p.add_argument("--n-val", type=int, help="evenly spaced val patches from the split (default: preset)")
    p.add_argument("--no-pretrained", action="store_true", help="random encoder init (offline)")
    p.add_argument("--exclude", default=None, help="classes left out of the means, e.g. clutter")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: torch's own choice). On a CPU shared with other jobs, 1 "
                        "avoids oversubscription; not part of the run key")
    p.add_argument("--results", help="folder for experiments.csv/.md and the figures (default: results/ for a "
                                     "preset's own settings, results/adhoc-<settings hash>/ for any others)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep <results>/runs/<key>/*.pth")
    p.add_argument("--gpus", help="GPUs to spread the runs over, e.g. 0,1,2,3: one worker process per GPU, each "
                                  "training the next unclaimed run on its GPU, all at once")
    p.add_argument("--parallel", type=int, default=1,
                   help="worker processes (per GPU with --gpus), each training one run at a time; on a CPU give "
                        "--threads too (default: cores / workers)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by --gpus / --parallel
    p.add_argument("--references-only", action="store_true",
                   help="only the reference rows (forests, all-background: seconds each, no CNN trains)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are done; train nothing")
    p.add_argument("--report", action="store_true", help="rebuild the markdown and figures from the csv only")
    return p


SETTING_OPTIONS = ("data", "split", "size", "epochs", "n_train", "n_val")  # options that change a preset's settings


def own_folder(preset):
    """Where a preset's own settings keep their results: results/ for demo, results/<preset>/ for the others."""
    return Path("results") if preset == "demo" else Path("results") / preset


def settings_from_args(args):
    s = dict(PRESETS[args.preset])
    for name in SETTING_OPTIONS:
        if getattr(args, name) is not None:
            s[name] = getattr(args, name)
    if s["epochs"] != PRESETS[args.preset]["epochs"]:  # the same schedule shape: the step falls as far into the run
        s["step_size"] = max(1, round(s["step_size"] * s["epochs"] / PRESETS[args.preset]["epochs"]))
    if args.no_pretrained:
        s["pretrained"] = False
    if args.exclude is not None:
        s["exclude"] = [c for c in args.exclude.split(",") if c]
    if s["data"]:
        s["data"] = os.path.normpath(s["data"])
    return s


def results_folder(args, settings):
    """--results when given. Else results/ for a preset's own settings, and results/adhoc-<hash of the
    settings>/ when an option (--data, --split, --size, --epochs, --n-train, --n-val, --no-pretrained,
    --exclude) changes them: a quick try never rewrites the tracked results/experiments.md or adds to its csv,
    and the same settings always find their folder again."""
    if args.results is not None:
        return Path(args.results)
    preset = dict(PRESETS[args.preset])
    if preset["data"]:
        preset["data"] = os.path.normpath(preset["data"])
    if settings == preset:
        return own_folder(args.preset)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    folder = Path("results") / f"adhoc-{digest}"
    changed = ", ".join(f"{k} {settings[k]!r} (preset {preset[k]!r})" for k in settings if settings[k] != preset[k])
    print(f"settings other than preset {args.preset}'s ({changed}): results go to {folder}/ "
          f"(--results to choose)", flush=True)
    return folder


def ensure_demo_data(settings):
    """The demo preset draws the synthetic data (as `make demo-data` does) unless it is there already."""
    if not settings["data"] or Path(settings["data"]) != Path(DEMO_DATA["out"]) / "patches":
        return  # the user's own folder: a missing one is an error from dataset.py, naming it
    from tools.demo_data import make_demo_data
    s = make_demo_data(**DEMO_DATA, progress=True)  # skips the work when the folder is complete
    if not s["skipped"]:
        print(f"drew the synthetic demo data into {DEMO_DATA['out']} in {s['seconds']:.0f} s", flush=True)


def usage_error(message):
    """A user error: `error: ...` on stderr, exit status 2, before any work."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(args):
    settings = settings_from_args(args)
    only = None if not args.only else {int(x) for x in args.only.split(",") if x.strip()}
    if only and not only <= {e.number for e in EXPERIMENTS}:
        usage_error(f"--only {args.only}: experiments are {[e.number for e in EXPERIMENTS]}")
    if args.rows is not None:
        try:
            matched = [label for e in EXPERIMENTS if not only or e.number in only for label, _ in e.rows
                       if re.search(args.rows, label)]
        except re.error as e:
            usage_error(f"--rows {args.rows!r} is no regular expression ({e})")
        if not matched:
            usage_error(f"--rows {args.rows!r} matches no row label of the chosen experiments (the tables of "
                        f"results/experiments.md show them)")
    results = results_folder(args, settings)
    csv_path, md_path = results / "experiments.csv", results / "experiments.md"
    if args.preset == "demo" and not (args.dry_run or args.report):
        ensure_demo_data(settings)
    keys = Keys.read(settings)  # the run keys need the data folder: its subset ids and identity
    plan = plan_runs(keys, only, args.seeds, args.rows)
    if args.references_only:
        plan = [p for p in plan if isinstance(p.run, Reference)]
    if args.dry_run:
        done = {r["key"] for r in read_rows(csv_path)}
        for p in plan:
            claim = results / "runs" / p.key / "claim"
            running = claim.exists() and not is_stale(read_claim(claim))
            print(f"{'done' if p.key in done else 'running' if running else 'todo'}  {p.key}  {p.run.name}  "
                  f"seed {p.seed}")
        print(f"{sum(p.key in done for p in plan)} of {len(plan)} runs done ({csv_path})")
        return
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus and not args.worker else []
    workers = (len(gpus) or 1) * args.parallel if not args.worker else 1
    if args.parallel < 1 or (gpus and args.device not in ("auto", "cuda")):
        usage_error(f"--parallel must be >= 1 (got {args.parallel}); with --gpus, --device is auto or cuda (each "
                    f"worker sees its GPU alone), got {args.device}")
    failed = []
    if not args.report and workers > 1:  # workers are this script again; they share the runs through claims
        threads = {} if args.threads or gpus else {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
        slots = [g for g in gpus for _ in range(args.parallel)] if gpus else [None] * workers
        print(f"{workers} workers ({', '.join(f'GPU {g}' for g in slots) if gpus else 'CPU'}) share "
              f"{len(plan)} runs", flush=True)
        t0 = time.time()
        codes = spread([sys.executable, "-m", "research.experiments", *sys.argv[1:], "--worker"], slots, threads)
        failed = [f"worker {i} (exit {c})" for i, c in enumerate(codes) if c]
        print(f"\n{workers} workers finished in {(time.time() - t0) / 60:.1f} min"
              f"{'; failed: ' + ', '.join(failed) if failed else ''}", flush=True)
    elif not args.report:
        t0 = time.time()
        ran = execute(plan, settings, args.preset, csv_path, device=args.device, runs_dir=results / "runs",
                      keep_checkpoints=args.keep_checkpoints)
        print(f"\n{len(ran)} runs done here in {(time.time() - t0) / 60:.1f} min", flush=True)
    if args.worker:
        return  # the process that started the workers writes the report
    from research.reports import closing_note, write_report  # here, not above: research.reports imports this module
    rows = read_rows(csv_path)
    write_report(rows, keys, args.preset, md_path, results)
    print(f"wrote {md_path}\n\n" + closing_note(rows, keys))
    if failed:
        raise SystemExit(f"{len(failed)} workers failed ({', '.join(failed)}); their runs are not in the csv: run "
                         f"again to do them")


if __name__ == "__main__":
    # run as research.experiments, the module research.reports imports, not as a second copy named __main__ whose
    # Run and Reference would be other classes than those of the experiments the report reads
    from research import experiments
    experiments.main(experiments.get_args_parser().parse_args())
