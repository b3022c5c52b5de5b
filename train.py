"""Train a segmentation model from point annotations and validate it on dense labels.

    python train.py --data archive/patches --points 20000 --class-weights points --decoder skip --epochs 100
    python train.py --data demo_data/patches --no-pretrained --epochs 5      # synthetic demo, random init

Per epoch: one log line (loss, OA and mIoU on the training points, val loss on the val points, val OA / mIoU
on the dense val labels, lr, seconds). Keeps `<out>/best_model.pth` (best val mIoU) and `<out>/last.pth`
(with optimizer state, for --resume); draws `<figures>/output.png` (curves) and `<figures>/results.png`
(image | ground truth | points | prediction).
"""

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from class_weights import compute_class_weights, load_class_weights, save_class_weights
from dataset import (IGNORE_INDEX, POTSDAM, PROCESSING_SIZE, PUBLISHED_TRAIN_IDS, PUBLISHED_VAL_IDS,
                     SegmentationDataset, available_ids, folder_pairs, index_to_colour, load_class_file,
                     load_split, patch_pairs, read_image)
from metrics import ConfusionMatrix
from model import ResNet18Segmentation, load_checkpoint, read_checkpoint, resolve_device, save_checkpoint
from partial_ce_loss import PartialCrossEntropyLoss


# --------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    # data: a patch folder (Images/, Labels/) or two folders of matching names (images + labels)
    data: Optional[str] = "demo_data/patches"
    images: Optional[str] = None
    labels: Optional[str] = None
    split: Optional[str] = None  # JSON {"train": [ids], "val": [ids]}; default: published split if present
    train_ids: Optional[list] = None
    val_ids: Optional[list] = None
    val_fraction: float = 0.125  # without split or published ids: the last 12.5 % of sorted ids (300/2400)
    max_train: Optional[int] = None  # use only the first N training / validation images (quick runs)
    max_val: Optional[int] = None
    classes: Optional[str] = None  # JSON class file; default ISPRS Potsdam colours
    bands: Optional[list] = None  # image band indices; default RGB
    # annotation
    points: Optional[int] = 20000  # per image at native resolution; None = dense labels
    strategy: str = "uniform"  # or "balanced"
    resample_each_epoch: bool = False  # the published code's behaviour: comparison only
    annotation_seed: int = 0
    # loss
    class_weights: str = "points"  # "points", "dense", "none" or a path to class_weights.pt
    gamma: float = 2.0
    normalization: str = "weighted"
    # model
    decoder: str = "skip"  # "plain" is the published decoder
    pretrained: bool = True  # ImageNet encoder through torchvision (needs the weights file or internet)
    size: int = PROCESSING_SIZE  # processing size; published: 300 -> 150
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
    workers: int = 0
    out: str = "checkpoints"
    figures: Optional[str] = "images"
    exclude: tuple = ()  # classes left out of the means (e.g. ("clutter",))
    resume: bool = False
    progress: bool = True


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- data

def resolve_split(cfg):
    """(train pairs, val pairs, description) from the config."""
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
    if cfg.split:
        s = load_split(cfg.split)
        return get(s["train"]), get(s["val"]), f"split file {cfg.split}"
    if cfg.train_ids is not None or cfg.val_ids is not None:
        if cfg.train_ids is None or cfg.val_ids is None:
            raise ValueError("give both train_ids and val_ids")
        return get(cfg.train_ids), get(cfg.val_ids), "explicit ids"
    ids = ids if ids is not None else available_ids(cfg.data)
    if not (cfg.images or cfg.labels) and set(PUBLISHED_TRAIN_IDS + PUBLISHED_VAL_IDS) <= set(ids):
        return get(PUBLISHED_TRAIN_IDS), get(PUBLISHED_VAL_IDS), "published split (0-2099 / 2100-2399)"
    n_val = max(1, int(round(len(ids) * cfg.val_fraction)))
    if len(ids) < 2:
        raise ValueError(f"need at least 2 images to split into train and val, found {len(ids)}")
    return get(ids[:-n_val]), get(ids[-n_val:]), f"last {n_val} of {len(ids)} sorted ids as val"


def _missing(i, folder):
    raise FileNotFoundError(f"id {i} from the split has no image in {folder}")


def build_datasets(cfg):
    classes = load_class_file(cfg.classes) if cfg.classes else POTSDAM
    train_pairs, val_pairs, how = resolve_split(cfg)
    if cfg.max_train or cfg.max_val:
        train_pairs, val_pairs = train_pairs[: cfg.max_train], val_pairs[: cfg.max_val]
        how += f", first {len(train_pairs)} / {len(val_pairs)} used"
    common = dict(points=cfg.points, strategy=cfg.strategy, size=cfg.size, seed=cfg.annotation_seed,
                  classes=classes, bands=cfg.bands)
    train_ds = SegmentationDataset(train_pairs, resample_each_epoch=cfg.resample_each_epoch,
                                   augment=cfg.augment, **common)
    val_ds = SegmentationDataset(val_pairs, **common)
    return train_ds, val_ds, how


def class_weight_tensor(cfg, train_ds, out_dir):
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights in ("points", "dense"):
        w, counts = compute_class_weights(train_ds, cfg.class_weights)
        save_class_weights(out_dir / "class_weights.pt", w, counts, cfg.class_weights, train_ds.classes.names)
        return w
    return load_class_weights(cfg.class_weights, train_ds.classes.names)


# --------------------------------------------------------------------------- one epoch

def run_epoch(model, loader, criterion, device, optimizer=None, amp=False, progress=True, desc=""):
    """Train (optimizer given) or evaluate over a loader. Returns (mean loss, points confusion matrix,
    dense confusion matrix or None). Dense labels are only looked at when evaluating."""
    train = optimizer is not None
    model.train(train)
    k = model.num_classes
    names = loader.dataset.classes.names
    cm_points, cm_dense = ConfusionMatrix(k, names), (None if train else ConfusionMatrix(k, names))
    total, n = 0.0, 0
    use_amp = amp and device.type == "cuda"
    with torch.set_grad_enabled(train):
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["points"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = criterion(logits, y)
            if train:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            pred = logits.argmax(1)
            cm_points.update(pred, y)
            if cm_dense is not None:
                cm_dense.update(pred, batch["label"])
            total += float(loss.detach()) * x.shape[0]
            n += x.shape[0]
    return total / max(n, 1), cm_points, cm_dense


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
def plot_results(model, dataset, path, scale, n=4, device="cpu", title=None):
    """Grid of image | ground truth | points | prediction for the first n samples of a dataset. The
    prediction is what infer.py makes of the native image (infer.predict_image), at the native size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infer import predict_image

    model.eval()
    palette = dataset.classes.palette
    n = min(n, len(dataset))
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n), squeeze=False)
    for r in range(n):
        image_id, image_path, _ = dataset.pairs[r]
        image = read_image(image_path, dataset.bands)
        label = dataset.native_label(r)
        pred = predict_image(model, image, scale, device=device)
        pts = dataset.point_grid(r)
        panels = (image[:, :, :3], index_to_colour(label, palette), index_to_colour(pts, palette),
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

def train(cfg):
    """Train as configured; returns the history (one dict per epoch)."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_ds, val_ds, how = build_datasets(cfg)
    native = train_ds.native_label(0).shape[0]
    scale = cfg.size / native
    weights = class_weight_tensor(cfg, train_ds, out_dir)
    print(f"data: {len(train_ds)} train / {len(val_ds)} val images ({how}); "
          f"{'dense labels' if cfg.points is None else f'{cfg.points} {cfg.strategy} points per image'}"
          f"{' redrawn every epoch (published code, comparison only)' if cfg.resample_each_epoch else ''}; "
          f"processing {cfg.size}x{cfg.size} (scale {scale:g}); device {device}; "
          f"encoder {'ImageNet' if cfg.pretrained else 'random init'}")
    if weights is not None:
        print("class weights (" + cfg.class_weights + "): " +
              ", ".join(f"{n} {w:.2f}" for n, w in zip(train_ds.classes.names, weights.tolist())))

    model = ResNet18Segmentation(train_ds.classes.num_classes, pretrained=cfg.pretrained, decoder=cfg.decoder,
                                 in_channels=train_ds[0]["image"].shape[0]).to(device)
    criterion = PartialCrossEntropyLoss(cfg.gamma, weights, normalization=cfg.normalization).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.lr_gamma)
    history, start, best = [], 1, -math.inf

    config = dataclasses.asdict(cfg)
    last_path, best_path = out_dir / "last.pth", out_dir / "best_model.pth"
    if cfg.resume:
        ckpt = read_checkpoint(last_path)
        if ckpt["model_args"] != {"num_classes": model.num_classes, "decoder": cfg.decoder,
                                  "in_channels": model.in_channels}:
            raise ValueError(f"{last_path} holds a {ckpt['model_args']} model; this run asks for another "
                             f"(decoder {cfg.decoder}): resume with the same settings or a new --out")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        history, best = list(ckpt["history"]), ckpt["best_miou"]
        start = ckpt["epoch"] + 1
        print(f"resumed from {last_path} at epoch {ckpt['epoch']}")

    gen = torch.Generator().manual_seed(cfg.seed)
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                     persistent_workers=cfg.workers > 0 and not cfg.resample_each_epoch)
    train_loader = DataLoader(train_ds, shuffle=True, drop_last=len(train_ds) > cfg.batch_size, generator=gen,
                              **loader_kw)
    val_loader = DataLoader(val_ds, shuffle=False, **loader_kw)
    if cfg.resume and "loader_rng" in ckpt:
        gen.set_state(ckpt["loader_rng"])

    for epoch in range(start, cfg.epochs + 1):
        t0 = time.time()
        train_ds.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        tr_loss, tr_cm, _ = run_epoch(model, train_loader, criterion, device, optimizer, cfg.amp, cfg.progress,
                                      f"epoch {epoch} train")
        scheduler.step()
        va_loss, _, va_cm = run_epoch(model, val_loader, criterion, device, None, cfg.amp, cfg.progress,
                                      f"epoch {epoch} val")
        tr, va = tr_cm.compute(cfg.exclude), va_cm.compute(cfg.exclude)
        h = {"epoch": epoch, "train_loss": tr_loss, "train_oa": tr["oa"], "train_miou": tr["miou"],
             "val_loss": va_loss, "val_oa": va["oa"], "val_miou": va["miou"], "val_mf1": va["mf1"],
             "val_iou": va["iou"], "val_f1": va["f1"], "lr": lr, "seconds": time.time() - t0}
        history.append(h)
        improved = va["miou"] > best
        print(f"epoch {epoch:3d}/{cfg.epochs} | loss {tr_loss:.4f} OA {tr['oa']:.3f} mIoU {tr['miou']:.3f} "
              f"(train points) | val loss {va_loss:.4f} OA {va['oa']:.3f} mIoU {va['miou']:.3f} "
              f"mF1 {va['mf1']:.3f} (dense) | lr {lr:.2e} | {h['seconds']:.1f}s{' *' if improved else ''}",
              flush=True)
        meta = dict(classes=train_ds.classes, scale=scale, config=config, bands=cfg.bands)
        if improved:
            best = va["miou"]
            save_checkpoint(best_path, model, metrics={**va, "epoch": epoch}, extra={"epoch": epoch}, **meta)
        save_checkpoint(last_path, model, metrics={**va, "epoch": epoch}, **meta, extra={
            "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(), "loader_rng": gen.get_state(), "history": history, "best_miou": best})

    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    if cfg.figures and history:
        figures = Path(cfg.figures)
        plot_history(history, figures / "output.png")
        if best_path.is_file():
            best_model, ck = load_checkpoint(best_path, device)
            plot_results(best_model, val_ds, figures / "results.png", scale, device=device,
                         title=f"best epoch {ck['metrics']['epoch']}: val mIoU {ck['metrics']['miou']:.3f}")
    return history


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train from point annotations (see the module docstring).")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="patch folder with Images/ and Labels/")
    g.add_argument("--images", help="own data: folder of images (with --labels; matching file names)")
    g.add_argument("--labels", help="own data: folder of labels")
    g.add_argument("--split", help="split JSON {'train': [ids], 'val': [ids]} (default: the published split "
                                   "when ids 0-2399 exist, else the last --val-fraction of ids)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction)
    g.add_argument("--max-train", type=int, help="use only the first N training images (quick runs)")
    g.add_argument("--max-val", type=int, help="use only the first N validation images")
    g.add_argument("--classes", help="class file JSON (default: ISPRS Potsdam classes and colours)")
    g.add_argument("--bands", help="image bands to use, e.g. 0,1,2,3 (default: RGB)")
    g = p.add_argument_group("annotation and loss")
    g.add_argument("--points", default=str(d.points), help="points per image at native resolution, or 'dense'")
    g.add_argument("--strategy", default=d.strategy, choices=["uniform", "balanced"])
    g.add_argument("--resample-each-epoch", action="store_true",
                   help="redraw points every epoch, as the published code did (comparison only)")
    g.add_argument("--annotation-seed", type=int, default=d.annotation_seed)
    g.add_argument("--class-weights", default=d.class_weights, help="points, dense, none, or a .pt file")
    g.add_argument("--gamma", type=float, default=d.gamma, help="focal exponent (0 = cross-entropy)")
    g.add_argument("--normalization", default=d.normalization, choices=["weighted", "points"])
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--decoder", default=d.decoder, choices=["plain", "skip"], help="plain = published")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="random encoder init (offline); default: ImageNet weights through torchvision")
    g.add_argument("--size", type=int, default=d.size, help="processing size")
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
    g.add_argument("--workers", type=int, default=d.workers)
    g.add_argument("--out", default=d.out, help="checkpoint folder")
    g.add_argument("--figures", default=d.figures, help="folder for output.png and results.png")
    g.add_argument("--exclude", default="", help="classes left out of the means, e.g. clutter")
    g.add_argument("--resume", action="store_true", help="continue from <out>/last.pth")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(args):
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    kw["points"] = None if str(args.points).lower() == "dense" else int(args.points)
    kw["bands"] = [int(b) for b in args.bands.split(",")] if args.bands else None
    kw["exclude"] = tuple(c for c in args.exclude.split(",") if c)
    return TrainConfig(**kw)


def main(args):
    history = train(config_from_args(args))
    best = max(history, key=lambda h: h["val_miou"]) if history else None
    if best:
        print(f"best val mIoU {best['val_miou']:.3f} (OA {best['val_oa']:.3f}) at epoch {best['epoch']}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
