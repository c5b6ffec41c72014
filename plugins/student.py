"""The distilled Efficient-FIQA student, fiqa-gate's default scorer (ONNX Runtime), and a
training run's enhanced teacher beside it for comparison."""

from __future__ import annotations

from collections.abc import Callable

from fiqa_gate.hookspecs import hookimpl
from fiqa_gate.student import OnnxStudentScorer
from fiqa_gate.teacher import FusedTeacherScorer


@hookimpl
def register_scorers(register: Callable[..., None]) -> None:
    register("student",
             lambda ctx: OnnxStudentScorer(ctx.options.get("model")),
             "EdgeNeXt-XXS student distilled with self-training (shipped; --model FILE.onnx "
             "for another export)")
    register("teacher",
             lambda ctx: FusedTeacherScorer(ctx.options.get("model")),
             "a training run's enhanced teacher, fused with the embedding norm as its "
             "pseudo-labels were (RUN/export/teacher.onnx: evaluate --teacher, score --model; "
             "for measuring only)")
