"""The `live` overlay layer: a click repaints the map at once, with no training. A click-conditioned model
(train.py --click-input) predicts the image again with the clicks in its input; any other model gets a small head
(page/head.py) re-fitted on its per-pixel features at every click. Either is painted over the tiles the page asks for.
"""

import threading
import time
from http import HTTPStatus

import numpy as np

from page.bounds import HTTPError, not_found
from page.training import overlay_tile, tile_cells

LIVE_GRID_PIXELS = 4_000_000  # processing-grid cells of an image a click-conditioned model predicts again per click
# A click-conditioned model's repaint after a few clicks changed (repaint): only the cells within REPAINT_RADIUS of each
# changed click are painted again, predicted with REPAINT_CONTEXT more cells around them that the network sees.
REPAINT_RADIUS = 48
REPAINT_CONTEXT = 64
REPAINT_MAX = 8  # changed clicks up to which only their windows are predicted again; more: the whole image


def model_shown(training):
    """(the number of the model shown, the names of the images it predicted); 409 before there is one."""
    with training._lock:
        model, predicted = training.state["model"], set(training.predictions)
    if not model or not predicted:
        raise HTTPError(HTTPStatus.CONFLICT, "no model yet: train first (the live layer repaints the shown model's "
                                             "map at each click)")
    return model, predicted


class Live:
    """The `live` overlay layer: a small head (page.head.fit_head, the logistic regression anchored at the network's
    own classifier) re-fitted on the shown model's per-pixel features at every click of every image, and painted over
    the tiles asked for, with no training. It is fitted when a tile or /api/live asks and the click file or the model
    changed since the last fit (a fit of hundreds of clicks takes milliseconds); the model's features are extracted
    once per image (page.head.Features caches them) and thrown away when another model is shown. Only the images the
    model predicted (Training.predictions) are painted or read for clicks. A click-conditioned model needs no head:
    `conditioned` (Conditioned) paints it."""

    def __init__(self, training, click_file):
        self.training, self.click_file = training, click_file
        self._lock = threading.Lock()
        self.features, self.model, self.key, self.head = None, 0, None, None
        self.state = {}
        self.conditioned = Conditioned(training, click_file)

    def fitted(self):
        """(head, features) for the model shown and the clicks as they are now; 409 before a model is shown."""
        training = self.training
        model, predicted = model_shown(training)
        from page.head import Features, fit_head  # torch comes with it: the server starts without
        with self._lock:
            if self.features is None or self.model != model:
                self.features, self.model, self.key = Features(training.model_path, training.device), model, None
            with self.click_file.locked():
                version = self.click_file.version()
                clicks = self.click_file.read() if self.key != (model, version) else None
            if clicks is not None:
                t0 = time.perf_counter()
                seconds = self.features.seconds
                xs, ys = [], []
                for name, px in clicks.items():
                    if px and name in predicted:
                        rc = np.array(list(px), np.int64)
                        xs.append(self.features.at(name, self.click_file.images.refs[name].path, rc[:, 0], rc[:, 1]))
                        ys.append(np.array([cl for cl, _ in px.values()], np.int64))
                D = self.features.weight.shape[1]
                x = np.concatenate(xs) if xs else np.zeros((0, D), np.float32)
                y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
                t1 = time.perf_counter()
                self.head = fit_head(x, y, self.features.weight, self.features.bias)
                t2 = time.perf_counter()
                self.key = (model, version)
                self.state = {"model": model, "version": version, "clicks": int(len(y)),
                              "head": "logistic regression anchored at the model's classifier",
                              "seconds": {"features": round(self.features.seconds - seconds, 3),
                                          "gather": round(t1 - t0 - (self.features.seconds - seconds), 3),
                                          "fit": round(t2 - t1, 3)}}
            return self.head, self.features

    def status(self):
        if self.conditioned.shown():
            return self.conditioned.status()
        self.fitted()
        with self._lock:
            return {**self.state, "conditioned": False}

    def tile(self, name, ref, x0, y0, x1, y1, step, palette):
        """RGBA (h, w, 4) uint8: the head's classes over image pixels [y0, y1) x [x0, x1) every `step`-th, looked up
        on the processing grid by the overlay's rule (only the grid block the tile covers is predicted)."""
        with self.training._lock:
            predicted = name in self.training.predictions
        if not predicted:
            raise not_found(f"no prediction for {name}")
        if self.conditioned.shown():  # its class map, coloured as the overlay colours the model's
            return overlay_tile({"classes": self.conditioned.grid(name, ref)}, ref, x0, y0, x1, y1, step, "classes",
                                palette)
        head, features = self.fitted()
        with self._lock:
            f = features.of(name, ref.path)
        return head_tile(head, f, ref.shape, x0, y0, x1, y1, step, palette)


def head_tile(head, features, shape, x0, y0, x1, y1, step, palette):
    """RGBA (h, w, 4) uint8 of `head`'s classes over image pixels [y0, y1) x [x0, x1) every `step`-th of an image of
    `shape` (H, W) whose processing-grid features are `features` (D, h, w): the cells by the overlay's rule, only the
    block of cells the tile covers predicted."""
    rows, cols = tile_cells(shape, features.shape[1:], x0, y0, x1, y1, step)
    grid = head.predict(features[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    out = np.empty((rows.size, cols.size, 4), np.uint8)
    out[..., :3] = np.asarray(palette, np.uint8)[grid[np.ix_(rows - rows[0], cols - cols[0])]]
    out[..., 3] = 255
    return out


class Conditioned:
    """The live layer of a click-conditioned model (DISIR; train.py --click-input): at each click the image is predicted
    again with its clicks in the model's input planes, nothing fitted. Each click is put in the processing-grid cell the
    overlay shows it in (tile_cells' rule, as training puts its points). The model is loaded once per model shown, an
    image's processing-grid input once per model, and its class map once per click-file version (the tiles of one view
    share it): the whole image the first time, then only the windows around the clicks that changed (repaint)."""

    def __init__(self, training, click_file):
        self.training, self.click_file = training, click_file
        self._lock = threading.Lock()
        self.model, self.net, self.spec, self.inputs, self.grids = 0, None, None, {}, {}
        self.last = {}  # name -> (the clicks, the class map) of the image's last repaint under this model
        self.state = {}

    def shown(self):
        """Whether the model shown takes clicks (read from its checkpoint once per model); 409 before there is one."""
        training = self.training
        model, _ = model_shown(training)
        with self._lock:
            if self.model != model:
                from checkpoint import load_model  # torch comes with it: the server starts without
                net, ck = load_model(training.model_path, training.device)
                self.model, self.net, self.spec, self.inputs, self.grids = model, net, ck.spec, {}, {}
                self.last, self.state = {}, {}
            return bool(getattr(self.net, "click_channels", 0))

    def grid(self, name, ref):
        """The (h, w) class map of image `name` on its processing grid with the image's clicks as they are now."""
        with self.click_file.locked():
            version, px = self.click_file.version(), self.click_file.read().get(name, {})
        with self._lock:
            key = (self.model, version, name)
            if key in self.grids:
                return self.grids[key]
            from spec import grid_size, load_input, to_grid
            h, w = grid_size(*ref.shape, self.spec.scale)
            if h * w > LIVE_GRID_PIXELS:
                raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{ref.path.name}: {h} x {w} processing pixels, too "
                                                                 f"large to predict again at each click here")
            t0 = time.perf_counter()
            if name not in self.inputs:
                self.inputs = {name: to_grid(load_input(ref.path, self.spec).image, self.spec.scale)}  # one kept
            small = self.inputs[name]
            H, W = ref.shape
            clicks = sorted({(r * h // H, c * w // W, cl) for (r, c), (cl, _) in px.items()})
            before, previous = self.last.get(name, (None, None))
            changed = None if before is None else sorted({(r, c) for r, c, _ in set(clicks) ^ set(before)})
            t1 = time.perf_counter()
            grid = repaint(self.net, small, clicks, previous, changed)
            t2 = time.perf_counter()
            self.grids = {k: v for k, v in self.grids.items() if k[:2] == key[:2]}  # this model and version only
            self.grids[key], self.last[name] = grid, (clicks, grid)
            self.state = {"image": name, "version": version, "clicks": len(clicks),
                          "seconds": {"input": round(t1 - t0, 3), "predict": round(t2 - t1, 3)}}
            return grid

    def status(self):
        """What the last repaint did; the clicks counted as the file holds them now (over every image)."""
        with self.click_file.locked():
            version, clicks = self.click_file.version(), self.click_file.read()
        with self._lock:
            return {"model": self.model, "version": version, "clicks": sum(len(v) for v in clicks.values()),
                    "conditioned": True, "head": f"none: the click-conditioned network ({self.net.click_encoding}) "
                                                 f"takes the clicks as input",
                    "seconds": dict(self.state.get("seconds", {"input": 0.0, "predict": 0.0})),
                    "last": {k: self.state[k] for k in ("image", "version", "clicks")} if self.state else None}


def windowed(previous, changed):
    """Whether repaint paints only the windows of the changed clicks."""
    return previous is not None and changed is not None and 0 < len(changed) <= REPAINT_MAX


def repaint(net, small, clicks, previous=None, changed=None):
    """The (h, w) uint8 class map of a click-conditioned network on the processing-grid image `small` (h, w, bands)
    with `clicks` [(row, col, class)] in grid cells. Given the map of the clicks before (`previous`) and the cells of
    the clicks added or removed since (`changed`, 1..REPAINT_MAX of them), only the cells within REPAINT_RADIUS of each
    are painted again, each window predicted with REPAINT_CONTEXT more cells around it and the clicks in that view;
    else (the first map of an image, or many changes) the whole image. A click's effect beyond its window waits for
    the next whole repaint (another model, or more than REPAINT_MAX changes at once)."""
    from predict import predict_probabilities
    if not windowed(previous, changed):
        return predict_probabilities(net, small, 1.0, clicks=clicks or None).argmax(0).astype(np.uint8)
    h, w = small.shape[:2]
    out = previous.copy()
    for r, c in changed:
        y0, y1 = max(0, r - REPAINT_RADIUS), min(h, r + REPAINT_RADIUS + 1)
        x0, x1 = max(0, c - REPAINT_RADIUS), min(w, c + REPAINT_RADIUS + 1)
        Y0, Y1 = max(0, y0 - REPAINT_CONTEXT), min(h, y1 + REPAINT_CONTEXT)
        X0, X1 = max(0, x0 - REPAINT_CONTEXT), min(w, x1 + REPAINT_CONTEXT)
        seen = [(cr - Y0, cc - X0, k) for cr, cc, k in clicks if Y0 <= cr < Y1 and X0 <= cc < X1]
        prob = predict_probabilities(net, small[Y0:Y1, X0:X1], 1.0, clicks=seen or None)
        out[y0:y1, x0:x1] = prob.argmax(0)[y0 - Y0:y1 - Y0, x0 - X0:x1 - X0]
    return out
