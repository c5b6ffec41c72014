"""The distilled Efficient-FIQA student, fiqa-gate's default scorer (ONNX Runtime)."""

from __future__ import annotations

from fiqa_gate.hookspecs import hookimpl
from fiqa_gate.student import OnnxStudentScorer


@hookimpl
def register_scorers(register):
    register("student",
             lambda ctx: OnnxStudentScorer(ctx.options.get("model")),
             "EdgeNeXt-XXS student distilled with self-training (shipped; --model FILE.onnx "
             "for another export)")
