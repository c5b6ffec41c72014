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
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fiqa_gate.datasets import Samples
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


def _fnir_at(sim_m: np.ndarray, top_m: np.ndarray, truth: np.ndarray, t: float) -> float:
    """Mated searches that miss: wrong top identity, or right one below the threshold."""
    return float(np.mean((top_m != truth) | (sim_m < t)))


def identification(samples: Samples, embeddings: np.ndarray, recognizer: str,
                   threshold: float, qualities: Mapping[str, np.ndarray],
                   calibrated: Mapping[str, np.ndarray], gate_threshold: float = 0.5,
                   fpir: float = 0.05, random_draws: int = 20) -> dict[str, Any]:
    sp = split(samples)
    ident = np.asarray([str(i) for i in samples.identity])
    truth = ident[sp.mated_probes]

    def run(enroll: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        probes = np.concatenate([sp.mated_probes, sp.nonmated_probes])
        top, sim = _search(embeddings, ident, enroll, probes, recognizer, threshold)
        n = len(sp.mated_probes)
        return float(np.mean(top[:n] == truth)), top[:n], sim[:n], sim[n:]

    base_rank1, top_all, sim_all, non_all = run(sp.candidates)
    # Threshold fixed on the ungated run: the similarity that FPIR of non-mated searches pass.
    t_fpir = float(np.quantile(non_all, 1 - fpir)) if len(non_all) else threshold
    out: dict[str, Any] = {
        "identities_enrolled": len(set(ident[sp.candidates])),
        "candidates": len(sp.candidates), "mated_probes": len(sp.mated_probes),
        "nonmated_probes": len(sp.nonmated_probes), "fpir": fpir,
        "fpir_threshold": t_fpir, "gate_threshold": gate_threshold,
        "ungated": {"rank1": base_rank1, "fnir": _fnir_at(sim_all, top_all, truth, t_fpir),
                    "enrolled": len(sp.candidates)},
        "best_of_n": {}, "gated": {},
    }
    cand_ident = ident[sp.candidates]
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(random_draws):
        pick = [rng.choice(sp.candidates[cand_ident == name]) for name in sorted(set(cand_ident))]
        r1, top, sim, _ = run(np.asarray(pick))
        draws.append((r1, _fnir_at(sim, top, truth, t_fpir)))
    out["best_of_n"]["random"] = {"rank1": float(np.mean([d[0] for d in draws])),
                                  "fnir": float(np.mean([d[1] for d in draws])),
                                  "draws": random_draws}
    for name, q in qualities.items():
        if name == "random":
            continue
        qc = np.nan_to_num(q[sp.candidates], nan=-np.inf)
        pick = [sp.candidates[cand_ident == n][np.argmax(qc[cand_ident == n])]
                for n in sorted(set(cand_ident))]
        r1, top, sim, _ = run(np.asarray(pick))
        out["best_of_n"][name] = {"rank1": r1, "fnir": _fnir_at(sim, top, truth, t_fpir)}
    for name, c in calibrated.items():
        keep = sp.candidates[np.nan_to_num(c[sp.candidates], nan=0.0) >= gate_threshold]
        if len(keep) == 0:
            out["gated"][name] = {"rank1": 0.0, "fnir": 1.0, "enrolled": 0}
            continue
        r1, top, sim, _ = run(keep)
        out["gated"][name] = {"rank1": r1, "fnir": _fnir_at(sim, top, truth, t_fpir),
                              "enrolled": len(keep),
                              "identities": len(set(ident[keep]))}
    return out
