"""The `live` overlay layer: a click repaints the map at once, with no training. A small head (page/head.py) is
re-fitted on the shown model's per-pixel features at every click, and painted over the tiles the page asks for.
"""

import threading
import time
from http import HTTPStatus

import numpy as np

from page.bounds import HTTPError, not_found
from page.training import tile_cells


class Live:
    """The `live` overlay layer: a small head (page.head.fit_head, the logistic regression anchored at the network's
    own classifier) re-fitted on the shown model's per-pixel features at every click of every image, and painted over
    the tiles asked for, with no training. It is fitted when a tile or /api/live asks and the click file or the model
    changed since the last fit (a fit of hundreds of clicks takes milliseconds); the model's features are extracted
    once per image (page.head.Features caches them) and thrown away when another model is shown. Only the images the
    model predicted (Training.predictions) are painted or read for clicks."""

    def __init__(self, training, click_file):
        self.training, self.click_file = training, click_file
        self._lock = threading.Lock()
        self.features, self.model, self.key, self.head = None, 0, None, None
        self.state = {}

    def fitted(self):
        """(head, features) for the model shown and the clicks as they are now; 409 before a model is shown."""
        training = self.training
        with training._lock:
            model, predicted = training.state["model"], set(training.predictions)
        if not model or not predicted:
            raise HTTPError(HTTPStatus.CONFLICT, "no model yet: train first (the live layer re-fits the shown "
                                                 "model's head on the clicks)")
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
        self.fitted()
        with self._lock:
            return dict(self.state)

    def tile(self, name, ref, x0, y0, x1, y1, step, palette):
        """RGBA (h, w, 4) uint8: the head's classes over image pixels [y0, y1) x [x0, x1) every `step`-th, looked up
        on the processing grid by the overlay's rule (only the grid block the tile covers is predicted)."""
        with self.training._lock:
            predicted = name in self.training.predictions
        if not predicted:
            raise not_found(f"no prediction for {name}")
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
