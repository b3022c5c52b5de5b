"""assessment.py: the published worked examples (Olofsson et al. 2014 section 5, Stehman 2014's numerical example)
to their printed digits, Stehman = Olofsson when the strata are the map classes, a hand-computed case, the sampling
design (allocation, a seeded draw that avoids nodata and excluded pixels) and the 95 % intervals' coverage."""

import csv

import numpy as np
import pytest

import assessment
from assessment import Z95

# Olofsson et al. (2014) section 5, Table 8: rows map class (= stratum), columns reference class
OLOFSSON_NAMES = ("deforestation", "forest gain", "stable forest", "stable non-forest")
OLOFSSON_COUNTS = np.array([[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]])
OLOFSSON_PIXELS = np.array([200_000, 150_000, 3_200_000, 6_450_000])  # 30 m pixels, 0.09 ha

# Stehman (2014) Table 2: 10 points in each of the strata 1..4 (here 0..3), classes A..D (here 0..3)
STEHMAN_STRATA = np.repeat([0, 1, 2, 3], 10)
STEHMAN_MAP = np.array(["ABCD".index(c) for c in "AAAAAAABBB" "ABBBBBBBBB" "BBCCCCCCBB" "DDDDDDDDDD"])
STEHMAN_REF = np.array(["ABCD".index(c) for c in "AAAAACBABC" "ABBBBBAABB" "CCCCCDDBBA" "DDDDDDDCCB"])
STEHMAN_SIZES = {0: 40_000, 1: 30_000, 2: 20_000, 3: 10_000}


def points_from_counts(counts):
    """(map, ref) per sample point from an error matrix of counts."""
    k = len(counts)
    cells = np.repeat(np.arange(k * k), np.asarray(counts).ravel())
    return cells // k, cells % k


# --------------------------------------------------------------------------- published worked examples


def test_olofsson_2014_section_5_to_the_printed_digits():
    est = assessment.olofsson(OLOFSSON_COUNTS, OLOFSSON_PIXELS)
    ha, ha_se = est.area_in(0.09)
    ha_half = Z95 * ha_se
    assert np.round(ha).tolist() == [21158, 11686, 285770, 581386]
    assert np.round(ha_half).tolist() == [6158, 3756, 15510, 16282]
    assert np.round(est.ua, 2).tolist() == [0.88, 0.73, 0.93, 0.96]
    assert np.round(Z95 * est.ua_se, 2).tolist() == [0.07, 0.10, 0.04, 0.02]
    assert np.round(est.pa, 2).tolist() == [0.75, 0.85, 0.93, 0.96]
    # the paper prints ± 0.21, 0.23, 0.03, 0.01; its eq. 7 gives 0.2133, 0.2544, 0.0343, 0.0184 (so do mapaccuracy
    # and other implementations): the second and fourth printed half-widths do not follow from the equation
    assert np.round(Z95 * est.pa_se, 4).tolist() == [0.2133, 0.2544, 0.0343, 0.0184]
    assert (round(est.oa, 2), round(Z95 * est.oa_se, 2)) == (0.95, 0.02)
    # Table 9: the error matrix in proportions of area
    assert np.round(est.matrix, 4).tolist() == [[0.0176, 0.0, 0.0013, 0.0011], [0.0, 0.0110, 0.0016, 0.0024],
                                                [0.0019, 0.0, 0.2967, 0.0213], [0.0040, 0.0020, 0.0179, 0.6212]]


def test_olofsson_2014_eq13_sample_size():
    """Section 5.1: target SE(OA) 0.01, expected user's accuracies 0.7, 0.6, 0.9, 0.95 -> n = 641."""
    sizes = dict(enumerate(OLOFSSON_PIXELS.tolist()))
    n_h = assessment.allocate(sizes, target_se=0.01, expected_ua={0: 0.7, 1: 0.6, 2: 0.9, 3: 0.95})
    assert sum(n_h.values()) == 641
    assert min(n_h.values()) >= 50


def test_stehman_2014_numerical_example_to_the_printed_digits():
    est = assessment.stehman(STEHMAN_STRATA, STEHMAN_MAP, STEHMAN_REF, STEHMAN_SIZES)
    A, B, C = 0, 1, 2
    assert (round(est.area[A], 2), round(est.area[C], 2), round(est.oa, 2)) == (0.35, 0.20, 0.63)
    assert (round(est.ua[B], 3), round(est.pa[B], 3), round(est.matrix[B, C], 2)) == (0.574, 0.794, 0.08)
    assert (round(est.area_se[A], 3), round(est.area_se[C], 3), round(est.oa_se, 3)) == (0.082, 0.064, 0.085)
    assert round(est.ua_se[B], 3) == 0.125
    # the paper prints SE(P_B) = 0.114: its s2_xh for stratum 4 was taken as 0 instead of Table 3's 0.1, which
    # gives 0.1142; the equation gives 0.1166
    assert round(est.pa_se[B], 4) == 0.1166


def test_stehman_example_matches_the_r_packages_printed_output():
    """mapac's aa_stratified (no finite population correction) and mapaccuracy's stehman2014 (with it) print
    7 digits for this example."""
    est = assessment.stehman(STEHMAN_STRATA, STEHMAN_MAP, STEHMAN_REF, STEHMAN_SIZES)
    assert est.ua[:3] == pytest.approx([0.7419355, 0.5744681, 0.5], abs=1e-7)
    assert est.ua_se[:3] == pytest.approx([0.1645627, 0.1248023, 0.2151657], abs=1e-7)
    assert est.pa[:3] == pytest.approx([0.6571429, 0.7941176, 0.3], abs=1e-7)
    assert est.pa_se[:3] == pytest.approx([0.1477318, 0.1165671, 0.1504438], abs=1e-7)
    assert np.round(est.matrix, 2).tolist() == [[0.23, 0.04, 0.04, 0.0], [0.12, 0.27, 0.08, 0.0],
                                                [0.0, 0.02, 0.06, 0.04], [0.0, 0.01, 0.02, 0.07]]
    fpc = assessment.stehman(STEHMAN_STRATA, STEHMAN_MAP, STEHMAN_REF, STEHMAN_SIZES, fpc=True)
    assert [fpc.area_se[0], fpc.area_se[2], fpc.oa_se, fpc.ua_se[1], fpc.pa_se[1]] == pytest.approx(
        [0.0822478, 0.06427977, 0.08464219, 0.1247822, 0.1165479], abs=1e-7)


# --------------------------------------------------------------------------- the estimators themselves


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_stehman_equals_olofsson_when_strata_are_the_map_classes(seed):
    if seed is None:
        counts, pixels = OLOFSSON_COUNTS, OLOFSSON_PIXELS
    else:
        rng = np.random.default_rng(seed)
        counts = rng.integers(0, 30, (5, 5)) + np.diag(rng.integers(20, 80, 5))
        pixels = rng.integers(1_000, 1_000_000, 5)
    m, r = points_from_counts(counts)
    order = np.random.default_rng(7).permutation(len(m))  # the order of the points does not matter
    a = assessment.olofsson(counts, pixels)
    b = assessment.stehman(m[order], m[order], r[order], dict(enumerate(pixels.tolist())))
    for name in ("matrix", "matrix_se", "oa", "oa_se", "ua", "ua_se", "pa", "pa_se", "area", "area_se"):
        assert np.allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-15), name
    assert a.n_per_stratum == b.n_per_stratum and a.stratum_sizes == b.stratum_sizes


def test_stehman_hand_computed_with_strata_unlike_the_map_classes():
    """Two strata of 100 and 300 pixels, 4 points each, (map, ref) pairs written out; formulas by hand."""
    strata = [0, 0, 0, 0, 1, 1, 1, 1]
    pairs = [(0, 0), (0, 0), (1, 0), (1, 1), (1, 1), (1, 1), (0, 1), (1, 0)]
    est = assessment.stehman(strata, [p[0] for p in pairs], [p[1] for p in pairs], {0: 100, 1: 300})
    # OA: agreement 3/4 and 2/4, s2 = 1/4 and 1/3
    assert est.oa == pytest.approx((100 * 3 / 4 + 300 * 2 / 4) / 400)
    assert est.oa_se == pytest.approx(np.sqrt(100 ** 2 * (1 / 4) / 4 + 300 ** 2 * (1 / 3) / 4) / 400)
    # UA of class 1: y = map 1 & ref 1 (1/4, 2/4), x = map 1 (2/4, 3/4); s2_y 1/4, 1/3; s2_x 1/3, 1/4; s_xy 1/6, 1/6
    R = (100 * 1 / 4 + 300 * 2 / 4) / (100 * 2 / 4 + 300 * 3 / 4)
    assert est.ua[1] == pytest.approx(7 / 11) and R == pytest.approx(7 / 11)
    v = (100 ** 2 * (1 / 4 + R ** 2 / 3 - 2 * R / 6) / 4 + 300 ** 2 * (1 / 3 + R ** 2 / 4 - 2 * R / 6) / 4) / 275 ** 2
    assert est.ua_se[1] == pytest.approx(np.sqrt(v))
    # area of reference class 0: 3/4 and 1/4 of the points; s2 = 1/4 both
    assert est.area[0] == pytest.approx((100 * 3 / 4 + 300 * 1 / 4) / 400)
    assert est.area_se[0] == pytest.approx(np.sqrt(100 ** 2 / 16 + 300 ** 2 / 16) / 400)
    assert est.matrix.sum() == pytest.approx(1.0)


def test_estimators_refuse_what_they_cannot_estimate():
    with pytest.raises(ValueError, match=r"strata \[5\]"):
        assessment.stehman([5, 5], [0, 1], [0, 1], {0: 10})
    with pytest.raises(ValueError, match="needs sample points"):
        assessment.stehman([0, 0], [0, 1], [0, 1], {0: 10, 1: 20})
    with pytest.raises(ValueError, match="needs sample points"):
        assessment.olofsson([[3, 1], [0, 0]], [10, 20])
    one_point = assessment.stehman([0, 0, 1], [0, 0, 1], [0, 1, 1], {0: 10, 1: 20})
    assert np.isfinite(one_point.oa) and np.isnan(one_point.oa_se)  # a stratum of 1 point: no variance


# --------------------------------------------------------------------------- sampling design


def test_allocate_floor_cap_and_total():
    assert assessment.allocate({0: 600, 1: 400}, n=100, floor=10) == {0: 60, 1: 40}
    n_h = assessment.allocate({0: 1_000_000, 1: 1_000, 2: 30}, n=300, floor=50)
    assert n_h == {0: 220, 1: 50, 2: 30}  # class 2 capped at its pixels, class 1 at the floor, the rest to class 0
    n_h = assessment.allocate({0: 5_000, 1: 3_000, 2: 1_000, 3: 100}, n=401, floor=50)
    assert sum(n_h.values()) == 401 and min(n_h.values()) == 50
    assert n_h[0] / n_h[1] == pytest.approx(5 / 3, rel=0.02)
    with pytest.raises(ValueError, match="floor"):
        assessment.allocate({0: 5_000, 1: 3_000, 2: 1_000}, n=120, floor=50)
    with pytest.raises(ValueError, match="either n"):
        assessment.allocate({0: 5_000}, n=10, target_se=0.01)


def toy_maps():
    """Two maps of classes 0 (most), 1 and 2 (rare); nodata over half of the first; excluded: every class-2 pixel
    of the first map (as if clicked) and a few more, so a draw that ignored nodata or exclusions would hit them."""
    rng = np.random.default_rng(3)
    maps = [rng.choice(3, size=s, p=[0.7, 0.25, 0.05]).astype(np.uint8) for s in ((40, 50), (30, 30))]
    valid = [np.ones(m.shape, bool) for m in maps]
    valid[0][:, :25] = False
    valid[1][-4:] = False
    clicks = {(0, int(r), int(c)) for r, c in zip(*np.nonzero(maps[0] == 2))} | {(1, 5, 5), (1, 6, 7), (1, 0, 29)}
    return maps, valid, clicks


def test_draw_sample_counts_nodata_exclusions_and_seed():
    maps, valid, clicks = toy_maps()
    asked = {0: 20, 1: 15, 2: 10}
    s = assessment.draw_sample(maps, valid, asked, seed=4, exclude=clicks)
    assert {h: int((s.stratum == h).sum()) for h in asked} == asked
    points = list(zip(s.image.tolist(), s.row.tolist(), s.col.tolist()))
    assert len(set(points)) == len(points)  # without replacement
    assert all(valid[i][r, c] for i, r, c in points) and not set(points) & clicks
    assert [maps[i][r, c] for i, r, c in points] == s.map_class.tolist() == s.stratum.tolist()
    assert s.stratum_sizes == assessment.map_counts(maps, valid, exclude=clicks)
    assert sum(s.stratum_sizes.values()) == sum(v.sum() for v in valid) - sum(valid[i][r, c] for i, r, c in clicks)
    assert s.rows() == assessment.draw_sample(maps, valid, asked, seed=4, exclude=clicks).rows()
    assert s.rows() != assessment.draw_sample(maps, valid, asked, seed=5, exclude=clicks).rows()
    masks = [np.zeros(m.shape, bool) for m in maps]
    for i, r, c in clicks:
        masks[i][r, c] = True
    assert s.rows() == assessment.draw_sample(maps, valid, asked, seed=4, exclude=masks).rows()
    assert s.stratum.tolist() != sorted(s.stratum.tolist())  # shuffled: the labelling order hides the stratum


def test_draw_sample_small_stratum_missing_stratum_and_simple_design():
    maps, valid, _ = toy_maps()
    maps[1][:] = np.where(maps[1] == 2, 0, maps[1])
    maps[0][:] = np.where(maps[0] == 2, 0, maps[0])
    maps[0][30, 30:35] = 2  # five (valid) pixels of class 2
    with pytest.warns(UserWarning, match="stratum 2: asked 20 points, it has 5"):
        s = assessment.draw_sample(maps, valid, {0: 20, 1: 20, 2: 20}, seed=0)
    assert int((s.stratum == 2).sum()) == 5 and s.notes
    with pytest.raises(ValueError, match="fewer than 2 sample points"):
        assessment.draw_sample(maps, valid, {0: 20, 1: 20}, seed=0)
    simple = assessment.draw_sample(maps, valid, 30, design="simple", seed=0)
    assert len(simple) == 30 and set(simple.stratum.tolist()) == {0}
    assert simple.stratum_sizes == {0: int(sum(v.sum() for v in valid))}
    est = assessment.estimate(simple, simple.map_class)  # a perfect reference
    assert est.oa == 1.0 and est.oa_se == 0.0 and est.design == "simple"


def test_95_percent_intervals_cover_the_truth():
    """200 stratified samples from a map whose reference is known everywhere: the intervals of OA and of the rare
    class's area cover the population values in about 95 % of them (a wrong variance falls outside 0.88..0.99),
    the estimates are unbiased and their spread matches the estimated variance."""
    rng = np.random.default_rng(11)
    maps = [rng.choice(3, size=(150, 150), p=[0.6, 0.3, 0.1]).astype(np.uint8) for _ in range(2)]
    refs = []
    for m in maps:  # errors: 15 % of class 0, 20 % of class 1, 30 % of class 2 are another class
        wrong = rng.random(m.shape) < np.array([0.15, 0.2, 0.3])[m]
        refs.append(np.where(wrong, (m + rng.integers(1, 3, m.shape)) % 3, m))
    truth = np.array([np.mean([m == r for m, r in zip(maps, refs)]), np.mean([r == 2 for r in refs])])
    est, se = np.zeros((200, 2)), np.zeros((200, 2))
    for seed in range(200):
        s = assessment.draw_sample(maps, None, {0: 100, 1: 100, 2: 100}, seed=seed)
        e = assessment.estimate(s, np.array([refs[i][r, c] for i, r, c in zip(s.image, s.row, s.col)]))
        est[seed], se[seed] = (e.oa, e.area[2]), (e.oa_se, e.area_se[2])
    coverage = np.mean(np.abs(est - truth) <= Z95 * se, axis=0)
    assert ((0.88 <= coverage) & (coverage <= 0.99)).all(), coverage
    assert (np.abs(est.mean(0) - truth) < 3 * est.std(0) / np.sqrt(200)).all()
    ratio = est.var(0, ddof=1) / np.mean(se ** 2, axis=0)
    assert ((0.7 < ratio) & (ratio < 1.4)).all(), ratio


# --------------------------------------------------------------------------- tables


def test_write_tables_csv_markdown_and_no_silent_overwrite(tmp_path):
    est = assessment.olofsson(OLOFSSON_COUNTS, OLOFSSON_PIXELS)
    prefix = tmp_path / "out" / "assessment"
    csv_path, md_path = assessment.write_tables(est, prefix, OLOFSSON_NAMES, pixel_area_m2=900.0)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    ha = next(r for r in rows if r["quantity"] == "area" and r["unit"] == "ha"
              and r["reference_class"] == "deforestation")
    assert round(float(ha["estimate"])) == 21158
    assert round(float(ha["ci95_high"]) - float(ha["estimate"])) == 6158
    assert {r["quantity"] for r in rows} == {"error_matrix", "overall_accuracy", "users_accuracy",
                                             "producers_accuracy", "area_proportion", "area"}
    assert {r["unit"] for r in rows if r["quantity"] == "area"} == {"pixels", "m2", "ha"}
    assert all("design-based" in r["basis"] and "Olofsson" in r["basis"] for r in rows)
    text = md_path.read_text()
    for phrase in ("design-based", "probability sample", "stratified random sampling", "n = 640",
                   "deforestation 75 of 200,000 pixels", "Olofsson et al. 2014", "Stehman 2014",
                   "| deforestation | 0.880 ± 0.074 | 0.749 ± 0.213 |", "21,158 ± 6,158",
                   "Overall accuracy: 0.947"):
        assert phrase in text, phrase
    with pytest.raises(FileExistsError, match="assessment.csv"):
        assessment.write_tables(est, prefix, OLOFSSON_NAMES)
    csv_path.unlink()
    with pytest.raises(FileExistsError, match="assessment.md"):
        assessment.write_tables(est, prefix, OLOFSSON_NAMES)
    assert not csv_path.exists()  # nothing written when one of the two files is in the way
    assessment.write_tables(est, prefix, OLOFSSON_NAMES, overwrite=True)
    with open(csv_path, newline="") as f:
        assert {r["unit"] for r in csv.DictReader(f) if r["quantity"] == "area"} == {"pixels"}
    assert "area (ha)" not in md_path.read_text()
