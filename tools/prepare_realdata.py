"""A small real labelled set for development: SpaceNet Atlanta buildings (0.5 m) from the solaris 0.4.0 wheel.

    python -m tools.prepare_realdata                        # -> realdata/atlanta (downloads the wheel to realdata/cache)
    python -m tools.prepare_realdata --wheel solaris-0.4.0-py3-none-any.whl --val-columns 0,5

The wheel (Apache-2.0) ships a 900x900 single-band uint16 GeoTIFF of suburban Atlanta, its building footprint
mask (0 / 255) and one instance band per building (43). The pair is checked before it is trusted: the
footprint mask must be the union of the instance bands (`sample_fp_mask.tif`, also in the wheel, belongs to
another chip and is never used).

Output, in the project's own-data layout (train.py --images/--labels/--classes/--split):
  <out>/images/r{row}_c{col}.tif     uint16, 1 band, the source values; GeoTIFF tags with the origin moved
  <out>/labels/r{row}_c{col}.tif     uint8, the source values 0 / 255 (classes.json maps them to classes)
  <out>/instances/r{row}_c{col}.tif  uint16 building ids, 0 = none, k = instance band k (1-based), so a
                                     building cut by a patch border keeps one id across patches
  <out>/clicks.gpkg                  the clicks a person would give (write_clicks_layer): one inside every
                                     building, as many on the background, spread out; points in the image's
                                     UTM CRS with a `class` attribute (train.py --images ... --clicks ...)
  <out>/classes.json, <out>/split.json (whole patch columns held out for validation), <out>/.done

Patches are --patch-size squares on a grid of (height // size) x (width // size); a remainder at the
bottom/right is cropped (and reported). Every file is written atomically; `.done` (wheel sha256 + settings)
is written last, so a finished --out is recognised and a second run does nothing.

The download is `python -m pip download --no-deps solaris==0.4.0`. Its metadata holds an invalid requirement
that pip 24.1 and later refuse even with --no-deps, so with such a pip the download runs in a throwaway venv
with pip<24.1.
"""

import argparse
import hashlib
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from annotations import ClickSet, ImageClicks, write_clicks
from raster import RasterError, atomic_path, open_image, read_raster
from spec import ClassSpec

# --------------------------------------------------------------------------- the source

PACKAGE = "solaris==0.4.0"
WHEEL_NAME = "solaris-0.4.0-py3-none-any.whl"
SOURCE = "SpaceNet Atlanta (0.5 m) via the solaris 0.4.0 wheel (Apache-2.0), solaris/data/sample_geotiff.tif"
IMAGE_MEMBER = "solaris/data/sample_geotiff.tif"
LABEL_MEMBER = "solaris/data/sample_fp_mask_from_geojson.tif"
INSTANCE_MEMBER = "solaris/data/sample_inst_mask.tif"
PIP_REFUSES = (24, 1)  # first pip that rejects the wheel's metadata

BUILDING_VALUE = 255  # label file value of a building pixel; 0 is background
CLASSES = {"names": ["background", "building"],
           "palette": [[128, 128, 128], [255, 0, 0]],  # black is this project's "undefined" colour
           "label_format": "index",
           "value_map": {"0": 0, str(BUILDING_VALUE): 1},  # file value -> class index
           # the reader's default ignore value is 255, the building value here: name one that never occurs
           "ignore_value": 254}


BACKGROUND_MARGIN = 6  # pixels (3 m): a background click is at least this far from every building
CLICK_SEED = 0  # where the first background click goes; the others follow by farthest-point sampling


class PrepareError(Exception):
    """A problem the user can fix; main prints it as `error: ...` and exits 2."""


# --------------------------------------------------------------------------- getting the wheel

def pip_refuses_wheel(version):
    """True for a pip version string (e.g. '24.1', '23.2.1', '24.1b1') that refuses solaris 0.4.0's metadata."""
    parts = [int(re.match(r"\d*", p).group() or 0) for p in version.split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts))) >= PIP_REFUSES


def download_wheel(cache):
    """Download the wheel into `cache` with pip; returns its path. Uses a throwaway venv with pip<24.1 when the
    running interpreter's pip is too new (or absent)."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        version = None
    with tempfile.TemporaryDirectory(prefix="pip-old-") as tmp:
        python = sys.executable
        if version is None or pip_refuses_wheel(version):
            print(f"pip {version or '(none)'} refuses {PACKAGE}'s metadata: downloading with pip<24.1 "
                  f"in a throwaway venv")
            subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
            python = str(Path(tmp) / ("Scripts" if sys.platform == "win32" else "bin") / "python")
            subprocess.run([python, "-m", "pip", "install", "--quiet", "pip<24.1"], check=True)
        cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", PACKAGE,
               "-d", str(cache)]
        print("python " + " ".join(cmd[1:]))
        if subprocess.run(cmd).returncode != 0:
            raise PrepareError(f"pip could not download {PACKAGE} into {cache}; download {WHEEL_NAME} by "
                               f"hand and pass --wheel")
    wheel = cache / WHEEL_NAME
    if not wheel.is_file():
        raise PrepareError(f"pip ran but {wheel} is not there; pass --wheel with the downloaded file")
    return wheel


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- reading and checking the pair

def read_members(wheel):
    """(image (H, W), image geotags, footprint mask (H, W), instance bands (H, W, N)) from the wheel, checked:
    a single-band uint16 image, a 0/255 mask of the image's size equal to the union of the instance bands,
    instance bands that do not overlap. Errors name the member."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise PrepareError(f"{wheel} is not a readable wheel (zip): {e}") from None
    with zf, tempfile.TemporaryDirectory(prefix="realdata-") as tmp:
        missing = [m for m in (IMAGE_MEMBER, LABEL_MEMBER, INSTANCE_MEMBER) if m not in zf.namelist()]
        if missing:
            raise PrepareError(f"{wheel} lacks {', '.join(missing)}; is it the {PACKAGE} wheel?")
        rasters = {}
        for member in (IMAGE_MEMBER, LABEL_MEMBER, INSTANCE_MEMBER):
            path = Path(tmp) / Path(member).name
            path.write_bytes(zf.read(member))
            try:
                rasters[member] = read_raster(path)
            except RasterError as e:
                raise PrepareError(f"{member} in {wheel}: {e}") from None
    image, label, inst = (rasters[m] for m in (IMAGE_MEMBER, LABEL_MEMBER, INSTANCE_MEMBER))
    if image.array.shape[2] != 1 or image.array.dtype != np.uint16:
        raise PrepareError(f"{IMAGE_MEMBER}: expected one uint16 band, found {image.array.shape[2]} "
                           f"{image.array.dtype} band(s)")
    size = image.array.shape[:2]
    for member, r in ((LABEL_MEMBER, label), (INSTANCE_MEMBER, inst)):
        if r.array.shape[:2] != size:
            raise PrepareError(f"{member}: {r.array.shape[1]}x{r.array.shape[0]}, the image {IMAGE_MEMBER} is "
                               f"{size[1]}x{size[0]}; they do not belong together")
    mask = label.array
    if mask.shape[2] != 1 or mask.dtype != np.uint8 or not np.isin(mask, (0, BUILDING_VALUE)).all():
        raise PrepareError(f"{LABEL_MEMBER}: expected one uint8 band of 0 / {BUILDING_VALUE}, found "
                           f"{mask.shape[2]} {mask.dtype} band(s) with values {np.unique(mask)[:8].tolist()}")
    bands = inst.array > 0
    if bands.shape[2] >= 2 ** 16:
        raise PrepareError(f"{INSTANCE_MEMBER}: {bands.shape[2]} instance bands do not fit uint16 ids")
    overlap = int((bands.sum(axis=2) > 1).sum())
    if overlap:
        raise PrepareError(f"{INSTANCE_MEMBER}: {overlap} pixels belong to more than one instance band; "
                           f"instance ids would be ambiguous")
    differ = int(((mask[:, :, 0] > 0) != bands.any(axis=2)).sum())
    if differ:
        raise PrepareError(f"{LABEL_MEMBER} is not the footprint mask of {IMAGE_MEMBER}: it differs from the "
                           f"union of the {bands.shape[2]} instance bands of {INSTANCE_MEMBER} on {differ} "
                           f"pixels ({differ / mask[:, :, 0].size:.1%})")
    return image.array[:, :, 0], image.geotags, mask[:, :, 0], bands


def instance_ids(bands):
    """(H, W, N) bool instance bands -> (H, W) uint16 ids: 0 = none, k = band k (1-based)."""
    ids = np.zeros(bands.shape[:2], np.uint16)
    for k in range(bands.shape[2]):
        ids[bands[:, :, k]] = k + 1
    return ids


# --------------------------------------------------------------------------- patches and their georeferencing

def shifted_geotags(geotags, row0, col0):
    """GeoTIFF tags for a window starting at pixel (row0, col0). One tie point with a pixel scale becomes the
    tie point of the window's pixel (0, 0); several tie points keep their ground coordinates and get window
    pixel coordinates; a transformation matrix gets its translation moved to the window origin."""
    tags = dict(geotags)
    if 33922 in tags:
        dtype, count, tie = tags[33922]
        tie = [float(v) for v in tie]
        if count == 6 and 33550 in tags:
            sx, sy = float(tags[33550][2][0]), float(tags[33550][2][1])
            i, j, k, x, y, z = tie
            tie = [0.0, 0.0, k, x + (col0 - i) * sx, y - (row0 - j) * sy, z]
        else:
            for p in range(0, count, 6):
                tie[p], tie[p + 1] = tie[p] - col0, tie[p + 1] - row0
        tags[33922] = (dtype, count, tuple(tie))
    if 34264 in tags:
        dtype, count, m = tags[34264]
        m = [float(v) for v in m]
        m[3] += m[0] * col0 + m[1] * row0
        m[7] += m[4] * col0 + m[5] * row0
        tags[34264] = (dtype, count, tuple(m))
    return tags


def write_tiff(path, arr, geotags):
    """Write an (H, W) array as a deflate TIFF with the given GeoTIFF tags, atomically."""
    extratags = [(code, dtype, count, value, True) for code, (dtype, count, value) in sorted(geotags.items())]
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(arr), photometric="minisblack", compression="zlib",
                         extratags=extratags, metadata=None)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def patch_id(row, col):
    return f"r{row}_c{col}"


def split_stats(ids, windows, mask, inst):
    """(patch count, building pixel share, buildings touching the patches) for a list of patch ids."""
    pixels = building = 0
    touched = set()
    for i in ids:
        r0, c0, size = windows[i]
        m, k = mask[r0:r0 + size, c0:c0 + size], inst[r0:r0 + size, c0:c0 + size]
        pixels += m.size
        building += int((m > 0).sum())
        touched.update(int(v) for v in np.unique(k) if v)
    return len(ids), building / max(pixels, 1), len(touched)


# --------------------------------------------------------------------------- clicks as a person gives them

def building_clicks(inst):
    """(rows, cols) of one click per building of an (H, W) instance id map (0 = none): its most interior pixel
    (largest distance to the nearest pixel outside it; the first of equals), as a person clicks the middle of a
    roof rather than its edge."""
    rows, cols = [], []
    for k, box in enumerate(ndimage.find_objects(inst), start=1):
        if box is None:
            continue
        inside = np.pad(inst[box] == k, 1)  # the window's border is outside the building
        depth = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]
        r, c = np.unravel_index(int(depth.argmax()), depth.shape)
        rows.append(box[0].start + r)
        cols.append(box[1].start + c)
    return np.array(rows, np.int64), np.array(cols, np.int64)


def background_clicks(building, n, margin=BACKGROUND_MARGIN, seed=CLICK_SEED):
    """(rows, cols) of n background clicks spread over an (H, W) building mask: among the pixels at least `margin`
    pixels from every building, the first at random (seed), each next one the farthest from those taken."""
    far = ndimage.distance_transform_edt(~building) >= margin
    rows, cols = np.nonzero(far)
    if rows.size == 0 or n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    picks = [int(np.random.default_rng(seed).integers(rows.size))]
    gap = (rows - rows[picks[0]]) ** 2 + (cols - cols[picks[0]]) ** 2
    while len(picks) < min(n, rows.size):
        j = int(gap.argmax())
        picks.append(j)
        gap = np.minimum(gap, (rows - rows[j]) ** 2 + (cols - cols[j]) ** 2)
    return rows[picks].astype(np.int64), cols[picks].astype(np.int64)


def write_clicks_layer(out):
    """Write `<out>/clicks.gpkg` from the patches in `out` (instances/, split.json's grid): building_clicks and as
    many background_clicks, each in the patch it falls in, as points at pixel centres in the patches' CRS with a
    `class` attribute (annotations.write_clicks). Returns (building clicks, background clicks)."""
    split = json.loads((out / "split.json").read_text())
    (rows, cols), size = split["grid"], split["patch_size"]
    inst = np.block([[tifffile.imread(out / "instances" / f"{patch_id(r, c)}.tif") for c in range(cols)]
                     for r in range(rows)])
    br, bc = building_clicks(inst)
    gr, gc = background_clicks(inst > 0, br.size)
    r_all, c_all = np.concatenate([br, gr]), np.concatenate([bc, gc])
    cls = np.concatenate([np.ones(br.size, np.uint8), np.zeros(gr.size, np.uint8)])
    images = {}
    for r in range(rows):
        for c in range(cols):
            sel = (r_all // size == r) & (c_all // size == c)
            ref = open_image(out / "images" / f"{patch_id(r, c)}.tif")
            images[ref.name] = ImageClicks(ref, r_all[sel] - r * size, c_all[sel] - c * size, cls[sel], 0)
    write_clicks(out / "clicks.gpkg", ClickSet(images, ClassSpec.from_dict(CLASSES), "prepare_realdata.py"))
    return br.size, gr.size


# --------------------------------------------------------------------------- the whole job

def parse_columns(text):
    try:
        cols = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise PrepareError(f"--val-columns {text!r}: expected comma-separated column numbers like 4,5") from None
    if not cols or min(cols) < 0 or len(set(cols)) != len(cols):
        raise PrepareError(f"--val-columns {text!r}: expected distinct column numbers >= 0, e.g. 4,5")
    return sorted(cols)


def read_done(out):
    """The `.done` marker of a finished --out whose patch files are all there, else None."""
    try:
        done = json.loads((out / ".done").read_text())
        ids = json.loads((out / "split.json").read_text())
        ids = ids["train"] + ids["val"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = [out / sub / f"{i}.tif" for sub in ("images", "labels", "instances") for i in ids]
    return done if len(ids) == done.get("patches") and all(f.is_file() for f in files) else None


def prepare(args):
    """Check the arguments, get the wheel, cut it into `args.out`. Returns 0; raises PrepareError."""
    # arguments first, before any download or write
    val_columns = parse_columns(args.val_columns)
    if args.patch_size < 1:
        raise PrepareError(f"--patch-size must be positive, got {args.patch_size}")
    out, cache = Path(args.out), Path(args.cache)
    wheel = Path(args.wheel) if args.wheel else None
    if wheel is not None and not wheel.is_file():
        raise PrepareError(f"--wheel {wheel}: no such file")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} exists and is not a folder")
    settings = {"patch_size": args.patch_size, "val_columns": val_columns}

    # already done? (a pinned PyPI release never changes, so a finished --out needs no new download)
    if wheel is None and (cache / WHEEL_NAME).is_file():
        wheel = cache / WHEEL_NAME
    done = read_done(out)
    digest = sha256(wheel) if wheel is not None else None
    if done and done.get("settings") == settings and (digest is None or done.get("wheel_sha256") == digest):
        if not (out / "clicks.gpkg").is_file():  # a set made before the clicks layer existed
            n = write_clicks_layer(out)
            print(f"{out}/clicks.gpkg: {n[0]} building and {n[1]} background clicks added")
        print(f"{out} is complete already ({done.get('patches')} patches, wheel sha256 "
              f"{done.get('wheel_sha256', '?')[:12]}..., {settings}); nothing to do")
        return 0
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        old = f"{done.get('settings')}, wheel sha256 {str(done.get('wheel_sha256'))[:12]}..." if done else None
        now = f"{settings}, wheel sha256 {(digest or '?')[:12]}..."
        why = f"was made with {old} (now: {now})" if done else "is not a finished set"
        raise PrepareError(f"--out {out} is not empty and {why}; pass --overwrite to replace it, or choose "
                           f"another --out")

    if wheel is None:
        wheel = download_wheel(cache)
        digest = sha256(wheel)
    print(f"wheel {wheel} (sha256 {digest[:12]}...)")
    image, geotags, mask, bands = read_members(wheel)
    inst = instance_ids(bands)
    h, w = image.shape
    size = args.patch_size
    rows, cols = h // size, w // size
    if rows == 0 or cols == 0:
        raise PrepareError(f"--patch-size {size} is larger than the {w}x{h} image")
    if max(val_columns) >= cols:
        raise PrepareError(f"--val-columns {args.val_columns}: the grid has columns 0..{cols - 1} "
                           f"({w}x{h} image, --patch-size {size})")
    if len(val_columns) == cols:
        raise PrepareError(f"--val-columns {args.val_columns} holds out every column; nothing is left to train")
    if (h % size) or (w % size):
        print(f"note: {w}x{h} is not a multiple of {size}: the last {w % size} columns and {h % size} rows of "
              f"pixels are cropped")
    if not geotags:
        print(f"note: {IMAGE_MEMBER} carries no GeoTIFF tags; the patches are not georeferenced")

    # write: the marker goes first (an interrupted run is never taken for a finished one) and comes back last
    (out / ".done").unlink(missing_ok=True)
    for sub in ("images", "labels", "instances"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    windows = {}
    for r in range(rows):
        for c in range(cols):
            i, r0, c0 = patch_id(r, c), r * size, c * size
            windows[i] = (r0, c0, size)
            tags = shifted_geotags(geotags, r0, c0)
            write_tiff(out / "images" / f"{i}.tif", image[r0:r0 + size, c0:c0 + size], tags)
            write_tiff(out / "labels" / f"{i}.tif", mask[r0:r0 + size, c0:c0 + size], tags)
            write_tiff(out / "instances" / f"{i}.tif", inst[r0:r0 + size, c0:c0 + size], tags)
    stale = [p for sub in ("images", "labels", "instances") for p in (out / sub).glob("*.tif")
             if p.stem not in windows]
    for p in stale:  # patches of an earlier run with another --patch-size (only with --overwrite)
        p.unlink()
    if stale:
        print(f"removed {len(stale)} patch files of an earlier run that this grid does not have")

    ids = list(windows)
    held_out = {i for i, (_, c0, _) in windows.items() if c0 // size in val_columns}
    split = {"train": [i for i in ids if i not in held_out], "val": [i for i in ids if i in held_out],
             "val_columns": val_columns,
             "grid": [rows, cols], "patch_size": size,
             "source": f"{SOURCE}; wheel sha256 {digest}"}
    write_json(out / "classes.json", CLASSES)
    write_json(out / "split.json", split)
    n_buildings, n_background = write_clicks_layer(out)

    print(f"{len(ids)} patches of {size}x{size} ({rows} rows x {cols} columns) -> {out}; "
          f"{bands.shape[2]} buildings in the image")
    stats = {}
    for part in ("train", "val"):
        n, share, buildings = split_stats(split[part], windows, mask, inst)
        stats[part] = {"patches": n, "building_share": round(share, 5), "buildings": buildings}
        print(f"  {part:5s} {n:3d} patches, building pixels {share:.2%}, {buildings} buildings touch it")
    print(f"clicks: {out / 'clicks.gpkg'}: {n_buildings} building clicks (one inside each) and {n_background} "
          f"background clicks, spread out, in the image's CRS")
    write_json(out / ".done", {"wheel_sha256": digest, "settings": settings, "patches": len(ids),
                               "stats": stats})
    return 0


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    p = argparse.ArgumentParser(description="Build a small real labelled set (SpaceNet Atlanta buildings, "
                                            "0.5 m) from the solaris 0.4.0 wheel.")
    p.add_argument("--out", default="realdata/atlanta", help="folder to write (default: realdata/atlanta)")
    p.add_argument("--wheel", default=None, help=f"a downloaded {WHEEL_NAME} (default: --cache, else download)")
    p.add_argument("--cache", default="realdata/cache",
                   help="where the wheel is looked for and downloaded to (default: realdata/cache)")
    p.add_argument("--patch-size", type=int, default=150,
                   help="patch side in pixels; the grid is image size // patch size (default: 150 -> 6x6)")
    p.add_argument("--val-columns", default="4,5",
                   help="patch columns held out for validation, comma-separated (default: 4,5)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that is not this set")
    return p


def main(args):
    """Returns the exit code: 0, or 2 with `error: ...` on stderr."""
    try:
        return prepare(args)
    except (PrepareError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
