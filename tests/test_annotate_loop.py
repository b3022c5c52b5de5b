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


def test_a_bad_rule_list_or_budget_is_a_user_error(capsys):
    for argv in (["--strategies", "margin,error"], ["--strategies", "random,nearest"]):
        with pytest.raises(SystemExit) as e:
            L.get_args_parser().parse_args(argv)
        assert e.value.code == 2 and "error: argument --strategies" in capsys.readouterr().err
    assert L.main(L.get_args_parser().parse_args(["--adapt-steps", "0"])) == 2
    assert capsys.readouterr().err.startswith("error: --seeds, --start, --clicks, --epochs and --adapt-steps")


@pytest.mark.slow
def test_the_rules_table_holds_together(tmp_path, monkeypatch):
    """Every rule, 2 seeds, a tiny network: the page adapts after the first Train; every rule of a seed starts from
    the same clicks and places as many; the paired differences are those of the per-seed rows."""
    import re

    import tifffile

    from spec import PALETTE
    from tests.conftest import make_label
    rng = np.random.default_rng(0)
    for sub in ("Images", "Labels"):
        (tmp_path / sub).mkdir()
    for i in (0, 1, 2, 3, 2100, 2101):
        label = make_label(rng, (40, 40), undefined=0)
        colour = np.asarray(PALETTE, np.uint8)[label]
        tifffile.imwrite(tmp_path / "Images" / f"Image_{i}.tif",
                         np.clip(colour * 0.6 + rng.normal(40, 15, colour.shape), 0, 255).astype(np.uint8))
        tifffile.imwrite(tmp_path / "Labels" / f"Label_{i}.tif", colour)
    monkeypatch.setitem(L.PRESETS, "demo", dict(L.PRESETS["demo"], images=str(tmp_path / "Images"),
                                                labels=str(tmp_path / "Labels"), size=20, n_train=4, n_val=2))
    monkeypatch.setattr(L, "NETWORK", "--no-pretrained --arch tiny --size SIZE --batch-size 4 --lr 0.02")
    events = []  # (click file, what, ...) in the order the page saw them
    add, train = L.Client.add, L.Client.train
    monkeypatch.setattr(L.Client, "add", lambda self, name, rows, cols, classes: (
        events.append((self.server.app.click_file.path.name, "add", name, tuple(zip(rows.tolist(), cols.tolist())),
                       tuple(np.asarray(classes).tolist()))), add(self, name, rows, cols, classes))[-1])
    monkeypatch.setattr(L.Client, "train", lambda self, restart=False: (
        events.append((self.server.app.click_file.path.name, "train", restart)),
        train(self, restart, poll=0.2))[-1])
    show = L.Client.show
    monkeypatch.setattr(L.Client, "show", lambda self, checkpoint: (
        events.append((self.server.app.click_file.path.name, "show", checkpoint.name)), show(self, checkpoint))[-1])
    out = tmp_path / "suggest.md"
    args = L.get_args_parser().parse_args(["--preset", "demo", "--seeds", "2", "--start", "3", "--clicks", "2",
                                           "--rounds", "1", "--epochs", "2", "--adapt-steps", "2", "--out", str(out)])
    assert L.main(args) == 0
    text = out.read_text()
    assert text.startswith("# Suggestion rules at equal clicks, the page adapting: preset `demo` (SYNTHETIC")
    assert "--adapt-steps 2 --strategies random,error,margin,entropy,spread,balanced" in text

    clicks, trained = {}, set()  # (rule, seed) -> [clicks before the first Train, clicks after it]
    for file, what, *rest in events:
        if what in ("train", "show"):
            trained.add(file)
            continue
        rule, seed = re.fullmatch(r"([a-z]+)(\d)\.csv", file).groups()
        clicks.setdefault((rule, int(seed)), [[], []])[file in trained].append(tuple(rest))
    shown = [(file, rest) for file, what, *rest in events if what == "show"]
    assert shown == [(f"{rule}{seed}.csv", [f"first{seed}.pth"]) for seed in (0, 1) for rule in L.RULES[1:]]
    for seed in (0, 1):
        first = {rule: sorted(clicks[rule, seed][0]) for rule in L.RULES}
        assert all(v == first["random"] for v in first.values()), "every rule starts from the same clicks"
        n_later = {rule: sum(len(pts) for _, pts, _ in clicks[rule, seed][1]) for rule in L.RULES}
        assert set(n_later.values()) == {4 * 2}, n_later  # 4 training images, 2 clicks each
    assert sorted(clicks["margin", 0][1]) != sorted(clicks["random", 0][1])

    def table(title):
        block = text.split(title, 1)[1].split("\n## ", 1)[0]
        return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()
                if line.startswith("| ") and not line.startswith("| rule")]

    per_seed = {(r[0], int(r[1])): [float(v) for v in r[3:]] for r in table("## Per seed")}
    assert set(per_seed) == {(rule, s) for rule in L.RULES for s in (0, 1)}
    means = table("## Val mIoU %")
    assert [r[0].split(" ")[0] for r in means] == list(L.RULES)
    diffs = {r[0]: r[1:] for r in table("## Minus random")}
    assert list(diffs) == list(L.RULES[1:])
    split = lambda cell: [float(x) for x in cell.split(" ± ")]  # noqa: E731
    for rule in L.RULES:
        for j in range(2):  # two levels: 3 and 5 clicks per image
            v = np.array([per_seed[rule, s][j] for s in (0, 1)])
            mean, sd = split(means[L.RULES.index(rule)][1 + j])
            assert abs(mean - v.mean()) <= 0.11 and abs(sd - v.std(ddof=1)) <= 0.11
            if rule != "random":
                d = v - np.array([per_seed["random", s][j] for s in (0, 1)])
                mean, sd = split(diffs[rule][j])
                assert abs(mean - d.mean()) <= 0.16 and abs(sd - d.std(ddof=1)) <= 0.2, (rule, j, diffs[rule], d)
    assert "| rule | 3 | 5 |" in text
    assert all(diffs[rule][0] == "+0.0 ± 0.0" for rule in diffs)  # the same first clicks, the same first model
