"""Is the click-and-see loop worth it? A simulated person drives annotate.py's HTTP API, round after round.

    python -m research.annotate_loop --preset atlanta --seeds 3   # REAL data (make realdata): results/annotate_loop_atlanta.md
    python -m research.annotate_loop --preset demo --seeds 3      # SYNTHETIC demo data (make demo-data)

The images of the preset's split (training and val images) are put in one folder and annotate.py's server is
started on it (in this process, on a free port of 127.0.0.1). Per seed and strategy: K0 random clicks on every
training image, then rounds of: "train" (POST /api/train: the page's own train.py command), read every image's
prediction back (GET /api/overlay, the class colours), score mIoU on the val images' dense labels, and add K clicks
per training image (POST /api/clicks) where
- `error`: the prediction disagrees with the dense label (what a person who looks at the overlay clicks), spread
  at least SPACING pixels apart, in a random order;
- `random`: anywhere labelled (the baseline at equal clicks).
The class of a click is the dense label's (the simulated person answers correctly). The dense reference is the
same training command on the dense labels (train.py --labels), shown through the same API (annotate --checkpoint)
and scored the same way; "clicks to 0.90" is the first round whose mIoU reaches 0.90 of it. The val images are
never clicked. The table goes to results/annotate_loop_<preset>.md.
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
from checkpoint import PROGRESS_FILE, read_progress
from dataset import read_label
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
TRAIN = ("{python} train.py --images {images} --clicks {clicks} --classes {classes} --no-pretrained --arch resnet18 "
         "--size SIZE --out {out} --epochs {epochs} --overwrite --allow-unclicked --batch-size 8 --no-figures "
         "--no-progress")


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


def run_loop(client, train, val, labels, names, palette, strategy, k0, k, rounds, seed, log):
    """[(clicks per training image, val mIoU)] over the rounds."""
    rng = np.random.default_rng(seed)
    clicked = {name: np.zeros(labels[name].shape, bool) for name, _, _ in train}
    for name, _, _ in train:  # the same first clicks for both strategies (same seed)
        r, c = pick(labels[name] != IGNORE_INDEX, k0, np.random.default_rng([seed, zlib.crc32(name.encode())]))
        client.add(name, r, c, labels[name][r, c])
        clicked[name][r, c] = True
    curve = []
    for rnd in range(rounds + 1):
        run = client.train()
        miou = score(client, val, labels, names, palette)
        per_image = float(np.mean([m.sum() for m in clicked.values()]))
        curve.append((per_image, miou))
        log(f"  {strategy} seed {seed} round {rnd}: {per_image:.0f} clicks per image, {run['steps']} steps in "
            f"{run['elapsed']:.0f} s, val mIoU {miou:.3f}")
        if rnd == rounds:
            break
        for name, _, _ in train:
            label, free = labels[name], (labels[name] != IGNORE_INDEX) & ~clicked[name]
            if strategy == "error":
                wrong = free & (client.prediction(name, label.shape, palette) != label)
                r, c = pick(wrong, k, rng, SPACING)
                if len(r) < k:  # fewer mistakes than clicks: the rest anywhere
                    free2 = free.copy()
                    free2[r, c] = False
                    r2, c2 = pick(free2, k - len(r), rng)
                    r, c = np.concatenate([r, r2]), np.concatenate([c, c2])
            else:
                r, c = pick(free, k, rng)
            client.add(name, r, c, label[r, c])
            clicked[name][r, c] = True
    return curve


def dense_reference(images, labels_dir, classes, split, size, epochs, out, seed, log):
    """Train on the dense labels with the loop's command and seed; returns the checkpoint."""
    cmd = [sys.executable, "train.py", "--images", str(images), "--labels", str(labels_dir), "--split", str(split),
           "--seed", str(seed),
           "--no-pretrained", "--arch", "resnet18", "--size", str(size), "--out", str(out), "--epochs", str(epochs),
           "--points", "dense", "--batch-size", "8", "--no-figures", "--no-progress", "--overwrite"]
    if classes:
        cmd += ["--classes", str(classes)]
    done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"dense reference failed: {done.stderr[-2000:]}")
    run = finished_run(out, "the dense reference")
    log(f"  dense reference trained: {run['steps']} steps in {run['elapsed']:.0f} s ({out / 'last.pth'})")
    return out / "last.pth"


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    p = argparse.ArgumentParser(description="Measure the click-and-see loop (see the module docstring).")
    p.add_argument("--preset", default="atlanta", choices=sorted(PRESETS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--start", type=int, default=2, help="random clicks per training image before the first round")
    p.add_argument("--clicks", type=int, default=2, help="clicks per training image and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8, help="epochs of every training")
    p.add_argument("--out", default=None, help="the table (default results/annotate_loop_<preset>.md)")
    return p


def main(args):
    preset = PRESETS[args.preset]
    if min(args.seeds, args.start, args.clicks, args.epochs) < 1 or args.rounds < 0:
        print("error: --seeds, --start, --clicks and --epochs must be >= 1, --rounds >= 0", file=sys.stderr)
        return 2
    out = Path(args.out or f"results/annotate_loop_{args.preset}.md")
    try:
        train, val = split_files(preset)
    except (FileNotFoundError, KeyError, StopIteration) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = load_class_file(preset["classes"]) if preset["classes"] else POTSDAM
    names, palette = list(classes.names), [tuple(c) for c in classes.palette]
    labels = {name: read_label(label, classes) for name, _, label in train + val}
    lines = []
    log = lambda s: (print(s, flush=True), lines.append(s))
    t0 = time.time()
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, labels_dir = workspace(tmp / "data", train, val)
        split = tmp / "split.json"
        split.write_text(json.dumps({"train": [n for n, _, _ in train], "val": [n for n, _, _ in val]}))
        classes_path = Path(preset["classes"]).resolve() if preset["classes"] else None
        command = TRAIN.replace("SIZE", str(preset["size"]))
        dense = []
        for seed in range(args.seeds):
            ck = dense_reference(images, labels_dir, classes_path, split, preset["size"], args.epochs,
                                 tmp / f"dense{seed}", seed, log)
            client = Client(images, tmp / f"ref{seed}.csv", tmp / f"ref{seed}", classes_path, command, args.epochs)
            client.server.app.training.predict_all(ck)
            dense.append(score(client, val, labels, names, palette))
            client.close()
            log(f"  dense reference seed {seed}: val mIoU {dense[-1]:.3f}")
            for strategy in ("error", "random"):
                client = Client(images, tmp / f"{strategy}{seed}.csv", tmp / f"{strategy}{seed}", classes_path,
                                command + f" --seed {seed}", args.epochs)
                try:
                    curves.setdefault(strategy, []).append(run_loop(client, train, val, labels, names, palette,
                                                                    strategy, args.start, args.clicks, args.rounds,
                                                                    seed, log))
                finally:
                    client.close()
        shutil.rmtree(tmp / "data", ignore_errors=True)
    majority = majority_miou(train, val, labels, names)
    write_table(out, args, preset, curves, dense, majority, time.time() - t0, len(train), len(val))
    print(f"wrote {out}")
    return 0


def majority_miou(train, val, labels, names):
    """The all-background baseline: the training labels' most frequent class everywhere on the val images."""
    counts = sum(np.bincount(labels[n][labels[n] != IGNORE_INDEX], minlength=len(names)) for n, _, _ in train)
    cm = ConfusionMatrix(len(names), names)
    for name, _, _ in val:
        cm.update(np.full(labels[name].shape, int(np.argmax(counts))), labels[name])
    return cm.compute()["miou"]


def write_table(path, args, preset, curves, dense, majority, seconds, n_train, n_val):
    kind = "SYNTHETIC demo data" if preset["synthetic"] else "REAL data (SpaceNet Atlanta, 0.5 m)"
    d = np.array(dense)
    lines = [f"# The click-and-see loop, measured: preset `{args.preset}` ({kind})", "",
             f"Written by `python -m research.annotate_loop --preset {args.preset} --seeds {args.seeds} --start {args.start} "
             f"--clicks {args.clicks} --rounds {args.rounds} --epochs {args.epochs}` in {seconds / 60:.0f} min on "
             f"this machine's CPU. {n_train} training images are clicked, {n_val} val images score (dense labels, "
             f"mIoU at native resolution, read back through the page's overlay). Every training: the page's "
             f"command, ResNet18 from random init, processing size {preset['size']}, {args.epochs} epochs. Mean ± "
             f"std over {args.seeds} seeds.", "",
             f"Dense reference (the same command on the dense labels): **{100 * d.mean():.1f} ± "
             f"{100 * d.std(ddof=1) if len(d) > 1 else 0:.1f} %** mIoU; 0.90 of it = {90 * d.mean():.1f} %. "
             f"All-background (the training labels' majority class everywhere, no model): {100 * majority:.1f} %."
             + (" The dense reference is below it: with this training budget even dense labels do not beat "
                "predicting the majority class, so the click counts below say nothing about the loop."
                if d.mean() <= majority else ""), "",
             "| clicks per training image | error-driven mIoU % | random mIoU % | error minus random (paired) |",
             "|---:|---:|---:|---:|"]
    err, rnd = np.array(curves["error"]), np.array(curves["random"])  # (seeds, rounds + 1, 2)
    for j in range(err.shape[1]):
        e, r = 100 * err[:, j, 1], 100 * rnd[:, j, 1]
        sd = lambda v: f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""
        lines.append(f"| {err[0, j, 0]:.0f} | {e.mean():.1f}{sd(e)} | {r.mean():.1f}{sd(r)} | "
                     f"{(e - r).mean():+.1f}{sd(e - r)} |")
    lines.append("")
    for name, c in (("error-driven", err), ("random", rnd)):
        reach = [next((c[s, j, 0] for j in range(c.shape[1]) if c[s, j, 1] >= 0.9 * dense[s]), None)
                 for s in range(c.shape[0])]
        shown = ", ".join("not reached" if v is None else f"{v:.0f}" for v in reach)
        lines.append(f"- Clicks per training image to reach 0.90 of the dense result, {name}: {shown} (per seed; "
                     f"at most {c[0, -1, 0]:.0f} tried).")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
