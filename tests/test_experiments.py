"""experiments.py: run keys, claims and resume, the csv under concurrent writers, aggregation, the report and where
results go, on fake runs (one tiny real run at the end)."""

import dataclasses
import math
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import config
from research import experiments as E
from research import reports
from spec import CLASSES
from tests.conftest import KEYS, SETTINGS, FakeRunner, fake_row, write_patches

# --------------------------------------------------------------------------- keys and the plan

def test_run_key_is_stable_and_tells_configs_apart():
    k = KEYS.run_key(E.BASELINE, 0)
    same = E.Keys(dict(reversed(list(SETTINGS.items()))), (None, None), "data-id")  # any dict order
    assert k == same.run_key(E.Run(), 0)
    assert k == KEYS.config_key(E.BASELINE) + "-s0"
    others = {KEYS.run_key(E.BASELINE, 1), KEYS.run_key(replace(E.BASELINE, points=100), 0),
              KEYS.run_key(replace(E.BASELINE, class_weights="none"), 0),
              KEYS.run_key(replace(E.BASELINE, decoder="plain"), 0),
              KEYS.run_key(replace(E.BASELINE, resample_each_epoch=True), 0),
              E.Keys(dict(SETTINGS, epochs=9), (None, None), "data-id").run_key(E.BASELINE, 0),
              E.Keys(SETTINGS, (["1", "2"], ["3"]), "data-id").run_key(E.BASELINE, 0),  # a subset of the split
              E.Keys(SETTINGS, (None, None), "other-data").run_key(E.BASELINE, 0)}
    assert k not in others and len(others) == 8


def test_key_hashes_the_whole_training_config(monkeypatch):
    """Every TrainConfig field but NOT_IN_KEY is in the key, defaults included: a changed default (here the
    loss normalisation) makes new keys, so old rows no longer count as done. Where the run goes does not."""
    cfg = KEYS.config(E.BASELINE, 0)
    h = E.config_hash(cfg, "data-id")
    assert h == E.config_hash(replace(cfg, out="elsewhere", figures="figs", progress=True, device="cuda:1",
                                      workers=4, resume=True), "data-id")
    assert h == E.config_hash(replace(cfg, seed=5, annotation_seed=5), "data-id")  # the seed is the -s suffix
    changed = [replace(cfg, augment=False), replace(cfg, weight_decay=1e-4), replace(cfg, lr=2e-3),
               replace(cfg, normalization="points"), replace(cfg, amp=True), replace(cfg, val_fraction=0.2)]
    assert len({h} | {E.config_hash(c, "data-id") for c in changed}) == len(changed) + 1
    assert E.config_hash(cfg, "other-data") != h

    key, base = KEYS.run_key(E.BASELINE, 0), config.TrainConfig

    @dataclasses.dataclass
    class NewDefault(base):
        normalization: str = config.setting("points", "changed default", config.LOSS)

    @dataclasses.dataclass
    class WithOverwrite(base):  # a field another change adds, which says how a run goes, not what it computes
        overwrite: bool = config.setting(False, "how a run goes", config.RUN, role="how")

    monkeypatch.setattr(config, "TrainConfig", NewDefault)
    assert KEYS.run_key(E.BASELINE, 0) != key
    monkeypatch.setattr(config, "TrainConfig", WithOverwrite)
    assert KEYS.run_key(E.BASELINE, 0) == key


def test_data_identity_follows_the_files_and_the_split(tmp_path):
    root = tmp_path / "patches"
    (root / "Images").mkdir(parents=True)
    (root / "Labels").mkdir()
    for i in range(3):
        (root / "Images" / f"Image_{i}.tif").write_bytes(b"x" * 10)
        (root / "Labels" / f"Label_{i}.tif").write_bytes(b"y" * 10)
    settings = dict(SETTINGS, data=str(root), split=None)
    ident = E.data_identity(settings)
    (root / "Images" / "Image_1.tif").write_bytes(b"z" * 10)  # same name and size: same identity
    assert E.data_identity(settings) == ident
    (root / "Labels" / "Label_1.tif").write_bytes(b"y" * 11)
    resized = E.data_identity(settings)
    (root / "Images" / "Image_3.tif").write_bytes(b"x")
    added = E.data_identity(settings)
    split = tmp_path / "split.json"
    split.write_text('{"train": [0, 1], "val": [2]}')
    with_split = E.data_identity(dict(settings, split=str(split)))
    split.write_text('{"train": [0], "val": [1, 2]}')
    other_split = E.data_identity(dict(settings, split=str(split)))
    assert len({ident, resized, added, with_split, other_split}) == 5
    (tmp_path / "no_labels" / "Images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no folder .*no_labels/Labels"):
        E.data_identity(dict(settings, data=str(tmp_path / "no_labels")))


def test_plan_trains_each_config_once_seed_major():
    plan = E.plan_runs(KEYS, None, seeds=3)
    keys = [p.key for p in plan]
    assert len(keys) == len(set(keys))
    configs = {run for e in E.EXPERIMENTS for _, run in e.rows}
    assert len(plan) == 3 * len(configs)
    assert sum(p.run == E.BASELINE for p in plan) == 3  # shown in experiments 1, 2, 3, 5 and 6, trained once per seed
    assert [p.seed for p in plan] == sorted(p.seed for p in plan)  # every config gets seed 0 before any gets seed 1
    only1 = E.plan_runs(KEYS, {1}, seeds=2)
    assert {p.run for p in only1} == {run for _, run in E.EXPERIMENTS[0].rows} and len(only1) == 8


# --------------------------------------------------------------------------- resume

def test_finished_runs_are_not_run_again(tmp_path):
    csv_path = tmp_path / "experiments.csv"
    plan = E.plan_runs(KEYS, {5}, seeds=2)  # 2 configs x 2 seeds
    runner = FakeRunner()
    ran = E.execute(plan[:1], SETTINGS, "demo", csv_path, runner=runner, device="cpu", runs_dir=tmp_path / "runs")
    assert ran == [plan[0].key] and len(runner.calls) == 1

    runner = FakeRunner()
    ran = E.execute(plan, SETTINGS, "demo", csv_path, runner=runner, device="cpu", runs_dir=tmp_path / "runs")
    assert ran == [p.key for p in plan[1:]] and len(runner.calls) == 3
    assert {(c.seed, c.annotation_seed) for c in runner.calls} >= {(1, 1)}  # the annotation seed follows the seed

    runner = FakeRunner()
    assert E.execute(plan, SETTINGS, "demo", csv_path, runner=runner, device="cpu", runs_dir=tmp_path) == []
    assert runner.calls == []
    rows = E.read_rows(csv_path)
    assert [r["key"] for r in rows] == [p.key for p in plan]
    r = rows[-1]
    assert r["miou"] == pytest.approx(0.6) and r["best_miou"] == pytest.approx(0.6) and r["epochs"] == 2
    assert r["seed"] == r["annotation_seed"] == 1 and r["n_train"] == 7


def test_a_run_killed_while_writing_is_done_again(tmp_path, capsys):
    csv_path = tmp_path / "experiments.csv"
    plan = E.plan_runs(KEYS, {5}, seeds=1)
    E.execute(plan, SETTINGS, "demo", csv_path, runner=FakeRunner(), device="cpu", runs_dir=tmp_path)
    text = csv_path.read_text()
    csv_path.write_text(text[: len(text) - 40])  # the last row cut short, no newline
    assert [r["key"] for r in E.read_rows(csv_path)] == [plan[0].key]
    assert "incomplete" in capsys.readouterr().out
    runner = FakeRunner()
    assert E.execute(plan, SETTINGS, "demo", csv_path, runner=runner, device="cpu", runs_dir=tmp_path) == [plan[1].key]
    assert [r["key"] for r in E.read_rows(csv_path)] == [plan[0].key, plan[1].key]  # the new row on its own line


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    import train
    plan = E.plan_runs(KEYS, {5}, seeds=1)
    runs = tmp_path / "runs"
    (runs / plan[0].key).mkdir(parents=True)
    (runs / plan[0].key / "last.pth").write_bytes(b"a killed run's checkpoint")
    (runs / plan[1].key).mkdir()
    (runs / plan[1].key / "class_weights.pt").write_bytes(b"killed before its first checkpoint")
    runner = FakeRunner()
    E.execute(plan, SETTINGS, "demo", tmp_path / "a.csv", runner=runner, device="cpu", runs_dir=runs)
    assert [c.resume for c in runner.calls] == [True, False]
    has_overwrite = "overwrite" in {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert [getattr(c, "overwrite", None) for c in runner.calls] == ([False, True] if has_overwrite else [None] * 2)

    @dataclasses.dataclass
    class WithOverwrite(train.TrainConfig):  # train.py refuses a fresh run over leftovers unless overwrite
        overwrite: bool = config.setting(False, "how a run goes", config.RUN, role="how")
    monkeypatch.setattr(train, "TrainConfig", WithOverwrite)
    plan = E.plan_runs(KEYS, {5}, seeds=2)[2:]  # seed 1: fresh folders
    (runs / plan[0].key).mkdir()
    (runs / plan[0].key / "class_weights.pt").write_bytes(b"killed before its first checkpoint")
    (runs / plan[1].key).mkdir()
    (runs / plan[1].key / "last.pth").write_bytes(b"a killed run's checkpoint")
    runner = FakeRunner()
    E.execute(plan, SETTINGS, "demo", tmp_path / "b.csv", runner=runner, device="cpu", runs_dir=runs)
    assert [(c.resume, c.overwrite) for c in runner.calls] == [(False, True), (True, False)]
    runner = FakeRunner()
    E.execute(E.plan_runs(KEYS, {5}, seeds=3)[4:], SETTINGS, "demo", tmp_path / "c.csv", runner=runner,
              device="cpu", runs_dir=runs)
    assert [(c.resume, c.overwrite) for c in runner.calls] == [(False, False)] * 2  # empty folders: fresh


# --------------------------------------------------------------------------- two processes on one results folder

def write_claim(folder, pid, host):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "claim").write_text(E.json.dumps({"pid": pid, "host": host, "started": "2026-01-01T00:00:00"}))


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()  # exited and reaped: no process has this pid now
    return p.pid


class ClaimCheckingRunner(FakeRunner):
    """A FakeRunner that also records who holds the run's claim while it trains."""

    def __call__(self, cfg):
        self.claims = getattr(self, "claims", []) + [E.json.loads((Path(cfg.out) / "claim").read_text())]
        return super().__call__(cfg)


def test_claimed_runs_are_skipped_and_stale_claims_taken_over(tmp_path, capsys):
    runs = tmp_path / "runs"
    plan = E.plan_runs(KEYS, {5}, seeds=2)  # 4 runs
    host = socket.gethostname()
    write_claim(runs / plan[0].key, os.getppid(), host)  # alive on this host: running elsewhere
    write_claim(runs / plan[1].key, dead_pid(), "another-host")  # its pid cannot be checked here: running
    write_claim(runs / plan[2].key, dead_pid(), host)  # dead on this host: a killed run, stale
    runner = ClaimCheckingRunner()
    ran = E.execute(plan, SETTINGS, "demo", tmp_path / "experiments.csv", runner=runner, device="cpu",
                    runs_dir=runs)
    assert ran == [plan[2].key, plan[3].key]
    out = capsys.readouterr().out
    assert out.count("running elsewhere") >= 2 and "stale" in out
    assert [(c["pid"], c["host"]) for c in runner.claims] == [(os.getpid(), host)] * 2  # held while training
    assert E.json.loads((runs / plan[0].key / "claim").read_text())["pid"] == os.getppid()  # left alone
    assert (runs / plan[1].key / "claim").is_file()
    assert not (runs / plan[2].key / "claim").exists() and not (runs / plan[3].key / "claim").exists()  # released


def _execute_after(start, plan, csv_path, runs):
    start.wait()
    E.execute(plan, SETTINGS, "demo", csv_path, runner=SlowRunner(), device="cpu", runs_dir=runs)


class SlowRunner(FakeRunner):
    def __call__(self, cfg):
        time.sleep(0.05)
        return super().__call__(cfg)


def test_two_processes_on_one_results_folder_share_the_runs(tmp_path):
    """Started together on one plan, two processes train each run once between them: one csv row per key."""
    plan = E.plan_runs(KEYS, {5}, seeds=3)  # 6 runs
    csv_path, runs = tmp_path / "experiments.csv", tmp_path / "runs"
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_execute_after, args=(start, plan, csv_path, runs)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = csv_path.read_text().splitlines()[1:]
    assert sorted(line.split(",")[0] for line in lines) == sorted(p.key for p in plan)  # each key once
    assert not list(runs.glob("*/claim"))


def test_a_run_finished_elsewhere_meanwhile_is_not_done_again(tmp_path):
    """The csv is read again once a run is claimed: another process may have finished it since the start."""
    csv_path = tmp_path / "experiments.csv"
    plan = E.plan_runs(KEYS, {5}, seeds=1)

    class FinishesTheNextOneToo(FakeRunner):  # plays the other process, which writes plan[1]'s row meanwhile
        def __call__(self, cfg):
            result = super().__call__(cfg)
            E.append_row(csv_path, E.make_row(plan[1], SETTINGS, "demo", result, 1.0, "cpu"))
            return result
    runner = FinishesTheNextOneToo()
    assert E.execute(plan, SETTINGS, "demo", csv_path, runner=runner, device="cpu", runs_dir=tmp_path) == [plan[0].key]
    assert len(runner.calls) == 1 and sorted(r["key"] for r in E.read_rows(csv_path)) == sorted(p.key for p in plan)


def test_a_csv_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "experiments.csv"
    path.write_text("key,miou\nabc-s0,0.5\n")
    with pytest.raises(ValueError, match="move it aside"):
        E.read_rows(path)


# --------------------------------------------------------------------------- aggregation and report

def test_a_key_is_counted_once(tmp_path, capsys):
    """Two processes that both ran one key (before claims) left two rows; the report counts it once."""
    csv_path = tmp_path / "experiments.csv"
    rows = [fake_row(E.BASELINE, 0, 0.5), fake_row(E.BASELINE, 0, 0.9), fake_row(E.BASELINE, 1, 0.7)]
    for r in rows:
        E.append_row(csv_path, r)
    read = E.read_rows(csv_path)
    assert [(r["seed"], r["miou"]) for r in read] == [(0, 0.5), (1, 0.7)]  # the first row of a key is kept
    assert "more than once" in capsys.readouterr().out
    ckey = rows[0]["config_key"]
    assert reports.summarize(rows, ckey)["miou"] == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)), 2)
    assert reports.paired_difference(rows, ckey, ckey)[2] == 2


def test_aggregate_known_answers():
    mean, std, n = reports.aggregate([0.5, 0.7, 0.9])
    assert (mean, std, n) == (pytest.approx(0.7), pytest.approx(0.2), 3)  # sample std, ddof 1
    assert reports.aggregate([0.4, float("nan"), None, 0.6])[:2] == (pytest.approx(0.5), pytest.approx(math.sqrt(0.02)))
    one = reports.aggregate([0.3])
    assert one[0] == pytest.approx(0.3) and math.isnan(one[1]) and one[2] == 1
    assert reports.aggregate([])[2] == 0
    assert reports.fmt((0.7, 0.2, 3)) == "70.0 ± 20.0" and reports.fmt((0.7, float("nan"), 1)) == "70.0"
    assert reports.fmt((float("nan"), float("nan"), 0)) == "not run"


@pytest.mark.slow
def test_report_tables_and_closing_note(tmp_path):
    none = replace(E.BASELINE, class_weights="none")
    dense = replace(E.BASELINE, points=None)
    rows = [fake_row(E.BASELINE, s, m) for s, m in enumerate((0.5, 0.7, 0.9))]
    rows += [fake_row(none, s, m) for s, m in enumerate((0.4, 0.7, 0.7))]  # paired differences 0.1, 0.0, 0.2
    rows += [fake_row(dense, s, m, fraction=1.0) for s, m in enumerate((0.8, 0.8, 0.8))]
    rows += [fake_row(replace(E.BASELINE, points=n), 0, m) for n, m in ((10, 0.2), (100, 0.5), (1000, 0.77))]
    rows += [fake_row(E.BASELINE, 0, 0.1, keys=E.Keys(dict(SETTINGS, epochs=99), (None, None), "data-id"))]
    rows += [fake_row(E.BASELINE, 1, 0.1, keys=E.Keys(SETTINGS, (None, None), "other-data"))]  # both left out

    table = reports.experiment_table(rows, E.EXPERIMENTS[0], KEYS)
    assert "| skip decoder, class weights from points | 20,000 | 50.00 ± 0.00 | 80.0 ± 0.0 | 70.0 ± 20.0 |" in table
    assert "| skip decoder, no class weights | 20,000 | 50.00 ± 0.00 | 80.0 ± 0.0 | 60.0 ± 17.3 |" in table
    assert "| plain decoder (published), class weights from points | 20,000 | not run |" in table

    c = reports.closing_numbers(rows, KEYS)
    assert c["ratio"] == pytest.approx(0.7 / 0.8)
    assert c["weights_effect"] == (pytest.approx(0.1), pytest.approx(0.1), 3)
    assert c["smallest_within_5"][0] == 1000  # 0.77 >= 0.95 * 0.8 = 0.76; 100 points (0.5) is not

    md = reports.write_report(rows, KEYS, "demo", tmp_path / "experiments.md", tmp_path)
    text = md.read_text()
    assert "(12 runs of these settings on this data" in text  # not the two of other settings or data
    assert "SYNTHETIC" in text and "70.0 ± 20.0" in text and "87.5 %" in text and "**+10.0 ± 10.0 points**" in text
    assert "**1,000 points per image**" in text
    assert (tmp_path / "point_budget.png").is_file() and (tmp_path / "class_weights_iou.png").is_file()


# --------------------------------------------------------------------------- where results go

def results_folder(*argv):
    args = E.get_args_parser().parse_args(list(argv))
    return E.results_folder(args, E.settings_from_args(args))


def test_settings_other_than_a_preset_go_to_their_own_folder(capsys):
    assert results_folder("--preset", "demo") == Path("results")
    assert results_folder("--preset", "demo", "--data", "demo_data/patches/", "--no-pretrained", "--exclude", "",
                          "--only", "1", "--seeds", "5", "--device", "cpu", "--threads", "1") == Path("results")
    capsys.readouterr()
    overrides = (["--epochs", "2"], ["--size", "64"], ["--n-train", "10"], ["--n-val", "10"], ["--data", "mine"],
                 ["--split", "split.json"], ["--exclude", "clutter"])
    adhoc = [results_folder("--preset", "demo", *o) for o in overrides]
    adhoc.append(results_folder("--preset", "potsdam", "--no-pretrained"))
    assert all(f.parent == Path("results") and f.name.startswith("adhoc-") for f in adhoc)
    assert len(set(adhoc)) == len(adhoc)
    assert str(adhoc[0]) in capsys.readouterr().out  # said where the results go
    assert results_folder("--preset", "demo", "--epochs", "2") == adhoc[0]  # the same settings: the same folder
    assert results_folder("--preset", "demo", "--epochs", "2", "--results", "results") == Path("results")


def test_more_epochs_keep_the_shape_of_the_schedule():
    def step(*argv):
        args = E.get_args_parser().parse_args(list(argv))
        return E.settings_from_args(args)["step_size"]
    assert step("--preset", "demo") == 6 and step("--preset", "demo", "--epochs", "24") == 18
    assert step("--preset", "atlanta", "--epochs", "60") == 45 and step("--preset", "demo", "--epochs", "1") == 1


@pytest.mark.parametrize("in_steps, in_epochs", [("atlanta-steps", "atlanta"), ("demo-steps", "demo")])
def test_a_preset_sized_in_steps_trains_in_steps_and_leaves_the_other_keys_alone(in_steps, in_epochs):
    steps = E.Keys(dict(E.PRESETS[in_steps]), (["0"], ["1"]), "d" * 16)
    epochs = E.Keys(dict(E.PRESETS[in_epochs]), (["0"], ["1"]), "d" * 16)
    cfg = steps.config(E.BASELINE, 0)
    assert (cfg.steps, cfg.schedule, cfg.warmup, cfg.crop) == ("auto", "cosine", 30, 0)
    config.check_config(cfg)  # a valid run: --steps with a decaying schedule and the default epochs
    plain = epochs.config(E.BASELINE, 0)
    assert (plain.steps, plain.schedule) == (None, "step")  # presets without the fields keep the defaults
    assert steps.config_key(E.BASELINE) != epochs.config_key(E.BASELINE)
    assert E.own_folder(in_steps) == Path("results") / in_steps
    # the same data as its epochs preset, so synthetic numbers stay labelled synthetic
    assert E.is_synthetic(in_steps, E.PRESETS[in_steps]) == E.is_synthetic(in_epochs, E.PRESETS[in_epochs])
    sizing = ("epochs", "steps", "schedule", "warmup")
    assert {k: v for k, v in E.PRESETS[in_steps].items() if k not in sizing} \
        == {k: v for k, v in E.PRESETS[in_epochs].items() if k not in sizing}


def test_rows_choose_the_runs_by_their_labels(capsys):
    every = E.plan_runs(KEYS, {8}, seeds=1)
    some = E.plan_runs(KEYS, {8}, seeds=1, rows=r"^10 points, (\+ forest teacher|random forest, multiscale)")
    assert [p.run for p in some] == [E.replace(E.BASELINE, points=10, forest_teacher=E.SHARE),
                                     E.Reference(E.replace(E.BASELINE, points=10), "forest-multiscale")]
    assert {p.key for p in some} < {p.key for p in every}  # the same keys as in the full plan
    for bad, says in (("(", "is no regular expression"), ("no such row", "matches no row")):
        with pytest.raises(SystemExit) as exit_:
            E.main(E.get_args_parser().parse_args(["--preset", "demo", "--only", "8", "--rows", bad,
                                                   "--dry-run", "--data", "nowhere"]))
        assert exit_.value.code == 2 and f"error: --rows {bad!r} {says}" in capsys.readouterr().err


def test_an_adhoc_report_leaves_the_tracked_results_alone(tmp_path, monkeypatch):
    write_patches(tmp_path / "patches", n=6, size=(16, 16))
    monkeypatch.chdir(tmp_path)
    E.main(E.get_args_parser().parse_args(["--data", "patches", "--epochs", "2", "--report"]))
    assert not (tmp_path / "results" / "experiments.md").exists()
    (md,) = (tmp_path / "results").glob("adhoc-*/experiments.md")
    assert "epochs = 2" in md.read_text()
    assert "Written by `python -m research.experiments --preset demo --data patches --epochs 2 --report`" in md.read_text()
    E.main(E.get_args_parser().parse_args(["--data", "patches", "--epochs", "2", "--results", "mine", "--report"]))
    assert "--epochs 2 --results mine --report`" in (tmp_path / "mine" / "experiments.md").read_text()


# --------------------------------------------------------------------------- one tiny real run

@pytest.mark.slow
def test_one_real_run_end_to_end(tmp_path):
    """One tiny real run: its csv row is the last epoch of the history it trained (best epoch apart), its mIoU is
    the mean of its per-class IoUs, and the report's table row is that row formatted."""
    write_patches(tmp_path / "patches", n=6, size=(150, 150))
    settings = dict(SETTINGS, data=str(tmp_path / "patches"), size=32, epochs=2, batch_size=4)
    keys = E.Keys.read(settings)
    plan = E.plan_runs(keys, {1}, seeds=1)[:1]
    csv_path = tmp_path / "results" / "experiments.csv"
    E.execute(plan, settings, "demo", csv_path, device="cpu", runs_dir=tmp_path / "results" / "runs")
    (row,) = E.read_rows(csv_path)
    assert row["key"] == plan[0].key and row["epochs"] == 2 and row["device"].startswith("cpu")
    out = tmp_path / "results" / "runs" / plan[0].key
    assert (out / "history.json").is_file() and not list(out.glob("*.pth"))  # checkpoints removed
    history = E.json.loads((out / "history.json").read_text())
    last, best = history[-1], max(history, key=lambda h: h["val_miou"])
    assert (row["oa"], row["miou"], row["mf1"]) == pytest.approx((last["val_oa"], last["val_miou"], last["val_mf1"]),
                                                                 rel=1e-5)
    assert (row["best_miou"], row["best_epoch"]) == (pytest.approx(best["val_miou"], rel=1e-5), best["epoch"])
    assert row["labelled_fraction"] == pytest.approx(last["labelled_fraction"], rel=1e-5)
    ious = [row[f"iou_{c}"] for c in CLASSES]
    assert ious == pytest.approx([last["val_iou"][c] for c in CLASSES], rel=1e-5, nan_ok=True)
    assert row["miou"] == pytest.approx(np.nanmean(ious), rel=1e-5)  # all classes in the means (no exclude)
    assert min(ious) <= row["miou"] <= max(ious) and 0 < row["oa"] <= 1

    table = reports.experiment_table([row], E.EXPERIMENTS[0], keys)
    label = next(label for label, run in E.EXPERIMENTS[0].rows if run == plan[0].run)
    assert (f"| {label} | 20,000 | {100 * row['labelled_fraction']:.2f} | {100 * row['oa']:.1f} | "
            f"{100 * row['miou']:.1f} | {100 * row['mf1']:.1f} | 1 | {row['seconds']:.0f} |") in table


# --------------------------------------------------------------------------- the tracked reports

def report_tables(text):
    """{label: [cells]} of every experiment table of a report (| run | points / image | ... | s / run |)."""
    out, header = {}, False
    for line in text.splitlines():
        if line.startswith("| run | points / image |"):
            header = True
        elif header and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out.setdefault(cells[0], []).append(cells[1:])
        elif not line.startswith("|"):
            header = False
    return out


@pytest.mark.parametrize("report, preset", [("results/experiments.md", "demo"),
                                            ("results/atlanta/experiments.md", "atlanta"),
                                            ("results/atlanta-steps/experiments.md", "atlanta-steps"),
                                            ("results/demo-steps/experiments.md", "demo-steps")])
def test_tracked_report_rows_are_the_mean_and_std_of_their_csv_rows(report, preset):
    """Every row of a committed report is the mean ± sample std of the csv rows of one configuration of that run
    (same run, the preset's settings): a hand-edited number, a csv row added or lost, or a report not rebuilt
    after the csv changed fails here. A row the report shows as not run has no finished run under the key the
    other rows share."""
    root = Path(__file__).resolve().parents[1]
    text = (root / report).read_text()
    rows = E.read_rows(root / report.replace(".md", ".csv"), warn=False)
    settings = E.json.dumps(dict(E.PRESETS[preset]), sort_keys=True)
    rows = [r for r in rows if r["preset"] == preset and E.json.dumps(E.json.loads(r["settings"]),
                                                                       sort_keys=True) == settings]
    assert rows, f"no csv rows of preset {preset} with its settings"
    tables = report_tables(text)
    labels = {label: run for e in E.EXPERIMENTS for label, run in e.rows}
    assert set(tables) <= set(labels) and len(tables) >= 10
    shown_configs = {}  # config key -> seeds, over the rows shown
    for label, shown in tables.items():
        assert all(cells == shown[0] for cells in shown), f"'{label}' differs between two tables"
        cells = shown[0]
        if cells[-2] == "0":  # no finished run under the current keys
            assert cells[1:5] == ["not run"] * 4 and cells[-1] == "not run"
            continue
        matches = []
        for ckey in sorted({r["config_key"] for r in rows if r["run"] == labels[label].name}):
            s = reports.summarize(rows, ckey)
            made = [reports.fmt(s["labelled_fraction"], digits=2), reports.fmt(s["oa"]), reports.fmt(s["miou"]),
                    reports.fmt(s["mf1"]), str(s["miou"][2]), reports.fmt(s["seconds"], False, 0)]
            if made == cells[1:]:
                matches.append((ckey, s["miou"][2]))
        assert len(matches) == 1, f"{report}: the row '{label}' ({' | '.join(cells)}) is not one configuration's " \
                                  f"mean ± std of its csv rows (matches: {matches})"
        shown_configs.update(matches)
    assert len(shown_configs) >= 10
    # the header's run count is the csv rows of the configurations the tables show, each key once
    assert int(re.search(r"\((\d+) runs of these settings", text).group(1)) == sum(shown_configs.values())


# --------------------------------------------------------------------------- the csv under concurrent writers

def _append_many(csv_path, writer, n, start):
    """One writer of test_concurrent_appends_keep_every_row: wait for the other, then append n rows."""
    start.wait()
    for i in range(n):
        E.append_row(csv_path, {"key": f"w{writer}-{i}", "run": "x" * 100})


@pytest.mark.slow
def test_concurrent_appends_keep_every_row(tmp_path):
    """Two processes append 50 rows each to one csv at once. Without the lock many such pairs lose a row or
    write the header twice; thirty pairs (a csv each, all at once) caught it in every one of 10 tries."""
    ctx = multiprocessing.get_context("fork")  # a forked child starts in milliseconds (spawn re-imports torch)
    pairs = []
    for n in range(30):
        start = ctx.Barrier(2)  # the two writers of one csv start together
        csv_path = tmp_path / f"experiments{n}.csv"
        pairs.append((csv_path, [ctx.Process(target=_append_many, args=(csv_path, w, 50, start)) for w in range(2)]))
    for _, procs in pairs:
        for p in procs:
            p.start()
    for csv_path, procs in pairs:
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0, 0]
        text = csv_path.read_text()
        assert text.count("key,config_key,") == 1 and len(text.splitlines()) == 101
        keys = [r["key"] for r in E.read_rows(csv_path)]
        assert sorted(keys) == sorted(f"w{w}-{i}" for w in range(2) for i in range(50))


def test_own_data_preset_keys_rows_and_per_class_table(tmp_path):
    """An own-data preset (two folders, a class file): its key follows the class file, its csv keeps each
    class's IoU, and the per-class table names its classes, not Potsdam's."""
    import tifffile
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    for k in range(3):
        tifffile.imwrite(tmp_path / "images" / f"p{k}.tif", np.full((8, 8), 100 * k, np.uint16))
        tifffile.imwrite(tmp_path / "labels" / f"p{k}.tif", np.zeros((8, 8), np.uint8))
    classes = tmp_path / "classes.json"
    classes.write_text('{"names": ["ground", "roof"], "label_format": "index", "value_map": {"0": 0, "255": 1}}')
    settings = dict(E.PRESETS["atlanta"], images=str(tmp_path / "images"), labels=str(tmp_path / "labels"),
                    classes=str(classes), split=None)
    keys = E.Keys.read(settings)
    assert E.class_names(settings) == ("ground", "roof")
    other = tmp_path / "other.json"
    other.write_text('{"names": ["ground", "tree"], "label_format": "index", "value_map": {"0": 0, "255": 1}}')
    assert E.Keys.read(dict(settings, classes=str(other))).config_key(E.BASELINE) != keys.config_key(E.BASELINE)
    cfg = keys.config(E.BASELINE, 0)
    assert (cfg.images, cfg.data, cfg.classes) == (str(tmp_path / "images"), None, str(classes))
    planned = E.plan_runs(keys, {7}, seeds=1)
    history = [{"epoch": 1, "val_oa": 0.9, "val_miou": 0.6, "val_mf1": 0.7, "val_iou": {"ground": 0.95, "roof": 0.25}}]
    csv_path = tmp_path / "r" / "experiments.csv"
    for p in planned:
        E.append_row(csv_path, E.make_row(p, settings, "atlanta", {"history": history, "labelled_fraction": 1.0},
                                          1.0, "cpu"))
    rows = E.read_rows(csv_path)
    assert len(rows) == 6 and rows[0]["iou_roof"] == 0.25
    table = reports.per_class_table(rows, next(e for e in E.EXPERIMENTS if e.number == 7), keys)
    assert "| run | ground | roof |" in table and "25.0" in table


def test_a_new_feature_off_by_default_keeps_finished_runs_valid():
    cfg = KEYS.config(E.BASELINE, 0)
    fields = dataclasses.asdict(cfg)
    key = E.config_hash(cfg, "data-id")
    assert all(k in fields for k in E.NEUTRAL)  # the neutral table names real TrainConfig fields
    on = dataclasses.replace(cfg, affinity_weight=1.0)
    assert E.config_hash(on, "data-id") != key  # using the feature is another configuration
    assert E.config_hash(dataclasses.replace(cfg, affinity_kernel=7, affinity_weight=1.0), "data-id") != \
        E.config_hash(on, "data-id")


def test_few_clicks_verdict_measures_the_goals_and_the_two_std_rule():
    """The few-clicks section says per budget whether the best row reaches its share of dense, and a method wins
    over partial CE at 10 points only when the paired difference exceeds twice its std."""
    ce, cons, aff = (replace(E.BASELINE, points=10, **kw) for kw in ({}, {"consistency_weight": 1.0},
                                                                      {"affinity_weight": 1.0}))
    chosen, rand = (replace(E.BASELINE, points=10, rounds=E.ROUNDS, clicks_per_round=E.CLICKS_PER_ROUND,
                            click_strategy=c) for c in ("uncertain", "random"))
    rows = [fake_row(replace(E.BASELINE, points=None), s, 0.80) for s in range(3)]
    rows += [fake_row(ce, s, m) for s, m in enumerate((0.60, 0.62, 0.64))]
    rows += [fake_row(cons, s, m) for s, m in enumerate((0.70, 0.73, 0.74))]  # +0.10, +0.11, +0.10: wins
    rows += [fake_row(aff, s, m) for s, m in enumerate((0.70, 0.60, 0.66))]  # +0.10, -0.02, +0.02: spread too wide
    rows += [fake_row(chosen, s, 0.75) for s in range(2)] + [fake_row(rand, s, 0.70) for s in range(2)]
    text = reports.few_clicks_verdict(rows, KEYS)
    # the best at 10 points is consistency (72.3 %), not the click rounds (75 %, but 40 clicks in the end)
    assert "- 10: best is '10 points, + consistency', 72.3 ± 2.1 % (3 seeds) = **0.90** of dense" in text
    assert "goal >= 0.90: met" in text and "- 100:" not in text  # no 100-point row has run
    assert "'10 points, + consistency' vs partial CE at 10 points: +10.3 ± 0.6 mIoU points (paired, 3 seeds): " \
           "wins by more than 2 std" in text
    assert "'10 points, + affinity' vs partial CE at 10 points: +3.3" in text
    assert "+ affinity' vs partial CE at 10 points: +3.3 ± 6.1 mIoU points (paired, 3 seeds): does NOT win" in text
    assert "model-chosen minus random +5.0 ± 0.0 mIoU points (paired, 2 seeds)" in text


def test_the_learning_curve_is_drawn_from_the_dense_runs_that_log_their_steps(tmp_path):
    key = KEYS.config_key(E.replace(E.BASELINE, points=None))
    iou = {c: 0.5 for c in CLASSES}
    assert reports.learning_curve(KEYS, tmp_path, "") is None  # no run yet
    run = tmp_path / "runs" / f"{key}-s0"
    run.mkdir(parents=True)
    epochs = [{"epoch": e, "val_miou": 0.5, "val_iou": iou, "seconds": 2.0} for e in (1, 2)]
    (run / "history.json").write_text(E.json.dumps(epochs))
    assert reports.learning_curve(KEYS, tmp_path, "") is None  # an epoch-sized run logs no steps
    (run / "history.json").write_text(E.json.dumps([dict(h, step=6 * h["epoch"]) for h in epochs]))
    path = reports.learning_curve(KEYS, tmp_path, "")
    assert path == tmp_path / "learning_curve.png" and path.stat().st_size > 1000
