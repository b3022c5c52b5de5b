"""Which suggestion rule saves clicks? A simulated person drives annotate.py's HTTP API, round after round, the
page adapting its model to the new clicks.

    python -m research.annotate_loop --preset demo --seeds 3      # SYNTHETIC demo data (make demo-data)
    python -m research.annotate_loop --preset atlanta --seeds 3   # REAL data (make realdata)

The images of the preset's split (training and val images) are put in one folder and annotate.py's server is
started on it (in this process, on a free port of 127.0.0.1). Per seed and rule: K0 random clicks on every
training image (the same for every rule of a seed), then rounds of: Train (POST /api/train: the page's command
with {budget}, so the first Train trains anew for --epochs and every later one adapts the model shown,
`train.py --init <runs>/model.pth --steps N`, N = --adapt-steps), read every image's prediction back (GET
/api/overlay, the class colours), score mIoU on the val images' dense labels, and add K clicks per training image
(POST /api/clicks) chosen by the rule:
- `random`: anywhere labelled (the baseline at equal clicks);
- `error`: where the prediction disagrees with the dense label (what a person who looks at the overlay clicks),
  at least SPACING pixels apart, in a random order;
- `margin`, `entropy`, `spread`, `balanced`: few_clicks.choose_cells' rules on the page's current model (the
  probabilities the page predicted it with, on the processing grid); the centre pixel of each cell chosen is
  clicked (few_clicks.cell_centres, as the page's Suggest).
A rule that finds fewer than K places on an image clicks the rest at random, so every rule has the same clicks.
The class of a click is the dense label's (the simulated person answers correctly). The first model of a seed is
trained once, by its first rule's first Train, and shown to the other rules' pages as `annotate.py --checkpoint`
shows a model (the same clicks and train.py seed would train it again alike). The dense reference is the
same network and first training on the dense labels (train.py --labels --points dense), shown through the same
API (annotate --checkpoint's predict_all) and scored the same way; "clicks to 0.90" is the first round whose mIoU
reaches 0.90 of it. The val images are never clicked. The table goes to results/annotate_suggest_<preset>.md.
"""

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import annotate
import page.training
from checkpoint import PROGRESS_FILE, read_progress
from dataset import read_label
from few_clicks import cell_centres, choose_cells
from metrics import ConfusionMatrix
from spec import IGNORE_INDEX, POTSDAM, load_class_file

HERE = Path(__file__).resolve().parents[1]  # the repository root: train.py runs from there
SPACING = 5  # native pixels between the error-driven clicks of one round on one image
PRESETS = {
    # REAL: SpaceNet Atlanta buildings (make realdata), the split's 30 training and 6 val patches
    "atlanta": dict(images="realdata/atlanta/images", labels="realdata/atlanta/labels",
                    classes="realdata/atlanta/classes.json", split="realdata/atlanta/split.json", size=75,
                    n_train=None, n_val=None, synthetic=False),
    # SYNTHETIC: the demo patches (make demo-data), 40 training and 10 val patches evenly spread over the split
    "demo": dict(images="demo_data/patches/Images", labels="demo_data/patches/Labels", classes=None,
                 split=None, size=75, n_train=40, n_val=10, synthetic=True),
}
NETWORK = "--no-pretrained --arch resnet18 --size SIZE --batch-size 8"  # the loop's and the dense reference's
# the page's command with {budget} (page.training.DEFAULT_TRAIN_COMMAND), at a processing size the CPU affords
TRAIN = ("{python} train.py --images {images} --clicks {clicks} --classes {classes} NETWORK --out {out} {budget} "
         "--overwrite --allow-unclicked --no-figures --no-progress")
RULES = ("random", "error", "margin", "entropy", "spread", "balanced")  # the first is the baseline


# --------------------------------------------------------------------------- the data

def split_files(preset):
    """([(name, image, label)] train, [...] val) of the preset."""
    images, labels = Path(preset["images"]), Path(preset["labels"])
    if not images.is_dir():
        raise FileNotFoundError(f"no folder {images}: " + ("make realdata builds it" if not preset["synthetic"]
                                                           else "make demo-data builds it"))
    if preset["split"]:
        split = json.loads(Path(preset["split"]).read_text())
        by_stem = {p.stem: p for p in images.iterdir()}
        pick = lambda ids: [(str(i), by_stem[str(i)], next(labels.glob(f"{i}.*"))) for i in ids]
        return pick(split["train"]), pick(split["val"])
    ids = sorted(int(p.stem.split("_")[1]) for p in images.glob("Image_*.tif"))
    tr, va = [i for i in ids if i < 2100], [i for i in ids if i >= 2100]
    spread = lambda ids, n: [ids[k * len(ids) // n] for k in range(n)]
    pick = lambda ids: [(f"p{i}", images / f"Image_{i}.tif", labels / f"Label_{i}.tif") for i in ids]
    return pick(spread(tr, preset["n_train"])), pick(spread(va, preset["n_val"]))


def workspace(root, train, val):
    """A folder of images (copies: annotate serves no link that leads out of its folder) and one of labels."""
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, image, label in train + val:
        shutil.copyfile(image, root / "images" / f"{name}{image.suffix}")
        shutil.copyfile(label, root / "labels" / f"{name}{label.suffix}")
    return root / "images", root / "labels"


# --------------------------------------------------------------------------- the HTTP client

class Client:
    def __init__(self, images, clicks, runs, classes, train_command, epochs, adapt_steps=None):
        argv = ["--images", str(images), "--clicks", str(clicks), "--runs", str(runs), "--port", "0",
                "--train-command", train_command, "--epochs", str(epochs)]
        if classes:
            argv += ["--classes", str(classes)]
        if adapt_steps:
            argv += ["--adapt-steps", str(adapt_steps)]
        self.server = annotate.make_server(annotate.get_args_parser().parse_args(argv))
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def call(self, method, path, body=None):
        req = urllib.request.Request(self.base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        with urllib.request.urlopen(req, timeout=600) as r:
            data = r.read()
        return json.loads(data) if r.headers.get("Content-Type", "").startswith("application/json") else data

    def train(self, restart=False, poll=1.0):
        """Train through the page (Train, or Retrain from scratch: `restart`) and wait, asking every `poll`
        seconds; the run's progress (finished_run)."""
        self.call("POST", "/api/train", {"restart": restart})
        while True:
            st = self.call("GET", "/api/train")
            if st["state"] in ("done", "failed"):
                if st["state"] == "failed":
                    raise RuntimeError(f"training failed: {st['message']}")
                return finished_run(self.server.app.training.out, "the page's training")
            time.sleep(poll)

    def show(self, checkpoint):
        """Show a model as `annotate.py --checkpoint` does (predicted, kept as the page's model: the next Train
        adapts it)."""
        self.server.app.training.show(checkpoint)

    def prediction(self, name, shape, palette):
        """(H, W) class indices of an image, read back from the overlay's colours (IGNORE where none)."""
        h, w = shape
        out = np.full((h, w), IGNORE_INDEX, np.uint8)
        for y in range(0, h, 1024):
            for x in range(0, w, 1024):
                tile = np.asarray(Image.open(io.BytesIO(self.call(
                    "GET", f"/api/overlay?image={name}&z=0&x={x // 1024}&y={y // 1024}&size=1024"))).convert("RGBA"))
                rgb, seen = tile[..., :3], tile[..., 3] > 0
                for c, colour in enumerate(palette):
                    out[y:y + tile.shape[0], x:x + tile.shape[1]][seen & (rgb == colour).all(-1)] = c
        return out

    def add(self, name, rows, cols, classes):
        for c in np.unique(classes):
            pts = [[int(x), int(y)] for y, x in zip(rows[classes == c], cols[classes == c])]
            self.call("POST", "/api/clicks", {"op": "add", "image": name, "points": pts, "class": int(c)})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def finished_run(out, what):
    """The progress of the run in `out` (checkpoint.read_progress of train.py's progress file), checked: a run that
    did not end "done" at its last step raises (RuntimeError naming `what`)."""
    run = read_progress(Path(out) / PROGRESS_FILE)
    if run is None or run["status"] != "done" or run["step"] != run["steps"]:
        raise RuntimeError(f"{what}: the run in {out} did not finish its steps (progress: {run})")
    return run


# --------------------------------------------------------------------------- the person

def pick(candidates, k, rng, spacing=0):
    """k flat indices from `candidates` (H, W bool), in a random order, each `spacing` pixels from the others."""
    flat = rng.permutation(np.flatnonzero(candidates))
    w = candidates.shape[1]
    chosen = []
    for j in flat:
        r, c = divmod(int(j), w)
        if all((r - r2) ** 2 + (c - c2) ** 2 >= spacing ** 2 for r2, c2 in chosen):
            chosen.append((r, c))
            if len(chosen) == k:
                break
    return np.array([r for r, _ in chosen], int), np.array([c for _, c in chosen], int)


def score(client, val, labels, names, palette):
    cm = ConfusionMatrix(len(names), names)
    for name, _, _ in val:
        label = labels[name]
        cm.update(client.prediction(name, label.shape, palette), label)
    return cm.compute()["miou"]


def model_clicks(predictions, train, labels, clicked, k, rule):
    """{name: (rows, cols)}: up to k clicks per training image by few_clicks.choose_cells' `rule` on the page's
    predictions of the model shown (annotate's Training.predictions: its probabilities on the processing grid);
    cells holding a click or whose centre pixel is unlabelled are not candidates. The centre pixel of each cell
    chosen is clicked."""
    chosen = {}
    for name, _, _ in train:
        prob = predictions[name]["prob"]
        (H, W), (h, w) = labels[name].shape, prob.shape[1:]
        centres = cell_centres(H, W, h, w).reshape(-1)
        candidates = centres >= 0
        candidates[candidates] = labels[name].reshape(-1)[centres[candidates]] != IGNORE_INDEX
        candidates = candidates.reshape(h, w)
        rows, cols = np.nonzero(clicked[name])
        candidates[rows * h // H, cols * w // W] = False
        chosen[name] = np.divmod(centres[choose_cells(prob, candidates, k, strategy=rule)], W)
    return chosen


def top_up(free, rows, cols, k, rng):
    """rows, cols with random clicks from `free` (H, W bool) added until there are k (or `free` runs out)."""
    if len(rows) >= k:
        return rows, cols
    rest = free.copy()
    rest[rows, cols] = False
    r2, c2 = pick(rest, k - len(rows), rng)
    return np.concatenate([rows, r2]).astype(int), np.concatenate([cols, c2]).astype(int)


def run_loop(client, train, val, labels, names, palette, rule, k0, k, rounds, seed, log, first):
    """[(clicks per training image, val mIoU)] over the rounds: the first Train trains anew, the others adapt. The
    first model depends on the seed only (the same first clicks, the same train.py seed): the first rule of a seed
    trains it and keeps a copy in `first`, the others show that copy (Client.show) instead of training it again."""
    rng = np.random.default_rng(seed)
    clicked = {name: np.zeros(labels[name].shape, bool) for name, _, _ in train}
    for name, _, _ in train:  # the same first clicks for every rule (same seed)
        r, c = pick(labels[name] != IGNORE_INDEX, k0, np.random.default_rng([seed, zlib.crc32(name.encode())]))
        client.add(name, r, c, labels[name][r, c])
        clicked[name][r, c] = True
    curve = []
    for rnd in range(rounds + 1):
        if rnd == 0 and Path(first).is_file():
            client.show(first)
            how = f"the seed's first model ({first.name}) shown"
        else:
            run = client.train()
            how = f"{run['steps']} steps in {run['elapsed']:.0f} s"
            if rnd == 0:
                shutil.copyfile(client.server.app.training.model_path, first)
        miou = score(client, val, labels, names, palette)
        per_image = float(np.mean([m.sum() for m in clicked.values()]))
        curve.append((per_image, miou))
        log(f"  {rule} seed {seed} round {rnd}: {per_image:.0f} clicks per image, {how}, val mIoU {miou:.3f}")
        if rnd == rounds:
            break
        chosen = model_clicks(client.server.app.training.predictions, train, labels, clicked, k, rule) \
            if rule not in ("random", "error") else {}
        for name, _, _ in train:
            label, free = labels[name], (labels[name] != IGNORE_INDEX) & ~clicked[name]
            if rule == "error":
                r, c = pick(free & (client.prediction(name, label.shape, palette) != label), k, rng, SPACING)
            elif rule == "random":
                r, c = pick(free, k, rng)
            else:
                r, c = chosen[name]
            r, c = top_up(free, r, c, k, rng)  # fewer places than clicks: the rest anywhere
            client.add(name, r, c, label[r, c])
            clicked[name][r, c] = True
    return curve


def dense_reference(images, labels_dir, classes, split, size, epochs, out, seed, log):
    """Train the loop's network on the dense labels for the first Train's epochs, with the seed; the checkpoint."""
    cmd = [sys.executable, "train.py", "--images", str(images), "--labels", str(labels_dir), "--split", str(split),
           "--seed", str(seed), *NETWORK.replace("SIZE", str(size)).split(), "--out", str(out), "--epochs",
           str(epochs), "--points", "dense", "--no-figures", "--no-progress", "--overwrite"]
    if classes:
        cmd += ["--classes", str(classes)]
    done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"dense reference failed: {done.stderr[-2000:]}")
    run = finished_run(out, "the dense reference")
    log(f"  dense reference trained: {run['steps']} steps in {run['elapsed']:.0f} s ({out / 'last.pth'})")
    return out / "last.pth"


# --------------------------------------------------------------------------- CLI

def rule_names(text):
    """--strategies: comma-separated names of RULES, random among them (the baseline of the paired differences)."""
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in RULES]
    if unknown or "random" not in names:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated rules of {', '.join(RULES)}, random "
                                         f"among them (the baseline)"
                                         + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    return names


def get_args_parser():
    p = argparse.ArgumentParser(description="Compare click-suggestion rules at equal clicks (see the module "
                                            "docstring).")
    p.add_argument("--preset", default="atlanta", choices=sorted(PRESETS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--start", type=int, default=5, help="random clicks per training image before the first Train")
    p.add_argument("--clicks", type=int, default=5, help="clicks per training image and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of clicks and Train (adapting) after the first")
    p.add_argument("--epochs", type=int, default=8, help="epochs of the first Train (trained anew) and of the dense "
                                                         "reference")
    p.add_argument("--adapt-steps", type=int, default=page.training.ADAPT_STEPS,
                   help="optimizer steps of every later Train, adapting the model shown (annotate.py --adapt-steps)")
    p.add_argument("--strategies", type=rule_names, default=RULES,
                   help=f"comma-separated rules to compare, random among them (default all: {','.join(RULES)})")
    p.add_argument("--out", default=None, help="the table (default results/annotate_suggest_<preset>.md)")
    return p


def main(args):
    preset = PRESETS[args.preset]
    if min(args.seeds, args.start, args.clicks, args.epochs, args.adapt_steps) < 1 or args.rounds < 0:
        print("error: --seeds, --start, --clicks, --epochs and --adapt-steps must be >= 1, --rounds >= 0",
              file=sys.stderr)
        return 2
    out = Path(args.out or f"results/annotate_suggest_{args.preset}.md")
    try:
        train, val = split_files(preset)
    except (FileNotFoundError, KeyError, StopIteration) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = load_class_file(preset["classes"]) if preset["classes"] else POTSDAM
    names, palette = list(classes.names), [tuple(c) for c in classes.palette]
    labels = {name: read_label(label, classes) for name, _, label in train + val}
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.time()
    curves = {}
    majority = majority_miou(train, val, labels, names)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, labels_dir = workspace(tmp / "data", train, val)
        split = tmp / "split.json"
        split.write_text(json.dumps({"train": [n for n, _, _ in train], "val": [n for n, _, _ in val]}))
        classes_path = Path(preset["classes"]).resolve() if preset["classes"] else None
        command = TRAIN.replace("NETWORK", NETWORK).replace("SIZE", str(preset["size"]))
        dense = []
        for seed in range(args.seeds):
            ck = dense_reference(images, labels_dir, classes_path, split, preset["size"], args.epochs,
                                 tmp / f"dense{seed}", seed, log)
            client = Client(images, tmp / f"ref{seed}.csv", tmp / f"ref{seed}", classes_path, command, args.epochs)
            client.server.app.training.predict_all(ck)
            dense.append(score(client, val, labels, names, palette))
            client.close()
            log(f"  dense reference seed {seed}: val mIoU {dense[-1]:.3f}")
            for rule in args.strategies:
                client = Client(images, tmp / f"{rule}{seed}.csv", tmp / f"{rule}{seed}", classes_path,
                                command + f" --seed {seed}", args.epochs, args.adapt_steps)
                try:
                    curves.setdefault(rule, []).append(run_loop(client, train, val, labels, names, palette, rule,
                                                                args.start, args.clicks, args.rounds, seed, log,
                                                                tmp / f"first{seed}.pth"))
                finally:
                    client.close()
            # after every seed, so a run stopped early leaves the seeds it finished
            write_table(out, args, preset, curves, dense, majority, time.time() - t0, len(train), len(val))
            print(f"wrote {out} ({seed + 1} of {args.seeds} seeds)", flush=True)
        shutil.rmtree(tmp / "data", ignore_errors=True)
    return 0


def majority_miou(train, val, labels, names):
    """The all-background baseline: the training labels' most frequent class everywhere on the val images."""
    counts = sum(np.bincount(labels[n][labels[n] != IGNORE_INDEX], minlength=len(names)) for n, _, _ in train)
    cm = ConfusionMatrix(len(names), names)
    for name, _, _ in val:
        cm.update(np.full(labels[name].shape, int(np.argmax(counts))), labels[name])
    return cm.compute()["miou"]


def mean_sd(v):
    """'mean ± sd' of v (sd over seeds, ddof 1; none for one seed), one decimal."""
    return f"{v.mean():.1f}" + (f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else "")


def reached(curve, dense):
    """Clicks per image of the first round whose mIoU reaches 0.90 of `dense`, or None."""
    return next((n for n, m in curve if m >= 0.9 * dense), None)


def write_table(path, args, preset, curves, dense, majority, seconds, n_train, n_val):
    """curves {rule: [seed][round] (clicks per image, mIoU)}; every rule at the same clicks per image."""
    kind = "SYNTHETIC demo data" if preset["synthetic"] else "REAL data (SpaceNet Atlanta, 0.5 m)"
    rules = list(curves)
    c = {rule: np.array(curves[rule], float) for rule in rules}  # (seeds, rounds + 1, 2)
    levels = c["random"][0, :, 0]
    if any(not np.array_equal(c[rule][..., 0], np.broadcast_to(levels, c[rule][..., 0].shape)) for rule in rules):
        raise RuntimeError(f"the rules placed different numbers of clicks: {({r: c[r][..., 0] for r in rules})}")
    d = np.array(dense)
    command = (f"python -m research.annotate_loop --preset {args.preset} --seeds {args.seeds} --start {args.start} "
               f"--clicks {args.clicks} --rounds {args.rounds} --epochs {args.epochs} "
               f"--adapt-steps {args.adapt_steps} --strategies {','.join(rules)}"
               + (f" --out {args.out}" if args.out else ""))
    head = "| rule | " + " | ".join(f"{n:.0f}" for n in levels)
    rule_cell = {"random": "random (baseline)", "error": "error (where the map is wrong)"}
    lines = [f"# Suggestion rules at equal clicks, the page adapting: preset `{args.preset}` ({kind})", "",
             f"Written by `{command}` in {seconds / 60:.0f} min on this machine's CPU. {n_train} training images are "
             f"clicked, {n_val} val images score (dense labels, mIoU at native resolution, read back through the "
             f"page's overlay). The page's train command with {{budget}}, processing size {preset['size']}, "
             f"ResNet18 from random init: the first Train trains anew for {args.epochs} epochs on {args.start} random "
             f"clicks per image (the same clicks and the same first model for every rule of a seed), each later Train "
             f"adapts the model shown for {args.adapt_steps} optimizer steps after {args.clicks} more clicks per image "
             f"chosen by the rule. Mean ± sd over {len(d)} seeds (the seed of the first clicks and of "
             f"train.py)" + (f"; the run was stopped after {len(d)} of its {args.seeds} seeds" if len(d) < args.seeds
                             else "") + ".", "",
             f"Dense reference (the same network, {args.epochs} epochs on the dense labels): **{100 * d.mean():.1f}"
             f"{' ± %.1f' % (100 * d.std(ddof=1)) if len(d) > 1 else ''} %** mIoU; "
             f"0.90 of it = {90 * d.mean():.1f} %. "
             f"All-background (the training labels' majority class everywhere, no model): {100 * majority:.1f} %."
             + (" The dense reference is below it: at this training budget even dense labels do not beat predicting "
                "the majority class, so the rules' differences say little." if d.mean() <= majority else ""), "",
             "## Val mIoU % by clicks per training image", "",
             head + " | clicks per image to 0.90 of dense (per seed) |",
             "|---|" + "---:|" * len(levels) + "---|"]
    for rule in rules:
        reach = [reached(c[rule][s], dense[s]) for s in range(len(dense))]
        shown = ", ".join("not reached" if v is None else f"{v:.0f}" for v in reach)
        lines.append(f"| {rule_cell.get(rule, rule)} | " + " | ".join(mean_sd(100 * c[rule][:, j, 1])
                                                               for j in range(len(levels))) + f" | {shown} |")
    lines += ["", "## Minus random, paired by seed (mIoU points: mean ± sd of the per-seed differences)", "",
              head + " |", "|---|" + "---:|" * len(levels)]
    for rule in [r for r in rules if r != "random"]:
        diff = 100 * (c[rule][..., 1] - c["random"][..., 1])
        lines.append(f"| {rule} | " + " | ".join(("+" if diff[:, j].mean() >= 0 else "") + mean_sd(diff[:, j])
                                                  for j in range(len(levels))) + " |")
    lines += ["", f"At most {levels[-1]:.0f} clicks per image tried. Rules: `margin` smallest gap between the two "
                  "top classes; `entropy` largest entropy; `spread` farthest-point among the 10 x k least sure cells; "
                  "`balanced` the predicted classes in turn, rarest first, least sure of each (few_clicks.choose_cells"
                  "); every rule keeps its clicks of a round 5 processing pixels apart, `error` 5 image pixels.",
              "", "## Per seed (val mIoU %)", "", "| rule | seed | dense | " +
              " | ".join(f"{n:.0f}" for n in levels) + " |", "|---|---:|---:|" + "---:|" * len(levels)]
    for rule in rules:
        for s in range(len(dense)):
            lines.append(f"| {rule} | {s} | {100 * dense[s]:.1f} | " +
                         " | ".join(f"{100 * m:.1f}" for m in c[rule][s, :, 1]) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
