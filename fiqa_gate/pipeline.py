"""From files to aligned faces: load, detect, align (or take `--aligned` crops as they are)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fiqa_gate.components import Detector
from fiqa_gate.errors import NoFaceError
from fiqa_gate.faces import Face, align_face, as_aligned_crop
from fiqa_gate.images import load_image


def faces_in_image(image: np.ndarray, detector: Detector, source: str = "") -> list[Face]:
    """Every face the detector finds, aligned, largest first."""
    return [Face(crop=align_face(image, d.landmarks), source=source, index=i, detection=d)
            for i, d in enumerate(detector.detect(image))]


def faces_from_file(path: str, detector: Detector | None) -> list[Face]:
    """Faces of one file; `detector=None` means the file is an aligned crop already.

    Raises ImageLoadError for unreadable files and NoFaceError when nothing is found.
    """
    image = load_image(path)
    if detector is None:
        return [Face(crop=as_aligned_crop(image), source=path, index=0)]
    faces = faces_in_image(image, detector, source=path)
    if not faces:
        raise NoFaceError(f"{path}: no face found")
    return faces


def primary_face(faces: Sequence[Face]) -> Face:
    """The subject of a portrait: the largest face (detectors here sort largest first)."""
    return faces[0]
