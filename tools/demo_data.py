"""Synthetic, Potsdam-like aerial scenes for demos and tests (ISPRS Potsdam cannot be downloaded here).

Draws procedural towns (roads with pavements, houses and blocks of flats with cast shadows, gardens,
parks, trees, cars, construction sites) as 1500x1500 tiles and cuts them into 300x300 patches in the
layout of the real patch dumps, plus a few larger scenes for the inference demo. Everything it writes is
SYNTHETIC: numbers measured on it say nothing about Potsdam.

    python -m tools.demo_data --out demo_data                  # 2,400 patches + 3 scenes of 1200x1200
    python -m tools.demo_data --out demo_data --check          # also re-read every label and print class shares

    <out>/patches/Images/Image_{id}.tif       300x300 RGB uint8, LZW
    <out>/patches/Labels/Label_{id}.tif       its colour label (dataset.PALETTE, black = undefined), LZW
    <out>/scenes/scene_{k}.tif                scene_size x scene_size RGB uint8, LZW
    <out>/scenes/labels/scene_{k}_label.tif   its colour label
    <out>/SYNTHETIC.txt                       marker: what this is, the settings, the class shares

The same seed gives byte-identical files, and patch i does not depend on how many patches are asked for.
Patches come 25 to a tile, so the published split (0-2099 train, 2100-2399 val) falls on tile boundaries:
no val patch shares a tile with a train patch. A folder this tool did not write is never touched, and
nothing is ever written under archive/ (where the real data lives).
"""

import argparse
import json
import multiprocessing
import os
import re
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from tqdm import tqdm

from dataset import index_to_colour, read_label
from spec import CLASSES, IGNORE_INDEX, NATIVE_SIZE

# --------------------------------------------------------------------------- constants

GENERATOR_VERSION = 1  # bump when the drawing changes: folders written by an older version are redrawn
TILE_SIZE = 1500  # patches are cut from 1500x1500 tiles, 5x5 patches each
MARKER = "SYNTHETIC.txt"
TARGET_SHARES = (0.26, 0.27, 0.26, 0.13, 0.02, 0.06)  # what the drawing aims at, in CLASSES order

IMP, BUILDING, LOW_VEG, TREE, CAR, CLUTTER = (CLASSES.index(name) for name in (
    "impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter"))

# material: (fine noise in grey levels, coarse noise per channel (r, g, b), clumping as a fraction)
_TEXTURES = {
    "grass": (6, (13, 15, 5), 0.08),
    "tree": (9, (5, 6, 3), 0.32),
    "asphalt": (6, (6, 6, 6), 0.0),
    "paving": (5, (7, 7, 6), 0.0),
    "marking": (4, (0, 0, 0), 0.0),
    "tile_roof": (7, (5, 4, 3), 0.0),
    "flat_roof": (4, (8, 8, 8), 0.0),
    "car": (2, (0, 0, 0), 0.0),
    "soil": (10, (18, 15, 10), 0.10),
    "gravel": (12, (8, 8, 8), 0.12),
    "container": (3, (0, 0, 0), 0.0),
    "water": (3, (3, 5, 6), 0.0),
}
_MATERIAL = {name: i for i, name in enumerate(_TEXTURES)}
_FINE = np.array([t[0] for t in _TEXTURES.values()], np.float32)
_COARSE = np.array([t[1] for t in _TEXTURES.values()], np.float32)
_CLUMP = np.array([t[2] for t in _TEXTURES.values()], np.float32)

_CAR_COLOURS = ((232, 232, 230), (188, 190, 194), (118, 120, 124), (28, 29, 33), (34, 46, 92),
                (150, 28, 26), (58, 70, 58), (205, 180, 70))
_CAR_WEIGHTS = (0.24, 0.2, 0.16, 0.18, 0.08, 0.07, 0.04, 0.03)
_CONTAINER_COLOURS = ((40, 80, 160), (170, 50, 40), (60, 120, 70), (210, 120, 30), (150, 150, 150))
_SHADOW = np.array([0.42, 0.47, 0.58], np.float32)  # shadows are dark and a little blue


# --------------------------------------------------------------------------- drawing primitives

class _Canvas:
    """A tile being drawn: class map, material map, base colours and building shadows, painted in order
    (later objects cover earlier ones, in label and image alike)."""

    def __init__(self, rng, size):
        self.rng = rng
        self.size = size
        self.label = np.full((size, size), LOW_VEG, np.uint8)
        self.material = np.full((size, size), _MATERIAL["grass"], np.uint8)
        self.image = np.empty((3, size, size), np.float32)  # planar while drawing: faster to texture
        self.shadow = np.zeros((size, size), bool)
        angle = rng.uniform(0, 2 * np.pi)
        self.sun = (float(np.sin(angle)), float(np.cos(angle)))  # the way shadows fall, (dy, dx)

    def clip(self, y0, y1, x0, x1):
        y0, y1, x0, x1 = (int(round(v)) for v in (y0, y1, x0, x1))
        y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, self.size), min(x1, self.size)
        return (slice(y0, y1), slice(x0, x1)) if y1 > y0 and x1 > x0 else None

    def rect(self, box, cls, colour, material):
        """Paint box (y0, y1, x0, x1) with one class, one colour (or an (h, w, 3) array) and one material."""
        sl = self.clip(*box)
        if sl is None:
            return
        if np.ndim(colour) == 3:  # a colour per pixel, (h, w, 3) for the box before clipping
            y0, x0 = int(round(box[0])), int(round(box[2]))
            colour = colour[sl[0].start - y0: sl[0].stop - y0, sl[1].start - x0: sl[1].stop - x0]
            colour = np.moveaxis(colour, -1, 0)
        else:
            colour = np.asarray(colour, np.float32)[:, None, None]
        self.label[sl] = cls
        self.material[sl] = _MATERIAL[material]
        self.image[:, sl[0], sl[1]] = colour

    def mask(self, y0, x0, mask, cls, colour, material):
        """Paint the True pixels of a boolean mask whose top-left corner is at (y0, x0)."""
        h, w = mask.shape
        sl = self.clip(y0, y0 + h, x0, x0 + w)
        if sl is None:
            return
        inner = (slice(sl[0].start - y0, sl[0].stop - y0), slice(sl[1].start - x0, sl[1].stop - x0))
        m = mask[inner]
        self.label[sl][m] = cls
        self.material[sl][m] = _MATERIAL[material]
        view = self.image[:, sl[0], sl[1]]
        view[:, m] = colour[inner][m].T if np.ndim(colour) == 3 else np.asarray(colour, np.float32)[:, None]

    def cast_shadow(self, box, height):
        """The shadow of a box-shaped object `height` pixels tall: the box swept along the sun direction."""
        dy, dx = self.sun[0] * height, self.sun[1] * height
        steps = max(1, int(np.ceil(max(abs(dy), abs(dx)) / 3)))
        for k in range(1, steps + 1):
            sl = self.clip(box[0] + dy * k / steps, box[1] + dy * k / steps,
                           box[2] + dx * k / steps, box[3] + dx * k / steps)
            if sl is not None:
                self.shadow[sl] = True


def _jitter(rng, colour, amount):
    """A colour varied by a common brightness factor and a little per channel."""
    c = np.asarray(colour, np.float32) * rng.uniform(1 - amount / 100, 1 + amount / 100)
    return c + rng.uniform(-amount / 3, amount / 3, 3).astype(np.float32)


def _between(rng, a, b, n=None):
    """Uniform between a and b in whichever order they come (small blocks can invert a range)."""
    return rng.uniform(min(a, b), max(a, b), n)


def _smooth_noise(rng, size, cell):
    """Zero-mean noise that varies over about `cell` pixels, (size, size) float32."""
    n = size // cell + 2
    small = Image.fromarray(rng.standard_normal((n, n)).astype(np.float32))
    return np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.float32)


def _shifted(mask, dy, dx):
    """mask moved by (dy, dx) pixels; what moves in from outside is False."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = \
        mask[max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
    return out


def _swept(mask, sun, length):
    """mask swept `length` pixels along the sun direction: where the objects it marks cast shadow."""
    out = np.zeros_like(mask)
    steps = max(1, int(np.ceil(length / 3)))
    for k in range(1, steps + 1):
        out |= _shifted(mask, int(round(sun[0] * length * k / steps)), int(round(sun[1] * length * k / steps)))
    return out


# --------------------------------------------------------------------------- objects

def _building(c, rng, rects, height, roof=None):
    """One building made of boxes (one, or two for an L): a gable roof (two shades split along the long
    side, lighter ridge) or a flat roof (parapet and rooftop units). Casts a shadow `height` pixels long."""
    roof = roof or rng.choice(["red", "brown", "dark", "grey", "light", "green"],
                              p=[0.34, 0.12, 0.16, 0.2, 0.14, 0.04])
    base = {"red": (168, 82, 62), "brown": (124, 84, 64), "dark": (68, 70, 76), "grey": (128, 128, 126),
            "light": (192, 192, 188), "green": (96, 116, 74)}[roof]
    colour = _jitter(rng, base, 12)
    gable = roof in ("red", "brown") or (roof == "dark" and rng.random() < 0.6)
    for box in rects:
        y0, y1, x0, x1 = box
        if gable:
            bright, dim = colour * rng.uniform(1.05, 1.2), colour * rng.uniform(0.78, 0.95)
            if (x1 - x0) >= (y1 - y0):  # ridge along the long side
                mid = (y0 + y1) / 2
                c.rect((y0, mid, x0, x1), BUILDING, bright, "tile_roof")
                c.rect((mid, y1, x0, x1), BUILDING, dim, "tile_roof")
                c.rect((mid - 1, mid + 1, x0, x1), BUILDING, colour * 1.25, "tile_roof")
            else:
                mid = (x0 + x1) / 2
                c.rect((y0, y1, x0, mid), BUILDING, bright, "tile_roof")
                c.rect((y0, y1, mid, x1), BUILDING, dim, "tile_roof")
                c.rect((y0, y1, mid - 1, mid + 1), BUILDING, colour * 1.25, "tile_roof")
        else:
            edge = int(rng.integers(2, 5))
            c.rect(box, BUILDING, colour * rng.uniform(1.05, 1.2), "flat_roof")
            c.rect((y0 + edge, y1 - edge, x0 + edge, x1 - edge), BUILDING, colour, "flat_roof")
            for _ in range(int(rng.integers(0, 2 + (y1 - y0) * (x1 - x0) // 6000))):
                h, w = rng.integers(5, 16, 2)
                uy, ux = rng.uniform(y0 + edge, max(y0 + edge + 1, y1 - edge - h)), \
                    rng.uniform(x0 + edge, max(x0 + edge + 1, x1 - edge - w))
                c.rect((uy, uy + h, ux, ux + w), BUILDING, _jitter(rng, (170, 172, 170), 15), "flat_roof")
        c.cast_shadow(box, height)


def _car(c, rng, cy, cx, along_x):
    """A car centred at (cy, cx), lying along x or along y, with windscreen and rear window."""
    length, width = rng.integers(24, 33), rng.integers(11, 15)
    colour = _jitter(rng, _CAR_COLOURS[rng.choice(len(_CAR_COLOURS), p=_CAR_WEIGHTS)], 8)
    glass = _jitter(rng, (42, 46, 52), 10)
    front = rng.random() < 0.5
    windows = [(0.22, 0.36), (0.74, 0.84)]
    if front:
        windows = [(1 - b, 1 - a) for a, b in windows]
    if along_x:
        x0, y0 = cx - length / 2, cy - width / 2
        c.rect((y0, y0 + width, x0, x0 + length), CAR, colour, "car")
        for a, b in windows:
            c.rect((y0 + 1.5, y0 + width - 1.5, x0 + a * length, x0 + b * length), CAR, glass, "car")
    else:
        y0, x0 = cy - length / 2, cx - width / 2
        c.rect((y0, y0 + length, x0, x0 + width), CAR, colour, "car")
        for a, b in windows:
            c.rect((y0 + a * length, y0 + b * length, x0 + 1.5, x0 + width - 1.5), CAR, glass, "car")


def _tree(c, rng, cy, cx, radius):
    """A blobby canopy: a few overlapping discs with ragged edges, lit on the side facing the sun."""
    k = int(rng.integers(2, 6))
    offsets = rng.normal(0, 0.3 * radius, (k, 2))
    radii = rng.uniform(0.5, 0.85, k) * radius
    reach = int(np.abs(offsets).max() + radii.max()) + 2
    ax = np.arange(-reach, reach + 1, dtype=np.float32)
    ragged = rng.uniform(0.85, 1.15, (ax.size, ax.size)).astype(np.float32)
    m = np.zeros((ax.size, ax.size), bool)
    for (oy, ox), r in zip(offsets, radii):
        m |= (ax[:, None] - np.float32(oy)) ** 2 + (ax[None, :] - np.float32(ox)) ** 2 <= np.float32(r * r) * ragged
    kind = rng.choice(3, p=[0.75, 0.15, 0.1])  # broadleaf, conifer, light-green
    base = _jitter(rng, ((58, 86, 44), (36, 60, 46), (92, 112, 52))[kind], 12)
    towards_shadow = ax[:, None] * np.float32(c.sun[0]) + ax[None, :] * np.float32(c.sun[1])
    light = np.minimum(np.maximum(1 - np.float32(0.3 / max(radius, 1)) * towards_shadow, np.float32(0.6)),
                       np.float32(1.35))  # dark on the side away from the sun
    c.mask(int(round(cy)) - reach, int(round(cx)) - reach, m, TREE, light[..., None] * base, "tree")


def _clutter_item(c, rng, cy, cx):
    """Something small that is none of the other classes: a container, a heap of gravel or bare soil."""
    kind = rng.choice(["container", "heap", "soil"], p=[0.45, 0.25, 0.3])
    if kind == "container":
        h, w = (rng.integers(12, 18), rng.integers(28, 50))[:: 1 if rng.random() < 0.5 else -1]
        colour = _jitter(rng, _CONTAINER_COLOURS[rng.integers(len(_CONTAINER_COLOURS))], 10)
        c.rect((cy, cy + h, cx, cx + w), CLUTTER, colour, "container")
        c.cast_shadow((cy, cy + h, cx, cx + w), 5)
    elif kind == "heap":
        r = rng.uniform(8, 22)
        yy, xx = np.ogrid[-int(r) - 1:int(r) + 2, -int(r) - 1:int(r) + 2]
        c.mask(int(cy), int(cx), yy ** 2 + xx ** 2 <= r * r, CLUTTER, _jitter(rng, (150, 140, 120), 15), "gravel")
    else:
        h, w = rng.integers(20, 70, 2)
        c.rect((cy, cy + h, cx, cx + w), CLUTTER, _jitter(rng, (132, 108, 80), 12), "soil")


# --------------------------------------------------------------------------- blocks (what lies between roads)

def _houses(c, rng, box, trees):
    """Detached houses on parcels along the block's long side, one row per facing road, with driveways,
    terraces, hedges, garden trees and the odd pool or bare patch."""
    y0, y1, x0, x1 = box
    along_x = (x1 - x0) >= (y1 - y0)
    length, depth = (x1 - x0, y1 - y0) if along_x else (y1 - y0, x1 - x0)

    def put(u0, u1, v0, v1):  # block coordinates (u along the block, v across) -> image box
        return (y0 + v0, y0 + v1, x0 + u0, x0 + u1) if along_x else (y0 + u0, y0 + u1, x0 + v0, x0 + v1)

    def at(u, v):  # block coordinates -> image point (y, x)
        return (y0 + v, x0 + u) if along_x else (y0 + u, x0 + v)

    rows = [(0, depth // 2, False), (depth // 2, depth, True)] if depth >= 230 else [(0, depth, False)]
    paving = _jitter(rng, (158, 154, 146), 10)
    for r0, r1, back in rows:
        u = int(rng.integers(0, 20))
        while u < length - 60:
            pw = min(int(rng.integers(110, 200)), length - u)
            setback = int(rng.integers(8, 24))
            deep = int(np.clip(rng.uniform(0.6, 0.9) * (r1 - r0 - setback), 60, 170))
            bw = int(rng.integers(int(pw * 0.6), max(int(pw * 0.6) + 1, int(pw * 0.92))))
            off = int(rng.integers(4, max(5, pw - bw - 4)))
            if back:
                v0, v1, road_v, garden = r1 - setback - deep, r1 - setback, r1, (r0, r1 - setback - deep)
            else:
                v0, v1, road_v, garden = r0 + setback, r0 + setback + deep, r0, (r0 + setback + deep, r1)
            if rng.random() < 0.3:  # a hedge along the parcel border: low vegetation, darker and rougher
                hedge = _jitter(rng, (62, 92, 48), 10)
                c.rect(put(u, u + int(rng.integers(4, 8)), r0, r1), LOW_VEG, hedge, "tree")
            if rng.random() < 0.15:
                _clutter_item(c, rng, *at(u + _between(rng, 0, pw - 40), _between(rng, *garden) - 20))
            elif rng.random() < 0.06:  # a pool: water counts as clutter
                pool = put(u + off, u + off + 30, garden[0] + 8, garden[0] + 24) if not back else \
                    put(u + off, u + off + 30, garden[1] - 24, garden[1] - 8)
                c.rect(pool, CLUTTER, _jitter(rng, (70, 160, 190), 8), "water")
            if rng.random() < 0.5:  # terrace behind the house
                t = (v1, v1 + 22) if not back else (v0 - 22, v0)
                c.rect(put(u + off, u + off + int(bw * 0.6), *t), IMP, paving, "paving")
            dw = int(rng.integers(14, 20))
            side = u + off + bw + 3 if pw - off - bw >= dw + 6 else (u + off - dw - 3 if off >= dw + 6 else None)
            if side is not None:
                drive = (min(road_v, (v0 + v1) // 2), max(road_v, (v0 + v1) // 2))
                c.rect(put(side, side + dw, *drive), IMP, paving, "paving")
                if rng.random() < 0.45:
                    _car(c, rng, *at(side + dw / 2, (road_v + (v0 + v1) / 2) / 2), along_x=not along_x)
            rects = [put(u + off, u + off + bw, v0, v1)]
            if rng.random() < 0.45:  # an L: a wing reaching into the garden
                ww = int(bw * rng.uniform(0.35, 0.55))
                wu = u + off if rng.random() < 0.5 else u + off + bw - ww
                ext = int(rng.integers(20, 45))
                rects.append(put(wu, wu + ww, v1, v1 + ext) if not back else put(wu, wu + ww, v0 - ext, v0))
            _building(c, rng, rects, rng.uniform(10, 26))
            for _ in range(int(rng.integers(1, 5))):
                tv = _between(rng, *garden)
                trees.append((*at(u + rng.uniform(0, pw), tv), rng.uniform(11, 28)))
            u += pw


def _flats(c, rng, box, trees):
    """Blocks of flats or a hall: a ring around a courtyard, parallel slabs, or one big flat roof with
    parking around it."""
    m = int(rng.integers(8, 24))
    y0, y1, x0, x1 = box[0] + m, box[1] - m, box[2] + m, box[3] - m
    if y1 - y0 < 120 or x1 - x0 < 120:
        return _houses(c, rng, box, trees)
    style = rng.choice(["ring", "slabs", "hall"], p=[0.4, 0.35, 0.25])
    roof = rng.choice(["red", "dark", "grey", "light"], p=[0.3, 0.25, 0.3, 0.15])
    paving = _jitter(rng, (150, 148, 142), 10)
    if style == "ring":
        d = int(rng.integers(65, 100))
        if rng.random() < 0.5:
            c.rect((y0 + d, y1 - d, x0 + d, x1 - d), IMP, paving, "paving")  # a paved courtyard
        wings = [(y0, y0 + d, x0, x1), (y1 - d, y1, x0, x1), (y0 + d, y1 - d, x0, x0 + d),
                 (y0 + d, y1 - d, x1 - d, x1)]
        for wy0, wy1, wx0, wx1 in wings:
            along_x = (wx1 - wx0) >= (wy1 - wy0)
            lo, hi = (wx0, wx1) if along_x else (wy0, wy1)
            gap = rng.uniform(lo, hi) if rng.random() < 0.5 else None  # a passage into the courtyard
            for a, b in ([(lo, gap - 15), (gap + 15, hi)] if gap is not None else [(lo, hi)]):
                if b - a > 20:
                    _building(c, rng, [(wy0, wy1, a, b) if along_x else (a, b, wx0, wx1)],
                              rng.uniform(30, 60), roof)
        for _ in range(int(rng.integers(2, 8))):
            trees.append((_between(rng, y0 + d, y1 - d), _between(rng, x0 + d, x1 - d), rng.uniform(14, 30)))
    elif style == "slabs":
        along_x = (x1 - x0) >= (y1 - y0)
        v, v_end = (y0, y1) if along_x else (x0, x1)
        lo, hi = (x0, x1) if along_x else (y0, y1)
        while v < v_end - 40:
            d = int(rng.integers(55, 90))
            a, b = lo + rng.uniform(0, 40), hi - rng.uniform(0, 40)
            _building(c, rng, [(v, min(v + d, v_end), a, b) if along_x else (a, b, v, min(v + d, v_end))],
                      rng.uniform(30, 60), roof)
            gap = int(rng.integers(35, 70))
            if rng.random() < 0.4:  # a parking strip between slabs
                p = (v + d + 8, v + d + 38)
                c.rect((*p, lo, hi) if along_x else (lo, hi, *p), IMP, _jitter(rng, (100, 100, 102), 8), "asphalt")
                for t in np.arange(lo + 12, hi - 12, rng.uniform(16, 19)):
                    if rng.random() < 0.6:
                        _car(c, rng, *((sum(p) / 2, t) if along_x else (t, sum(p) / 2)), along_x=not along_x)
            else:
                for t in rng.uniform(lo, hi, int(rng.integers(1, 5))):
                    trees.append(((v + d + gap / 2, t) if along_x else (t, v + d + gap / 2)) + (rng.uniform(14, 28),))
            v += d + gap
    else:
        c.rect((y0, y1, x0, x1), IMP, _jitter(rng, (104, 104, 106), 8), "asphalt")
        inset = rng.integers(15, 50, 4)
        hall = (y0 + inset[0], y1 - inset[1], x0 + inset[2], x1 - inset[3])
        _building(c, rng, [hall], rng.uniform(25, 45), rng.choice(["grey", "light", "dark"]))
        if hall[0] - y0 > 34:  # cars parked along the top
            for t in np.arange(x0 + 10, x1 - 10, rng.uniform(16, 19)):
                if rng.random() < 0.55:
                    _car(c, rng, y0 + 17, t, along_x=False)


def _park(c, rng, box, trees):
    """Grass with paths, many trees and perhaps a sandy playground or a pond (both clutter)."""
    y0, y1, x0, x1 = box
    path = _jitter(rng, (170, 162, 145), 8)
    if rng.random() < 0.7:
        py = rng.uniform(y0, y1)
        c.rect((py, py + rng.integers(7, 12), x0, x1), IMP, path, "paving")
    if rng.random() < 0.7:
        px = rng.uniform(x0, x1)
        c.rect((y0, y1, px, px + rng.integers(7, 12)), IMP, path, "paving")
    if rng.random() < 0.35:
        h, w = rng.integers(30, 80, 2)
        cy, cx = rng.uniform(y0, max(y0 + 1, y1 - h)), rng.uniform(x0, max(x0 + 1, x1 - w))
        kind = rng.random() < 0.6
        c.rect((cy, cy + h, cx, cx + w), CLUTTER, _jitter(rng, (200, 185, 140) if kind else (60, 90, 110), 8),
               "gravel" if kind else "water")
    n = int((y1 - y0) * (x1 - x0) / 2000 * rng.uniform(0.5, 1.1))
    for _ in range(n):
        trees.append((rng.uniform(y0, y1), rng.uniform(x0, x1), rng.uniform(13, 34)))


def _parking(c, rng, box, trees):
    """An asphalt car park with stall lines and rows of cars, a grass margin with trees."""
    m = int(rng.integers(6, 16))
    y0, y1, x0, x1 = box[0] + m, box[1] - m, box[2] + m, box[3] - m
    c.rect((y0, y1, x0, x1), IMP, _jitter(rng, (96, 96, 100), 10), "asphalt")
    line = _jitter(rng, (225, 225, 220), 5)
    fill = rng.uniform(0.35, 0.75)
    for row in np.arange(y0 + 6, y1 - 40, 90):
        for r0 in (row, row + 36):
            for t in np.arange(x0 + 4, x1 - 18, 17):
                c.rect((r0, r0 + 34, t, t + 1.5), IMP, line, "marking")
                if rng.random() < fill:
                    _car(c, rng, r0 + 17, t + 8.5, along_x=False)
    for _ in range(int((x1 - x0 + y1 - y0) / 120)):
        side = rng.random() < 0.5
        trees.append((rng.choice([box[0] + m / 2, box[1] - m / 2]) if side else rng.uniform(y0, y1),
                      rng.uniform(x0, x1) if side else rng.choice([box[2] + m / 2, box[3] - m / 2]),
                      rng.uniform(12, 22)))


def _construction(c, rng, box, trees):
    """A building site in one corner of a block of houses or flats (or of open grass): bare soil with an
    excavation, containers, heaps and machines (all clutter), and a paved site road."""
    rest = rng.choice(3, p=[0.5, 0.3, 0.2])
    if rest < 2:
        (_houses, _flats)[rest](c, rng, box, trees)
    h, w = (box[1] - box[0]) * rng.uniform(0.5, 0.85), (box[3] - box[2]) * rng.uniform(0.5, 0.85)
    y0 = box[0] + 8 if rng.random() < 0.5 else box[1] - 8 - h
    x0 = box[2] + 8 if rng.random() < 0.5 else box[3] - 8 - w
    y1, x1 = y0 + h, x0 + w
    site = c.clip(y0, y1, x0, x1)
    if site is not None:
        c.shadow[site] = False  # whatever stood here is gone, and so is its shadow
    c.rect((y0, y1, x0, x1), CLUTTER, _jitter(rng, (140, 118, 88), 12), "soil")
    ph, pw = h * rng.uniform(0.3, 0.6), w * rng.uniform(0.3, 0.6)
    py, px = _between(rng, y0, y1 - ph), _between(rng, x0, x1 - pw)
    c.rect((py, py + ph, px, px + pw), CLUTTER, _jitter(rng, (105, 88, 68), 10), "soil")
    if rng.random() < 0.5:
        ry = _between(rng, y0, y1 - 20)
        c.rect((ry, ry + rng.integers(14, 22), x0, x1), IMP, _jitter(rng, (150, 146, 138), 8), "paving")
    for _ in range(int(rng.integers(2, 7))):
        _clutter_item(c, rng, _between(rng, y0, y1 - 30), _between(rng, x0, x1 - 40))
    if rng.random() < 0.6:  # a machine
        my, mx = _between(rng, y0, y1 - 20), _between(rng, x0, x1 - 30)
        c.rect((my, my + 16, mx, mx + 26), CLUTTER, _jitter(rng, (220, 180, 40), 8), "container")
    trees[:] = [t for t in trees if not (y0 < t[0] < y1 and x0 < t[1] < x1)]  # cleared for the site


def _field(c, rng, box, trees):
    """Open grassland or a meadow with mowing stripes, sometimes yellowish, with a hedgerow of trees."""
    y0, y1, x0, x1 = (int(v) for v in box)
    base = _jitter(rng, (118, 132, 74) if rng.random() < 0.5 else (142, 140, 88), 10)
    period = rng.uniform(10, 24)
    along = np.arange(y1 - y0)[:, None] if rng.random() < 0.5 else np.arange(x1 - x0)[None, :]
    stripes = 1 + 0.05 * np.sin(2 * np.pi * along / period)
    colour = (base[None, None, :] * np.broadcast_to(stripes, (y1 - y0, x1 - x0))[..., None]).astype(np.float32)
    c.rect((y0, y1, x0, x1), LOW_VEG, colour, "grass")
    if rng.random() < 0.5:
        at_y = rng.random() < 0.5
        for t in np.arange(x0 if at_y else y0, x1 if at_y else y1, rng.uniform(25, 40)):
            trees.append((y0 + 10, t, rng.uniform(12, 24)) if at_y else (t, x0 + 10, rng.uniform(12, 24)))
    if rng.random() < 0.3:  # a bare track across the field
        ty = rng.uniform(y0, y1)
        c.rect((ty, ty + rng.integers(8, 14), x0, x1), CLUTTER, _jitter(rng, (150, 130, 100), 10), "soil")


_BLOCKS = ((_houses, 0.3), (_flats, 0.43), (_park, 0.04), (_parking, 0.02), (_construction, 0.19),
           (_field, 0.02))


# --------------------------------------------------------------------------- a whole scene

def _roads(rng, size):
    """Road positions across the tile, one direction: (centre, asphalt half-width, verge, pavement)."""
    roads, pos = [], int(rng.integers(-450, -150))
    while pos < size + 450:
        roads.append((pos, int(rng.integers(16, 30)), int(rng.choice([0, 10, 12, 14])), int(rng.integers(6, 12))))
        pos += int(rng.integers(300, 540))
    return roads


def draw_scene(rng, size):
    """One synthetic scene: an (size, size, 3) uint8 image and an (size, size) uint8 class map (indices into
    CLASSES, IGNORE_INDEX undefined). Deterministic given the state of `rng` (a numpy Generator)."""
    c = _Canvas(rng, size)
    c.image[:] = _jitter(rng, (104, 128, 70), 10)[:, None, None]  # grass wherever nothing else is drawn
    verticals, horizontals = _roads(rng, size), _roads(rng, size)
    asphalt, paving = _jitter(rng, (92, 94, 98), 12), _jitter(rng, (160, 156, 148), 10)
    verge, line = _jitter(rng, (100, 126, 68), 8), _jitter(rng, (228, 228, 222), 4)
    trees = []

    def road_box(road, half, vertical):
        lo, hi = road[0] - half, road[0] + half
        return (-1, size + 1, lo, hi) if vertical else (lo, hi, -1, size + 1)

    for part in ("pavement", "verge", "asphalt"):
        for vertical, roads in ((True, verticals), (False, horizontals)):
            for r in roads:
                if part == "pavement":
                    c.rect(road_box(r, r[1] + r[2] + r[3], vertical), IMP, paving, "paving")
                elif part == "verge" and r[2]:
                    c.rect(road_box(r, r[1] + r[2], vertical), LOW_VEG, verge, "grass")
                elif part == "asphalt":
                    c.rect(road_box(r, r[1], vertical), IMP, asphalt, "asphalt")
    for vertical, roads, cross in ((True, verticals, horizontals), (False, horizontals, verticals)):
        for r in roads:
            if r[1] >= 24:  # dashed centre line on two-lane roads
                dash = (np.arange(size) // 16) % 3 == 0
                stripe = np.repeat(dash[:, None], 2, 1) if vertical else np.repeat(dash[None, :], 2, 0)
                c.mask(0 if vertical else r[0] - 1, r[0] - 1 if vertical else 0, stripe, IMP, line, "marking")
            for sign in (-1, 1):  # kerbside parking and a few moving cars
                park = rng.random() < 0.45
                lane = r[0] + sign * (r[1] - 9 if park else r[1] / 2)
                t = rng.uniform(-20, 20)
                while t < size + 20:
                    t += rng.uniform(30, 46) if park else rng.uniform(150, 600)
                    if any(abs(t - x[0]) < x[1] + x[2] + x[3] + 20 for x in cross):
                        continue  # not on a crossing
                    if not park or rng.random() < 0.35:
                        _car(c, rng, *((t, lane) if vertical else (lane, t)), along_x=not vertical)
            if r[2]:  # street trees in the verges, overhanging road and pavement
                for sign in (-1, 1):
                    spot = r[0] + sign * (r[1] + r[2] / 2)
                    for t in np.arange(rng.uniform(0, 40), size, rng.uniform(45, 80)):
                        if rng.random() < 0.8 and not any(abs(t - x[0]) < x[1] + x[2] + x[3] for x in cross):
                            trees.append(((t, spot) if vertical else (spot, t)) + (rng.uniform(14, 26),))

    edges_x = [(r[0] - r[1] - r[2] - r[3], r[0] + r[1] + r[2] + r[3]) for r in verticals]
    edges_y = [(r[0] - r[1] - r[2] - r[3], r[0] + r[1] + r[2] + r[3]) for r in horizontals]
    kinds, weights = zip(*_BLOCKS)
    for (_, by0), (by1, _) in zip(edges_y, edges_y[1:]):
        for (_, bx0), (bx1, _) in zip(edges_x, edges_x[1:]):
            if by1 <= 0 or bx1 <= 0 or by0 >= size or bx0 >= size:
                continue
            kinds[rng.choice(len(kinds), p=weights)](c, rng, (by0, by1, bx0, bx1), trees)
    for _ in range(int(rng.integers(16, 32) * (size / TILE_SIZE) ** 2)):  # stray clutter, anywhere but on roofs
        cy, cx = rng.uniform(0, size, 2)
        if c.label[int(cy), int(cx)] != BUILDING:
            _clutter_item(c, rng, cy, cx)
    for ty, tx, r in trees:
        _tree(c, rng, ty, tx, r)
    return _render(c), _undefined_border(rng, c.label)


def _render(c):
    """Texture, shadows and a per-scene colour cast on top of the base colours -> (H, W, 3) uint8 image."""
    rng, size, label = c.rng, c.size, c.label
    mat = c.material.astype(np.intp)
    img = c.image
    grain = rng.random((size, size), dtype=np.float32)
    grain -= np.float32(0.5)
    grain *= np.take(_FINE * np.float32(np.sqrt(12)), mat)  # unit variance times the material's amplitude
    clump = np.take(_CLUMP, mat)
    clump *= _smooth_noise(rng, size, 5)
    clump += np.float32(1)
    coarse = _smooth_noise(rng, size, 60)
    grid = np.arange(size) % 9 == 0  # joints between paving stones
    joints = (grid[:, None] | grid[None, :]) & (mat == _MATERIAL["paving"])
    tree, car = label == TREE, label == CAR
    shade = (c.shadow | (_swept(tree, c.sun, 12) & ~tree) | (_swept(car, c.sun, 4) & ~car)) & (label != BUILDING)
    gains = rng.uniform(0.94, 1.06, 3).astype(np.float32)
    offset = np.float32(rng.normal(0, 5))
    tmp = np.empty((size, size), np.float32)
    for ch in range(3):
        band = img[ch]
        band *= clump
        band += grain
        np.take(_COARSE[:, ch], mat, out=tmp)
        tmp *= coarse
        band += tmp
        band[joints] *= np.float32(0.88)
        band[shade] *= _SHADOW[ch]
        band *= gains[ch]
        band += offset
    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))


def _undefined_border(rng, label):
    """Now and then a thin undefined (black) strip along one edge, as at the border of some real tiles."""
    if rng.random() < 0.25:
        w = int(rng.integers(2, 6))
        side = int(rng.integers(4))
        sl = [(slice(0, w), slice(None)), (slice(-w, None), slice(None)),
              (slice(None), slice(0, w)), (slice(None), slice(-w, None))][side]
        label[sl] = IGNORE_INDEX
    return label


# --------------------------------------------------------------------------- writing

def _write(path, arr, predictor=False):
    tifffile.imwrite(path, arr, compression="lzw", predictor=predictor)


def _make_tile(job):
    """Draw and write one patch tile (kind "patches") or one scene; return (kind, class counts)."""
    kind, index, seed, out, size, ids = job
    rng = np.random.default_rng([seed, 0 if kind == "patches" else 1, index])
    image, label = draw_scene(rng, size)
    out = Path(out)
    counts = np.zeros(256, np.int64)
    if kind == "scenes":
        _write(out / "scenes" / f"scene_{index}.tif", image, predictor=True)
        _write(out / "scenes" / "labels" / f"scene_{index}_label.tif", index_to_colour(label))
        return kind, np.bincount(label.ravel(), minlength=256)
    per_row = size // NATIVE_SIZE
    for j, patch_id in enumerate(ids):
        r, q = divmod(j, per_row)
        sl = (slice(r * NATIVE_SIZE, (r + 1) * NATIVE_SIZE), slice(q * NATIVE_SIZE, (q + 1) * NATIVE_SIZE))
        _write(out / "patches" / "Images" / f"Image_{patch_id}.tif", image[sl], predictor=True)
        _write(out / "patches" / "Labels" / f"Label_{patch_id}.tif", index_to_colour(label[sl]))
        counts += np.bincount(label[sl].ravel(), minlength=256)
    return kind, counts


def _shares(counts):
    """Class shares of the labelled pixels, and the undefined share of all pixels."""
    labelled = counts[: len(CLASSES)].sum()
    shares = {name: float(counts[i] / max(labelled, 1)) for i, name in enumerate(CLASSES)}
    return shares, float(counts[IGNORE_INDEX] / max(counts.sum(), 1))


def _check_out(out):
    """Refuse archive/ and any patches/ or scenes/ folder this tool did not write. Returns the marker's
    record (a dict) when the folder is ours, else None."""
    resolved = Path(out).resolve()
    if any(part.lower() == "archive" for part in resolved.parts):
        raise ValueError(f"refusing to write synthetic data to {out} ({resolved}): archive/ is where the real "
                         f"Potsdam patches live. Use another folder, e.g. --out demo_data")
    marker = Path(out) / MARKER
    if marker.is_file():
        text = marker.read_text()
        if text.startswith("SYNTHETIC"):
            try:
                return json.loads(text.splitlines()[-1])
            except ValueError:
                return {}  # ours, but the record is damaged: draw again
    for sub in ("patches", "scenes"):
        folder = Path(out) / sub
        if folder.is_dir() and any(p.is_file() for p in folder.rglob("*")):
            raise FileExistsError(f"{folder} exists and was not written by demo_data.py (there is no {marker} "
                                  f"marker); it may be real data, so it is left alone. Move it away or pick "
                                  f"another --out")
    return None


def _write_marker(out, record):
    text = (f"SYNTHETIC DATA, not ISPRS Potsdam.\n"
            f"Procedural scenes drawn by demo_data.py in the Potsdam patch layout, for demos and tests only;\n"
            f"numbers measured on them say nothing about real Potsdam. Regenerate with:\n"
            f"    python -m tools.demo_data --out {out} --patches {record['settings']['patches']} "
            f"--scenes {record['settings']['scenes']} --scene-size {record['settings']['scene_size']} "
            f"--seed {record['settings']['seed']}\n"
            f"{json.dumps(record)}\n")
    (Path(out) / MARKER).write_text(text)


def _remove_stale(out, patches, scenes):
    """Delete files of ours beyond the counts now asked for (left by an earlier run with more)."""
    out = Path(out)
    for folder, pattern, limit in ((out / "patches" / "Images", r"Image_(\d+)\.tif", patches),
                                   (out / "patches" / "Labels", r"Label_(\d+)\.tif", patches),
                                   (out / "scenes", r"scene_(\d+)\.tif", scenes),
                                   (out / "scenes" / "labels", r"scene_(\d+)_label\.tif", scenes)):
        for p in folder.glob("*.tif") if folder.is_dir() else []:
            m = re.fullmatch(pattern, p.name)
            if m and int(m.group(1)) >= limit:
                p.unlink()


def make_demo_data(out="demo_data", patches=2400, scenes=3, scene_size=1200, seed=0, workers=None,
                   progress=False):
    """Write `patches` synthetic 300x300 patches (ids 0..patches-1) and `scenes` scenes of scene_size x
    scene_size under `out` (layout in the module docstring). Skips the work when `out` already holds
    exactly this (same settings and generator version, all files present).

    Returns a dict: out, images, labels (patch paths in id order), scenes, scene_labels, class_shares (over
    the patches' labelled pixels, or over the scenes when there are no patches), undefined_share,
    seconds, skipped. Raises ValueError under archive/ and FileExistsError for a folder it did not write.
    """
    if patches < 0 or scenes < 0:
        raise ValueError(f"patches and scenes must be >= 0, got {patches} and {scenes}")
    if scenes and scene_size < NATIVE_SIZE:
        raise ValueError(f"scene_size must be at least {NATIVE_SIZE}, got {scene_size}")
    out = Path(out)
    start = time.perf_counter()
    settings = {"generator": GENERATOR_VERSION, "patches": int(patches), "scenes": int(scenes),
                "scene_size": int(scene_size), "seed": int(seed)}
    record = _check_out(out)
    images = [out / "patches" / "Images" / f"Image_{i}.tif" for i in range(patches)]
    labels = [out / "patches" / "Labels" / f"Label_{i}.tif" for i in range(patches)]
    scene_files = [out / "scenes" / f"scene_{k}.tif" for k in range(scenes)]
    scene_labels = [out / "scenes" / "labels" / f"scene_{k}_label.tif" for k in range(scenes)]
    summary = {"out": out, "images": images, "labels": labels, "scenes": scene_files, "scene_labels": scene_labels}
    if record and record.get("settings") == settings and record.get("complete") and \
            all(p.is_file() for p in images + labels + scene_files + scene_labels):
        return {**summary, "class_shares": record["class_shares"], "undefined_share": record["undefined_share"],
                "seconds": time.perf_counter() - start, "skipped": True}

    for folder in (out / "patches" / "Images", out / "patches" / "Labels", out / "scenes" / "labels"):
        folder.mkdir(parents=True, exist_ok=True)
    _write_marker(out, {"settings": settings, "complete": False})  # ours from now on, even if interrupted
    _remove_stale(out, patches, scenes)
    per_tile = (TILE_SIZE // NATIVE_SIZE) ** 2
    jobs = [("scenes", k, seed, str(out), scene_size, None) for k in range(scenes)]
    jobs += [("patches", t, seed, str(out), TILE_SIZE, list(range(t * per_tile, min((t + 1) * per_tile, patches))))
             for t in range(-(-patches // per_tile))]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = workers or min(cores, 8)
    counts = {"patches": np.zeros(256, np.int64), "scenes": np.zeros(256, np.int64)}
    bar = tqdm(total=len(jobs), desc="synthetic tiles", disable=not progress)
    if workers > 1 and len(jobs) >= 4:
        with multiprocessing.Pool(workers) as pool:
            for kind, c in pool.imap_unordered(_make_tile, jobs):
                counts[kind] += c
                bar.update()
    else:
        for job in jobs:
            kind, c = _make_tile(job)
            counts[kind] += c
            bar.update()
    bar.close()
    shares, undefined = _shares(counts["patches"] if patches else counts["scenes"])
    _write_marker(out, {"settings": settings, "complete": True, "class_shares": shares,
                        "undefined_share": undefined})
    return {**summary, "class_shares": shares, "undefined_share": undefined,
            "seconds": time.perf_counter() - start, "skipped": False}


def measure_shares(label_paths):
    """Class shares (of labelled pixels) and undefined share read back from label files via dataset.read_label."""
    counts = np.zeros(256, np.int64)
    for p in label_paths:
        counts += np.bincount(read_label(p).ravel(), minlength=256)
    return _shares(counts)


def format_shares(shares, undefined, title):
    """The class shares as a small table next to the shares the drawing aims at."""
    lines = [title]
    for name, target in zip(CLASSES, TARGET_SHARES):
        lines.append(f"  {name:<20} {100 * shares[name]:5.1f} %   (target ~{100 * target:.0f} %)")
    lines.append(f"  {'undefined':<20} {100 * undefined:5.2f} % of all pixels")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    p = argparse.ArgumentParser(description="Write synthetic Potsdam-like patches and scenes (NOT real data).")
    p.add_argument("--out", default="demo_data", help="folder to write patches/, scenes/ and SYNTHETIC.txt into")
    p.add_argument("--patches", type=int, default=2400, help="number of 300x300 patches (ids 0..N-1)")
    p.add_argument("--scenes", type=int, default=3, help="number of larger scenes for the inference demo")
    p.add_argument("--scene-size", type=int, default=1200, help="side of each scene in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    p.add_argument("--check", action="store_true", help="re-read every patch label and print its class shares")
    return p


def main(args):
    try:
        s = make_demo_data(args.out, args.patches, args.scenes, args.scene_size, args.seed, args.workers,
                           progress=True)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f"error: {e}")
    if s["skipped"]:
        print(f"{args.out} already holds these synthetic data (seed {args.seed}); nothing to do")
    else:
        print(f"wrote {len(s['images'])} synthetic patches and {len(s['scenes'])} scenes of "
              f"{args.scene_size}x{args.scene_size} to {args.out} in {s['seconds']:.1f} s")
    what = "patches" if s["images"] else "scenes"
    print(format_shares(s["class_shares"], s["undefined_share"], f"SYNTHETIC class shares ({what}, not Potsdam):"))
    if args.check:
        shares, undefined = measure_shares(s["labels"] or s["scene_labels"])
        print(format_shares(shares, undefined, f"re-read from the label files ({what}):"))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
