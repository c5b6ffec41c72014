"""The gate: score faces, decide, and keep rejected faces away from the recognizer.

    gate = Gate(get_scorer("student"), threshold=0.5)
    decisions = gate.decide(faces)              # one Decision per face
    embed = gate.wrap(recognizer.embed)          # rejected faces are never embedded
    embeddings = embed(faces)                    # None where rejected
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fiqa_gate import registry
from fiqa_gate.components import Scorer, stack_crops
from fiqa_gate.faces import Face

log = logging.getLogger("fiqa_gate")

STAGES = ("filter", "enroll", "probe")


@dataclass
class Decision:
    accepted: bool
    score: float
    raw_score: float
    threshold: float
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


class Gate:
    """Accept a face when its calibrated score reaches `threshold`, unless a policy plugin
    (`gate_decision` hook) decides otherwise for this `stage`."""

    def __init__(self, scorer: Scorer, threshold: float = 0.5, stage: str = "filter",
                 use_plugins: bool = True) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.scorer = scorer
        self.threshold = threshold
        self.stage = stage
        self.use_plugins = use_plugins

    def _decide_one(self, face: Face, score: float, raw: float) -> Decision:
        if not math.isfinite(score):
            accepted, reason = False, f"no {self.scorer.name} score for this face"
        elif score >= self.threshold:
            accepted, reason = True, f"score {score:.3f} >= threshold {self.threshold:.3f}"
        else:
            accepted, reason = False, (f"low quality: score {score:.3f} < threshold "
                                       f"{self.threshold:.3f}")
        if self.use_plugins:
            try:
                override = registry.policy_decision(face, score, self.threshold, self.stage)
            except Exception as exc:  # a broken policy fails this face, not the run
                return Decision(False, score, raw, self.threshold,
                                f"policy plugin error: {type(exc).__name__}: {exc}")
            if override is not None:
                accepted, reason = override
        return Decision(accepted, score, raw, self.threshold, reason)

    def decide(self, faces: Sequence[Face]) -> list[Decision]:
        if not faces:
            return []
        scores = self.scorer.score(faces)
        decisions = [self._decide_one(f, float(c), float(r))
                     for f, c, r in zip(faces, scores.calibrated, scores.raw, strict=True)]
        if self.use_plugins:
            for face, decision in zip(faces, decisions, strict=True):
                registry.emit("face_scored", face=face, score=decision)
                if not decision.accepted:
                    registry.emit("face_rejected", face=face, score=decision,
                                  reason=decision.reason)
        return decisions

    def decide_one(self, face: Face) -> Decision:
        return self.decide([face])[0]

    def wrap(self, embed: Callable[[np.ndarray], np.ndarray]
             ) -> Callable[[Sequence[Face]], list[np.ndarray | None]]:
        """Wrap any embedding function (aligned crops in, embeddings out) so that only
        accepted faces reach it. The wrapped function returns None for rejected faces;
        the last decisions stay readable as `.last_decisions`."""

        def gated(faces: Sequence[Face]) -> list[np.ndarray | None]:
            decisions = self.decide(faces)
            gated.last_decisions = decisions  # type: ignore[attr-defined]
            keep = [i for i, d in enumerate(decisions) if d.accepted]
            out: list[np.ndarray | None] = [None] * len(faces)
            if keep:
                embs = embed(stack_crops([faces[i] for i in keep]))
                for i, e in zip(keep, embs, strict=True):
                    out[i] = e
            return out

        gated.last_decisions = []  # type: ignore[attr-defined]
        return gated
