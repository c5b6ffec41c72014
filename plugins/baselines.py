"""The baselines every learned quality score must beat (EVALUATION.md).

- sharpness: variance of the Laplacian of the aligned crop's grey image;
- detector-confidence: the detector's face score (NaN for `--aligned` inputs);
- embedding-norm: the recognizer's un-normalised embedding norm (MagFace-style).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from fiqa_gate_plugins import shipped_calibration

from fiqa_gate.components import Scorer, stack_crops
from fiqa_gate.faces import Face
from fiqa_gate.hookspecs import hookimpl
from fiqa_gate.registry import ScorerContext


class SharpnessScorer(Scorer):
    name = "sharpness"

    def raw_scores(self, faces: Sequence[Face]) -> np.ndarray:
        import cv2

        out = []
        for crop in stack_crops(faces):
            grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
            out.append(cv2.Laplacian(grey, cv2.CV_64F).var())
        return np.asarray(out, dtype=np.float64)


class DetectorConfidenceScorer(Scorer):
    name = "detector-confidence"

    def raw_scores(self, faces: Sequence[Face]) -> np.ndarray:
        return np.asarray([np.nan if f.det_score is None else f.det_score for f in faces],
                          dtype=np.float64)


class EmbeddingNormScorer(Scorer):
    name = "embedding-norm"

    def __init__(self, context: ScorerContext) -> None:
        self.recognizer = context.recognizer()

    def raw_scores(self, faces: Sequence[Face]) -> np.ndarray:
        return self.recognizer.embed_with_norms(stack_crops(faces))[1]


def _calibrated(scorer: Scorer, recognizer: str) -> Scorer:
    scorer.calibration = shipped_calibration(scorer.name, recognizer)
    return scorer


@hookimpl
def register_scorers(register: Callable[..., None]) -> None:
    register("sharpness", lambda ctx: _calibrated(SharpnessScorer(), ctx.recognizer_name),
             "variance of the Laplacian of the aligned crop (baseline)")
    register("detector-confidence",
             lambda ctx: _calibrated(DetectorConfidenceScorer(), ctx.recognizer_name),
             "the face detector's confidence (baseline)")
    register("embedding-norm",
             lambda ctx: _calibrated(EmbeddingNormScorer(ctx), ctx.recognizer_name),
             "the recognizer's un-normalised embedding norm, MagFace-style (baseline)")
