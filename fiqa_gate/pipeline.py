"""From files to aligned faces: load, detect, align (or take `--aligned` crops as they are)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from fiqa_gate.components import Detector
from fiqa_gate.errors import NoFaceError
from fiqa_gate.faces import (
    Detection,
    Face,
    align_face,
    as_aligned_crop,
    five_points,
    inner_face_patch,
)
from fiqa_gate.images import load_image

# Detectors miss faces in tight or tiny crops (ORL's 92 px, LFW thumbnails): such images
# are enlarged to this short side first. Training and evaluation cut their faces through
# the same function, so the gate sees the crops the student learned from.
MIN_DETECTION_SIDE = 96


def enlarge_for_detection(image: np.ndarray) -> tuple[np.ndarray, float]:
    """(image, 1.0), or the image enlarged to a short side of MIN_DETECTION_SIDE and the
    factor."""
    import cv2

    side = min(image.shape[:2])
    # A thin strip would grow past any detector's input (which shrinks it again) and could
    # take gigabytes on the way: only images that stay small are enlarged.
    if side >= MIN_DETECTION_SIDE or max(image.shape[:2]) * MIN_DETECTION_SIDE > 2048 * side:
        return image, 1.0
    f = MIN_DETECTION_SIDE / side
    return cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_CUBIC), f


def faces_in_image(image: np.ndarray, detector: Detector, source: str = "") -> list[Face]:
    """Every face the detector finds in an image in memory (RGB, uint8, height x width x
    3, as `images.load_image` gives), aligned, largest first; detections in the
    coordinates of `image`. A BGR array (OpenCV's order) would be scored wrongly."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        raise TypeError("faces_in_image takes an RGB uint8 array of shape (height, width, "
                        f"3); got {_describe(image)} (images.load_image reads a file so)")
    if not image.shape[0] or not image.shape[1]:  # OpenCV asserts, enlarging divides by 0
        raise ValueError(f"faces_in_image: the image is empty (shape {image.shape})")
    work, f = enlarge_for_detection(image)
    faces = []
    for i, d in enumerate(detector.detect(work)):
        marks = five_points(d.landmarks, getattr(detector, "name", type(detector).__name__))
        found = Detection(tuple(v / f for v in d.box), marks / f, d.score)
        faces.append(Face(crop=align_face(work, marks), source=source, index=i,
                          detection=found,
                          patch=inner_face_patch(image, found.landmarks)))
    return faces


def faces_from_file(path: str, detector: Detector | None) -> list[Face]:
    """Faces of one file; `detector=None` means the file is an aligned crop already.

    Raises ImageLoadError for unreadable files and NoFaceError when nothing is found.
    An image already in memory goes to `faces_in_image`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"faces_from_file takes a file path; got {_describe(path)} (an "
                        "image in memory: faces_in_image(rgb_uint8_array, detector))")
    image = load_image(path)
    if detector is None:
        return [Face(crop=as_aligned_crop(image), source=path, index=0)]
    faces = faces_in_image(image, detector, source=path)
    if not faces:
        reason = no_face_reason(image, detector)
        raise NoFaceError(f"{path}: {reason}", reason)
    return faces


# a face the detector finds in a turned copy at least this surely (YuNet's own floor is
# 0.6; a turned picture of no face rarely passes 0.9)
TURNED_FACE_SCORE = 0.9


def _turn_hint(image: np.ndarray, detector: Detector) -> str:
    """' (a face is found once the picture is turned 90° clockwise: it may be stored
    turned)' where a turned copy shows one: a phone picture without its EXIF orientation, or a
    scan fed in sideways. Said, not undone: which way is up is the user's to know. Runs
    only for pictures with no face, three detections each."""
    for k, turn in ((3, "90° clockwise"), (1, "90° anticlockwise"), (2, "upside down")):
        work, _ = enlarge_for_detection(np.ascontiguousarray(np.rot90(image, k)))
        try:
            found = detector.detect(work)
        except Exception:  # a hint is not worth a failure of its own
            return ""
        if any(d.score is not None and d.score >= TURNED_FACE_SCORE for d in found):
            return f" (a face is found once the picture is turned {turn}: it may be stored turned)"
    return ""


def no_face_reason(image: np.ndarray, detector: Detector | None = None) -> str:
    """'no face found', with what explains the miss: the picture's light, else (given the
    detector) a turned copy that shows a face."""
    hint = _light_hint(image) or (_turn_hint(image, detector) if detector else "")
    return "no face found" + hint


def _light_hint(image: np.ndarray) -> str:
    """' (the picture is very dark: brightness 0.04)' where light explains a miss."""
    brightness = float(image[::4, ::4].mean() / 255)  # a sample is enough to tell
    if brightness < 0.12:
        return f" (the picture is very dark: brightness {brightness:.2f})"
    if brightness > 0.88:
        return f" (the picture is very bright: brightness {brightness:.2f})"
    return ""


# How far below the most confident detection a larger one may be and still be the
# subject: a false face on a patterned shirt (YuNet 0.60, larger than the real face at
# 0.95) had been taken, and enrolled with --no-gate.
PRIMARY_MARGIN = 0.15


def primary_face(faces: Sequence[Face]) -> Face:
    """The subject of a portrait: the largest face (detectors here sort largest first)
    among those detected about as confidently as the most confident one."""
    if not faces:
        raise NoFaceError("no face to choose from")
    # a face without a (finite) confidence is not outranked by one
    sure = [s if s is not None and math.isfinite(s) else None
            for s in (f.det_score for f in faces)]
    floor = max((s for s in sure if s is not None), default=math.inf) - PRIMARY_MARGIN
    return next(f for f, s in zip(faces, sure, strict=True) if s is None or s >= floor)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype}, shape {value.shape}"
    return type(value).__name__
