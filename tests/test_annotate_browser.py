"""annotate.py in a real browser: headless system Chromium (Debian's chromium + chromium-driver) driven by Selenium
does what a person does: pick a class, click points on two images, remove and undo, reload, train, see the
overlay, answer a suggestion; then the click file holds exactly the pixels clicked.

Set ANNOTATE_SCREENSHOT=images/annotate.png to save the page with its overlay (the README's picture)."""

import os
import time
from pathlib import Path

import pytest
from PIL import Image

from annotations import read_clicks
from test_annotate import Server, colour_image, train_command

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"),
                       reason="no /usr/bin/chromium (apt-get install chromium chromium-driver); under CI=true it runs"),
]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,950", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


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


def click_pixel(driver, x, y):
    """A real mouse click at the screen position of image pixel (x, y)'s centre in the current view."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    vx, vy = driver.execute_script(
        "const [sx, sy] = app.viewer.imageToScreen(arguments[0] + 0.5, arguments[1] + 0.5);"
        "const r = app.viewer.canvas.getBoundingClientRect();"
        "return [Math.round(r.left + sx), Math.round(r.top + sy)];",
        x, y)
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


def test_click_reload_train_overlay_suggest_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.keys import Keys
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
        assert browser.find_element("id", "accuracy").text.startswith("held-out clicks:")
        # the overlay shows: building predicted on the right half, drawn over the image at half opacity
        left = drawn_colour(browser, 30, 44)
        assert left != list(colour_image(48, 64, 0)[44, 30])
        browser.find_element("id", "suggest-n").clear()
        browser.find_element("id", "suggest-n").send_keys("3")
        browser.find_element("id", "suggest").click()
        wait(browser, "return app.training.suggestions.length === 3", what="suggestions")
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
