"""Which class weights for a person's clicks? Maps of runs trained on the same clicks, scored against the dense truth.

    python -m research.click_weights --name atlanta-person-clicks --images realdata/atlanta/images \
        --labels realdata/atlanta/labels --classes realdata/atlanta/classes.json \
        --group points checkpoints/w-points-s0 checkpoints/w-points-s1 \
        --group pixels checkpoints/w-pixels-s0 checkpoints/w-pixels-s1

A person clicks what they see (one click in each building, background in clear ground), so the clicks' class shares
are not the map's: weights from the clicks' counts (`--class-weights points`) treat a rare class as common. Each
`--group LABEL RUN...` is a set of train.py run folders (seeds) trained alike; each run's best_model.pth predicts
every image (as infer.py does) and its map is scored against the dense labels: mIoU, per-class IoU, and each class's
share of the map beside its share of the truth; beside them the all-background map and the run's held-out-click
estimate. Writes results/assessment/<name>.md: one row per run, then mean ± std per group, and per-group differences
paired by seed (the runs are listed in seed order).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from raster import image_refs
from research.assessment_study import scores, truth_of
from spec import IGNORE_INDEX, POTSDAM, load_class_file


def prior_of(run):
    """The prior train.py --prior auto gives the run's model (train.map_prior on the run's training data, its
    region growing redone, its class weights): for runs trained before or with --prior off."""
    import dataclasses

    import few_clicks
    from checkpoint import read_checkpoint
    from class_weights import load_class_weights
    from config import TrainConfig
    from train import build_datasets, map_prior
    ck = read_checkpoint(Path(run) / "best_model.pth")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck.config.items() if k in names})
    cfg = dataclasses.replace(cfg, prior="auto")
    train_ds = build_datasets(cfg, ck.spec)[0]
    added = few_clicks.sparse_additions(cfg, train_ds.annotation_stats()["labelled_fraction"])
    cfg = dataclasses.replace(cfg, **added)
    few_clicks.start(cfg, train_ds, None)
    weights = load_class_weights(Path(run) / "class_weights.pt", train_ds.classes.names) \
        if (Path(run) / "class_weights.pt").is_file() else None
    return map_prior(cfg, train_ds, weights)


def run_map(run, images, prior=None):
    """{image name: (class map, valid)} of a run's best_model.pth over the images, as infer.py predicts (under
    `prior` when given: see checkpoint.prior_shift)."""
    from checkpoint import apply_prior, load_model
    from predict import predict_image
    from spec import load_input
    model, ck = load_model(Path(run) / "best_model.pth", "cpu")
    if prior is not None and ck.prior is None:
        apply_prior(model, prior)
    out = {}
    for ref in images:
        inp = load_input(ref.path, ck.spec)
        m = predict_image(model, inp.image, ck.spec.scale)
        valid = np.ones(m.shape, bool) if inp.valid is None else inp.valid
        out[ref.name] = (m, valid)
    return out


def measure(run, images, truth, names, prior=False):
    """The run's map against the truth (with `prior`: under the prior --prior auto gives it), and its last
    held-out-click estimate."""
    p = prior_of(run) if prior else None
    mapped = run_map(run, images, p)
    s = scores(mapped, truth, names, [r.name for r in images], len(names))
    share = sum(np.bincount(m[v], minlength=len(names))[:len(names)] for m, v in mapped.values())
    last = json.loads((Path(run) / "history.json").read_text())[-1]
    return {"run": str(run), "miou": s["miou"], "iou": s["iou"], "map_share": (share / share.sum()).tolist(),
            "click_miou": last.get("val_miou"), "weights": read_weights(run), "prior": p}


def read_weights(run):
    """The class weights the run trained with (class_weights.pt's weights), as a list."""
    import torch
    path = Path(run) / "class_weights.pt"
    return torch.load(path, weights_only=True)["weights"].tolist() if path.is_file() else None


def pm(values, scale=100.0, digits=1):
    v = np.asarray(values, float) * scale
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def report(name, groups, names, truth_share, background):
    lines = [f"# Class weights for a person's clicks: {name}", "",
             f"Written by `python -m research.click_weights {' '.join(sys.argv[1:])}`. Each run's map (its "
             "best_model.pth over every image) is scored against the dense truth; the click estimate is the run's "
             "last held-out-click mIoU, for comparison only (it covers the kind of pixels that were clicked).", "",
             "| run | mIoU % | " + " | ".join(f"IoU {n} %" for n in names) + " | " +
             " | ".join(f"{n} share of the map %" for n in names) + " | click mIoU % |",
             "|---|---:|" + "---:|" * (2 * len(names) + 1)]
    for label, runs in groups.items():
        for r in runs:
            lines.append(f"| {label}: {Path(r['run']).name} | {100 * r['miou']:.1f} | "
                         + " | ".join(f"{100 * v:.1f}" for v in r["iou"].values()) + " | "
                         + " | ".join(f"{100 * v:.1f}" for v in r["map_share"]) + " | "
                         + (f"{100 * r['click_miou']:.1f}" if r["click_miou"] is not None else "n/a") + " |")
    lines += ["", "| group | runs | mIoU % | " + " | ".join(f"IoU {n} %" for n in names) + " | " +
              " | ".join(f"{n} share of the map %" for n in names) + " |", "|---|---:|---:|" + "---:|" * 2 * len(names)]
    for label, runs in groups.items():
        lines.append(f"| {label} | {len(runs)} | {pm([r['miou'] for r in runs])} | "
                     + " | ".join(pm([r["iou"][n] for r in runs]) for n in names) + " | "
                     + " | ".join(pm([r["map_share"][c] for r in runs]) for c in range(len(names))) + " |")
    lines.append(f"| all-background | - | {100 * background['miou']:.1f} | "
                 + " | ".join(f"{100 * v:.1f}" for v in background["iou"].values()) + " | "
                 + " | ".join("100.0" if c == 0 else "0.0" for c in range(len(names))) + " |")
    lines.append("| the truth | - | - | " + " | ".join("-" for _ in names) + " | "
                 + " | ".join(f"{100 * v:.1f}" for v in truth_share) + " |")
    labels = list(groups)
    lines.append("")
    for other in labels[1:]:
        if len(groups[labels[0]]) == len(groups[other]) > 1:
            d = [b["miou"] - a["miou"] for a, b in zip(groups[labels[0]], groups[other])]
            lines.append(f"- {other} minus {labels[0]}, paired by seed: mIoU {pm(d)} points ({len(d)} seeds).")
    if any(r.get("prior") for runs in groups.values() for r in runs):
        lines += ["", "The priors (--prior auto): " + "; ".join(
            f"{Path(r['run']).name}: " + ", ".join(f"{n} {100 * v:.1f} %" for n, v in zip(names, r["prior"]["map"]))
            + " (trained under " + ", ".join(f"{100 * v:.1f} %" for v in r["prior"]["train"]) + ")"
            for label, runs in groups.items() for r in runs if r.get("prior")) + "."]
    return "\n".join(lines) + "\n"


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--classes")
    p.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "RUN"))
    p.add_argument("--prior", action="store_true", help="each group also under the prior --prior auto gives it")
    p.add_argument("--out", default="results/assessment")
    return p


def main(args):
    classes = load_class_file(args.classes) if args.classes else POTSDAM
    names = list(classes.names)
    images = image_refs(args.images)
    truth = truth_of(images, args.labels, classes)
    groups = {}
    for g in args.group:
        groups[g[0]] = [measure(r, images, truth, names) for r in g[1:]]
        if args.prior:
            groups[f"{g[0]} + prior"] = [measure(r, images, truth, names, prior=True) for r in g[1:]]
    flat = np.concatenate([t[t != IGNORE_INDEX] for t in truth.values()])
    truth_share = np.bincount(flat, minlength=len(names))[:len(names)] / flat.size
    background = scores({n: (np.zeros_like(t), np.ones(t.shape, bool)) for n, t in truth.items()}, truth, names,
                        list(truth), len(names))
    text = report(args.name, groups, names, truth_share, background)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
