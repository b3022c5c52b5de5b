"""resident.py: cached uint8 tensors equal the per-item dataset, the cache follows files and settings, device
augmentation moves image, points and labels together, batch order and rank shares, and train() on this path."""

import copy
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import resident
from config import ANNOTATION_FIELDS, TrainConfig
from dataset import augment_batch, augment_sample, pad_collate
from resident import (ResidentLoader, batch_order, build_tensors, choose_path,
                      estimate_bytes, load_or_build)
from spec import IGNORE_INDEX
from tests.conftest import cfg_for, write_patches
from train import build_datasets, train


def datasets(root, tmp_path, **kw):
    train_ds, val_ds, _, _ = build_datasets(cfg_for(root, tmp_path, **kw))
    return train_ds, val_ds


def annotation(**kw):
    return {"points": 100, "strategy": "uniform", "annotation_seed": 0} | kw


# --------------------------------------------------------------------------- the tensors

def test_cached_tensors_equal_the_per_item_samples_padded_as_pad_collate_pads(tmp_path):
    write_patches(tmp_path / "p", n=3, size=(48, 48))
    write_patches(tmp_path / "q", n=3, size=(40, 64), seed=1)
    for k in range(3):  # ids 3..5 are 40x64: mixed sizes, padded
        for kind, name in (("Images", "Image"), ("Labels", "Label")):
            (tmp_path / "q" / kind / f"{name}_{k}.tif").rename(tmp_path / "p" / kind / f"{name}_{k + 3}.tif")
    train_ds, _ = datasets(tmp_path / "p", tmp_path, scale=0.5, train_ids=[0, 3, 1, 4], val_ids=[2, 5])
    data = build_tensors(train_ds)  # train_ds augments; the tensors must not be augmented
    plain = copy.copy(train_ds)
    plain.augment = False
    ref = pad_collate([plain[i] for i in range(len(plain))])
    assert data.images.dtype == data.points.dtype == data.labels.dtype == torch.uint8
    assert data.images.shape == (4, 3, 24, 32) and data.nbytes == estimate_bytes(train_ds)
    assert torch.equal(data.images.float() / 255, ref["image"])  # bit for bit: uint8 loses nothing
    assert torch.equal(data.points.long(), ref["points"]) and torch.equal(data.labels.long(), ref["label"])
    assert data.ids == ["0", "3", "1", "4"] and (data.points[0, 24:] == IGNORE_INDEX).all()


def test_loader_without_augmentation_gives_the_dataset_batches(data, tmp_path):
    _, val_ds = datasets(data, tmp_path)
    batches = list(ResidentLoader(build_tensors(val_ds), batch_size=4))
    ref = pad_collate([val_ds[i] for i in range(len(val_ds))])
    assert len(batches) == 1 and batches[0]["id"] == ref["id"]
    for key in ("image", "points", "label"):
        assert torch.equal(batches[0][key], ref[key]) and batches[0][key].dtype == ref[key].dtype


# --------------------------------------------------------------------------- the cache on disk

def test_cache_is_reused_and_rebuilt_when_a_file_or_a_setting_changes(data, tmp_path):
    train_ds, _ = datasets(data, tmp_path)
    cache = tmp_path / "cache"
    first, where = load_or_build(train_ds, annotation(), cache, "train")
    assert where.endswith("built") and str(cache / "resident-train-") in where
    again, where = load_or_build(datasets(data, tmp_path)[0], annotation(), cache, "train")
    assert where.endswith("reused") and torch.equal(again.images, first.images)
    _, where = load_or_build(datasets(data, tmp_path, points=50)[0], annotation(points=50), cache, "train")
    assert where.endswith("built")  # another annotation: other points, another cache
    image = tifffile.imread(data / "Images" / "Image_2.tif")
    tifffile.imwrite(data / "Images" / "Image_2.tif", 255 - image, compression="lzw")
    changed, where = load_or_build(datasets(data, tmp_path)[0], annotation(), cache, "train")
    assert where.endswith("built") and not torch.equal(changed.images[2], first.images[2])
    assert torch.equal(changed.images[1], first.images[1])


def test_a_label_rewritten_with_its_size_and_mtime_kept_is_not_served_stale(data, tmp_path):
    import os
    path = data / "Labels" / "Label_1.tif"
    label = tifffile.imread(path)
    tifffile.imwrite(path, label)  # uncompressed: a rewrite keeps the size
    train_ds, _ = datasets(data, tmp_path)
    first, _ = load_or_build(train_ds, annotation(), tmp_path / "cache", "train")
    st = path.stat()
    tifffile.imwrite(path, np.roll(label, 7, axis=1))  # other classes, same size and format
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as touch -r / rsync -t leave it
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    again, where = load_or_build(datasets(data, tmp_path)[0], annotation(), tmp_path / "cache", "train")
    assert where.endswith("built") and not torch.equal(again.labels[1], first.labels[1])


def test_a_run_writes_its_cache_in_its_own_folder_never_beside_the_data(data, tmp_path):
    """The cache landed in a person's data folder (realdata/atlanta/.resident-cache): it lives in the run's
    folder, or where --cache-dir says; the data folder is left as it was."""
    from research.experiments import data_identity
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    identity = data_identity({"data": str(data), "split": None})
    cfg = dict(data=str(data), train_ids=[0, 1, 2, 3], val_ids=[4, 5], arch="tiny", pretrained=False, epochs=1,
               batch_size=2, size=16, points=5, figures=False, progress=False, loader="resident",
               allow_unclicked=True)
    train(TrainConfig(**cfg, out=str(tmp_path / "run")))
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "run" / ".resident-cache").iterdir()) == ["train", "val"]
    train(TrainConfig(**cfg, out=str(tmp_path / "run2"), cache_dir=str(tmp_path / "shared")))
    assert len(list((tmp_path / "shared").glob("resident-*.pt"))) == 2
    assert not (tmp_path / "run2" / ".resident-cache").exists()
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written beside the data
    assert data_identity({"data": str(data), "split": None}) == identity  # finished runs keep their keys


def test_every_annotation_field_and_the_part_are_in_the_key(data, tmp_path):
    train_ds, _ = datasets(data, tmp_path)
    keys = {resident.cache_key(train_ds.pairs, train_ds.spec, annotation(), "train")}
    for name in ANNOTATION_FIELDS:
        keys.add(resident.cache_key(train_ds.pairs, train_ds.spec, annotation() | {name: "other"}, "train"))
    keys.add(resident.cache_key(train_ds.pairs, train_ds.spec, annotation(), "val"))  # the same images, held out
    assert len(keys) == 2 + len(ANNOTATION_FIELDS)


def test_a_corrupt_cache_file_is_rebuilt_with_a_warning(data, tmp_path, capsys):
    train_ds, _ = datasets(data, tmp_path)
    first, _ = load_or_build(train_ds, annotation(), tmp_path / "cache", "train")
    (cache,) = (tmp_path / "cache").glob("resident-*.pt")
    cache.write_bytes(cache.read_bytes()[:100])  # a partial file
    again, where = load_or_build(train_ds, annotation(), tmp_path / "cache", "train")
    assert "unreadable" in capsys.readouterr().out and where.endswith("built")
    assert torch.equal(again.points, first.points)
    assert load_or_build(train_ds, annotation(), tmp_path / "cache", "train")[1].endswith("reused")


def test_an_unwritable_cache_folder_trains_without_a_cache(data, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    train_ds, _ = datasets(data, tmp_path)
    got, where = load_or_build(train_ds, annotation(), blocker / ".cache", "train")  # mkdir fails
    assert where.startswith("cache not written") and "not writable" in where
    assert torch.equal(got.images, build_tensors(train_ds).images)


def test_a_run_folder_keeps_only_the_newest_cache_of_each_part(data, tmp_path):
    """The annotation page retrains into one folder with new clicks each time: a new key each time, and the
    older files of that part are removed when the folder is the run's own (prune)."""
    train_ds, val_ds = datasets(data, tmp_path)
    load_or_build(val_ds, annotation(), tmp_path / "c", "val", prune=True)
    for points in (5, 6, 7):
        load_or_build(datasets(data, tmp_path, points=points)[0], annotation(points=points), tmp_path / "c", "train",
                      prune=True)
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "c").iterdir()) == ["train", "val"]
    load_or_build(train_ds, annotation(), tmp_path / "shared", "train")
    load_or_build(datasets(data, tmp_path, points=5)[0], annotation(points=5), tmp_path / "shared", "train")
    assert len(list((tmp_path / "shared").iterdir())) == 2  # a shared --cache-dir keeps every run's


# --------------------------------------------------------------------------- batches on the device

def test_device_augmentation_moves_image_points_and_labels_alike():
    grid = torch.arange(48, dtype=torch.uint8).reshape(6, 8)  # every pixel its own value; not square
    image = grid.expand(8, 3, 6, 8).clone()
    k = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    flip = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]).bool()
    out_image, out_points, out_label = augment_batch(image, grid.expand(8, 6, 8).clone(),
                                                     grid.expand(8, 6, 8).clone(), k, flip)
    square = torch.full((8, 8), IGNORE_INDEX, dtype=torch.uint8)
    square[:6] = grid  # padded at the bottom to a square, as pad_collate pads
    for i in range(8):
        expected = torch.rot90(square, int(k[i]), dims=(-2, -1))
        expected = expected.flip(-1) if flip[i] else expected
        assert torch.equal(out_points[i], expected) and torch.equal(out_label[i], expected)
        assert torch.equal(out_image[i, 0][expected != IGNORE_INDEX], expected[expected != IGNORE_INDEX])
        assert (out_image[i][:, expected == IGNORE_INDEX] == 0).all()  # image padding is 0


def test_one_augmentation_serves_both_paths_and_a_turned_sample_keeps_its_shape():
    """dataset.augment_sample is augment_batch on one sample: a quarter turn of a non-square sample takes the
    turned shape (no padding), and the draws come from torch's global RNG, so a seed repeats them."""
    grid = torch.arange(12).reshape(3, 4)
    image = grid[None].float()
    out = augment_batch(image[None], grid[None], grid[None], torch.tensor([1]), torch.tensor([True]))
    assert out[1].shape == (1, 4, 3) and torch.equal(out[1][0], torch.rot90(grid, 1, (-2, -1)).flip(-1))
    assert torch.equal(out[0][0, 0], out[1][0].float())
    draws = []
    for seed in (3, 3, *range(20)):
        torch.manual_seed(seed)
        draws.append(augment_sample(image, grid, grid))
    assert all(torch.equal(x, y) for x, y in zip(draws[0], draws[1]))
    assert {tuple(d[1].shape) for d in draws} == {(3, 4), (4, 3)}
    assert all(torch.equal(d[0][0], d[1].float()) and torch.equal(d[1], d[2]) for d in draws)


def test_batch_order_is_reproducible_and_ranks_share_each_batch():
    order = lambda seed, **kw: batch_order(10, 4, torch.Generator().manual_seed(seed), **kw)
    assert [b.tolist() for b in order(3)] == [b.tolist() for b in order(3)]
    assert [b.tolist() for b in order(3)] != [b.tolist() for b in order(4)]
    whole = order(3)
    assert sorted(torch.cat(whole).tolist()) == list(range(10)) and [len(b) for b in whole] == [4, 4, 2]
    assert [len(b) for b in order(3, drop_last=True)] == [4, 4]
    r0, r1 = order(3, rank=0, world_size=2), order(3, rank=1, world_size=2)
    for b, a, c in zip(whole, r0, r1):
        assert not set(a.tolist()) & set(c.tolist()) and sorted(a.tolist() + c.tolist()) == sorted(b.tolist())
    assert [b.tolist() for b in batch_order(5, 2, shuffle=False)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="rank"):
        batch_order(4, 2, rank=2, world_size=2)


def test_auto_chooses_resident_unless_points_are_redrawn_or_the_data_do_not_fit():
    assert choose_path("auto", False, 10, 100)[0] == "resident"
    assert choose_path("auto", True, 10, 100) == ("dataloader", "points are redrawn every epoch "
                                                                "(--resample-each-epoch)")
    path, why = choose_path("auto", False, 200 * 2**20, 100 * 2**20)
    assert path == "dataloader" and "200 MiB" in why
    assert choose_path("resident", False, 200, 100)[0] == "resident"  # asked for: no fallback
    assert choose_path("dataloader", False, 10, 100)[0] == "dataloader"


# --------------------------------------------------------------------------- train() on this path

@pytest.mark.slow
def test_training_takes_the_resident_path_by_default_and_learns(data, tmp_path, capsys):
    shared = dict(epochs=4, points=None, lr=3e-3, cache_dir=str(tmp_path / "cache"))
    history = train(cfg_for(data, tmp_path, **shared))
    out = capsys.readouterr().out
    assert "data path: resident" in out and "cache" in out
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    again = train(cfg_for(data, tmp_path, **shared, out=str(tmp_path / "again")))
    assert "reused" in capsys.readouterr().out
    assert [h["train_loss"] for h in again] == [h["train_loss"] for h in history]  # same seed, same run


def test_dataloader_path_is_used_for_redrawn_points_and_when_asked(data, tmp_path, capsys):
    train(cfg_for(data, tmp_path, epochs=1, resample_each_epoch=True))
    assert "data path: per-item DataLoader" in capsys.readouterr().out
    history = train(cfg_for(data, tmp_path, epochs=1, loader="dataloader", out=str(tmp_path / "dl")))
    assert "data path: per-item DataLoader, 0 workers (--loader dataloader)" in capsys.readouterr().out
    assert 0 <= history[0]["val_miou"] <= 1
    with pytest.raises(ValueError, match="redrawn every epoch need --loader dataloader"):
        train(cfg_for(data, tmp_path, loader="resident", resample_each_epoch=True, out=str(tmp_path / "x")))


def test_both_paths_validate_alike(data, tmp_path):
    """One model, the val set through run_epoch from both loaders: the same loss and confusion matrices."""
    from torch.utils.data import DataLoader

    from model import build_model
    from partial_ce_loss import PartialCrossEntropyLoss
    from train import run_epoch
    _, val_ds = datasets(data, tmp_path, train_ids=[0, 1], val_ids=[6, 7, 5])
    torch.manual_seed(0)
    model, loss = build_model("tiny", 6, 3, "skip", pretrained=False), PartialCrossEntropyLoss()
    cpu = torch.device("cpu")
    names = val_ds.classes.names
    a = run_epoch(model, ResidentLoader(build_tensors(val_ds), 2), loss, cpu, progress=False, names=names)
    b = run_epoch(model, DataLoader(val_ds, 2, collate_fn=pad_collate), loss, cpu, progress=False)
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert torch.equal(a[1].mat, b[1].mat) and torch.equal(a[2].mat, b[2].mat) and a[2].mat.sum() > 0


def test_the_weak_losses_run_on_the_resident_path(data, tmp_path, capsys):
    """Both terms computed on resident batches: each positive and finite (threshold 0 makes every unclicked pixel a
    pseudo-label; at 0.95 the untrained model is sure of none, and its consistency term is 0)."""
    history = train(cfg_for(data, tmp_path, epochs=1, affinity_weight=1.0, consistency_weight=1.0,
                            consistency_threshold=0.0))
    assert "data path: resident batches" in capsys.readouterr().out
    assert 0 < history[0]["train_affinity"] < float("inf") and 0 < history[0]["train_consistency"] < float("inf")


@pytest.mark.slow
def test_resume_on_the_resident_path_continues(data, tmp_path):
    straight = train(cfg_for(data, tmp_path, out=str(tmp_path / "s"), epochs=3, loader="resident"))
    train(cfg_for(data, tmp_path, out=str(tmp_path / "r"), epochs=2, loader="resident"))
    resumed = train(cfg_for(data, tmp_path, out=str(tmp_path / "r"), epochs=3, loader="resident", resume=True))
    assert [h["train_loss"] for h in resumed] == pytest.approx([h["train_loss"] for h in straight], rel=1e-5)


# --------------------------------------------------------------------------- a cache hit decodes no file

def count_reads(monkeypatch):
    """Record every file read as (what, file name): dataset decoding (load_input, read_label) and the raster
    reads spec.fit_spec makes (spec.read_raster, also inside fit_intensity and load_input)."""
    import dataset
    import spec
    reads = []
    for module, name in ((dataset, "load_input"), (dataset, "read_label"), (spec, "read_raster")):
        original = getattr(module, name)

        def counted(path, *a, _original=original, _name=name, **kw):
            reads.append((_name, Path(path).name))
            return _original(path, *a, **kw)
        monkeypatch.setattr(module, name, counted)
    return reads


def run_logged(cfg, capsys):
    """train(cfg) -> (history without the seconds, the saved class weights, the log lines that must agree)."""
    history = train(cfg)
    out = capsys.readouterr().out
    weights = torch.load(Path(cfg.out) / "class_weights.pt", weights_only=True)
    lines = [line for line in out.splitlines() if line.startswith(("data:", "class weights", "warning"))]
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history], weights, lines, out


def test_a_hit_seeds_the_dataset_with_the_samples_it_would_decode(tmp_path):
    write_patches(tmp_path / "p", n=3, size=(48, 48))
    write_patches(tmp_path / "q", n=3, size=(40, 64), seed=1)
    for k in range(3):  # mixed sizes: each seeded sample is cropped to its own size
        for kind, name in (("Images", "Image"), ("Labels", "Label")):
            (tmp_path / "q" / kind / f"{name}_{k}.tif").rename(tmp_path / "p" / kind / f"{name}_{k + 3}.tif")
    for points in (100, "1/object"):
        kw = dict(scale=0.5, train_ids=[0, 3, 1, 4], val_ids=[2, 5], points=points)
        decoded, _ = datasets(tmp_path / "p", tmp_path, **kw)
        load_or_build(decoded, annotation(points=points), tmp_path / "cache", "train")
        seeded, _ = datasets(tmp_path / "p", tmp_path, **kw)
        data, where = resident.find_cache(seeded, annotation(points=points), tmp_path / "cache", "train")
        resident.seed_dataset(seeded, data)
        assert where.endswith("reused") and all(seeded._cache[i][1] is None for i in range(4))  # native unread
        for i in range(4):
            assert torch.equal(seeded.image(i), decoded.image(i)) and seeded.image(i).is_contiguous()
            assert np.array_equal(seeded.dense_label(i), decoded.dense_label(i))
            assert np.array_equal(seeded.point_grid(i), decoded.point_grid(i))
            assert seeded.point_grid(i).dtype == decoded.point_grid(i).dtype == np.uint8
        assert seeded.annotation_stats() == decoded.annotation_stats()
        assert np.array_equal(seeded.native_label(3), decoded.native_label(3))  # read when asked for
        assert np.array_equal(seeded.click_pixels(1), decoded.click_pixels(1))


@pytest.mark.slow
def test_a_second_run_hits_the_cache_decodes_nothing_and_trains_alike(data, tmp_path, monkeypatch, capsys):
    from train import fit_spec, resolve_split
    shared = str(tmp_path / "cache")  # --cache-dir: runs on the same data share it
    first = run_logged(cfg_for(data, tmp_path, epochs=2, out=str(tmp_path / "a"), cache_dir=shared), capsys)
    assert "cache" in first[3] and first[3].count("built") == 2
    reads = count_reads(monkeypatch)
    cfg = cfg_for(data, tmp_path, epochs=2, out=str(tmp_path / "b"), cache_dir=shared)
    second = run_logged(cfg, capsys)
    assert second[3].count("reused") == 2
    assert not [r for r in reads if r[0] in ("load_input", "read_label")]  # no image or label decoded
    rasters = sorted(reads)
    reads.clear()
    fit_spec(cfg, resolve_split(cfg)[0])
    assert rasters == sorted(reads) and len(rasters) == 1  # only fit_spec's: the first image (its bands); the
    # intensity rule of 8-bit images comes from their headers (raster.is_8bit), no pixel read
    assert first[0] == second[0] and len(first[0]) == 2  # the same history, epoch for epoch
    assert torch.equal(first[1]["weights"], second[1]["weights"]) and torch.equal(first[1]["counts"],
                                                                                  second[1]["counts"])
    assert first[2] == second[2] and any("clicks per image" in line for line in first[2])


def test_check_data_refuses_a_class_without_points_on_a_hit(data, tmp_path, monkeypatch):
    from train import check_data
    for k in range(6):  # clutter (red) becomes impervious surface (white) in every training label
        path = data / "Labels" / f"Label_{k}.tif"
        label = tifffile.imread(path)
        red = (label == (255, 0, 0)).all(-1)
        label[red] = 255
        tifffile.imwrite(path, label, compression="lzw")
    cfg = cfg_for(data, tmp_path)
    train_ds, val_ds, _, _ = build_datasets(cfg)
    with pytest.raises(ValueError, match=r"classes \['clutter'\] have no labelled point") as miss:
        check_data(cfg, train_ds, val_ds)  # the decoding path refuses it ...
    for ds, part in zip((train_ds, val_ds), ("train", "val")):  # ... and a cache of these data exists
        load_or_build(ds, annotation(), tmp_path / "ck" / ".resident-cache", part)
    reads = count_reads(monkeypatch)
    with pytest.raises(ValueError, match=r"classes \['clutter'\] have no labelled point") as hit:
        train(cfg)
    assert str(hit.value) == str(miss.value)
    assert not [r for r in reads if r[0] in ("load_input", "read_label")]


def test_an_old_cache_is_built_again(data, tmp_path, monkeypatch, capsys):
    train_ds, _ = datasets(data, tmp_path)
    with monkeypatch.context() as mp:  # a cache file of version 1: another key, never found
        mp.setattr(resident, "CACHE_VERSION", 1)
        assert load_or_build(train_ds, annotation(), tmp_path / "cache", "train")[1].endswith("built")
    assert load_or_build(train_ds, annotation(), tmp_path / "cache", "train")[1].endswith("built")
    (path,) = [p for p in (tmp_path / "cache").glob("resident-*.pt")
               if resident.cache_key(train_ds.pairs, train_ds.spec, annotation(), "train")[:24] in p.name]
    blob = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in blob.items() if k not in ("sizes", "clicks")}, path)  # version 1's fields only
    assert resident.find_cache(datasets(data, tmp_path)[0], annotation(), tmp_path / "cache", "train") is None
    assert "unreadable (KeyError" in capsys.readouterr().out
    assert load_or_build(train_ds, annotation(), tmp_path / "cache", "train")[1].endswith("built")


def test_rounds_on_a_hit_read_native_labels_when_asked_and_train_alike(data, tmp_path, monkeypatch, capsys):
    cfg = dict(epochs=3, rounds=1, self_training=1, pseudo_threshold=0.3, clicks_per_round=5)
    cfg["cache_dir"] = str(tmp_path / "cache")
    first = run_logged(cfg_for(data, tmp_path, out=str(tmp_path / "a"), **cfg), capsys)
    reads = count_reads(monkeypatch)
    second = run_logged(cfg_for(data, tmp_path, out=str(tmp_path / "b"), **cfg), capsys)
    assert second[3].count("reused") == 2 and first[0] == second[0]
    labels = {name for what, name in reads if what == "read_label"}
    assert labels == {f"Label_{k}.tif" for k in range(6)}  # the round's clicks: training labels only, once each
    assert len([r for r in reads if r[0] == "read_label"]) == 6
