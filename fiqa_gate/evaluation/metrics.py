"""Recognition-side metrics for a quality score: EDC/pAUC, ERC, bootstrap CIs, agreement.

Two discard curves live here on purpose. ``edc`` is the ISO/IEC 29794-1 (OFIQ) curve: the
threshold is fixed once on all comparisons, so discarding can only remove errors that
the quality score actually predicted. ``erc`` recomputes the threshold after every
discard step, which is what the CR-FIQA / MagFace evaluation code does; it is kept only
so our numbers can be set next to theirs, not to judge our own scorer.

Conventions used throughout:

* a comparison ``k = (a, b)`` has a similarity ``s_k`` (higher = more alike), a flag
  ``mated`` and a pair quality ``q_k = min(q_a, q_b)`` (see :func:`pair_quality`);
* a *match* is ``s_k >= tau``; a *non-match* is ``s_k < tau``;
* ``tau`` is chosen on the non-mated scores by :func:`fmr_threshold`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special, stats

DEFAULT_FMR_TARGET = 1e-3
FALLBACK_FMR_TARGET = 1e-2
DEFAULT_LIMITS = (0.2, 0.3)
FNMR_AT = (0.1, 0.2)
ERC_FRACTIONS = np.arange(20) / 20  # 0, 0.05, ..., 0.95

__all__ = [
    "EDCCurve",
    "EDCResult",
    "ERCResult",
    "PairedDifference",
    "agreement",
    "bootstrap_pauc_norm",
    "bootstrap_pauc_norms",
    "choose_fmr_target",
    "edc",
    "erc",
    "fmr_threshold",
    "oracle_curve",
    "pair_quality",
    "paired_differences",
    "pauc",
    "percentile_interval",
]


# --------------------------------------------------------------------------- helpers


def _json_float(v: float) -> float | None:
    """NaN/inf become None: strict JSON has no spelling for them."""
    v = float(v)
    return v if math.isfinite(v) else None


def _json_map(d: Mapping[float, float]) -> dict[str, float | None]:
    # str(float) keys are exact and short ("0.2"); json.dumps would stringify anyway.
    return {str(float(k)): _json_float(v) for k, v in d.items()}


def _as_1d_float(name: str, a: ArrayLike) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
    return arr


def _as_1d_bool(name: str, a: ArrayLike) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.size and not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be boolean or 0/1, got dtype {arr.dtype}")
    # A float 0.5 or a NaN would silently become True under astype(bool): refuse it.
    if arr.size and not np.all(np.isin(arr, (0, 1))):
        raise ValueError(f"{name} must contain only True/False or 0/1 (NaN is not allowed)")
    return arr.astype(bool)


def _validate_pairs(
    similarity: ArrayLike, mated: ArrayLike, quality_pair: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = _as_1d_float("similarity", similarity)
    m = _as_1d_bool("mated", mated)
    q = _as_1d_float("quality_pair", quality_pair)
    if not (len(s) == len(m) == len(q)):
        raise ValueError(
            f"similarity, mated and quality_pair must have equal lengths, "
            f"got {len(s)}, {len(m)} and {len(q)}"
        )
    if not m.any():
        raise ValueError("no mated comparisons: FNMR (and hence any EDC/ERC) is undefined")
    if m.all():
        raise ValueError("no non-mated comparisons: the FMR threshold cannot be set")
    return s, m, q


def _check_target(fmr_target: float) -> float:
    t = float(fmr_target)
    if not 0.0 < t < 1.0:
        raise ValueError(f"fmr_target must lie in (0, 1), got {fmr_target}")
    return t


def _allowed_false_matches(n: int, target: float) -> int:
    """Largest k with k / n <= target, compared as the float fractions the definition uses."""
    k = min(math.floor(target * n), n)
    while k < n and (k + 1) / n <= target:  # guard against target * n rounding down
        k += 1
    while k > 0 and k / n > target:  # ... or up
        k -= 1
    return k


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    # Written out: np.trapz was renamed in numpy 2 and we support both.
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


# --------------------------------------------------------------------------- threshold


def pair_quality(qa: ArrayLike, qb: ArrayLike) -> np.ndarray:
    """Pair quality ``min(q_a, q_b)``: a comparison is only as good as its worse image."""
    a, b = np.asarray(qa, dtype=np.float64), np.asarray(qb, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"qa and qb must have the same shape, got {a.shape} and {b.shape}")
    return np.minimum(a, b)


def choose_fmr_target(n_nonmated: int) -> tuple[float, str | None]:
    """Pick the FMR target the non-mated set can support, and say so if it had to relax.

    An empirical FMR of ``t`` needs at least ``1/t`` non-mated scores to mean anything,
    so 1e-3 is used from 1000 non-mated comparisons on and 1e-2 below that. The second
    element is a human-readable warning when the fallback happened, else ``None``.
    """
    n = int(n_nonmated)
    if n >= round(1 / DEFAULT_FMR_TARGET):
        return DEFAULT_FMR_TARGET, None
    msg = (
        f"only {n} non-mated comparisons (< {round(1 / DEFAULT_FMR_TARGET)}): "
        f"FMR target relaxed from {DEFAULT_FMR_TARGET:g} to {FALLBACK_FMR_TARGET:g}"
    )
    if n < round(1 / FALLBACK_FMR_TARGET):
        msg += (
            f"; still fewer than {round(1 / FALLBACK_FMR_TARGET)}, so tau just clears the "
            f"highest non-mated scores and is noisy"
        )
    return FALLBACK_FMR_TARGET, msg


def fmr_threshold(nonmated_similarity: ArrayLike, fmr_target: float = DEFAULT_FMR_TARGET) -> float:
    """The smallest float64 ``tau`` with ``mean(nonmated >= tau) <= fmr_target``.

    With ``k = floor(fmr_target * n)`` false matches allowed and the non-mated scores
    sorted descending ``s_(0) >= s_(1) >= ...``, this is ``nextafter(s_(k), +inf)``: just
    above the (k+1)-th highest non-mated score, so that exactly the top ``k`` scores (or
    fewer, with ties) are false matches. Any ``t`` in ``(s_(k), s_(k-1)]`` gives the same
    empirical FMR; taking the smallest is the least strict threshold meeting the target,
    i.e. the one with the lowest FNMR. With fewer than ``1/fmr_target`` scores ``k = 0``
    and tau lies just above the highest non-mated score.
    """
    s = _as_1d_float("nonmated_similarity", nonmated_similarity)
    if s.size == 0:
        raise ValueError("no non-mated scores: the FMR threshold is undefined")
    target = _check_target(fmr_target)
    k = _allowed_false_matches(s.size, target)
    if k >= s.size:  # unreachable for target < 1, kept so the definition is total
        return -math.inf
    # (k+1)-th largest == index n-1-k of the ascending order; partition is O(n).
    v = np.partition(s, s.size - 1 - k)[s.size - 1 - k]
    return float(np.nextafter(v, np.inf))


# --------------------------------------------------------------------------- EDC


@dataclass(frozen=True)
class EDCCurve:
    """A right-continuous step function: FNMR is ``fnmr[i]`` on ``[x[i], x[i+1])``."""

    x: np.ndarray
    fnmr: np.ndarray

    def at(self, x: float) -> float:
        """Step value at ``x``: the FNMR of the last point with ``x_i <= x``."""
        i = int(np.searchsorted(self.x, x, side="right")) - 1
        if i < 0:
            raise ValueError(f"x={x} lies before the start of the curve")
        return float(self.fnmr[i])

    def to_dict(self) -> dict[str, list[float]]:
        return {"x": [float(v) for v in self.x], "fnmr": [float(v) for v in self.fnmr]}


def pauc(curve: EDCCurve, limit: float) -> float:
    """Area under the step curve on ``[0, limit]``: sum of ``fnmr_i * (min(x_{i+1}, L) - x_i)``."""
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"pAUC limit must lie in (0, 1], got {limit}")
    x0, x1, f = curve.x[:-1], curve.x[1:], curve.fnmr[:-1]
    keep = x0 < limit
    return float(np.sum(f[keep] * (np.minimum(x1[keep], limit) - x0[keep])))


def _edc_steps(quality_mated: np.ndarray, nonmatch: np.ndarray) -> EDCCurve:
    """EDC of the mated pairs; discards stop only between distinct quality values.

    Cutting inside a tie would make the curve depend on the input order of pairs
    the score cannot tell apart, so tied pairs are always discarded together.
    """
    n = quality_mated.size
    order = np.argsort(quality_mated, kind="stable")
    q = quality_mated[order]
    discarded_errors = np.concatenate(([0], np.cumsum(nonmatch[order], dtype=np.int64)))
    d = np.concatenate(([0], np.flatnonzero(q[1:] != q[:-1]) + 1))
    fnmr = (discarded_errors[-1] - discarded_errors[d]) / (n - d)
    return EDCCurve(
        x=np.append(d / n, 1.0),  # d/n, not d*(1/n): exact at decimal fractions like 0.1
        fnmr=np.append(fnmr, 0.0),
    )


def oracle_curve(e0: float, n_mated: int) -> EDCCurve:
    """The exact oracle's EDC: it discards the non-matching mated pairs first, one by one.

    On the grid ``x = d / N`` its FNMR is ``max(0, (e0 - x) / (1 - x))``. The curve stops at
    the first zero (``d = e0 * N``) and then ends at ``(1, 0)``: the rest is all zeros, and
    storing N points for it would bloat the JSON for nothing.
    """
    n = int(n_mated)
    if n <= 0:
        raise ValueError("oracle_curve needs at least one mated comparison")
    n_err = round(float(e0) * n)
    d = np.arange(min(n_err, n - 1) + 1)
    x = d / n
    fnmr = (n_err - d) / (n - d)  # == max(0, (e0 - x) / (1 - x)) on this grid, exactly
    return EDCCurve(x=np.append(x, 1.0), fnmr=np.append(fnmr, 0.0))


@dataclass(frozen=True)
class EDCResult:
    """Everything the fixed-threshold EDC reports; ``to_dict`` gives plain JSON types."""

    tau: float
    fmr_target: float
    e0: float
    pauc: dict[float, float]
    pauc_norm: dict[float, float]
    fnmr_at: dict[float, float]
    curve: EDCCurve
    oracle_curve: EDCCurve
    oracle_pauc_norm: dict[float, float]
    n_mated: int
    n_nonmated: int
    warning: str | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays become lists, dict keys strings, NaN/inf ``None``."""
        return {
            "tau": _json_float(self.tau),
            "fmr_target": float(self.fmr_target),
            "e0": _json_float(self.e0),
            "pauc": _json_map(self.pauc),
            "pauc_norm": _json_map(self.pauc_norm),
            "fnmr_at": _json_map(self.fnmr_at),
            "curve": self.curve.to_dict(),
            "oracle_curve": self.oracle_curve.to_dict(),
            "oracle_pauc_norm": _json_map(self.oracle_pauc_norm),
            "n_mated": int(self.n_mated),
            "n_nonmated": int(self.n_nonmated),
            "warning": self.warning,
        }


def _normalise(area: float, e0: float, limit: float) -> float:
    return area / (e0 * limit) if e0 > 0 else math.nan


def _resolve_target(fmr_target: float | None, n_nonmated: int) -> tuple[float, str | None]:
    if fmr_target is None:
        return choose_fmr_target(n_nonmated)
    target = _check_target(fmr_target)
    need = math.ceil(1 / target - 1e-9)
    if n_nonmated < need:
        return target, (
            f"only {n_nonmated} non-mated comparisons for FMR target {target:g} "
            f"(needs >= {need}): tau just clears the highest non-mated scores"
        )
    return target, None


def edc(
    similarity: ArrayLike,
    mated: ArrayLike,
    quality_pair: ArrayLike,
    fmr_target: float | None = None,
    limits: Iterable[float] = DEFAULT_LIMITS,
) -> EDCResult:
    """Fixed-threshold Error-versus-Discard Characteristic (ISO/IEC 29794-1, OFIQ style).

    ``tau`` is set once on all non-mated scores (``fmr_target=None`` picks it via
    :func:`choose_fmr_target`), then mated pairs are discarded lowest ``quality_pair``
    first. Non-mated qualities are not used: with a fixed tau, discarding can only
    change FNMR, and that is the quantity a quality score is supposed to predict.

    ``pauc_norm[L] = pauc[L] / (e0 * L)``: a quality score that knows nothing keeps FNMR
    at e0 in expectation and scores 1.0, lower is better, the oracle is the floor. When
    ``e0 == 0`` there is no error left to predict and every normalised value is NaN.
    """
    s, m, q = _validate_pairs(similarity, mated, quality_pair)
    lims = tuple(float(v) for v in limits)
    n_mated, n_nonmated = int(m.sum()), int((~m).sum())
    target, warning = _resolve_target(fmr_target, n_nonmated)
    tau = fmr_threshold(s[~m], target)

    nonmatch = s[m] < tau
    curve = _edc_steps(q[m], nonmatch)
    e0 = float(curve.fnmr[0])
    oracle = oracle_curve(e0, n_mated)
    areas = {lim: pauc(curve, lim) for lim in lims}
    return EDCResult(
        tau=tau,
        fmr_target=target,
        e0=e0,
        pauc=areas,
        pauc_norm={lim: _normalise(a, e0, lim) for lim, a in areas.items()},
        fnmr_at={x: curve.at(x) for x in FNMR_AT},
        curve=curve,
        oracle_curve=oracle,
        oracle_pauc_norm={lim: _normalise(pauc(oracle, lim), e0, lim) for lim in lims},
        n_mated=n_mated,
        n_nonmated=n_nonmated,
        warning=warning,
    )


def bootstrap_pauc_norms(
    similarity: ArrayLike,
    mated: ArrayLike,
    quality_pairs: Mapping[str, ArrayLike],
    limit: float = 0.2,
    fmr_target: float | None = None,
    n_boot: int = 200,
    seed: int | np.random.Generator = 0,
    units: tuple[ArrayLike, ArrayLike] | None = None,
) -> dict[str, np.ndarray]:
    """The normalised pAUC of each scorer on the same `n_boot` bootstrap resamples.

    Without `units`, pairs are the resampling unit: mated and non-mated pairs are drawn
    separately, so both counts stay fixed. Pairs that share a face are not independent,
    though, and then that spread is too narrow. `units` gives, for each pair, the unit its
    two faces belong to (a face, or a picture with its degraded copies): units are drawn
    with replacement and a pair enters once for each way its two units were drawn
    (count_a x count_b), as a cluster bootstrap does. Where a unit is in few pairs that
    errs on the wide side (a pair's count varies more than a single draw's).

    tau is recomputed on every resample: it is itself estimated from the non-mated sample,
    and its sampling noise is part of the uncertainty. Every scorer sees the same
    resamples, so two scorers can be compared resample by resample. A resample with
    ``e0 == 0`` (undefined normalisation), or without mated or non-mated pairs, gives NaN.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"pAUC limit must lie in (0, 1], got {limit}")
    checked = {n: _validate_pairs(similarity, mated, q) for n, q in quality_pairs.items()}
    if not checked:
        return {}
    s, m, _ = next(iter(checked.values()))
    target, _ = _resolve_target(fmr_target, int((~m).sum()))
    rng = np.random.default_rng(seed)
    draw = _pair_draws(m, units, rng)
    values = {n: np.full(n_boot, np.nan) for n in checked}
    for b in range(n_boot):
        im, inon = draw()
        if im.size == 0 or inon.size == 0:
            continue
        tau = fmr_threshold(s[inon], target)
        for n, (_, _, q) in checked.items():
            curve = _edc_steps(q[im], s[im] < tau)
            values[n][b] = _normalise(pauc(curve, limit), float(curve.fnmr[0]), limit)
    return values


def _pair_draws(mated: np.ndarray, units: tuple[ArrayLike, ArrayLike] | None,
                rng: np.random.Generator) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """A function giving one bootstrap draw: (mated pair indices, non-mated pair indices)."""
    on, off = np.flatnonzero(mated), np.flatnonzero(~mated)
    if units is None:
        return lambda: (on[rng.integers(0, on.size, on.size)],
                        off[rng.integers(0, off.size, off.size)])
    ua, ub = (np.asarray(u) for u in units)
    if not (ua.shape == ub.shape == mated.shape):
        raise ValueError(f"units must give one unit per side of each of the {mated.size} "
                         f"pairs, got {ua.shape} and {ub.shape}")
    labels, flat = np.unique(np.concatenate([ua, ub]), return_inverse=True)
    ua, ub = flat[:mated.size], flat[mated.size:]

    def draw() -> tuple[np.ndarray, np.ndarray]:
        counts = np.bincount(rng.integers(0, labels.size, labels.size), minlength=labels.size)
        weight = counts[ua] * counts[ub]
        return np.repeat(on, weight[on]), np.repeat(off, weight[off])

    return draw


def bootstrap_means(values: Mapping[str, ArrayLike], units: ArrayLike, n_boot: int = 200,
                    seed: int | np.random.Generator = 0) -> dict[str, np.ndarray]:
    """Each array's mean on the same `n_boot` cluster-bootstrap resamples of `units`.

    `units` gives the unit of each element (the source picture of a probe face, say):
    units are drawn with replacement and an element counts once for each time its unit
    was drawn, so copies of one picture go in or out together. Shared resamples let two
    arrays be compared resample by resample."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    arrays = {n: _as_1d_float(n, v) for n, v in values.items()}
    labels, unit = np.unique(np.asarray(units), return_inverse=True)
    for n, v in arrays.items():
        if v.shape != unit.shape:
            raise ValueError(f"{n}: {v.size} values for {unit.size} units")
    rng = np.random.default_rng(seed)
    out = {n: np.full(n_boot, np.nan) for n in arrays}
    for b in range(n_boot if labels.size else 0):
        # each drawn unit brings at least one element, so the weights never sum to 0
        weight = np.bincount(rng.integers(0, labels.size, labels.size),
                             minlength=labels.size)[unit]
        for n, v in arrays.items():
            out[n][b] = float(weight @ v) / float(weight.sum())
    return out


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap values, NaNs left out."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_pauc_norm(
    similarity: ArrayLike,
    mated: ArrayLike,
    quality_pair: ArrayLike,
    limit: float = 0.2,
    fmr_target: float | None = None,
    n_boot: int = 200,
    seed: int | np.random.Generator = 0,
    confidence: float = 0.95,
    units: tuple[ArrayLike, ArrayLike] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the normalised pAUC (resampling pairs, or `units`, as
    :func:`bootstrap_pauc_norms`); ``(nan, nan)`` if every resample had ``e0 == 0``."""
    values = bootstrap_pauc_norms(similarity, mated, {"q": quality_pair}, limit, fmr_target,
                                  n_boot, seed, units)["q"]
    return percentile_interval(values, confidence)


@dataclass(frozen=True)
class PairedDifference:
    """Scorer A's figure minus scorer B's on shared bootstrap resamples: the interval of the
    difference and the shares of resamples in which A is strictly better and strictly
    worse (both, because two scorers often tie exactly, e.g. when they pick the same
    enrollment image)."""

    other: str
    difference: float
    ci: tuple[float, float]
    ahead: float
    behind: float

    def to_dict(self) -> dict[str, Any]:
        return {"scorer": self.other, "difference": _json_float(self.difference),
                "ci95": [_json_float(v) for v in self.ci], "ahead": _json_float(self.ahead),
                "behind": _json_float(self.behind)}


def paired_differences(resampled: Mapping[str, np.ndarray], point: Mapping[str, float],
                       first: str, higher_is_better: bool = False,
                       confidence: float = 0.95) -> list[PairedDifference]:
    """`first` against every other scorer, from per-resample figures such as
    :func:`bootstrap_pauc_norms`' (lower is better) or rank-1 rates (higher is better).

    A difference inside an interval that holds 0 is a tie at that confidence, however the
    point estimates fall."""
    sign = 1.0 if higher_is_better else -1.0
    out = []
    for name, values in resampled.items():
        if name == first:
            continue
        diff = resampled[first] - values
        gain = sign * diff[np.isfinite(diff)]
        out.append(PairedDifference(
            other=name, difference=float(point[first] - point[name]),
            ci=percentile_interval(diff, confidence),
            ahead=float((gain > 0).mean()) if gain.size else math.nan,
            behind=float((gain < 0).mean()) if gain.size else math.nan))
    return out


# --------------------------------------------------------------------------- ERC


@dataclass(frozen=True)
class ERCResult:
    """ERC with the threshold recomputed at every discard step (CR-FIQA / MagFace style)."""

    discard_fractions: np.ndarray
    fnmr: np.ndarray
    area: float
    tau: np.ndarray
    fmr_target: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "discard_fractions": [float(v) for v in self.discard_fractions],
            "fnmr": [_json_float(v) for v in self.fnmr],
            "area": _json_float(self.area),
            "tau": [_json_float(v) for v in self.tau],
            "fmr_target": float(self.fmr_target),
        }


def erc(
    similarity: ArrayLike,
    mated: ArrayLike,
    quality_pair: ArrayLike,
    fmr_target: float = DEFAULT_FMR_TARGET,
) -> ERCResult:
    """Error-versus-Reject curve as in the CR-FIQA / MagFace evaluation code.

    All pairs (mated and non-mated) are sorted by quality and the lowest
    ``floor(f * n)`` are dropped for ``f = 0, 0.05, ..., 0.95``; tau is recomputed with
    :func:`fmr_threshold` on the kept non-mated pairs and FNMR taken on the kept mated
    ones. Ties are broken by input order (stable sort), as in that code, so unlike
    :func:`edc` the result can depend on pair order when qualities tie. Because tau
    moves, dropping low-quality impostors alone can change FNMR: that is why this curve
    is for comparison with published numbers only. A step with no kept mated or no kept
    non-mated pair has FNMR NaN, which makes ``area`` (trapezoid over the nominal
    fractions) NaN too.
    """
    s, m, q = _validate_pairs(similarity, mated, quality_pair)
    target = _check_target(fmr_target)
    n = s.size
    order = np.argsort(q, kind="stable")
    s, m = s[order], m[order]
    fnmr = np.full(ERC_FRACTIONS.size, math.nan)
    taus = np.full(ERC_FRACTIONS.size, math.nan)
    for i in range(ERC_FRACTIONS.size):
        d = (i * n) // ERC_FRACTIONS.size  # floor(f * n) in integers: no 0.05 rounding
        s_kept, m_kept = s[d:], m[d:]
        if not m_kept.any() or m_kept.all():
            continue
        taus[i] = fmr_threshold(s_kept[~m_kept], target)
        fnmr[i] = float(np.mean(s_kept[m_kept] < taus[i]))
    return ERCResult(
        discard_fractions=ERC_FRACTIONS.copy(),
        fnmr=fnmr,
        area=_trapezoid(ERC_FRACTIONS, fnmr),
        tau=taus,
        fmr_target=target,
    )


# --------------------------------------------------------------------------- agreement


def _logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    # expit instead of 1/(1+exp(-z)): no overflow warnings for far-out x during the fit.
    with np.errstate(divide="ignore", invalid="ignore"):
        return (b1 - b2) * special.expit((x - b3) / abs(b4)) + b2


def _logistic_fit(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Fitted values of the VQEG 4-parameter logistic and its direction (+1 / -1).

    None if the fit is unusable (no convergence, fewer points than parameters, flat).
    """
    spread = float(np.std(pred))
    hi, lo = float(target.max()), float(target.min())
    if stats.spearmanr(pred, target).statistic < 0:  # start on the right branch
        hi, lo = lo, hi
    p0 = [hi, lo, float(np.mean(pred)), spread or 1.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            popt, _ = optimize.curve_fit(_logistic4, pred, target, p0=p0, maxfev=10000)
    except (RuntimeError, ValueError, TypeError):  # no convergence / too few points
        return None
    fitted = _logistic4(pred, *popt)
    if not np.all(np.isfinite(fitted)) or np.ptp(fitted) == 0:
        return None
    return fitted, float(np.sign(popt[0] - popt[1]))


def agreement(pred: ArrayLike, target: ArrayLike) -> dict[str, float | bool]:
    """Agreement of predicted quality with a reference score (MOS or teacher quality).

    SRCC and KRCC are rank measures and need no fit. PLCC and RMSE are taken after the
    standard 4-parameter logistic ``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2`` maps
    ``pred`` onto ``target``'s scale, so a scorer is not penalised for a monotone but
    non-linear scale. PLCC carries the sign of the fitted logistic (negative when it
    decreases): Pearson of fitted vs target alone is positive for a perfectly *reversed*
    predictor, which would hide a sign bug and lift the challenge score; for increasing
    fits this is the standard number. If the fit fails, PLCC falls back to plain Pearson
    and RMSE to a least-squares line, and ``logistic_fit`` is False.
    ``score = (srcc + plcc) / 2`` is the usual challenge score.
    """
    p = _as_1d_float("pred", pred)
    t = _as_1d_float("target", target)
    if p.size != t.size:
        raise ValueError(f"pred and target must have equal lengths, got {p.size} and {t.size}")
    if p.size < 3:
        raise ValueError(f"agreement needs at least 3 samples, got {p.size}")
    if np.ptp(p) == 0 or np.ptp(t) == 0:
        raise ValueError("pred and target must both vary: correlation of a constant is undefined")

    srcc = float(stats.spearmanr(p, t).statistic)
    krcc = float(stats.kendalltau(p, t).statistic)
    fit = _logistic_fit(p, t)
    logistic_ok = fit is not None
    if fit is not None:
        fitted, direction = fit
        plcc = direction * float(stats.pearsonr(fitted, t).statistic)
    else:
        plcc = float(stats.pearsonr(p, t).statistic)
        fitted = np.polyval(np.polyfit(p, t, 1), p)
    rmse = float(np.sqrt(np.mean((fitted - t) ** 2)))
    return {
        "srcc": srcc,
        "plcc": plcc,
        "krcc": krcc,
        "rmse": rmse,
        "score": (srcc + plcc) / 2.0,
        "logistic_fit": logistic_ok,
    }
