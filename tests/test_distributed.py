"""distributed.py under torchrun on the CPU (gloo): two processes count exactly the validation pixels one process
counts, train like one, split a folder of inference between them, fail loudly together; experiments.py's workers
share one csv. The torchrun tests start real launchers (`python -m torch.distributed.run --standalone`), a few
seconds each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

import distributed
from research import experiments as E
from checkpoint import load_model, read_checkpoint
from config import TrainConfig
from train import train

REPO = Path(__file__).resolve().parents[1]


def torchrun(script, *args, nproc=2):
    """Run `script args` on `nproc` CPU processes under torchrun; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- sharding, no processes

def test_shard_is_disjoint_and_complete():
    for n in range(8):
        for world in range(1, 5):
            parts = [distributed.shard(range(n), r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))  # every item once
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_rank_shares_make_up_the_single_process_batches():
    """Both ranks draw the same shuffle from the same seed; their shares of each batch are the one-process batch."""
    def batches(rank=None, world=2, seed=3):
        inner = BatchSampler(RandomSampler(range(10), generator=torch.Generator().manual_seed(seed)), 4, True)
        return [list(b) for b in (inner if rank is None else distributed.RankBatches(inner, rank, world))]
    one, r0, r1 = batches(), batches(0), batches(1)
    assert len(one) == len(r0) == len(r1) == 2
    assert all(sorted(a + b) == sorted(o) and not set(a) & set(b) for o, a, b in zip(one, r0, r1))
    val = distributed.RankBatches(BatchSampler(SequentialSampler(range(5)), 4, False), 1, 2)
    assert [list(b) for b in val] == [[1, 3]] and val.count == 2  # the last batch [4] is rank 0's alone


def test_a_batch_size_the_processes_cannot_share_is_refused_before_any_work(data, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "init_from_env", lambda device: distributed.Context(world=3))
    with pytest.raises(ValueError, match="batch size 4 does not split evenly over 3 processes"):
        train(TrainConfig(data=str(data), arch="tiny", pretrained=False, batch_size=4, out=str(tmp_path / "ck")))
    assert not (tmp_path / "ck").exists()


def test_outside_torchrun_nothing_is_set_up(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_from_env("cpu")
    assert (ctx.rank, ctx.world, ctx.device) == (0, 1, torch.device("cpu")) and distributed.is_main()
    assert distributed.gather_objects("x") == ["x"] and distributed.all_reduce_sum(torch.ones(2)).tolist() == [1, 1]


# --------------------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_two_processes_train_like_one_and_resume(data, tmp_path):
    """One epoch on 2 ranks, then --resume to epoch 2 on 2 ranks, against 2 epochs in one process (same seed,
    global batch 4 = 2 + 2). Not bit-identical: BatchNorm sees 2 images per rank instead of 4 and the partial
    CE is normalised per rank. Measured here: val mIoU within 2e-4, val loss within 2e-3, median weight
    difference 1e-5. The tolerances below are 10x that; a different global batch (2) misses them by far
    (val mIoU +0.08, val loss -0.07, median weight difference 3e-3)."""
    common = dict(data=str(data), arch="tiny", pretrained=False, batch_size=4, size=32, points=100, figures=False,
                  progress=False, augment=False, train_ids=list(range(6)), val_ids=[6, 7])
    one = train(TrainConfig(**common, epochs=2, out=str(tmp_path / "one")))
    flags = ["--data", data, "--arch", "tiny", "--no-pretrained", "--batch-size", 4, "--size", 32, "--points", 100,
             "--no-figures", "--no-progress", "--no-augment", "--split", tmp_path / "split.json",
             "--out", tmp_path / "two"]
    (tmp_path / "split.json").write_text(json.dumps({"train": list(range(6)), "val": [6, 7]}))
    first = torchrun("train.py", *flags, "--epochs", 1)
    assert first.returncode == 0, first.stderr[-2000:]
    again = torchrun("train.py", *flags, "--epochs", 2, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 processes (gloo), 2 of each batch of 4 per process" in first.stdout
    assert "resumed from" in again.stdout and "[rank 1]" not in first.stderr + again.stderr
    for run, epoch in ((first, "1/1"), (again, "2/2")):  # rank 0 alone logs: one line per epoch
        assert [line.split()[1] for line in run.stdout.splitlines() if line.startswith("epoch ")] == [epoch]
    out = tmp_path / "two"
    assert sorted(p.name for p in out.iterdir()) == [".resident-cache", "best_model.pth", "class_weights.pt",
                                                    "history.json", "last.pth", "progress.jsonl", "run.lock"]
    assert [json.loads(line)["event"] for line in (out / "progress.jsonl").read_text().splitlines()] == \
        ["start", "validation", "end", "start", "validation", "end"]  # rank 0 alone writes it; --resume appends
    two = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["val_miou"] == pytest.approx(a["val_miou"], abs=2e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=2e-2)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=2e-2)
    sa, sb = read_checkpoint(tmp_path / "one" / "last.pth").state_dict, read_checkpoint(out / "last.pth").state_dict
    diff = torch.cat([(sa[k].float() - sb[k].float()).abs().flatten() for k in sa if "num_batches" not in k])
    assert float(diff.median()) < 1e-4 and float(diff.max()) < 0.05
    model, ck = load_model(out / "best_model.pth")  # saved unwrapped: plain infer.py loads it
    assert ck.model_args["arch"] == "tiny" and not any(k.startswith("module.") for k in ck.state_dict)


@pytest.mark.slow
def test_two_processes_split_a_folder_and_a_bad_file_fails_them_all(data, tmp_path):
    """Five good images and one unreadable one on two ranks: every good image is segmented once, the bad one is
    named, and torchrun's exit code is non-zero (every rank exits 1, also the one whose files were fine)."""
    train(TrainConfig(data=str(data), arch="tiny", pretrained=False, epochs=1, batch_size=4, size=32, points=100,
                      figures=False, progress=False, train_ids=list(range(6)), val_ids=[6, 7],
                      out=str(tmp_path / "ck")))
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(5):
        (inp / f"Image_{i}.tif").write_bytes((data / "Images" / f"Image_{i}.tif").read_bytes())
    (inp / "Image_9.tif").write_bytes(b"not a tiff")  # sorted last: index 5, rank 1's (5 % 2)
    run = torchrun("infer.py", "--checkpoint", tmp_path / "ck" / "best_model.pth", "--input", inp,
                   "--output", tmp_path / "out", "--no-progress")
    assert run.returncode != 0
    assert "5 images done, 0 skipped, 1 failed" in run.stdout, run.stdout + run.stderr[-2000:]
    assert f"[rank 1] FAILED {inp / 'Image_9.tif'}" in run.stderr and f"failed: {inp / 'Image_9.tif'}" in run.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"Image_{i}_tif_mask.png" for i in range(5)]  # each once, no temporaries left
    images = sorted(inp.iterdir())
    assert distributed.shard(images, 1, 2) == [images[1], images[3], images[5]]


# scores a fixed val set with a fixed model as train.py validates: sharded batches, one confusion matrix and the
# image-weighted loss reduced over the ranks (distributed.shard_loader, reduce_epoch); writes <out>/rank<r>.json
VALIDATE = """import json, sys
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import distributed
from metrics import ConfusionMatrix

out = sys.argv[1]
ctx = distributed.init_from_env("cpu")
g = torch.Generator().manual_seed(0)
x = torch.rand(7, 3, 8, 8, generator=g)  # 7 images in batches of 4: the last batch [4, 5, 6] splits 2 + 1
y = torch.randint(0, 6, (7, 8, 8), generator=g)
y[torch.rand(7, 8, 8, generator=g) < 0.2] = 255  # undefined pixels: never counted
ids = torch.arange(7)
torch.manual_seed(0)
model = torch.nn.Conv2d(3, 6, 3, padding=1)  # the same weights on every rank
loader = DataLoader(TensorDataset(x, y, ids), batch_size=4, shuffle=False)
if ctx.world > 1:
    loader = distributed.shard_loader(loader, ctx)
cm, total, seen = ConfusionMatrix(6), 0.0, []
with torch.no_grad():
    for xb, yb, ib in loader:
        logits = model(xb)
        cm.update(logits.argmax(1), yb)
        per_image = F.cross_entropy(logits, yb, ignore_index=255, reduction="none").mean((1, 2))
        total += float(per_image.sum())
        seen += ib.tolist()
local_counts = cm.counts.clone()
n = len(seen)
loss, cm, _ = distributed.reduce_epoch(loader, total / max(n, 1), cm, {})
summed = distributed.all_reduce_sum(torch.tensor([n, total], dtype=torch.float64))
json.dump({"seen": seen, "local": local_counts.tolist(), "reduced": cm.counts.tolist(), "loss": loss,
           "total": total, "summed": summed.tolist(), "oa": cm.compute()["oa"]},
          open(f"{out}/rank{ctx.rank}.json", "w"))
distributed.barrier()  # no rank leaves while another still talks to it
distributed.cleanup()
"""


def run_validate(tmp_path, nproc):
    """VALIDATE in this interpreter (one process, no group) or under torchrun; {rank: what it wrote}."""
    script, out = tmp_path / "validate.py", tmp_path / f"out{nproc}"
    script.write_text(VALIDATE)
    out.mkdir()
    if nproc == 1:
        run = subprocess.run([sys.executable, str(script), str(out)], cwd=REPO, capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        env.pop("WORLD_SIZE", None)
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={nproc}", str(script), str(out)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)}


@pytest.mark.slow
def test_two_ranks_count_exactly_the_pixels_one_process_counts(tmp_path):
    """Validation over 2 ranks: each image scored on exactly one rank, the reduced confusion matrix is the sum of
    the ranks' own matrices and equals one process's count for count, and the reduced loss is the image-weighted
    mean of the per-rank sums (uneven shares: 4 and 3 images)."""
    (one,) = run_validate(tmp_path, 1).values()
    two = run_validate(tmp_path, 2)
    assert sorted(two[0]["seen"] + two[1]["seen"]) == one["seen"] == list(range(7))
    assert not set(two[0]["seen"]) & set(two[1]["seen"]) and [len(two[r]["seen"]) for r in (0, 1)] == [4, 3]
    local = np.array([two[r]["local"] for r in (0, 1)])
    assert local[0].any() and local[1].any()  # both ranks scored something
    for r in (0, 1):
        assert two[r]["reduced"] == local.sum(0).tolist()  # the sum of the per-rank values, on every rank
        assert two[r]["reduced"] == one["reduced"] == one["local"]  # = one process, every cell
        assert two[r]["oa"] == one["oa"]
        assert two[r]["summed"] == pytest.approx([7, two[0]["total"] + two[1]["total"]], rel=1e-12)
        assert two[r]["loss"] == pytest.approx(one["loss"], rel=1e-6)  # float32 sums in another order
    assert one["reduced"][-2] > 0 and one["reduced"][-1] == 0  # undefined pixels counted apart, none out of range
    # image-weighted over all 7 images, not the mean of the two ranks' means (4 and 3 images)
    assert two[0]["loss"] == pytest.approx((two[0]["total"] + two[1]["total"]) / 7, rel=1e-12)
    assert two[0]["loss"] != pytest.approx((two[0]["total"] / 4 + two[1]["total"] / 3) / 2, rel=1e-9)


# --------------------------------------------------------------------------- experiments.py workers

@pytest.mark.slow
def test_two_workers_share_the_runs_and_the_csv(tmp_path, capsys):
    """spread() starts two workers (GPU slots 0 and 1) that run execute on one plan and one csv with a fake
    runner: each run once, every row intact, each worker saw its own GPU."""
    csv_path, runs = tmp_path / "experiments.csv", tmp_path / "runs"
    script = ("import os, sys\n"
              f"sys.path[:0] = [{str(REPO)!r}]\n"
              "from research import experiments as E\n"
              "from tests.conftest import KEYS, SETTINGS, FakeRunner\n"
              "print('visible', os.environ['CUDA_VISIBLE_DEVICES'])\n"
              "E.execute(E.plan_runs(KEYS, {5}, seeds=3), SETTINGS, 'demo', sys.argv[1], runner=FakeRunner(),\n"
              "          device='cpu', runs_dir=sys.argv[2])\n")
    codes = E.spread([sys.executable, "-c", script, str(csv_path), str(runs)], ["0", "1"])
    assert codes == [0, 0]
    out = capsys.readouterr().out
    assert "[worker 0 gpu 0] visible 0" in out and "[worker 1 gpu 1] visible 1" in out
    plan = E.plan_runs(E.Keys(dict(E.PRESETS["demo"], data="nowhere/patches", n_train=None, n_val=None),
                              (None, None), "data-id"), {5}, seeds=3)
    text = csv_path.read_text()
    assert text.count("key,config_key,") == 1 and len(text.splitlines()) == 1 + len(plan)
    rows = E.read_rows(csv_path)
    assert sorted(r["key"] for r in rows) == sorted(p.key for p in plan)
    # each row holds what FakeRunner returned for its seed (mIoU 0.5 + 0.1 x seed, OA 0.8): nothing mixed up
    assert sorted((r["seed"], r["miou"], r["oa"]) for r in rows) == \
        [(s, pytest.approx(0.5 + 0.1 * s), pytest.approx(0.8)) for s in (0, 0, 1, 1, 2, 2)]
