"""Every training setting, declared once: `TrainConfig`.

    python train.py --help                       # the command line is derived from the fields below
    cfg = TrainConfig(points=10, epochs=5)       # the notebook and experiments.py pass overrides

Each field is `setting(default, help, ...)`: its help text, its choices or check, and what it is to a run:
- `group`: where `--help` shows it;
- `role`: "what" settings decide what is trained (they are in a run's experiment key and must match on
  --resume); "how" settings say where and how a run goes (out, device, progress, ...): left out of the key, free
  to change on --resume;
- `resumable`: a "what" setting that may still change on --resume (epochs: train longer; amp);
- `annotation`: part of the drawn annotation, and so of the resident cache's key (resident.py);
- `neutral`: added after finished experiment runs were keyed; at its default (or at `neutral_at`, for a
  feature that is on by default and which experiments.py turns off) it stays out of the key, so those runs stay
  valid (experiments.py).
RESUMABLE, NOT_IN_KEY, NEUTRAL and ANNOTATION_FIELDS are read off these declarations; `add_arguments` builds
argparse from them (flag `--field-name`; a bool that defaults to True gets `--no-field-name`) and `check_config`
applies every field's check, then the rules between fields (RULES). Adding a setting is one `setting(...)` here
plus its use.

Every command declares its settings the same way (infer.InferSettings, pretrain.PretrainConfig,
annotate.AnnotateSettings, assess.SampleSettings / EstimateSettings, research/benchmark.py), and a flag that
several commands take is declared once: the others `reuse` it (TrainConfig's fields, or `Shared` for the flags
training does not take), with their own default. So --scale, --size, --bands, --device, --batch-size, ... have
one help, one parser and one check everywhere (tests/test_config.py checks it).
"""

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union, get_args, get_origin

from spec import MAX_SCALE, PROCESSING_SIZE, check_scale, parse_bands, tokens

# --------------------------------------------------------------------------- the choices, declared with the settings
# (the modules that implement them import them from here)

ARCHS = ("resnet18", "tiny")  # model.build_model
DECODERS = ("plain", "skip")  # model.ResNet18Segmentation
CLICK_INPUTS = ("none", "disc", "distance")  # --click-input: model.click_planes
SCHEMES = ("inverse", "sqrt", "median", "effective", "capped")  # class_weights.weights_from_counts
WEIGHT_SOURCES = ("points", "pixels", "dense")  # class_weights.compute_class_weights
NORMALIZATIONS = ("weighted", "points")  # partial_ce_loss
LOADERS = ("auto", "resident", "dataloader")  # train.make_loaders, resident.choose_path
CLICK_STRATEGIES = ("uncertain", "margin", "entropy", "spread", "balanced", "random")  # few_clicks.choose_cells
SPARSE = ("auto", "off")  # --sparse (few_clicks.sparse_additions)
SPARSE_SHARE = 0.001  # --sparse auto: region growing when the clicks label under 0.1 % of the training pixels
AFFINITY_SHARE = 0.0025  # --sparse auto: the affinity loss from SPARSE_SHARE up to 0.25 %
SCHEDULES = ("step", "cosine", "poly")
SELECT = ("auto", "best", "last")  # --select: which model best_model.pth holds
MIN_CROP = 8  # processing pixels a side of a --crop window
STEP_PASSES, MIN_STEPS = 60, 300  # --steps auto (train.step_budget): 60 passes over the training pixels, >= 300 steps
MAX_VALIDATIONS = 50  # a --steps run validates every pass, or less often so that it validates at most this often
GROUPS = ("data", "annotation and loss", "losses on the unlabelled pixels (weak_losses.py; weight 0 = off)",
          "rounds inside the run (few_clicks.py; 0 = off)", "model and optimisation", "run")
DATA, LOSS, WEAK, ROUNDS, MODEL, RUN = GROUPS


@dataclass(frozen=True)
class Setting:
    """What a field of a settings dataclass is (TrainConfig, infer.InferOptions, pretrain.PretrainConfig, ...; see
    the module docstring). A flag that several commands take is declared once, in one of them, and the others
    `reuse` its Setting: one help, one parser, one check wherever the flag appears."""

    help: str
    group: str
    choices: Optional[tuple] = None
    check: Optional[object] = None  # value -> True when valid
    must: str = ""  # what `check` asks, for the message: "<flag> must <must>, got <value>"
    parse: Optional[object] = None  # command-line text -> value (default: the field's type)
    flag: Optional[str] = None  # the command-line flag; "" = none (set from Python only)
    role: str = "what"
    resumable: bool = False
    annotation: bool = False
    neutral: bool = False
    neutral_at: object = None  # with neutral: the value that stays out of the key, when not the default
    nargs: Optional[str] = None  # "?": the flag alone means `const` (infer.py --tta)
    const: object = None


def setting(default, help, group, *, required=False, **meta):
    """A field declared here: its default, help, group and `Setting` metadata. `required`: the command line must
    give it (the default stays for Python)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("a setting's default must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata={"setting": Setting(help, group, **meta), "required": required})


def reuse(cls, name, default=dataclasses.MISSING, *, required=False):
    """A field declared by another settings dataclass's field `name` (the same Setting object), with this
    command's own default (else that field's) and required-ness."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=f.default if default is dataclasses.MISSING else default,
                             metadata={"setting": f.metadata["setting"], "required": required})


def parse_points(value):
    """A point budget from the command line: 'dense' -> None, '100' -> 100 points per image, '1%' -> '1%'
    (that share of each image's pixels), '2/object' -> '2/object' (2 clicks in every object, see
    object_clicks). Errors say what is accepted."""
    text = str(value).strip().lower()
    if text in ("dense", "none"):
        return None
    m = re.fullmatch(r"(\d+)\s*/\s*obj(?:ect)?s?", text)
    if m:
        if int(m.group(1)) < 1:
            raise ValueError(f"clicks per object must be >= 1, got {value!r}")
        return f"{int(m.group(1))}/object"
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*%", text)
    if m:
        share = float(m.group(1))
        if not 0 < share <= 100:
            raise ValueError(f"a point share must be in (0, 100] %, got {value!r}")
        return f"{share:g}%"
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"points must be a whole number >= 1, a share like 1%, clicks per object like 1/object, "
                         f"or 'dense'; got {value!r}")
    return int(text)


def parse_fraction(value):
    """'20%' or '0.2' -> 0.2; must be in (0, 1)."""
    text = str(value).strip()
    try:
        f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"a held-out share must be like 20% or 0.2, got {value!r}") from None
    if not 0 < f < 1:
        raise ValueError(f"a held-out share must be in (0, 1) (0 % .. 100 %, exclusive), got {value!r}")
    return f


def positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def at_least(low):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= low


def whole(low):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def optional(check):
    return lambda v: v is None or check(v)


def parse_paths(value):
    """A path as it is, or the paths of a flag that takes several (pretrain.py --images a/ b/) as a tuple, each
    kept whole (spaces and commas too)."""
    return value if isinstance(value, str) else tuple(value)


def parse_names(text):
    return tuple(tokens(text))


def parse_optional_int(text):
    if str(text).strip().lower() in ("", "none", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"a whole number (or all) expected, got {text!r}") from None


def schedule_factor(kind, warmup, total):
    """The factor of the peak learning rate at each optimizer step of a `cosine` or `poly` (power 0.9) schedule
    over `total` steps: a linear warm-up over `warmup` steps, then down to 0 at the last step. train.py
    (--schedule) and pretrain.py use it."""
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else (1 - t) ** 0.9
    return factor


def parse_steps(text):
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--steps takes a whole number of optimizer steps or auto; got {text!r}") from None


def points_valid(v):
    parse_points(v)  # raises with what is accepted
    return True


def share_valid(v):
    return isinstance(v, float) and 0 < v < 1


def class_weights_valid(v):
    return v in ("points", "pixels", "dense", "none") or Path(v).is_file()


# --------------------------------------------------------------------------- the settings

@dataclass
class TrainConfig:
    # data: a patch folder (Images/, Labels/) or two folders of matching names (images + labels)
    data: Optional[str] = setting("demo_data/patches", "patch folder with Images/ and Labels/", DATA)
    images: Optional[str] = setting(None, "the folder of images (train.py: own data, with --labels of matching file "
                                          "names or --clicks; annotate.py: to click on; assess.py: the map's; "
                                          "pretrain.py: one or more folders, labelled or not)", DATA,
                                    parse=parse_paths)
    labels: Optional[str] = setting(None, "own data: folder of labels", DATA)
    split: Optional[str] = setting(
        None, "split JSON {'train': [ids], 'val': [ids]} (default: <data>/split.json when it exists, else the "
              "published split when ids 0-2399 exist, else the last --val-fraction of the sorted ids); with --clicks "
              "and no labels: the clicks on its val images are held out", DATA)
    train_ids: Optional[tuple] = setting(None, "training image ids (Python only; with val_ids)", DATA, flag="")
    val_ids: Optional[tuple] = setting(None, "validation image ids (Python only; with train_ids)", DATA, flag="")
    val_fraction: float = setting(0.125, "without a split: the last share of the sorted ids validates, e.g. 12.5%% "
                                         "or 0.125 (300/2400)", DATA, parse=parse_fraction,
                                  check=lambda v: positive(v) and v < 1, must="be in (0, 1)")
    max_train: Optional[int] = setting(None, "use only the first N training images (quick runs)", DATA,
                                       check=optional(whole(1)), must="be >= 1 (leave it out for all)",
                                       parse=parse_optional_int)
    max_val: Optional[int] = setting(None, "use only the first N validation images", DATA,
                                     check=optional(whole(1)), must="be >= 1 (leave it out for all)",
                                     parse=parse_optional_int)
    classes: Optional[str] = setting(None, "class file JSON (default: ISPRS Potsdam classes and colours)", DATA)
    bands: Optional[tuple[int, ...]] = setting(None, "image bands to use, e.g. 0,1,2,3 or 0 1 2 3 (training: every "
                                                     "band but alpha by default; inference: the checkpoint's)", DATA,
                                     check=lambda v: v is None or (len(v) > 0 and min(v) >= 0),
                                     must="be band indices >= 0", parse=parse_bands)
    # annotation
    points: Union[int, str, None] = setting(
        20000, "points per image at native resolution, a share of its pixels like 1%%, clicks in every object like "
               "1/object (object = connected region of one class), or 'dense'", LOSS, parse=parse_points,
        check=points_valid, annotation=True)
    strategy: str = setting("uniform", "how a number or share of points is drawn (not used by k/object)", LOSS,
                            choices=("uniform", "balanced"), annotation=True)
    resample_each_epoch: bool = setting(False, "redraw points every epoch, as the published code did (comparison "
                                               "only)", LOSS)
    annotation_seed: int = setting(0, "seed of the drawn annotation", LOSS, annotation=True)
    allow_unclicked: bool = setting(False, "train although some classes have no labelled training point (named in "
                                           "the log and kept in the checkpoint; the model never learns them)",
                                    LOSS, neutral=True)
    clicks: Optional[str] = setting(
        None, "a click file: a GeoPackage/GeoJSON/Shapefile layer (points, lines, polygons; map coordinates), a CSV "
              "image,x,y,class (pixels), a Label Studio JSON, a CVAT XML or a folder of sparse label rasters "
              "(annotations.read_clicks; docs/clicks.md). train.py trains on it instead of simulated points (without "
              "--labels it also validates on held-out clicks); annotate.py saves the page's clicks in it (.csv, "
              ".geojson or .gpkg, created when missing; default clicks.geojson when every image is georeferenced, "
              "else clicks.csv); assess.py sample keeps its points off it", LOSS, annotation=True, neutral=True)
    class_field: str = setting("class", "--clicks: the attribute or column that holds the class (name or index)",
                               LOSS, annotation=True, neutral=True)
    line_width: float = setting(1.0, "--clicks: width in pixels of drawn lines (scribbles)", LOSS, check=positive,
                                must="be a positive number of pixels", annotation=True, neutral=True)
    val_clicks: Optional[float] = setting(
        None, "--clicks without dense labels: hold out this share of the clicks for validation, spatially blocked "
              "(whole images, or blocks of few images), e.g. 20%% (default then: 20%%)", LOSS, parse=parse_fraction,
        check=optional(share_valid), must="be a share in (0, 1) like 20% or 0.2", annotation=True, neutral=True)
    class_weights: str = setting(
        "points", "points (the clicks' counts), pixels (the pixel shares the clicks imply: for clicks that are not a "
                  "random sample, like 1/object), dense, none, or a .pt file (a run writes <out>/class_weights.pt)",
        LOSS, check=class_weights_valid, must="be points, pixels, dense, none or an existing .pt file")
    prior: str = setting(
        "auto", "the class prior the saved model predicts a map under. auto: for a person's --clicks (not a random "
                "sample of the pixels), the class shares the clicks imply (a forest on the clicks and EM, as "
                "--class-weights pixels estimates them; docs/training.md#the-prior-of-a-persons-clicks): the model's "
                "class probabilities are corrected from the prior it was trained under to those shares (Saerens et "
                "al. 2002) whenever it predicts (infer.py, the page, assess.py); off: as trained", LOSS,
        choices=("auto", "off"), role="how")
    class_weighting: str = setting(
        "sqrt", "how class counts become weights (class_weights.py; inverse = published; the evidence for sqrt: "
                "experiment 7, docs/training.md#loss-and-class-weighting)", LOSS, choices=SCHEMES)
    gamma: float = setting(2.0, "focal exponent (0 = cross-entropy)", LOSS, check=at_least(0), must="be >= 0")
    normalization: str = setting("weighted", "how the partial CE averages over the labelled pixels", LOSS,
                                 choices=NORMALIZATIONS)
    # losses on the unlabelled pixels (weak_losses.py), added to the partial CE times their weight; 0 = off
    affinity_weight: float = setting(0.0, "gated CRF pairwise loss: similar neighbouring colours, same class", WEAK,
                                     check=at_least(0), must="be >= 0 (0 = off)", neutral=True)
    affinity_kernel: int = setting(5, "window side (odd, >= 3)", WEAK, check=lambda v: whole(3)(v) and v % 2 == 1,
                                   must="be odd and >= 3", neutral=True)
    affinity_dilation: int = setting(2, "window step in pixels", WEAK, check=whole(1), must="be >= 1", neutral=True)
    affinity_sigma_rgb: float = setting(0.1, "colour bandwidth (image in [0, 1])", WEAK, check=positive,
                                        must="be > 0", neutral=True)
    affinity_sigma_xy: float = setting(4.0, "spatial bandwidth (processing pixels)", WEAK, check=positive,
                                       must="be > 0", neutral=True)
    consistency_weight: float = setting(0.0, "FixMatch-style consistency between the batch and a jittered, "
                                             "rotated/flipped view", WEAK, check=at_least(0),
                                        must="be >= 0 (0 = off)", neutral=True)
    consistency_threshold: float = setting(0.95, "pseudo-labels only where the softmax max reaches this", WEAK,
                                           check=lambda v: at_least(0)(v) and v <= 1, must="be in [0, 1]",
                                           neutral=True)
    # rounds inside the run (few_clicks.py); 0 = off
    self_training: int = setting(0, "R rounds: the model's confident pixels become pseudo-labels (clicks always "
                                    "win)", ROUNDS, check=whole(0), must="be a whole number of rounds >= 0 (0 = off)",
                                 neutral=True)
    pseudo_threshold: float = setting(0.9, "softmax max a pixel needs to become a pseudo-label", ROUNDS,
                                      check=lambda v: positive(v) and v <= 1, must="be in (0, 1]", neutral=True)
    pseudo_share: float = setting(0.0, "self-training by a rule relative to each class: the surest share of each "
                                       "class's predicted pixels become pseudo-labels (replaces --pseudo-threshold; "
                                       "0 = off)", ROUNDS, check=lambda v: at_least(0)(v) and v <= 1,
                                  must="be in [0, 1] (0 = off)", neutral=True)
    rounds: int = setting(0, "R rounds of new clicks the model chooses, revealed from the dense labels (simulated)",
                          ROUNDS, check=whole(0), must="be a whole number of rounds >= 0 (0 = off)", neutral=True)
    clicks_per_round: int = setting(10, "K new clicks per image and round", ROUNDS, check=whole(1), must="be >= 1",
                                    neutral=True)
    click_strategy: str = setting("uncertain", "uncertain (or margin): smallest margin between the two top classes "
                                               "first; entropy: largest entropy first; spread: the least sure cells "
                                               "far apart (farthest-point); balanced: least sure of each predicted "
                                               "class in turn; random: the baseline", ROUNDS,
                                  choices=CLICK_STRATEGIES, neutral=True)
    click_spacing: float = setting(5.0, "least distance between the new clicks of a round (processing pixels)",
                                   ROUNDS, check=at_least(1), must="be >= 1 pixel", neutral=True)
    region_growing: bool = setting(False, "a click labels its SLIC superpixel (where that superpixel's clicks "
                                          "agree on a class)", ROUNDS, neutral=True)
    sparse: str = setting("auto", f"auto: when the clicks label under {100 * SPARSE_SHARE:g} %% of the training "
                                  "pixels, region growing is on; from there up to "
                                  f"{100 * AFFINITY_SHARE:g} %% the affinity loss (--affinity-weight 1); the evidence "
                                  "for both thresholds: experiment 8 (docs/training.md#few-clicks). off: only what is "
                                  "asked for", ROUNDS,
                          choices=SPARSE, neutral=True, neutral_at="off")
    forest_teacher: float = setting(0.0, "a random forest on filter features, fitted on the clicks, labels the surest "
                                         "share of each class's pixels it predicts before training (pseudo-labels; "
                                         "clicks win; 0 = off)", ROUNDS, check=lambda v: at_least(0)(v) and v <= 1,
                                    must="be in [0, 1] (0 = off)", neutral=True)
    # model
    arch: str = setting("resnet18", "tiny: a 3-layer stand-in for smoke runs", MODEL, choices=ARCHS)
    decoder: str = setting("skip", "plain = the published decoder", MODEL, choices=DECODERS)
    pretrained: bool = setting(True, "ImageNet encoder through torchvision (needs the weights file or internet); "
                                     "--no-pretrained: random init (offline)", MODEL)
    encoder: Optional[str] = setting(
        None, "start from an encoder pretrained by pretrain.py (masked image modelling on your images, labelled or "
              "not; the output layer stays random); with --no-pretrained", MODEL,
        check=lambda v: v is None or Path(v).is_file(), must="be an encoder file written by pretrain.py", neutral=True)
    init: Optional[str] = setting(
        None, "start from the weights and the preprocessing contract of this checkpoint (a model train.py wrote) and "
              "fine-tune it on this run's data, e.g. a model adapted to new clicks (the annotation page's Train); its "
              "classes and model settings must be this run's; with --no-pretrained", MODEL,
        check=lambda v: v is None or Path(v).is_file(), must="be a checkpoint file written by train.py", neutral=True)
    click_input: str = setting(
        "none", "a click-conditioned model (DISIR): clicks enter as one input plane per class, a disc of "
                "--click-radius around each click or a distance map that falls to 0 there; trained from the points "
                "alone: in each batch some of an image's points go in as clicks, the loss counts the others. "
                "Validation and infer.py see no clicks (docs/training.md#click-conditioned-model)", MODEL,
        choices=CLICK_INPUTS, neutral=True)
    click_radius: float = setting(3.0, "--click-input: radius of a click's disc, or where its distance map reaches 0 "
                                       "(processing pixels)", MODEL, check=positive,
                                  must="be a positive number of processing pixels", neutral=True)
    click_max: int = setting(10, "--click-input: most input clicks per image and batch (k uniform in 1..min(this, the "
                                 "image's points - 1))", MODEL, check=whole(1), must="be a whole number >= 1",
                             neutral=True)
    click_none: float = setting(0.5, "--click-input: share of the images of a batch given no input clicks, so the "
                                     "no-click map (what infer.py makes) trains too", MODEL,
                                check=lambda v: at_least(0)(v) and v <= 1, must="be in [0, 1]", neutral=True)
    size: int = setting(PROCESSING_SIZE, "processing size of the first image's longer side (300 -> 150)",
                        MODEL, check=whole(8), must="be >= 8 pixels")
    scale: Optional[float] = setting(None, "processing pixels per image pixel, e.g. 0.5 (training: overrides --size, "
                                           "for mixed image sizes; inference: overrides the checkpoint's)", MODEL,
                                     check=lambda v: v is None or check_scale(v),
                                     must=f"be in (0, {MAX_SCALE}]")
    crop: int = setting(0, "train on random CROP x CROP windows (processing pixels) of the images, so whole tiles "
                           "train without being cut first (train.py: drawn with replacement by area, an epoch as many "
                           "batches as cover the training pixels once; 0 = whole images)", MODEL,
                        check=lambda v: v == 0 or whole(MIN_CROP)(v), must=f"be 0 or >= {MIN_CROP} pixels",
                        neutral=True)
    # optimisation (published: Adam + StepLR)
    epochs: int = setting(100, "training epochs (annotate.py: of a training started from the page)", MODEL,
                          check=whole(1), must="be >= 1", resumable=True)
    steps: Optional[int] = setting(
        None, f"optimizer steps of the run: N, or (train.py) auto, {STEP_PASSES} passes over the training pixels and "
              f"at least {MIN_STEPS} steps (docs/training.md); train.py then draws batches with replacement and "
              f"validates every --val-every steps (needs --schedule cosine or poly)",
        MODEL, parse=parse_steps, check=lambda v: v is None or v == "auto"
        or whole(1)(v), must="be a whole number of steps >= 1 or auto", neutral=True)
    val_every: int = setting(0, "with --steps: optimizer steps between validations (0 = one pass over the training "
                                f"pixels, at most {MAX_VALIDATIONS} validations in a run)", MODEL, check=whole(0),
                          must="be >= 0", neutral=True)
    batch_size: int = setting(16, "samples per pass: images (or --crop windows) per optimizer step when training, "
                                  "tiles per forward pass when predicting", MODEL, check=whole(1), must="be >= 1")
    lr: float = setting(1e-3, "Adam learning rate", MODEL, check=positive, must="be a positive number")
    weight_decay: float = setting(0.0, "Adam weight decay", MODEL, check=at_least(0), must="be >= 0")
    schedule: str = setting("step", "learning-rate schedule: step (x --lr-gamma every --step-size epochs, published); "
                                    "cosine or poly (power 0.9): from --lr to 0 over the run, every optimizer step, "
                                    "as mmseg and torchgeo do", MODEL, choices=SCHEDULES, neutral=True)
    warmup: int = setting(0, "optimizer steps of linear warm-up to --lr (train.py: with --schedule cosine or poly)",
                          MODEL, check=whole(0),
                          must="be >= 0", neutral=True)
    step_size: int = setting(30, "StepLR step (epochs)", MODEL, check=whole(1), must="be >= 1 epoch")
    lr_gamma: float = setting(0.1, "StepLR factor", MODEL, check=lambda v: positive(v) and v <= 1,
                              must="be in (0, 1]")
    augment: bool = setting(True, "--no-augment: train without the flips and 90-degree rotations of the training "
                                  "patches (on by default)", MODEL)
    # run
    seed: int = setting(0, "seed of the run's random draws (the model init, shuffling and augmentation; an "
                           "assessment's sample points)", RUN)
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...", RUN, role="how")
    amp: bool = setting(False, "bfloat16 autocast on CUDA", RUN, resumable=True)
    workers: int = setting(0, "DataLoader workers (--loader dataloader)", RUN, check=whole(0), must="be >= 0",
                           role="how")
    loader: str = setting("auto", "auto: batches from uint8 tensors cached on the device (resident.py) unless points "
                                  "are redrawn every epoch or the data do not fit; dataloader: the per-item "
                                  "DataLoader", RUN, choices=LOADERS, role="how")
    out: str = setting("checkpoints", "where the command writes: the run's folder of checkpoints, history and "
                                      "figures (train.py), the encoder file (pretrain.py), the sample layer (assess.py "
                                      "sample)", RUN, role="how")
    cache_dir: Optional[str] = setting(
        None, "folder of the decoded-data cache (resident.py), to share it between runs on the same data (default: "
              "<out>/.resident-cache, this run's own folder; nothing is written beside your data unless you name it)",
        RUN, role="how")
    export_clicks: Optional[str] = setting(
        None, "write the clicks the run trains on (read or simulated) before training, by extension: .gpkg/.geojson "
              "(points in map coordinates where the images have them) or .csv (pixels); --clicks reads them back",
        RUN, role="how")
    figures: bool = setting(True, "output.png (curves) and results.png in --out", RUN, role="how")
    exclude: tuple[str, ...] = setting((), "classes left out of the means, e.g. clutter", RUN, parse=parse_names)
    select: str = setting(
        "auto", "the model best_model.pth holds: best (the best val mIoU), last (the end of the run), or auto: best "
                "with dense labels, last when validating on held-out clicks (not a probability sample of the map: "
                "the epoch that scores best on them need not be the best map)", RUN, choices=SELECT, role="how")
    resume: bool = setting(False, "continue from <out>/last.pth (same settings)", RUN, role="how")
    overwrite: bool = setting(False, "replace what is there: the checkpoints --out holds (train.py: another run's), "
                                     "the encoder file (pretrain.py), a sample (its labels too) or earlier estimates "
                                     "(assess.py); never done unasked", RUN, role="how")
    progress: bool = setting(True, "progress bars (--no-progress: none)", RUN, role="how")


@dataclass
class Shared:
    """Settings that several commands take and training does not; each command `reuse`s them from here."""
    checkpoint: Optional[str] = setting(None, "a model written by train.py (infer.py: the one that segments; "
                                              "annotate.py: shown before any training on the page; assess.py sample: "
                                              "its prediction is the map)", RUN)
    threads: Optional[int] = setting(None, "torch CPU threads (default: torch's choice)", RUN,
                                     check=optional(whole(1)), must="be >= 1", role="how")


def settings(cls=None):
    """(name, default, Setting) of every field of a settings dataclass (TrainConfig by default), in order."""
    return [(f.name, f.default, f.metadata["setting"]) for f in dataclasses.fields(cls or TrainConfig)]


RESUMABLE = tuple(n for n, _, s in settings() if s.role == "how" or s.resumable)
NOT_IN_KEY = tuple(n for n, _, s in settings() if s.role == "how")


def neutral_value(default, s):
    """The value at which a neutral setting stays out of the keys: `neutral_at`, else its default."""
    return default if s.neutral_at is None else s.neutral_at


NEUTRAL = {n: neutral_value(d, s) for n, d, s in settings() if s.neutral}
ANNOTATION_FIELDS = tuple(n for n, _, s in settings() if s.annotation)


def key_settings(cfg):
    """The settings that decide what a run computes, as a dict: every field but the "how" ones, and a neutral
    field only when it differs from its default. Read off the instance's own declarations."""
    out = {}
    for f in dataclasses.fields(cfg):
        s, v = f.metadata["setting"], getattr(cfg, f.name)
        if s.role != "how" and not (s.neutral and v == neutral_value(f.default, s)):
            out[f.name] = v
    return out


def annotation_of(cfg):
    """The annotation settings of a run, as the resident cache keys them: a neutral one only when it differs from its
    default (caches of runs without it stay valid), and with --clicks the digest of the click file's content, so that
    clicks edited in place give a new cache."""
    out = {}
    for f in dataclasses.fields(cfg):
        s, v = f.metadata["setting"], getattr(cfg, f.name)
        if s.annotation and not (s.neutral and v == neutral_value(f.default, s)):
            out[f.name] = v
    if cfg.clicks:
        out["clicks_sha256"] = content_digest(cfg.clicks)
    return out


def content_digest(path):
    """sha256 of a file's bytes, or of a folder's files (names and bytes, sorted)."""
    import hashlib
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- rules between settings

def rounds_problems(cfg, epochs):
    """What is wrong with the rounds of a run of `epochs` epochs (validations, with --steps): one per setting."""
    for name in ("self_training", "rounds"):
        v = getattr(cfg, name)
        if v >= epochs:
            yield (f"{name.replace('_', '-')} must be a whole number of rounds below the epochs ({epochs}; "
                   f"0 = off), got {v}")


def _rounds_below_epochs(cfg):
    if cfg.steps is None:  # with --steps the number of validations follows from the data: train.py checks it
        yield from rounds_problems(cfg, cfg.epochs)


def _rounds_need_fixed_points(cfg):
    for name in ("self_training", "rounds", "region_growing", "forest_teacher"):
        if getattr(cfg, name) and ((cfg.points is None and not cfg.clicks) or cfg.resample_each_epoch):
            yield f"{name.replace('_', '-')} needs a fixed point annotation (not dense labels, not redrawn every epoch)"


def dense_labels(cfg):
    """True when the run has dense labels (a patch folder, or --images with --labels); False for --images alone."""
    return not (cfg.images and not cfg.labels)


def _clicks_rules(cfg):
    if cfg.export_clicks and cfg.clicks and Path(cfg.export_clicks).resolve() == Path(cfg.clicks).resolve():
        yield f"--export-clicks {cfg.export_clicks} is the --clicks file this run reads; write the export elsewhere"
    elif cfg.export_clicks and Path(cfg.export_clicks).exists() and not cfg.overwrite:
        yield (f"--export-clicks {cfg.export_clicks} exists already; choose another file, or --overwrite to replace "
               f"it")
    if cfg.clicks and cfg.resample_each_epoch:
        yield "--clicks are a fixed annotation; they cannot be redrawn every epoch (--resample-each-epoch)"
    if dense_labels(cfg):
        if cfg.val_clicks is not None:
            yield ("--val-clicks holds out clicks for validation when there are no dense labels; with dense labels "
                   "the run validates on them (leave out --labels to validate on held-out clicks)")
        return
    if not cfg.clicks:
        yield ("own data needs both --images and --labels folders, or --clicks (a person's clicks) to train "
               "without labels")
        return
    if cfg.rounds:
        yield ("--rounds reveals the class of each model-chosen click from dense labels, and this run has none "
               "(--images without --labels); click those pixels yourself and add them to --clicks, or give --labels")
    if cfg.class_weights == "dense":
        yield "--class-weights dense counts the dense labels, and this run has none; use points (the clicks) or none"
    if cfg.train_ids is not None or cfg.val_ids is not None:
        yield ("without dense labels the run validates on held-out clicks: those of --split's val images, or a "
               "share --val-clicks; train_ids and val_ids apply to dense labels only")
    if cfg.split and cfg.val_clicks is not None:
        yield "--split holds out the clicks on its val images; --val-clicks would hold out a share instead: give one"


def _resident_needs_fixed_points(cfg):
    if cfg.loader == "resident" and cfg.resample_each_epoch:
        yield "--loader resident holds fixed points; points redrawn every epoch need --loader dataloader (or auto)"


def _warmup_needs_a_decay(cfg):
    if cfg.warmup and cfg.schedule == "step":
        yield "--warmup works with --schedule cosine or poly (the step schedule has no per-step warm-up)"


def _steps_rules(cfg):
    if cfg.steps is not None:
        if cfg.schedule == "step":
            yield ("--steps sizes training in optimizer steps; use --schedule cosine or poly (the step schedule "
                   "counts epochs)")
        if cfg.epochs != TrainConfig.epochs:
            yield "give --epochs or --steps, not both (--steps decides how long the run is)"
    elif cfg.val_every:
        yield "--val-every spaces the validations of a --steps run; add --steps N (or auto)"
    if (cfg.steps is not None or cfg.crop) and (cfg.loader == "dataloader" or cfg.resample_each_epoch):
        yield ("--crop and --steps draw batches from the resident tensors (resident.py); they do not work with "
               "--loader dataloader or --resample-each-epoch")


def _one_encoder(cfg):
    if cfg.encoder and cfg.pretrained and cfg.arch == "resnet18":
        yield "--encoder replaces the ImageNet encoder; add --no-pretrained to start from the pretrained file alone"
    if cfg.init and (cfg.encoder or cfg.pretrained and cfg.arch == "resnet18"):
        yield "--init starts from a whole model; leave out --encoder and add --no-pretrained"
    if cfg.init and cfg.resume:
        yield "--resume continues a run where it stopped; --init starts a new run from a model: give one"


def _click_settings_need_click_input(cfg):
    if cfg.click_input == "none":
        for name in ("click_radius", "click_max", "click_none"):
            if getattr(cfg, name) != getattr(TrainConfig, name):
                yield (f"{flag(name)} sets the input clicks of a click-conditioned model; add --click-input disc or "
                       f"distance")


def _share_needs_self_training(cfg):
    if cfg.pseudo_share and not cfg.self_training:
        yield "--pseudo-share chooses the pseudo-labels of --self-training rounds; add --self-training R (R >= 1)"


RULES = (_warmup_needs_a_decay, _steps_rules, _one_encoder, _share_needs_self_training, _rounds_below_epochs,
         _rounds_need_fixed_points, _resident_needs_fixed_points, _clicks_rules, _click_settings_need_click_input)


def flag(name):
    return "--" + name.replace("_", "-")


def check_settings(obj):
    """Each field's choices and check, for any settings dataclass (ValueError naming the flag)."""
    for name, default, s in settings(type(obj)):
        v = getattr(obj, name)
        if s.choices is not None and v not in s.choices and not (v is None is default):  # None: left out
            raise ValueError(f"{s.flag or flag(name)} must be one of {', '.join(map(str, s.choices))}, got {v!r}")
        if s.check is not None and not s.check(v):
            raise ValueError(f"{s.flag or flag(name)} must {s.must}, got {v!r}")


def check_config(cfg):
    """Every argument error before any work (ValueError naming the setting): each field's choices and check,
    then RULES. The device is checked by train.py, which knows the GPUs."""
    check_settings(cfg)
    for rule in RULES:
        for problem in rule(cfg):
            raise ValueError(problem)


# --------------------------------------------------------------------------- command line

def value_types(field):
    """The types a field's value takes, read off its annotation: `Optional[float]` -> [float] (never the default's
    type: a None default says nothing), `tuple[int, ...]` -> [tuple]."""
    kinds = [t for t in get_args(field.type) if t is not type(None)] if get_origin(field.type) is Union \
        else [field.type]
    return [get_origin(t) or t for t in kinds]


def value_type(field):
    """The one type of a field's value (value_types); a Union of several needs a `parse` function."""
    kinds = value_types(field)
    if len(kinds) != 1:
        raise TypeError(f"setting {field.name}: a value of {field.type} needs a parse= function")
    return kinds[0]


def add_arguments(parser, cls=None, grouped=True):
    """One argparse option per field of a settings dataclass (TrainConfig by default) that has a flag, defaults
    from the fields; `grouped`: in argument groups by the settings' group. The only place a flag is added to a
    parser: each option remembers its Setting (`action.setting`), so a test can see that one flag is one
    declaration across every command."""
    groups = {}
    for f in dataclasses.fields(cls or TrainConfig):
        s = f.metadata["setting"]
        if s.flag == "":
            continue
        if grouped and s.group not in groups:
            groups[s.group] = parser.add_argument_group(s.group)
        g = groups[s.group] if grouped else parser
        default, required = f.default, f.metadata.get("required", False)
        if isinstance(default, bool):
            name = s.flag or (f"--no-{f.name.replace('_', '-')}" if default else flag(f.name))
            action = g.add_argument(name, dest=f.name, action="store_false" if default else "store_true",
                                    help=s.help)
        else:
            kind = str if s.parse else value_type(f)  # text of a field with `parse` is parsed by from_args
            shown = default if default is None or isinstance(default, (int, float, str)) else \
                ",".join(map(str, default))
            many = {"nargs": "+"} if tuple in value_types(f) else {}  # --bands 0 1 2 or --bands 0,1,2
            many = {"nargs": s.nargs, "const": s.const} if s.nargs else many
            shown = " (required)" if required else f" (default: {shown})"
            action = g.add_argument(s.flag or flag(f.name), dest=f.name, type=kind, default=default,
                                    choices=s.choices, required=required, **many,
                                    help=f"{s.help}{shown}".replace("%", "%%").replace("%%%%", "%%"))
        action.setting = s
    return parser


def from_args(cls, args, **overrides):
    """The settings dataclass `cls` of parsed arguments (and overrides given in Python). Text of a field with a
    `parse` is parsed here, not by argparse, so that its message (what is accepted) reaches the user as
    `error: ...`, naming its flag."""
    kw = {}
    for name, _, s in settings(cls):
        if hasattr(args, name):
            v = getattr(args, name)
            try:
                kw[name] = s.parse(v) if s.parse and isinstance(v, (str, list)) else v
            except ValueError as e:  # every value error names its flag
                f = s.flag or flag(name)
                raise ValueError(str(e) if f in str(e) else f"{f}: {e}") from None
    return cls(**{**kw, **overrides})


def config_from_args(args, **overrides):
    """The TrainConfig of parsed arguments (from_args)."""
    return from_args(TrainConfig, args, **overrides)


def config_dict(cfg):
    """The settings as JSON-ready values (tuples as lists), as checkpoints and run keys store them."""
    import json
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
