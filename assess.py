"""How good is the map, and how much of each class is there? A sampled, blind accuracy and area assessment.

    python assess.py sample --images tiles/ --masks maps/ --clicks clicks.gpkg --n 200 --out assessment.gpkg
    # label the sample blind: python annotate.py --images tiles/ --assess assessment.gpkg (or the `reference`
    # field of assessment.gpkg in QGIS), then
    python assess.py estimate --images tiles/ --sample assessment.gpkg

A person's clicks are not a probability sample of the map (one click in each building, background clicks in open
ground): no score on held-out clicks can speak for the map. `sample` draws one from the map (stratified random by
map class, or simple random; assessment.py), never on nodata nor on a training click, and writes it as a point
layer (GeoPackage in the images' CRS, or CSV in pixels) with an empty `reference` field and nothing of the map:
labelling is blind. The map class of every point, the strata and their sizes are kept apart in
`<sample>.design.json`. `estimate` reads the labelled layer back with the click reader
(annotations.read_clicks, `reference` as the class field; points still unlabelled are left out and counted) and
writes `<sample>_estimates.csv` / `.md`: the error matrix in proportions of area, overall, user's and producer's
accuracy and the error-adjusted area of every class (pixels; m^2 and ha where the images are in metres), each with
its 95 % interval (Olofsson et al. 2014; Stehman 2014), beside the class shares the map itself shows.

The map is a folder of infer.py masks (`--masks`: `<name>_mask.png`, class index per pixel, 255 nodata; each names
its input in its `Source` text) or the prediction of `--checkpoint` over the images. Assessment points never train
a model: they live in their own files, which train.py never reads unless named as --clicks, and that is refused.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

import assessment
from annotations import read_clicks, write_points
from config import Shared, TrainConfig, add_arguments, check_settings, from_args, optional, reuse, setting, whole
from raster import image_refs, png_text
from spec import IGNORE_INDEX, POTSDAM, load_class_file
from vector import metres_per_unit

DESIGN_SUFFIX = ".design.json"  # beside the sample: the map classes and strata, never shown to the labeller
REFERENCE = "reference"  # the field the person fills in
FORMAT = "pointseg-assessment"


def design_path(sample):
    return Path(sample).with_suffix(DESIGN_SUFFIX)


def estimates_prefix(sample):
    return Path(sample).with_name(Path(sample).stem + "_estimates")


# --------------------------------------------------------------------------- the map

def masks_map(images, masks):
    """{image name: (class map (H, W) uint8, valid (H, W) bool)} from infer.py's masks in the folder `masks`,
    matched to `images` (ImageRefs) by the input name each mask records. An image without its mask is an error."""
    by_source = {}
    for p in sorted(Path(masks).glob("*_mask.png")):
        source = png_text(p).get("Source")
        if source:
            by_source[source] = p
    out, missing = {}, []
    for ref in images:
        p = by_source.get(ref.path.name)
        if p is None:
            missing.append(ref.path.name)
            continue
        m = np.asarray(Image.open(p))
        if m.shape != tuple(ref.shape):
            raise ValueError(f"{p}: a {m.shape[1]}x{m.shape[0]} mask for {ref.path} ({ref.shape[1]}x{ref.shape[0]});"
                             f" segment the images again with infer.py")
        out[ref.name] = (m, m != IGNORE_INDEX)
    if missing:
        raise FileNotFoundError(f"{masks} holds no infer.py mask of {len(missing)} images ({missing[:5]}); run "
                                f"python infer.py --input <images> --output {masks} first, or assess fewer images")
    return out


def predicted_map(images, checkpoint, device="cpu"):
    """{image name: (class map, valid)}: the prediction of a checkpoint over the images, as infer.py makes it."""
    from checkpoint import load_model
    from predict import predict_image
    from spec import load_input
    model, ck = load_model(checkpoint, device)
    out = {}
    for ref in images:
        inp = load_input(ref.path, ck.spec)
        m = predict_image(model, inp.image, ck.spec.scale)
        valid = np.ones(m.shape, bool) if inp.valid is None else inp.valid
        out[ref.name] = (np.where(valid, m, IGNORE_INDEX).astype(np.uint8), valid)
    return out, ck.spec.classes


def pixel_area_m2(images):
    """The area of one pixel in m^2 when every image is in a metric CRS with the same pixel size, else None."""
    areas = set()
    for ref in images:
        metres = metres_per_unit(ref.crs) if ref.georeferenced else None
        if metres is None:
            return None
        areas.add(round(abs(ref.transform.a * ref.transform.e - ref.transform.b * ref.transform.d) * metres ** 2, 9))
    return areas.pop() if len(areas) == 1 else None


# --------------------------------------------------------------------------- drawing the sample

def draw(images, mapped, classes, *, n=None, target_se=None, expected_ua=0.9, floor=50, design="stratified",
         seed=0, clicks=None):
    """The design of an assessment (a JSON-ready dict): a sample drawn from `mapped` ({name: (map, valid)}) by
    assessment.draw_sample, never on a training click (`clicks`: a ClickSet over the same images)."""
    names = [ref.name for ref in images]
    maps, valid = [mapped[k][0] for k in names], [mapped[k][1] for k in names]
    exclude = None
    if clicks is not None:
        exclude = [np.zeros(m.shape, bool) for m in maps]
        for i, k in enumerate(names):
            c = clicks.images.get(k)
            if c is not None and len(c):
                exclude[i][c.rows, c.cols] = True
    if design == "stratified":
        counts = assessment.map_counts(maps, valid, exclude)
        size = assessment.allocate(counts, n=n, target_se=target_se, expected_ua=expected_ua, floor=floor)
    else:
        if n is None:
            raise ValueError("--design simple needs --n (a target precision sets the size of a stratified sample)")
        size = n
    s = assessment.draw_sample(maps, valid, size, design=design, seed=seed, exclude=exclude)
    mapped_pixels = assessment.map_counts(maps, valid)
    return {"format": FORMAT, "version": 1, "design": design, "seed": seed, "classes": list(classes.names),
            "images": [{"name": ref.name, "file": ref.path.name, "height": ref.shape[0], "width": ref.shape[1]}
                       for ref in images],
            "stratum_sizes": {str(h): v for h, v in s.stratum_sizes.items()},
            "mapped_pixels": {str(c): v for c, v in mapped_pixels.items()},
            "excluded_clicks": int(sum(x.sum() for x in exclude)) if exclude else 0,
            "pixel_area_m2": pixel_area_m2(images), "notes": s.notes, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "points": [{"id": j + 1, "image": names[r["image"]], "row": r["row"], "col": r["col"],
                        "map_class": r["map_class"], "stratum": r["stratum"]} for j, r in enumerate(s.rows())]}


def write_sample(path, design, images, references=None):
    """The layer a person labels: one point per sample point, fields id, image, reference (empty until labelled;
    `references` {id: class name}), nothing of the map. GeoPackage/GeoJSON in the images' CRS, or CSV in pixels."""
    refs = {ref.name: ref for ref in images}
    points = design["points"]
    references = references or {}
    pieces, ids = [], []
    for name in dict.fromkeys(p["image"] for p in points):
        mine = [p for p in points if p["image"] == name]
        pieces.append((refs[name], np.array([p["row"] for p in mine]), np.array([p["col"] for p in mine])))
        ids += [p["id"] for p in mine]
    return write_points(path, pieces, {"id": np.array(ids, np.int32), REFERENCE: [references.get(i, "") for i in ids]})


# --------------------------------------------------------------------------- labels and estimates

@dataclass
class Assessment:
    """A drawn sample and its labels so far: `design` (draw's dict), `reference` {point id: class index}."""
    path: Path
    design: dict
    images: list
    classes: object
    reference: dict

    @classmethod
    def open(cls, sample, images, classes=None):
        """Read `<sample>.design.json` and the labels in the sample layer (read_clicks, `reference` field)."""
        sample = Path(sample)
        try:
            design = json.loads(design_path(sample).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{design_path(sample)} not found: it holds the design of {sample} (the map class "
                                    f"of every point); draw the sample with python assess.py sample") from None
        if design.get("format") != FORMAT:
            raise ValueError(f"{design_path(sample)} is not an assessment design written by assess.py")
        refs = image_refs(images)
        classes = classes or POTSDAM
        if list(classes.names) != design["classes"]:
            raise ValueError(f"{design_path(sample)} was drawn with the classes {design['classes']}, not "
                             f"{list(classes.names)}; pass the class file of the map (--classes)")
        by_name = {r.name: r for r in refs}
        lost = [im["file"] for im in design["images"] if im["name"] not in by_name]
        folders = {r.path.parent for r in refs}
        where = folders.pop() if len(folders) == 1 else f"the {len(refs)} images given"
        if lost:
            raise FileNotFoundError(f"{design_path(sample)}: {sample.name} was drawn over images that are not in "
                                    f"{where}: {lost[:5]}; give the images the sample was drawn from")
        resized = [f"{im['file']} ({im['width']} x {im['height']} when drawn, {by_name[im['name']].shape[1]} x "
                   f"{by_name[im['name']].shape[0]} now)" for im in design["images"]
                   if tuple(by_name[im["name"]].shape) != (im["height"], im["width"])]
        if resized:  # a point is a row and column of its image
            raise ValueError(f"{design_path(sample)}: {sample.name} was drawn over other images of the same names: "
                             f"{resized[:5]}; draw a new sample over these images")
        refs = [by_name[im["name"]] for im in design["images"]]
        return cls(sample, design, refs, classes, read_references(sample, design, refs, classes))

    def reload(self):
        """Read the labels in the layer again (labelled elsewhere meanwhile: another page, QGIS)."""
        self.reference = read_references(self.path, self.design, self.images, self.classes)

    def points(self):
        """The sample points, in labelling order, with their reference class index (None: not yet)."""
        return [{**p, REFERENCE: self.reference.get(p["id"])} for p in self.design["points"]]

    def set_reference(self, point_id, cls):
        """Label one point (class index, or None to clear it) and write the layer at once, atomically."""
        if point_id not in {p["id"] for p in self.design["points"]}:
            raise KeyError(f"no sample point {point_id} in {self.path}")
        if cls is None:
            self.reference.pop(point_id, None)
        else:
            self.reference[point_id] = int(cls)
        names = self.classes.names
        write_sample(self.path, self.design, self.images, {i: names[c] for i, c in self.reference.items()})

    def estimates(self, fpc=False):
        """assessment.Estimates over the labelled points (ValueError when a stratum has fewer than 2)."""
        pts = [p for p in self.design["points"] if p["id"] in self.reference]
        short = {h: sum(p["stratum"] == int(h) for p in pts) for h in self.design["stratum_sizes"]}
        short = {h: k for h, k in short.items() if k < 2}
        if short:
            names = self.design["classes"] if self.design["design"] == "stratified" else None
            shown = {(names[int(h)] if names else h): k for h, k in short.items()}
            raise ValueError(f"{self.path}: {len(pts)} of {len(self.design['points'])} points are labelled and the "
                             f"strata {shown} (stratum: labelled points) have fewer than 2: label more")
        sizes = {int(h): v for h, v in self.design["stratum_sizes"].items()}
        return assessment.stehman(np.array([p["stratum"] for p in pts]), np.array([p["map_class"] for p in pts]),
                                  np.array([self.reference[p["id"]] for p in pts]), sizes,
                                  classes=tuple(range(len(self.classes.names))), design=self.design["design"],
                                  fpc=fpc)

    def write(self, overwrite=False):
        """`<sample>_estimates.csv` / `.md`; returns their paths."""
        mapped = {int(c): v for c, v in self.design["mapped_pixels"].items()}
        return assessment.write_tables(self.estimates(), estimates_prefix(self.path), self.classes.names,
                                       self.design["pixel_area_m2"], overwrite=overwrite, mapped_pixels=mapped,
                                       labelled=(len(self.reference), len(self.design["points"])))


def estimates_json(result, design, names, labelled):
    """assessment.Estimates as JSON for the page. Each figure is {estimate, se, low, high}: the 95 % interval
    estimate ± 1.96 SE (assessment.Z95, as the written tables), null where undefined (a class never seen). Beside
    the estimated area of each class: its share of the map, a pixel count of the map (never an area estimate)."""
    def figure(est, se, unit=1.0):
        est, se = float(est) * unit, float(se) * unit
        if not math.isfinite(est):
            return {"estimate": None, "se": None, "low": None, "high": None}
        if not math.isfinite(se):
            return {"estimate": est, "se": None, "low": None, "high": None}
        return {"estimate": est, "se": se, "low": est - assessment.Z95 * se, "high": est + assessment.Z95 * se}

    m2 = design.get("pixel_area_m2")
    mapped = {int(c): int(v) for c, v in design["mapped_pixels"].items()}
    pixels, pixels_se = result.area_in()
    classes = [{"class": c, "name": names[c],
                "users_accuracy": figure(result.ua[j], result.ua_se[j]),
                "producers_accuracy": figure(result.pa[j], result.pa_se[j]),
                "area_proportion": figure(result.area[j], result.area_se[j]),
                "area_pixels": figure(pixels[j], pixels_se[j]),
                "area_ha": None if m2 is None else figure(pixels[j], pixels_se[j], m2 / 1e4),
                "map_pixels": mapped.get(c, 0), "map_share": mapped.get(c, 0) / max(1, sum(mapped.values()))}
               for j, c in enumerate(result.classes)]
    return {"basis": f"Design-based estimates from the blind assessment sample ({result.design} random sampling, "
                     f"{result.method} estimators, {labelled} of {len(design['points'])} points labelled): they "
                     f"measure the map; they are not scores on clicks",
            "design": result.design, "method": result.method, "labelled": labelled, "points": len(design["points"]),
            "population_pixels": result.total_pixels, "pixel_area_m2": m2,
            "overall_accuracy": figure(result.oa, result.oa_se), "classes": classes,
            "matrix": [[float(v) if math.isfinite(v) else None for v in row] for row in result.matrix.tolist()]}


def read_references(sample, design, images, classes):
    """{point id: class index} of the labelled points of the sample layer, read by the click reader."""
    if not Path(sample).exists():
        raise FileNotFoundError(f"sample layer {sample} not found")
    got = read_clicks(sample, images, classes, class_field=REFERENCE, unlabelled=True, allow_empty=True)
    at = {(p["image"], p["row"], p["col"]): p["id"] for p in design["points"]}
    out = {}
    for name, c in got.images.items():
        for r, k, cls in zip(c.rows.tolist(), c.cols.tolist(), c.classes.tolist()):
            if (name, r, k) not in at:
                raise ValueError(f"{sample}: a labelled point on {name} at row {r}, col {k} is not one of the drawn "
                                 f"points ({design_path(sample).name}); move it back or draw a new sample")
            out[at[(name, r, k)]] = cls
    return out


# --------------------------------------------------------------------------- CLI

@dataclass
class SampleSettings:
    """`assess.py sample`: a flag that train.py or another command takes too is that declaration (config.reuse)."""
    images: Optional[str] = reuse(TrainConfig, "images", required=True)
    masks: Optional[str] = setting(None, "the map: a folder of infer.py's masks of the images (or --checkpoint)",
                                   "sample")
    checkpoint: Optional[str] = reuse(Shared, "checkpoint")
    classes: Optional[str] = reuse(TrainConfig, "classes")
    out: Optional[str] = reuse(TrainConfig, "out", None, required=True)
    n: Optional[int] = setting(None, "sample points in all (or --target-se)", "sample", check=optional(whole(2)),
                               must="be >= 2 sample points")
    target_se: Optional[float] = setting(None, "the standard error wanted for overall accuracy, e.g. 0.02 (Olofsson "
                                               "et al. 2014, eq. 13)", "sample",
                                         check=optional(lambda v: 0 < v < 0.5),
                                         must="be in (0, 0.5), a standard error of overall accuracy")
    expected_ua: float = setting(0.9, "user's accuracy expected per class, for --target-se", "sample",
                                 check=lambda v: 0 < v < 1, must="be in (0, 1)")
    floor: int = setting(50, "least points per map class, stratified", "sample", check=whole(2),
                         must="be >= 2 points per class")
    design: str = setting("stratified", "stratified random by map class, or simple random", "sample",
                          choices=("stratified", "simple"))
    seed: int = reuse(TrainConfig, "seed")
    clicks: Optional[str] = reuse(TrainConfig, "clicks")
    class_field: str = reuse(TrainConfig, "class_field")
    device: str = reuse(TrainConfig, "device", "cpu")
    overwrite: bool = reuse(TrainConfig, "overwrite")


@dataclass
class EstimateSettings:
    """`assess.py estimate`."""
    images: Optional[str] = reuse(TrainConfig, "images", required=True)
    sample: Optional[str] = setting(None, "the labelled sample layer (its .design.json beside it)", "estimate",
                                    required=True)
    classes: Optional[str] = reuse(TrainConfig, "classes")
    overwrite: bool = reuse(TrainConfig, "overwrite")


COMMANDS = {"sample": (SampleSettings, "draw the sample points from the map"),
            "estimate": (EstimateSettings, "the estimates from the labelled sample")}


def get_args_parser():
    """`sample` and `estimate`, their options SampleSettings' and EstimateSettings' fields."""
    p = argparse.ArgumentParser(description="Draw a blind assessment sample from a map, then estimate its accuracy "
                                            "and class areas from the labels (see the module docstring).")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (cls, text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=text), cls, grouped=False)
    return p


def check_args(args):
    """Each setting's check and the rules between them, before any work; returns the command's settings."""
    settings = args if not hasattr(args, "command") else from_args(COMMANDS[args.command][0], args)
    check_settings(settings)
    if isinstance(settings, EstimateSettings):
        return settings
    if (settings.masks is None) == (settings.checkpoint is None):
        raise ValueError("give the map as --masks (infer.py's masks) or --checkpoint (its prediction), one of them")
    if (settings.n is None) == (settings.target_se is None):
        raise ValueError("give the sample's size as --n or --target-se, one of them")
    if Path(settings.out).suffix.lower() not in (".gpkg", ".geojson", ".csv"):
        raise ValueError(f"--out {settings.out}: write the sample as .gpkg, .geojson or .csv")
    for path in (Path(settings.out), design_path(settings.out)):
        if path.exists() and not settings.overwrite:
            raise ValueError(f"{path} exists (a sample, perhaps labelled already); choose another --out, or "
                             f"--overwrite to draw a new one")
    return settings


def run_sample(args):
    images = image_refs(args.images)
    if args.checkpoint:
        mapped, classes = predicted_map(images, args.checkpoint, args.device)
        if args.classes and list(load_class_file(args.classes).names) != list(classes.names):
            raise ValueError(f"--classes {args.classes} names other classes than {args.checkpoint}")
    else:
        classes = load_class_file(args.classes) if args.classes else POTSDAM
        mapped = masks_map(images, args.masks)
    clicks = read_clicks(args.clicks, args.images, classes, class_field=args.class_field) if args.clicks else None
    design = draw(images, mapped, classes, n=args.n, target_se=args.target_se, expected_ua=args.expected_ua,
                  floor=args.floor, design=args.design, seed=args.seed, clicks=clicks)
    design["map"] = str(args.checkpoint or args.masks)
    write_sample(args.out, design, images)
    design_path(args.out).write_text(json.dumps(design, indent=1))
    n = {classes.names[int(h)] if args.design == "stratified" else "all": 0 for h in design["stratum_sizes"]}
    for p in design["points"]:
        n[classes.names[p["stratum"]] if args.design == "stratified" else "all"] += 1
    print(f"sample: {len(design['points'])} points ({args.design}; {', '.join(f'{k} {v}' for k, v in n.items())}) "
          f"-> {args.out}, labelled blind in its '{REFERENCE}' field; the design (map classes, strata) -> "
          f"{design_path(args.out)}" + (f"; {design['excluded_clicks']} training clicks excluded" if clicks else ""))
    for note in design["notes"]:
        print(f"note: {note}")


def run_estimate(args):
    classes = load_class_file(args.classes) if args.classes else POTSDAM
    a = Assessment.open(args.sample, args.images, classes)
    for path in (Path(f"{estimates_prefix(args.sample)}.csv"), Path(f"{estimates_prefix(args.sample)}.md")):
        if path.exists() and not args.overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace the estimates of this sample")
    csv_path, md_path = a.write(overwrite=args.overwrite)
    print(f"{len(a.reference)} of {len(a.design['points'])} sample points labelled -> {csv_path}, {md_path}")
    print(md_path.read_text())


def main(args):
    """0 done; 2 a user error (a message, nothing written)."""
    try:
        settings = check_args(args)
        run_sample(settings) if isinstance(settings, SampleSettings) else run_estimate(settings)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
