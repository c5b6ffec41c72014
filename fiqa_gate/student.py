"""The distilled student as an ONNX scorer: torch-free, one face per run, calibrated.

A student model is two files side by side: `NAME.onnx` and `NAME.json`.
The ONNX graph takes float32 RGB pixels in 0..255, NCHW, at the square size the JSON
names (normalisation is inside the graph), and returns one raw quality per face
([N] or [N, 1]). The JSON holds at least:
`{"input_size": 112, "sha256": "<digest of the .onnx>", "recognizer": "sface",
  "calibration": {"x": [...], "y": [...]}, "name": "...", "model_card": "..."}`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
                 threads: int | None = 1) -> None:
        # `threads` faces are scored at once, each on one thread; None: one per core (a
        # scoring-only job). The gate's default is 1: a second scoring thread competes with
        # the recognizer's, as ONNX Runtime's own pool did (measured on 2 cores: the gated
        # pipeline went from 16.8 to 19.5 ms per face).
        path = Path(model_path) if model_path else SHIPPED_STUDENT
        meta_path = path.with_suffix(".json")
        if path.suffix != ".onnx":
            raise ModelError(f"{path}: a student model is the .onnx file (its .json beside it)")
        if not path.is_file():
            raise ModelError(
                f"no student model at {path}. Train and export one with "
                "`fiqa-gate train run CONFIG`, pass --model FILE.onnx, or pick a baseline "
                "scorer: --scorer sharpness | detector-confidence | embedding-norm"
            )
        if not meta_path.is_file():
            raise ModelError(f"{path}: its metadata {meta_path.name} is missing (input size, "
                             "calibration, digest; the export stage writes it beside the "
                             ".onnx)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{meta_path}: unreadable model metadata: {exc}") from exc
        if "sha256" in self.meta:
            try:
                verify_sha256(path, self.meta["sha256"])
            except ModelError:
                if path == SHIPPED_STUDENT:
                    raise
                raise ModelError(f"{path}: its SHA-256 does not match the one {meta_path.name}"
                                 " pins: the .onnx was changed or the two files come from "
                                 "different exports") from None
        elif path == SHIPPED_STUDENT:
            raise ModelError(f"{meta_path}: the shipped student must pin its sha256")
        self.path = path
        self.input_size = int(self.meta.get("input_size", ALIGNED_SIZE))
        self.batch_size = batch_size
        self.calibration = (Calibration.from_dict(
            {"recognizer": self.meta.get("recognizer", ""), **self.meta["calibration"]})
            if self.meta.get("calibration") else None)
        # Faces run one at a time (raw_from_crops), so the batch is fixed at 1: the graph's
        # shape arithmetic folds away (323 nodes to 227 in the shipped student).
        try:
            self._session = onnx_session(path, threads=1, fixed_dims=_batch_dim(path))
        except ModelError:  # a user's graph that holds only as it is: say what is wrong
            self._session = onnx_session(path, threads=1)
        self.threads = threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
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

    def _run_one(self, face: np.ndarray) -> float:
        return float(np.asarray(self._session.run(None, {self._input: face[None]})[0]).flat[0])

    def raw_from_crops(self, crops: np.ndarray) -> np.ndarray:
        """Raw quality per crop. Each face is a run of its own: an int8 graph (dynamic
        quantisation) scales activations over the whole run, so faces run together would
        change each other's scores (the student shipped before the current one, 2460
        validation faces, batch 64 against 1: raw up to 0.016 apart, 3 gate decisions at
        0.5 flipped). Measured on 2 cores it also costs no speed: 1.72 against 1.83 ms per
        face on one thread, and 1.07 ms with two faces at once against 1.57 for ONNX
        Runtime's two-thread pool on a batch of 64."""
        out = []
        for i in range(0, len(crops), self.batch_size):  # batch_size bounds memory only
            x = self._prepare(crops[i:i + self.batch_size])
            run = self._pool.map if self._pool is not None and len(x) > 1 else map
            out.append(np.fromiter(run(self._run_one, x), np.float32, len(x)))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def raw_scores(self, faces: Sequence[Face]) -> np.ndarray:
        return self.raw_from_crops(stack_crops(faces))


def _batch_dim(path: Path) -> dict[str, int]:
    """{name: 1} for the first input's batch dimension where it is a named free one."""
    import onnx

    try:
        inputs = onnx.load(str(path), load_external_data=False).graph.input
    except Exception:  # ONNX Runtime's own load below says what is wrong
        return {}
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    name = dims[0].dim_param if dims else ""
    return {name: 1} if name else {}
