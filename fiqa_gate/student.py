"""The distilled student as an ONNX scorer: torch-free, batched, calibrated.

A student model is two files side by side: `NAME.onnx` and `NAME.json`.
The ONNX graph takes float32 RGB pixels in 0..255, NCHW, at the square size the JSON
names (normalisation is inside the graph), and returns one raw quality per face
([N] or [N, 1]). The JSON holds at least:
`{"input_size": 112, "sha256": "<digest of the .onnx>", "recognizer": "sface",
  "calibration": {"x": [...], "y": [...]}, "name": "...", "model_card": "..."}`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fiqa_gate import models_dir
from fiqa_gate.assets import onnx_session, verify_sha256
from fiqa_gate.calibration import Calibration
from fiqa_gate.components import Scorer, stack_crops
from fiqa_gate.errors import ModelError
from fiqa_gate.faces import ALIGNED_SIZE, Face

SHIPPED_STUDENT = models_dir() / "student.onnx"


class OnnxStudentScorer(Scorer):
    name = "student"

    def __init__(self, model_path: str | Path | None = None, batch_size: int = 64,
                 threads: int | None = 1):
        # One thread. Measured on 2 cores: ONNX Runtime's default (2) gives the same 1.43 ms
        # per face at batch 1 and 0.91 against 1.37 ms at batch 64, but its spinning pool
        # then competes with the recognizer's: the gated pipeline went from 16.8 to 19.5 ms
        # per face. `threads=None` lets ONNX Runtime decide (a scoring-only job).
        path = Path(model_path) if model_path else SHIPPED_STUDENT
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise ModelError(
                f"no student model at {path} (+ {meta_path.name}). Train and export one with "
                "`fiqa-gate train run CONFIG`, pass --model FILE.onnx, or pick a baseline "
                "scorer: --scorer sharpness | detector-confidence | embedding-norm"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{meta_path}: unreadable model metadata: {exc}") from exc
        if "sha256" in self.meta:
            verify_sha256(path, self.meta["sha256"])
        elif path == SHIPPED_STUDENT:
            raise ModelError(f"{meta_path}: the shipped student must pin its sha256")
        self.path = path
        self.input_size = int(self.meta.get("input_size", ALIGNED_SIZE))
        self.batch_size = batch_size
        self.calibration = (Calibration.from_dict(
            {"recognizer": self.meta.get("recognizer", ""), **self.meta["calibration"]})
            if self.meta.get("calibration") else None)
        self._session = onnx_session(path, threads=threads)
        self._check_signature()

    def _check_signature(self) -> None:
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        want = (f"one input [N, 3, {self.input_size}, {self.input_size}] float32 "
                f"(RGB 0..255, NCHW; input_size {self.input_size} from {self.path.stem}.json)")
        got = [(i.name, i.shape, i.type) for i in inputs]
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].type != "tensor(float)":
            raise ModelError(f"{self.path}: expected {want}, got {got}")
        c, h, w = inputs[0].shape[1:]
        for dim, expected in ((c, 3), (h, self.input_size), (w, self.input_size)):
            if isinstance(dim, int) and dim != expected:
                raise ModelError(f"{self.path}: expected {want}, got {got}")
        shape = outputs[0].shape if len(outputs) == 1 else []
        if (len(outputs) != 1 or len(shape) not in (1, 2)
                or (len(shape) == 2 and isinstance(shape[1], int) and shape[1] != 1)):
            raise ModelError(f"{self.path}: expected one output [N] or [N, 1] (one quality "
                             f"per face), got {[(o.name, o.shape) for o in outputs]}")
        self._input = inputs[0].name

    def _prepare(self, crops: np.ndarray) -> np.ndarray:
        if self.input_size != ALIGNED_SIZE:
            import cv2

            crops = np.stack([cv2.resize(c, (self.input_size, self.input_size),
                                         interpolation=cv2.INTER_LINEAR) for c in crops])
        return np.ascontiguousarray(crops.astype(np.float32).transpose(0, 3, 1, 2))

    def raw_from_crops(self, crops: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(crops), self.batch_size):
            x = self._prepare(crops[i:i + self.batch_size])
            out.append(np.asarray(self._session.run(None, {self._input: x})[0]).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0)

    def raw_scores(self, faces: Sequence[Face]) -> np.ndarray:
        return self.raw_from_crops(stack_crops(faces))
