"""How far the numbers of a map can be trusted, where the dense truth is known: the truth stands in for the person
who labels an assessment sample (assess.py), and for the map's real accuracy.

    python -m research.assessment_study --name atlanta-clicks --images realdata/atlanta/images \
        --labels realdata/atlanta/labels --classes realdata/atlanta/classes.json --masks maps/ \
        --run checkpoints/atlanta-clicks --clicks realdata/atlanta/clicks.gpkg

Writes results/assessment/<name>.md (and .json):
- the truth over the map's pixels: overall accuracy, per-class IoU, mIoU, each class's share of the map and of the
  truth, and the all-background baseline;
- the held-out-click estimate of the run (`--run`: its history.json; the last validation, what best_model.pth holds
  by default with clicks, and the best one) beside the true mIoU of the same model on the held-out images and over
  the whole map: its bias;
- for assessments of 100, 200 and 500 points (`--sizes`), over `--repeats` samples drawn as assess.py draws them
  (stratified by map class, a floor per class, never on a training click) and labelled from the truth: how often
  the 95 % intervals of overall accuracy and of each class's area cover the true value, their mean half-width, and
  the mean estimate: what a person's labelling buys.
Run from the repository root (`python -m` puts it on the path).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import assess
import assessment
from annotations import read_clicks
from dataset import read_label
from metrics import ConfusionMatrix
from raster import image_refs
from spec import IGNORE_INDEX, POTSDAM, load_class_file

# --------------------------------------------------------------------------- the truth


def truth_of(images, labels, classes):
    """{image name: dense truth (H, W)} from the label folder: `<stem>.tif|png` or `<stem>_label.tif|png`."""
    out = {}
    for ref in images:
        found = [p for stem in (ref.name, f"{ref.name}_label") for p in Path(labels).glob(f"{stem}.*")]
        if not found:
            raise FileNotFoundError(f"no label of {ref.path.name} in {labels}")
        out[ref.name] = read_label(found[0], classes)
    return out


def scores(mapped, truth, names, keys, k):
    """ConfusionMatrix scores of the map against the truth over the images `keys` (valid, defined pixels)."""
    cm = ConfusionMatrix(k, names)
    for n in keys:
        m, valid = mapped[n]
        t = np.where(valid, truth[n], IGNORE_INDEX)
        cm.update(np.where(valid, m, 0), t)
    return cm.compute()


def population(mapped, truth, images, clicks):
    """(maps, masks, exclusions, truths) in the images' order: the pixels an assessment samples (valid map, defined
    truth: the person can tell), the training clicks excluded."""
    maps, masks, excl, truths = [], [], [], []
    for ref in images:
        m, valid = mapped[ref.name]
        t = truth[ref.name]
        x = np.zeros(m.shape, bool)
        c = clicks.images.get(ref.name) if clicks is not None else None
        if c is not None and len(c):
            x[c.rows, c.cols] = True
        maps.append(m)
        masks.append(valid & (t != IGNORE_INDEX))
        excl.append(x)
        truths.append(t)
    return maps, masks, excl, truths


# --------------------------------------------------------------------------- repeated assessments

def coverage(maps, masks, excl, truths, k, sizes, repeats, seed=0):
    """{n: {"oa": {...}, "area": [{...} per class]}}: over `repeats` stratified samples of n points labelled from the
    truth, the share of 95 % intervals that cover the true value, the mean half-width and the mean estimate."""
    eligible = [v & ~x for v, x in zip(masks, excl)]
    true_oa = sum(int((m[e] == t[e]).sum()) for m, t, e in zip(maps, truths, eligible)) / sum(e.sum() for e in eligible)
    true_area = sum(np.bincount(t[e], minlength=k)[:k] for t, e in zip(truths, eligible)).astype(float)
    counts = assessment.map_counts(maps, masks, excl)
    out = {}
    for n in sizes:
        floor = min(50, max(2, n // (2 * len(counts))))
        plan = assessment.allocate(counts, n=n, floor=floor)
        oa, area = [], []
        for r in range(repeats):
            s = assessment.draw_sample(maps, masks, plan, seed=seed + r, exclude=excl)
            ref = np.array([truths[i][y, x] for i, y, x in zip(s.image, s.row, s.col)])
            e = assessment.estimate(s, ref, classes=tuple(range(k)))
            oa.append((e.oa, e.oa_se))
            area.append(e.area_in())
        oa, a_est = np.array(oa), np.array([a[0] for a in area])
        a_se = np.array([a[1] for a in area])
        half = 1.96 * a_se
        out[n] = {"plan": plan, "floor": floor, "true_oa": true_oa, "true_area": true_area.tolist(),
                  "oa": {"cover": float(np.mean(np.abs(oa[:, 0] - true_oa) <= 1.96 * oa[:, 1])),
                         "half_width": float(np.mean(1.96 * oa[:, 1])), "mean": float(oa[:, 0].mean())},
                  "area": [{"cover": float(np.mean(np.abs(a_est[:, c] - true_area[c]) <= half[:, c])),
                            "half_width": float(np.nanmean(half[:, c])), "mean": float(np.nanmean(a_est[:, c]))}
                           for c in range(k)]}
    return out


# --------------------------------------------------------------------------- the held-out-click estimate

def click_estimate(run):
    """The run's held-out-click scores: {"last": ..., "best": ...} of its history, and its held-out images."""
    history = json.loads((Path(run) / "history.json").read_text())
    if "val_kind" not in history[-1]:
        return None
    from checkpoint import read_checkpoint
    split = read_checkpoint(Path(run) / "last.pth").train_state["split"]
    pick = lambda h: {"epoch": h["epoch"], "step": h["step"], "miou": h["val_miou"], "miou_ci": h["val_miou_ci"],  # noqa
                      "accuracy": h["val_oa"], "accuracy_ci": h["val_oa_ci"], "clicks": h["val_clicks"]}
    return {"last": pick(history[-1]), "best": pick(max(history, key=lambda h: h["val_miou"])),
            "held_out_images": split["val"]}


# --------------------------------------------------------------------------- the report

def report(name, args, names, whole, held, background, shares, clicks_est, cov, pixel_area):
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [f"# Assessment study: {name}", "",
             f"Written by `python -m research.assessment_study {' '.join(sys.argv[1:])}`. The dense truth stands in "
             "for the person who labels the sample and for the map's real accuracy.", "",
             "## The map against the truth", "",
             "| pixels | OA % | mIoU % | " + " | ".join(f"IoU {n} %" for n in names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for label, s in (("whole map", whole), ("held-out images", held), ("all-background, whole map", background)):
        if s is not None:
            lines.append(f"| {label} | {pct(s['oa'])} | {pct(s['miou'])} | "
                         + " | ".join(pct(v) for v in s["iou"].values()) + " |")
    lines += ["", "| class | share of the map % | share of the truth % |", "|---|---:|---:|"]
    lines += [f"| {n} | {pct(a)} | {pct(b)} |" for n, (a, b) in zip(names, shares)]
    if clicks_est:
        lines += ["", "## The held-out-click estimate beside the truth", "",
                  "| model | held-out clicks | click mIoU % (95 % interval) | click accuracy % | true mIoU %, held-out "
                  "images | true mIoU %, whole map |", "|---|---:|---:|---:|---:|---:|"]
        for which in ("last", "best"):
            c = clicks_est[which]
            truth = clicks_est.get(f"truth_{which}")
            lines.append(f"| {which} validation (step {c['step']}) | {c['clicks']} | {pct(c['miou'])} "
                         f"[{pct(c['miou_ci'][0])}, {pct(c['miou_ci'][1])}] | {pct(c['accuracy'])} | "
                         + (f"{pct(truth['held'])} | {pct(truth['whole'])} |" if truth else "n/a | n/a |"))
    lines += ["", "## Repeated assessments labelled from the truth", "",
              f"{args.repeats} stratified samples per size (strata: map classes; floor per class as listed), never on "
              "a training click; estimators of Stehman 2014 (= Olofsson et al. 2014 here). Coverage: share of the "
              "samples whose 95 % interval holds the true value (about 95 % expected).", "",
              "| points | per stratum | OA cover % | OA ± (95 %) | " + " | ".join(
                  f"{n} area cover % | {n} area ± ({'ha' if pixel_area else 'pixels'})" for n in names) + " |",
              "|---:|---|---:|---:|" + "---:|---:|" * len(names)]
    unit = pixel_area / 1e4 if pixel_area else 1.0
    for n, c in cov.items():
        plan = ", ".join(f"{names[h]} {v}" for h, v in c["plan"].items())
        lines.append(f"| {n} | {plan} | {pct(c['oa']['cover'])} | {c['oa']['half_width']:.3f} | " + " | ".join(
            f"{pct(a['cover'])} | {a['half_width'] * unit:,.{2 if pixel_area else 0}f}" for a in c["area"]) + " |")
    first = next(iter(cov.values()))
    lines += ["", "True values: OA " + f"{first['true_oa']:.3f}; area " + ", ".join(
        f"{n} {a * unit:,.{2 if pixel_area else 0}f} {'ha' if pixel_area else 'pixels'}"
        for n, a in zip(names, first["true_area"])) + "; the map says " + ", ".join(
        f"{n} {a * unit:,.{2 if pixel_area else 0}f}" for n, a in zip(names, first["mapped_area"])) + "."]
    return "\n".join(lines) + "\n"


def walk(images, mapped, truth, classes, clicks, n, out_prefix, seed=0):
    """The analyst's walk with assess.py: one stratified sample of n points drawn from the map (never on a training
    click), saved as the layer a person labels, labelled from the truth one point at a time as the page saves them,
    and estimated; writes `<out_prefix>.csv/.md` (assess's tables). Returns the seconds each label took to save
    (the page's cost per point, not the person's)."""
    import tempfile
    import time
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "assessment.gpkg"
        floor = min(50, n // (2 * len(classes.names)))
        design = assess.draw(images, mapped, classes, n=n, floor=floor, seed=seed, clicks=clicks)
        assess.write_sample(sample, design, images)
        assess.design_path(sample).write_text(json.dumps(design))
        a = assess.Assessment.open(sample, [r.path for r in images], classes)
        saves = []
        for p in a.points():
            if truth[p["image"]][p["row"], p["col"]] != IGNORE_INDEX:
                t0 = time.perf_counter()
                a.set_reference(p["id"], int(truth[p["image"]][p["row"], p["col"]]))
                saves.append(time.perf_counter() - t0)
        mapped_pixels = {int(c): v for c, v in design["mapped_pixels"].items()}
        assessment.write_tables(a.estimates(), out_prefix, classes.names, design["pixel_area_m2"], overwrite=True,
                                mapped_pixels=mapped_pixels, labelled=(len(a.reference), len(design["points"])))
        return saves


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the report's name: results/assessment/<name>.md")
    p.add_argument("--images", required=True)
    p.add_argument("--labels", required=True, help="the dense truth: <stem>.tif or <stem>_label.tif per image")
    p.add_argument("--classes", help="class file (default: ISPRS Potsdam)")
    p.add_argument("--masks", required=True, help="the map: infer.py's masks of the images")
    p.add_argument("--run", help="train.py's --out of the model that made the map (its held-out-click estimate)")
    p.add_argument("--clicks", help="the training clicks (never sampled)")
    p.add_argument("--sizes", default="100,200,500")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--walk", type=int, default=200, help="points of the one assessment written as assess.py writes "
                                                        "it: <out>/<name>-walk_estimates.md (0: none)")
    p.add_argument("--out", default="results/assessment")
    return p


def main(args):
    classes = load_class_file(args.classes) if args.classes else POTSDAM
    names, k = list(classes.names), len(classes.names)
    images = image_refs(args.images)
    mapped = assess.masks_map(images, args.masks)
    truth = truth_of(images, args.labels, classes)
    keys = [r.name for r in images]
    whole = scores(mapped, truth, names, keys, k)
    background = scores({n: (np.zeros_like(m), v) for n, (m, v) in mapped.items()}, truth, names, keys, k)
    clicks = read_clicks(args.clicks, args.images, classes) if args.clicks else None
    maps, masks, excl, truths = population(mapped, truth, images, clicks)
    mapped_share = sum(np.bincount(m[v], minlength=k)[:k] for m, v in zip(maps, masks)).astype(float)
    true_share = sum(np.bincount(t[v], minlength=k)[:k] for t, v in zip(truths, masks)).astype(float)
    shares = list(zip(mapped_share / mapped_share.sum(), true_share / true_share.sum()))
    clicks_est = click_estimate(args.run) if args.run else None
    held = None
    if clicks_est:
        held = scores(mapped, truth, names, clicks_est["held_out_images"], k)
        clicks_est["truth_last"] = {"held": held["miou"], "whole": whole["miou"]}  # the map is the last model's
    cov = coverage(maps, masks, excl, truths, k, [int(s) for s in args.sizes.split(",")], args.repeats)
    eligible = [v & ~x for v, x in zip(masks, excl)]
    for c in cov.values():
        c["mapped_area"] = sum(np.bincount(m[e], minlength=k)[:k] for m, e in zip(maps, eligible)).tolist()
    pixel_area = assess.pixel_area_m2(images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = report(args.name, args, names, whole, held, background, shares, clicks_est, cov, pixel_area)
    (out / f"{args.name}.md").write_text(text)
    (out / f"{args.name}.json").write_text(json.dumps({"whole": whole, "held": held, "background": background,
                                                       "shares": shares, "clicks": clicks_est, "coverage": cov,
                                                       "pixel_area_m2": pixel_area}, indent=1, default=float))
    if args.walk:
        saves = walk(images, mapped, truth, classes, clicks, args.walk, out / f"{args.name}-walk_estimates")
        text += (f"\nOne assessment of {args.walk} points as assess.py draws and the page saves it (labelled from the "
                 f"truth): [{args.name}-walk_estimates.md]({args.name}-walk_estimates.md); saving a label took "
                 f"{1000 * np.median(saves):.0f} ms (median; at most {1000 * max(saves):.0f} ms) on this machine. A "
                 f"person's time per point is not measured here: the cost of an assessment is its points times "
                 f"that.\n")
        (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
