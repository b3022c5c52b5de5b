import numpy as np
import pytest
import tifffile
import torch

from dataset import (PotsdamDataset, SegmentationDataset, available_ids, folder_pairs, points_to_grid, read_label,
                     sample_points)
from spec import IGNORE_INDEX, PALETTE, DataSpec, load_class_file


def test_lzw_tiff_read_and_colours_mapped(patches):
    root, labels = patches
    assert tifffile.TiffFile(root / "Labels" / "Label_0.tif").pages[0].compression == 5  # LZW
    lab = read_label(root / "Labels" / "Label_0.tif")
    assert np.array_equal(lab, labels[0])
    assert (lab == IGNORE_INDEX).any()  # black stayed undefined


def test_unknown_colour_is_an_error_naming_file_and_colour(tmp_path):
    lab = np.zeros((8, 8, 3), np.uint8)
    lab[:4] = PALETTE[1]
    lab[0, 0] = (12, 34, 56)
    tifffile.imwrite(tmp_path / "Label_bad.tif", lab)
    with pytest.raises(ValueError, match=r"Label_bad\.tif.*\(12, 34, 56\)"):
        read_label(tmp_path / "Label_bad.tif")


def test_missing_label_names_the_path(patches):
    root, _ = patches
    (root / "Labels" / "Label_3.tif").unlink()
    with pytest.raises(FileNotFoundError, match="Label_3.tif"):
        PotsdamDataset(root, [0, 3])


def test_missing_image_and_empty_root_are_errors(tmp_path, patches):
    root, _ = patches
    with pytest.raises(FileNotFoundError, match="Image_99.tif"):
        PotsdamDataset(root, [99])
    (tmp_path / "empty" / "Images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty"):
        available_ids(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PotsdamDataset(tmp_path / "nowhere", [0])


def test_sample_shapes_and_resize(patches):
    root, labels = patches
    ds = PotsdamDataset(root, [0, 1], points=100, spec=DataSpec(scale=0.5))
    s = ds[0]
    assert s["image"].shape == (3, 24, 24) and s["image"].dtype == torch.float32
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["points"].shape == s["label"].shape == (24, 24)
    # nearest resize of the label keeps only existing values
    assert set(s["label"].unique().tolist()) <= set(np.unique(labels[0]).tolist())


def test_points_fixed_across_epochs_and_instances(patches):
    root, _ = patches
    a = PotsdamDataset(root, [0, 1, 2], points=50, spec=DataSpec(scale=1.0), seed=7)
    b = PotsdamDataset(root, [2, 1, 0], points=50, spec=DataSpec(scale=1.0), seed=7)  # another order, another instance
    first = a[1]["points"].clone()
    a.set_epoch(5)
    assert torch.equal(a[1]["points"], first)
    assert torch.equal(b[1]["points"], first)  # same image id -> same points
    c = PotsdamDataset(root, [1], points=50, spec=DataSpec(scale=1.0), seed=8)
    assert not torch.equal(c[0]["points"], first)


def test_resample_each_epoch_redraws(patches):
    root, _ = patches
    ds = PotsdamDataset(root, [0], points=50, spec=DataSpec(scale=1.0), resample_each_epoch=True)
    first = ds[0]["points"].clone()
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["points"], first)


def test_exact_count_never_on_undefined_and_values_match_label():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 6, (30, 30)).astype(np.uint8)
    label[:5] = IGNORE_INDEX
    pts = sample_points(label, 200, "uniform", np.random.default_rng(1))
    assert len(pts) == 200 and len(np.unique(pts)) == 200
    assert (label.reshape(-1)[pts] != IGNORE_INDEX).all()
    # at native size the grid holds exactly these points with their labels
    grid = points_to_grid(label, pts, label.shape)
    assert (grid != IGNORE_INDEX).sum() == 200
    assert np.array_equal(grid.reshape(-1)[pts], label.reshape(-1)[pts])
    # more points than labelled pixels = all labelled pixels (dense)
    assert len(sample_points(label, 10_000)) == (label != IGNORE_INDEX).sum()


def test_balanced_covers_every_present_class():
    label = np.zeros((40, 40), np.uint8)
    label[0, :3] = 4  # 3 car pixels
    label[1:4] = 1
    label[10:12] = 3
    pts = sample_points(label, 24, "balanced", np.random.default_rng(0))
    counts = np.bincount(label.reshape(-1)[pts], minlength=6)
    assert len(pts) == 24
    assert counts[4] == 3  # the rare class gives all it has...
    assert counts[0] == counts[1] == counts[3] == 7  # ...and the rest is shared equally
    uni = sample_points(label, 24, "uniform", np.random.default_rng(0))
    assert np.bincount(label.reshape(-1)[uni], minlength=6)[4] < 3  # uniform almost never finds the cars


def test_grid_majority_and_tie():
    label = np.array([[0, 0, 1, 1], [0, 1, 1, 2]], np.uint8)
    grid = points_to_grid(label, np.arange(8), (1, 2))
    # left cell: three 0s vs one 1 -> 0; right cell: 1,1,1,2 -> 1
    assert grid.tolist() == [[0, 1]]
    tie = points_to_grid(label, np.array([2, 7]), (1, 2))  # right cell: one 1, one 2 -> ambiguous
    assert tie.tolist() == [[IGNORE_INDEX, IGNORE_INDEX]]


def test_labelled_fraction_grows_with_points(patches):
    root, _ = patches
    fr = [PotsdamDataset(root, [0, 1], points=p, spec=DataSpec(scale=0.5)).labelled_fraction() for p in (10, 200, None)]
    assert 0 < fr[0] < fr[1] < fr[2] <= 1
    # 10 points can label at most 10 cells per image
    assert fr[0] <= 10 / (24 * 24)


def test_augment_moves_image_points_and_label_together(patches):
    """The test images are the label colours darkened plus noise: after any flip/rotation the image must
    still show, at every pixel, the colour of the class the label and the points say is there."""
    root, _ = patches
    torch.manual_seed(3)
    ds = PotsdamDataset(root, [0], points=None, spec=DataSpec(scale=1.0), augment=True)
    palette = torch.tensor(PALETTE, dtype=torch.float32) / 255
    seen = set()
    for _ in range(12):
        s = ds[0]
        assert torch.equal(s["points"], s["label"])  # dense points equal the label wherever it is defined
        known = s["label"] != IGNORE_INDEX
        expected = palette[s["label"][known]] * 0.6  # (pixels, 3)
        got = s["image"].permute(1, 2, 0)[known]
        assert (got - expected).abs().mean() < 0.2  # noise is ~40/255 on average; a mismatch costs far more
        seen.add(s["label"].numpy().tobytes())
    assert len(seen) > 1


def test_pad_collate_batches_mixed_sizes_without_new_targets():
    from dataset import pad_collate
    a = {"image": torch.ones(3, 4, 6), "points": torch.zeros(4, 6, dtype=torch.long),
         "label": torch.ones(4, 6, dtype=torch.long), "id": "a"}
    b = {"image": torch.ones(3, 6, 5), "points": torch.zeros(6, 5, dtype=torch.long),
         "label": torch.ones(6, 5, dtype=torch.long), "id": "b"}
    batch = pad_collate([a, b])
    assert batch["image"].shape == (2, 3, 6, 6) and batch["id"] == ["a", "b"]
    assert (batch["points"][0, 4:] == IGNORE_INDEX).all() and (batch["label"][1, :, 5:] == IGNORE_INDEX).all()
    assert (batch["image"][0, :, 4:] == 0).all() and (batch["points"] != IGNORE_INDEX).sum() == 4 * 6 + 6 * 5


def test_index_labels_with_class_file_and_four_bands(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 4), dtype=np.uint8)
    lab = np.zeros((16, 16), np.uint8)
    lab[8:] = 1
    lab[0, 0] = 9  # the ignore value
    tifffile.imwrite(tmp_path / "img" / "a.tif", img)
    tifffile.imwrite(tmp_path / "lab" / "a.tif", lab)
    (tmp_path / "classes.json").write_text(
        '{"names": ["ground", "roof"], "palette": [[0,0,0],[255,0,0]], "label_format": "index", '
        '"ignore_value": 9}')
    classes = load_class_file(tmp_path / "classes.json")
    spec = DataSpec(classes=classes, bands=(0, 1, 2, 3), channels=4, scale=1.0)
    ds = SegmentationDataset(folder_pairs(tmp_path / "img", tmp_path / "lab"), spec, points=None)
    s = ds[0]
    assert s["image"].shape == (4, 16, 16)
    assert s["label"][0, 0] == IGNORE_INDEX and s["label"][15, 15] == 1
    lab[1, 1] = 5  # not a class and not the ignore value
    tifffile.imwrite(tmp_path / "lab" / "a.tif", lab)
    with pytest.raises(ValueError, match=r"a\.tif.*\[5\]"):
        SegmentationDataset(folder_pairs(tmp_path / "img", tmp_path / "lab"), spec)[0]


def test_png_labels_follow_their_exif_orientation_like_the_images(tmp_path):
    from PIL import Image as PILImage
    lab = np.zeros((4, 6), np.uint8)
    lab[0, 0] = 1
    im = PILImage.fromarray(lab)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "l.png", exif=exif)
    classes = load_class_file_from(tmp_path, '{"names": ["a", "b"], "label_format": "index"}')
    out = read_label(tmp_path / "l.png", classes)
    assert out.shape == (6, 4) and out[0, 3] == 1  # top-left goes to top-right


def load_class_file_from(folder, text):
    (folder / "c.json").write_text(text)
    return load_class_file(folder / "c.json")


def test_point_budgets_as_counts_shares_and_dense(patches):
    from config import parse_points
    from dataset import point_count
    assert parse_points("dense") is None and parse_points("100") == 100 and parse_points("1%") == "1%"
    assert parse_points(" 2.5 % ") == "2.5%"
    for bad in ("abc", "0", "-3", "0%", "150%", "1e3"):
        with pytest.raises(ValueError, match="points|share"):
            parse_points(bad)
    assert point_count("1%", 300, 300) == 900 and point_count("0.001%", 10, 10) == 1
    with pytest.raises(ValueError, match=r"only 2304 pixels.*--points 1%"):
        point_count(10_000, 48, 48, "Image_0.tif")
    root, _ = patches
    ds = PotsdamDataset(root, [0, 1], points="10%", spec=DataSpec(scale=1.0))
    labelled = (ds.native_label(0) != IGNORE_INDEX).sum()
    assert (ds.point_grid(0) != IGNORE_INDEX).sum() == min(230, labelled)  # 10 % of 48x48 = 230
