"""What one click does to the map, and how fast: the annotation page's live layer (a head re-fitted on the network's
features at the clicks, page/head.py) under a simulated person who clicks where the map is wrong.

    python -m research.click_response --preset synthetic   # SYNTHETIC demo scene: results/click_response_synthetic.md
    python -m research.click_response --preset atlanta     # REAL (make realdata): results/click_response_atlanta.md

The preset's 36 patches of one 900 x 900 scene (research/benchmark.py's LOOP_PRESETS: the same cut as the page's
latency benchmark) are put in a folder the page's own App serves (annotate.App, no HTTP); --start-clicks random
pixels on each training patch (classes from the dense labels), and the page's Train makes the first model (its
default command, --epochs epochs anew). From that model, for each head: a simulated person adds --live-clicks
clicks, one at a time, each at the pixel deepest inside a region the head's current map gets wrong (the largest
distance to a right pixel over the training patches; DISIR's simulated user clicks the centre of the largest
mistake), of the dense label's class; after each click the head is re-fitted on every click and the map repainted.

Reported per head: **pixels corrected per click**, the pixels of all 36 patches (native pixels, the dense labels'
undefined left out) the click turned from wrong to right minus those it turned from right to wrong, over the first
--live-clicks clicks (DISIR's anchor: about 5,000 per click on Potsdam); the tile's mIoU before and after; and the
**latency** from a click to a repainted 1000 x 1000 view: the features at the clicks gathered, the head fitted, a
1000 x 1000 window predicted, coloured and PNG-encoded (page.live.head_tile, page.images.png_bytes: the server's work
for one 1000-pixel overlay tile; HTTP and the browser's drawing not included), on a 1000 x 1000 image of the same data
whose features were extracted once beforehand (a cost paid once per model and image, given beside). The heads: the
page's (logistic regression anchored at the network's classifier, page.head.L2), the same with other pulls, plain
logistic regression, a random forest on the same features; no head (the map as the network painted it until the
next Train: 0 per click by construction); and, with --click-input (default disc), DISIR's way: the page's Train again,
anew on the same first clicks with `--click-input` added to its command, gives a click-conditioned network, and each
click enters its patch's input and the patch is predicted again (the view: its clicks where the patches lie in it).
Its no-click map beside the plain first model's says what the conditioning costs the map without clicks.
"""

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import tifffile
import torch
from PIL import Image
from scipy.ndimage import distance_transform_edt

import annotate
from page import head as click_head
from page.images import png_bytes
from page.live import REPAINT_CONTEXT, REPAINT_RADIUS, head_tile, repaint
from page.training import tile_cells
from config import Shared, TrainConfig, add_arguments, check_settings, from_args, reuse, setting, whole
from metrics import ConfusionMatrix
from research.annotate_loop import majority_miou
from research.benchmark import LOOP_PRESETS, LoopBench, command_line, device_name, loop_data, preset_kind
from spec import IGNORE_INDEX

VIEW = 1000  # the side of the view whose repaint is timed
HEADS = {  # name -> what fits it on (x (n, D), y (n,), weight, bias); the page's first
    f"anchored logistic regression, l2 {click_head.L2:g} (the page's)":
        lambda x, y, w, b: click_head.fit_head(x, y, w, b),
    "anchored logistic regression, l2 0.1": lambda x, y, w, b: click_head.fit_head(x, y, w, b, l2=0.1),
    "anchored logistic regression, l2 10": lambda x, y, w, b: click_head.fit_head(x, y, w, b, l2=10.0),
    "plain logistic regression": lambda x, y, w, b: click_head.fit_head(x, y, w, b, anchored=False),
    "random forest, 50 trees": lambda x, y, w, b: click_head.fit_forest(x, y),
}

# --------------------------------------------------------------------------- the run


def first_model(app, maps, train, k, epochs, rng):
    """k random labelled pixels on each training patch, saved through the page's click file, then the page's Train
    (anew); returns the clicks {name: [(row, col, class)]} once the model is shown."""
    clicks = {}
    for name in train:
        free = np.flatnonzero(maps[name] != IGNORE_INDEX)
        for j in rng.choice(free, min(k, len(free)), replace=False):
            r, c = divmod(int(j), maps[name].shape[1])
            cls = int(maps[name][r, c])
            app.click_file.apply({"op": "add", "image": name, "points": [[c + 0.5, r + 0.5]], "class": cls})
            clicks.setdefault(name, []).append((r, c, cls))
    app.training.start(epochs, restart=True)
    wait_shown(app, "the first model")
    return clicks


def wait_shown(app, what):
    """Wait until the page's training has ended and its model is shown; RuntimeError naming `what` if it failed."""
    while app.training.status()["state"] in ("running", "predicting"):
        time.sleep(0.2)
    st = app.training.status()
    if st["state"] != "done":
        raise RuntimeError(f"{what} failed: {st['message']}: {st['log'][-3:]}")


def full_map(grid, shape):
    """A processing-grid class map at the image's size (H, W), by the overlay's rule."""
    return grid[np.ix_(*tile_cells(shape, grid.shape, 0, 0, shape[1], shape[0], 1))]


def view_image(preset, images, names, folder):
    """A 1000 x 1000 image of the preset's data: the scene's top-left corner (synthetic), or the tile put back
    together from its 6 x 6 patches and mirrored at its right and bottom edges to 1000 pixels (real)."""
    path = folder / "view.tif"
    if preset["synthetic"]:
        scene = tifffile.imread(preset["scene"])
        if min(scene.shape[:2]) >= VIEW:
            tifffile.imwrite(path, scene[:VIEW, :VIEW])
            return path, "the synthetic scene's top-left 1000 x 1000"
    rows = {}
    for name in names:
        r, c = (int(t[1:]) for t in name.split("_"))
        rows.setdefault(r, {})[c] = np.asarray(Image.open(next(images.glob(f"{name}.*"))))
    tile = np.concatenate([np.concatenate([rows[r][c] for c in sorted(rows[r])], 1) for r in sorted(rows)], 0)
    pad = [(0, max(0, VIEW - tile.shape[0])), (0, max(0, VIEW - tile.shape[1]))] + [(0, 0)] * (tile.ndim - 2)
    tifffile.imwrite(path, np.pad(tile, pad, mode="reflect")[:VIEW, :VIEW])
    return path, f"the {tile.shape[0]} x {tile.shape[1]} scene put back together from its patches, mirrored to 1000"


class HeadResponse:
    """The live layer's way: a head re-fitted on the network's features at every click (`fit`: one of HEADS)."""

    local = False  # a click moves the head, so every image's map

    def __init__(self, fit, features, refs, view, palette):
        self.fit, self.features, self.refs, self.view, self.palette = fit, features, refs, view, palette

    def respond(self, clicks):
        """The head fitted on every click, and the view repainted (what the latency times)."""
        f = self.features
        x = np.concatenate([f.at(m, self.refs[m].path, [p[0] for p in pts], [p[1] for p in pts])
                            for m, pts in clicks.items() if pts])
        head = self.fit(x, np.array([p[2] for pts in clicks.values() for p in pts]), f.weight, f.bias)
        png_bytes(head_tile(head, f.of("view", self.view), (VIEW, VIEW), 0, 0, VIEW, VIEW, 1, self.palette))
        return head

    def paint(self, head, clicks, name, shape):
        return full_map(head.predict(self.features.of(name, self.refs[name].path)), shape)


class ConditionedResponse:
    """DISIR's way: a click-conditioned network (train.py --click-input) predicts again with the clicks in its
    input planes; nothing is fitted. The view's clicks are the patches' clicks where the patches lie in it."""

    local = True  # a click enters only its own image's input

    def __init__(self, checkpoint, refs, view, palette, offsets):
        from checkpoint import load_model
        from spec import load_input, to_grid
        self.model, ck = load_model(checkpoint, "cpu")
        self.scale, self.palette, self.offsets = ck.spec.scale, palette, offsets
        self.small = {n: to_grid(load_input(r.path, ck.spec).image, ck.spec.scale) for n, r in refs.items()}
        self.view = to_grid(load_input(view, ck.spec).image, ck.spec.scale)
        self.shown = None  # (clicks, map) of the view as the page shows it: repainted by windows, as the page does
        self.agree = []  # per repaint: the share of the view's cells where it equals a whole prediction

    def _grid(self, name, clicks, shape, small):
        """The class map on the processing grid of `small` with `clicks` [(row, col, class)] in pixels of `shape`:
        the page's whole repaint (page.live.repaint), each click in the overlay's cell."""
        (H, W), (h, w) = shape, small.shape[:2]
        return repaint(self.model, small, sorted({(r * h // H, col * w // W, k) for r, col, k in clicks}))

    def respond(self, clicks):
        """The view repainted as the page repaints it (page.live.repaint: the whole view the first time, then the
        windows around the new clicks), coloured and PNG-encoded: what the latency times. Untimed, its agreement with
        the whole view predicted again is kept (`agree`)."""
        h, w = self.view.shape[:2]
        inside = sorted({((self.offsets[m][0] + r) * h // VIEW, (self.offsets[m][1] + c) * w // VIEW, k)
                         for m, pts in clicks.items() for r, c, k in pts
                         if self.offsets[m][0] + r < VIEW and self.offsets[m][1] + c < VIEW})
        before, previous = self.shown or (None, None)
        changed = None if before is None else sorted({(r, c) for r, c, _ in set(inside) ^ set(before)})
        grid = repaint(self.model, self.view, inside, previous, changed) if changed != [] else previous
        png_bytes(np.asarray(self.palette, np.uint8)[full_map(grid, (VIEW, VIEW))])
        self.shown = (inside, grid)
        return clicks

    def agreement(self):
        """The share of the view's cells where the map shown equals the whole view predicted with the same clicks."""
        clicks, grid = self.shown
        return float((repaint(self.model, self.view, clicks) == grid).mean())

    def paint(self, clicks, _, name, shape):
        return full_map(self._grid(name, clicks.get(name, []), shape, self.small[name]), shape)


def person(response, state, maps, train, clicks, n, rng):
    """n clicks where the map is wrong, one at a time, the map repainted after each (`response`: HeadResponse or
    ConditionedResponse; `state`: what it answered to the first clicks): per click a dict of the pixel, the pixels
    corrected (wrong -> right, right -> wrong) over every image and the latency."""
    names = list(maps)
    shown = {name: response.paint(state, clicks, name, maps[name].shape) for name in names}
    labelled = {name: maps[name] != IGNORE_INDEX for name in names}
    clicked = {name: np.zeros(maps[name].shape, bool) for name in names}
    for name, pts in clicks.items():
        for r, c, _ in pts:
            clicked[name][r, c] = True
    clicks = {k: list(v) for k, v in clicks.items()}
    before = dict(shown)
    rows = []
    for k in range(n):
        best = None
        for name in train:
            wrong = labelled[name] & (shown[name] != maps[name]) & ~clicked[name]
            if not wrong.any():
                continue
            depth = distance_transform_edt(wrong) + rng.random(wrong.shape) * 1e-3  # ties broken at random
            j = int(depth.argmax())
            if best is None or depth.flat[j] > best[0]:
                best = (depth.flat[j], name, *divmod(j, wrong.shape[1]))
        if best is None:
            break
        _, name, r, c = best
        cls = int(maps[name][r, c])
        clicks.setdefault(name, []).append((r, c, cls))
        clicked[name][r, c] = True
        t0 = time.perf_counter()
        state = response.respond(clicks)
        latency = time.perf_counter() - t0
        fixed = broken = 0
        for m in ([name] if response.local else names):
            new = response.paint(state, clicks, m, maps[m].shape)
            was, now = shown[m] == maps[m], new == maps[m]
            fixed += int((~was & now & labelled[m]).sum())
            broken += int((was & ~now & labelled[m]).sum())
            shown[m] = new
        rows.append(dict(click=k + 1, image=name, row=r, col=c, cls=cls, fixed=fixed, broken=broken,
                         corrected=fixed - broken, latency=latency, clicks=sum(len(v) for v in clicks.values()),
                         agree=response.agreement() if hasattr(response, "agreement") else None))
    return rows, before, shown


def scores(shown, maps, num_classes):
    """(mIoU, OA) of class maps {name: (H, W)} against the dense labels."""
    cm = ConfusionMatrix(num_classes)
    for name in maps:
        cm.update(shown[name], maps[name])
    m = cm.compute()
    return m["miou"], m["oa"]


def run(args):
    preset = LOOP_PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the train command's process: as many threads
    rng = np.random.default_rng(args.annotation_seed)
    load = [os.getloadavg()[0]]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, maps, train, val, classes, classes_path = loop_data(preset, tmp / "images")
        settings = annotate.AnnotateSettings(
            images=str(images), clicks=str(tmp / ("clicks.csv" if preset["synthetic"] else "clicks.geojson")),
            classes=None if classes_path is None else str(classes_path), runs=str(tmp / "runs"),
            epochs=args.epochs, train_command=args.train_command)
        app = annotate.App(annotate.settings_of(settings))
        command = app.training.command
        print(f"click response: {args.preset}, {len(train)} training + {len(val)} other patches; load average "
              f"{load[0]:.1f}", flush=True)
        t0 = time.perf_counter()
        clicks = first_model(app, maps, train, args.start_clicks, args.epochs, rng)
        trained = time.perf_counter() - t0
        load.append(os.getloadavg()[0])
        features = click_head.Features(app.training.model_path)
        refs = app.images.refs
        view, view_what = view_image(preset, images, list(maps), tmp)
        t0 = time.perf_counter()
        features.of("view", view)
        extract_view = time.perf_counter() - t0
        grid = features.of("view", view).shape[1:]
        palette = [tuple(c) for c in classes.palette]
        background = majority_miou([(n, None, None) for n in train], [(n, None, None) for n in maps], maps,
                                   list(classes.names))
        results = {}

        def measure(name, response):
            state = response.respond(clicks)  # the live layer as the first model is shown
            rows, before, after = person(response, state, maps, train, clicks, args.live_clicks,
                                         np.random.default_rng(args.annotation_seed))
            results[name] = r = dict(rows=rows, before=scores(before, maps, classes.num_classes),
                                     after=scores(after, maps, classes.num_classes))
            load.append(os.getloadavg()[0])
            print(f"{name}: {np.mean([x['corrected'] for x in rows]):.0f} pixels corrected per click, latency "
                  f"median {np.median([x['latency'] for x in rows]):.3f} s, mIoU {r['before'][0]:.3f} -> "
                  f"{r['after'][0]:.3f}", flush=True)

        for name, fit in HEADS.items():
            measure(name, HeadResponse(fit, features, refs, view, palette))
        network = scores({n: full_map(app.training.predictions[n]["classes"], maps[n].shape) for n in maps}, maps,
                         classes.num_classes)
        conditioned = None
        if args.click_input != "none":  # the same first model, conditioned on clicks: the page's Train again
            app.training.command = f"{command} --click-input {args.click_input}"
            t0 = time.perf_counter()
            app.training.start(args.epochs, restart=True)
            wait_shown(app, "the click-conditioned model")
            conditioned = dict(command=app.training.command, trained=time.perf_counter() - t0, network=scores(
                {n: full_map(app.training.predictions[n]["classes"], maps[n].shape) for n in maps}, maps,
                classes.num_classes))
            offsets = {n: (int(n.split("_")[0][1:]) * maps[n].shape[0], int(n.split("_")[1][1:]) * maps[n].shape[1])
                       for n in maps}
            measure(f"click-conditioned network ({args.click_input}), no head",
                    ConditionedResponse(app.training.model_path, refs, view, palette, offsets))
    info = dict(command=command, load=load, seconds=time.perf_counter() - t_start, trained=trained, n=len(maps),
                n_train=len(train), first=sum(len(v) for v in clicks.values()), view_what=view_what,
                extract_view=extract_view, grid=grid, background=background, network=network, conditioned=conditioned)
    return results, info


# --------------------------------------------------------------------------- the table

def write_table(path, args, results, info):
    preset = LOOP_PRESETS[args.preset]
    kind = preset_kind(preset)
    n = args.live_clicks
    measured = command_line("python -m research.click_response", ClickResponse, args)
    lines = [f"# A click changes the map at once: the live layer's head, preset `{args.preset}` ({kind})", "",
             f"Written by `{measured}` in {info['seconds'] / 60:.0f} min on "
             f"{device_name(torch.device('cpu'))}, {args.threads} torch threads, shared with other jobs (load average "
             f"{min(info['load']):.1f} to {max(info['load']):.1f} during the run). Latencies are timings, not a test: "
             f"they move with the machine's load.", "",
             f"The first model: the page's Train (`{info['command']}`, {args.epochs} epochs anew, "
             f"{info['trained']:.0f} s) on {info['first']} random clicks ({args.start_clicks} on each of the "
             f"{info['n_train']} training patches); its own map scores mIoU {info['network'][0]:.3f} "
             f"(OA {info['network'][1]:.3f}) over the "
             f"{info['n']} patches; **all-background** (the training patches' commonest class everywhere) "
             f"{info['background']:.3f}. Then {n} clicks, one at a time, where each head's map is wrong (see "
             f"research/click_response.py); pixels are native pixels of the {info['n']} patches against the dense "
             f"labels. DISIR's anchor: about 5,000 pixels corrected per click on Potsdam.", "",
             f"| head | clicks | pixels corrected per click: mean | median | total | wrong -> right | right -> wrong "
             f"| mIoU before -> after | OA before -> after | latency to a repainted {VIEW} x {VIEW} view: median (s) | "
             f"max (s) |", "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for name, r in results.items():
        rows = r["rows"]
        c = np.array([x["corrected"] for x in rows])
        lat = np.array([x["latency"] for x in rows])
        lines.append(f"| {name} | {len(rows)} | {c.mean():.0f} | {np.median(c):.0f} | {c.sum()} | "
                     f"{sum(x['fixed'] for x in rows)} | {sum(x['broken'] for x in rows)} | "
                     f"{r['before'][0]:.3f} -> {r['after'][0]:.3f} | {r['before'][1]:.3f} -> {r['after'][1]:.3f} | "
                     f"{np.median(lat):.3f} | {lat.max():.3f} |")
    lines.append(f"| no head (the network's map until the next Train) | {n} | 0 | 0 | 0 | 0 | 0 | "
                 f"{info['network'][0]:.3f} -> {info['network'][0]:.3f} | {info['network'][1]:.3f} -> "
                 f"{info['network'][1]:.3f} | - | - |")
    cond = info["conditioned"]
    if cond:
        agree = [x["agree"] for x in next(r for n, r in results.items() if n.startswith("click-conditioned"))["rows"]]
        lines += ["", f"The click-conditioned network (DISIR's way, no head: the page's Train again, anew on the same "
                      f"first clicks, `{cond['command']}`, {cond['trained']:.0f} s): each click enters its patch's "
                      f"input and the patch is predicted again. **What conditioning costs the no-click map**: "
                      f"mIoU {cond['network'][0]:.3f} (OA {cond['network'][1]:.3f}) with no clicks in its input, "
                      f"against {info['network'][0]:.3f} (OA {info['network'][1]:.3f}) for the same training "
                      f"without click input (one seed each). Its view is repainted as the page repaints it "
                      f"(page.live.repaint: the whole view once, then only the cells within {REPAINT_RADIUS} of a new "
                      f"click, predicted with {REPAINT_CONTEXT} more around them): after each click that view equals "
                      f"the whole view predicted again on {100 * min(agree):.2f} % of its cells or more (mean "
                      f"{100 * np.mean(agree):.2f} %)."]
    page = next(iter(results))
    lines += ["", f"The view: {info['view_what']}, {info['grid'][0]} x {info['grid'][1]} processing-grid cells; its "
                  f"features were extracted once, in {info['extract_view']:.1f} s (once per model and image: the "
                  f"page's first live tile of an image pays it). The latency covers the features at the clicks, the "
                  f"fit, the view's prediction, colours and PNG (the server's work for one {VIEW}-pixel tile), not "
                  f"HTTP or the browser's drawing. \"Before\": each head fitted on the first clicks (the live layer as "
                  f"the first model is shown); an anchored head starts from the network's own classifier, the others "
                  f"know only the clicked classes.", "",
              f"Per click, {page}:", "",
              "| click | patch | pixel (row, col) | class | clicks fitted | wrong -> right | right -> wrong | "
              "corrected | latency (s) |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in results[page]["rows"]:
        lines.append(f"| {x['click']} | {x['image']} | ({x['row']}, {x['col']}) | {x['cls']} | {x['clicks']} | "
                     f"{x['fixed']} | {x['broken']} | {x['corrected']} | {x['latency']:.3f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- CLI

@dataclass
class ClickResponse:
    """research/click_response.py's command line; the page's and the loop benchmark's settings are their
    declarations."""
    preset: str = reuse(LoopBench, "preset")
    live_clicks: int = setting(20, "clicks the simulated person adds one at a time where the live map is wrong",
                               "bench", check=whole(1), must="be >= 1")
    start_clicks: int = reuse(LoopBench, "start_clicks")
    epochs: int = reuse(annotate.AnnotateSettings, "epochs")
    train_command: Optional[str] = reuse(annotate.AnnotateSettings, "train_command")
    click_input: str = reuse(TrainConfig, "click_input", "disc")  # the conditioned model's row; none: heads only
    annotation_seed: int = reuse(TrainConfig, "annotation_seed")  # the first clicks and the person's ties
    threads: Optional[int] = reuse(Shared, "threads", 2)
    out: Optional[str] = reuse(TrainConfig, "out", None)


def get_args_parser():
    return add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), ClickResponse,
                         grouped=False)


def main(args):
    """0 measured, 2 a user error (nothing measured)."""
    try:
        settings = from_args(ClickResponse, args)
        check_settings(settings)
        results, info = run(settings)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(settings.out or f"results/click_response_{settings.preset}.md")
    write_table(out, settings, results, info)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
