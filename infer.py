"""Segment every image in a folder: any size, at the training resolution, in blended tiles, optional TTA.

    python infer.py --checkpoint checkpoints/best_model.pth --input input_images --output output_images

For each input `<stem>.<ext>` it writes `<stem>_<ext>_mask.png` (a palette PNG: viewers show the checkpoint's
class colours, the pixel values are the class indices), with `--index` also `<stem>_<ext>_mask.index.png`
(grayscale, value = class index), with `--overlay` `<stem>_<ext>_mask.overlay.jpg` (image and colours blended),
and for a georeferenced TIFF `<stem>_<ext>_mask.tif` with the same GeoTIFF tags, so a GIS lays it on the input.
The name comes from the input's name alone (a.png -> a_png_mask.png, a_png.png -> a_png_png_mask.png), so two
inputs never share it and adding or removing files never renames a mask; only names that differ in case alone
(x.png, x.PNG) get _2, _3 in sorted order. Every mask has exactly the input's height and width and records the
input's file name (`Source`, a PNG text chunk / the TIFF's ImageDescription). Files named `*_mask.*` are this
tool's outputs and never taken as inputs; they, folders, broken links and other files that are no image are
listed as skipped. Nothing is written over an input, also with --output equal to --input. A rerun replaces the
masks of the same inputs; --skip-existing skips an input only when every output asked of it exists and its
colour mask (written last) says it was made from that input (one made from another file is reported, not
replaced). Nodata pixels get no class (255, black). All arguments and the output folder are checked before any
work. Ctrl-C stops with one line, how many images were written, and exit code 130.

Maps a GIS takes (docs/maps.md): `--vector gpkg|geojson` writes `<output>/polygons.gpkg` (.geojson), one layer of
the class polygons of every image of the folder with a CRS (vector.write_folder_layer: fields class_index, class,
area, images), polygons of one class merged where they touch across the seam of adjacent images; it is built at the
end of the run from `<stem>_<ext>_polygons.gpkg`, each image's polygons in its raster's CRS (pixel coordinates and
no CRS for an image without one, which stays out of the layer; logged). Inputs in several CRSs are refused before
any work. Unsimplified they rasterise back to the mask exactly, `--min-area` drops small ones, `--simplify` smooths
them (map units), the background class gets none unless `--background` says so (vector.background_classes).
`--vector` or `--areas` write the class pixel counts (pixels; m^2 and ha for a CRS in metres) of every image into
`<output>/areas.csv`, with TOTAL rows, and `areas.md` beside it: these are the map's pixels, not area estimates,
which come from an assessment (assess.py). Rows of images not in this run stay, and so do their polygons. Both are
made from the bands of rows the masks are written from, as they are written (`vector._Maps`; vector.py makes all
of these outputs); under --skip-existing an input is done only when its polygons file and its areas.csv rows exist
too.

An input that does not fit the model, 16-bit data under a model trained on 8-bit images, is segmented with a
warning that names the choices (--bit-depth, or training on such files): logged, repeated after the run's summary
and written into its masks' metadata (`Warning`). A whole image over --max-pixels (default raster.MAX_PIXELS,
180 MP) is refused before it is decoded, and so is a header that claims more pixels than the file can hold
(decompression bombs); TIFFs read by windows (below) are not bounded.

How an image is predicted (`predict.predict_image`: resized by the checkpoint's scale, cut into overlapping tiles
of `--tile` with `--overlap`, blended, `--tta`, upsampled back to the input size) is predict.py's. What a file
becomes before the model (bands, intensity, scale) is the checkpoint's contract: spec.py, the same functions
training uses.

A TIFF over STREAM_PIXELS (64 MP) is streamed (`predict.StreamedInput`, `predict.predict_streamed`): read in
windows of rows, predicted, and its masks written band of rows by band of rows, so memory does not grow with the
image; its overlay is skipped. Its polygons and areas come from the same bands: held are a block of
vector.VECTOR_ROWS (1024) mask rows and the per-class counts, but also every polygon found until the file is
written, so memory grows with the number of polygon vertices (how fragmented the prediction is), not with the
pixels; a class region that spans the image is one polygon, held whole (vector.py).

A folder is pipelined (`segment_files`): a reader thread reads and decodes the next files, the model runs in the
main thread, a writer thread encodes and writes the masks of the last ones, with at most PIPELINE_DEPTH (2)
files waiting between them, so the model does not wait for files to move. The masks are the serial run's byte
for byte; `--no-pipeline` runs file after file. A streamed TIFF is predicted and written in the main thread.
"""

import argparse
import contextlib
import dataclasses
import fnmatch
import math
import os
import queue
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tifffile
import torch
from tqdm import tqdm

import distributed
from checkpoint import load_model
from predict import TTA_MODES, StreamedInput, _grid, _predict_indices, display_rgb, overlay, predict_streamed
from raster import (GDAL_NODATA, GEOTIFF_TAGS, IMAGE_SUFFIXES, MAX_PIXELS, TIFF_SUFFIXES, RasterError,
                    clean_stale_temporaries, is_image_file, open_image, png_rows, png_text, readable_by_rows,
                    tiles_of_rows, write_index_tiff, write_jpeg)
from config import Shared, TrainConfig, add_arguments, check_settings, from_args, optional, reuse, setting, whole
from spec import IGNORE_INDEX, load_input
from vector import (AREAS_NAME, FOLDER_LAYER, _Maps, _place, area_line, background_classes, check_area_table,
                    layer_crs, one_crs, polygon_files, read_area_table, update_area_table, update_polygon_layer)

OUTPUT_PATTERN = "*_mask.*"  # the files this tool writes: never inputs
VECTOR_FORMATS = ("gpkg", "geojson")  # --vector: <stem>_polygons.<format>
POLYGON_NAMES = tuple(f"_polygons.{f}" for f in VECTOR_FORMATS)
STREAM_PIXELS = 64_000_000  # TIFFs above this many pixels (8000 x 8000) are streamed, if they can be read by rows

# --------------------------------------------------------------------------- the run's options

@dataclass(frozen=True)
class InferOptions:
    """One run's options, one field per command-line flag of the same name (`--batch-size` -> batch_size), each
    declared here or, where train.py takes the flag too, as train's (config.reuse: one help, one parser, one
    check). main builds it once from the command line and hands it down; every file of the run is read (scale ..
    max_pixels), predicted (tile .. device), written (index .. areas) and skipped or not (skip_existing) under it;
    pipeline and progress say how the run goes. The input, the output and the checkpoint are InferSettings'."""

    scale: Optional[float] = reuse(TrainConfig, "scale")  # None: the checkpoint's (run_spec)
    bands: Optional[tuple[int, ...]] = reuse(TrainConfig, "bands")  # None: the checkpoint's
    bit_depth: Optional[int] = setting(
        None, "for a model trained on 8-bit images (intensity uint8) fed wider ones: their bit depth b, scaled from "
              "[0, 2^b-1] to [0, 255] (default: per image, the smallest of 8..16 bits that holds its largest value). "
              "A model trained on wider data scales every image by the range stored in its checkpoint and refuses "
              "--bit-depth", "reading", check=optional(lambda v: whole(8)(v) and v <= 32), must="be in 8..32")
    max_pixels: int = setting(MAX_PIXELS, "largest image, in pixels, decoded whole; a larger one is refused as a "
                                          "possible decompression bomb (TIFFs read by windows of rows are not "
                                          "bounded). 0: no limit", "reading", check=whole(0),
                              must="be >= 0 (0: no limit)")
    tile: int = setting(512, "tile side in model-input (rescaled) pixels; memory grows with batch size x tile^2",
                        "prediction", check=whole(32), must="be >= 32 model pixels")
    overlap: int = setting(64, "minimum tile overlap in model-input pixels; class probabilities are blended across "
                               "it", "prediction", check=whole(0), must="be >= 0")
    batch_size: int = reuse(TrainConfig, "batch_size", 4)
    tta: str = setting("none", "test-time augmentation averaged in probability space: 'flip' (4 flips, 4x the time) "
                               "or 'd4' (flips and 90-degree rotations, 8x); --tta alone means d4", "prediction",
                       choices=tuple(TTA_MODES), nargs="?", const="d4")
    device: Optional[str] = reuse(TrainConfig, "device", None)  # None: where the model's parameters are
    index: bool = setting(False, "also write <name>_mask.index.png (class indices)", "outputs")
    overlay: bool = setting(False, "also write <name>_mask.overlay.jpg (a preview)", "outputs")
    vector: Optional[str] = setting(
        None, f"also write the class polygons: <output>/{FOLDER_LAYER}.gpkg (or .geojson), one layer of every image "
              "with a CRS, polygons of one class merged across the seams of adjacent images (fields class_index, "
              "class, area, images), built from <name>_polygons.gpkg per image (in the raster's CRS; pixel "
              f"coordinates for an image without one); and the class pixel counts into <output>/{AREAS_NAME}. All "
              "georeferenced inputs must share one CRS", "outputs", choices=VECTOR_FORMATS)
    background: str = setting("auto", "with --vector: the class that gets no polygons: auto (the class named "
                                      "background, if any; the Potsdam classes have none), a class name, or none "
                                      "(every class gets polygons). The areas count every class", "outputs")
    min_area: float = setting(0.0, "with --vector: drop polygons smaller than this, in square map units (m^2 for a "
                                   "metric CRS; pixels when not georeferenced); their pixels become holes", "outputs",
                              check=lambda v: math.isfinite(v) and v >= 0, must="be a finite number >= 0 (map units)")
    simplify: float = setting(0.0, "with --vector: simplify the polygons with this tolerance in map units (pixels "
                                   "when not georeferenced), shared edges moved together; 0: they follow the pixel "
                                   "edges and rasterise back to the mask exactly", "outputs",
                              check=lambda v: math.isfinite(v) and v >= 0, must="be a finite number >= 0 (map units)")
    areas: bool = setting(False, f"write the class areas into <output>/{AREAS_NAME} (pixels; m^2 and ha for a CRS in "
                                 "metres) without the polygons; --vector writes them too. Rows of other images stay",
                          "outputs")
    skip_existing: bool = setting(False, "skip inputs whose asked outputs all exist, their <stem>_<ext>_mask.png made "
                                         "from them (continue an interrupted folder run); by default a rerun "
                                         "replaces the masks of the same inputs", "run")
    pipeline: bool = setting(True, "--no-pipeline: read, predict and write one file after the other; by default a "
                                   "reader and a writer thread overlap the next file's reading and the last one's "
                                   "writing with the model (the same masks, byte for byte)", "run")
    progress: bool = reuse(TrainConfig, "progress")

    @classmethod
    def of(cls, settings):
        """The options part of a run's InferSettings."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class InferSettings(InferOptions):
    """The command line of infer.py: the options, the model, what to segment and where the masks go."""

    device: str = reuse(TrainConfig, "device")
    checkpoint: str = reuse(Shared, "checkpoint", "checkpoints/best_model.pth")
    input: str = setting("input_images", "folder of images (PNG, JPEG, TIFF) or one image file; files named "
                                         "*_mask.* are this tool's outputs and ignored", "run")
    output: str = setting("output_images", "folder for the masks, created if needed; may equal --input", "run")


# --------------------------------------------------------------------------- files and folders

@dataclass
class Summary:
    done: int = 0
    skipped: list = field(default_factory=list)  # (path, why): not images
    failed: list = field(default_factory=list)  # (path, message): bad images
    written: list = field(default_factory=list)
    seconds: float = 0.0
    warnings: list = field(default_factory=list)  # (path, message): done, but the input does not fit the model
    areas: dict = field(default_factory=dict)  # {input file name: vector.class_areas rows} of the images done

    def line(self):
        warned = f", {len(self.warnings)} with warnings" if self.warnings else ""
        polygons = sum(Path(p).name.endswith(POLYGON_NAMES) for p in self.written)
        polygons = f", {polygons} polygons files written" if polygons else ""
        return (f"{self.done} images done, {len(self.skipped)} skipped, {len(self.failed)} failed{warned}{polygons} "
                f"in {self.seconds:.1f} s")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during segment_files, with what was done until then: `summary`, `total` files asked."""

    def __init__(self, summary, total):
        super().__init__()
        self.summary, self.total = summary, total


def _not_a_file(path):
    """Why a folder entry that is no file (a folder, a broken link, a link loop, a device) is not read."""
    if path.is_symlink():
        try:
            path.stat()
        except FileNotFoundError:
            return f"a link to {os.readlink(path)}, which does not exist"
        except OSError as e:
            return f"a link that cannot be followed ({e.strerror or e}: a loop?)"
    if path.is_dir():
        return "a folder: subfolders are not searched; pass it as --input to segment its images"
    return "not a regular file"


def list_inputs(input):
    """(images, skipped) of an input folder (or one file). Hidden entries are ignored; this tool's outputs
    (`*_mask.*`), files that are not images and entries that are no file (folders, broken links, link loops)
    are skipped with the reason. A missing or image-less input is an error."""
    input = Path(input)
    others = []
    if input.is_file():
        files = [input]
    elif input.is_dir():
        entries = sorted(p for p in input.iterdir() if not p.name.startswith("."))
        files = [p for p in entries if p.is_file()]
        others = [(p, _not_a_file(p)) for p in entries if not p.is_file()]
    else:
        raise FileNotFoundError(f"input {input} not found: pass --input FOLDER (or one image file)")
    outputs = [p for p in files if fnmatch.fnmatch(p.name.lower(), OUTPUT_PATTERN)]
    files = [p for p in files if p not in outputs]
    images = [p for p in files if is_image_file(p)]
    skipped = [(p, f"not an image ({'/'.join(IMAGE_SUFFIXES)})") for p in files if not is_image_file(p)]
    skipped += [(p, f"named like this tool's outputs ({OUTPUT_PATTERN}); rename it to segment it")
                for p in outputs if is_image_file(p)]
    skipped = sorted(skipped + others)
    if not images:
        raise FileNotFoundError(f"no images in {input} (looked for {', '.join(IMAGE_SUFFIXES)}"
                                f"{f'; {len(skipped)} other files' if skipped else ''})")
    return images, skipped


def output_stems(images):
    """The output name stem of each input, from its name alone: `<stem>_<suffix>` (a.png -> a_png, a.tif ->
    a_tif, a_png.png -> a_png_png), distinct for distinct names and the same whichever other files are there.
    Only names that differ in case alone (x.png, x.PNG) would share a mask on a case-insensitive disk (macOS,
    Windows): the later of them in sorted order gets _2, _3, ..."""
    taken, stems = set(), {}
    for p in sorted(images, key=lambda q: q.name):
        base = f"{p.stem}_{p.suffix[1:]}"
        stem, k = base, 1
        while stem.casefold() in taken:
            k += 1
            stem = f"{base}_{k}"
        taken.add(stem.casefold())
        stems[p] = stem
    return stems


def check_layer_crs(images, output, vector):
    """--vector, before any work: the georeferenced inputs and the per-image polygons of other images already in
    `output` are in one CRS, as the folder layer holds one (vector.one_crs: a ValueError naming them). A file
    that cannot be read is left to fail where it is read."""
    def crs(path, read):
        try:
            return read(path)
        except Exception:  # reported, by name, where the file is read
            return None
    mine = {polygons_path(output, stem, vector) for stem in output_stems(images).values()}
    one_crs([(p.name, crs(p, lambda q: open_image(q).crs)) for p in images if p.suffix.lower() in TIFF_SUFFIXES] +
            [(p.name, crs(p, layer_crs)) for p in polygon_files(output, vector) if p not in mine])


def finish_layer(output, vector, summary, log):
    """update_polygon_layer at the end of a run; a layer that cannot be written fails the run (summary.failed)."""
    try:
        update_polygon_layer(output, vector, log)
    except (ValueError, OSError, RuntimeError) as e:  # pyogrio's errors are RuntimeErrors
        _fail(summary, Path(output) / f"{FOLDER_LAYER}.{vector}", RasterError(str(e)), log)


def run_spec(ckpt, scale=None, bands=None):
    """The checkpoint's preprocessing contract, with the user's --scale / --bands if given."""
    spec = ckpt.spec
    if scale is not None:
        spec = dataclasses.replace(spec, scale=float(scale))
    if bands is not None:
        spec = dataclasses.replace(spec, bands=tuple(int(b) for b in bands))
    return spec


def mask_path(output, stem):
    """The colour mask of an input: written last, so its presence means every output of that input is done."""
    return Path(output) / f"{stem}_mask.png"


def polygons_path(output, stem, vector):
    """The class polygons of an input, `vector` a VECTOR_FORMATS entry: <stem>_polygons.gpkg / .geojson."""
    return Path(output) / f"{stem}_polygons.{vector}"


def output_paths(output, stem, *, index=False, overlay=False, tiff=False, vector=None):
    """The paths written for an input, the colour mask last: index PNG, overlay JPEG, GeoTIFF, polygons (as asked
    / for a georeferenced input), colour PNG."""
    output = Path(output)
    return [q for q, wanted in ((output / f"{stem}_mask.index.png", index),
                                (output / f"{stem}_mask.overlay.jpg", overlay),
                                (output / f"{stem}_mask.tif", tiff),
                                (vector and polygons_path(output, stem, vector), vector)) if wanted] + \
        [mask_path(output, stem)]


def streams(path):
    """Whether segment_file streams this file: a TIFF above STREAM_PIXELS that raster.readable_by_rows reads."""
    layout = readable_by_rows(path)
    return layout is not None and layout[0] * layout[1] > STREAM_PIXELS


def _is_georeferenced(path):
    """Whether a TIFF carries GeoTIFF tags (its mask TIFF is written); reads the header only."""
    if Path(path).suffix.lower() not in TIFF_SUFFIXES:
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return any(code in tif.pages.first.tags for code in GEOTIFF_TAGS)
    except Exception:  # reading it says why
        return False


def _through(bands, pngs):
    """Write each band of mask rows (y0, y1, rows) to the PNG writers and pass the rows on (to the TIFF's tiles)."""
    for _, _, rows in bands:
        for png in pngs:
            png.write(rows)
        yield rows


@dataclass
class _Job:
    """One input file read under the contract, what is written for it, and where: segment_file's first step.
    `grid` is the model input on the processing grid; a streamed file has `source` (a StreamedInput) instead."""
    path: Path
    output: Path
    stem: str
    spec: object
    size: tuple  # (H, W) of the input and its masks
    raster: object  # the input's tags
    masked: bool  # whether there is nodata to mark (and to tag in the mask TIFF)
    written: list  # the paths written, the colour mask last
    index_path: Path = None
    overlay_path: Path = None
    tiff_path: Path = None
    grid: np.ndarray = None
    image: np.ndarray = None  # the input image, kept for the overlay only
    valid: np.ndarray = None
    source: object = None
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # the input does not fit the model: also in the masks' metadata
    polygons_path: Path = None  # --vector
    areas: bool = False  # --vector / --areas: class_areas rows into `area_rows` as the masks are written
    transform: object = None  # pixel -> map coordinates of the polygons and areas; None: pixel coordinates
    crs: object = None
    min_area: float = 0.0
    simplify: float = 0.0
    background: str = "auto"  # --background: which class gets no polygons (vector.background_classes)
    area_rows: list = None


def _read_file(path, output, spec, options, *, stem=None, protect=()):
    """Read and check one input (step 1 of segment_file) under the run's `spec` (run_spec) and `options` (an
    InferOptions): a _Job. Raises RasterError for a bad file. options.vector (a VECTOR_FORMATS entry) asks for its
    polygons, options.areas for its class areas (vector.class_areas rows)."""
    bit_depth, overlay_preview, vector, areas = options.bit_depth, options.overlay, options.vector, options.areas
    path, output = Path(path), Path(output)
    stem = stem or output_stems([path])[path]
    notes, grid, image, valid, source = [], None, None, None, None
    if streams(path):
        source = StreamedInput(path, spec, bit_depth)
        (H, W), raster, masked, warnings = source.size, source.raster, source.masked, source.warnings
        if overlay_preview:
            notes.append(f"no overlay for a streamed image (over {STREAM_PIXELS / 1e6:g} MP): it would hold the "
                         f"whole image")
    else:
        inp = load_input(path, spec, bit_depth=bit_depth, max_pixels=options.max_pixels)
        notes += inp.notes
        (H, W), raster, masked, valid, warnings = (inp.image.shape[:2], inp.raster, inp.valid is not None, inp.valid,
                                                   inp.warnings)
        grid = _grid(inp.image, spec.scale)
        image = inp.image if overlay_preview else None
    written = output_paths(output, stem, index=options.index, overlay=overlay_preview and source is None,
                           tiff=raster.is_georeferenced, vector=vector)  # the colour mask last
    transform = crs = None
    if vector or areas:
        transform, crs, note = _place(path, raster)
        if crs is None and vector == "geojson":
            note += ("; GeoJSON readers take coordinates without a CRS as WGS84 degrees: use --vector gpkg to keep "
                     "them apart")
        notes += [note] if note else []
    index_path, overlay_path, tiff_path = (next((q for q in written if q.name.endswith(end)), None)
                                           for end in ("_mask.index.png", "_mask.overlay.jpg", "_mask.tif"))
    protected = {Path(p).resolve() for p in protect} | {path.resolve()}
    for target in written:
        if target.resolve() in protected:
            raise RasterError(f"{path}: refusing to write {target}, it is an input")
    output.mkdir(parents=True, exist_ok=True)
    return _Job(path, output, stem, spec, (H, W), raster, masked, written, index_path, overlay_path, tiff_path,
                grid, image, valid, source, notes, list(warnings),
                polygons_path=vector and polygons_path(output, stem, vector), areas=bool(vector or areas),
                transform=transform, crs=crs, min_area=options.min_area, simplify=options.simplify,
                background=options.background)


def _predict_file(model, job, options):
    """The class mask (H, W) uint8 of a job read whole, nodata IGNORE_INDEX (step 2 of segment_file)."""
    pred = _predict_indices(model, job.grid, job.size, options.tile, options.overlap, options.batch_size, options.tta,
                            options.device, options.progress, job.path.name)
    if job.valid is not None:
        pred[~job.valid] = IGNORE_INDEX
    return pred


def mask_text(job):
    """The masks' metadata (PNG iTXt, TIFF ImageDescription): `Source`, the input's file name (--skip-existing
    checks that a mask is that input's), and a `Warning` when the input does not fit the model."""
    text = {"Source": job.path.name}
    if job.warnings:
        text["Warning"] = " ".join(job.warnings)
    return text


def _write_masks(job, bands, pred=None):
    """Write the masks of `job` from `bands` of rows (y0, y1, rows) top to bottom (step 3 of segment_file), each
    atomically, the colour mask last; `pred`, the whole mask, for the overlay. The polygons and class areas, when
    asked, are made from the same bands (vector._Maps): the polygons file is written before the colour mask, the area
    rows go to job.area_rows. Returns the paths written."""
    H, W = job.size
    palette = job.spec.classes.palette
    text = mask_text(job)
    with contextlib.ExitStack() as stack:  # every mask written as its rows come; the colour mask appears last
        pngs = [stack.enter_context(png_rows(mask_path(job.output, job.stem), H, W, palette, text=text))]
        if job.index_path:
            pngs.append(stack.enter_context(png_rows(job.index_path, H, W, text=text)))
        maps = stack.enter_context(_Maps(job)) if job.polygons_path or job.areas else None
        rows = _through(maps.feed(bands) if maps else bands, pngs)
        if job.tiff_path:
            tags = dict(job.raster.geotags)
            if job.masked:
                tags[GDAL_NODATA] = (2, len(str(IGNORE_INDEX)) + 1, str(IGNORE_INDEX))  # ASCII, as GDAL writes it
            write_index_tiff(job.tiff_path, tiles_of_rows(rows, W), palette, tags, shape=(H, W), text=text)
        else:
            for _ in rows:
                pass
        if maps:
            maps.finish()
        if job.overlay_path:
            write_jpeg(job.overlay_path, overlay(display_rgb(job.image), pred, palette))
    return job.written


def _segment_streamed(model, job, options, log):
    """Predict and write a streamed job band of rows by band of rows; its notes once every row is read."""
    bands = predict_streamed(model, job.source, tile=options.tile, overlap=options.overlap,
                             batch_size=options.batch_size, tta=options.tta, device=options.device,
                             progress=options.progress, desc=job.path.name)
    written = _write_masks(job, bands)
    for note in job.source.notes:
        log(f"{job.path}: {note}")
    return written


def segment_file(path, output, model, ckpt, options=None, *, stem=None, protect=(), log=print):
    """Segment one file into `output` under `options` (an InferOptions; default: the CLI's defaults). Returns the
    paths written. Raises RasterError for a bad file. options.scale/bands default to the checkpoint's (run_spec);
    `protect` lists paths never to write (the inputs).
    Nodata pixels (GeoTIFF GDAL_NODATA, NaN) get no class: IGNORE_INDEX (black in the colour mask).
    A TIFF over STREAM_PIXELS is streamed: read, predicted and written band of rows by band of rows.
    Three steps, read (_read_file), predict (_predict_file), write (_write_masks): segment_files runs them
    in series with this function, or overlapped in threads."""
    options = options or InferOptions()
    job = _read_file(path, output, run_spec(ckpt, options.scale, options.bands), options, stem=stem, protect=protect)
    _report(job, None, log)
    if job.source is not None:
        return _segment_streamed(model, job, options, log)
    pred = _predict_file(model, job, options)
    return _write_masks(job, [(0, job.size[0], pred)], pred)


# --------------------------------------------------------------------------- folders

PIPELINE_DEPTH = 2  # files waiting between the reader and the model, and between the model and the writer
_END = object()  # a queue's last item


def _fail(summary, path, error, log):
    """Record a bad file (RasterError, OSError) in the summary; anything else is a bug: raised."""
    if not isinstance(error, (RasterError, OSError)):
        raise error
    msg = str(error) if str(path) in str(error) else f"{path}: {error}"
    log(f"FAILED {msg}")
    summary.failed.append((path, msg))


def _report(job, summary, log):
    """Log a job's notes and warnings; the warnings go into the summary too (None: log only)."""
    for note in job.notes:
        log(f"{job.path}: {note}")
    for warning in job.warnings:
        log(f"WARNING {job.path}: {warning}")
        if summary is not None:
            summary.warnings.append((job.path, warning))


def _existing(path, output, stem, options, tabled=None):
    """Why an input is skipped under options.skip_existing, or None (segment it): skipped when every output asked
    of it exists (a rerun that adds --index, --overlay or --vector writes them; `tabled`, the input file names
    with rows in areas.csv when areas are asked, else None) and its colour mask, written last, records that it
    was made from a file of this name. A colour mask made from another file is a RasterError: it is neither
    taken as this input's nor replaced."""
    colour = mask_path(output, stem)
    if not options.skip_existing or not colour.is_file():
        return None
    source = png_text(colour).get("Source")
    if source != Path(path).name:
        made = f"it was made from {source}" if source else "it does not say which input it was made from"
        raise RasterError(f"{path}: {colour} exists but {made}; move it away, or run without --skip-existing "
                          f"to replace it")
    wanted = output_paths(output, stem, index=options.index, overlay=options.overlay and not streams(path),
                          tiff=_is_georeferenced(path), vector=options.vector)
    if not all(q.is_file() for q in wanted) or (tabled is not None and Path(path).name not in tabled):
        return None
    names = [q.name for q in wanted] + ([f"its {AREAS_NAME} rows"] if tabled is not None else [])
    return f"{', '.join(names)} exist{'s' if len(names) == 1 else ''} (--skip-existing)"


def _put(q, item, stop):
    """Put `item` on the bounded queue `q`, waiting while it is full; False, not put, once `stop` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False


def _get(q, stop):
    """The next item of `q`, waiting while it is empty; _END once `stop` is set and nothing is left."""
    while True:
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            if stop.is_set():
                return _END


def _reader(files, read, jobs, stop):
    """Thread: (path, _Job or why it is skipped, None) or (path, None, the exception) per file onto `jobs`,
    then _END. Every exception goes to the main thread, which reports a bad file or raises a bug."""
    for p in files:
        try:
            item = (p, read(p), None)
        except BaseException as e:  # handed to the main thread: it reports a bad file, raises a bug
            item = (p, None, e)
        if not _put(jobs, item, stop):
            return
    _put(jobs, _END, stop)


def _writer(todo, results, stop):
    """Thread: write the masks of each (job, pred) of `todo` until _END; (path, written, exception) onto
    `results`. An exception other than a bad file's (RasterError, OSError) stops the pipeline."""
    while True:
        item = todo.get()
        if item is _END or stop.is_set():
            return
        job, pred = item
        try:
            _write_masks(job, [(0, job.size[0], pred)], pred)
            results.put((job.path, job, None))
        except BaseException as e:  # handed to the main thread: it reports a bad file, raises a bug
            results.put((job.path, None, e))
            if not isinstance(e, (RasterError, OSError)):
                stop.set()
                return


def _done(summary, job):
    """Count a job whose outputs are written."""
    summary.written += job.written
    summary.done += 1
    if job.area_rows is not None:
        summary.areas[job.path.name] = job.area_rows


def _segment_serial(files, read, model, options, summary, log):
    """segment_file's steps file after file; `read(path)`: why it is skipped (a str), or its _Job. Yields once per
    file."""
    for p in files:
        try:
            job = read(p)
            if isinstance(job, str):
                summary.skipped.append((p, job))
            else:
                _report(job, summary, log)
                if job.source is not None:
                    _segment_streamed(model, job, options, log)
                else:
                    pred = _predict_file(model, job, options)
                    _write_masks(job, [(0, job.size[0], pred)], pred)
                _done(summary, job)
        except (RasterError, OSError) as e:
            _fail(summary, p, e, log)
        yield


def _segment_pipelined(files, read, model, options, summary, log):
    """segment_file's steps overlapped: a reader thread (`read`, as _segment_serial's) -> queue (PIPELINE_DEPTH) ->
    the model in this thread -> queue (PIPELINE_DEPTH) -> a writer thread. Yields once per file that left the
    model."""
    def collect():  # what the writer has finished
        while not results.empty():
            p, job, error = results.get()
            if error is not None:
                _fail(summary, p, error, log)
            else:
                _done(summary, job)

    jobs, todo, results = queue.Queue(PIPELINE_DEPTH), queue.Queue(PIPELINE_DEPTH), queue.SimpleQueue()
    stop = threading.Event()
    threads = [threading.Thread(target=_reader, args=(files, read, jobs, stop), name="infer-reader", daemon=True),
               threading.Thread(target=_writer, args=(todo, results, stop), name="infer-writer", daemon=True)]
    for t in threads:
        t.start()
    finished = False
    try:
        while (item := _get(jobs, stop)) is not _END:
            collect()
            p, job, error = item
            if error is not None:
                _fail(summary, p, error, log)
            elif isinstance(job, str):
                summary.skipped.append((p, job))
            else:
                _report(job, summary, log)
                try:
                    if job.source is not None:  # streamed: predicted and written band by band, here
                        _segment_streamed(model, job, options, log)
                        _done(summary, job)
                    else:
                        pred = _predict_file(model, job, options)
                        job.grid = job.valid = None  # what the writer does not need
                        if not _put(todo, (job, pred), stop):
                            break
                except (RasterError, OSError) as e:
                    _fail(summary, p, e, log)
            yield
        _put(todo, _END, stop)
        threads[1].join()
        finished = True
    finally:
        if not finished:  # an exception or Ctrl-C: drop the queued work, let both threads end
            stop.set()
            for q in (jobs, todo):
                with contextlib.suppress(queue.Empty):
                    while True:
                        q.get_nowait()
            todo.put_nowait(_END)
        for t in threads:
            t.join()
        if not finished:  # count what the writer finished before it stopped; the exception goes on
            while not results.empty():
                p, job, error = results.get()
                if error is None:
                    _done(summary, job)
                elif isinstance(error, (RasterError, OSError)):
                    _fail(summary, p, error, log)
    collect()


def segment_files(files, stems, output, model, ckpt, options=None, *, log=None, protect=None):
    """Segment the image files `files` into `output`, `stems[path]` naming each one's masks; go on past bad
    files. Returns a Summary (bad files in .failed, their order as in `files`). `protect` (default: `files`)
    lists paths never written; `options` as segment_folder's. Every file is read under one spec, the checkpoint's
    with options.scale/bands (run_spec), resolved here once.

    With options.pipeline (the default) reading and decoding, the model and writing the masks overlap: a reader
    thread reads file k+1.. while the model (in this thread) predicts file k and a writer thread encodes file
    k-1.., with at most PIPELINE_DEPTH files waiting in each of the two queues, so memory stays bounded. The
    masks are byte for byte the serial run's (the same three functions, only in threads). A TIFF over
    STREAM_PIXELS is read ahead like any file but predicted and written band by band in this thread, as in
    the serial run. On an exception the queued files are dropped and both threads end before it propagates;
    masks already written stay, and --skip-existing continues from them. Ctrl-C comes out as Interrupted, which
    holds the summary of what was done. options.pipeline False runs
    segment_file file after file (for comparison; `infer.py --no-pipeline`). With options.vector/areas the class
    areas of the images done are in summary.areas; the caller writes them (update_area_table)."""
    options = options or InferOptions()
    t0 = time.time()
    log = log or tqdm.write
    output = Path(output)
    summary = Summary()
    spec = run_spec(ckpt, options.scale, options.bands)
    protect = list(files) if protect is None else protect
    tabled = (set(read_area_table(output / AREAS_NAME)) if options.skip_existing and (options.vector or options.areas)
              else None)

    def read(p):  # segment_file's first step: why `p` is skipped (a str, --skip-existing), or its _Job
        return (_existing(p, output, stems[p], options, tabled)
                or _read_file(p, output, spec, options, stem=stems[p], protect=protect))

    steps = (_segment_pipelined if options.pipeline else _segment_serial)(files, read, model, options, summary, log)
    try:
        with contextlib.closing(steps):  # on an exception the pipeline's threads end here, not when it is collected
            for _ in tqdm(steps, total=len(files), desc="images", unit="image", disable=not options.progress):
                pass
    except KeyboardInterrupt:  # Ctrl-C: what was written until now stays, and the caller learns how much
        raise Interrupted(summary, len(files)) from None
    order = {p: i for i, p in enumerate(files)}
    summary.failed.sort(key=lambda f: order[f[0]])
    summary.seconds = time.time() - t0
    return summary


def segment_folder(input, output, model, ckpt, options=None, *, log=None):
    """Segment every image of `input` (a folder or a file) into `output` under `options` (an InferOptions;
    default: the CLI's defaults); go on past bad files. Existing masks are replaced, unless options.skip_existing:
    then an input whose asked outputs all exist, its colour mask made from it, is skipped (an interrupted folder
    run continues where it stopped). options.pipeline: see segment_files. With options.vector or areas the class
    areas of the images done go into <output>/areas.csv (update_area_table), also when Ctrl-C stops the run; with
    options.vector the folder layer is written at the end (finish_layer; not after Ctrl-C). Returns a Summary (bad
    files in .failed, inputs that do not fit the model in .warnings)."""
    options = options or InferOptions()
    t0 = time.time()
    images, skipped = list_inputs(input)
    log = log or tqdm.write
    for p, why in skipped:
        log(f"skipped {p}: {why}")
    removed = clean_stale_temporaries(output)
    if removed:
        log(f"removed {len(removed)} temporary files that killed runs left in {output}")
    areas = options.vector or options.areas
    try:
        summary = segment_files(images, output_stems(images), output, model, ckpt, options, log=log)
    except Interrupted as e:
        if areas:
            update_area_table(output, e.summary.areas)
        raise
    if areas:
        update_area_table(output, summary.areas)
    if options.vector:
        finish_layer(output, options.vector, summary, log)
    summary.skipped = skipped + summary.skipped
    summary.seconds = time.time() - t0
    return summary


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    """The options are InferSettings' fields (declared once: train.py's where the flag is train's too)."""
    return add_arguments(argparse.ArgumentParser(
        description="Segment every image in a folder with a trained checkpoint. Masks have the input's size; "
                    "GeoTIFF inputs also get a georeferenced mask TIFF. Exit code 1 when some file failed."),
        InferSettings, grouped=False)


def check_args(args):
    """Every argument checked before any work (ValueError naming the flag): each setting's own check, then the
    rules between them. Returns the InferSettings (of a parsed command line, or given)."""
    args = args if isinstance(args, InferSettings) else from_args(InferSettings, args)
    check_settings(args)
    if args.overlap >= args.tile:
        raise ValueError(f"--overlap must be in [0, --tile), got {args.overlap} with --tile {args.tile}")
    for flag, value in (("--min-area", args.min_area), ("--simplify", args.simplify)):
        if value and not args.vector:
            raise ValueError(f"{flag} shapes the polygons of --vector; add --vector gpkg (or geojson)")
    if args.background != "auto" and not args.vector:
        raise ValueError("--background chooses the classes of the --vector polygons; add --vector gpkg (or geojson)")
    return args


def check_output(output):
    """The output folder exists (or is created) and takes files: checked before any image is predicted."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder; pass a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"--output {output} is not writable ({e.strerror or e}); choose another folder") from None


def main(args):
    """Returns the exit code: 0 all done, 1 some files failed, 2 nothing could start, 130 Ctrl-C (one line says
    how many images were written). Under torchrun each rank segments its share of the sorted images
    (distributed.shard; output names are given from the whole list, alike on every rank), the summaries are
    gathered, and every rank returns 1 when any rank failed a file."""
    try:
        return _main(args)
    except Interrupted as e:
        print(f"\ninterrupted: {e.summary.done} of {e.total} images written; rerun with --skip-existing to "
              f"continue", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted before any image was written", file=sys.stderr)
    distributed.cleanup()
    return 130


def _main(args):
    try:
        args = check_args(args)
        images, skipped = list_inputs(args.input)
        ctx = distributed.init_from_env(args.device)  # under torchrun: this rank and its device; else one process
        device = ctx.device
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu or auto")
        model, ckpt = load_model(args.checkpoint, device)
        spec = run_spec(ckpt, args.scale, args.bands)
        if args.bit_depth is not None and spec.intensity.kind != "uint8":
            raise ValueError(f"--bit-depth applies to models trained on 8-bit images; {args.checkpoint} scales every "
                             f"image by the intensity range stored in it ({spec.intensity.kind}): leave --bit-depth out")
        check_output(args.output)
        if args.vector or args.areas:
            check_area_table(Path(args.output) / AREAS_NAME, spec.classes.names)
        background = background_classes(spec.classes.names, args.background) if args.vector else ()
        if args.vector:
            check_layer_crs(images, args.output, args.vector)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.cleanup()
        return 2
    print(f"{len(images)} images from {args.input} -> {args.output}; model {ckpt.model_args}, "
          f"{spec.classes.num_classes} classes, scale {spec.scale:g}, intensity {spec.intensity.kind}, tile {args.tile}, "
          f"overlap {args.overlap}, TTA {args.tta}, on {device}"
          f"{f' ({ctx.world} processes, each its share of the images)' if ctx.world > 1 else ''}")
    if args.vector and background:
        print(f"polygons: the background class {spec.classes.names[background[0]]!r} gets none (--background none "
              f"writes it); areas count every class")
    options = dataclasses.replace(InferOptions.of(args), device=device, progress=args.progress and ctx.is_main)
    if ctx.world == 1:
        summary = segment_folder(args.input, args.output, model, ckpt, options)
    else:  # this rank's share of the files, named from the whole list: the names one process gives
        log = tqdm.write if ctx.is_main else (lambda m: print(m, file=sys.stderr))
        for p, why in skipped if ctx.is_main else ():
            log(f"skipped {p}: {why}")
        removed = clean_stale_temporaries(args.output) if ctx.is_main else []
        if removed:
            log(f"removed {len(removed)} temporary files that killed runs left in {args.output}")
        distributed.barrier()  # nobody writes before rank 0 has cleaned up
        summary = segment_files(distributed.shard(images, ctx.rank, ctx.world), output_stems(images), args.output,
                                model, ckpt, options, log=log, protect=images)
        if ctx.is_main:
            summary.skipped = list(skipped) + summary.skipped
        parts = distributed.gather_objects(summary)  # every rank learns whether any file failed
        summary = Summary(done=sum(s.done for s in parts), skipped=[x for s in parts for x in s.skipped],
                          failed=[x for s in parts for x in s.failed], written=[x for s in parts for x in s.written],
                          seconds=max(s.seconds for s in parts), warnings=[x for s in parts for x in s.warnings],
                          areas={k: v for s in parts for k, v in s.areas.items()})
        if ctx.is_main and (args.vector or args.areas):
            update_area_table(args.output, summary.areas)
        if ctx.is_main and args.vector:
            finish_layer(args.output, args.vector, summary, log)
    print(summary.line() + f" -> {args.output}")
    if ctx.is_main and (args.vector or args.areas):
        print(area_line(args.output, len(summary.areas)))
    for p, msg in summary.warnings if ctx.is_main else ():  # the run's last words: they may cost accuracy
        print(f"warning: {p}: {msg}", file=sys.stderr)
    for p, msg in summary.failed if ctx.is_main else ():  # gathered: every rank's failures, named
        print(f"failed: {msg}", file=sys.stderr)
    distributed.cleanup()
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
