"""research/click_response.py on a tiny scene: the simulated person's clicks land where the head's map was wrong and
the table's numbers hold together (corrected = wrong -> right minus right -> wrong, per click and in total)."""

import re

import numpy as np

from research import click_response
from tests.conftest import tiny_loop_scene


def test_click_response_table_holds_together(tmp_path, monkeypatch, capsys):
    label = tiny_loop_scene(tmp_path, monkeypatch)  # columns 0-1 clicked
    monkeypatch.setattr(click_response, "VIEW", 64)
    out = tmp_path / "response.md"
    args = click_response.get_args_parser().parse_args(
        ["--preset", "synthetic", "--live-clicks", "3", "--start-clicks", "2", "--epochs", "2", "--threads", "1",
         "--out", str(out)])
    assert click_response.main(args) == 0
    text = out.read_text()
    assert text.startswith("# A click changes the map at once: the live layer's head, preset `synthetic` (SYNTHETIC")
    assert "`python -m research.click_response --preset synthetic --live-clicks 3 --start-clicks 2 --epochs 2 " \
           "--click-input disc --annotation-seed 0 --threads 1 --out " + str(out) + "`" in text
    background = float(re.search(r"\*\*all-background\*\* \(.*?\) (\d+\.\d+)", text).group(1))
    counts = np.bincount(label[:, :40].ravel(), minlength=6)
    full = np.full(label.shape, counts.argmax())
    ious = [((full == k) & (label == k)).sum() / ((full == k) | (label == k)).sum() for k in range(6)
            if ((full == k) | (label == k)).any()]
    assert background == round(float(np.mean(ious)), 3)
    heads = [line.split(" | ") for line in text.splitlines()
             if re.match(r"\| (anchored|plain|random|no head|click-conditioned)", line)]
    assert len(heads) == len(click_response.HEADS) + 2 and heads[-1][2:7] == ["0"] * 5  # no head: nothing moves
    assert heads[-2][0] == "| click-conditioned network (disc), no head" and int(heads[-2][1]) >= 1
    assert int(heads[-2][4]) == int(heads[-2][5]) - int(heads[-2][6])  # its total: wrong -> right - right -> wrong
    plain = float(re.search(r"its own map scores mIoU (\d\.\d+)", text).group(1))
    cost = re.search(r"mIoU (\d\.\d+) \(OA [\d.]+\) with no clicks in its input, against (\d\.\d+)", text)
    assert float(cost.group(2)) == plain  # the conditioned model's no-click map beside the plain model's
    assert "--click-input disc" in re.search(r"the same first clicks, `([^`]*)`", text).group(1)
    low, mean = map(float, re.search(r"predicted again on ([\d.]+) % of its cells or more \(mean ([\d.]+) %\)",
                                     text).groups())
    assert 0 <= low <= mean <= 100  # the page's windowed repaint against a whole prediction
    per_click = [line.split(" | ") for line in text.splitlines() if re.match(r"\| \d+ \| r\d_c\d \|", line)]
    page = heads[0]
    assert [int(r[0][2:]) for r in per_click] == list(range(1, len(per_click) + 1)) and len(per_click) == int(page[1])
    assert all(int(r[7]) == int(r[5]) - int(r[6]) for r in per_click)
    assert int(page[4]) == sum(int(r[7]) for r in per_click) == int(page[5]) - int(page[6])
    before, after = map(float, page[8].split(" -> "))  # OA: the corrected pixels over the 60 x 60 labelled ones
    assert abs((after - before) * 3600 - int(page[4])) <= 0.001 * 3600
    assert all(r[1][-1] in "01" for r in per_click)  # clicked on the training columns only
    clicked = [tuple(map(int, re.findall(r"\d+", r[2]))) + (r[1],) for r in per_click]
    assert len(set(clicked)) == len(clicked)  # never the same pixel twice
    for r in per_click:  # the class is the dense label's
        name, (row, col) = r[1], map(int, re.findall(r"\d+", r[2]))
        pr, pc = int(name[1]), int(name[4])
        assert int(r[3]) == label[pr * 20 + row, pc * 20 + col]
    assert "wrote " + str(out) in capsys.readouterr().out
