"""Identification through the real FAISS gallery: what an enrollment gate changes.

Split per identity by source image: faces from the first half of each identity's images
are enrollment candidates (clean and degraded: mixed quality), faces from the other half
are probes. The first `gallery_fraction` of identities are enrolled; the rest only probe,
as non-mated searches for FPIR.

- best-of-N: each enrolled identity gets its single best-scored candidate, versus a random
  candidate (mean over `random_draws` seeded draws);
- gated: every candidate whose calibrated score clears the gate threshold, versus all.
Rank-1 accuracy over mated probes; FNIR at a fixed FPIR with the decision threshold set on
the ungated (all candidates) run, then held fixed for every other run.

Intervals: the mated probes are resampled by source picture (a picture's degraded copies
go in or out together), the enrolled gallery held as each run chose it; every run sees
the same resamples, so a gain is judged resample by resample against its reference
(random picks for best-of-N, all candidates for the gate), and the first scorer's picks
are compared with each other scorer's the same way.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fiqa_gate.datasets import Samples
from fiqa_gate.evaluation.metrics import (
    bootstrap_means,
    paired_differences,
    percentile_interval,
)
from fiqa_gate.gallery import Enrollment, Gallery


@dataclass(frozen=True)
class Split:
    candidates: np.ndarray  # sample indices
    mated_probes: np.ndarray
    nonmated_probes: np.ndarray


def split(samples: Samples, gallery_fraction: float = 0.7) -> Split:
    ident = np.asarray([str(i) for i in samples.identity])
    names = sorted(set(ident))
    enrolled = set(names[:max(1, round(len(names) * gallery_fraction))])
    cand, mated, nonmated = [], [], []
    for name in names:
        idx = np.flatnonzero(ident == name)
        sources = sorted(set(samples.source[i] for i in idx))
        first = set(sources[:max(1, len(sources) // 2)])
        for i in idx:
            if name not in enrolled:
                nonmated.append(i)
            elif samples.source[i] in first:
                cand.append(i)
            else:
                mated.append(i)
    return Split(np.asarray(cand), np.asarray(mated), np.asarray(nonmated))


def _search(embeddings: np.ndarray, ident: np.ndarray, enroll: np.ndarray, probes: np.ndarray,
            recognizer: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(top identity, top similarity) of each probe against a gallery of `enroll`."""
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Gallery.create(Path(tmp) / "g", recognizer, embeddings.shape[1], threshold)
        try:
            gallery.enroll([Enrollment(str(ident[i]), embeddings[i], f"sample{i}")
                            for i in enroll])
            hits = gallery.search(embeddings[probes], recognizer, k=1)
        finally:
            gallery.close()
    top = np.asarray([h[0].identity if h else "" for h in hits])
    sim = np.asarray([h[0].similarity if h else -1.0 for h in hits])
    return top, sim


def _interval(values: np.ndarray) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in percentile_interval(values)]


def fpir_threshold(nonmated: np.ndarray, fpir: float, fallback: float
                   ) -> tuple[float, float | None]:
    """The similarity a search must reach to count as found, fixed on the ungated run so
    that at most `fpir` of the non-mated searches reach it, and the share that does (None
    without non-mated searches: the recognizer's own threshold then). The quantile alone
    interpolates between searches: with 4 of them it let 1 in 4 through at FPIR 0.05."""
    if not len(nonmated):
        return fallback, None
    t = float(np.quantile(nonmated, 1 - fpir))
    if np.mean(nonmated >= t) > fpir:  # just above the highest search that must fail
        allowed = math.floor(fpir * len(nonmated) + 1e-9)
        t = float(np.nextafter(np.sort(nonmated)[::-1][allowed], np.inf))
    return t, float(np.mean(nonmated >= t))


def identification(samples: Samples, embeddings: np.ndarray, recognizer: str,
                   threshold: float, qualities: Mapping[str, np.ndarray],
                   calibrated: Mapping[str, np.ndarray], gate_threshold: float = 0.5,
                   fpir: float = 0.05, random_draws: int = 20,
                   bootstrap: int = 200) -> dict[str, Any]:
    sp = split(samples)
    ident = np.asarray([str(i) for i in samples.identity])
    truth = ident[sp.mated_probes]
    probes = np.concatenate([sp.mated_probes, sp.nonmated_probes])
    n = len(sp.mated_probes)

    def search(enroll: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        top, sim = _search(embeddings, ident, enroll, probes, recognizer, threshold)
        return top[:n], sim[:n], sim[n:]

    top_all, sim_all, non_all = search(sp.candidates)
    t_fpir, fpir_met = fpir_threshold(non_all, fpir, threshold)

    def outcome(top: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per mated probe: rank-1 hit, and miss (FNIR): wrong top identity, or the right
        one below the FPIR threshold."""
        hit = top == truth
        return hit.astype(float), (~hit | (sim < t_fpir)).astype(float)

    # per-probe outcomes of every run, for the shared resamples below
    hits: dict[str, np.ndarray] = {}
    misses: dict[str, np.ndarray] = {}
    hits["ungated"], misses["ungated"] = outcome(top_all, sim_all)
    out: dict[str, Any] = {
        "identities_enrolled": len(set(ident[sp.candidates])),
        "candidates": len(sp.candidates), "mated_probes": n,
        "nonmated_probes": len(sp.nonmated_probes), "fpir": fpir,
        "fpir_threshold": t_fpir, "fpir_measured": fpir_met, "gate_threshold": gate_threshold,
        "ungated": {"enrolled": len(sp.candidates)},
        "best_of_n": {}, "gated": {},
    }
    cand_ident = ident[sp.candidates]
    out["most_candidates"] = int(max(np.unique(cand_ident, return_counts=True)[1],
                                     default=0))
    rng = np.random.default_rng(0)
    draws = [outcome(*search(np.asarray(
        [rng.choice(sp.candidates[cand_ident == name]) for name in sorted(set(cand_ident))]
    ))[:2]) for _ in range(random_draws)]
    # a probe's chance of a hit under a random pick: its mean over the draws
    hits["best:random"] = np.mean([d[0] for d in draws], axis=0)
    misses["best:random"] = np.mean([d[1] for d in draws], axis=0)
    out["best_of_n"]["random"] = {"draws": random_draws}
    for name, q in qualities.items():
        if name == "random":
            continue
        qc = np.nan_to_num(q[sp.candidates], nan=-np.inf)
        pick = [sp.candidates[cand_ident == c][np.argmax(qc[cand_ident == c])]
                for c in sorted(set(cand_ident))]
        hits[f"best:{name}"], misses[f"best:{name}"] = outcome(*search(np.asarray(pick))[:2])
        out["best_of_n"][name] = {}
    for name, c in calibrated.items():
        keep = sp.candidates[np.nan_to_num(c[sp.candidates], nan=0.0) >= gate_threshold]
        if len(keep) == 0:  # nothing enrolled: every search misses
            hits[f"gate:{name}"], misses[f"gate:{name}"] = np.zeros(n), np.ones(n)
            out["gated"][name] = {"enrolled": 0, "identities": 0}
            continue
        hits[f"gate:{name}"], misses[f"gate:{name}"] = outcome(*search(keep)[:2])
        out["gated"][name] = {"enrolled": len(keep), "identities": len(set(ident[keep]))}

    entries = {"ungated": out["ungated"],
               **{f"best:{k}": v for k, v in out["best_of_n"].items()},
               **{f"gate:{k}": v for k, v in out["gated"].items()}}
    for key, entry in entries.items():
        entry["rank1"], entry["fnir"] = float(hits[key].mean()), float(misses[key].mean())
    if bootstrap and n:
        units = np.asarray(samples.source)[sp.mated_probes]
        # one call, so hits and misses share every resample
        resampled = bootstrap_means({**{f"hit {k}": v for k, v in hits.items()},
                                     **{f"miss {k}": v for k, v in misses.items()}},
                                    units, bootstrap)
        out["bootstrap"] = {"resamples": bootstrap, "unit": "source picture of a mated probe"}
        for key, entry in entries.items():
            entry["rank1_ci95"] = _interval(resampled[f"hit {key}"])
            entry["fnir_ci95"] = _interval(resampled[f"miss {key}"])
            ref = "best:random" if key.startswith("best:") else "ungated"
            if key not in (ref, "ungated"):
                gain = resampled[f"hit {key}"] - resampled[f"hit {ref}"]
                entry["rank1_gain_ci95"] = _interval(gain)
                entry["ahead"] = float((gain > 0).mean())
        out["best_of_n_paired"] = _paired_picks(hits, resampled, list(qualities))
    return out


def _paired_picks(hits: Mapping[str, np.ndarray], resampled: Mapping[str, np.ndarray],
                  names: list[str]) -> dict[str, Any]:
    """The first scorer's best-of-N rank-1 minus each other scorer's, on shared resamples:
    gains over random alone cannot say which of two scorers picks better."""
    scorers = [n for n in names if n != "random"]
    if len(scorers) < 2:
        return {}
    against = paired_differences({n: resampled[f"hit best:{n}"] for n in scorers},
                                 {n: float(hits[f"best:{n}"].mean()) for n in scorers},
                                 scorers[0], higher_is_better=True)
    return {"first": scorers[0], "against": [d.to_dict() for d in against]}
