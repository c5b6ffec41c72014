"""A training run's enhanced teacher as a scorer, to compare with the student it taught.

`fiqa-gate train run ... --stage report` exports the enhanced teacher's network as
`export/teacher.onnx` with `export/teacher.json` beside it (same contract as a student's
files, plus `fusion`). With `fusion`, the teacher's score is its network's output fused
with the recognizer's embedding norm, exactly as its pseudo-labels were made, so
`fiqa-gate evaluate --scorer teacher --teacher RUN/export/teacher.onnx` shows whether a
student's shortfall on some data is the teacher's or the distillation's. Torch-free; the
teacher has 8x the student's parameters, so it is for measuring, not gating.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fiqa_gate.errors import ModelError
from fiqa_gate.student import OnnxStudentScorer


def z_mix(stats: dict[str, float], net: np.ndarray, log_norm: np.ndarray) -> np.ndarray:
    return ((net - stats["net_mean"]) / stats["net_std"]
            + (log_norm - stats["norm_mean"]) / stats["norm_std"]) / 2


def fuse(stats: dict[str, float], net: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Network output + embedding norm -> the fused score on the labels' scale: the mean
    of the two as z-scores (log norm), each standardised on the labelled training set."""
    mix = z_mix(stats, np.asarray(net, np.float64), np.log(np.asarray(norm, np.float64)))
    return stats["label_mean"] + stats["label_std"] * mix / stats["mix_std"]


class FusedTeacherScorer(OnnxStudentScorer):
    name = "teacher"

    def __init__(self, model_path: str | Path | None = None, batch_size: int = 64) -> None:
        if not model_path:
            raise ModelError("the teacher scorer needs a run's exported teacher: "
                             "RUN/export/teacher.onnx, given as --teacher to evaluate and as "
                             "--model to score and filter (written by `fiqa-gate train run "
                             "CONFIG --stage report`)")
        super().__init__(model_path, batch_size=batch_size, threads=None)
        self.fusion = self.meta.get("fusion")
        self.norm_recognizer = self.meta.get("recognizer", "sface")

    def raw_from_crops(self, crops: np.ndarray) -> np.ndarray:
        net = super().raw_from_crops(crops)
        if not self.fusion or len(crops) == 0:
            return net
        from fiqa_gate.registry import get_recognizer

        norms = get_recognizer(self.norm_recognizer).embed_with_norms(crops)[1]
        return fuse(self.fusion, net, norms).astype(np.float32)
