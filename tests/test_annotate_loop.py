"""The simulated person of annotate_loop.py: where it clicks and what it compares with."""

import json

import numpy as np
import pytest

from research import annotate_loop as L
from spec import IGNORE_INDEX


def test_clicks_are_spread_and_only_where_asked():
    rng = np.random.default_rng(0)
    where = np.zeros((40, 40), bool)
    where[5:30, 10:35] = True
    rows, cols = L.pick(where, 6, rng, spacing=5)
    assert len(rows) == 6 and where[rows, cols].all()
    d = np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None]) + np.eye(6) * 99
    assert d.min() >= 5
    rows, cols = L.pick(np.eye(3, dtype=bool), 10, rng)  # fewer candidates than clicks: all of them
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 0), (1, 1), (2, 2)]


def test_the_all_background_baseline_is_the_training_majority_everywhere():
    a = np.zeros((4, 4), np.uint8)
    a[0] = 1  # class 0 is the majority of the training labels
    b = np.ones((4, 4), np.uint8)
    b[:, 0] = 0
    b[0, 0] = IGNORE_INDEX
    labels = {"t": a, "v": b}
    miou = L.majority_miou([("t", None, None)], [("v", None, None)], labels, ["ground", "roof"])
    # val: 3 pixels of class 0 (predicted right), 12 of class 1 (predicted 0): IoU 3/15 and 0
    assert miou == pytest.approx((3 / 15 + 0) / 2)


def test_missing_data_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(L.PRESETS, "atlanta", dict(L.PRESETS["atlanta"], images=str(tmp_path / "none")))
    assert L.main(L.get_args_parser().parse_args(["--preset", "atlanta"])) == 2
    assert capsys.readouterr().err.startswith("error: no folder")


def test_a_run_is_finished_when_its_progress_file_says_so(tmp_path):
    start = {"event": "start", "unit": "step", "epochs": 2, "steps": 40, "per_epoch": 20, "time": 0}
    val = {"event": "validation", "epoch": 2, "epochs": 2, "step": 40, "steps": 40, "loss": 0.3, "val": {},
           "elapsed": 7.0}
    write = lambda *lines: (tmp_path / "progress.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    write(start, val, {"event": "end", "status": "done", "elapsed": 7.5})
    run = L.finished_run(tmp_path, "test")
    assert (run["steps"], run["elapsed"]) == (40, 7.5)
    for lines in [(start, dict(val, step=20, epoch=1), {"event": "end", "status": "done", "elapsed": 4}),  # short
                  (start, val, {"event": "end", "status": "failed", "elapsed": 8}),
                  (start, val),  # no end: still running
                  (start, val, {"event": "end", "status": "done", "elapsed": 8}, start)]:  # a newer run started
        write(*lines)
        with pytest.raises(RuntimeError, match="did not finish"):
            L.finished_run(tmp_path, "test")
    (tmp_path / "progress.jsonl").unlink()
    with pytest.raises(RuntimeError, match="did not finish"):
        L.finished_run(tmp_path, "test")
