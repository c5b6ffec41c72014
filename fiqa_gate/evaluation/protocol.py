"""The verification protocol: which faces are compared, and how a set of scores is judged.

Test set (built-in): ORL identities s31-s40, never trained or tuned on. Each of the 100
images gives its clean face plus `TEST_VARIANTS` degradations drawn with `TEST_SEED`
(fiqa_gate.degradations, every kind the recipes train on and combinations, severity
~ U(0, 1)), so the set mixes good and bad faces as a real enrollment queue does. The
held-out protocol draws instead from kinds no recipe trains on (pixelation, haze, side
shadow, colour cast, salt and pepper, posterisation, glare). A different seed from any
training seed, and identities no training run ever sees.

Comparisons: every face against every clean face (the references an enrollment gallery
holds) cut from another source image (a degraded copy matched against its own original
says nothing about recognition). Mated = same identity. Pair quality = min of the two
scores; EDC at the FMR 1e-3 threshold of these non-mated comparisons (metrics.edc). A large
folder's comparisons of one kind past `MAX_PAIRS` are a seeded uniform sample of that many.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fiqa_gate import degradations
from fiqa_gate.calibration import Calibration, fit_calibration
from fiqa_gate.components import Detector, real_scores
from fiqa_gate.datasets import (
    ORL_TEST,
    Samples,
    build_samples,
    detect_sources,
    identity_folder,
    orl_items,
)
from fiqa_gate.errors import FiqaGateError, one_line
from fiqa_gate.evaluation.metrics import EDCResult, edc, pair_quality

log = logging.getLogger(__name__)

TEST_SEED = 314159
TEST_VARIANTS = 3

# Which candidate pairs (a[i], b[i]) may be compared: a boolean mask over the candidates.
_PairFilter = Callable[[np.ndarray, np.ndarray], np.ndarray]


def load_test_set(detector: Detector, root: str | Path | None = None,
                  variants: int = TEST_VARIANTS, seed: int = TEST_SEED,
                  cache: Path | None = None, progress: str | None = None,
                  kinds: tuple[str, ...] = degradations.KINDS,
                  skipped: list[tuple[str, str]] | None = None) -> Samples:
    """ORL s31-s40 (or an identity folder) with its seeded degradations; cached as .npz.

    `kinds` defaults to the degradations the recipes train on; `degradations.HELD_OUT_KINDS`
    asks how the scorers cope with damage no training run drew. Images left out (unreadable,
    no face) are added to `skipped` as (path, reason).
    """
    if cache is not None and cache.is_file():
        try:
            return Samples.load(cache)
        except Exception as exc:  # truncated, damaged, of another layout: made again
            log.warning("%s cannot be read (%s); the test set is made again", cache,
                        one_line(exc))
    items = orl_items(ORL_TEST) if root is None else identity_folder(root)
    sources = detect_sources(items, detector, skipped=skipped)
    samples = build_samples(sources, detector, variants=variants, seed=seed, kinds=kinds,
                            progress=progress)
    if cache is not None:
        try:
            samples.save(cache)
        except OSError as exc:  # a full or shared cache: the run needs none
            log.warning("the test set could not be cached at %s: %s", cache,
                        exc.strerror or exc)
    return samples


# Past this many comparisons of one kind (mated or non-mated), a seeded uniform sample of
# this many: every pair of a large folder does not fit in memory (LFW, 13 233 images with
# 3 degradations each: ~700 M), and 2 M non-mated pairs put 2 000 past the FMR 1e-3
# threshold, plenty to place it.
MAX_PAIRS = 2_000_000
_BLOCK = 1 << 22


def verification_pairs(identity: Sequence[str | None], source: Sequence[str],
                       clean: Sequence[bool] | np.ndarray | None = None,
                       max_pairs: int = MAX_PAIRS, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, mated): every face `a` against every clean reference `b` from another source
    image (each clean-clean pair once), in order of `a`, then `b`. Without `clean`, every
    face is a reference. Where one kind (mated or non-mated) has more than `max_pairs`
    comparisons, a uniform sample of `max_pairs` of them, drawn with `seed`.

    Comparing against clean references is what an enrollment gallery does, and it keeps
    junk-versus-junk comparisons (two black frames look alike to any recognizer) from
    setting the impostor threshold.
    """
    n = len(identity)
    if len(source) != n or (clean is not None and len(clean) != n):
        raise ValueError("identity, source and clean must have one entry per face")
    ref = np.ones(n, bool) if clean is None else np.asarray(clean, dtype=bool)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    src = np.unique(np.asarray(source), return_inverse=True)[1].reshape(-1)
    ident = np.unique(np.asarray([str(i) for i in identity]), return_inverse=True)[1]
    ident = ident.reshape(-1)
    refs = np.flatnonzero(ref)

    def valid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (src[a] != src[b]) & ~(ref[a] & (a > b))

    rng = np.random.default_rng(seed)
    groups = _IdentityGroups(ident, refs)
    n_mated = int(groups.faces @ groups.refs)
    by_kind = []
    for is_mated, total in ((True, n_mated), (False, n * len(refs) - n_mated)):
        if total <= 4 * max_pairs:  # few enough candidates to list them all
            a, b = (groups.mated_pairs(valid) if is_mated
                    else _nonmated_pairs(n, refs, ident, valid))
            if len(a) > max_pairs:
                keep = np.sort(rng.choice(len(a), max_pairs, replace=False))
                a, b = a[keep], b[keep]
        else:
            a, b = _sample_pairs(n, refs, ident, groups, is_mated, valid, max_pairs, rng)
        by_kind.append((a, b))
    a = np.concatenate([by_kind[0][0], by_kind[1][0]])
    b = np.concatenate([by_kind[0][1], by_kind[1][1]])
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    return a, b, ident[a] == ident[b]


class _IdentityGroups:
    """Faces and references sorted by identity, with where each identity starts."""

    def __init__(self, ident: np.ndarray, refs: np.ndarray) -> None:
        self.faces = np.bincount(ident)  # faces per identity
        self.refs = np.bincount(ident[refs], minlength=len(self.faces))
        self.face_order = np.argsort(ident, kind="stable")
        self.ref_order = refs[np.argsort(ident[refs], kind="stable")]
        self.face_start = np.cumsum(self.faces) - self.faces
        self.ref_start = np.cumsum(self.refs) - self.refs

    def mated_pairs(self, valid: _PairFilter) -> tuple[np.ndarray, np.ndarray]:
        """Every valid mated pair, one identity at a time: only same-identity candidates
        are looked at (a large folder's mated pairs are few, its candidates are not)."""
        parts_a, parts_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for k in np.flatnonzero(self.faces * self.refs):
            a, b = np.meshgrid(
                self.face_order[self.face_start[k]:self.face_start[k] + self.faces[k]],
                self.ref_order[self.ref_start[k]:self.ref_start[k] + self.refs[k]],
                indexing="ij")
            a, b = a.ravel(), b.ravel()
            keep = valid(a, b)
            parts_a.append(a[keep])
            parts_b.append(b[keep])
        a, b = np.concatenate(parts_a), np.concatenate(parts_b)
        order = np.lexsort((b, a))  # the order the caller samples from: by a, then b
        return a[order], b[order]


def _nonmated_pairs(n: int, refs: np.ndarray, ident: np.ndarray, valid: _PairFilter
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Every valid non-mated pair, faces taken in blocks so no block outgrows memory."""
    step = max(1, _BLOCK // max(len(refs), 1))
    parts_a, parts_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, n, step):
        a, b = np.meshgrid(np.arange(start, min(n, start + step)), refs, indexing="ij")
        a, b = a.ravel(), b.ravel()
        keep = valid(a, b) & (ident[a] != ident[b])
        parts_a.append(a[keep])
        parts_b.append(b[keep])
    return np.concatenate(parts_a), np.concatenate(parts_b)


def _sample_pairs(n: int, refs: np.ndarray, ident: np.ndarray, groups: _IdentityGroups,
                  mated: bool, valid: _PairFilter, size: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """`size` distinct valid pairs of one kind, uniform: candidates drawn uniformly (mated
    ones identity by identity, weighted by faces x references), invalid ones rejected."""
    pairs_per_ident = groups.faces * groups.refs
    weight = np.cumsum(pairs_per_ident)
    codes = np.zeros(0, np.int64)
    for _ in range(50):  # each round keeps at least the valid share of its draws
        draw = 2 * (size - len(codes)) + 1024
        if mated:
            u = rng.integers(0, weight[-1], draw)
            k = np.searchsorted(weight, u, side="right")
            off = u - (weight[k] - pairs_per_ident[k])
            a = groups.face_order[groups.face_start[k] + off // groups.refs[k]]
            b = groups.ref_order[groups.ref_start[k] + off % groups.refs[k]]
        else:
            a = rng.integers(0, n, draw)
            b = refs[rng.integers(0, len(refs), draw)]
        keep = valid(a, b) & ((ident[a] == ident[b]) == mated)
        codes = np.unique(np.concatenate([codes, a[keep] * n + b[keep]]))
        if len(codes) >= size:
            codes = rng.choice(codes, size, replace=False)
            break
    return codes // n, codes % n


# Good references a face is compared with, at most. ORL gives each face 9; a celebrity of
# a large folder (LFW's George W. Bush: 530 photos) would give each of his faces hundreds,
# and a VGGFace2-sized folder billions of comparisons, for a mean that 64 already pins down
# (standard error under 0.07 for a match fraction).
MAX_REFERENCES = 64


def reference_pairs(samples: Samples, max_references: int = MAX_REFERENCES, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(face index, reference index) for every face and each of its good references; a
    face with more than `max_references` gets a seeded sample of them."""
    ident = np.asarray([str(x) for x in samples.identity])
    src = np.asarray(samples.source)
    rng = np.random.default_rng(seed)
    # each identity's clean faces, found once: a large folder has many identities
    refs_of: dict[str, list[int]] = {}
    for i in np.flatnonzero(samples.clean):
        refs_of.setdefault(ident[i], []).append(int(i))
    faces, refs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for i in range(len(samples)):
        r = np.asarray(refs_of.get(ident[i], []), dtype=np.int64)
        r = r[src[r] != src[i]]
        if len(r) > max_references:
            r = np.sort(rng.choice(r, max_references, replace=False))
        faces.append(np.full(len(r), i, dtype=np.int64))
        refs.append(r)
    return np.concatenate(faces), np.concatenate(refs)


def fit_calibrations(samples: Samples, embeddings: np.ndarray,
                     raw: Mapping[str, np.ndarray], recognizer: Any, where: str
                     ) -> dict[str, Calibration]:
    """Each scorer's isotonic map from raw output to P(match): every face against each
    good (clean) reference of its person from another picture, matched when their
    similarity reaches `recognizer.threshold` (its FMR 1e-3 point)."""
    faces, refs = reference_pairs(samples)
    if not len(faces):
        raise FiqaGateError(f"{where}: no face has a clean reference of its person in "
                            "another picture; calibrating needs two pictures a person")
    matched = similarities(embeddings, faces, refs) >= recognizer.threshold
    if matched.all() or not matched.any():
        raise FiqaGateError(f"{where}: {'every' if matched.all() else 'no'} face-reference "
                            f"comparison matched with {recognizer.name} at its threshold "
                            f"{recognizer.threshold:.4f}, so there is no chance of a match "
                            "to fit; add damaged faces (more --variants) or other people")
    note = f"isotonic, {len(faces)} face-reference comparisons of {where}"
    return {name: fit_calibration(r[faces], matched, recognizer.name, note=note)
            for name, r in raw.items()}


def similarities(embeddings: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair, in blocks (a pair's two rows would not all fit)."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)
    out = np.empty(len(a), dtype=np.result_type(e.dtype, np.float32))
    step = _BLOCK // 4
    for start in range(0, len(a), step):
        sl = slice(start, start + step)
        out[sl] = np.einsum("ij,ij->i", e[a[sl]], e[b[sl]])
    return out


def edc_by_scorer(similarity: np.ndarray, mated: np.ndarray, a: np.ndarray, b: np.ndarray,
                  qualities: Mapping[str, np.ndarray], fmr_target: float | None = None
                  ) -> dict[str, EDCResult]:
    """The fixed-threshold EDC of every scorer on the same comparisons."""
    return {name: edc(similarity, mated, pair_quality(q[a], q[b]), fmr_target=fmr_target)
            for name, q in qualities.items()}


def mated_mean(values: np.ndarray, mated: np.ndarray, a: np.ndarray, b: np.ndarray,
               n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per face, the mean of a comparison's `values` over its mated comparisons (the face
    on either side), and how many it has."""
    face = np.concatenate([a[mated], b[mated]])
    count = np.bincount(face, minlength=n)
    total = np.bincount(face, np.concatenate([values[mated]] * 2), n)
    return total / np.maximum(count, 1), count


def by_degradation(records: Sequence[Sequence[Mapping[str, object]]], similarity: np.ndarray,
                   mated: np.ndarray, a: np.ndarray, b: np.ndarray,
                   qualities: Mapping[str, np.ndarray]) -> list[dict[str, object]]:
    """Which damage each scorer misreads: faces grouped by their degradation (one kind
    alone; combinations and clean faces are groups of their own), each group's mean mated
    similarity, and inside the group each scorer's rank correlation with every face's own
    mean mated similarity (None where a group or a scorer's scores do not vary)."""
    from scipy import stats

    own, count = mated_mean(similarity, mated, a, b, len(records))
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        if count[i]:
            key = "clean" if not rec else str(rec[0]["kind"]) if len(rec) == 1 else "combination"
            groups.setdefault(key, []).append(i)
    rows: list[dict[str, object]] = []
    for key in sorted(groups):
        idx = np.asarray(groups[key])
        srcc = {}
        for name, q in qualities.items():
            varies = len(idx) > 2 and np.ptp(q[idx]) > 0 and np.ptp(own[idx]) > 0
            srcc[name] = float(stats.spearmanr(q[idx], own[idx]).statistic) if varies else None
        rows.append({"group": key, "faces": len(idx),
                     "mated_similarity": float(own[idx].mean()), "srcc": srcc})
    return rows


def random_quality(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def as_faces(samples: Samples) -> list:
    """Samples as runtime Face objects (the detector's confidence kept for its baseline)."""
    from fiqa_gate.faces import Detection, Face

    return [Face(crop=c, source=s, index=0,
                 detection=Detection((0.0, 0.0, 0.0, 0.0), np.zeros((5, 2)), float(d)))
            for c, s, d in zip(samples.crops, samples.source, samples.det_score, strict=True)]


def in_chunks(fn: Callable[[Any], Any], items: Sequence, desc: str | None = None,
              size: int = 256) -> Any:
    """`fn` over `items` a chunk at a time, with a progress bar when `desc` is given; the
    chunks' arrays joined (each of them, where `fn` returns a tuple of arrays)."""
    from tqdm import tqdm

    if len(items) == 0:
        return fn(items)
    out = []
    with tqdm(total=len(items), desc=desc, disable=desc is None, unit="face",
              leave=False) as bar:
        for i in range(0, len(items), size):
            out.append(fn(items[i:i + size]))
            bar.update(min(size, len(items) - i))
    if isinstance(out[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))
    return np.concatenate(out)


def qualities(samples: Samples, scorers: Sequence[str], recognizer: str,
              options: Mapping[str, Mapping[str, object]] | None = None,
              progress: bool = False, norms: np.ndarray | None = None,
              tolerant: bool = False, calibrations: Mapping[str, Calibration] | None = None,
              raw_only: bool = False
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Raw output of each named scorer plugin on every sample (`random` is built in), and
    the calibrated score of those scorers that carry a calibration for `recognizer`.

    `norms`: the recognizer's raw embedding norms of these samples, where the caller has
    embedded them already; `embedding-norm` then takes them instead of embedding again
    (a second pass of a slow recognizer: dlib needs 0.1 s a face here).

    `tolerant` (a user's evaluation, where any plugin may run): a scorer that fails is
    left out with a warning, and a face it gives no finite score counts as its lowest
    quality (a gate would reject it first). Training's own scorers must not fail.

    `calibrations`: maps that replace the scorers' own (a `fiqa-gate calibrate` file's);
    `raw_only`: no calibrated scores (to fit a map, the old one is beside the point)."""
    from fiqa_gate.registry import ScorerContext, get_scorer

    faces = as_faces(samples)
    raw: dict[str, np.ndarray] = {}
    calibrated: dict[str, np.ndarray] = {}
    for name in scorers:
        if name == "random":
            raw[name] = random_quality(len(samples))
            continue
        ctx = ScorerContext(recognizer_name=recognizer, options=dict((options or {}).get(name, {})))
        try:
            scorer = get_scorer(name, ctx)
            if name == "embedding-norm" and norms is not None:
                raw[name] = norms
            else:
                # each chunk read as the gate reads it (a tuple of floats is scores, not
                # a tuple of arrays)
                raw[name] = in_chunks(lambda chunk, s=scorer, n=name: real_scores(
                    s.raw_scores(chunk), n), faces, name if progress else None)
                if len(raw[name]) != len(faces):
                    raise ValueError(f"{len(raw[name])} scores for {len(faces)} faces")
        except Exception as exc:
            if not tolerant:
                raise
            log.warning("scorer %s failed (%s: %s); left out", name, type(exc).__name__, exc)
            raw.pop(name, None)
            continue
        bad = ~np.isfinite(raw[name])
        if tolerant and bad.any():
            if bad.all():
                log.warning("scorer %s gave no finite score; left out", name)
                del raw[name]
                continue
            log.warning("scorer %s gave %d of %d faces no finite score; each counts as its "
                        "lowest quality", name, int(bad.sum()), len(bad))
            raw[name] = np.where(bad, raw[name][~bad].min() - 1.0, raw[name])
        if raw_only:  # fitting a calibration: the scorer's own map is beside the point
            continue
        if calibrations and name in calibrations:  # a `fiqa-gate calibrate` file's map
            scorer.calibration = calibrations[name]
        if getattr(scorer, "calibration", None) is not None:
            calibrated[name] = scorer.calibration(np.nan_to_num(raw[name], nan=-1e9))
            made_for = getattr(scorer, "calibrated_for", None)
            if made_for not in (None, recognizer):  # as `filter` says it
                log.warning("scorer %r is calibrated for %s, not %s: its [0, 1] score (a "
                            "gate threshold's scale) is the chance of a match with %s",
                            name, made_for, recognizer, made_for)
    return raw, calibrated
