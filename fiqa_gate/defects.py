"""Why a face was likely rejected: cheap, named measurements of the aligned crop and of
the detection, in the spirit of ISO/IEC 29794-5's quality components.

The learned score says how likely a face is to be matched; these say what to fix (light,
distance, pose, focus). They only explain a rejection: the gate decides on the score.
Each measurement has a limit past which it is named; the limits were set on ORL faces of
the training identities (s1-s30), clean and damaged by the training recipe's seeded kinds,
so that few clean faces are named and the matching kind of damage mostly is
(`python -m fiqa_gate_training.defect_limits`, figures in the README).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fiqa_gate.components import Detector
from fiqa_gate.faces import ARCFACE_TEMPLATE, Face

# The inner face of the 112x112 ArcFace crop (brows to chin, cheek to cheek): the black
# borders of an aligned crop and the background stay out of the light measurements.
_ROWS = slice(36, 106)
_COLS = slice(26, 86)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurements:
    brightness: float  # mean luminance of the inner face, 0..1
    contrast: float  # its standard deviation, 0..1
    clipped: float  # share of its pixels at 250 or more
    sharpness: float  # variance of the Laplacian of its luminance over its variance
    noise: float  # Immerkaer's estimate of the noise's standard deviation, 0..255 scale
    eye_distance: float | None  # pixels between the eyes in the source image
    yaw: float | None  # nose off the eyes' midpoint along the eye line, in eye distances
    misplaced: float | None  # mean px between the landmarks found in the crop and the template


def measure(face: Face, detector: Detector | None = None) -> Measurements:
    """The face's measurements; `misplaced` needs a detector (one detection on the crop,
    about 4 ms), the eye distance and the yaw the face's own detection."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(face.crop), cv2.COLOR_RGB2GRAY)
    inner = grey[_ROWS, _COLS].astype(np.float64)
    lap = cv2.Laplacian(inner, cv2.CV_64F)
    # Immerkaer (1996): a mask that cancels a smooth image's second derivatives; what it
    # leaves is mostly noise
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    residual = cv2.filter2D(inner, cv2.CV_64F, mask)[1:-1, 1:-1]
    noise = float(np.sqrt(np.pi / 2) * np.abs(residual).mean() / 6)
    eye_distance = yaw = None
    if face.detection is not None:
        points = np.asarray(face.detection.landmarks, np.float64).reshape(5, 2)
        eyes = points[1] - points[0]
        eye_distance = float(np.linalg.norm(eyes))
        if eye_distance > 0:
            along = eyes / eye_distance
            yaw = float((points[2] - (points[0] + points[1]) / 2) @ along / eye_distance)
    return Measurements(
        brightness=float(inner.mean() / 255), contrast=float(inner.std() / 255),
        clipped=float((inner >= 250).mean()),
        # over the variance: a dim or flat face is not also called blurred
        sharpness=float(lap.var() / max(inner.var(), 1.0)), noise=noise,
        eye_distance=eye_distance, yaw=yaw,
        misplaced=None if detector is None else _misplaced_or_none(face.crop, detector))


def _misplaced_or_none(crop: np.ndarray, detector: Detector) -> float | None:
    try:
        return _misplaced(crop, detector)
    except Exception as exc:  # a failing detector costs this one measurement
        log.debug("alignment check failed: %s", exc)
        return None


_MARGIN = 24  # the detector needs some surroundings to find a face that fills its picture


def _misplaced(crop: np.ndarray, detector: Detector) -> float | None:
    """How far the landmarks a detector finds in the aligned crop are from the template
    (mean px): large when the source's landmarks were wrong (a bad alignment) or guessed
    (a partly hidden face). None when the crop shows no face to the detector."""
    import cv2

    m = _MARGIN
    found = detector.detect(cv2.copyMakeBorder(np.ascontiguousarray(crop), m, m, m, m,
                                               cv2.BORDER_REPLICATE))
    if not found:
        return None
    points = np.asarray(max(found, key=lambda d: d.score).landmarks, np.float64)
    return float(np.linalg.norm(points.reshape(5, 2) - m - ARCFACE_TEMPLATE, axis=1).mean())


# Past these a measurement is named (the module doc says how they were set).
LIMITS = {
    "dark": 0.25,  # brightness below (clean ORL faces: 0.41 at the 1st percentile)
    "bright": 0.75,  # brightness above (0.59 at the 99th)
    "clipped": 0.15,  # share of blown-out pixels above (none)
    "flat": 0.06,  # contrast below (0.108)
    "blurred": 0.05,  # sharpness below (0.081)
    "noisy": 6.0,  # noise above (3.2 at the 99th)
    "small": 24.0,  # px between the eyes below: upscaled 1.5 times to the crop's 35.2
    "turned": 0.30,  # |yaw| above (ORL's most turned faces: 0.22)
    "misplaced": 8.0,  # px off the template above (clean: 4.7 at the 95th)
}


def defects(m: Measurements) -> list[str]:
    """What a user could fix about a face, each with its measurement; [] when nothing is
    past its limit (the score may still be low: occlusion, compression and the like are
    not measured)."""
    found = []
    if m.brightness < LIMITS["dark"]:
        found.append(f"too dark (brightness {m.brightness:.2f})")
    elif m.brightness > LIMITS["bright"]:
        found.append(f"too bright (brightness {m.brightness:.2f})")
    if m.clipped > LIMITS["clipped"]:
        found.append(f"blown-out highlights ({m.clipped:.0%} of the face)")
    if m.contrast < LIMITS["flat"]:
        found.append(f"low contrast ({m.contrast:.2f})")
    if m.sharpness < LIMITS["blurred"]:
        found.append(f"blurred (sharpness {m.sharpness:.3f})")
    if m.noise > LIMITS["noisy"]:
        found.append(f"noisy (noise {m.noise:.1f})")
    if m.eye_distance is not None and m.eye_distance < LIMITS["small"]:
        found.append(f"small face ({m.eye_distance:.0f} px between the eyes)")
    if m.yaw is not None and abs(m.yaw) > LIMITS["turned"]:
        found.append(f"head turned (yaw {m.yaw:+.2f})")
    if m.misplaced is not None and m.misplaced > LIMITS["misplaced"]:
        found.append(f"misaligned or partly hidden (landmarks {m.misplaced:.0f} px off)")
    return found


def tally(found: Iterable[Sequence[str]]) -> str:
    """'blurred 12, too dark 3' over several faces' defects, most frequent first."""
    counts = Counter(text.split(" (")[0] for texts in found for text in texts)
    return ", ".join(f"{name} {n}" for name, n in counts.most_common())
