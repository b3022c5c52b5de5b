"""Training sized in optimizer steps (--steps N / auto, --val-every) and random windows (--crop): the sampler,
the plan, the rules and a run that uses them."""

import json
from dataclasses import replace

import pytest
import torch

import checkpoint
import train as train_module
from checkpoint import read_checkpoint
from config import MAX_VALIDATIONS, MIN_STEPS, STEP_PASSES, TrainConfig, check_config, config_from_args
from resident import ResidentData, ResidentLoader, draw_windows, gather_windows
from tests.conftest import cfg_for
from train import get_args_parser, main, plan_steps, step_budget, train


def resident(n=3, h=12, w=10, sizes=None):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 2, h, w), generator=g, dtype=torch.uint8)
    points = torch.randint(0, 6, (n, h, w), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 6, (n, h, w), generator=g, dtype=torch.uint8)
    sizes = torch.tensor(sizes if sizes is not None else [[h, w]] * n)
    return ResidentData(images, points, labels, [str(i) for i in range(n)], sizes, torch.zeros(n, 2, dtype=torch.long))


def steps_cfg(data, tmp_path, **kw):
    return cfg_for(data, tmp_path, **{"epochs": TrainConfig.epochs, "schedule": "cosine", **kw})


# --------------------------------------------------------------------------- the sampler

def test_windows_are_the_slices_they_claim_and_stay_inside_each_image():
    d = resident(n=3, h=12, w=10, sizes=[[12, 10], [6, 7], [12, 4]])
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        idx, top, left = draw_windows(d.sizes, 5, 5, g)
        for i, t, l in zip(idx.tolist(), top.tolist(), left.tolist()):
            h, w = d.sizes[i].tolist()
            assert 0 <= t <= max(h - 5, 0) and 0 <= l <= max(w - 5, 0)  # inside the image where a window fits
        images, points, labels = gather_windows((d.images, d.points, d.labels), idx, top, left, 5, 5)
        assert images.shape == (5, 2, 5, 5) and points.shape == labels.shape == (5, 5, 5)
        for k, (i, t, l) in enumerate(zip(idx.tolist(), top.tolist(), left.tolist())):
            assert torch.equal(images[k], d.images[i, :, t:t + 5, l:l + 5])
            assert torch.equal(points[k], d.points[i, t:t + 5, l:l + 5])
            assert torch.equal(labels[k], d.labels[i, t:t + 5, l:l + 5])


def test_images_are_drawn_by_area_so_a_big_tile_counts_as_the_windows_it_holds():
    sizes = torch.tensor([[40, 40], [20, 20]])  # 4x the area
    idx, _, _ = draw_windows(sizes, 4000, 8, torch.Generator().manual_seed(0))
    assert (idx == 0).float().mean().item() == pytest.approx(0.8, abs=0.03)


def test_a_loader_of_windows_is_reproducible_and_its_ranks_share_each_batch():
    d = resident(n=4, h=12, w=12)

    def batches(rank=0, world=1, seed=3):
        loader = ResidentLoader(d, 4, generator=torch.Generator().manual_seed(seed), rank=rank, world_size=world,
                                draws=3, crop=6)
        return list(loader)
    whole = batches()
    assert len(whole) == 3 and all(b["image"].shape == (4, 2, 6, 6) for b in whole)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(whole, batches()))  # same seed, same windows
    assert not torch.equal(whole[0]["image"], batches(seed=4)[0]["image"])
    halves = zip(batches(0, 2), batches(1, 2))
    for b, (r0, r1) in zip(whole, halves):  # rank r takes samples r, r + 2 of each global batch
        assert torch.equal(b["image"][0::2], r0["image"]) and torch.equal(b["image"][1::2], r1["image"])


# --------------------------------------------------------------------------- the plan

def test_the_plan_covers_the_pixels_once_a_pass_and_the_auto_budget_follows_the_rule():
    sizes = [(48, 48)] * 6
    crop = plan_steps(TrainConfig(crop=16, batch_size=4, epochs=3), sizes)
    assert crop["per_epoch"] == 14 and crop["draws"] == 14 and crop["total"] == 42  # 13,824 px / (16 x 16 x 4)
    plain = plan_steps(TrainConfig(batch_size=4, epochs=3), sizes)
    assert plain["per_epoch"] == 1 and plain["draws"] == 0 and plain["text"] is None  # every image once an epoch
    auto = plan_steps(TrainConfig(crop=16, batch_size=4, steps="auto", schedule="cosine"), sizes)
    assert step_budget(14) == max(MIN_STEPS, STEP_PASSES * 14)
    assert 0 <= auto["total"] - step_budget(14) < auto["per_epoch"]  # rounded up to whole validations
    assert auto["epochs"] <= MAX_VALIDATIONS and auto["per_epoch"] >= 14  # every pass, or less often
    small = plan_steps(TrainConfig(crop=16, batch_size=4, steps="auto", schedule="cosine"), [(40, 40)])
    assert small["total"] == MIN_STEPS  # one image: a pass is 2 steps, so the floor decides, and the log says the
    assert f"about {MIN_STEPS * 4 * 16 * 16 / 1600:.0f} passes over the training pixels" in small["text"]  # passes
    spaced = plan_steps(TrainConfig(crop=16, batch_size=4, steps=250, val_every=100, schedule="cosine"), sizes)
    assert (spaced["epochs"], spaced["total"]) == (3, 300)  # rounded up to whole validations
    many = plan_steps(TrainConfig(batch_size=4, steps=1000, schedule="cosine"), sizes)
    assert many["epochs"] == 50 and many["per_epoch"] == 20  # a 1-step pass would validate 1,000 times
    big = plan_steps(TrainConfig(crop=64, batch_size=4, epochs=1), sizes)
    assert big["per_epoch"] == 2 and "48x48 windows" in big["text"]  # a window never exceeds the images


def test_step_settings_that_cannot_work_together_are_refused_before_any_work():
    with pytest.raises(ValueError, match="use --schedule cosine or poly"):
        check_config(TrainConfig(steps=100))
    with pytest.raises(ValueError, match="give --epochs or --steps, not both"):
        check_config(TrainConfig(steps=100, schedule="cosine", epochs=5))
    with pytest.raises(ValueError, match="add --steps N"):
        check_config(TrainConfig(val_every=10))
    with pytest.raises(ValueError, match="do not work with --loader dataloader"):
        check_config(TrainConfig(crop=32, loader="dataloader"))
    with pytest.raises(ValueError, match="--crop must be 0 or >= 8"):
        check_config(TrainConfig(crop=4))
    with pytest.raises(ValueError, match="a whole number of optimizer steps or auto; got 'many'"):
        config_from_args(get_args_parser().parse_args(["--steps", "many"]))
    assert config_from_args(get_args_parser().parse_args(["--steps", "auto"])).steps == "auto"


def test_rounds_are_checked_against_the_validations_a_steps_run_makes(data, tmp_path):
    with pytest.raises(ValueError, match=r"below the epochs \(2; .*with --steps: the validations, every 7 steps"):
        train(steps_cfg(data, tmp_path, steps=14, val_every=7, self_training=2))
    assert not (tmp_path / "ck" / "last.pth").exists()


# --------------------------------------------------------------------------- a run

def test_a_steps_run_validates_every_k_steps_and_ends_its_decay_at_the_last_step(data, tmp_path, capsys):
    history = train(steps_cfg(data, tmp_path, steps=20, val_every=7, crop=16, lr=1e-2))
    out = capsys.readouterr().out
    assert [h["step"] for h in history] == [7, 14, 21]  # 20 rounded up to whole validations
    assert ("budget: 21 optimizer steps (batches of random 16x16 windows drawn with replacement: about 4 passes over "
            "the training pixels), validation every 7 steps") in out  # 21 x 4 x 16 x 16 / (6 x 32 x 32) = 3.5
    assert "step    21/21 |" in out
    st = read_checkpoint(tmp_path / "ck" / "last.pth").train_state
    assert st["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="steps: 20 -> 40"):  # a longer budget changes the schedule: a new run
        train(steps_cfg(data, tmp_path, steps=40, val_every=7, crop=16, lr=1e-2, resume=True))


@pytest.mark.slow
def test_an_interrupted_steps_run_resumes_to_the_same_result(data, tmp_path, monkeypatch):
    cfg = steps_cfg(data, tmp_path, steps=12, val_every=4, crop=16, out=str(tmp_path / "s"))
    straight = train(cfg)
    real, calls = train_module.run_epoch, []

    def stop_in_the_second_period(*a, **kw):
        if a[4] is not None:  # a training pass
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(train_module, "run_epoch", stop_in_the_second_period)
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, out=str(tmp_path / "r")))
    monkeypatch.setattr(train_module, "run_epoch", real)
    resumed = train(replace(cfg, out=str(tmp_path / "r"), resume=True))
    assert [h["step"] for h in resumed] == [4, 8, 12]
    assert [h["train_loss"] for h in resumed] == pytest.approx([h["train_loss"] for h in straight], rel=1e-5)


def test_windows_train_a_model_that_segments_the_whole_val_images(data, tmp_path):
    history = train(steps_cfg(data, tmp_path, steps=60, val_every=20, crop=16, lr=1e-2, points=None))
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["val_miou"] > 0.8  # 16x16 windows taught the whole 32x32 val images (all-background: < 0.1)


# --------------------------------------------------------------------------- what a run writes as it goes

def read_progress(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_progress_is_written_as_json_lines_in_steps_and_the_best_is_named_by_its_step(data, tmp_path, capsys):
    """The page's bar parsed 'epoch N/M' from the log and never moved under --steps: the run writes its progress
    as JSON lines in its folder, and the closing line names the best validation by its step."""
    argv = ["--data", str(data), "--arch", "tiny", "--no-pretrained", "--size", "32", "--batch-size", "4",
            "--points", "100", "--out", str(tmp_path / "ck"), "--no-figures", "--no-progress", "--steps", "10",
            "--val-every", "5", "--schedule", "cosine", "--max-train", "6", "--max-val", "2"]
    assert main(get_args_parser().parse_args(argv)) == 0
    rows = read_progress(tmp_path / "ck" / "progress.jsonl")
    assert [r["event"] for r in rows] == ["start", "validation", "validation", "end"]
    assert rows[0]["unit"] == "step" and rows[0]["steps"] == 10 and rows[0]["epochs"] == 2
    assert [(r["step"], r["steps"]) for r in rows[1:3]] == [(5, 10), (10, 10)]
    history = json.loads((tmp_path / "ck" / "history.json").read_text())
    assert [r["val"]["val_miou"] for r in rows[1:3]] == [h["val_miou"] for h in history]
    assert rows[-1]["status"] == "done" and rows[-1]["elapsed"] >= rows[2]["elapsed"] >= 0
    best = max(history, key=lambda h: h["val_miou"])
    assert capsys.readouterr().out.rstrip().endswith(f"at step {best['step']} (best_model.pth)")


def test_last_pth_is_written_at_a_bounded_rate_at_the_end_and_on_ctrl_c(data, tmp_path, monkeypatch):
    """A run on the real tile rewrote its 188 MB last.pth at every validation (10 GB). It is written at most every
    LAST_EVERY seconds and at the end; Ctrl-C writes the last validated state, and --resume from it trains on to
    the same model as a run that was never stopped."""
    writes = []
    save = checkpoint.save_checkpoint
    record = lambda path, *a, **kw: (writes.append((path.name, kw["epoch"])), save(path, *a, **kw))[1]  # noqa
    monkeypatch.setattr(train_module, "save_checkpoint", record)  # best_model.pth
    monkeypatch.setattr(checkpoint, "save_checkpoint", record)  # last.pth (checkpoint.LastCheckpoint)
    monkeypatch.setattr(checkpoint, "LAST_EVERY", 3600)
    straight = train(cfg_for(data, tmp_path, epochs=4, out=str(tmp_path / "s")))
    assert [e for name, e in writes if name == "last.pth"] == [4]  # once, at the end
    writes.clear()
    monkeypatch.setattr(checkpoint, "LAST_EVERY", 0)
    train(cfg_for(data, tmp_path, epochs=2, out=str(tmp_path / "every")))
    assert [e for name, e in writes if name == "last.pth"] == [1, 2]
    monkeypatch.setattr(checkpoint, "LAST_EVERY", 3600)
    run_epoch, calls = train_module.run_epoch, []

    def stop_in_epoch_3(model, loader, criterion, device, optimizer=None, *a, **kw):
        calls.append(optimizer is not None)
        if sum(calls) == 3:
            raise KeyboardInterrupt
        return run_epoch(model, loader, criterion, device, optimizer, *a, **kw)
    monkeypatch.setattr(train_module, "run_epoch", stop_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(data, tmp_path, epochs=4, out=str(tmp_path / "r")))
    assert read_checkpoint(tmp_path / "r" / "last.pth").epoch == 2  # the last validated epoch, not a half one
    assert read_progress(tmp_path / "r" / "progress.jsonl")[-1]["status"] == "interrupted"
    monkeypatch.setattr(train_module, "run_epoch", run_epoch)
    resumed = train(cfg_for(data, tmp_path, epochs=4, out=str(tmp_path / "r"), resume=True))
    assert resumed[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"], rel=1e-5)
    assert [r["event"] for r in read_progress(tmp_path / "r" / "progress.jsonl")].count("start") == 2  # appended
