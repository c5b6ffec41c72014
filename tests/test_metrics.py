"""EDC / pAUC / ERC / agreement metrics: hand-computed cases, a slow reference, properties."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fiqa_gate.evaluation.metrics import (
    EDCCurve,
    agreement,
    bootstrap_means,
    bootstrap_pauc_norm,
    bootstrap_pauc_norms,
    choose_fmr_target,
    edc,
    erc,
    fmr_threshold,
    oracle_curve,
    pair_quality,
    paired_differences,
    pauc,
    percentile_interval,
)

# ----------------------------------------------------------------------------- fixtures

# The hand case. Non-mated scores 0..9 (n = 10) at fmr_target = 0.1: k = floor(0.1 * 10)
# = 1 false match allowed, so tau sits just above the 2nd-highest non-mated score (8):
# tau = nextafter(8, inf); only 9 is a false match (FMR 1/10).
# Mated pairs, sorted by quality:
#   q     0.1   0.2   0.2   0.5   0.9
#   s     20    8     8.5   20    3
#   match yes   NO    yes   yes   NO     (8 < tau: non-match; 8.5 >= tau: match)
# N = 5, 2 non-matches. Distinct qualities 0.1 | 0.2 0.2 | 0.5 | 0.9, so d in {0, 1, 3, 4}:
#   d=0: kept 5, errors 2 -> 2/5 = 0.4,  x = 0
#   d=1: kept 4, errors 2 -> 2/4 = 0.5,  x = 0.2
#   d=3: kept 2, errors 1 -> 1/2 = 0.5,  x = 0.6   (the tied 0.2 pair goes as one block)
#   d=4: kept 1, errors 1 -> 1/1 = 1.0,  x = 0.8
#   end: (1.0, 0.0)
# pAUC_0.2 = 0.4 * (0.2 - 0)                         = 0.08 -> norm 0.08 / (0.4*0.2) = 1.0
# pAUC_0.3 = 0.4 * (0.2 - 0) + 0.5 * (0.3 - 0.2)     = 0.13 -> norm 0.13 / 0.12    = 13/12
# FNMR@10% = value of the step starting at x=0   = 0.4;  FNMR@20% = step at x=0.2 = 0.5
# Oracle (discards the 2 errors first), grid d/5: d=0 2/5 = 0.4, d=1 1/4 = 0.25, d=2 0,
#   then (1, 0). pAUC_0.2 = 0.4*0.2 = 0.08 -> 1.0; pAUC_0.3 = 0.08 + 0.25*0.1 = 0.105
#   -> 0.105 / 0.12 = 0.875.
HAND_MATED_Q = [0.1, 0.2, 0.2, 0.5, 0.9]
HAND_MATED_S = [20.0, 8.0, 8.5, 20.0, 3.0]
HAND_NON_S = [float(v) for v in range(10)]


def hand_case(nonmated_quality: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.array(HAND_MATED_S + HAND_NON_S)
    m = np.array([True] * 5 + [False] * 10)
    q = np.array(HAND_MATED_Q + [nonmated_quality] * 10)
    return s, m, q


def synthetic(
    seed: int, n_mated: int = 2000, n_non: int = 3000, mated_mean: float = 0.45
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian genuine / impostor scores; tau at 1e-3 is ~0.3, so e0 is about 15 %."""
    rng = np.random.default_rng(seed)
    s = np.concatenate([rng.normal(mated_mean, 0.15, n_mated), rng.normal(0.0, 0.1, n_non)])
    m = np.arange(n_mated + n_non) < n_mated
    return s, m


def reference_edc(s, m, q, tau):
    """Slow, literal EDC: loop over the distinct quality values as discard boundaries."""
    s, m, q = np.asarray(s), np.asarray(m, bool), np.asarray(q)
    sm, qm = s[m], q[m]
    n = sm.size
    xs, fs = [], []
    for cut in sorted(set(qm.tolist())):  # discard everything strictly below `cut`
        kept = qm >= cut
        xs.append((n - kept.sum()) / n)
        fs.append(np.sum(sm[kept] < tau) / kept.sum())
    return np.array([*xs, 1.0]), np.array([*fs, 0.0])


# ----------------------------------------------------------------------------- EDC by hand


def test_edc_hand_case_curve_with_ties():
    s, m, q = hand_case()
    r = edc(s, m, q, fmr_target=0.1)
    assert r.tau == np.nextafter(8.0, np.inf)
    assert r.warning is None
    assert (r.n_mated, r.n_nonmated) == (5, 10)
    np.testing.assert_allclose(r.curve.x, [0.0, 0.2, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(r.curve.fnmr, [0.4, 0.5, 0.5, 1.0, 0.0])
    # splitting the 0.2 tie would have produced a point at x = 2/5
    assert not np.any(np.isclose(r.curve.x, 0.4))
    assert r.e0 == pytest.approx(0.4)


def test_edc_plot_shows_a_curve_that_rises_above_e0():
    # the plot stopped at 1.25 e0, so a scorer worse than random ran off its top (audit
    # of 2026-12-07); the hand case rises from 0.4 to 0.5 by x = 0.2, and to 1.0 past 0.5
    from fiqa_gate.evaluation.report import edc_top

    r = edc(*hand_case(), fmr_target=0.1)
    assert edc_top({"q": r}) == pytest.approx(0.5 * 1.05)
    assert edc_top({"q": r}, right=0.9) == pytest.approx(1.05)


def test_edc_hand_case_pauc_and_normalisation():
    r = edc(*hand_case(), fmr_target=0.1)
    assert r.pauc[0.2] == pytest.approx(0.08)
    assert r.pauc[0.3] == pytest.approx(0.13)
    assert r.pauc_norm[0.2] == pytest.approx(1.0)
    assert r.pauc_norm[0.3] == pytest.approx(13 / 12)
    assert r.fnmr_at == {0.1: pytest.approx(0.4), 0.2: pytest.approx(0.5)}


def test_edc_hand_case_oracle():
    r = edc(*hand_case(), fmr_target=0.1)
    np.testing.assert_allclose(r.oracle_curve.x, [0.0, 0.2, 0.4, 1.0])
    np.testing.assert_allclose(r.oracle_curve.fnmr, [0.4, 0.25, 0.0, 0.0])
    assert r.oracle_pauc_norm[0.2] == pytest.approx(1.0)
    assert r.oracle_pauc_norm[0.3] == pytest.approx(0.875)


def test_mated_score_equal_to_tau_is_a_match():
    s, m, q = hand_case()
    s[1] = np.nextafter(8.0, np.inf)  # exactly tau: s >= tau is a match
    r = edc(s, m, q, fmr_target=0.1)
    assert r.tau == s[1]
    assert r.e0 == pytest.approx(1 / 5)


def test_edc_ignores_nonmated_quality_with_fixed_threshold():
    a = edc(*hand_case(nonmated_quality=0.0), fmr_target=0.1)
    b = edc(*hand_case(nonmated_quality=1.0), fmr_target=0.1)
    np.testing.assert_array_equal(a.curve.fnmr, b.curve.fnmr)
    assert a.pauc == b.pauc


def test_curve_ends_with_one_zero_even_when_last_block_fails():
    # Every mated pair is a non-match: FNMR is 1 at every kept fraction, then (1, 0).
    s = np.array([0.0, 0.0, 0.0] + [5.0] * 10)
    m = np.array([True] * 3 + [False] * 10)
    q = np.array([0.3, 0.1, 0.2] + [0.0] * 10)
    r = edc(s, m, q, fmr_target=0.1)
    np.testing.assert_allclose(r.curve.x, [0.0, 1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(r.curve.fnmr, [1.0, 1.0, 1.0, 0.0])
    # one quality value for all: no interior boundary, just (0, e0) and (1, 0)
    r1 = edc(s, m, np.zeros(13), fmr_target=0.1)
    np.testing.assert_allclose(r1.curve.x, [0.0, 1.0])
    np.testing.assert_allclose(r1.curve.fnmr, [1.0, 0.0])
    assert r1.pauc[0.3] == pytest.approx(0.3)


def test_pauc_arithmetic_on_explicit_step_function():
    # steps: 0.5 on [0, 0.1), 0.3 on [0.1, 0.25), 0.2 on [0.25, 1), 0 at 1
    c = EDCCurve(x=np.array([0.0, 0.1, 0.25, 1.0]), fnmr=np.array([0.5, 0.3, 0.2, 0.0]))
    # L=0.2: 0.5*0.1 + 0.3*(0.2-0.1)                 = 0.05 + 0.03         = 0.08
    # L=0.3: 0.5*0.1 + 0.3*0.15 + 0.2*(0.3-0.25)     = 0.05 + 0.045 + 0.01 = 0.105
    # L=1.0: 0.05 + 0.045 + 0.2*0.75                                         = 0.245
    assert pauc(c, 0.2) == pytest.approx(0.08)
    assert pauc(c, 0.3) == pytest.approx(0.105)
    assert pauc(c, 1.0) == pytest.approx(0.245)
    assert c.at(0.0) == 0.5
    assert c.at(0.1) == 0.3  # right-continuous: a point at exactly x belongs to its step
    assert c.at(0.2499) == 0.3
    with pytest.raises(ValueError):
        pauc(c, 0.0)


def test_e0_zero_gives_nan_normalisation_and_strict_json():
    s = np.array([10.0, 11.0, 12.0, *HAND_NON_S])
    m = np.array([True] * 3 + [False] * 10)
    q = np.array([0.1, 0.2, 0.3] + [0.5] * 10)
    r = edc(s, m, q, fmr_target=0.1)
    assert r.e0 == 0.0
    assert math.isnan(r.pauc_norm[0.2]) and math.isnan(r.oracle_pauc_norm[0.3])
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["pauc_norm"] == {"0.2": None, "0.3": None}
    assert d["pauc"] == {"0.2": 0.0, "0.3": 0.0}
    assert d["curve"]["x"][-1] == 1.0 and d["curve"]["fnmr"][-1] == 0.0


def test_to_dict_roundtrips_the_hand_case():
    d = json.loads(json.dumps(edc(*hand_case(), fmr_target=0.1).to_dict(), allow_nan=False))
    assert d["curve"]["fnmr"] == pytest.approx([0.4, 0.5, 0.5, 1.0, 0.0])
    assert d["pauc_norm"]["0.3"] == pytest.approx(13 / 12)
    assert d["fnmr_at"] == {"0.1": pytest.approx(0.4), "0.2": pytest.approx(0.5)}
    assert d["n_mated"] == 5 and d["warning"] is None


# ----------------------------------------------------------------------------- threshold


def test_tau_picks_the_second_highest_of_1000():
    rng = np.random.default_rng(3)
    non = rng.permutation(np.arange(1000, dtype=float))  # 0..999, shuffled
    tau = fmr_threshold(non, 1e-3)
    # k = floor(1e-3 * 1000) = 1 allowed false match: tau just above 998, only 999 passes
    assert tau == np.nextafter(998.0, np.inf)
    assert np.mean(non >= tau) == pytest.approx(1e-3)
    # it is the smallest such float: one ulp lower lets 998 through (FMR 2e-3)
    assert np.mean(non >= np.nextafter(tau, -np.inf)) > 1e-3


def test_tau_order_statistic_for_other_sizes_and_ties():
    rng = np.random.default_rng(4)
    non = rng.normal(size=2500)
    # k = floor(2.5) = 2: tau just above the 3rd-highest score
    assert fmr_threshold(non, 1e-3) == np.nextafter(np.sort(non)[-3], np.inf)
    # three tied top scores cannot be split: FMR would be 3e-3 > 1e-3, so tau clears them
    tied = np.concatenate([np.zeros(997), [5.0, 5.0, 5.0]])
    assert fmr_threshold(tied, 1e-3) == np.nextafter(5.0, np.inf)
    # fewer than 1/target scores: k = 0, tau just above the maximum
    assert fmr_threshold([0.1, 0.7, 0.3], 1e-3) == np.nextafter(0.7, np.inf)


def test_choose_fmr_target_fallback():
    assert choose_fmr_target(1000) == (1e-3, None)
    assert choose_fmr_target(50_000) == (1e-3, None)
    target, warning = choose_fmr_target(999)
    assert target == 1e-2 and warning is not None and "999" in warning
    assert "fewer than 100" not in warning  # 999 still supports 1e-2: no second complaint
    _, warning = choose_fmr_target(40)
    assert warning is not None and "fewer than 100" in warning


def test_edc_falls_back_to_1e2_with_warning_when_nonmated_few():
    s, m = synthetic(0, n_mated=200, n_non=500)
    q = np.random.default_rng(0).random(s.size)
    r = edc(s, m, q)
    assert r.fmr_target == 1e-2
    assert r.warning is not None and "1e-2" not in r.warning and "0.01" in r.warning
    assert r.tau == fmr_threshold(s[~m], 1e-2)
    s, m = synthetic(0, n_mated=200, n_non=1000)
    q = np.random.default_rng(0).random(s.size)
    r = edc(s, m, q)
    assert r.fmr_target == 1e-3 and r.warning is None
    # an explicit target is honoured, but its weak support is still reported
    r = edc(s, m, q, fmr_target=1e-4)
    assert r.fmr_target == 1e-4 and r.warning is not None


# ----------------------------------------------------------------------------- random / oracle


def test_random_quality_normalised_pauc_is_about_one():
    s, m = synthetic(1)
    values = {0.2: [], 0.3: []}
    for seed in range(30):
        q = np.random.default_rng(100 + seed).random(s.size)
        r = edc(s, m, q, fmr_target=1e-3)
        for lim in values:
            values[lim].append(r.pauc_norm[lim])
    assert 0.05 < r.e0 < 0.5  # the test only means something with errors to discard
    for lim, v in values.items():
        assert np.mean(v) == pytest.approx(1.0, abs=0.03), lim


def test_oracle_quality_reproduces_the_oracle_curve():
    s, m = synthetic(2)
    # Quality = similarity puts every non-match (s < tau) below every match: an oracle.
    r = edc(s, m, s, fmr_target=1e-3)
    grid = np.concatenate([r.curve.x, r.oracle_curve.x])
    got = [r.curve.at(x) for x in grid]
    want = [r.oracle_curve.at(x) for x in grid]
    np.testing.assert_allclose(got, want, atol=1e-12)
    # and the closed form max(0, (e0 - x) / (1 - x)) on the discard grid
    x = r.curve.x[:-1]
    np.testing.assert_allclose(r.curve.fnmr[:-1], np.maximum(0, (r.e0 - x) / (1 - x)), atol=1e-12)
    for lim in (0.2, 0.3):
        assert r.pauc_norm[lim] == pytest.approx(r.oracle_pauc_norm[lim])
        assert r.pauc_norm[lim] < 0.6
    # inverse oracle (worst errors kept longest) is worse than random
    assert edc(s, m, -s, fmr_target=1e-3).pauc_norm[0.2] > 1.0


def test_oracle_curve_function():
    c = oracle_curve(0.5, 4)  # 2 errors of 4: 2/4, 1/3, 0, then (1, 0)
    np.testing.assert_allclose(c.x, [0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(c.fnmr, [0.5, 1 / 3, 0.0, 0.0])
    c = oracle_curve(1.0, 3)  # all errors: FNMR stays 1 until nothing is left
    np.testing.assert_allclose(c.x, [0.0, 1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(c.fnmr, [1.0, 1.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_is_seeded_and_sensible():
    s, m = synthetic(5, n_mated=600, n_non=1500)
    q = np.random.default_rng(6).random(s.size)
    lo, hi = bootstrap_pauc_norm(s, m, q, n_boot=60, seed=7)
    assert (lo, hi) == bootstrap_pauc_norm(s, m, q, n_boot=60, seed=7)
    assert (lo, hi) == bootstrap_pauc_norm(s, m, q, n_boot=60, seed=np.random.default_rng(7))
    assert (lo, hi) != bootstrap_pauc_norm(s, m, q, n_boot=60, seed=8)
    assert lo < hi
    assert lo < 1.0 < hi  # random quality: the interval covers the "knows nothing" value
    # the oracle's interval sits far below 1
    _, hi_o = bootstrap_pauc_norm(s, m, s, n_boot=60, seed=7)
    assert hi_o < lo
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_pauc_norm(s, m, q, n_boot=2, confidence=95)


def test_bootstrap_recomputes_tau_per_resample():
    # Mated scores all 0.5; non-mated [0.6, 0.4, 0 x 8] at FMR 0.1 (k = 1). On the full
    # data tau is just above 0.4, every mated pair matches, e0 = 0: nothing to normalise.
    # A resample holding 0.6 twice or more (p ~ 0.26) puts tau above 0.6, all mated pairs
    # fail, e0 = 1 and the normalised pAUC is exactly 1. With tau frozen from the full
    # data every resample would be NaN.
    s = np.array([0.5] * 6 + [0.6, 0.4] + [0.0] * 8)
    m = np.arange(16) < 6
    q = np.arange(16.0)
    assert edc(s, m, q, fmr_target=0.1).e0 == 0.0
    assert bootstrap_pauc_norm(s, m, q, fmr_target=0.1, n_boot=50, seed=1) == (1.0, 1.0)


def test_bootstrap_all_nan_when_no_errors():
    s = np.array([10.0, 11.0, 12.0, *HAND_NON_S])
    m = np.array([True] * 3 + [False] * 10)
    lo, hi = bootstrap_pauc_norm(s, m, np.arange(13.0), n_boot=5, fmr_target=0.1)
    assert math.isnan(lo) and math.isnan(hi)


def test_scorers_share_resamples_and_paired_differences_call_a_tie_a_tie():
    s, m = synthetic(5, n_mated=600, n_non=1500)
    rng = np.random.default_rng(6)
    noise, other_noise = rng.random(s.size), rng.random(s.size)
    q = {"oracle": s, "noise": noise, "same noise": noise.copy(), "other noise": other_noise}
    values = bootstrap_pauc_norms(s, m, q, n_boot=60, seed=7)
    # each scorer's values are those it gets alone: one set of resamples for all
    np.testing.assert_array_equal(values["noise"],
                                  bootstrap_pauc_norms(s, m, {"x": noise}, n_boot=60,
                                                       seed=7)["x"])
    assert percentile_interval(values["noise"]) == bootstrap_pauc_norm(s, m, noise, n_boot=60,
                                                                       seed=7)
    point = {n: edc(s, m, v).pauc_norm[0.2] for n, v in q.items()}
    by_name = {d.other: d for d in paired_differences(values, point, "noise")}
    assert set(by_name) == {"oracle", "same noise", "other noise"}
    same = by_name["same noise"]  # a scorer against its copy: exactly level, never ahead
    assert same.difference == 0.0 and same.ci == (0.0, 0.0)
    assert same.ahead == same.behind == 0.0
    oracle = by_name["oracle"]  # noise is far worse than the oracle on every resample
    assert oracle.difference > 0.3 and oracle.ci[0] > 0
    assert oracle.ahead == 0.0 and oracle.behind == 1.0
    rival = by_name["other noise"]  # two random scorers: a tie, the interval holds 0
    assert rival.ci[0] < 0 < rival.ci[1] and 0.0 < rival.ahead < 1.0
    assert rival.ahead + rival.behind == pytest.approx(1.0)  # continuous pAUCs never tie
    assert rival.difference == pytest.approx(point["noise"] - point["other noise"])
    flipped = {d.other: d for d in paired_differences(values, point, "oracle")}["noise"]
    assert flipped.ahead == 1.0 and flipped.behind == 0.0 and flipped.ci[1] < 0
    # where higher is better (rank-1), the same differences read the other way round
    higher = {d.other: d for d in paired_differences(values, point, "oracle",
                                                     higher_is_better=True)}["noise"]
    assert higher.ci == flipped.ci and higher.ahead == 0.0 and higher.behind == 1.0


def test_resampling_units_keep_copies_from_passing_for_independent_evidence():
    """Every pair counted four times (as when each face is compared with several
    references) is no new evidence. Resampling pairs then narrows the interval by about
    half; resampling the faces the pairs are made of does not."""
    s, m = synthetic(3, n_mated=400, n_non=1200)
    q = np.random.default_rng(4).random(s.size)
    faces = (np.arange(s.size) * 2, np.arange(s.size) * 2 + 1)  # each pair: two own faces
    copies = 4
    s4, m4, q4 = (np.tile(v, copies) for v in (s, m, q))
    faces4 = (np.tile(faces[0], copies), np.tile(faces[1], copies))

    def width(*args, **kw) -> float:
        lo, hi = bootstrap_pauc_norm(*args, n_boot=150, seed=9, **kw)
        return hi - lo

    by_pairs, by_pairs4 = width(s, m, q), width(s4, m4, q4)
    by_faces, by_faces4 = width(s, m, q, units=faces), width(s4, m4, q4, units=faces4)
    assert by_pairs4 < 0.7 * by_pairs  # false precision
    assert 0.75 * by_faces < by_faces4 < 1.25 * by_faces
    # a pair of two once-seen faces is drawn count_a x count_b times: more spread than a
    # pair drawn alone, so with so few pairs per face the unit interval errs on the wide side
    assert by_pairs < by_faces < 2 * by_pairs
    with pytest.raises(ValueError, match="one unit per side"):
        bootstrap_pauc_norm(s, m, q, n_boot=2, units=(faces[0][:5], faces[1]))


def test_bootstrap_means_draw_units_whole_and_share_resamples():
    """Means over cluster resamples: a unit's elements go in or out together, so four
    copies of each unit give the same spread as one; arrays compared on shared draws."""
    rng = np.random.default_rng(5)
    per_unit = rng.random(60)
    units = np.arange(60)
    once = bootstrap_means({"v": per_unit}, units, n_boot=400, seed=3)["v"]
    four = bootstrap_means({"v": np.repeat(per_unit, 4)}, np.repeat(units, 4), n_boot=400,
                           seed=3)["v"]
    np.testing.assert_allclose(four, once)  # same unit draws, same weighted means
    lo, hi = percentile_interval(once)
    assert lo < per_unit.mean() < hi
    # the textbook spread of a mean of 60 draws: sd / sqrt(60)
    assert once.std() == pytest.approx(per_unit.std() / np.sqrt(60), rel=0.2)
    # resampled one by one, the copies would pass for 240 independent values
    singles = bootstrap_means({"v": np.repeat(per_unit, 4)}, np.arange(240), n_boot=400,
                              seed=3)["v"]
    assert singles.std() < 0.65 * once.std()
    shared = bootstrap_means({"a": per_unit, "b": per_unit + 1.0}, units, n_boot=50)
    np.testing.assert_allclose(shared["b"] - shared["a"], 1.0)
    assert np.isnan(bootstrap_means({"v": []}, [], n_boot=3)["v"]).all()
    with pytest.raises(ValueError, match="5 values for 60 units"):
        bootstrap_means({"v": per_unit[:5]}, units)


# ----------------------------------------------------------------------------- ERC


def test_erc_hand_case():
    # 40 pairs with qualities 0..39; even i = 2j mated with score j + 5, odd i = 2j+1
    # non-mated with score 19 - j (j = 0..19). Step k drops floor(40 k / 20) = 2k pairs,
    # i.e. j < k of both kinds. FMR 1e-3 on <= 20 impostors allows 0 false matches, so
    # tau_k is just above max_{j>=k}(19 - j) = 19 - k. A mated j >= k fails iff
    # j + 5 <= 19 - k, i.e. j in [k, 14 - k]: 15 - 2k failures (0 from k = 8) out of
    # 20 - k kept mated pairs.
    i = np.arange(40)
    j = i // 2
    mated = i % 2 == 0
    s = np.where(mated, j + 5.0, 19.0 - j)
    r = erc(s, mated, i.astype(float))
    k = np.arange(20)
    want = np.maximum(0, 15 - 2 * k) / (20 - k)
    np.testing.assert_allclose(r.discard_fractions, k / 20)
    np.testing.assert_allclose(r.fnmr, want)
    np.testing.assert_allclose(r.tau, np.nextafter(19.0 - k, np.inf))
    area = sum((want[a] + want[a + 1]) / 2 * 0.05 for a in range(19))
    assert r.area == pytest.approx(area)
    assert r.fnmr[0] == pytest.approx(0.75) and r.fnmr[7] == pytest.approx(1 / 13)


def test_erc_discard_count_is_floored():
    # n = 30: step 1 drops floor(1.5) = 1 pair, step 2 floor(3.0) = 3. Sorted by quality:
    # non-mated 10, non-mated 9, then mated 5 / non-mated 0 alternating. FMR 1e-3 on
    # <= 15 impostors allows none: tau clears the highest kept non-mated score.
    #   step 0: tau > 10 -> all mated fail (1.0); step 1 (drop 1): tau > 9 -> 1.0;
    #   step 2 (drop 3): tau > 0 -> all mated match (0.0). Rounding 1.5 up would give 0.
    s = np.array([10.0, 9.0] + [5.0, 0.0] * 14)
    m = np.array([False, False] + [True, False] * 14)
    r = erc(s, m, np.arange(30.0))
    np.testing.assert_allclose(r.fnmr[:3], [1.0, 1.0, 0.0])


def test_erc_recomputes_threshold_unlike_edc():
    # Dropping one low-quality impostor lowers tau and rescues a mated pair under ERC;
    # the fixed-threshold EDC cannot see that (non-mated qualities do not enter it).
    s = np.concatenate([[0.5, 0.9], np.zeros(38)])
    m = np.arange(40) == 0
    q = np.concatenate([[1.0, 0.0], np.linspace(0.1, 0.9, 38)])
    r = erc(s, m, q)
    assert r.fnmr[0] == 1.0 and r.fnmr[1] == 0.0  # 5 % = 2 pairs dropped, incl. the 0.9
    assert edc(s, m, q, fmr_target=1e-2).curve.fnmr[0] == 1.0


def test_erc_nan_when_a_side_runs_out():
    s = np.array([0.9, 0.1, 0.8, 0.2])
    m = np.array([True, False, True, False])
    r = erc(s, m, np.array([0.4, 0.3, 0.2, 0.1]))
    # the last step keeps 4 - floor(19*4/20) = 1 pair: one side empty -> NaN, area NaN
    assert math.isnan(r.fnmr[-1]) and math.isnan(r.area)
    assert r.fnmr[0] == 0.0
    assert json.dumps(r.to_dict(), allow_nan=False)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("s", "m", "q", "match"),
    [
        ([0.1, 0.2], [True, False], [0.5], "equal lengths"),
        ([0.1, 0.2], [False, False], [0.5, 0.5], "no mated"),
        ([0.1, 0.2], [True, True], [0.5, 0.5], "no non-mated"),
        ([0.1, math.nan], [True, False], [0.5, 0.5], "similarity.*NaN"),
        ([0.1, 0.2], [True, False], [math.nan, 0.5], "quality_pair.*NaN"),
        ([0.1, 0.2], [1.0, math.nan], [0.5, 0.5], "mated"),
        ([0.1, 0.2], [0.5, 0.0], [0.5, 0.5], "mated"),
        ([[0.1, 0.2]], [[True, False]], [[0.5, 0.5]], "one-dimensional"),
    ],
)
def test_input_validation(s, m, q, match):
    for fn in (edc, erc, bootstrap_pauc_norm):
        with pytest.raises(ValueError, match=match):
            fn(s, m, q)


def test_bad_targets_and_limits():
    s, m, q = hand_case()
    with pytest.raises(ValueError, match="fmr_target"):
        edc(s, m, q, fmr_target=0.0)
    with pytest.raises(ValueError, match="fmr_target"):
        erc(s, m, q, fmr_target=1.5)
    with pytest.raises(ValueError, match="limit"):
        edc(s, m, q, fmr_target=0.1, limits=(0.2, 1.5))


def test_integer_mated_flags_and_pair_quality():
    s, m, q = hand_case()
    a = edc(s, m.astype(int), q, fmr_target=0.1)
    np.testing.assert_array_equal(a.curve.fnmr, edc(s, m, q, fmr_target=0.1).curve.fnmr)
    np.testing.assert_array_equal(pair_quality([0.2, 0.9], [0.5, 0.1]), [0.2, 0.1])
    with pytest.raises(ValueError):
        pair_quality([0.1, 0.2], [0.3])


# ----------------------------------------------------------------------------- agreement


def test_agreement_monotone_transform():
    x = np.linspace(-2, 3, 40)
    r = agreement(x, np.exp(x))
    assert r["srcc"] == pytest.approx(1.0) and r["krcc"] == pytest.approx(1.0)
    r = agreement(x, -(x**3))
    assert r["srcc"] == pytest.approx(-1.0) and r["krcc"] == pytest.approx(-1.0)


def test_agreement_logistic_fit_recovers_a_logistic():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 10, 200)
    y = (4.0 - 1.0) / (1 + np.exp(-(x - 5.0) / 0.8)) + 1.0  # b1=4, b2=1, b3=5, b4=0.8
    r = agreement(x, y)
    assert r["logistic_fit"] is True
    assert r["plcc"] == pytest.approx(1.0, abs=1e-6)
    assert r["rmse"] == pytest.approx(0.0, abs=1e-4)
    assert stats.pearsonr(x, y).statistic < 0.99  # so the fit really did something
    assert r["score"] == pytest.approx((r["srcc"] + r["plcc"]) / 2)
    # decreasing relation: the fit flips sign, PLCC follows
    r = agreement(x, -y)
    assert r["logistic_fit"] is True and r["plcc"] == pytest.approx(-1.0, abs=1e-6)


def test_agreement_falls_back_to_pearson_when_fit_impossible():
    p, t = np.array([0.0, 1.0, 2.0]), np.array([0.0, 2.0, 1.0])  # 3 points, 4 parameters
    r = agreement(p, t)
    assert r["logistic_fit"] is False
    assert r["plcc"] == pytest.approx(stats.pearsonr(p, t).statistic)
    # RMSE of the least-squares line y = 0.5 + 0.5 x: residuals -0.5, 1, -0.5
    assert r["rmse"] == pytest.approx(math.sqrt(0.5))


def test_agreement_validation():
    with pytest.raises(ValueError, match="equal lengths"):
        agreement([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        agreement([1, 2, math.nan], [1, 2, 3])
    with pytest.raises(ValueError, match="vary"):
        agreement([1, 1, 1], [1, 2, 3])


# ----------------------------------------------------------------------------- properties

# Small integer grids so ties in both similarity and quality are common.
pairs = st.integers(min_value=1, max_value=25).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 6), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.lists(st.integers(0, 4), min_size=n, max_size=n),
        st.permutations(list(range(n + 2))),
    )
)


def _arrays(sim, mated, qual):
    # two fixed pairs guarantee both a mated and a non-mated comparison
    s = np.array([*sim, 3, 3], dtype=float)
    m = np.array([*mated, True, False])
    q = np.array([*qual, 2, 2], dtype=float) / 4
    return s, m, q


@settings(max_examples=150, deadline=None)
@given(pairs)
def test_edc_properties(data):
    sim, mated, qual, perm = data
    s, m, q = _arrays(sim, mated, qual)
    r = edc(s, m, q, fmr_target=0.2)
    x, f = r.curve.x, r.curve.fnmr
    assert x[0] == 0.0 and x[-1] == 1.0 and f[-1] == 0.0
    assert np.all(np.diff(x) > 0) and np.all((x >= 0) & (x <= 1))
    assert np.all((f >= 0) & (f <= 1))
    for lim in (0.2, 0.3):
        assert 0.0 <= r.pauc[lim] <= lim + 1e-12
        if r.e0 > 0:
            assert r.oracle_pauc_norm[lim] <= r.pauc_norm[lim] + 1e-9
    ref_x, ref_f = reference_edc(s, m, q, r.tau)
    np.testing.assert_allclose(x, ref_x)
    np.testing.assert_allclose(f, ref_f)
    # permutation invariance: reordering the pairs changes nothing
    p = np.array(perm)
    rp = edc(s[p], m[p], q[p], fmr_target=0.2)
    assert rp.tau == r.tau
    np.testing.assert_array_equal(rp.curve.x, x)
    np.testing.assert_array_equal(rp.curve.fnmr, f)
    assert rp.pauc == r.pauc


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_erc_properties(data):
    sim, mated, qual, perm = data
    s, m, q = _arrays(sim, mated, qual)
    q = q + np.arange(q.size) * 1e-6  # distinct qualities: ERC breaks ties by input order
    r = erc(s, m, q)
    finite = r.fnmr[np.isfinite(r.fnmr)]
    assert np.isfinite(r.fnmr[0])
    assert np.all((finite >= 0) & (finite <= 1))
    p = np.array(perm)
    rp = erc(s[p], m[p], q[p])
    np.testing.assert_array_equal(rp.fnmr, r.fnmr)


def test_by_degradation_hand_case():
    from fiqa_gate.evaluation.protocol import by_degradation

    blur = {"kind": "defocus"}
    records = [[], [], [blur], [blur], [blur], [{"kind": "jpeg"}, blur]]
    # (probe, clean reference, mated, similarity); the non-mated 0.9 must not count
    rows = [(2, 0, 1, 0.2), (3, 0, 1, 0.5), (4, 0, 1, 0.8), (4, 1, 1, 0.6), (5, 1, 1, 0.1),
            (1, 0, 1, 0.7), (2, 1, 0, 0.9)]
    a, b, mated, sim = (np.array(c) for c in zip(*rows, strict=True))
    mated = mated.astype(bool)
    q = {"right": np.array([9, 9, 1, 2, 3, 0.0]), "wrong": np.array([0, 0, 3, 2, 1, 0.0]),
         "flat": np.array([5, 5, 5, 5, 5, 5.0])}
    got = {r["group"]: r for r in by_degradation(records, sim, mated, a, b, q)}
    assert list(got) == ["clean", "combination", "defocus"]
    assert [got[k]["faces"] for k in got] == [2, 1, 3]
    # face 0: (0.2 + 0.5 + 0.8 + 0.7) / 4; face 1: (0.6 + 0.1 + 0.7) / 3
    assert got["clean"]["mated_similarity"] == pytest.approx((0.55 + 1.4 / 3) / 2)
    assert got["defocus"]["mated_similarity"] == pytest.approx((0.2 + 0.5 + 0.7) / 3)
    assert got["combination"]["mated_similarity"] == pytest.approx(0.1)
    assert got["defocus"]["srcc"] == {"right": pytest.approx(1.0), "wrong": pytest.approx(-1.0),
                                      "flat": None}
    assert got["clean"]["srcc"]["right"] is None  # two faces say nothing about an order


def test_calibration_fit_gives_tied_raw_scores_one_value_whatever_their_order():
    from fiqa_gate.calibration import Calibration, isotonic_fit

    # four undetected faces (raw 0), two of them matched, and one good face
    for order in ([0, 1, 2, 3, 4], [2, 3, 0, 1, 4], [4, 3, 2, 1, 0]):
        raw = np.array([0.0, 0.0, 0.0, 0.0, 1.0])[order]
        matched = np.array([0.0, 0.0, 1.0, 1.0, 1.0])[order]
        x, y = isotonic_fit(raw, matched)
        assert (x, y) == ([0.0, 1.0], [0.5, 1.0])
        assert Calibration(x, y)(np.array([0.0]))[0] == 0.5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=40),
       st.randoms(use_true_random=False))
def test_calibration_fit_is_the_least_squares_monotone_fit(pairs, rnd):
    from scipy.optimize import isotonic_regression

    from fiqa_gate.calibration import isotonic_fit

    rnd.shuffle(pairs)
    raw = np.array([p[0] for p in pairs], dtype=np.float64)
    matched = np.array([p[1] for p in pairs], dtype=np.float64)
    x, y = isotonic_fit(raw, matched)
    values = np.unique(raw)
    means = np.array([matched[raw == v].mean() for v in values])
    counts = np.array([(raw == v).sum() for v in values], dtype=np.float64)
    fitted = isotonic_regression(means, weights=counts).x
    # every raw score maps to its own fitted value, however wide its block
    from fiqa_gate.calibration import Calibration

    np.testing.assert_allclose(Calibration(x, y)(values), fitted, atol=1e-12)
    # knots at the two ends of each block of equal fitted values
    for value in np.unique(fitted.round(12)):
        members = values[np.abs(fitted - value) < 1e-9]
        ends = [k for k, v in zip(x, y, strict=True) if abs(v - value) < 1e-9]
        assert ends[0] <= members.min() and ends[-1] >= members.max()


def test_calibration_fit_leaves_faces_without_a_score_out():
    from fiqa_gate.calibration import isotonic_fit

    # a stand-in for "no score" far below the rest used to pull a knot to -5e8
    x, y = isotonic_fit([np.nan, np.nan, 0.5, 0.5, 0.6, 0.6], [1, 1, 0, 0, 1, 1])
    assert (x, y) == ([0.5, 0.6], [0.0, 1.0])
    with pytest.raises(ValueError, match="no finite raw score"):
        isotonic_fit([np.nan, np.inf], [1, 0])


def test_fpir_threshold_lets_at_most_the_asked_share_of_non_mated_searches_through():
    from fiqa_gate.evaluation.identification import fpir_threshold

    # four searches at FPIR 0.05: the interpolated quantile let 1 in 4 through (audit of
    # 2026-12-07); none may pass, and the share that does is said
    four = np.asarray([0.1, 0.2, 0.3, 0.4], np.float32)
    t, met = fpir_threshold(four, 0.05, 0.4)
    assert met == 0.0 and t > 0.4 and not (four >= t).any()
    # where the quantile gives the asked share exactly, it is kept (the ORL split: 120)
    many = np.random.default_rng(0).random(120).astype(np.float32)
    t, met = fpir_threshold(many, 0.05, 0.4)
    assert t == float(np.quantile(many, 0.95)) and met == 0.05
    # ties at the boundary fail together rather than exceed the share
    tied = np.asarray([0.9, 0.5, 0.5, 0.5] + [0.1] * 16, np.float32)
    t, met = fpir_threshold(tied, 0.1, 0.4)
    assert met == 0.05 and (tied >= t).sum() == 1
    assert fpir_threshold(np.zeros(0, np.float32), 0.05, 0.37) == (0.37, None)


def test_fit_calibration_takes_plain_lists():
    # the README's call with `matched` as a list failed in .astype (audit of 2026-12-07)
    from fiqa_gate.calibration import fit_calibration

    cal = fit_calibration([0.1, 0.2, 0.8, 0.9], [False, False, True, True], "sface")
    assert cal.recognizer == "sface"
    np.testing.assert_allclose(cal(np.array([0.1, 0.9])), [0.0, 1.0])
