"""dlib ResNet v1 recognizer (CC0), 128-D; optional extra: pip install 'fiqa-gate[dlib]'.

dlib aligns its own 150x150 chips from its 5-point landmarks; we find those landmarks on
our 112x112 crop (the whole crop is the face box), so the recognizer sees the
alignment it was trained with.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fiqa_gate.assets import pinned_package_file
from fiqa_gate.components import Recognizer
from fiqa_gate.errors import ModelError
from fiqa_gate.hookspecs import hookimpl

MODELS = "face_recognition_models/models/"


class DlibResNetRecognizer(Recognizer):
    """Input: RGB uint8. dlib's own rule is Euclidean distance < 0.6 on its descriptors."""

    name = "dlib"
    dim = 128
    # Cosine similarity at FMR 1e-3 over the 43,500 impostor pairs of ORL s1-s30.
    threshold = 0.931
    threshold_source = "FMR 1e-3 on ORL s1-s30"

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError:
            raise ModelError("the dlib recognizer needs the dlib extra: "
                             "pip install 'fiqa-gate[dlib]'") from None
        self._dlib = dlib
        self._shape = dlib.shape_predictor(
            str(pinned_package_file(MODELS + "shape_predictor_5_face_landmarks.dat")))
        self._net = dlib.face_recognition_model_v1(
            str(pinned_package_file(MODELS + "dlib_face_recognition_resnet_model_v1.dat")))

    def embed_raw(self, crops: np.ndarray) -> np.ndarray:
        out = []
        for crop in crops:
            img = np.ascontiguousarray(crop)
            h, w = img.shape[:2]
            shape = self._shape(img, self._dlib.rectangle(8, 8, w - 8, h - 8))
            out.append(np.asarray(self._net.compute_face_descriptor(img, shape, 0),
                                  dtype=np.float32))
        return np.stack(out) if out else np.zeros((0, self.dim), np.float32)


@hookimpl
def register_recognizers(register: Callable[..., None]) -> None:
    register("dlib", DlibResNetRecognizer,
             "dlib ResNet v1 (CC0), needs the [dlib] extra")
