"""annotate.py's HTTP API: listing, tiles, clicks saved in the format read_clicks takes, merges across servers,
the bounds and the paths it refuses, and (slow) a training started from the API with its overlay and suggestions."""

import json
import shlex
import socket
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine, from_origin

import annotate
import checkpoint
import page.training
import assess
from annotations import read_clicks
from page import bounds
from spec import ClassSpec, load_class_file
from tests.conftest import Server, colour_image, train_command, write_assessment_scene

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pngs(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(30, 40), (24, 36)]):
        Image.fromarray(colour_image(h, w, i)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture
def server(pngs, tmp_path):
    s = Server(pngs, tmp_path / "clicks.csv", tmp_path / "runs")
    yield s
    s.close()


def png(data):
    return np.asarray(Image.open(BytesIO(data)))


# --------------------------------------------------------------------------- listing and tiles

def test_listing_shows_an_unreadable_image_as_an_error(pngs, tmp_path):
    (pngs / "broken.png").write_bytes(b"not a png at all")
    s = Server(pngs, tmp_path / "clicks.csv", tmp_path / "runs")
    try:
        cfg = s.json("GET", "/api/config")
        assert [i["name"] for i in cfg["images"]] == ["im0", "im1"]
        assert cfg["images"][0]["width"] == 40 and cfg["images"][0]["height"] == 30
        assert [e["file"] for e in cfg["errors"]] == ["broken.png"]
        assert cfg["classes"]["names"][0] == "impervious_surfaces"
        assert s.request("GET", "/")[0] == 200 and b"<canvas" in s.request("GET", "/")[2]
    finally:
        s.close()


def test_tiles_are_windows_of_the_image_decimated_by_zoom(server, pngs):
    full = np.asarray(Image.open(pngs / "im0.png"))
    code, hdrs, data = server.request("GET", "/api/tile?image=im0&z=0&x=0&y=0&size=16")
    assert code == 200 and hdrs["Content-Type"] == "image/png"
    assert np.array_equal(png(data), full[:16, :16])
    code, _, data = server.request("GET", "/api/tile?image=im0&z=0&x=2&y=1&size=16")  # the edge tile: 8 x 14
    assert np.array_equal(png(data), full[16:30, 32:40])
    code, _, data = server.request("GET", "/api/tile?image=im0&z=1&x=0&y=0&size=16")  # every 2nd pixel
    assert np.array_equal(png(data), full[:30:2, :32:2])


@pytest.mark.slow
def test_a_20000_pixel_geotiff_is_served_by_windows(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    path = folder / "big.tif"
    with rasterio.open(path, "w", driver="GTiff", width=20000, height=20000, count=3, dtype="uint8", tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", sparse_ok=True, crs="EPSG:32616",
                       transform=from_origin(500000, 3700000, 0.5, 0.5)) as ds:
        patch = np.zeros((3, 100, 100), np.uint8)
        patch[0] = 255
        ds.write(patch, window=rasterio.windows.Window(15000, 12000, 100, 100))
    assert path.stat().st_size < 5_000_000  # sparse: the test holds no 1.2 GB of pixels
    s = Server(folder, tmp_path / "clicks.geojson", tmp_path / "runs")
    try:
        cfg = s.json("GET", "/api/config")
        assert cfg["images"][0]["width"] == 20000 and cfg["images"][0]["georeferenced"]
        code, _, data = s.request("GET", "/api/tile?image=big&z=0&x=58&y=46&size=256")  # holds (15000, 12000)
        tile = png(data)
        assert code == 200 and tile.shape == (256, 256, 3)
        assert (tile[12000 - 46 * 256, 15000 - 58 * 256] == (255, 0, 0)).all() and (tile[0, 0] == 0).all()
        code, _, data = s.request("GET", "/api/tile?image=big&z=7&x=0&y=0&size=256")  # the whole image, small
        assert code == 200 and png(data).shape == (157, 157, 3)
        assert s.request("GET", "/api/tile?image=big&z=0&x=0&y=0&size=4096")[0] == 400
        r = s.json("POST", "/api/clicks", {"op": "add", "image": "big", "points": [[15050.5, 12010.5]], "class": 1})
        assert r["count"] == 1
        got = read_clicks(tmp_path / "clicks.geojson", folder).images["big"]
        assert (got.rows.tolist(), got.cols.tolist(), got.classes.tolist()) == ([12010], [15050], [1])
    finally:
        s.close()


# --------------------------------------------------------------------------- clicks

def test_clicks_are_saved_at_once_in_the_format_read_clicks_takes(server, pngs, tmp_path):
    r = server.json("POST", "/api/clicks", {"op": "add", "image": "im0", "points": [[3, 4], [10.7, 20.2]], "class": 2})
    assert r["changed"] == [[3, 4, None, 2], [10, 20, None, 2]] and r["count"] == 2
    server.json("POST", "/api/clicks", {"op": "add", "image": "im1", "points": [[5, 6]], "class": 1})
    refs = [pngs / "im0.png", pngs / "im1.png"]
    got = read_clicks(tmp_path / "clicks.csv", refs)
    def xyc(c):
        return list(zip(c.cols.tolist(), c.rows.tolist(), c.classes.tolist()))
    assert xyc(got.images["im0"]) == [(3, 4, 2), (10, 20, 2)] and xyc(got.images["im1"]) == [(5, 6, 1)]
    # a point of another class on a clicked pixel replaces it; remove takes it away
    r = server.json("POST", "/api/clicks", {"op": "add", "image": "im0", "points": [[3, 4]], "class": 0})
    assert r["changed"] == [[3, 4, 2, 0]]
    r = server.json("POST", "/api/clicks", {"op": "remove", "image": "im0", "points": [[10, 20]]})
    assert r["changed"] == [[10, 20, 2, None]] and r["count"] == 2
    got = read_clicks(tmp_path / "clicks.csv", refs)
    assert got.images["im0"].cols.tolist() == [3] and got.images["im0"].classes.tolist() == [0]
    assert server.json("GET", "/api/clicks?image=im0")["clicks"] == {"im0": [[3, 4, 0, "point"]]}
    assert not list(tmp_path.glob(".clicks.csv.*.tmp"))  # written through a temporary, renamed


def test_a_scribble_is_saved_as_line_pixels(server, pngs, tmp_path):
    r = server.json("POST", "/api/clicks", {"op": "add", "image": "im0", "points": [[2.5, 5.5], [12.5, 5.5]],
                                            "class": 3, "kind": "line"})
    assert len(r["changed"]) >= 10
    got = read_clicks(tmp_path / "clicks.csv", [pngs / "im0.png", pngs / "im1.png"]).images["im0"]
    assert set(got.rows.tolist()) == {5} and {2, 12} <= set(got.cols.tolist())
    assert set(got.kinds.tolist()) == {1}  # annotations.LINE


def test_georeferenced_clicks_go_to_geojson_in_map_coordinates(tmp_path):
    folder = tmp_path / "geo"
    folder.mkdir()
    for i in range(2):
        with rasterio.open(folder / f"t{i}.tif", "w", driver="GTiff", width=32, height=32, count=3, dtype="uint8",
                           crs="EPSG:32616", transform=from_origin(500000 + 16 * i, 3700000, 0.5, 0.5)) as ds:
            ds.write(np.moveaxis(colour_image(32, 32, i), -1, 0))
    s = Server(folder, tmp_path / "clicks.geojson", tmp_path / "runs")
    try:
        s.json("POST", "/api/clicks", {"op": "add", "image": "t1", "points": [[7, 9]], "class": 4})
    finally:
        s.close()
    doc = json.loads((tmp_path / "clicks.geojson").read_text())
    x, y = doc["features"][0]["geometry"]["coordinates"][:2]
    assert (x, y) == (500000 + 16 + 7.5 * 0.5, 3700000 - 9.5 * 0.5)  # pixel centre in metres, EPSG:32616
    assert "32616" in json.dumps(doc.get("crs"))
    got = read_clicks(tmp_path / "clicks.geojson", [folder / "t1.tif"]).images["t1"]
    assert (got.cols.tolist(), got.rows.tolist(), got.classes.tolist()) == ([7], [9], [4])


@pytest.mark.slow
def test_two_servers_on_one_file_keep_each_others_clicks(pngs, tmp_path):
    a = Server(pngs, tmp_path / "clicks.csv", tmp_path / "runs_a")
    b = Server(pngs, tmp_path / "clicks.csv", tmp_path / "runs_b")
    try:
        def click(s, xs, cls):
            for x in xs:
                s.json("POST", "/api/clicks", {"op": "add", "image": "im0", "points": [[x, cls]], "class": cls})
        threads = [threading.Thread(target=click, args=(s, range(0, 30, 3), c))
                   for s, c in ((a, 1), (b, 2), (a, 3), (b, 4))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        a.close()
        b.close()
    got = read_clicks(tmp_path / "clicks.csv", [pngs / "im0.png", pngs / "im1.png"]).images["im0"]
    assert len(got) == 40
    assert sorted(set(zip(got.rows.tolist(), got.classes.tolist()))) == [(1, 1), (2, 2), (3, 3), (4, 4)]


def test_bad_operations_are_refused_and_leave_the_file_alone(server, tmp_path):
    server.json("POST", "/api/clicks", {"op": "add", "image": "im0", "points": [[1, 1]], "class": 0})
    before = (tmp_path / "clicks.csv").read_bytes()
    for body, status in [({"op": "add", "image": "im0", "points": [[1, 1]], "class": 6}, 400),  # 6 classes: 0..5
                         ({"op": "add", "image": "im0", "points": [[40, 1]], "class": 0}, 400),  # x past the width
                         ({"op": "add", "image": "im0", "points": [["a", 1]], "class": 0}, 400),
                         ({"op": "move", "image": "im0", "points": [[1, 1]]}, 400),
                         ({"op": "add", "image": "nope", "points": [[1, 1]], "class": 0}, 404),
                         ({"op": "add", "image": "im0", "points": [[1, 1]] * (bounds.MAX_PIXELS_PER_OP + 1),
                           "class": 0}, 413)]:
        assert server.request("POST", "/api/clicks", body)[0] == status, body
    assert (tmp_path / "clicks.csv").read_bytes() == before
    assert server.request("POST", "/api/clicks", b"{not json")[0] == 400
    assert server.request("POST", "/api/clicks", b"{}", {"Content-Type": "text/plain"})[0] == 415


def nodata_tif(folder, name="nd"):
    """A 16 x 16 GeoTIFF whose left 4 columns are nodata (0 in every band, GDAL_NODATA 0)."""
    folder.mkdir(exist_ok=True)
    img = np.moveaxis(colour_image(16, 16), -1, 0).clip(1, 255)
    img[:, :, :4] = 0
    with rasterio.open(folder / f"{name}.tif", "w", driver="GTiff", width=16, height=16, count=3, dtype="uint8",
                       nodata=0, crs="EPSG:32616", transform=from_origin(500000, 3700000, 0.5, 0.5)) as ds:
        ds.write(img)
    return folder


def test_a_click_on_nodata_is_refused_and_the_page_goes_on(tmp_path):
    folder = nodata_tif(tmp_path / "images")
    clicks = tmp_path / "clicks.geojson"
    s = Server(folder, clicks, tmp_path / "runs")
    try:
        code, _, body = s.request("POST", "/api/clicks", {"op": "add", "image": "nd", "points": [[1, 5]], "class": 1})
        assert code == 400 and "nodata" in json.loads(body)["error"] and not clicks.exists()
        assert s.json("GET", "/api/clicks")["clicks"] == {"nd": []}  # the page still reads its file
        s.json("POST", "/api/clicks", {"op": "add", "image": "nd", "points": [[8, 5]], "class": 1})
        before = clicks.read_bytes()
        # one point of an add on nodata: the whole add refused, nothing saved
        code, _, body = s.request("POST", "/api/clicks", {"op": "add", "image": "nd", "points": [[9, 9], [2, 9]],
                                                          "class": 2})
        assert code == 400 and "1 of the 2 points" in json.loads(body)["error"]
        assert clicks.read_bytes() == before
        # a line across the nodata edge: its nodata pixels left out and counted; a line on nodata only: refused
        r = s.json("POST", "/api/clicks", {"op": "add", "image": "nd", "points": [[0.5, 12.5], [10.5, 12.5]],
                                           "class": 3, "kind": "line"})
        assert r["nodata"] == 4 and sorted(x for x, _, _, _ in r["changed"]) == list(range(4, 11))
        code, _, body = s.request("POST", "/api/clicks", {"op": "add", "image": "nd", "points": [[0.5, 2.5], [3.5, 2.5]],
                                                          "class": 3, "kind": "line"})
        assert code == 400 and "nodata" in json.loads(body)["error"]
        got = read_clicks(clicks, folder).images["nd"]
        assert got.cols.min() >= 4 and len(got) == 8 and not read_clicks(clicks, folder).notes
    finally:
        s.close()
    s = Server(folder, clicks, tmp_path / "runs")  # a restart opens the same file
    s.close()


def test_a_click_file_of_nodata_clicks_only_opens_as_no_clicks(tmp_path):
    folder = nodata_tif(tmp_path / "images")
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("image,x,y,class\nnd,1,5,1\nnd,2,7,2\n")  # edited elsewhere: both on nodata
    s = Server(folder, clicks, tmp_path / "runs")
    try:
        r = s.json("GET", "/api/clicks")
        assert r["clicks"] == {"nd": []} and any("nodata" in n for n in r["notes"])
        assert s.json("GET", "/api/config")["images"][0]["name"] == "nd"
        s.json("POST", "/api/clicks", {"op": "add", "image": "nd", "points": [[8, 5]], "class": 1})
        assert s.json("GET", "/api/clicks")["clicks"] == {"nd": [[8, 5, 1, "point"]]}
    finally:
        s.close()


# --------------------------------------------------------------------------- checks at start

def start(argv, monkeypatch):
    """annotate.main(argv) that returns instead of serving: (exit code, stderr lines come through capsys)."""
    monkeypatch.setattr(annotate.ThreadingHTTPServer, "serve_forever", lambda self, *a, **k: None)
    return annotate.main(annotate.get_args_parser().parse_args(argv + ["--port", "0"]))


def test_a_checkpoint_of_other_classes_is_refused_at_start(pngs, tmp_path, monkeypatch, capsys):
    from checkpoint import save_checkpoint
    from model import TinySegmentation
    from spec import DataSpec
    save_checkpoint(tmp_path / "six.pth", TinySegmentation(6), DataSpec())  # the Potsdam classes
    three = ClassSpec(names=("ground", "roof", "tree"), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)))
    (tmp_path / "three.json").write_text(json.dumps(three.to_dict()))
    base = ["--images", str(pngs), "--clicks", str(tmp_path / "c.csv"), "--runs", str(tmp_path / "runs")]
    code = start(base + ["--classes", str(tmp_path / "three.json"), "--checkpoint", str(tmp_path / "six.pth")],
                 monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {tmp_path / 'six.pth'}: ")
    assert "['ground', 'roof', 'tree']" in err and "'impervious_surfaces'" in err and "clutter" in err
    assert start(base + ["--checkpoint", str(tmp_path / "six.pth")], monkeypatch) == 0  # the same classes: shown
    assert start(base + ["--checkpoint", str(tmp_path / "none.pth")], monkeypatch) == 2
    assert "none.pth" in capsys.readouterr().err


@pytest.mark.parametrize("command, says", [
    ("{python} train.py --images {images} --epochs {epoch}", "{epoch}"),
    ("{python} train.py --images {1}", "{1}"),
    ("{python} train.py --images {}", "{}"),
    ("{python} train.py --images {images[0]}", "{images[0]}"),
    ("{python} train.py --images {images", "{images"),
    ("no-such-program-here {images}", "not found"),
    ("./no-such-script.py {images}", "not found"),
    ("{python} 'train.py", "quotation"),
    ("  ", "empty"),
])
def test_train_command_mistakes_stop_the_start(pngs, tmp_path, monkeypatch, capsys, command, says):
    argv = ["--images", str(pngs), "--clicks", str(tmp_path / "c.csv"), "--runs", str(tmp_path / "runs"),
            "--train-command", command]
    assert start(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --train-command") and says in err, err


def test_a_good_train_command_starts(pngs, tmp_path, monkeypatch, capsys):
    for command in ("{python} train.py --images {images} --clicks {clicks} --classes {classes} --out {out} "
                    "--epochs {epochs}", "env python -c pass", f"{annotate.sys.executable} -c 'print({{{{}}}})'"):
        argv = ["--images", str(pngs), "--clicks", str(tmp_path / "c.csv"), "--runs", str(tmp_path / "runs"),
                "--train-command", command]
        assert start(argv, monkeypatch) == 0, capsys.readouterr().err
    monkeypatch.setenv("ANNOTATE_TRAIN_COMMAND", "{python} train.py {epoch}")
    assert start(["--images", str(pngs)], monkeypatch) == 2
    assert capsys.readouterr().err.startswith("error: --train-command ($ANNOTATE_TRAIN_COMMAND)")


# --------------------------------------------------------------------------- security and bounds

def test_paths_outside_what_the_server_owns_are_404(pngs, tmp_path):
    outside = tmp_path / "secret.png"
    Image.fromarray(colour_image(8, 8)).save(outside)
    (pngs / "link.png").symlink_to(outside)
    s = Server(pngs, tmp_path / "clicks.csv", tmp_path / "runs")
    try:
        assert [e["file"] for e in s.json("GET", "/api/config")["errors"]] == ["link.png"]
        for path in ["/static/../annotate.py", "/static/%2e%2e/annotate.py", "/static/%2e%2e%2fannotate.py",
                     "/static/..%2fannotate.py", "/../annotate.py", "/%2e%2e/annotate.py", "/annotate.py",
                     "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/etc/passwd", "/static/", "/static/app.jsx",
                     "/api/tile?image=../images/im0&z=0&x=0&y=0", "/api/tile?image=%2e%2e%2fimages%2fim0&z=0&x=0&y=0",
                     f"/api/tile?image={pngs}/im0.png&z=0&x=0&y=0", "/api/tile?image=/etc/passwd&z=0&x=0&y=0",
                     "/api/tile?image=link&z=0&x=0&y=0", "/api/tile?image=im0.png&z=0&x=0&y=0",
                     "/api/tile?image=im0&z=0&x=9&y=0", "/api/clicks?image=../clicks",
                     "/api/overlay?image=im0&z=0&x=0&y=0", "/clicks.csv", "/runs/"]:
            code, _, body = s.request("GET", path)
            assert code == 404, (path, code, body)
            assert b"root:" not in body and b"import " not in body  # neither /etc/passwd nor source
        assert s.request("POST", "/api/../api/clicks", {})[0] == 404
        assert s.request("GET", "/static/app.js")[0] == 200
    finally:
        s.close()


def test_bounds_body_size_and_tile_size(server):
    big = b"{" + b" " * (bounds.MAX_BODY + 1) + b"}"
    assert server.request("POST", "/api/clicks", big)[0] == 413
    assert server.request("GET", f"/api/tile?image=im0&z=0&x=0&y=0&size={bounds.MAX_TILE + 1}")[0] == 400
    assert server.request("GET", f"/api/tile?image=im0&z=0&x=0&y=0&size={bounds.MAX_TILE}")[0] == 200
    assert server.request("GET", "/api/tile?image=im0&z=99&x=0&y=0")[0] == 400
    assert server.request("GET", "/api/tile?image=im0&z=0&x=0&y=zero")[0] == 400
    assert server.request("GET", "/api/config", headers={"Host": "evil.example:8765"})[0] == 403


def raw(port, head, body=b""):
    """Send a hand-written request; the status code of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        return int(sock.makefile("rb").readline().split()[1])


def test_malformed_requests_are_400_or_415_not_500(server):
    head = "POST /api/clicks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: "
    assert raw(server.port, head + "abc", b"{}") == 400
    assert raw(server.port, head + "-2", b"{}") == 400
    add = {"op": "add", "image": "im0", "points": [[1, 1]], "class": 1}
    for bad in ({**add, "class": True}, {**add, "class": 1.0}, {**add, "points": [[[1, 2]]]},
                {**add, "points": [[1, 2, 3]]}, {**add, "points": [[1, True]]}, {**add, "points": [1, 2]}):
        code, _, body = server.request("POST", "/api/clicks", bad)
        assert code == 400, (bad, body)
    assert not (server.app.click_file.path.exists())
    for ctype in ("application/jsonp", "application/json-seq", "text/plain"):
        assert server.request("POST", "/api/clicks", add, {"Content-Type": ctype})[0] == 415, ctype
    assert server.request("POST", "/api/clicks", add, {"Content-Type": "application/json; charset=utf-8"})[0] == 200
    assert server.request("POST", "/api/clicks", add, {"Content-Type": "Application/JSON"})[0] == 200
    for epochs in ("abc", [1], 0, -1, True, 2.5, bounds.MAX_EPOCHS + 1, "5"):
        code, _, body = server.request("POST", "/api/train", {"epochs": epochs})
        assert code == 400 and "epochs must be a whole number" in json.loads(body)["error"], (epochs, body)
    assert server.app.training.status()["state"] == "idle"
    cfg = server.json("GET", "/api/config")
    assert cfg["bounds"]["max_epochs"] == bounds.MAX_EPOCHS and cfg["epochs"] == 10


def test_a_missing_epochs_keeps_the_default(server):
    server.json("POST", "/api/clicks", {"op": "add", "image": "im0", "points": [[1, 1]], "class": 1})
    server.app.training.command = "{python} -c pass {epochs}"  # ends at once (no model: the state turns failed)
    st = server.json("POST", "/api/train", {})
    assert st["state"] == "running" and st["epochs"] == 10
    wait_trained(server)
    assert server.json("POST", "/api/train", {"epochs": 3})["epochs"] == 3
    wait_trained(server)


def test_16_concurrent_clients_are_all_answered(server):
    assert server.server.request_queue_size >= 16
    failures, go = [], threading.Barrier(16)

    def client():
        go.wait()
        for _ in range(10):
            try:
                code, _, _ = server.request("GET", "/api/config")
                if code != 200:
                    failures.append(code)
            except OSError as e:
                failures.append(repr(e))
    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_held_out_metrics_are_the_checkpoints_epoch(tmp_path):
    (tmp_path / "history.json").write_text(json.dumps([
        {"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5, "val_accuracy_ci": [0.4, 0.6]},
        {"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.7, "val_accuracy_ci": [0.6, 0.8], "val_miou": float("nan")}]))
    assert page.training.held_out_metrics(tmp_path / "history.json", 1) == {
        "val_accuracy": 0.5, "val_accuracy_ci": [0.4, 0.6], "epoch": 1}
    assert page.training.held_out_metrics(tmp_path / "history.json")["val_miou"] is None
    assert page.training.held_out_metrics(tmp_path / "missing.json") == {}


# --------------------------------------------------------------------------- training

def test_read_progress_is_the_latest_run(tmp_path):
    path = tmp_path / "progress.jsonl"
    assert checkpoint.read_progress(path) is None
    old = [{"event": "start", "unit": "epoch", "epochs": 3, "steps": 30, "per_epoch": 10, "time": 1.0},
           {"event": "validation", "epoch": 3, "epochs": 3, "step": 30, "steps": 30, "loss": 0.5,
            "val": {"val_miou": 0.1}, "elapsed": 9.0},
           {"event": "end", "status": "done", "elapsed": 9.5}]
    new = [{"event": "start", "unit": "step", "epochs": 4, "steps": 200, "per_epoch": 50, "time": 2.0},
           {"event": "validation", "epoch": 1, "epochs": 4, "step": 50, "steps": 200, "loss": 0.9,
            "val": {"val_miou": 0.3, "val_kind": "held-out clicks"}, "elapsed": 4.0}]
    path.write_text("".join(json.dumps(e) + "\n" for e in old + new) + '{"event": "valid')  # a line half written
    run = checkpoint.read_progress(path)
    assert run == {"unit": "step", "epoch": 1, "epochs": 4, "step": 50, "steps": 200, "loss": 0.9,
                   "val": {"val_miou": 0.3, "val_kind": "held-out clicks"}, "elapsed": 4.0, "status": "running"}
    path.write_text("".join(json.dumps(e) + "\n" for e in old))
    assert checkpoint.read_progress(path)["status"] == "done" and checkpoint.read_progress(path)["step"] == 30
    path.write_text(json.dumps(old[0]) + "\nnot json\n")
    with pytest.raises(ValueError, match="line 2"):
        checkpoint.read_progress(path)


STAND_IN = """
import json, sys, pathlib
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
lines = [{"event": "start", "unit": "step", "epochs": 2, "steps": 20, "per_epoch": 10, "time": 0}]
lines += [{"event": "validation", "epoch": e, "epochs": 2, "step": 10 * e, "steps": 20, "loss": 1 / e,
           "val": {"val_oa": 0.5}, "elapsed": e} for e in (1, 2)]
(out / "progress.jsonl").write_text("".join(json.dumps(x) + "\\n" for x in lines))
print("epoch 7/9 (the log's wording is not read)")
"""


def test_the_status_follows_the_progress_file_not_the_log(server, tmp_path):
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    server.json("POST", "/api/clicks", {"op": "add", "image": "im0", "points": [[1, 1]], "class": 1})
    server.app.training.out.mkdir(parents=True)
    (server.app.training.out / "progress.jsonl").write_text(  # the last run's: not shown as this one's
        json.dumps({"event": "start", "unit": "epoch", "epochs": 5, "steps": 5, "per_epoch": 1, "time": 0}) + "\n")
    server.app.training.command = f"{{python}} {tmp_path / 'stand_in.py'} {{out}}"
    st = server.json("POST", "/api/train", {"epochs": 2})
    assert st["steps"] is None and st["step"] == 0
    st = wait_trained(server)  # no checkpoint written: the prediction fails, the progress stays
    assert (st["unit"], st["step"], st["steps"], st["epoch"], st["epochs"]) == ("step", 20, 20, 2, 2)
    assert st["val"] == {"val_oa": 0.5} and st["loss"] == 0.5



def wait_for(condition, timeout=120):
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < timeout, f"not within {timeout} s"
        time.sleep(0.2)


def wait_trained(s, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = s.json("GET", "/api/train")
        if st["state"] in ("done", "failed"):
            return st
        time.sleep(0.2)
    raise AssertionError(f"training did not finish in {timeout} s: {st}")


@pytest.mark.slow
def test_train_reads_only_the_images_the_page_serves(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(colour_image(30, 40)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG garbage, not an image")
    s = Server(folder, tmp_path / "clicks.csv", tmp_path / "runs", train_command=None)
    s.app.training.command = train_command(tmp_path)  # the page's own command, the tiny network
    try:
        assert [e["file"] for e in s.json("GET", "/api/config")["errors"]] == ["broken.png"]
        for cls, xs in ((5, (2, 6, 10)), (1, (29, 33, 37))):
            s.json("POST", "/api/clicks", {"op": "add", "image": "good", "class": cls,
                                           "points": [[x, y] for x in xs for y in (3, 10, 18, 26)]})
        s.json("POST", "/api/train", {"epochs": 2})
        st = wait_trained(s)
        assert st["state"] == "done", (st, (tmp_path / "runs" / "train.log").read_text()[-2000:])
        assert st["predicted"] == ["good"]
        assert sorted(p.name for p in (tmp_path / "runs" / "images").iterdir()) == ["good.png"]
    finally:
        s.close()
    assert (folder / "broken.png").exists() and read_clicks(tmp_path / "clicks.csv", [folder / "good.png"])


@pytest.mark.slow
def test_train_from_the_api_then_overlay_and_suggestions(pngs, tmp_path):
    s = Server(pngs, tmp_path / "clicks.csv", tmp_path / "runs", train_command=None)
    s.app.training.command = train_command(tmp_path)
    try:
        assert s.request("POST", "/api/train", {"epochs": 1})[0] == 400  # no clicks yet
        for img, (h, w) in (("im0", (30, 40)), ("im1", (24, 36))):
            pts = [[x, y] for x in (2, 6, 10) for y in (3, h - 4)]
            s.json("POST", "/api/clicks", {"op": "add", "image": img, "points": pts, "class": 5})
            pts = [[x, y] for x in (w - 3, w - 7, w - 11) for y in (3, h - 4)]
            s.json("POST", "/api/clicks", {"op": "add", "image": img, "points": pts, "class": 1})
        st = s.json("POST", "/api/train", {"epochs": 30})
        assert st["state"] == "running" and st["epochs"] == 30
        assert s.request("POST", "/api/train", {"epochs": 30})[0] == 409  # not started twice
        st = wait_trained(s)
        assert st["state"] == "done", st
        assert st["predicted"] == ["im0", "im1"]
        assert st["epoch"] == st["epochs"] == 30 and st["step"] == st["steps"] > 0, st  # from progress.jsonl
        assert any(k.startswith("val_") for k in st["metrics"])
        over = png(s.request("GET", "/api/overlay?image=im0&z=0&x=0&y=0&size=64")[2])
        assert over.shape == (30, 40, 4) and (over[..., 3] == 255).all()
        assert (over[15, 2, :3] == (255, 0, 0)).all() and (over[15, 37, :3] == (0, 0, 255)).all()  # clutter, building
        unsure = png(s.request("GET", "/api/overlay?image=im0&z=0&x=0&y=0&size=64&layer=unsure")[2])
        assert unsure.shape == (30, 40, 4)
        sug = s.json("GET", "/api/suggest?n=5&rule=margin")["suggestions"]
        assert len(sug) == 5 and sug == sorted(sug, key=lambda t: t["margin"])
        # the default is random (no model rule beat it, results/annotate_suggest_demo.md): the same clicks give the
        # same places, not the least sure ones, drawn over every predicted image
        assert s.json("GET", "/api/config")["suggest"] == {"rules": ["random", "margin"], "default": "random"}
        rand = s.json("GET", "/api/suggest?n=5")
        assert rand["rule"] == "random" and rand == s.json("GET", "/api/suggest?n=5&rule=random")
        assert len(rand["suggestions"]) == 5 and rand["suggestions"] != sug
        many = s.json("GET", "/api/suggest?n=40")["suggestions"]
        assert {t["image"] for t in many} == {"im0", "im1"}
        assert s.request("GET", "/api/suggest?rule=entropy")[0] == 400
        clicked = {(img, x, y) for img, pts in s.json("GET", "/api/clicks")["clicks"].items() for x, y, _, _ in pts}
        assert not clicked & {(t["image"], t["x"], t["y"]) for t in sug + many}
        s.json("POST", "/api/clicks", {"op": "add", "image": "im0", "points": [[1, 1]], "class": 0, "kind": "point"})
        assert s.json("GET", "/api/suggest?n=5")["suggestions"] != rand["suggestions"]  # a new click, new places
        assert (tmp_path / "runs" / "train.log").read_text().count("epoch") >= 2
    finally:
        s.close()


# --------------------------------------------------------------------------- adapting the model shown

def train_log_argv(runs):
    """The argv the page ran, from the first line of <runs>/train.log ("$ " + shlex.join(argv))."""
    first = (runs / "train.log").read_text().splitlines()[0]
    assert first.startswith("$ ")
    return shlex.split(first[2:])


def overlay(s, image, layer="classes"):
    """The whole overlay of an image (these are smaller than one 64-pixel tile): RGBA."""
    code, _, data = s.request("GET", f"/api/overlay?image={image}&z=0&x=0&y=0&size=64&layer={layer}")
    assert code == 200, (image, layer, data)
    return png(data)


def click_side(s, cls, right):
    """Clicks of `cls` on the left (clutter-coloured) or right (building-coloured) side of both images."""
    for img, (h, w) in (("im0", (30, 40)), ("im1", (24, 36))):
        xs = (w - 3, w - 7, w - 11) if right else (2, 6, 10)
        s.json("POST", "/api/clicks", {"op": "add", "image": img, "class": cls,
                                       "points": [[x, y] for x in xs for y in (3, h // 2, h - 4)]})


def parameters(path):
    """{name: tensor} of a checkpoint's learnt weights (the batch-norm running statistics are not weights)."""
    from checkpoint import load_model
    model, _ = load_model(path, "cpu")
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_changed(s, before, after):
    """The changed layer and counts equal what the two predictions' overlays give; returns the counts."""
    st = s.json("GET", "/api/train")
    for img in ("im0", "im1"):
        want = (before[img][..., :3] != after[img][..., :3]).any(-1)
        got = overlay(s, img, "changed")
        assert np.array_equal(got[..., 3] > 0, want), img
        assert (got[want][:, :3] == page.training.CHANGED_COLOUR).all()
        assert st["changed"]["pixels"][img] == int(want.sum())
        assert st["changed"]["share"][img] == pytest.approx(want.mean())
    return st["changed"]["pixels"]


@pytest.mark.slow
def test_train_adapts_the_model_shown_and_retrain_from_scratch_trains_anew(pngs, tmp_path):
    s = Server(pngs, tmp_path / "clicks.csv", tmp_path / "runs", train_command=None, adapt_steps=1)
    s.app.training.command = train_command(tmp_path)  # the page's own command ({budget}), the tiny network
    runs = tmp_path / "runs"
    try:
        assert s.json("GET", "/api/config")["adapt_steps"] == 1
        click_side(s, 5, right=False)  # clutter only: model 1 knows no building
        st = s.json("POST", "/api/train", {"epochs": 10})
        assert (st["how"], st["from_model"], st["warm"]) == ("anew", None, False)  # none started ahead yet
        st = wait_trained(s)
        assert st["state"] == "done" and st["message"] == "trained anew (10 epochs)", st
        warm = s.app.training._warm.proc  # the next round's train.py, started once this one was shown
        wait_for(lambda: s.json("GET", "/api/train")["warm_ready"])
        assert st["changed"]["since"] is None and "first model" in st["changed"]["note"]
        assert s.request("GET", "/api/overlay?image=im0&z=0&x=0&y=0&size=64&layer=changed")[0] == 404
        assert "--init" not in train_log_argv(runs)
        model1 = parameters(runs / "model.pth")  # kept beside the run folder, which the next run replaces
        first = {img: overlay(s, img) for img in ("im0", "im1")}

        click_side(s, 1, right=True)  # building on the right: Train adapts model 1 to the clicks as they are now
        st = s.json("POST", "/api/train", {})
        assert (st["state"], st["how"], st["from_model"], st["warm"]) == ("running", "adapt", 1, True)
        st = wait_trained(s)
        assert st["state"] == "done" and st["message"] == "adapted from model 1 (1 steps)", st
        assert warm.poll() == 0 and "warm: train.py imported in" in (runs / "train.log").read_text()
        argv = train_log_argv(runs)
        assert argv[argv.index("--init") + 1] == str(runs / "model.pth") and "--epochs" not in argv
        assert [argv[argv.index(f) + 1] for f in ("--steps", "--schedule", "--val-every")] == ["1", "cosine", "1"]
        assert st["step"] == st["steps"] == 1 and any(k.startswith("val_") for k in st["metrics"])
        assert f"init: the weights and preprocessing contract of {runs / 'model.pth'}" in \
            (runs / "train.log").read_text()
        # it started from model 1's weights: one Adam step moves no weight by more than the learning rate (0.02)
        adapted = parameters(runs / "run" / "last.pth")
        moved = max(float((adapted[n] - model1[n]).abs().max()) for n in model1)
        assert 0 < moved <= 0.02 + 1e-6, moved
        assert all(torch_equal(parameters(runs / "model.pth")[n], adapted[n]) for n in adapted)  # model 2 is kept
        second = {img: overlay(s, img) for img in ("im0", "im1")}
        assert st["changed"]["since"] == 1
        changes = check_changed(s, first, second)

        st = s.json("POST", "/api/train", {"epochs": 30, "restart": True})  # Retrain from scratch
        assert (st["how"], st["from_model"]) == ("anew", None)
        st = wait_trained(s)
        assert st["state"] == "done" and st["message"] == "trained anew (30 epochs)" and st["model"] == 3, st
        argv = train_log_argv(runs)
        assert "--init" not in argv and argv[argv.index("--epochs") + 1] == "30"
        assert "init: the weights" not in (runs / "train.log").read_text()
        third = {img: overlay(s, img) for img in ("im0", "im1")}
        assert (third["im0"][15, 37, :3] == (0, 0, 255)).all()  # building on the right now
        assert st["changed"]["since"] == 2
        changes = {img: n + check_changed(s, second, third)[img] for img, n in changes.items()}
        assert sum(changes.values()) > 0  # building appeared somewhere on the right over the two rounds
        assert s.request("POST", "/api/train", {"restart": "yes"})[0] == 400
        waiting = s.app.training._warm.proc
    finally:
        s.close()
    assert waiting.poll() is not None  # closing the server stops the train.py waiting for a next round


@pytest.mark.slow
def test_a_train_py_started_ahead_that_died_is_replaced_by_one_started_the_usual_way(pngs, tmp_path):
    s = Server(pngs, tmp_path / "clicks.csv", tmp_path / "runs", train_command=None, adapt_steps=1)
    s.app.training.command = train_command(tmp_path)
    try:
        click_side(s, 5, right=False)
        click_side(s, 1, right=True)
        s.app.training.warm_up()
        dead = s.app.training._warm.proc
        dead.kill()  # as if its imports had failed
        dead.wait()
        st = s.json("POST", "/api/train", {"epochs": 2})
        assert st["warm"] is False  # it could not take the arguments: train.py was started the usual way
        st = wait_trained(s)
        assert st["state"] == "done" and st["model"] == 1, st
        assert "warm: train.py imported" not in (tmp_path / "runs" / "train.log").read_text()
        assert s.app.training._warm.proc is not dead  # the next round's is a new one
    finally:
        s.close()


def torch_equal(a, b):
    return bool((a == b).all())


@pytest.mark.slow
def test_a_train_command_with_epochs_and_no_budget_still_trains_anew(pngs, tmp_path):
    old = train_command(tmp_path).replace("{budget}", "--epochs {epochs}")
    page.training.check_train_command(old)  # accepted at start
    s = Server(pngs, tmp_path / "clicks.csv", tmp_path / "runs", train_command=old)
    try:
        assert s.json("GET", "/api/config")["adapt_steps"] is None  # the page's Train cannot adapt
        click_side(s, 5, right=False)
        click_side(s, 1, right=True)
        for model in (1, 2):
            st = s.json("POST", "/api/train", {"epochs": 2})
            assert st["how"] == "anew" and ("cannot adapt" in st["message"]) == (model == 2), st
            st = wait_trained(s)
            assert st["state"] == "done" and st["model"] == model, st
            argv = train_log_argv(tmp_path / "runs")
            assert "--init" not in argv and argv[argv.index("--epochs") + 1] == "2"
    finally:
        s.close()


def test_budget_expands_into_arguments_and_stands_alone(pngs, tmp_path, monkeypatch, capsys):
    s = Server(pngs, tmp_path / "clicks.csv", tmp_path / "runs", adapt_steps=7)
    try:
        t = s.app.training
        assert t.command == page.training.DEFAULT_TRAIN_COMMAND and t.adapts and t.warms
        other = page.training.Training("python3 train.py {budget}", None, None, None, None, tmp_path, 1)
        assert not other.warms  # not this Python: started the usual way at each Train
        anew, adapt = t.argv(3), t.argv(3, tmp_path / "m.pth")
        at = anew.index("--epochs")
        assert anew[at:at + 2] == ["--epochs", "3"] and "{budget}" not in anew
        assert adapt[at:at + 8] == ["--init", str(tmp_path / "m.pth"), "--steps", "7", "--schedule", "cosine",
                                    "--val-every", "7"]
        assert anew[:at] == adapt[:at] and anew[at + 2:] == adapt[at + 8:]
    finally:
        s.close()
    base = ["--images", str(pngs), "--runs", str(tmp_path / "runs")]
    for command, says in (("{python} train.py --x={budget}", "stands alone"),
                          ("{python} train.py {budget} --epochs {epochs}", "not both")):
        assert start(base + ["--train-command", command], monkeypatch) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --train-command") and says in err, err
    assert start(base + ["--adapt-steps", "0"], monkeypatch) == 2
    assert "--adapt-steps must be >= 1" in capsys.readouterr().err


def test_changed_maps_count_image_pixels_by_the_overlay_rule():
    refs = {"a": type("Ref", (), {"shape": (6, 4)})()}
    before = {"a": {"classes": np.array([[0, 1], [1, 1], [0, 0]], np.uint8)}}  # 3 x 2 grid: 2 x 2 pixels a cell
    after = {"a": {"classes": np.array([[0, 0], [1, 1], [0, 1]], np.uint8)}, "new": {"classes": np.zeros((1, 1))}}
    changed = page.training.changed_maps(before, after, refs)
    assert list(changed) == ["a"] and changed["a"].tolist() == [[False, True], [False, False], [False, True]]
    assert page.training.changed_summary(changed, refs, 4) == {"since": 4, "pixels": {"a": 8}, "share": {"a": 8 / 24},
                                                          "note": "pixels whose class differs from model 4's"}
    assert page.training.changed_summary({}, refs, 0)["since"] is None
    finer = {"a": {"classes": np.array([[0, 0, 1, 1]] * 2 + [[1, 1, 1, 1]] * 2 + [[0, 0, 0, 0]] * 2, np.uint8)}}
    assert page.training.changed_maps(before, finer, refs)["a"].sum() == 0  # another grid: looked up by image pixel
    assert page.training.image_pixels(np.ones((3, 2), bool), (7, 5)) == 35


# --------------------------------------------------------------------------- Assess mode (--assess)

def draw_sample(tmp_path, n=12, floor=4, out="sample.gpkg"):
    """The scene of conftest.write_assessment_scene and a blind sample of it drawn by assess.py (seed 0)."""
    images, masks, classes, truth = write_assessment_scene(tmp_path / "scene")
    sample = tmp_path / out
    argv = ["sample", "--images", images, "--masks", masks, "--classes", classes, "--n", n, "--floor", floor,
            "--out", sample]
    assert assess.main(assess.get_args_parser().parse_args([str(a) for a in argv])) == 0
    return images, classes, sample, truth


@pytest.fixture
def assessing(tmp_path):
    """(server with --assess, sample, images, classes file, truth)."""
    images, classes, sample, truth = draw_sample(tmp_path)
    s = Server(images, tmp_path / "clicks.csv", tmp_path / "runs", assess=str(sample), classes=str(classes))
    yield s, sample, images, classes, truth
    s.close()


def truth_of(truth, p):
    return int(truth[p["image"]][p["row"], p["col"]])


def test_assess_points_never_reveal_the_map_class(assessing):
    s, sample, images, classes, truth = assessing
    design = json.loads(assess.design_path(sample).read_text())
    assert s.json("GET", "/api/config")["assess"] == {"sample": "sample.gpkg", "points": 12,
                                                      "first": design["points"][0]["id"]}
    summary = s.json("GET", "/api/assess")
    assert summary == {"sample": "sample.gpkg", "points": 12, "labelled": 0, "classes": ["background", "building"],
                       "next": {k: design["points"][0][k] for k in ("id", "image", "row", "col")}}
    bodies = [s.request("GET", "/api/assess")[2], s.request("GET", "/api/config")[2]]
    for k, p in enumerate(design["points"]):
        code, _, body = s.request("GET", f"/api/assess/point?id={p['id']}")
        got = json.loads(body)
        assert code == 200 and got == {"id": p["id"], "image": p["image"], "row": p["row"], "col": p["col"],
                                       "index": k + 1, "reference": None,
                                       "previous": design["points"][k - 1]["id"] if k else None,
                                       "following": design["points"][k + 1]["id"] if k < 11 else None}
        bodies.append(body)
    bodies.append(s.request("POST", "/api/assess", {"id": 1, "reference": 0})[2])
    for body in bodies:  # neither the map's class nor the stratum (the map class too) is ever sent
        assert b"map_class" not in body and b"stratum" not in body and b"mapped" not in body, body


def test_labels_through_the_api_give_the_estimates_assess_gives(assessing):
    s, sample, images, classes, truth = assessing
    spec = load_class_file(classes)
    order = assess.Assessment.open(sample, images, spec).points()
    first = order[0]
    r = s.json("POST", "/api/assess", {"id": first["id"], "reference": truth_of(truth, first)})
    assert (r["labelled"], r["points"], r["next"]["id"]) == (1, 12, order[1]["id"])
    # saved at once: the layer read back by assess holds the label
    assert assess.Assessment.open(sample, images, spec).reference == {first["id"]: truth_of(truth, first)}
    code, _, body = s.request("GET", "/api/assess/estimates")
    with pytest.raises(ValueError) as too_few:
        assess.Assessment.open(sample, images, spec).estimates()
    assert code == 409 and json.loads(body)["error"] == str(too_few.value) and "label more" in str(too_few.value)
    assert s.request("POST", "/api/assess/write", {})[0] == 409
    # skipping the second point: the next after the third is the fourth, and the second comes round again
    for p in order[2:]:
        r = s.json("POST", "/api/assess", {"id": p["id"], "reference": truth_of(truth, p)})
    assert r["next"]["id"] == order[1]["id"] and r["labelled"] == 11
    r = s.json("POST", "/api/assess", {"id": order[1]["id"], "reference": truth_of(truth, order[1])})
    assert r["labelled"] == 12 and r["next"] is None
    got = s.json("GET", "/api/assess/estimates")
    want = assess.Assessment.open(sample, images, spec).estimates()
    z = 1.96
    assert (got["labelled"], got["points"], got["design"]) == (12, 12, "stratified")
    assert "not scores on clicks" in got["basis"]
    assert got["overall_accuracy"]["estimate"] == pytest.approx(want.oa)
    assert got["overall_accuracy"]["low"] == pytest.approx(want.oa - z * want.oa_se)
    pixels, pixels_se = want.area_in()
    design = json.loads(assess.design_path(sample).read_text())
    mapped = {int(c): v for c, v in design["mapped_pixels"].items()}
    for j, c in enumerate(got["classes"]):
        assert c["name"] == spec.names[j]
        for key, est, se in (("users_accuracy", want.ua, want.ua_se), ("producers_accuracy", want.pa, want.pa_se),
                             ("area_proportion", want.area, want.area_se), ("area_pixels", pixels, pixels_se),
                             ("area_ha", pixels * 0.25 / 1e4, pixels_se * 0.25 / 1e4)):
            for field, value in (("estimate", est[j]), ("se", se[j]), ("high", est[j] + z * se[j])):
                assert (c[key][field] is None) if np.isnan(value) else c[key][field] == pytest.approx(value), key
        assert c["map_share"] == pytest.approx(mapped[j] / sum(mapped.values()))  # the map's own share, beside
    assert got["classes"][1]["map_share"] > 2 * got["classes"][1]["area_proportion"]["estimate"]  # it overstates
    # the tables, as assess.py estimate writes them; never replaced unasked
    r = s.json("POST", "/api/assess/write", {})
    assert r == {"csv": "sample_estimates.csv", "markdown": "sample_estimates.md", "labelled": 12, "points": 12}
    md = (sample.parent / "sample_estimates.md").read_text()
    assert "12 of the 12 points drawn are labelled" in md
    code, _, body = s.request("POST", "/api/assess/write", {})
    assert code == 409 and "overwrite" in json.loads(body)["error"]
    assert s.json("POST", "/api/assess/write", {"overwrite": True})["csv"] == "sample_estimates.csv"
    # a label cleared (null) is unlabelled again
    r = s.json("POST", "/api/assess", {"id": first["id"], "reference": None})
    assert r["labelled"] == 11 and r["next"]["id"] == first["id"]
    assert first["id"] not in assess.Assessment.open(sample, images, spec).reference


def test_two_servers_on_one_sample_keep_each_others_labels(assessing, tmp_path):
    s, sample, images, classes, truth = assessing
    other = Server(images, tmp_path / "clicks2.csv", tmp_path / "runs2", assess=str(sample), classes=str(classes))
    try:
        s.json("POST", "/api/assess", {"id": 1, "reference": 1})
        r = other.json("POST", "/api/assess", {"id": 2, "reference": 0})
        assert r["labelled"] == 2 and s.json("GET", "/api/assess")["labelled"] == 2
        assert s.json("GET", "/api/assess/point?id=2")["reference"] == 0
    finally:
        other.close()
    assert assess.Assessment.open(sample, images, load_class_file(classes)).reference == {1: 1, 2: 0}


def test_bad_assess_requests_are_400_and_change_nothing(assessing, server):
    s, sample, images, classes, truth = assessing
    before = sample.read_bytes()
    for body in ({"id": 0, "reference": 1}, {"id": 13, "reference": 1}, {"id": "1", "reference": 1},
                 {"id": True, "reference": 1}, {"id": 1.0, "reference": 1}, {"reference": 1},
                 {"id": 1, "reference": 2}, {"id": 1, "reference": -1}, {"id": 1, "reference": True},
                 {"id": 1, "reference": "building"}, {"id": 1, "reference": 1.0}, {"id": 1}):
        code, _, data = s.request("POST", "/api/assess", body)
        assert code == 400, (body, data)
    for path in ("/api/assess/point", "/api/assess/point?id=", "/api/assess/point?id=abc",
                 "/api/assess/point?id=0", "/api/assess/point?id=13", "/api/assess/point?id=-1",
                 "/api/assess/point?id=%C2%B2", "/api/assess?after=99", "/api/assess?after=x"):
        assert s.request("GET", path)[0] == 400, path
    assert s.request("POST", "/api/assess/write", {"overwrite": "yes"})[0] == 400
    assert s.request("POST", "/api/assess", b"{}", {"Content-Type": "text/plain"})[0] == 415
    assert sample.read_bytes() == before
    # a page without --assess has no Assess mode
    assert server.json("GET", "/api/config")["assess"] is None
    for method, path in (("GET", "/api/assess"), ("GET", "/api/assess/point?id=1"),
                         ("GET", "/api/assess/estimates"), ("POST", "/api/assess"), ("POST", "/api/assess/write")):
        assert server.request(method, path, {} if method == "POST" else None)[0] == 404, path


def test_assess_refusals_at_start(tmp_path, monkeypatch, capsys):
    images, classes, sample, truth = draw_sample(tmp_path)
    base = ["--images", str(images), "--classes", str(classes), "--runs", str(tmp_path / "runs")]

    def refused(argv, *says):
        assert start(argv, monkeypatch) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and all(s in err for s in says), err

    assert start(base + ["--assess", str(sample), "--clicks", str(tmp_path / "c.csv")], monkeypatch) == 0
    assert "0 of 12 points labelled" in capsys.readouterr().out
    # the sample is never the click file, nor is any sample
    refused(base + ["--assess", str(sample), "--clicks", str(sample)], "is the --assess sample")
    refused(base + ["--clicks", str(sample)], "is an assessment sample (sample.design.json beside it)")
    # a sample without its design
    lone = tmp_path / "lone.gpkg"
    lone.write_bytes(sample.read_bytes())
    refused(base + ["--assess", str(lone)], str(tmp_path / "lone.design.json"))
    # drawn over other classes
    three = ClassSpec(names=("ground", "roof", "tree"), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)))
    (tmp_path / "three.json").write_text(json.dumps(three.to_dict()))
    refused(["--images", str(images), "--classes", str(tmp_path / "three.json"), "--assess", str(sample)],
            str(assess.design_path(sample)), "['background', 'building']")
    # drawn over other images: one missing, one of another size
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    (fewer / "tile0.tif").write_bytes((images / "tile0.tif").read_bytes())
    refused(base[2:] + ["--images", str(fewer), "--assess", str(sample)], str(assess.design_path(sample)),
            "tile1.tif", str(fewer))
    with rasterio.open(fewer / "tile1.tif", "w", driver="GTiff", width=30, height=40, count=3, dtype="uint8",
                       crs="EPSG:32616", transform=Affine(0.5, 0, 500020, 0, -0.5, 4000000)) as ds:
        ds.write(np.zeros((3, 40, 30), np.uint8))
    refused(base[2:] + ["--images", str(fewer), "--assess", str(sample)], "tile1.tif (40 x 40 when drawn, 30 x 40 now)")
    assert not (tmp_path / "c.csv").exists()


def test_train_from_the_page_never_reads_the_sample(assessing):
    """The argv the page builds for train.py names the click file, never the sample; and train.py refuses the
    sample as clicks anyway."""
    import train
    from config import config_from_args
    s, sample, images, classes, truth = assessing
    argv = s.app.training.argv(2)
    assert not any(str(sample) in a or sample.stem in Path(a).name for a in argv), argv
    assert argv[argv.index("--clicks") + 1] == str(s.app.click_file.path)
    args = train.get_args_parser().parse_args(argv[2:])  # after {python} train.py: train's own parser
    args.clicks = str(sample)
    with pytest.raises(ValueError, match="is an assessment sample"):
        train.read_run_clicks(config_from_args(args))


# --------------------------------------------------------------------------- the live layer: a click repaints at once

def show_tiny_model(s, tmp_path):
    """The page shows an untrained tiny network (as `annotate --checkpoint` does): model 1, no training."""
    import torch
    from checkpoint import save_checkpoint
    from model import TinySegmentation
    from spec import DataSpec
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "tiny.pth", TinySegmentation(6), DataSpec(scale=1.0))
    s.app.training.predict_all(tmp_path / "tiny.pth")
    s.app.training.state.update(state="done", model=1)


def test_a_repaint_paints_again_only_the_windows_of_the_clicks_that_changed(tmp_path, monkeypatch):
    import page.live
    from checkpoint import load_model
    from tests.conftest import conditioned_tiny
    net, _ = load_model(conditioned_tiny(tmp_path / "cond.pth"), "cpu")  # sees 2 cells around a cell
    monkeypatch.setattr(page.live, "REPAINT_RADIUS", 4)
    monkeypatch.setattr(page.live, "REPAINT_CONTEXT", 3)
    small = colour_image(40, 60)
    first = [(5, 5, 1)]
    shown = page.live.repaint(net, small, first)  # the whole image
    assert (shown == page.live.repaint(net, small, first, shown, changed=[])).all()  # nothing changed: all of it
    clicks = first + [(20, 30, 4), (21, 30, 4)]
    again = page.live.repaint(net, small, clicks, shown, changed=[(20, 30), (21, 30)])
    whole = page.live.repaint(net, small, clicks)
    window = np.zeros(shown.shape, bool)
    window[16:26, 26:35] = True  # within 4 cells of either click
    assert (again[window] == whole[window]).all() and (whole[window] == 4).sum() > 20  # painted again, exactly
    assert (again[~window] == shown[~window]).all()  # the rest as it was
    assert (whole[~window] != shown[~window]).sum() == 0  # (here the clicks reach no further than their windows)
    many = [(r, 50, 2) for r in range(0, 40, 4)]  # more than REPAINT_MAX changes: the whole image
    assert (page.live.repaint(net, small, many, shown, [(r, 50) for r, _, _ in many]) ==
            page.live.repaint(net, small, many)).all()


def test_click_input_makes_the_page_train_click_conditioned_models(pngs, tmp_path):
    for given, added in ((["--click-input", "distance"], " --click-input distance"), ([], "")):
        args = annotate.get_args_parser().parse_args(["--images", str(pngs), "--runs", str(tmp_path / "runs"),
                                                      "--port", "0"] + given)
        server = annotate.make_server(args)
        try:
            assert server.app.training.command == page.training.DEFAULT_TRAIN_COMMAND + added
        finally:
            server.server_close()
    with pytest.raises(SystemExit) as e:  # not a choice: refused by the parser, exit 2
        annotate.get_args_parser().parse_args(["--images", str(pngs), "--click-input", "square"])
    assert e.value.code == 2


def test_a_click_conditioned_model_paints_the_live_layer_with_the_clicks_as_its_input(server, tmp_path):
    from tests.conftest import conditioned_tiny
    server.app.training.predict_all(conditioned_tiny(tmp_path / "cond.pth"))
    server.app.training.state.update(state="done", model=1)
    classes = overlay(server, "im0")
    live = overlay(server, "im0", "live")
    assert (live == classes).all()  # no clicks: the network's own map (empty click planes)
    st = server.json("GET", "/api/live")
    assert st["conditioned"] and st["clicks"] == 0 and "click-conditioned" in st["head"]
    car = list(annotate.POTSDAM.palette[4])
    server.json("POST", "/api/clicks", {"op": "add", "image": "im0", "points": [[20, 15]], "class": 4})
    after = overlay(server, "im0", "live")
    assert after[15, 20, :3].tolist() == car and after[15, 23, :3].tolist() == car  # the click and its disc
    assert (after[:, :10] == live[:, :10]).all()  # far from it: the map as it was (the network sees no click there)
    st = server.json("GET", "/api/live")
    assert st["clicks"] == 1 and st["last"]["clicks"] == 1 and st["seconds"]["predict"] < 10
    assert (overlay(server, "im0") == classes).all() and server.json("GET", "/api/train")["model"] == 1  # untrained
    server.json("POST", "/api/clicks", {"op": "remove", "image": "im0", "points": [[20, 15]]})
    assert (overlay(server, "im0", "live") == live).all()  # the click gone: the map it changed comes back


def test_the_live_layer_follows_each_click_without_training(server, tmp_path):
    assert server.request("GET", "/api/overlay?image=im0&z=0&x=0&y=0&size=64&layer=live")[0] == 404
    assert server.request("GET", "/api/live")[0] == 409  # no model yet
    show_tiny_model(server, tmp_path)
    classes = overlay(server, "im0")
    live = overlay(server, "im0", "live")
    assert live.shape == classes.shape == (30, 40, 4) and (live[..., 3] == 255).all()
    assert (live == classes).all(-1).mean() > 0.99  # no clicks: the head is the network's own classifier
    assert server.json("GET", "/api/live")["clicks"] == 0
    car = list(annotate.POTSDAM.palette[4])
    pts = [[x, y] for x in (5, 15, 25, 35) for y in (5, 15, 25)]
    server.json("POST", "/api/clicks", {"op": "add", "image": "im0", "points": pts, "class": 4})
    after = overlay(server, "im0", "live")
    assert np.mean([after[y, x, :3].tolist() == car for x, y in pts]) >= 0.8  # the clicks' class where they are
    st = server.json("GET", "/api/live")
    assert st["model"] == 1 and st["clicks"] == 12 and st["seconds"]["fit"] < 1
    assert st["version"] == server.json("GET", "/api/clicks")["version"]
    assert (overlay(server, "im0") == classes).all()  # the model's own layer: nothing trained
    assert server.json("GET", "/api/train")["model"] == 1
    server.json("POST", "/api/clicks", {"op": "remove", "image": "im0", "points": pts})
    assert (overlay(server, "im0", "live") == live).all()  # the clicks gone: the map they changed comes back
    assert server.json("GET", "/api/live")["clicks"] == 0
    assert server.request("GET", "/api/overlay?image=im0&z=0&x=0&y=0&size=64&layer=head")[0] == 400
