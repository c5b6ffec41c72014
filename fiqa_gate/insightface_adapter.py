"""Gate an insightface `FaceAnalysis` between its detector and its recognizer.

    app = FaceAnalysis(name="buffalo_l"); app.prepare(ctx_id=-1)
    gated = GatedFaceAnalysis(app, Gate(get_scorer("student"), threshold=0.5))
    faces = gated.get(bgr_image)   # insightface Face objects; rejected ones have no embedding

Works with anything shaped like FaceAnalysis: `det_model.detect(img, max_num=0)` returning
(bboxes [N, 5], kpss [N, 5, 2]) and `models["recognition"].get(img, face)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fiqa_gate.faces import Detection, Face, align_face
from fiqa_gate.gate import Gate


class GatedFaceAnalysis:
    def __init__(self, app: Any, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    def get(self, img_bgr: np.ndarray, max_num: int = 0) -> list[Any]:
        from insightface.app.common import Face as InsightFace

        bboxes, kpss = self.app.det_model.detect(img_bgr, max_num=max_num)
        if bboxes is None or len(bboxes) == 0:
            return []
        rgb = np.ascontiguousarray(img_bgr[:, :, ::-1])
        ours = []
        for i, (bbox, kps) in enumerate(zip(bboxes, kpss, strict=True)):
            x1, y1, x2, y2, det_score = (float(v) for v in bbox[:5])
            detection = Detection(box=(x1, y1, x2 - x1, y2 - y1), landmarks=np.asarray(kps),
                                  score=det_score)
            ours.append(Face(crop=align_face(rgb, kps), index=i, detection=detection))
        decisions = self.gate.decide(ours)
        recognizer = self.app.models.get("recognition")
        out = []
        for bbox, kps, decision in zip(bboxes, kpss, decisions, strict=True):
            face = InsightFace(bbox=bbox[:4], kps=kps, det_score=bbox[4])
            face.quality = decision.score
            face.gate_decision = decision
            if decision.accepted and recognizer is not None:
                recognizer.get(img_bgr, face)  # sets face.embedding
            out.append(face)
        return out
