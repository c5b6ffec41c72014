"""The gate: score faces, decide, and keep rejected faces away from the recognizer.

    gate = Gate(get_scorer("student"), threshold=0.5)
    decisions = gate.decide(faces)              # one Decision per face
    embed = gate.wrap(recognizer.embed)          # rejected faces are never embedded
    embeddings = embed(faces)                    # None where rejected
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fiqa_gate import registry
from fiqa_gate.components import Detector, Scorer, stack_crops
from fiqa_gate.defects import defects, measure
from fiqa_gate.errors import PluginError
from fiqa_gate.faces import Face

log = logging.getLogger("fiqa_gate")

STAGES = ("filter", "enroll", "probe")
# Manifests print scores with this many decimals: a face whose score prints as the
# threshold passes it (the calibration's plateaus give many faces one score).
SCORE_DIGITS = 6


@dataclass
class Decision:
    accepted: bool
    score: float
    raw_score: float
    threshold: float  # the gate's; a policy plugin that decided gives its own in `reason`
    reason: str
    failed: bool = False  # a policy plugin failed on this face: an error, not a decision
    # what `fiqa_gate.defects` names for a face rejected for its score (also in `reason`)
    defects: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


class Gate:
    """Accept a face when its calibrated score reaches `threshold`, unless a policy plugin
    (`gate_decision` hook) decides otherwise for this `stage`.

    A face rejected for its score gets the defects `fiqa_gate.defects` can name in its
    reason (light, focus, noise, size, pose; its alignment too when `detector` is given)."""

    def __init__(self, scorer: Scorer, threshold: float = 0.5, stage: str = "filter",
                 use_plugins: bool = True, detector: Detector | None = None) -> None:
        if not callable(getattr(scorer, "score", None)):
            raise TypeError(f"Gate needs a scorer (registry.get_scorer('student')), not "
                            f"{type(scorer).__name__}")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if getattr(scorer, "calibration", None) is None:  # the CLI refuses to gate on it
            log.warning("scorer %s has no calibration: the threshold applies to its raw "
                        "output clipped to [0, 1], not to a probability of a match",
                        getattr(scorer, "name", type(scorer).__name__))
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.scorer = scorer
        self.threshold = threshold
        self.stage = stage
        self.use_plugins = use_plugins
        self.detector = detector

    def _decide_one(self, face: Face, score: float, raw: float) -> Decision:
        if not math.isfinite(score):
            accepted, reason = False, f"no {self.scorer.name} score for this face"
        elif round(score, SCORE_DIGITS) >= self.threshold:  # as the manifest prints it
            accepted, reason = True, f"score {score:.3f} >= threshold {self.threshold:.3f}"
        else:
            accepted, reason = False, (f"low quality: score {score:.3f} < threshold "
                                       f"{self.threshold:.3f}")
        if self.use_plugins:
            try:
                override = registry.policy_decision(face, score, self.threshold, self.stage)
            except Exception as exc:  # a broken policy fails this face, not the run
                why = str(exc) if isinstance(exc, PluginError) else \
                    f"{type(exc).__name__}: {exc}"
                return Decision(False, score, raw, self.threshold,
                                f"policy plugin error: {why}", failed=True)
            if override is not None:  # the policy's reason is the one that holds
                accepted, reason = override
                return Decision(accepted, score, raw, self.threshold, reason)
        found: tuple[str, ...] = ()
        if not accepted and math.isfinite(score):  # measured only when the score rejects
            found = self._defects(face)
            if found:
                reason += f"; likely: {', '.join(found)}"
        return Decision(accepted, score, raw, self.threshold, reason, defects=found)

    def _defects(self, face: Face) -> tuple[str, ...]:
        try:
            return tuple(defects(measure(face, self.detector)))
        except Exception as exc:  # an explanation is a courtesy: it never fails a face
            log.debug("could not name the defects of %s: %s", face.face_id, exc)
            return ()

    def decide(self, faces: Sequence[Face]) -> list[Decision]:
        if len(faces) == 0:  # an array of crops goes on to the scorer, which says why not
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

    def wrap(self, embed: Callable[[np.ndarray], np.ndarray]) -> GatedEmbedding:
        """Wrap any embedding function (aligned crops in, embeddings out) so that only
        accepted faces reach it. The wrapped function returns None for rejected faces;
        the decisions of this thread's last call stay readable as `.last_decisions`."""
        return GatedEmbedding(self, embed)


class GatedEmbedding:
    """An embedding function behind a gate (`Gate.wrap`)."""

    def __init__(self, gate: Gate, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        self.gate = gate
        self.embed = embed
        self._local = threading.local()  # one pipeline's decisions, not another thread's

    @property
    def last_decisions(self) -> list[Decision]:
        return getattr(self._local, "decisions", [])

    def __call__(self, faces: Sequence[Face]) -> list[np.ndarray | None]:
        decisions = self.gate.decide(faces)
        self._local.decisions = decisions
        keep = [i for i, d in enumerate(decisions) if d.accepted]
        out: list[np.ndarray | None] = [None] * len(faces)
        if keep:
            embs = list(self.embed(stack_crops([faces[i] for i in keep])))
            if len(embs) != len(keep):
                raise ValueError(f"the embedding function returned {len(embs)} embeddings "
                                 f"for {len(keep)} faces")
            for i, e in zip(keep, embs, strict=True):
                out[i] = e
        return out
