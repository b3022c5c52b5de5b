"""Cut the official ISPRS Potsdam tiles (6000x6000) into patches in the project's patch layout + a split file.

    python -m tools.prepare_potsdam --raw downloads/Potsdam --out archive/patches
    python -m tools.prepare_potsdam --raw downloads/Potsdam --out archive/patches_irrg --bands IRRG --labels eroded

--raw is searched recursively for the official file names (`top_potsdam_2_10_RGB.tif`, `..._IRRG.tif`,
`..._RGBIR.tif`, `..._label.tif`, `..._label_noBoundary.tif`; `02_10` is read as `2_10`), so it does not matter
where `2_Ortho_RGB/`, `5_Labels_all/`, ... sit. Nothing is ever written under --raw.

Output: `<out>/Images/Image_{id}.tif`, `<out>/Labels/Label_{id}.tif` (LZW TIFF; colour labels, black =
undefined) with ids `{tile}_{k:04d}` (`2_10_0000`, row-major), and `<out>/split.json`. Tiles in TEST_TILES go to
test, --val-tiles to val, every other tile to train, so no two parts share a tile.

Border: when --size/--stride do not end exactly at the tile border, the last row/column of patches is shifted
to end at the border (it overlaps its neighbour), so every pixel is in some patch and every patch is full
size. The default 300/300 on 6000x6000 tiles fits exactly (400 patches per tile).

Resumable: a tile is done when `<out>/.done/{tile}.json` names the same settings and all its patches exist;
each file is written to a temporary name and renamed, and the temporaries a killed run left are removed at the
start. A damaged marker (empty, cut short) is reported and its tile cut again. A tile whose label holds colours
outside the palette (e.g. an overlay rather than a mask), or that lacks its image or label, is reported and
skipped; the others are still cut, and the exit code is 1.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from dataset import colour_to_index
from raster import RasterError, atomic_path, clean_stale_temporaries, keep_bands, read_raster
from spec import NATIVE_SIZE

# --------------------------------------------------------------------------- the Potsdam release

ALL_TILES = tuple(f"2_{c}" for c in range(10, 15)) + tuple(f"3_{c}" for c in range(10, 15)) + \
    tuple(f"4_{c}" for c in range(10, 16)) + tuple(f"5_{c}" for c in range(10, 16)) + \
    tuple(f"6_{c}" for c in range(7, 16)) + tuple(f"7_{c}" for c in range(7, 14))  # the 38 official tiles
TEST_TILES = ("2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15",
              "6_13", "6_14", "6_15", "7_13")  # the common split; the other 24 tiles train
DEFAULT_VAL_TILES = ("2_11", "4_10", "6_9")  # three training tiles held out for validation

BANDS = {"RGB": (0, 1, 2), "IRRG": (0, 1, 2), "RGBIR": (0, 1, 2, 3)}  # band indices read from the file
LABELS = {"full": "label", "eroded": "label_noBoundary"}  # --labels -> file name suffix
BORDER = "shift"  # the last patch of a row/column is shifted to end at the tile border
OUT_FOLDERS = ("Images", "Labels", ".done")  # what prepare writes under --out (and split.json)

_NAME = re.compile(r"top_potsdam_(\d+)_(\d+)_(rgbir|rgb|irrg|label_no_?boundary|label)\.tiff?", re.IGNORECASE)
_KIND = {"rgb": "RGB", "irrg": "IRRG", "rgbir": "RGBIR", "label": "full"}  # label_no*boundary -> eroded


def tile_name(text):
    """'2_10', '02_10', 'top_potsdam_02_10' -> '2_10'."""
    m = re.fullmatch(r"(?:top_potsdam_)?(\d+)_(\d+)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a Potsdam tile name like 2_10")
    return f"{int(m.group(1))}_{int(m.group(2))}"


def _tile_key(tile):
    return tuple(int(v) for v in tile.split("_"))


def expected_names(bands, labels):
    return f"top_potsdam_<row>_<col>_{bands}.tif and top_potsdam_<row>_<col>_{LABELS[labels]}.tif"


# --------------------------------------------------------------------------- finding tiles

def find_tiles(raw, bands="RGB", labels="full"):
    """Search `raw` recursively for the official file names.

    Returns {tile: (image path or None, label path or None)}, sorted by tile, for every tile that has the
    image of `bands` or the label of `labels`. Where a file appears twice (e.g. `5_Labels_all/` and
    `5_Labels_for_participants/`), the first in path order is used. Raises FileNotFoundError naming the
    folder and the expected names when `raw` is missing or no tile has both files.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"--raw folder {raw} not found; it should hold the Potsdam archive "
                                f"({expected_names(bands, labels)}, in any subfolders)")
    found = {}
    for path in sorted(raw.rglob("top_potsdam_*")):
        m = _NAME.fullmatch(path.name)
        if not m or not path.is_file():
            continue
        kind = m.group(3).lower()
        kind = "eroded" if kind.startswith("label_no") else _KIND[kind]
        tile = f"{int(m.group(1))}_{int(m.group(2))}"
        image, label = found.get(tile, (None, None))
        if kind == bands and image is None:
            image = path
        elif kind == labels and label is None:
            label = path
        if image is not None or label is not None:
            found[tile] = (image, label)
    if not any(image and label for image, label in found.values()):
        n_images = sum(image is not None for image, _ in found.values())
        n_labels = sum(label is not None for _, label in found.values())
        raise FileNotFoundError(f"no Potsdam tile with both image and label under {raw} (found {n_images} "
                                f"{bands} images, {n_labels} {labels} labels); expected "
                                f"{expected_names(bands, labels)}")
    return dict(sorted(found.items(), key=lambda kv: _tile_key(kv[0])))


# --------------------------------------------------------------------------- cutting

def patch_starts(length, size, stride):
    """Start offsets along one axis; the last patch is shifted to end at the border (BORDER = 'shift')."""
    if length < size:
        return []
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def patch_paths(out, patch_id):
    out = Path(out)
    return out / "Images" / f"Image_{patch_id}.tif", out / "Labels" / f"Label_{patch_id}.tif"


def _write_tif(path, arr):
    """LZW TIFF, written to a temporary name and renamed, so a killed run never leaves half a file."""
    extra = {"extrasamples": ["unspecified"]} if arr.shape[2] == 4 else {}  # NIR is not alpha
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, arr, compression="lzw", photometric="rgb", **extra)


def _write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def check_label(label, path, rows=512):
    """Raise ValueError (naming the file and the colours) if the colour label holds a non-palette colour.
    Checked in strips of `rows` rows, so a 6000x6000 tile never needs more than a strip of extra memory."""
    for y in range(0, label.shape[0], rows):
        colour_to_index(label[y:y + rows], path=f"{path} (rows {y}-{min(y + rows, label.shape[0]) - 1})")


def read_tile(path, bands=None):
    """An 8-bit tile's pixels as stored (the chosen bands, or all but alpha). Errors name the file."""
    raster = read_raster(path)
    try:
        arr = keep_bands(raster.array, bands, raster.alpha)
    except RasterError as e:
        raise RasterError(f"{path}: {e}") from None
    if arr.dtype != np.uint8:
        raise RasterError(f"{path}: official Potsdam tiles are 8-bit, this one is {arr.dtype}")
    return np.ascontiguousarray(arr)


def cut_tile(tile, image_path, label_path, out, size=NATIVE_SIZE, stride=None, bands="RGB"):
    """Read one tile, check its label, write its patches; return their ids.

    Raises OSError/ValueError (nothing written) for an unreadable file, a size mismatch or a label colour
    outside the palette.
    """
    stride = stride or size
    image = read_tile(image_path, BANDS[bands])
    label = read_tile(label_path)  # (H, W, 3) uint8 colours; an alpha band is dropped
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(f"{image_path} is {image.shape[1]}x{image.shape[0]} but its label {label_path} is "
                         f"{label.shape[1]}x{label.shape[0]}")
    check_label(label, label_path)
    ys, xs = patch_starts(label.shape[0], size, stride), patch_starts(label.shape[1], size, stride)
    if not ys or not xs:
        raise ValueError(f"{image_path} is {label.shape[1]}x{label.shape[0]}, smaller than --size {size}")
    ids = []
    for y in ys:
        for x in xs:
            patch_id = f"{tile}_{len(ids):04d}"
            image_out, label_out = patch_paths(out, patch_id)
            _write_tif(image_out, image[y:y + size, x:x + size])
            _write_tif(label_out, label[y:y + size, x:x + size])
            ids.append(patch_id)
    return ids


# --------------------------------------------------------------------------- the whole archive

def read_marker(marker):
    """A `.done/{tile}.json` marker as a dict, or None when it is damaged (empty, cut short, not the marker's
    layout): the tile counts as not done and is cut again."""
    try:
        done = json.loads(Path(marker).read_text())
    except (OSError, ValueError):  # ValueError: bad JSON, bad UTF-8
        return None
    if not (isinstance(done, dict) and done.get("tile") == Path(marker).stem and isinstance(done.get("ids"), list)
            and all(isinstance(i, str) for i in done["ids"]) and isinstance(done.get("settings"), dict)):
        return None
    return done


def _done_ids(out, tile, settings):
    """The tile's patch ids if it is already cut with these settings and all its files exist, else None."""
    marker = Path(out) / ".done" / f"{tile}.json"
    if not marker.is_file():
        return None
    done = read_marker(marker)
    if done is None or done.get("settings") != settings:
        return None
    if not all(p.is_file() for i in done["ids"] for p in patch_paths(out, i)):
        return None
    return done["ids"]


def split_of(tile, val_tiles):
    return "test" if tile in TEST_TILES else "val" if tile in val_tiles else "train"


def prepare(raw, out, size=NATIVE_SIZE, stride=None, labels="full", bands="RGB", val_tiles=None, progress=True):
    """Cut every tile under `raw` into `out` and write `out/split.json`.

    Returns a summary: {"cut": [tiles], "already_done": [tiles], "bad": {tile: reason}, "absent": [official
    tiles not under raw], "removed_temporaries": [paths a killed run left], "split": the split dict}. Raises
    (before any work) on a missing `raw`, no tiles, `out` inside `raw` (or a subfolder of `out` that is a link
    into it), a validation tile that is a test tile or not under `raw`, or an `out` cut with other settings.
    """
    stride = stride or size
    if labels not in LABELS:
        raise ValueError(f"--labels must be one of {list(LABELS)}, got {labels!r}")
    if bands not in BANDS:
        raise ValueError(f"--bands must be one of {list(BANDS)}, got {bands!r}")
    if size < 1 or stride < 1:
        raise ValueError(f"--size and --stride must be positive, got {size} and {stride}")
    raw, out = Path(raw), Path(out)
    if raw.is_dir():  # resolved, subfolders too: `<out>/Images` may be a link into the archive
        for folder in (out,) + tuple(out / sub for sub in OUT_FOLDERS):
            where = folder.resolve()
            if where == raw.resolve() or raw.resolve() in where.parents:
                shown = "" if where == folder.absolute() else f" (it leads to {where})"
                raise ValueError(f"--out {folder}{shown} is inside --raw {raw}; the raw archive is never "
                                 f"written to, choose an --out outside it")
    found = find_tiles(raw, bands, labels)
    explicit = val_tiles is not None
    val_tiles = tuple(tile_name(t) for t in (val_tiles if explicit else DEFAULT_VAL_TILES))
    in_test = [t for t in val_tiles if t in TEST_TILES]
    if in_test:
        raise ValueError(f"validation tiles {in_test} are test tiles; choose training tiles "
                         f"(not {', '.join(TEST_TILES)})")
    not_found = [t for t in val_tiles if t not in found]
    if explicit and not_found:
        raise ValueError(f"validation tiles {not_found} not found under {raw} "
                         f"(found {', '.join(found)})")
    settings = {"size": size, "stride": stride, "labels": labels, "bands": bands, "border": BORDER}
    for marker in sorted((out / ".done").glob("*.json")):
        done = read_marker(marker)
        if done is None:
            print(f"warning: {marker} is damaged (empty, cut short or not a marker); tile {marker.stem} "
                  f"is not done and is cut again", flush=True)
        elif done["settings"] != settings:
            raise ValueError(f"{out} already holds patches cut with {done['settings']} ({marker}); now asked "
                             f"for {settings}. Use another --out, or delete {out} to start again")

    removed = [p for folder in (out,) + tuple(out / sub for sub in OUT_FOLDERS)
               for p in clean_stale_temporaries(folder)]
    for sub in OUT_FOLDERS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    summary = {"cut": [], "already_done": [], "bad": {}, "absent": [t for t in ALL_TILES if t not in found],
               "removed_temporaries": removed}
    for tile, (image, label) in tqdm(found.items(), desc="tiles", unit="tile", disable=not progress):
        if _done_ids(out, tile, settings) is not None:
            summary["already_done"].append(tile)
            continue
        if label is None:
            summary["bad"][tile] = f"no label top_potsdam_{tile}_{LABELS[labels]}.tif under {raw} for {image}"
            continue
        if image is None:
            summary["bad"][tile] = f"no image top_potsdam_{tile}_{bands}.tif under {raw} for {label}"
            continue
        try:
            ids = cut_tile(tile, image, label, out, size, stride, bands)
        except (OSError, ValueError) as e:
            summary["bad"][tile] = str(e)
            continue
        _write_json(out / ".done" / f"{tile}.json", {"tile": tile, "settings": settings, "ids": ids,
                                                      "image": str(image), "label": str(label)})
        summary["cut"].append(tile)

    split = {"train": [], "val": [], "test": [], "tiles": {"train": [], "val": [], "test": []},
             "settings": settings, "bad_tiles": summary["bad"]}
    done = [d for d in map(read_marker, (out / ".done").glob("*.json")) if d is not None]  # damaged: warned
    for d in sorted(done, key=lambda d: _tile_key(d["tile"])):
        part = split_of(d["tile"], val_tiles)
        split[part] += d["ids"]
        split["tiles"][part].append(d["tile"])
    _write_json(out / "split.json", split)
    summary["split"] = split
    return summary


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    p = argparse.ArgumentParser(description="Cut the ISPRS Potsdam tiles into patches and a split file.")
    p.add_argument("--raw", required=True, help="the unpacked Potsdam archive (searched recursively)")
    p.add_argument("--out", default="archive/patches", help="patch folder to write (Images/, Labels/, split.json)")
    p.add_argument("--size", type=int, default=NATIVE_SIZE, help="patch size in pixels")
    p.add_argument("--stride", type=int, default=None, help="step between patches (default: --size, no overlap)")
    p.add_argument("--labels", default="full", choices=list(LABELS),
                   help="full labels, or eroded (noBoundary: black boundaries, read as ignored)")
    p.add_argument("--bands", default="RGB", choices=list(BANDS), help="which orthophoto (RGBIR: 4 bands)")
    p.add_argument("--val-tiles", default=None,
                   help=f"comma-separated training tiles held out for validation "
                        f"(default: {','.join(DEFAULT_VAL_TILES)}, those of them under --raw)")
    return p


def main(args):
    """Returns the exit code: 0, 1 if any tile was bad, 2 if nothing could start."""
    val_tiles = None if args.val_tiles is None else [t for t in args.val_tiles.split(",") if t.strip()]
    try:
        summary = prepare(args.raw, args.out, args.size, args.stride, args.labels, args.bands, val_tiles)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split, bad = summary["split"], summary["bad"]
    if summary["removed_temporaries"]:
        print(f"removed {len(summary['removed_temporaries'])} temporary files left by killed runs")
    print(f"tiles: {len(summary['cut'])} cut, {len(summary['already_done'])} already done, {len(bad)} bad")
    for tile, reason in bad.items():
        print(f"  bad {tile}: {reason}")
    if summary["absent"]:
        print(f"  {len(summary['absent'])} of {len(ALL_TILES)} official tiles not under {args.raw}: "
              f"{', '.join(summary['absent'])}")
    print("patches: " + ", ".join(f"{part} {len(split[part])} ({len(split['tiles'][part])} tiles)"
                                  for part in ("train", "val", "test")))
    if not split["val"]:
        print("  val is empty: no --val-tiles tile was cut (pass --val-tiles with tiles under --raw)")
    print(f"split -> {Path(args.out) / 'split.json'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
