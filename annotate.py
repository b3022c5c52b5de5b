"""Click in the browser, see the map learn: a local web page to click points (and short scribbles) of a class on
the images of a folder, train a short model on them, see its prediction over the image and click where it is
least sure; and, in its Assess mode, label the points of a blind accuracy assessment sample one at a time.
Train adapts the model shown to the clicks as they are now (a few optimizer steps from its weights, --adapt-steps)
and repaints; Retrain from scratch trains anew; the "changed" layer shows the pixels whose class the last round
changed; the "live" layer repaints at each click with no training: a small head re-fitted on the shown model's
per-pixel features at the clicks (page/live.py, page/head.py).

    python annotate.py --images input_images --clicks clicks.csv          # then open the address it prints
    python annotate.py --images tiles/ --clicks clicks.geojson --classes classes.json
    python annotate.py --images tiles/ --assess assessment.gpkg --classes classes.json   # assess.py sample wrote it

Every click is saved at once, atomically, to the click file (`annotations.write_clicks`: GeoJSON in map
coordinates for georeferenced images, CSV image,x,y,class otherwise), so the same file trains with
`python train.py --images DIR --clicks FILE`. Several tabs (or people) on one file do not lose each other's
clicks: a page sends each change as an operation (add / remove pixels) and the server applies it to the file as
it is on disk, under a file lock.

`--assess SAMPLE` adds the Assess mode: the page shows the points of a sample drawn by `assess.py sample` one at a
time, zoomed in, without the prediction, the clicks or the suggestions, and saves each label at once in the sample
layer (assess.Assessment.set_reference). The page never learns a point's map class (it stays in
`<sample>.design.json`), and the sample never trains a model: it may not be the click file, and no click file
with a `.design.json` beside it opens. The estimates (assess.Assessment.estimates) come with their 95 % intervals.

The server reads and writes only the images folder, the click file (and its `.lock` beside it), the assessment
sample (its `.lock`, its design, its `_estimates.csv`/`.md`), its static files and its run folder (`--runs`); it
binds to 127.0.0.1 unless told otherwise. This file is the command and the HTTP routes; the parts they join are in
page/ (images, the click file, training, the live layer; static/ the browser side). The HTTP API and its bounds
(page/bounds.py) are in docs/annotate.md.
"""

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlsplit

import assess
import page.training
from config import Shared, TrainConfig, add_arguments, check_settings, from_args, reuse, setting, whole
from page import bounds
from page.bounds import HTTPError, not_found
from page.clicks import AssessSample, ClickFile, check_not_a_sample
from page.images import Images, png_bytes, tile_window
from page.live import Live
from page.training import ADAPT_STEPS, SUGGEST_RULE, SUGGEST_RULES, Training, check_train_command, overlay_tile, suggest
from spec import POTSDAM, load_class_file

STATIC = Path(__file__).resolve().parent / "page" / "static"
REQUEST_QUEUE = 64  # connections waiting to be accepted (socketserver's 5 reset some of 16 busy clients)
STATIC_NAME = re.compile(r"[A-Za-z0-9_-]+\.(html|js|css|png|svg)")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


# --------------------------------------------------------------------------- HTTP

class App:
    """What the request handler needs: images, click file, training, classes, the assessment sample (None without
    --assess), the allowed Host names."""

    def __init__(self, args):
        self.images = Images(args.images)
        self.classes = load_class_file(args.classes) if args.classes else POTSDAM
        clicks = args.clicks or default_click_file(self.images)
        check_not_a_sample(clicks, args.assess)
        self.assessment = AssessSample(args.assess, self.images, self.classes) if args.assess else None
        self.click_file = ClickFile(clicks, self.images, self.classes)
        runs = Path(args.runs)
        classes_path = Path(args.classes).resolve() if args.classes else runs.resolve() / "classes.json"
        command = (args.train_command or os.environ.get("ANNOTATE_TRAIN_COMMAND")
                   or page.training.DEFAULT_TRAIN_COMMAND)
        from_env = not args.train_command and os.environ.get("ANNOTATE_TRAIN_COMMAND")
        check_train_command(command, "--train-command ($ANNOTATE_TRAIN_COMMAND)" if from_env else "--train-command")
        if args.click_input != "none":  # the page's models take the clicks as input: the live layer predicts with them
            command += f" --click-input {args.click_input}"
        self.training = Training(command, self.images, self.click_file, self.classes, classes_path, runs,
                                 args.epochs, args.device, args.adapt_steps)
        self.live = Live(self.training, self.click_file)
        self.hosts = set()

    def config(self):
        return {"images": self.images.listing(), "errors": self.images.errors,
                "classes": {"names": list(self.classes.names), "palette": [list(c) for c in self.classes.palette]},
                "clicks_file": self.click_file.path.name, "epochs": self.training.epochs,
                "adapt_steps": self.training.adapt_steps if self.training.adapts else None,
                "suggest": {"rules": list(SUGGEST_RULES), "default": SUGGEST_RULE},
                "assess": None if self.assessment is None else {"sample": self.assessment.path.name,
                                                                "points": len(self.assessment.ids),
                                                                "first": self.assessment.ids[0]},
                "bounds": bounds.config()}


def default_click_file(images):
    """clicks.geojson (map coordinates) when every image is georeferenced, clicks.csv (pixels) otherwise."""
    geo = [r.georeferenced for r in images.refs.values()]
    return "clicks.geojson" if geo and all(geo) else "clicks.csv"


def _int(q, key, default=None):
    v = q.get(key, [None])[0]
    if v is None:
        if default is None:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"missing parameter {key}")
        return default
    try:
        return int(v)
    except ValueError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{key} must be an integer, got {v!r}") from None


class Handler(BaseHTTPRequestHandler):
    app = None  # set by make_server
    server_version = "annotate"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: errors are answered, not printed
        pass

    def _send(self, status, body, ctype, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status=HTTPStatus.OK):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _handle(self, method):
        try:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if self.app.hosts and host not in self.app.hosts:  # DNS rebinding: only our own name
                raise HTTPError(HTTPStatus.FORBIDDEN, "unknown Host header")
            length = self.headers.get("Content-Length") or "0"
            if not length.isascii() or not length.isdigit():
                self.close_connection = True  # where this body ends is unknown: the connection cannot go on
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"Content-Length must be a whole number of bytes, got "
                                                        f"{length[:40]!r}")
            length = int(length)
            if length > bounds.MAX_BODY:
                self.close_connection = True
                raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {bounds.MAX_BODY} bytes")
            body = self.rfile.read(length) if length > 0 else b""
            url = urlsplit(self.path)
            route(self, method, url.path, parse_qs(url.query), body)
        except HTTPError as e:
            self._json({"error": str(e)}, e.status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug or an unreadable file: answered, the server goes on
            self._json({"error": f"{type(e).__name__}: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


def route(h, method, path, q, body):
    """Every URL the server answers; anything else is 404 (no path from a request ever reaches the disk:
    images are looked up by name, static files by a plain file name in static/)."""
    app = h.app
    if method == "GET":
        if path in ("/", "/index.html"):
            return static_file(h, "index.html")
        if path.startswith("/static/"):
            return static_file(h, path[len("/static/"):])
        if path == "/api/config":
            return h._json(app.config())
        if path == "/api/clicks":
            name = q.get("image", [None])[0]
            clicks, notes = app.click_file.points(name)
            return h._json({"clicks": clicks, "notes": notes, "version": app.click_file.version()})
        if path == "/api/version":
            return h._json({"version": app.click_file.version(), "model": app.training.status()["model"]})
        if path in ("/api/tile", "/api/overlay"):
            return tile(h, path, q)
        if path == "/api/train":
            return h._json(app.training.status())
        if path == "/api/live":
            return h._json(app.live.status())
        if path == "/api/assess":
            after = q.get("after", [None])[0]
            sample = assessment_of(app)
            return h._json(sample.summary(None if after is None else sample.point_id(after, "after", query=True)))
        if path == "/api/assess/point":
            sample = assessment_of(app)
            return h._json(sample.point(sample.point_id(q.get("id", [None])[0], query=True)))
        if path == "/api/assess/estimates":
            return h._json(assessment_of(app).estimates())
        if path == "/api/suggest":
            n = _int(q, "n", 10)
            if not 1 <= n <= bounds.MAX_SUGGESTIONS:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"n must be 1..{bounds.MAX_SUGGESTIONS}")
            if not app.training.predictions:
                raise HTTPError(HTTPStatus.CONFLICT, "no prediction yet: train first")
            rule = q.get("rule", [SUGGEST_RULE])[0]
            if rule not in SUGGEST_RULES:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"rule must be one of {', '.join(SUGGEST_RULES)}")
            return h._json({"suggestions": suggest(app.training, app.click_file, n, rule), "rule": rule})
        raise not_found()
    if method == "POST":
        if path not in ("/api/clicks", "/api/train", "/api/assess", "/api/assess/write"):
            raise not_found()
        if (h.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)")
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        if path == "/api/clicks":
            return h._json(app.click_file.apply(data))
        if path == "/api/assess":
            return h._json(assessment_of(app).label(data))
        if path == "/api/assess/write":
            return h._json(assessment_of(app).write(data.get("overwrite", False)))
        return h._json(app.training.start(data.get("epochs"), data.get("restart", False)))
    raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "GET or POST")


def assessment_of(app):
    if app.assessment is None:
        raise not_found("no assessment sample: start annotate.py with --assess SAMPLE")
    return app.assessment


def static_file(h, name):
    if not STATIC_NAME.fullmatch(name):
        raise not_found()
    path = (STATIC / name).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file():
        raise not_found()
    h._send(HTTPStatus.OK, path.read_bytes(), CONTENT_TYPES[path.suffix])


def tile(h, path, q):
    app = h.app
    name = q.get("image", [""])[0]
    ref = app.images.get(name)
    x0, y0, x1, y1, step = tile_window(ref, _int(q, "z"), _int(q, "x"), _int(q, "y"), _int(q, "size", 256))
    if path == "/api/tile":
        arr = app.images.window(name, x0, y0, x1, y1, step)
    else:
        layer = q.get("layer", ["classes"])[0]
        if layer not in ("classes", "unsure", "changed", "live"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "layer must be 'classes', 'unsure', 'changed' or 'live'")
        if layer == "live":
            return h._send(HTTPStatus.OK, png_bytes(app.live.tile(name, ref, x0, y0, x1, y1, step,
                                                                  app.classes.palette)), "image/png")
        training = app.training
        with training._lock:  # one model's prediction and changes, not one of each
            pred, changed = training.predictions.get(name), training.changed.get(name)
        if pred is None:
            raise not_found(f"no prediction for {name}")
        if layer == "changed" and changed is None:
            raise not_found(f"no earlier prediction of {name} to compare with: the changes show from the second "
                            f"model on")
        arr = overlay_tile(pred, ref, x0, y0, x1, y1, step, layer, app.classes.palette, changed)
    h._send(HTTPStatus.OK, png_bytes(arr), "image/png")


class Server(ThreadingHTTPServer):
    request_queue_size = REQUEST_QUEUE

    def server_close(self):
        super().server_close()
        app = getattr(self, "app", None)
        if app is not None:
            app.training.close()  # the train.py waiting for the next round


def make_server(args):
    """A ThreadingHTTPServer for `args` (not started); its address is server.server_address."""
    args = settings_of(args)
    app = App(args)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = Server((args.host, args.port), handler)
    server.daemon_threads = True
    if args.host in ("127.0.0.1", "localhost", "::1"):
        app.hosts = {"127.0.0.1", "localhost", "::1"}
    server.app = app
    return server


# --------------------------------------------------------------------------- CLI

@dataclass
class AnnotateSettings:
    """annotate.py's command line: a flag that train.py (or infer.py) takes too is that declaration (config.reuse),
    so it has one help, one parser and one check in every command."""
    images: Optional[str] = reuse(TrainConfig, "images", required=True)
    clicks: Optional[str] = reuse(TrainConfig, "clicks")
    classes: Optional[str] = reuse(TrainConfig, "classes")
    assess: Optional[str] = setting(None, "an assessment sample to label blind in the page's Assess mode: the layer "
                                          "`python assess.py sample` wrote, its .design.json beside it; never a click "
                                          "file, never trained on", "page")
    checkpoint: Optional[str] = reuse(Shared, "checkpoint")
    runs: str = setting("checkpoints/annotate", "run folder: the training's checkpoints and log", "page")
    epochs: int = reuse(TrainConfig, "epochs", 10)
    adapt_steps: int = setting(ADAPT_STEPS, "optimizer steps of a Train that adapts the model shown to the clicks as "
                                            "they are now (train.py --init --steps N --schedule cosine, the train "
                                            "command's {budget}); Retrain from scratch trains --epochs anew", "page",
                               check=whole(1), must="be >= 1")
    train_command: Optional[str] = setting(
        None, "the training command ({python} {images} {clicks} {classes} {out} {budget} filled in; {budget} is "
              "--epochs E, or --init MODEL --steps N ... when adapting; a command with {epochs} instead always "
              "trains anew); default (or $ANNOTATE_TRAIN_COMMAND): " + page.training.DEFAULT_TRAIN_COMMAND, "page")
    device: str = reuse(TrainConfig, "device", "cpu")
    click_input: str = reuse(TrainConfig, "click_input")  # added to the train command; the live layer uses it
    host: str = setting("127.0.0.1", "address to bind (127.0.0.1: this machine only)", "page")
    port: int = setting(8765, "port (0: any free one)", "page", check=lambda v: whole(0)(v) and v < 65536,
                        must="be in 0..65535")


def get_args_parser():
    """The options are AnnotateSettings' fields (declared once: train.py's where the flag is train's too)."""
    return add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                 formatter_class=argparse.RawDescriptionHelpFormatter),
                         AnnotateSettings, grouped=False)


def settings_of(args):
    """AnnotateSettings of a parsed command line (or given), each setting checked (ValueError naming the flag)."""
    args = args if isinstance(args, AnnotateSettings) else from_args(AnnotateSettings, args)
    check_settings(args)
    return args


def main(args):
    try:
        args = settings_of(args)
        server = make_server(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = server.app
    if args.checkpoint:
        try:
            app.training.show(args.checkpoint)
        except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
            print(f"error: {e}", file=sys.stderr)
            server.server_close()
            return 2
    for note in app.click_file.notes:
        print(f"note: {note}", flush=True)
    host, port = server.server_address[:2]
    print(f"{len(app.images.refs)} images ({len(app.images.errors)} unreadable), clicks in {app.click_file.path}")
    if app.assessment:
        a = app.assessment.summary()
        print(f"assessment sample {app.assessment.path}: {a['labelled']} of {a['points']} points labelled (the page's "
              f"Assess mode; blind: the map classes stay in {assess.design_path(app.assessment.path).name})")
    print(f"annotate: open http://{'[' + host + ']' if ':' in host else host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
