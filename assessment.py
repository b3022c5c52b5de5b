"""Map accuracy and class areas from a probability sample drawn from the map (design-based estimates).

Clicks are not a probability sample of the map: a score on them says nothing trustworthy about the map's accuracy
or its class areas. This module is the statistical core of the assessment that does: a stratified random sample
drawn from the predicted map (strata = map classes), labelled blind, and the estimators of Olofsson et al. (2014)
and Stehman (2014) for the error matrix in proportions of area, overall / user's / producer's accuracy and the
error-adjusted area of every class, each with its SE and 95 % interval (estimate ± 1.96 SE), as AcATaMa (QGIS) and
mapaccuracy (R) report them.

    import assessment
    sizes = assessment.map_counts(maps, valid)                    # pixels per map class: NOT an area estimate
    n_h = assessment.allocate(sizes, target_se=0.01)             # sample size per stratum (eq. 13 + a floor)
    sample = assessment.draw_sample(maps, valid, n_h, seed=0, exclude=clicks)
    # label sample.rows() blind (show the interpreter image, row, col only) -> reference class per row
    result = assessment.estimate(sample, reference)
    assessment.write_tables(result, "results/assessment", class_names, pixel_area_m2=0.05 ** 2)

Several images are one population: every valid pixel of every image. Pure numpy; imports nothing of the project.

Olofsson, Foody, Herold, Stehman, Woodcock, Wulder (2014). Good practices for estimating area and assessing
accuracy of land change. Remote Sensing of Environment 148, 42-57.
Stehman (2014). Estimating area and map accuracy for stratified random sampling when the strata are different from
the map classes. International Journal of Remote Sensing 35(13), 4923-4939.
"""

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Z95 = 1.96  # 95 % interval: estimate ± 1.96 SE (Olofsson et al. 2014)
OLOFSSON, STEHMAN = "Olofsson et al. 2014", "Stehman 2014"

# --------------------------------------------------------------------------- the population: pixels of the maps


def _as_list(arrays):
    return [arrays] if isinstance(arrays, np.ndarray) and arrays.ndim == 2 else [np.asarray(a) for a in arrays]


def _exclusions(exclude, shapes):
    """Per image a boolean mask of excluded pixels. `exclude`: None, per-image boolean masks, or a collection of
    (image, row, col) points (e.g. the training clicks)."""
    out = [np.zeros(s, bool) for s in shapes]
    if exclude is None:
        return out
    items = _as_list(exclude) if isinstance(exclude, np.ndarray) else list(exclude)
    if items and all(isinstance(x, np.ndarray) and x.ndim == 2 for x in items):
        if [x.shape for x in items] != list(shapes):
            raise ValueError(f"exclusion masks of shapes {[x.shape for x in items]} for maps of shapes {shapes}")
        return [x.astype(bool) for x in items]
    for point in items:
        img, r, c = (int(v) for v in point)
        if not (0 <= img < len(shapes) and 0 <= r < shapes[img][0] and 0 <= c < shapes[img][1]):
            raise ValueError(f"excluded point (image {img}, row {r}, col {c}) lies outside the maps "
                             f"(shapes {shapes}): check the click file belongs to these images")
        out[img][r, c] = True
    return out


def _eligible(maps, valid_masks=None, exclude=None):
    """(maps, masks): the class maps as a list of 2-D integer arrays and per map the boolean mask of the pixels a
    sample may land on: valid (not nodata) and not excluded."""
    maps = _as_list(maps)
    valid = [np.ones(m.shape, bool) for m in maps] if valid_masks is None else _as_list(valid_masks)
    if len(valid) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(valid)} valid masks: give one mask per map")
    for i, (m, v) in enumerate(zip(maps, valid)):
        if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
            raise ValueError(f"map {i}: expected a 2-D integer class map, got shape {m.shape}, dtype {m.dtype}")
        if v.shape != m.shape:
            raise ValueError(f"map {i}: valid mask shape {v.shape} differs from the map's {m.shape}")
        if np.issubdtype(m.dtype, np.signedinteger) and m.min() < 0:
            raise ValueError(f"map {i}: negative class values; classes are 0, 1, 2, ... (nodata: the valid mask)")
    excluded = _exclusions(exclude, [m.shape for m in maps])
    return maps, [v.astype(bool) & ~x for v, x in zip(valid, excluded)]


def map_counts(maps, valid_masks=None, exclude=None):
    """{map class: pixels} over the eligible pixels (valid, not excluded) of all maps. A pixel count of the map:
    the stratum sizes N_h of the design, never an area estimate."""
    maps, masks = _eligible(maps, valid_masks, exclude)
    k = max(int(m.max()) for m in maps) + 1
    total = sum(np.bincount(m[a:a + 512][v[a:a + 512]], minlength=k)  # by blocks of rows: bounded memory
                for m, v in zip(maps, masks) for a in range(0, m.shape[0], 512))
    return {c: int(n) for c, n in enumerate(total) if n}

# --------------------------------------------------------------------------- sampling design


def allocate(map_counts, n=None, target_se=None, expected_ua=0.9, floor=50):
    """Sample size per stratum for stratified random sampling by map class: {class: n_h}, summing to n.

    `map_counts`: {class: pixels N_h}. Either `n` (total sample points) or `target_se`, the standard error wanted
    for overall accuracy, from which n = ceil((sum_i W_i S_i / target_se)^2) with W_i = N_i / N and
    S_i = sqrt(U_i (1 - U_i)), U_i the expected user's accuracy (`expected_ua`: one value or {class: U_i})
    (Olofsson et al. 2014, eq. 13). Rule: every class gets at least `floor` points (Olofsson et al. advise about
    50 for rare classes) but never more than its pixels, and the rest is proportional to area: n_h =
    clip(t N_h, min(floor, N_h), N_h) with the one t that makes the sizes sum to n; then rounded to integers by
    largest remainder."""
    classes = sorted(map_counts)
    size = np.array([map_counts[c] for c in classes], float)
    if (n is None) == (target_se is None):
        raise ValueError("give either n (total sample points) or target_se (wanted SE of overall accuracy)")
    if n is None:
        u = np.array([expected_ua.get(c, 0.9) if isinstance(expected_ua, dict) else expected_ua for c in classes])
        n = math.ceil(round((np.sum(size / size.sum() * np.sqrt(u * (1 - u))) / target_se) ** 2, 9))
    lo = np.minimum(floor, size)
    if n > size.sum() or n < lo.sum():
        raise ValueError(f"n = {n} points cannot be allocated: the floor of {floor} per class needs "
                         f"{int(lo.sum())} and the map has {int(size.sum())} pixels; ask for n in between")
    t_lo, t_hi = 0.0, 1.0  # sum(clip(t N_h, lo, N_h)) grows with t from sum(lo) (t=0) to sum(N_h) (t=1)
    for _ in range(200):
        t = (t_lo + t_hi) / 2
        t_lo, t_hi = (t, t_hi) if np.clip(t * size, lo, size).sum() < n else (t_lo, t)
    share = np.round(np.clip(t_hi * size, lo, size), 9)
    alloc = np.floor(share).astype(int)
    alloc[np.argsort(alloc - share)[: n - alloc.sum()]] += 1  # largest fractional parts first
    return {c: int(a) for c, a in zip(classes, alloc)}


@dataclass
class Sample:
    """Sample points in random order (label them in this order, blind: show the interpreter image, row and col,
    never map_class). Arrays (n,) int64. `stratum_sizes`: {stratum: N_h, eligible pixels}, what the estimators
    need; `notes`: what the draw could not do as asked (also issued as warnings)."""
    image: np.ndarray
    row: np.ndarray
    col: np.ndarray
    map_class: np.ndarray
    stratum: np.ndarray
    stratum_sizes: dict
    design: str
    seed: int
    notes: list = field(default_factory=list)

    def __len__(self):
        return len(self.image)

    def rows(self):
        """One dict per point: image, row, col, map_class, stratum (plain ints, ready for csv.DictWriter)."""
        keys = ("image", "row", "col", "map_class", "stratum")
        return [dict(zip(keys, map(int, v))) for v in zip(*(getattr(self, k) for k in keys))]


def _draw_stratum(rng, members, n_h):
    """n_h pixels without replacement among the True pixels of `members` (one mask per map), all of them if fewer:
    (image, row, col) arrays. Ranks are drawn over the whole population, then located map by map."""
    counts = np.array([m.sum() for m in members])
    starts = np.concatenate([[0], np.cumsum(counts)])
    ranks = np.sort(rng.choice(starts[-1], size=min(n_h, starts[-1]), replace=False))
    img = np.searchsorted(starts, ranks, side="right") - 1
    out = [np.empty(0, np.int64)] * 3
    for i in np.unique(img):
        flat = np.flatnonzero(members[i])[ranks[img == i] - starts[i]]
        r, c = np.divmod(flat, members[i].shape[1])
        out = [np.concatenate(p) for p in zip(out, (np.full(len(flat), i), r, c))]
    return out


def draw_sample(maps, valid_masks=None, n=None, design="stratified", seed=0, exclude=None):
    """Draw a probability sample from class maps; deterministic by `seed`.

    maps: one 2-D integer class map or a list of them (all pixels of all maps are one population); valid_masks:
    the same shapes, False on nodata (None: all valid); exclude: pixels never sampled (e.g. the training clicks),
    per-map boolean masks or a collection of (image, row, col). design "stratified": strata are the map classes,
    n a {class: n_h} (every class on the map needs one, at least 2) or a total split by `allocate`; a stratum with
    fewer eligible pixels than asked gives all of them, with a warning. design "simple": simple random sampling of
    n pixels, one stratum (0). Returns a `Sample` whose `stratum_sizes` count the eligible pixels per stratum."""
    maps, masks = _eligible(maps, valid_masks, exclude)
    rng = np.random.default_rng(seed)
    if n is None:
        raise ValueError("give n: a total, or for design 'stratified' a {class: n_h} (see allocate)")
    if design == "simple":
        if not isinstance(n, (int, np.integer)):
            raise ValueError(f"design 'simple' needs n as one total, got {n!r}")
        sizes, plan, member = {0: int(sum(v.sum() for v in masks))}, {0: int(n)}, lambda h, i: masks[i]
    elif design == "stratified":
        sizes = map_counts(maps, masks)
        plan = allocate(sizes, n=int(n)) if isinstance(n, (int, np.integer)) else dict(n)
        missing = {h: sizes[h] for h in sizes if plan.get(h, 0) < min(2, sizes[h])}
        if missing:
            raise ValueError(f"map classes {missing} (class: pixels) have fewer than 2 sample points asked: every "
                             "stratum needs at least 2 for unbiased estimates with a standard error")
        member = lambda h, i: masks[i] & (maps[i] == h)  # noqa: E731
    else:
        raise ValueError(f"design must be 'stratified' or 'simple', got {design!r}")
    notes, parts = [], []
    for h in sorted(plan):
        if plan[h] > sizes.get(h, 0):
            notes.append(f"stratum {h}: asked {plan[h]} points, it has {sizes.get(h, 0)} eligible pixels; "
                         "took them all")
            warnings.warn(notes[-1])
        if sizes.get(h, 0):
            img, r, c = _draw_stratum(rng, [member(h, i) for i in range(len(maps))], plan[h])
            parts.append((img, r, c, np.full(len(img), h)))
    img, r, c, s = (np.concatenate(p) for p in zip(*parts))
    order = rng.permutation(len(img))
    mapped = np.array([maps[i][y, x] for i, y, x in zip(img, r, c)], np.int64)
    return Sample(img[order], r[order], c[order], mapped[order], s[order],
                  {h: sizes[h] for h in sorted(sizes)}, design, seed, notes)

# --------------------------------------------------------------------------- estimators


@dataclass
class Estimates:
    """Design-based estimates. Per-class arrays (k,) follow `classes`; `matrix` (k, k) holds estimated proportions
    of area, rows map class i, columns reference class j; `area` the estimated proportion of the population in each
    reference class. Every estimate has its standard error (`*_se`, nan where a stratum has < 2 sample points or
    the ratio is undefined). `n_per_stratum` / `stratum_sizes`: {stratum: n_h} / {stratum: N_h pixels}."""
    method: str
    design: str
    classes: tuple
    n_per_stratum: dict
    stratum_sizes: dict
    matrix: np.ndarray
    matrix_se: np.ndarray
    oa: float
    oa_se: float
    ua: np.ndarray
    ua_se: np.ndarray
    pa: np.ndarray
    pa_se: np.ndarray
    area: np.ndarray
    area_se: np.ndarray

    @property
    def n(self):
        return int(sum(self.n_per_stratum.values()))

    @property
    def total_pixels(self):
        return int(sum(self.stratum_sizes.values()))

    def area_in(self, pixel_area=1.0):
        """(estimate, SE), (k,) each: the error-adjusted area of each reference class in pixels, or in any unit
        given the area of one pixel in it (e.g. 900.0 for 30 m pixels in m²)."""
        return self.area * self.total_pixels * pixel_area, self.area_se * self.total_pixels * pixel_area


def _nan_where_inf(*arrays):
    return [np.where(np.isfinite(x), x, np.nan) for x in map(np.asarray, arrays)]


def olofsson(counts, mapped_pixels, classes=None):
    """Olofsson et al. (2014) estimators, strata = map classes. counts: (k, k) sample counts n_ij, rows map class
    (stratum) i, columns reference class j; mapped_pixels: (k,) N_i, pixels mapped as class i; classes: the k class
    ids (default 0..k-1). Area proportions p_ij = W_i n_ij / n_i. (W_i = N_i / N); OA = sum p_ii with variance
    eq. 5; UA_i = p_ii / p_i. (eq. 6); PA_j = p_jj / p_.j (eq. 7); area proportion p_.j with SE eq. 10."""
    n = np.asarray(counts, float)
    size = np.asarray(mapped_pixels, float)
    k = len(size)
    if n.shape != (k, k):
        raise ValueError(f"counts must be ({k}, {k}) for {k} mapped classes, got {n.shape}")
    n_i = n.sum(1)
    if ((size > 0) & (n_i == 0)).any() or ((size == 0) & (n_i > 0)).any():
        raise ValueError(f"every mapped class needs sample points and every sampled row mapped pixels: "
                         f"pixels {size.tolist()}, points {n_i.tolist()}")
    w, d = size / size.sum(), n_i - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(n_i[:, None] > 0, n / n_i[:, None], 0.0)  # within-stratum proportions n_ij / n_i.
        p = w[:, None] * q
        ua, pa = np.where(n_i > 0, np.diag(q), np.nan), np.diag(p) / p.sum(0)
        var_q = q * (1 - q) / d[:, None]  # (n_i. - 1) in the denominators: nan where n_i. < 2
        var_q[size == 0] = 0.0
        oa_var = np.sum(w ** 2 * np.diag(var_q))  # eq. 5
        ua_var = np.diag(var_q)  # eq. 6
        col_pixels = size @ q  # N_.j estimated
        others = (size ** 2) @ var_q - size ** 2 * np.diag(var_q)  # sum over i != j of N_i^2 var_q[i, j]
        pa_var = (size ** 2 * (1 - pa) ** 2 * ua_var + pa ** 2 * others) / col_pixels ** 2  # eq. 7
        area_var = (w ** 2) @ var_q  # eq. 10 squared
    classes = tuple(range(k)) if classes is None else tuple(int(c) for c in classes)
    matrix_se, oa_se, ua, ua_se, pa, pa_se, area_se = _nan_where_inf(
        np.sqrt(w[:, None] ** 2 * var_q), np.sqrt(oa_var), ua, np.sqrt(ua_var), pa, np.sqrt(pa_var), np.sqrt(area_var))
    return Estimates(OLOFSSON, "stratified", classes, {c: int(m) for c, m in zip(classes, n_i)},
                     {c: int(s) for c, s in zip(classes, size)}, p, matrix_se, float(np.trace(p)), float(oa_se), ua,
                     ua_se, pa, pa_se, p.sum(0), area_se)


def stehman(strata, map_class, ref_class, stratum_sizes, classes=None, design="stratified", fpc=False):
    """Stehman (2014) estimators for stratified random sampling whose strata need not be the map classes.

    strata, map_class, ref_class: (n,) per sample point; stratum_sizes: {stratum: N_h pixels}; classes: class ids
    to report (default: those seen). Every target is a stratified estimate of a 0/1 indicator y_u: map = ref
    (OA, eq. 12), ref = k (area, eq. 14), map = i and ref = j (p_ij, eq. 16); UA and PA are ratios R = Y/X of two
    (y_u: map = ref = k; x_u: map = k (eq. 19) or ref = k (eq. 23)). Estimate Y = sum_h N_h ybar_h; variance of a
    proportion sum_h N_h^2 f_h s2_yh / n_h / N^2; of a ratio sum_h N_h^2 f_h (s2_yh + R^2 s2_xh - 2 R s_xyh) / n_h
    / X^2. f_h = 1 - n_h / N_h (Stehman's finite population correction) with `fpc`; by default f_h = 1, as in
    Olofsson et al. 2014 eqs. 5-7 and 10, whose estimates these then equal exactly when the strata are the map
    classes (the correction is negligible for n_h << N_h; leaving it out is conservative). Each indicator (and
    y - R x) is a function of the point's (map, ref) cell, so s2 follows from the stratum's cell shares c_h:
    s2_yh = n_h / (n_h - 1) sum_cells c_h (y - ybar_h)^2."""
    s, m, r = (np.asarray(a).ravel().astype(np.int64) for a in (strata, map_class, ref_class))
    if not len(s) == len(m) == len(r):
        raise ValueError(f"strata, map_class and ref_class differ in length: {len(s)}, {len(m)}, {len(r)}")
    hs = np.array(sorted(stratum_sizes), np.int64)
    unknown = sorted(set(s.tolist()) - set(hs.tolist()))
    if unknown:
        raise ValueError(f"sample strata {unknown} have no size in stratum_sizes {stratum_sizes}")
    extra = set() if classes is None else {int(c) for c in classes}
    classes = np.array(sorted(set(m.tolist()) | set(r.tolist()) | extra), np.int64)
    k, size = len(classes), np.array([stratum_sizes[h] for h in hs], float)
    cell = np.searchsorted(classes, m) * k + np.searchsorted(classes, r)
    c = np.bincount(np.searchsorted(hs, s) * k * k + cell, minlength=len(hs) * k * k).reshape(len(hs), k * k)
    n_h = c.sum(1)
    if ((size > 0) != (n_h > 0)).any():
        raise ValueError(f"every stratum with pixels needs sample points and vice versa: strata {hs.tolist()}, "
                         f"pixels {size.tolist()}, points {n_h.tolist()}")
    share = c / np.maximum(n_h, 1)[:, None]  # c_h: the stratum's cell shares, (H, k*k)
    f_h = 1 - n_h / np.maximum(size, 1) if fpc else 1.0
    coef = np.where(size == 0, 0.0, np.where(n_h > 1, size ** 2 * f_h / np.maximum(n_h - 1, 1), np.nan))
    total, big_n = size @ share, size.sum()
    eye = np.eye(k)
    row_sel, col_sel, diag_sel = np.kron(eye, np.ones(k)), np.kron(np.ones(k), eye), np.zeros((k, k * k))
    diag_sel[np.arange(k), np.arange(k) * (k + 1)] = 1  # rows select cells (i, .), (., j), (k, k)

    def var(a):  # variance of the estimated totals a @ total, one per row of a: sum_h N_h^2 s2_h / n_h
        dev = a[None] - (share @ a.T)[:, :, None]  # (H, rows, k*k): each cell's value minus the stratum mean
        return coef @ np.einsum("hrc,hc->hr", dev ** 2, share)

    def ratio(x_sel):
        with np.errstate(divide="ignore", invalid="ignore"):
            est = diag_sel @ total / (x_sel @ total)
            return _nan_where_inf(est, np.sqrt(var(diag_sel - est[:, None] * x_sel)) / (x_sel @ total))

    ua, ua_se = ratio(row_sel)
    pa, pa_se = ratio(col_sel)
    oa_sel = eye.reshape(1, k * k)
    return Estimates(STEHMAN, design, tuple(classes.tolist()), dict(zip(hs.tolist(), n_h.tolist())),
                     dict(zip(hs.tolist(), size.astype(np.int64).tolist())), (total / big_n).reshape(k, k),
                     np.sqrt(var(np.eye(k * k))).reshape(k, k) / big_n, float((oa_sel @ total)[0] / big_n),
                     float(np.sqrt(var(oa_sel))[0] / big_n), ua, ua_se, pa, pa_se, col_sel @ total / big_n,
                     np.sqrt(var(col_sel)) / big_n)


def estimate(sample, reference, classes=None, fpc=False):
    """Stehman (2014) estimates (`stehman`) for a `Sample` and its reference labels (n,), in the sample's order."""
    reference = np.asarray(reference)
    if reference.shape != (len(sample),):
        raise ValueError(f"{len(sample)} sample points but reference has shape {reference.shape}: one class each")
    return stehman(sample.stratum, sample.map_class, reference, sample.stratum_sizes, classes, sample.design, fpc)

# --------------------------------------------------------------------------- tables


def _name(names, c):
    try:
        return str(names[c])
    except (IndexError, KeyError, TypeError):
        return str(c)


def table_rows(result, class_names, pixel_area_m2=None):
    """One dict per estimate (quantity, map_class, reference_class, estimate, se, ci95_low, ci95_high, unit, basis):
    the error matrix in proportions of area, OA, UA per map class, PA per reference class, and the error-adjusted
    area of each reference class as a proportion, in pixels and, given `pixel_area_m2`, in m² and ha."""
    basis = f"design-based estimate, {result.design} random sample, n = {result.n} ({result.method})"
    names, rows = [_name(class_names, c) for c in result.classes], []

    def add(quantity, est, se, unit, map_class="", reference_class=""):
        rows.append(dict(quantity=quantity, map_class=map_class, reference_class=reference_class, estimate=est,
                         se=se, ci95_low=est - Z95 * se, ci95_high=est + Z95 * se, unit=unit, basis=basis))

    for i, a in enumerate(names):
        for j, b in enumerate(names):
            add("error_matrix", result.matrix[i, j], result.matrix_se[i, j], "proportion of area", a, b)
    add("overall_accuracy", result.oa, result.oa_se, "proportion")
    for i, a in enumerate(names):
        add("users_accuracy", result.ua[i], result.ua_se[i], "proportion", map_class=a)
    for j, b in enumerate(names):
        add("producers_accuracy", result.pa[j], result.pa_se[j], "proportion", reference_class=b)
    pixels, pixels_se = result.area_in()
    units = [("area_proportion", 1 / result.total_pixels, "proportion"), ("area", 1.0, "pixels")]
    if pixel_area_m2 is not None:
        if not (pixel_area_m2 > 0 and math.isfinite(pixel_area_m2)):
            raise ValueError(f"pixel_area_m2 must be a positive number, got {pixel_area_m2!r}")
        units += [("area", pixel_area_m2, "m2"), ("area", pixel_area_m2 / 1e4, "ha")]
    for quantity, factor, unit in units:
        for j, b in enumerate(names):
            add(quantity, pixels[j] * factor, pixels_se[j] * factor, unit, reference_class=b)
    return [{k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in r.items()} for r in rows]


def _pm(est, se, decimals=None):
    """'estimate ± 1.96 SE' for a Markdown cell; decimals None: to two significant digits of the half-width."""
    if not np.isfinite(est):
        return "n/a"
    half = Z95 * se
    if decimals is None:
        scale = half if np.isfinite(half) and half > 0 else abs(est)
        decimals = max(0, 1 - math.floor(math.log10(scale))) if scale > 0 else 0
    return f"{est:,.{decimals}f} ± " + (f"{half:,.{decimals}f}" if np.isfinite(half) else "n/a")


def _markdown(result, class_names, pixel_area_m2, mapped_pixels=None, labelled=None):
    names = [_name(class_names, c) for c in result.classes]
    stratum = {h: _name(class_names, h) if h in result.classes else str(h) for h in result.n_per_stratum}
    if result.design == "simple":
        design = f"simple random sampling of {result.n} pixels"
    else:
        design = f"stratified random sampling, n = {result.n} sample points (per stratum: " + ", ".join(
            f"{stratum[h]} {n} of {result.stratum_sizes[h]:,} pixels" for h, n in result.n_per_stratum.items()) + ")"
    lines = ["# Map accuracy and class areas: design-based estimates", "",
             f"Design-based estimates from a probability sample drawn from the map ({result.method} estimators): "
             f"{design}; the population is {result.total_pixels:,} pixels. Each figure is the estimate ± the "
             "half-width of its 95 % confidence interval (1.96 standard errors). Areas are error-adjusted estimates "
             "of the area of each reference class, not pixel counts of the map. None of these is a score on "
             "training or held-out clicks (Olofsson et al. 2014, Remote Sens. Environ. 148; Stehman 2014, "
             "Int. J. Remote Sens. 35(13)).", ""]
    if labelled is not None:
        lines += [f"{labelled[0]} of the {labelled[1]} points drawn are labelled; the estimates use those.", ""]
    lines += [f"Overall accuracy: {_pm(result.oa, result.oa_se, 3)}", ""]
    pixels, pixels_se = result.area_in()
    mapped_total = sum(mapped_pixels.values()) if mapped_pixels else 0
    head = ["class", "user's accuracy", "producer's accuracy"]
    head += ["share of the map (pixel count)"] if mapped_total else []
    head += ["area proportion (estimated)", "area (pixels)"]
    head += ["area (m²)", "area (ha)"] if pixel_area_m2 is not None else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j, name in enumerate(names):
        cells = [name, _pm(result.ua[j], result.ua_se[j], 3), _pm(result.pa[j], result.pa_se[j], 3)]
        if mapped_total:
            cells.append(f"{mapped_pixels.get(result.classes[j], 0) / mapped_total:.4f}")
        cells += [_pm(result.area[j], result.area_se[j], 4), _pm(pixels[j], pixels_se[j])]
        if pixel_area_m2 is not None:
            cells += [_pm(pixels[j] * f, pixels_se[j] * f) for f in (pixel_area_m2, pixel_area_m2 / 1e4)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Error matrix in estimated proportions of area (rows: map class, columns: reference class):", "",
              "| map \\ reference | " + " | ".join(names) + " | total |", "|" + "---|" * (len(names) + 2)]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{p:.4f}" for p in result.matrix[i]) +
                     f" | {result.matrix[i].sum():.4f} |")
    lines.append("| total | " + " | ".join(f"{p:.4f}" for p in result.matrix.sum(0))
                 + f" | {result.matrix.sum():.4f} |")
    return "\n".join(lines) + "\n"


def write_tables(result, out_prefix, class_names, pixel_area_m2=None, overwrite=False, mapped_pixels=None,
                 labelled=None):
    """Write `<out_prefix>.csv` (`table_rows`) and `<out_prefix>.md` (the design, OA, UA / PA / area per class with
    95 % intervals, the error matrix). class_names: a sequence or dict by class id; strata with a class's id are
    named like it (draw_sample's strata are map classes). `mapped_pixels` {class: pixels of the map}: the share of
    the map each class covers, shown beside the estimated one; `labelled` (labelled, drawn): said in the text. An
    existing file is an error unless `overwrite`. Returns (csv_path, md_path)."""
    paths = Path(f"{out_prefix}.csv"), Path(f"{out_prefix}.md")
    for path in paths:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists: pass overwrite=True to replace it, or choose another prefix")
    rows = table_rows(result, class_names, pixel_area_m2)
    markdown = _markdown(result, class_names, pixel_area_m2, mapped_pixels, labelled)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths[1].write_text(markdown)
    return paths
