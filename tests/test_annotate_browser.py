"""annotate.py in a real browser: headless system Chromium (Debian's chromium + chromium-driver) driven by Selenium
does what a person does: pick a class, click points on two images, remove and undo, reload, train, see the
overlay, answer a suggestion; then the click file holds exactly the pixels clicked. In the Assess mode, it labels
the points of a blind sample with the number keys and reads the estimates table. The page's sources (ES modules
under static/) type none of the server's bounds: they come from /api/config, and a server with other bounds gets
a page that keeps to those; the page defines one global, `window.app`, which these tests read its state through.

Set ANNOTATE_SCREENSHOT=images/annotate.png to save the page with its overlay (the README's picture). Without
Chromium, its driver or selenium, or when the browser does not start, the test is skipped with the reason (under
CI=true, where .ci/run installs them, it fails instead); once the browser runs, every failure is a failure."""

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import assess
import page.training
from annotations import read_clicks
from spec import load_class_file
from tests.conftest import Server, colour_image, train_command, write_assessment_scene

STATIC = Path(__file__).resolve().parents[1] / "page" / "static"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "apt-get install chromium chromium-driver"


def start_chromium(profile):
    """Headless Chromium driven by Selenium, or a skip that says why not (no Chromium, no driver, no selenium, a
    browser that does not start); under CI=true the same reasons fail. Only the start is guarded."""
    def cannot(why):
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI=true: .ci/run installs them)", pytrace=False)
        pytest.skip(f"{why}; under CI=true the test runs")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        cannot(f"no {' and no '.join(missing)} ({INSTALL})")
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        cannot(f"selenium is not installed ({e}): pip install -r requirements.txt")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,950", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    try:
        return webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))
    except (WebDriverException, OSError) as e:
        first = (getattr(e, "msg", None) or str(e) or type(e).__name__).strip().splitlines()[0]
        cannot(f"{CHROMIUM} does not start through {CHROMEDRIVER}: {first}")


@pytest.fixture
def browser(tmp_path):
    driver = start_chromium(tmp_path / "chromium-profile")
    yield driver
    driver.quit()


# --------------------------------------------------------------------------- when there is no browser

def fake(path, script="#!/bin/sh\nexit 1\n"):
    path.write_text(script)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("missing", ["CHROMIUM", "CHROMEDRIVER"])
def test_a_missing_browser_or_driver_is_a_skip_with_the_reason(missing, tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", fake(tmp_path / "chromium"))
    monkeypatch.setattr(sys.modules[__name__], "CHROMEDRIVER", fake(tmp_path / "chromedriver"))
    monkeypatch.setattr(sys.modules[__name__], missing, tmp_path / "nothing")
    with pytest.raises(pytest.skip.Exception, match=f"no {tmp_path / 'nothing'} .*chromium-driver"):
        start_chromium(tmp_path / "profile")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        start_chromium(tmp_path / "profile")


def test_a_browser_that_does_not_start_is_a_skip_with_the_reason(tmp_path, monkeypatch):
    pytest.importorskip("selenium")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", fake(tmp_path / "chromium"))
    monkeypatch.setattr(sys.modules[__name__], "CHROMEDRIVER", fake(tmp_path / "chromedriver"))
    with pytest.raises(pytest.skip.Exception, match="does not start through"):
        start_chromium(tmp_path / "profile")


# --------------------------------------------------------------------------- the page's sources

# A number as JS or HTML writes it (20000, 20_000, 2e4, 256 << 10), not part of a name or a colour (#000).
NUMBER = re.compile(r"(?<![\w.#$])(\d[\d_]*(?:\.\d+)?(?:e[+-]?\d+)?)(?:\s*<<\s*(\d+))?(?![\w.])", re.I)
UNRELATED = "not a server bound"  # a line that says so may type a number equal to a bound by chance


def page_sources():
    return {p.name: p.read_text() for p in sorted(STATIC.glob("*.js")) + [STATIC / "index.html"]}


def config_bounds(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(colour_image(8, 8)).save(folder / "im0.png")
    s = Server(folder, tmp_path / "clicks.csv", tmp_path / "runs")
    try:
        return s.json("GET", "/api/config")["bounds"]
    finally:
        s.close()


def test_the_page_types_no_server_bound_and_uses_every_one(tmp_path):
    bounds = config_bounds(tmp_path)
    assert bounds and all(isinstance(v, int) for v in bounds.values()), bounds
    typed = []
    for name, text in page_sources().items():
        for i, line in enumerate(text.splitlines(), 1):
            if UNRELATED in line:
                continue
            for m in NUMBER.finditer(line):
                value = float(m.group(1).replace("_", "")) * 2 ** int(m.group(2) or 0)
                typed += [f"static/{name}:{i}: {m.group(0)} is {k}" for k, v in bounds.items() if value == v]
    assert not typed, ("the page types the server's bounds; read them from /api/config's bounds "
                       f"(or mark an unrelated number '// {UNRELATED}'): {typed}")
    scripts = "\n".join(t for n, t in page_sources().items() if n.endswith(".js"))
    assert set(re.findall(r"\bbounds\.(\w+)", scripts)) == set(bounds), "each bound is used, and only those"


def test_the_page_is_one_module_that_imports_the_others_and_sets_one_global():
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="/static/app.js">']
    assert not re.search(r"\son[a-z]+=", html), "no inline handlers: the modules attach them"
    reached, todo = set(), ["app.js"]
    while todo:
        name = todo.pop()
        reached.add(name)
        text = (STATIC / name).read_text()
        assert '"use strict"' not in text, f"{name}: a module is strict already"
        todo += [n for n in re.findall(r'^import [^;]* from "\./([\w-]+\.js)";', text, re.M) if n not in reached]
    assert reached == {p.name for p in STATIC.glob("*.js")}, "every script is a module the entry imports"
    scripts = "\n".join(p.read_text() for p in STATIC.glob("*.js"))
    assert re.findall(r"\b(?:window|globalThis|self)\.(\w+)\s*=(?!=)", scripts) == ["app"]


# --------------------------------------------------------------------------- the page in Chromium


def wait(driver, script, timeout=30, what=None):
    """Run `script` (JS returning a value) until it is truthy; returns the value."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = driver.execute_script(script)
        if v:
            return v
        time.sleep(0.1)
    said = driver.execute_script("return document.getElementById('message').textContent")
    raise AssertionError(f"timed out waiting for {what or script}; the page says: {said!r}")


def on_screen(driver, x, y):
    """The window position of image pixel (x, y)'s centre in the current view."""
    return driver.execute_script(
        "const [sx, sy] = app.viewer.imageToScreen(arguments[0] + 0.5, arguments[1] + 0.5);"
        "const r = app.viewer.canvas.getBoundingClientRect();"
        "return [Math.round(r.left + sx), Math.round(r.top + sy)];",
        x, y)


def click_pixel(driver, x, y):
    """A real mouse click at the screen position of image pixel (x, y)'s centre in the current view."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    vx, vy = on_screen(driver, x, y)
    action = ActionBuilder(driver)
    action.pointer_action.move_to_location(vx, vy).click()
    action.perform()


def count(driver):
    return int(driver.find_element("id", "count").text)


def press(driver, *keys):
    from selenium.webdriver.common.action_chains import ActionChains
    ActionChains(driver).send_keys(*keys).perform()


def undo_keys(driver, key):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    ActionChains(driver).key_down(Keys.CONTROL).send_keys(key).key_up(Keys.CONTROL).perform()


def drawn_colour(driver, x, y):
    return driver.execute_script(
        "const [sx, sy] = app.viewer.imageToScreen(arguments[0] + 0.5, arguments[1] + 0.5);"
        "return Array.from(app.viewer.ctx.getImageData(Math.round(sx), Math.round(sy), 1, 1).data.slice(0, 3));", x, y)


@pytest.mark.slow
def test_click_reload_train_overlay_suggest_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select
    folder = tmp_path / "images"
    folder.mkdir()
    shapes = {"im0": (48, 64), "im1": (40, 56)}
    for i, (name, (h, w)) in enumerate(shapes.items()):
        Image.fromarray(colour_image(h, w, i)).save(folder / f"{name}.png")
    s = Server(folder, tmp_path / "clicks.csv", tmp_path / "runs")
    s.app.training.command = train_command(tmp_path)
    palette = s.app.classes.palette
    expected = {}  # (image, x, y) -> class
    try:
        browser.get(f"http://127.0.0.1:{s.port}/")
        wait(browser, "return document.body.dataset.ready", what="the page")
        for name, (h, w) in shapes.items():
            browser.find_element("css selector", f'#images li[data-name="{name}"]').click()
            for key, cls, xs in (("6", 5, (4, 10, 16)), ("2", 1, (w - 5, w - 12))):  # clutter left, building right
                press(browser, key)
                assert wait(browser, f"return app.cls === {cls}")
                for j, x in enumerate(xs):
                    y = 8 + 9 * j
                    n = count(browser)
                    click_pixel(browser, x, y)
                    wait(browser, f"return Number(document.getElementById('count').textContent) === {n + 1}")
                    expected[(name, x, y)] = cls
        assert count(browser) == 10
        # a click on a point removes it; undo brings it back, redo removes it again, undo again
        click_pixel(browser, 16, 26)
        wait(browser, "return document.getElementById('count').textContent === '9'")
        undo_keys(browser, "z")
        wait(browser, "return document.getElementById('count').textContent === '10'")
        undo_keys(browser, "y")
        wait(browser, "return document.getElementById('count').textContent === '9'")
        browser.find_element("id", "undo").click()
        wait(browser, "return document.getElementById('count').textContent === '10'")

        browser.refresh()  # the clicks come back from the file
        wait(browser, "return document.body.dataset.ready", what="the page after reload")
        assert count(browser) == 10
        wait(browser, "return app.viewer.image && app.viewer.image.name === 'im0'")
        for (name, x, y), cls in expected.items():
            if name == "im0":
                got = wait(browser, f"const [sx, sy] = app.viewer.imageToScreen({x} + 0.5, {y} + 0.5);"
                                    f"const d = app.viewer.ctx.getImageData(Math.round(sx), Math.round(sy), 1, 1).data;"
                                    f"return d[0] === {palette[cls][0]} && d[1] === {palette[cls][1]} && "
                                    f"d[2] === {palette[cls][2]}", what=f"the point at {x},{y} drawn")
                assert got

        epochs = browser.find_element("id", "epochs")
        epochs.clear()
        epochs.send_keys("2")
        browser.find_element("id", "train").click()
        wait(browser, "return document.getElementById('train-status').textContent.startsWith('model 1')", timeout=180,
             what="the training")
        assert browser.execute_script("const p = document.getElementById('progress'); return p.value === p.max")
        wait(browser, "return app.viewer.overlayTilesShown > 0", what="the overlay")
        assert browser.find_element("id", "accuracy").text.startswith(  # and says what such a score covers
            "held-out clicks (the kind of pixels that were clicked, not the map):")
        # the overlay shows: building predicted on the right half, drawn over the image at half opacity
        left = drawn_colour(browser, 30, 44)
        assert left != list(colour_image(48, 64, 0)[44, 30])
        browser.find_element("id", "suggest-n").clear()
        browser.find_element("id", "suggest-n").send_keys("3")
        browser.find_element("id", "suggest").click()
        wait(browser, "return app.training.suggestions.length === 3", what="suggestions")
        rule = browser.find_element("id", "suggest-rule")  # the server's rules, random (measured best) chosen
        assert [o.get_attribute("value") for o in rule.find_elements("tag name", "option")] == ["random", "margin"]
        assert rule.get_attribute("value") == "random"
        assert browser.execute_script("return app.training.suggestions") == s.json("GET", "/api/suggest?n=3")[
            "suggestions"]
        Select(rule).select_by_value("margin")
        browser.find_element("id", "suggest").click()
        wait(browser, "const m = app.training.suggestions.map((t) => t.margin); return m.length === 3 && "
                      "m.every((v, i) => i === 0 || m[i - 1] <= v)", what="the least sure places")
        press(browser, "f")  # the whole image, suggestions ringed
        shot = tmp_path / "annotate.png"
        browser.execute_script("document.getElementById('side').scrollTop = 0; app.viewer.draw()")
        browser.save_screenshot(str(shot))
        if os.environ.get("ANNOTATE_SCREENSHOT"):
            Image.open(shot).convert("RGB").save(os.environ["ANNOTATE_SCREENSHOT"], optimize=True)
        sug = browser.execute_script("return app.training.suggestions[0]")
        wait(browser, f"return app.viewer.image.name === '{sug['image']}'")
        press(browser, "4")  # tree
        click_pixel(browser, sug["x"], sug["y"])
        wait(browser, "return document.getElementById('count').textContent === '11'")
        assert browser.execute_script("return app.training.suggestions.length") == 2
        expected[(sug["image"], sug["x"], sug["y"])] = 3
        press(browser, Keys.ESCAPE)
    finally:
        s.close()
    got = read_clicks(tmp_path / "clicks.csv", sorted(folder.iterdir()))
    saved = {(n, int(x), int(y)): int(k) for n, c in got.images.items() for x, y, k in zip(c.cols, c.rows, c.classes)}
    assert saved == expected


@pytest.mark.slow
def test_train_click_more_train_again_adapts_and_shows_what_changed_in_chromium(browser, tmp_path):
    import numpy as np
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(colour_image(48, 64)).save(folder / "im0.png")
    s = Server(folder, tmp_path / "clicks.csv", tmp_path / "runs", adapt_steps=20)
    s.app.training.command = train_command(tmp_path)
    try:
        browser.get(f"http://127.0.0.1:{s.port}/")
        wait(browser, "return document.body.dataset.ready", what="the page")
        assert "adapts the model shown (20 steps)" in browser.find_element("id", "train-how").text
        for key, xs in (("6", (4, 10, 16)), ("2", (47, 53, 59))):  # clutter left; then, for round 2, building right
            press(browser, key)
            for y in (8, 24, 40):
                for x in xs:
                    n = count(browser)
                    click_pixel(browser, x, y)
                    wait(browser, f"return Number(document.getElementById('count').textContent) === {n + 1}")
            if key == "6":
                epochs = browser.find_element("id", "epochs")
                epochs.clear()
                epochs.send_keys("1")
                browser.find_element("id", "train").click()  # no model yet: trains anew
                wait(browser, "return document.getElementById('train-status').textContent.startsWith("
                              "'model 1 shown: trained anew')", timeout=180, what="the first training")
                assert browser.find_element("id", "changed").text.startswith("changed: nothing to compare")
        browser.find_element("id", "train").click()  # a model is shown: Train adapts it
        wait(browser, "return document.getElementById('train-status').textContent === "
                      "'model 2 shown: adapted from model 1 (20 steps)'", timeout=180, what="the adaptation")
        changed = s.app.training.changed["im0"]
        H, W, (h, w) = 48, 64, changed.shape
        full = changed[np.ix_(np.arange(H) * h // H, np.arange(W) * w // W)]  # the overlay's lookup
        assert full.any(), "the adaptation changed no pixel's class"
        assert browser.find_element("id", "changed").text.startswith(
            f"changed since model 1: {int(full.sum())} pixels of this image")
        browser.execute_script("const o = document.getElementById('opacity'); o.value = 1;"
                               "o.dispatchEvent(new Event('input'));"
                               "const l = document.getElementById('layer'); l.value = 'changed';"
                               "l.dispatchEvent(new Event('change'));")
        wait(browser, "return app.viewer.overlayTilesShown > 0", what="the changed layer")
        (y, x), (y0, x0) = (map(int, np.argwhere(m)[len(np.argwhere(m)) // 2]) for m in (full, ~full))
        wait(browser, f"return {list(page.training.CHANGED_COLOUR)}.every((c, i) => c === "
                      f"app.viewer.ctx.getImageData(...app.viewer.imageToScreen({x} + 0.5, {y} + 0.5).map(Math.round),"
                      f" 1, 1).data[i])", what=f"the changed pixel ({x}, {y}) drawn")
        assert drawn_colour(browser, x0, y0) != list(page.training.CHANGED_COLOUR)  # an unchanged one is not
    finally:
        s.close()



@pytest.mark.slow
@pytest.mark.parametrize("conditioned", [False, True], ids=["head", "click-conditioned"])
def test_a_click_repaints_the_live_layer_without_train_in_chromium(browser, tmp_path, conditioned):
    import io
    import numpy as np
    import torch
    from checkpoint import save_checkpoint
    from model import TinySegmentation
    from spec import DataSpec
    from tests.conftest import conditioned_tiny
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(colour_image(48, 64)).save(folder / "im0.png")
    torch.manual_seed(0)
    if conditioned:  # the clicks are the network's input: the image predicted again at each click
        conditioned_tiny(tmp_path / "tiny.pth")
    else:  # a head re-fitted on the network's features at each click
        save_checkpoint(tmp_path / "tiny.pth", TinySegmentation(6), DataSpec(scale=1.0))  # shown, never trained here
    s = Server(folder, tmp_path / "clicks.csv", tmp_path / "runs")
    s.app.training.predict_all(tmp_path / "tiny.pth")
    s.app.training.state.update(state="done", model=1, message="showing tiny.pth")

    def live_tile():  # the server's live layer of the whole image, RGB
        code, _, data = s.request("GET", "/api/overlay?image=im0&z=0&x=0&y=0&size=64&layer=live")
        assert code == 200, data
        return np.asarray(Image.open(io.BytesIO(data)))[..., :3]

    try:
        browser.get(f"http://127.0.0.1:{s.port}/")
        wait(browser, "return document.body.dataset.ready", what="the page")
        wait(browser, "return app.training.model === 1", what="the model shown")
        browser.execute_script("const o = document.getElementById('opacity'); o.value = 1;"
                               "o.dispatchEvent(new Event('input'));"
                               "const l = document.getElementById('layer'); l.value = 'live';"
                               "l.dispatchEvent(new Event('change'));")
        wait(browser, "return app.viewer.liveDrawn === app.clicks.version", what="the live layer")
        before = live_tile()
        x, y = 30, 20
        palette = s.app.classes.palette
        cls = (palette.index(tuple(int(v) for v in before[y, x])) + 1) % len(palette)  # not the class shown there
        press(browser, str(cls + 1))
        click_pixel(browser, x, y)
        wait(browser, "return document.getElementById('count').textContent === '1'")
        wait(browser, "return app.viewer.liveDrawn === app.clicks.version && app.training.liveState && "
                      "app.training.liveState.clicks === 1", what="the live layer after the click")
        after = live_tile()
        assert (after != before).any(axis=-1).sum() > 0, "the click changed no pixel of the live layer"
        # a head moves the map far from the click; a conditioned network around it (its disc, radius 3)
        far = ([(x + dx, y + dy) for dx in (-2, 0, 2) for dy in (-2, 2)] if conditioned else
               [(i, j) for i in range(2, 64, 6) for j in range(2, 48, 6) if abs(i - x) + abs(j - y) > 3])
        drawn = [drawn_colour(browser, i, j) for i, j in far]
        assert drawn == [after[j, i].tolist() for i, j in far]  # the page draws the server's new map
        assert any(after[j, i].tolist() != before[j, i].tolist() for i, j in far)  # and it moved
        assert browser.execute_script("return app.training.model") == 1  # nothing was trained
        assert s.json("GET", "/api/train")["state"] == "done"
        says = ("live: model 1 predicted again with 1 click as its input in " if conditioned
                else "live: model 1's head re-fitted on 1 click in ")
        assert browser.find_element("id", "live").text.startswith(says)
    finally:
        s.close()

def scribble(driver, pixels):
    """Shift+drag through the centres of image `pixels` [(x, y), ...], one mouse move each."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.keys import Keys
    action = ActionBuilder(driver, duration=0)
    key, mouse = action.key_action, action.pointer_action
    key.key_down(Keys.SHIFT), mouse.pause(0)
    for i, (x, y) in enumerate(pixels):
        mouse.move_to_location(*on_screen(driver, x, y)), key.pause(0)
        if i == 0:
            mouse.pointer_down(), key.pause(0)
    mouse.pointer_up(), key.pause(0)
    key.key_up(Keys.SHIFT), mouse.pause(0)
    action.perform()


def tiles_served(driver):
    """The URLs of the tiles the page asked for, once every one has loaded; fails naming any the server refused."""
    wait(driver, "const t = [...app.viewer.tiles.values()]; return t.length && t.every((i) => i.complete)",
         what="the tiles")
    urls = driver.execute_script("return [...app.viewer.tiles.keys()]")
    refused = driver.execute_script("return [...app.viewer.tiles].filter(([u, i]) => !i.naturalWidth).map(([u]) => u)")
    assert not refused, refused
    return urls


@pytest.mark.slow
def test_the_page_keeps_to_the_bounds_the_server_gives_and_sets_one_global_in_chromium(browser, tmp_path,
                                                                                        monkeypatch):
    from urllib.parse import parse_qs, urlsplit
    bounds = {"MAX_TILE": 32, "MAX_ZOOM": 0, "MAX_BODY": 400, "MAX_PIXELS_PER_OP": 200, "MAX_LINE_VERTICES": 4,
              "MAX_EPOCHS": 7, "MAX_SUGGESTIONS": 3}  # far below the defaults: a typed default would break a bound
    for k, v in bounds.items():
        monkeypatch.setattr(page.bounds, k, v)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(colour_image(48, 64)).save(folder / "im0.png")
    s = Server(folder, tmp_path / "clicks.csv", tmp_path / "runs")
    try:
        # what a document of this origin has on window, where no page script ran but the driver did (ret_nodes)
        browser.get(f"http://127.0.0.1:{s.port}/static/style.css")
        browser.execute_script("return 1")
        blank = set(browser.execute_script("return Object.keys(window)"))
        browser.get(f"http://127.0.0.1:{s.port}/")
        wait(browser, "return document.body.dataset.ready", what="the page")
        assert [k for k in browser.execute_script("return Object.keys(window)") if k not in blank] == ["app"]
        declared = set()
        for text in page_sources().values():
            declared |= set(re.findall(r"^(?:export )?(?:async )?(?:class|function\*?|const|let|var) ([\w$]+)", text,
                                       re.M))
            declared |= set(re.findall(r"^import \* as ([\w$]+)", text, re.M))
        declared -= {"app"}
        assert "Viewer" in declared and "api" in declared
        assert browser.execute_script(
            "return arguments[0].filter((n) => (0, eval)(`typeof ${n}`) !== 'undefined')", sorted(declared)) == []

        assert browser.find_element("id", "epochs").get_attribute("max") == "7"
        assert browser.find_element("id", "suggest-n").get_attribute("max") == "3"
        # tiles of at most max_tile pixels, at zoom levels up to max_zoom even zoomed far out
        assert {parse_qs(urlsplit(u).query)["size"][0] for u in tiles_served(browser)} == {"32"}
        press(browser, *"-" * 16)
        wait(browser, "return app.viewer.scale < 0.5", what="zoomed out")
        assert {parse_qs(urlsplit(u).query)["z"][0] for u in tiles_served(browser)} == {"0"}
        press(browser, "f")

        # a scribble is cut to max_line_vertices; its undo and redo keep to max_body (in parts)
        scribble(browser, [(2, 4), (14, 12), (26, 20), (38, 28)] + [(40 + 2 * j, 29 + j) for j in range(6)])
        wait(browser, "return document.getElementById('message').textContent.startsWith("
                      "'the scribble was cut to its first 4 of ')", what="the scribble cut")
        drawn = read_clicks(tmp_path / "clicks.csv", [folder / "im0.png"]).images["im0"]
        pixels = set(zip(drawn.cols.tolist(), drawn.rows.tolist()))
        assert count(browser) == len(pixels) and max(x for x, _ in pixels) < 40
        inverse = {"op": "remove", "image": "im0", "points": [[x + 0.5, y + 0.5] for x, y in pixels]}
        assert len(json.dumps(inverse)) > 2 * bounds["MAX_BODY"]  # the undo must be sent in parts
        undo_keys(browser, "z")
        wait(browser, "return document.getElementById('count').textContent === '0'", what="the undo")
        undo_keys(browser, "y")
        wait(browser, f"return document.getElementById('count').textContent === '{len(pixels)}'", what="the redo")
        assert browser.find_element("id", "message").text == "the scribble was cut to its first 4 of 10 points"
    finally:
        s.close()
    again = read_clicks(tmp_path / "clicks.csv", [folder / "im0.png"]).images["im0"]
    assert set(zip(again.cols.tolist(), again.rows.tolist())) == pixels


@pytest.mark.slow
def test_assess_mode_labels_a_blind_sample_and_shows_the_estimates_in_chromium(browser, tmp_path):
    images, masks, classes, truth = write_assessment_scene(tmp_path / "scene")
    sample = tmp_path / "sample.gpkg"
    argv = ["sample", "--images", images, "--masks", masks, "--classes", classes, "--n", 8, "--floor", 2,
            "--out", sample]
    assert assess.main(assess.get_args_parser().parse_args([str(a) for a in argv])) == 0
    s = Server(images, tmp_path / "clicks.csv", tmp_path / "runs", assess=str(sample), classes=str(classes))
    labels = {}
    try:
        browser.get(f"http://127.0.0.1:{s.port}/")
        wait(browser, "return document.body.dataset.ready", what="the page")
        assert not browser.find_element("id", "assess").is_displayed()
        browser.find_element("id", "mode-assess").click()
        point = wait(browser, "return app.assess.point", what="the first sample point")
        # blind: no overlay, no overlay controls, no clicks; the view centred on the point at 4x
        assert not browser.find_element("id", "model").is_displayed()
        assert browser.execute_script("return app.viewer.showOverlay") is False
        dx, dy, scale = browser.execute_script(
            "const v = app.viewer, p = app.assess.point; const [x, y] = v.imageToScreen(p.col + 0.5, p.row + 0.5);"
            "return [x - v.canvas.width / 2, y - v.canvas.height / 2, v.scale]")
        assert abs(dx) < 1 and abs(dy) < 1 and scale == 4
        click_pixel(browser, point["col"], point["row"])  # a click on the map adds nothing in this mode
        for k in range(1, 9):
            point = browser.execute_script("return app.assess.point")
            cls = int(truth[point["image"]][point["row"], point["col"]])
            press(browser, str(cls + 1))
            labels[point["id"]] = cls
            wait(browser, f"return document.getElementById('assess-progress').textContent === '{k} of 8 labelled'",
                 what=f"{k} labelled")
            if k < 8:
                wait(browser, f"return app.assess.point.id !== {point['id']}", what="the next point")
            if k == 1:
                wait(browser, "return document.getElementById('estimates-note').textContent.includes('label more')",
                     what="the too-few-labels message")
                assert not browser.find_element("id", "estimates").is_displayed()
        wait(browser, "return !document.getElementById('estimates').hidden", what="the estimates table")
        want = assess.Assessment.open(sample, images, load_class_file(classes)).estimates()
        want_oa = f"Overall accuracy: {100 * want.oa:.1f} ± {100 * 1.96 * want.oa_se:.1f} %"
        # the table may already show the estimates of 7 labels while those of the 8th are on their way
        wait(browser, f"return document.getElementById('estimates-oa').textContent === {json.dumps(want_oa)}",
             timeout=10, what="the estimates of all 8 labels")
        oa = browser.find_element("id", "estimates-oa").text
        assert oa == want_oa, oa
        rows = browser.find_elements("css selector", "#estimates tr")
        assert [r.find_elements("css selector", "td, th")[0].text for r in rows] == ["class", "background",
                                                                                   "building"]
        assert "not scores on clicks" in browser.find_element("id", "estimates-note").text
    finally:
        s.close()
    assert assess.Assessment.open(sample, images, load_class_file(classes)).reference == labels
    assert not (tmp_path / "clicks.csv").exists()
