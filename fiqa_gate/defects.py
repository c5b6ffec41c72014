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
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fiqa_gate.components import Detector
from fiqa_gate.faces import (
    ARCFACE_TEMPLATE,
    MIN_PATCH,
    TEMPLATE_EYE_DISTANCE,
    Face,
    five_points,
)

log = logging.getLogger(__name__)

# The inner face of the 112x112 ArcFace crop (brows to chin, cheek to cheek): the
# background stays out of the light measurements.
_ROWS = slice(36, 106)
_COLS = slice(26, 86)
# In the template the eyes are 35.2 px apart and 40.7 px above the mouth: a turned head
# shortens the first, a nodding one the second, so the face's size is the larger.
_EYES_TO_MOUTH = float(np.linalg.norm(ARCFACE_TEMPLATE[3:].mean(0) - ARCFACE_TEMPLATE[:2].mean(0))
                       / TEMPLATE_EYE_DISTANCE)
_MARGIN = 24  # the detector needs some surroundings to find a face that fills its picture


@dataclass(frozen=True)
class Measurements:
    brightness: float  # mean luminance of the inner face, 0..1
    contrast: float  # its standard deviation over its mean
    clipped: float  # share of its pixels at 250 or more
    sharpness: float  # variance of the Laplacian of its luminance over its variance
    noise: float  # Immerkaer's estimate of the noise's standard deviation (0..255), in the
    # face's `patch` of its source picture when it has one, else in the crop
    face_size: float | None  # px between the eyes in the source, were the face frontal
    yaw: float | None  # nose off the eyes' midpoint along the eye line, in eye distances
    # mean px between the landmarks a detector finds in the crop and the template; inf
    # when it finds no face there; None without a detector
    misplaced: float | None


def measure(face: Face, detector: Detector | None = None) -> Measurements:
    """The face's measurements; `misplaced` needs a detector (one detection on the crop,
    about 2 ms), the size and the yaw the face's own detection."""
    import cv2

    crop = np.ascontiguousarray(face.crop)
    inner = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)[_ROWS, _COLS].astype(np.float64)
    # the black fill where the picture ended is no part of the face; nor are the pixels
    # beside it, where the Laplacian and the noise filter see its edge
    fill = _fill(crop)
    if fill.any():
        fill = cv2.dilate(fill.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    face_px = ~fill[_ROWS, _COLS]
    seen = face_px.sum() >= face_px.size // 4  # else hardly any picture: its light says nothing
    px = inner[face_px] if seen else np.full(1, np.nan)
    lap = cv2.Laplacian(inner, cv2.CV_64F)[face_px] if seen else px
    # noise where the camera left it: alignment's resampling smooths it away when it
    # enlarges a face and makes texture look like noise when it shrinks one
    patch = face.patch
    if isinstance(patch, np.ndarray) and patch.ndim == 2 and patch.dtype == np.uint8 \
            and min(patch.shape) >= MIN_PATCH:
        noise = _noise(patch.astype(np.float64))
    else:  # an aligned input is its own source picture
        noise = _noise(inner, face_px) if seen else float("nan")
    size = yaw = None
    points = _points(face.detection.landmarks) if face.detection is not None else None
    if points is not None:
        eyes = points[1] - points[0]
        eye_distance = float(np.linalg.norm(eyes))
        if eye_distance >= 1:  # below: landmarks that say nothing of size or pose
            to_mouth = float(np.linalg.norm(points[3:].mean(0) - points[:2].mean(0)))
            size = max(eye_distance, to_mouth / _EYES_TO_MOUTH)
            yaw = float((points[2] - points[:2].mean(0)) @ (eyes / eye_distance)
                        / eye_distance)
    return Measurements(
        brightness=float(px.mean() / 255),
        # relative to the brightness: a dim face is dim, not also flat
        contrast=float(px.std() / max(px.mean(), 1.0)),
        clipped=float((px >= 250).mean()),
        sharpness=float(lap.var() / max(px.var(), 1.0)), noise=noise,
        face_size=size, yaw=yaw,
        misplaced=None if detector is None else _misplaced(crop, detector))


_NOISE_MASK = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)


def _noise(grey: np.ndarray, where: np.ndarray | None = None) -> float:
    """Immerkaer (1996): a mask that cancels a smooth image's second derivatives leaves
    mostly noise; its mean absolute response gives the noise's standard deviation."""
    import cv2

    residual = np.abs(cv2.filter2D(grey, cv2.CV_64F, _NOISE_MASK,
                                   borderType=cv2.BORDER_REFLECT))
    values = residual[where] if where is not None else residual[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * values.mean() / 6)


def _fill(crop: np.ndarray) -> np.ndarray:
    """The black an alignment leaves where the source picture ended: pure black pixels
    joined to the crop's edge."""
    import cv2

    black = cv2.inRange(crop, (0, 0, 0), (0, 0, 0))  # 255 where pure black (numpy: slow)
    if not (black[0].any() or black[-1].any() or black[:, 0].any() or black[:, -1].any()):
        return np.zeros(black.shape, bool)  # nothing joined to the edge: the usual case
    _, labels = cv2.connectedComponents(black, connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


def _misplaced(crop: np.ndarray, detector: Detector) -> float | None:
    """How far the landmarks a detector finds in the aligned crop are from the template
    (mean px): large when the source's landmarks were wrong (a bad alignment) or guessed
    (a tilted or partly hidden face); inf when it finds no face; None when it fails."""
    import cv2

    m = _MARGIN
    try:
        found = detector.detect(cv2.copyMakeBorder(crop, m, m, m, m, cv2.BORDER_REPLICATE))
    except Exception as exc:  # a failing detector costs this one measurement
        log.debug("alignment check failed: %s", exc)
        return None
    if not found:
        return math.inf
    points = _points(max(found, key=lambda d: d.score).landmarks)
    if points is None:
        return None
    return float(np.linalg.norm(points - m - ARCFACE_TEMPLATE, axis=1).mean())


def _points(landmarks: object) -> np.ndarray | None:
    """Five (x, y) landmarks, or None for what `five_points` refuses (68 points, xs then
    ys, NaN): a measurement lost, not a reason made up."""
    try:
        return five_points(landmarks, "checking")
    except ValueError:
        return None


# Past these a measurement is named (the module doc says how they were set).
LIMITS = {  # in parentheses: clean ORL faces of s1-s30, as `defect_limits` measures them
    "dark": 0.25,  # brightness below (0.40 at the 1st percentile)
    "bright": 0.75,  # brightness above (0.70 at the 99th)
    "clipped": 0.15,  # share of blown-out pixels above (none)
    "flat": 0.10,  # contrast (over brightness) below (0.14 at the 1st)
    "blurred": 0.05,  # sharpness below (0.046 at the 1st: 4 of 300, s23's soft pictures)
    "noisy": 11.0,  # noise in the source above (8.6 at the 99th, 9.3 at most)
    "small": 24.0,  # px between the eyes below: upscaled 1.5 times to the crop's 35.2
    "turned": 0.30,  # |yaw| above (ORL's most turned faces: 0.22)
    "misplaced": 8.0,  # px off the template above (5.0 at the 95th, 6.9 at the 99th)
}


def defects(m: Measurements) -> list[str]:
    """What a user could fix about a face, each with its measurement; [] when nothing is
    past its limit (the score may still be low: occlusion, compression and the like are
    not measured)."""
    found = []
    turned = m.yaw is not None and abs(m.yaw) > LIMITS["turned"]
    small = m.face_size is not None and m.face_size < LIMITS["small"]
    # beside a turned head the crop's inner window holds background: its light is not
    # the face's
    if not turned:
        if m.brightness < LIMITS["dark"]:
            found.append(f"too dark (brightness {m.brightness:.3f})")
        elif m.brightness > LIMITS["bright"]:
            found.append(f"too bright (brightness {m.brightness:.3f})")
        if m.clipped > LIMITS["clipped"]:
            found.append(f"blown-out highlights ({m.clipped:.0%} of the face)")
        if m.contrast < LIMITS["flat"]:
            found.append(f"low contrast ({m.contrast:.3f})")
    # a face with no texture at all has no edges to blur; a small one was blurred by its
    # enlargement, and its patch is too small to tell noise: its size is the news
    textureless = m.contrast * m.brightness * 255 < 2.0
    if m.sharpness < LIMITS["blurred"] and not textureless and not small:
        found.append(f"blurred (sharpness {m.sharpness:.3f})")
    if m.noise > LIMITS["noisy"] and not small:
        found.append(f"noisy (noise {m.noise:.1f})")
    if small:
        found.append(f"small face ({m.face_size:.0f} px between the eyes)")
    if turned:
        found.append(f"head turned (yaw {m.yaw:+.2f})")
    # a turned head is off the frontal template anyway: the turn is the news
    if m.misplaced is not None and LIMITS["misplaced"] < m.misplaced < math.inf \
            and not turned:
        found.append(f"face off the template (landmarks {m.misplaced:.0f} px off: "
                     "misaligned or partly hidden)")
    if m.misplaced == math.inf:  # cut off, hidden, damaged beyond finding, or no face
        found.append("no face found in the aligned crop")
    return found


def tally(found: Iterable[Sequence[str]]) -> str:
    """'blurred 12, too dark 3' over several faces' defects, most frequent first."""
    counts = Counter(text.split(" (")[0] for texts in found for text in texts)
    return ", ".join(f"{name} {n}" for name, n in counts.most_common())


def likely(found: Iterable[Sequence[str]]) -> str:
    """' (likely: blurred 12, too dark 3)' for a command's summary, or ''."""
    counted = tally(found)
    return f" (likely: {counted})" if counted else ""
