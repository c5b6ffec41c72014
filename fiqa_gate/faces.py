"""The unit of work: one aligned face, where it came from, and what the detector said."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fiqa_gate.errors import NotAlignedError

ALIGNED_SIZE = 112

# insightface's ArcFace template for a 112x112 crop: eyes, nose, mouth corners
# (subject's right eye first, as the image shows it on the left).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


@dataclass
class Detection:
    """A face found in an image: box (x, y, w, h), five landmarks (x, y), confidence."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float


@dataclass
class Face:
    """An aligned 112x112 RGB crop ready for scoring and embedding."""

    crop: np.ndarray
    source: str = ""
    index: int = 0
    detection: Detection | None = None
    # the source picture's inner face (`inner_face_patch`), grey, copied at detection:
    # its noise is measured there, before alignment resampled it
    patch: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # checked where it is made, naming the face: a bad crop had failed the whole batch
        # later, and a grey one was said to have shape (1, 1, 112, 112)
        crop = self.crop
        if not (isinstance(crop, np.ndarray) and crop.dtype == np.uint8
                and crop.shape == (ALIGNED_SIZE, ALIGNED_SIZE, 3)):
            got = (f"{crop.dtype} array of shape {crop.shape}" if isinstance(crop, np.ndarray)
                   else type(crop).__name__)
            raise ValueError(f"{self.source or 'a face'}: a face's crop is an aligned "
                             f"{ALIGNED_SIZE}x{ALIGNED_SIZE} RGB uint8 array (height x width "
                             f"x 3), not a {got}")

    @property
    def det_score(self) -> float | None:
        return None if self.detection is None else self.detection.score

    @property
    def face_id(self) -> str:
        return f"{self.source}#{self.index}"


TEMPLATE_EYE_DISTANCE = float(np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0]))
MAX_PATCH = 256  # px a side: a large face's centre holds noise enough
MIN_PATCH = 16  # px a side: smaller is all eye and mouth edges, no skin


def inner_face_patch(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray | None:
    """A grey copy of `image` (RGB uint8) between a face's eyes and mouth corners, at
    most MAX_PATCH px a side around its centre; None where that is under MIN_PATCH.
    A copy, so that a caller reusing its picture (a video loop) does not change it, and
    small, so that faces kept for long keep no whole pictures."""
    import cv2

    points = np.asarray(landmarks, np.float64).reshape(5, 2)
    if not np.isfinite(points).all():
        return None
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w, half_h = min(x1 - x0, MAX_PATCH) / 2, min(y1 - y0, MAX_PATCH) / 2
    h, w = image.shape[:2]
    top, bottom = max(int(cy - half_h), 0), min(int(cy + half_h), h)
    left, right = max(int(cx - half_w), 0), min(int(cx + half_w), w)
    if bottom - top < MIN_PATCH or right - left < MIN_PATCH:
        return None
    return cv2.cvtColor(np.ascontiguousarray(image[top:bottom, left:right]),
                        cv2.COLOR_RGB2GRAY)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping src onto dst.

    Umeyama (1991), closed form; returns the 2x3 matrix for cv2.warpAffine.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var_s = (s0**2).sum() / len(src)
    scale = float(np.trace(np.diag(sig) @ sign) / var_s) if var_s > 0 else 1.0
    shift = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, shift[:, None]])


def five_points(landmarks: object, detector: str) -> np.ndarray:
    """A detector's five landmarks as a (5, 2) float array: five (x, y) rows or the same ten
    numbers in a row, with any axes of length 1 around them (a plugin slicing kpss[i:i+1]).
    An xs-then-ys (2, 5) array would be misread, so it is refused, as are NaN and other
    shapes, with the detector's name."""
    try:
        marks = np.asarray(landmarks)
    except ValueError:  # a ragged list
        marks = np.asarray(None)
    squeezed = marks.squeeze() if marks.size == 10 else marks
    if (squeezed.shape not in ((5, 2), (10,)) or marks.dtype.kind not in "iuf"
            or not np.isfinite(marks).all()):
        raise ValueError(f"detector {detector} gave a face without five finite (x, y) "
                         f"landmarks ({marks.dtype} of shape {marks.shape}; expected five "
                         "rows of two numbers)")
    return squeezed.reshape(5, 2).astype(np.float64)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """Warp `image` so its five landmarks land on the ArcFace template (size x size).

    Black borders, as insightface's norm_crop, so recognizers see what they were trained on.
    """
    import cv2

    template = ARCFACE_TEMPLATE * (size / ALIGNED_SIZE)
    matrix = similarity_transform(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), template)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def as_aligned_crop(image: np.ndarray) -> np.ndarray:
    """Treat an image as an already aligned crop: resize to 112x112 if needed. Aligned
    crops are square; anything else would be stretched, so it is refused."""
    h, w = image.shape[:2]
    if h != w:
        raise NotAlignedError(f"not an aligned face crop: {w}x{h} pixels (aligned crops "
                              f"are square; they are resized to {ALIGNED_SIZE}x"
                              f"{ALIGNED_SIZE}); drop --aligned to detect and align the face")
    if h == ALIGNED_SIZE:
        return image
    import cv2

    return cv2.resize(image, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_AREA)
