"""The page's model: one training at a time in a background process (train.py, adapting the model shown to the
clicks as they are now), the prediction of every image on its processing grid, the overlay tiles drawn from it,
what the last round changed, and the places suggested to click next.
"""

import json
import os
import shlex
import shutil
import string
import subprocess
import sys
import threading
import time
import zlib
from http import HTTPStatus
from pathlib import Path

import numpy as np

from page import bounds
from page.bounds import HTTPError
from raster import atomic_path

HERE = Path(__file__).resolve().parents[1]  # the repository folder: where the train command runs
PREDICT_GRID_PIXELS = 16_000_000  # processing-grid pixels of an image predicted here; larger: run infer.py
# --allow-unclicked: mid-annotation, classes nobody has clicked yet must not stop the loop (train.py names them).
# --no-figures: the page draws its own overlay; the run's figures would add seconds to every round.
# {budget}: `--epochs E` for a training anew, `--init MODEL --steps N --schedule cosine --val-every N` to adapt the
# page's model (Training.budget); a command that names {epochs} instead always trains anew.
DEFAULT_TRAIN_COMMAND = ("{python} train.py --images {images} --clicks {clicks} --classes {classes} --no-pretrained "
                         "--arch resnet18 --out {out} {budget} --overwrite --allow-unclicked --no-figures")
TRAIN_FIELDS = ("python", "images", "clicks", "classes", "out", "epochs", "budget")  # the {...} a command may name
BUDGET = "{budget}"  # a token of its own: it expands into several arguments
ADAPT_STEPS = 5  # optimizer steps of an adaptation; docs/annotate.md says how it was chosen (results/annotate_*)
CHANGED_COLOUR = (255, 0, 255)  # the "changed" layer: pixels whose class differs from the previous model's
# The next Train's train.py, started ahead (WarmTrainer) once a round is shown: it imports train.py (torch, rasterio,
# scikit-learn: about 4 s of a round on 2 CPU cores) while the person looks at the map and clicks, then reads the
# round's arguments (one JSON line on stdin) and runs train.main on them, as `python train.py ARGS` does.
WARM_TRAIN = ("import json, sys, time\n"
              "t = time.perf_counter()\n"
              "sys.argv[0] = 'train.py'\n"
              "import train\n"
              "print(f'warm: train.py imported in {time.perf_counter() - t:.1f} s, before Train', flush=True)\n"
              "line = sys.stdin.readline()\n"
              "sys.exit(train.main(train.get_args_parser().parse_args(json.loads(line))) if line.strip() else 0)\n")
# Suggest's rules; the default is random: with the page adapting, no model-driven rule beat random clicks at equal
# clicks (results/annotate_suggest_demo.md, SYNTHETIC, 3 seeds: margin -5.5 +- 8.9 mIoU at 20 clicks per image, the
# others lower still); `rule=margin` keeps the least-sure places for whoever wants them.
SUGGEST_RULES = ("random", "margin")
SUGGEST_RULE = "random"


def check_train_command(command, source="--train-command"):
    """Refuse (ValueError "--train-command ...: what") a train command whose {...} fields are not TRAIN_FIELDS, whose
    {budget} is not a token of its own or comes with {epochs} (an adaptation's --steps would meet --epochs), or whose
    program cannot be found (on PATH, or a path from the repository folder, where it runs): found at start, not at
    the first Train."""
    try:
        tokens = shlex.split(command)
    except ValueError as e:
        raise ValueError(f"{source} {command!r}: {e}") from None
    if not tokens:
        raise ValueError(f"{source} is empty: give the training command")
    known = ", ".join("{" + f + "}" for f in TRAIN_FIELDS)
    for tok in tokens:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(tok) if f is not None]
            unknown = [f for f in fields if f not in TRAIN_FIELDS]
            if unknown:
                raise ValueError(f"unknown field {{{unknown[0]}}}")
            tok.format(**{f: "x" for f in TRAIN_FIELDS})
        except (ValueError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"{source} {command!r}: {tok!r}: {e}; the fields are {known} (write {{{{ and }}}} for a "
                             f"literal brace)") from None
        if "budget" in fields and tok != BUDGET:
            raise ValueError(f"{source} {command!r}: {tok!r}: {BUDGET} stands alone (it expands into several "
                             f"arguments: --epochs E, or --init MODEL --steps N ...)")
    named = {f for tok in tokens for _, f, _, _ in string.Formatter().parse(tok) if f}
    if {"budget", "epochs"} <= named:
        raise ValueError(f"{source} {command!r}: name {BUDGET} or {{epochs}}, not both ({BUDGET} gives --epochs when "
                         f"training anew, and --steps when adapting, which train.py refuses beside --epochs)")
    program = tokens[0].format(python=sys.executable, **{f: "" for f in TRAIN_FIELDS if f != "python"})
    path = HERE / program  # an absolute path stays itself
    if not (shutil.which(program) if "/" not in program else path.is_file() and os.access(path, os.X_OK)):
        raise ValueError(f"{source} {command!r}: the program {program!r} is not found "
                         + ("on PATH" if "/" not in program else f"(or not executable) from {HERE}"))


class Training:
    """One training at a time in a background process (the train command), then the prediction of every image
    (class map and margin on the processing grid) for the overlay and for suggestions. The command trains on the
    images the page serves: `<runs>/images` holds a link to each (remade at each Train), so a file the page lists
    as not served (unreadable, a link out of the folder) never reaches train.py. Progress comes from the run's
    progress file (checkpoint.read_progress).

    A Train adapts the page's model when there is one: the model shown is kept as `<runs>/model.pth` (a hard link
    to the checkpoint it was predicted from, or a copy where links cannot be made; train.py replaces checkpoints by
    rename, never in place, so the next run's --overwrite leaves it as it is) and the command's {budget} becomes
    `--init <runs>/model.pth --steps N --schedule cosine --val-every N`: the weights and preprocessing contract of
    that model, fine-tuned on the clicks as they are now for `adapt_steps` optimizer steps (a fresh optimizer: its
    state is not carried over), scored once on the held-out clicks at the end. The first Train, a restart
    (Retrain from scratch) and any Train of a command without {budget} train anew: {budget} is `--epochs E`.
    After each prediction the class maps are compared with the previous model's (`changed`): the "changed"
    overlay layer and, per image, the number of image pixels whose class changed."""

    def __init__(self, command, images, click_file, classes, classes_path, runs, epochs, device="cpu",
                 adapt_steps=ADAPT_STEPS):
        self.command, self.images, self.click_file = command, images, click_file
        self.classes, self.classes_path, self.runs = classes, classes_path, Path(runs).resolve()
        self.epochs, self.device, self.adapt_steps = epochs, device, adapt_steps
        self.out = self.runs / "run"
        self.model_path = self.runs / "model.pth"  # the page's model: what the next Train adapts
        self.served = self.runs / "images"
        self.log_path = self.runs / "train.log"
        self.state = {"state": "idle", "epoch": 0, "epochs": epochs, "step": 0, "steps": None, "unit": None,
                      "loss": None, "val": {}, "message": "", "log": [], "metrics": {}, "model": 0, "predicted": [],
                      "skipped": {}, "how": None, "from_model": None, "changed": None, "seconds": {}}
        self.predictions = {}  # name -> {"classes": (h, w) uint8, "margin": (h, w) float32, "prob": (C, h, w)}
        self.changed = {}  # name -> (h, w) bool: class differs from the previous model's (on this model's grid)
        self._lock = threading.Lock()
        self._proc = None
        self._warm = None  # the next Train's train.py, imported and waiting (WarmTrainer), once a round is shown

    @property
    def adapts(self):
        """Whether the command can adapt a model: it names {budget} (one that names {epochs} always trains anew)."""
        return BUDGET in shlex.split(self.command)

    @property
    def warms(self):
        """Whether the next round's train.py can be started ahead: the command runs `{python} train.py`."""
        return shlex.split(self.command)[:2] == ["{python}", "train.py"]

    def warm_up(self):
        """Start the next Train's train.py now (WarmTrainer), unless one is waiting or the command cannot."""
        if self.warms and (self._warm is None or self._warm.proc.poll() is not None):
            self._warm = WarmTrainer({**os.environ, "PYTHONUNBUFFERED": "1"})

    def close(self):
        """Stop the waiting train.py (the server is closing)."""
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.close()

    def budget(self, epochs, init=None):
        """The arguments {budget} stands for: `--epochs E` to train anew; to adapt the model `init`, its weights
        and a budget of `adapt_steps` optimizer steps on a cosine schedule, validated once, at the end."""
        if init is None:
            return ["--epochs", str(epochs)]
        n = str(self.adapt_steps)
        return ["--init", str(init), "--steps", n, "--schedule", "cosine", "--val-every", n]

    def argv(self, epochs, init=None):
        subs = {"python": sys.executable, "images": str(self.served), "clicks": str(self.click_file.path),
                "classes": str(self.classes_path), "out": str(self.out), "epochs": str(epochs)}
        argv = []
        for tok in shlex.split(self.command):
            argv += self.budget(epochs, init) if tok == BUDGET else [tok.format(**subs)]
        return argv

    def link_served_images(self):
        """Make `<runs>/images` hold one link per served image, nothing else (links left from before removed)."""
        self.served.mkdir(parents=True, exist_ok=True)
        for p in self.served.iterdir():
            if not p.is_symlink():
                raise HTTPError(HTTPStatus.CONFLICT, f"{p}: not a link; {self.served} is annotate's own folder of "
                                                     f"links to the served images: move that file away")
            p.unlink()
        for ref in self.images.refs.values():
            (self.served / ref.path.name).symlink_to(ref.path)

    def status(self):
        with self._lock:
            if self.state["state"] == "running":
                self._progress()
            warm = self._warm
            return {**json.loads(json.dumps(self.state)), "warm_ready": warm is not None and warm.ready}

    def _progress(self):
        """Fold the progress file into the state (under the lock)."""
        from checkpoint import PROGRESS_FILE, read_progress  # torch comes with it: the server starts without
        try:
            run = read_progress(self.out / PROGRESS_FILE)
        except (OSError, ValueError) as e:
            self.state["message"] = f"progress unreadable: {e}"
            return
        if run:
            self.state.update({k: run[k] for k in ("unit", "epoch", "epochs", "step", "steps", "loss", "val")})

    def start(self, epochs=None, restart=False):
        """Start a training: adapt the model shown (unless `restart`, or the command cannot adapt, or there is none
        yet), else train anew for `epochs` epochs (default --epochs). 400 for a bad value or no clicks, 409 while one
        runs."""
        if epochs is None:
            epochs = self.epochs
        if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= bounds.MAX_EPOCHS:
            raise HTTPError(HTTPStatus.BAD_REQUEST,
                            f"epochs must be a whole number 1..{bounds.MAX_EPOCHS}, got {epochs!r}")
        if not isinstance(restart, bool):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"restart must be true or false, got {restart!r}")
        with self._lock:
            if self.state["state"] in ("running", "predicting"):
                raise HTTPError(HTTPStatus.CONFLICT, "a training is already running; wait for it to finish")
            if sum(len(v) for v in self.click_file.read().values()) == 0:
                raise HTTPError(HTTPStatus.BAD_REQUEST, "no clicks yet: click some points of each class first")
            shown = self.state["model"]
            adapt = not restart and shown > 0 and self.adapts and self.model_path.is_file()
            self.runs.mkdir(parents=True, exist_ok=True)
            if not Path(self.classes_path).exists():
                Path(self.classes_path).write_text(json.dumps(self.classes.to_dict(), indent=1))
            self.link_served_images()
            from checkpoint import PROGRESS_FILE  # torch comes with it: imported when a training starts
            (self.out / PROGRESS_FILE).unlink(missing_ok=True)  # no progress of the last run shown as this one's
            argv = self.argv(epochs, self.model_path if adapt else None)
            log = open(self.log_path, "w")
            log.write("$ " + shlex.join(argv) + "\n")
            log.flush()
            warm, self._warm = self._warm, None
            self._proc = warm.run(argv[2:]) if warm is not None and self.warms else None
            if self._proc is None:  # none waiting (the first round), or it could not take the arguments
                warm = None
                self._proc = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if adapt:
                how = f"adapting model {shown}: {self.adapt_steps} steps on the clicks as they are now"
            else:
                how = f"training anew: {epochs} epochs" + (
                    f" (the train command names {{epochs}}, not {BUDGET}: it cannot adapt a model)"
                    if shown and not restart and not self.adapts else "")
            self.state.update(state="running", epoch=0, epochs=epochs, step=0, steps=None, unit=None, loss=None,
                              val={}, message=how, log=[], metrics={}, how="adapt" if adapt else "anew",
                              from_model=shown if adapt else None, seconds={}, warm=warm is not None)
            started = time.monotonic()
        threading.Thread(target=self._watch, args=(self._proc, log, started, warm), daemon=True).start()
        return self.status()

    def _watch(self, proc, log, started, warm=None):
        tail = []
        if warm is not None:  # its first line (the imports done) was read ahead
            warm.reader.join()
            log.writelines(warm.first)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail = (tail + [line.rstrip()])[-15:]
            with self._lock:
                self.state["log"] = tail
        rc = proc.wait()
        log.close()
        trained = time.monotonic()
        with self._lock:
            self._progress()
            self.state["seconds"] = {"train": round(trained - started, 2)}
        if rc != 0:
            with self._lock:
                self.state.update(state="failed", message=f"training stopped with exit code {rc}; see {self.log_path}")
            self.warm_up()
            return
        with self._lock:
            self.state.update(state="predicting", message="predicting the images")
        try:
            self.predict_all()
        except Exception as e:  # shown on the page; the server goes on
            with self._lock:
                self.state.update(state="failed", message=f"prediction failed: {type(e).__name__}: {e}")
            return
        self.warm_up()  # after the prediction: its import does not slow this round
        with self._lock:
            s = self.state
            s["seconds"]["predict"] = round(time.monotonic() - trained, 2)
            s.update(state="done", model=s["model"] + 1,
                     message=f"adapted from model {s['from_model']} ({self.adapt_steps} steps)" if s["how"] == "adapt"
                     else f"trained anew ({s['epochs']} epochs)" if s["unit"] == "epoch" else "trained anew")

    def checkpoint_path(self):
        """The model at the end of the training: it has learnt from every click. (best_model.pth is chosen on a
        handful of held-out clicks: noisy, often an early epoch, so the overlay would lag behind the clicks.)"""
        for name in ("last.pth", "best_model.pth"):
            if (self.out / name).is_file():
                return self.out / name
        raise FileNotFoundError(f"the training wrote no checkpoint into {self.out}")

    def keep_model(self, checkpoint):
        """Make `<runs>/model.pth` the checkpoint shown (a hard link, or a copy where links cannot be made), so the
        next Train can adapt it whatever the next run writes into its folder."""
        checkpoint = Path(checkpoint).resolve()
        if checkpoint == self.model_path:
            return
        self.runs.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.model_path) as tmp:
            try:
                os.link(checkpoint, tmp)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(checkpoint, tmp)

    def predict_all(self, checkpoint=None):
        import torch  # the server starts without it; only a prediction needs it
        from checkpoint import load_model
        from few_clicks import margin
        from predict import predict_probabilities
        from spec import grid_size, load_input, to_grid
        checkpoint = Path(checkpoint or self.checkpoint_path())
        model, ck = load_model(checkpoint, self.device)
        check_classes(checkpoint, ck.spec.classes, self.classes)
        metrics = held_out_metrics(checkpoint.parent / "history.json", ck.epoch)
        preds, skipped = {}, {}
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        for name, ref in self.images.refs.items():
            h, w = grid_size(*ref.shape, ck.spec.scale)
            if h * w > PREDICT_GRID_PIXELS:
                skipped[name] = f"{h} x {w} processing pixels: too large to predict here; run infer.py on it"
                continue
            try:
                small = to_grid(load_input(ref.path, ck.spec).image, ck.spec.scale)
                prob = predict_probabilities(model, small, 1.0)  # (C, h, w) on the processing grid
            except Exception as e:  # one bad image does not stop the others
                skipped[name] = f"{type(e).__name__}: {e}"
                continue
            preds[name] = {"classes": prob.argmax(0).astype(np.uint8), "margin": margin(prob).astype(np.float32),
                           "prob": prob}
        self.keep_model(checkpoint)
        with self._lock:
            changed = changed_maps(self.predictions, preds, self.images.refs)
            self.changed = changed
            self.state.update(metrics=metrics, predicted=sorted(preds), skipped=skipped,
                              checkpoint=checkpoint.name,
                              changed=changed_summary(changed, self.images.refs, self.state["model"]))
            self.predictions = preds

    def show(self, checkpoint):
        """Show a model before any training (`--checkpoint`): its prediction, kept as model 1, which Train
        adapts."""
        self.predict_all(checkpoint)
        self.state.update(state="done", model=1, message=f"showing {checkpoint}")
        self.warm_up()


class WarmTrainer:
    """A train.py process started ahead (WARM_TRAIN): its imports run while the person clicks; `ready` once they are
    done (its first line said so), `run` hands it a round's arguments."""

    def __init__(self, env):
        self.proc = subprocess.Popen([sys.executable, "-c", WARM_TRAIN], cwd=HERE, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        self.first = []
        self.reader = threading.Thread(target=lambda: self.first.append(self.proc.stdout.readline()), daemon=True)
        self.reader.start()

    @property
    def ready(self):
        return not self.reader.is_alive() and self.proc.poll() is None

    def run(self, args):
        """The process, training on `args` as `python train.py ARGS` would; None when it has died (an import failed:
        the caller starts train.py the usual way, whose log then says why)."""
        try:
            self.proc.stdin.write(json.dumps(args) + "\n")
            self.proc.stdin.close()
        except OSError:  # BrokenPipeError: it is gone
            self.close()
            return None
        return self.proc

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def changed_maps(before, after, refs):
    """{image name: (h, w) bool}: the cells of `after`'s class maps (on its processing grid) whose class differs
    from `before`'s, for each image both predicted. Where the grids differ (another scale), `before` is looked up
    at the image pixel each cell of `after` starts at (the overlay's rule, points_to_grid's)."""
    out = {}
    for name, new in after.items():
        old = before.get(name)
        if old is None:
            continue
        a, b = old["classes"], new["classes"]
        if a.shape != b.shape:
            H, W = refs[name].shape
            rows = (np.arange(b.shape[0]) * H // b.shape[0]) * a.shape[0] // H
            cols = (np.arange(b.shape[1]) * W // b.shape[1]) * a.shape[1] // W
            a = a[np.ix_(rows, cols)]
        out[name] = a != b
    return out


def image_pixels(cells, shape):
    """How many pixels of an image of `shape` (H, W) show the True cells of `cells` (h, w) in the overlay (image row
    y shows grid row y * h // H, column alike)."""
    (H, W), (h, w) = shape, cells.shape
    rows = np.bincount(np.arange(H) * h // H, minlength=h)
    cols = np.bincount(np.arange(W) * w // W, minlength=w)
    return int(rows @ cells.astype(np.int64) @ cols)


def changed_summary(changed, refs, since):
    """The status's `changed`: the model compared with (`since`: its number; None for the first model), and per
    image the pixels whose class changed and their share of the image."""
    if not since:
        return {"since": None, "pixels": {}, "share": {},
                "note": "the first model: no earlier prediction to compare with"}
    pixels = {n: image_pixels(c, refs[n].shape) for n, c in sorted(changed.items())}
    return {"since": since, "pixels": pixels,
            "share": {n: p / (refs[n].shape[0] * refs[n].shape[1]) for n, p in pixels.items()},
            "note": f"pixels whose class differs from model {since}'s"}


def check_classes(checkpoint, model_classes, classes):
    """Refuse (ValueError naming both lists) a model whose classes are not the page's: its suggestions would name
    the wrong classes and its class indices would run past the page's palette."""
    if tuple(model_classes.names) != tuple(classes.names):
        raise ValueError(f"{checkpoint}: the model's {model_classes.num_classes} classes {list(model_classes.names)} "
                         f"are not the page's {classes.num_classes} classes {list(classes.names)}; pass the class "
                         f"file the model was trained with (--classes), or another checkpoint")


def held_out_metrics(path, epoch=None):
    """The validation numbers of the epoch the checkpoint is from (else the last): every `val_*` key of
    history.json, as train.py --clicks writes them (accuracy on held-out clicks and its interval)."""
    try:
        history = json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(history, list) or not history:
        return {}
    row = next((h for h in history if isinstance(h, dict) and h.get("epoch") == epoch), history[-1])
    out = {k: v for k, v in row.items() if k.startswith("val_")}
    out["epoch"] = row.get("epoch")
    from checkpoint import json_ready  # torch comes with it: called once a model is predicted
    return json_ready(out)


def tile_cells(shape, grid_shape, x0, y0, x1, y1, step):
    """(rows, cols): the processing-grid cells that image pixels [y0, y1) x [x0, x1), every `step`-th, of an image
    of `shape` (H, W) show in the overlay (points_to_grid's rule)."""
    (H, W), (h, w) = shape, grid_shape
    return (np.arange(y0, y1, step) * h // H).clip(0, h - 1), (np.arange(x0, x1, step) * w // W).clip(0, w - 1)


def overlay_tile(pred, ref, x0, y0, x1, y1, step, layer, palette, changed=None):
    """RGBA (h, w, 4) uint8 of the prediction (class colours), of the least-sure map (red where the margin is
    small) or of `changed` (the cells whose class changed since the previous model, CHANGED_COLOUR; the others
    transparent) over image pixels [y0, y1) x [x0, x1) every `step`-th; cells are looked up by points_to_grid's
    rule."""
    grid = pred["classes"]
    rows, cols = tile_cells(ref.shape, grid.shape, x0, y0, x1, y1, step)
    out = np.zeros((rows.size, cols.size, 4), np.uint8)
    if layer == "classes":
        out[..., :3] = np.asarray(palette, np.uint8)[grid[np.ix_(rows, cols)]]
        out[..., 3] = 255
    elif layer == "changed":
        out[changed[np.ix_(rows, cols)]] = (*CHANGED_COLOUR, 255)
    else:
        unsure = 1 - pred["margin"][np.ix_(rows, cols)]
        out[..., 0] = 255
        out[..., 3] = (unsure ** 2 * 255).astype(np.uint8)
    return out


def suggest(training, click_file, n, rule=SUGGEST_RULE, spacing=5.0):
    """n places to click next, over all predicted images, on cells without a click, `spacing` cells apart on one image
    (few_clicks.choose_cells): `random` draws them uniformly (seeded by the click file's version: the same clicks
    give the same places, a new click new ones), `margin` takes the n smallest margins (the model's least sure)."""
    from few_clicks import cell_centres, choose_cells
    if rule not in SUGGEST_RULES:
        raise ValueError(f"rule must be one of {', '.join(SUGGEST_RULES)}, got {rule!r}")
    with click_file.locked():
        clicks, version = click_file.read(), zlib.crc32(str(click_file.version()).encode())
    found = []
    for name, pred in sorted(training.predictions.items()):
        ref = click_file.images.refs[name]
        H, W = ref.shape
        h, w = pred["classes"].shape
        centres = cell_centres(H, W, h, w)
        candidates = centres >= 0
        for r, c in clicks.get(name, {}):
            candidates[r * h // H, c * w // W] = False
        rng = np.random.default_rng([version, zlib.crc32(name.encode())])
        for j in choose_cells(pred["prob"], candidates, n, spacing=spacing, strategy=rule, rng=rng):
            r, c = divmod(int(centres.flat[j]), W)
            found.append({"image": name, "x": c, "y": r, "margin": float(pred["margin"].flat[j]),
                          "predicted": int(pred["classes"].flat[j])})
    if rule == "random":  # every image drew n: n of them, each place equally likely
        order = np.random.default_rng(version).permutation(len(found))
        return [found[i] for i in order[:n]]
    return sorted(found, key=lambda t: t["margin"])[:n]
