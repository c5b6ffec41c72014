"""Gate an insightface `FaceAnalysis` between its detector and its recognizer.

    app = FaceAnalysis(name="buffalo_l"); app.prepare(ctx_id=-1)
    gated = GatedFaceAnalysis(app, Gate(get_scorer("student"), threshold=0.5))
    faces = gated.get(bgr_image)   # insightface Face objects; rejected ones have no embedding

`get` does what `FaceAnalysis.get` does (the liveness addon, then every model but the
detector: landmarks, gender and age ...), except that the recognition model runs only for
faces the gate accepts. Each face carries `quality` (the calibrated score) and
`gate_decision`. Works with anything shaped like FaceAnalysis: `det_model.detect(img,
max_num=..., metric=...)` returning (bboxes [N, 5], kpss [N, 5, 2]) and `models`, a dict
of task name -> model with `.get(img, face)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fiqa_gate.faces import Detection, Face, align_face, inner_face_patch
from fiqa_gate.gate import Gate


class GatedFaceAnalysis:
    def __init__(self, app: Any, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    def get(self, img_bgr: np.ndarray, max_num: int = 0, det_metric: str = "default",
            source: str = "") -> list[Any]:
        """`source` names the image in the gate's events (an audit log, say)."""
        from insightface.app.common import Face as InsightFace

        app = self.app
        # `metric` only when asked for: a detector from before it may not take it
        extra = {} if det_metric == "default" else {"metric": det_metric}
        bboxes, kpss = app.det_model.detect(img_bgr, max_num=max_num, **extra)
        if bboxes is None or len(bboxes) == 0:
            return []
        if kpss is None:
            raise ValueError("the detector gives no landmarks: the gate needs a face's five "
                             "points to align it as the recognizer does")
        rgb = np.ascontiguousarray(img_bgr[:, :, ::-1])
        ours = []
        for i, (bbox, kps) in enumerate(zip(bboxes, kpss, strict=True)):
            x1, y1, x2, y2, det_score = (float(v) for v in bbox[:5])
            detection = Detection(box=(x1, y1, x2 - x1, y2 - y1), landmarks=np.asarray(kps),
                                  score=det_score)
            ours.append(Face(crop=align_face(rgb, kps), source=source, index=i,
                             detection=detection, patch=inner_face_patch(rgb, kps)))
        decisions = self.gate.decide(ours)
        # insightface's own order: the liveness addon first; in its "normal" mode a face
        # that is not live gets no embedding either
        liveness = getattr(app, "addons", {}).get("liveness")
        live_only = liveness is not None and getattr(app, "liveness_mode", "normal") == "normal"
        out = []
        for bbox, kps, decision in zip(bboxes, kpss, decisions, strict=True):
            face = InsightFace(bbox=bbox[:4], kps=kps, det_score=bbox[4])
            face.quality = decision.score
            face.gate_decision = decision
            if liveness is not None:
                liveness.get(img_bgr, face)
            for task, model in app.models.items():
                if task == "detection":
                    continue
                if task == "recognition" and (
                        not decision.accepted
                        or (live_only and face.liveness.is_live is not True)):
                    continue
                model.get(img_bgr, face)
            out.append(face)
        return out
