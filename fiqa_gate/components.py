"""The three kinds of component a plugin can provide: detectors, recognizers, scorers.

Each is a small class with one job; concrete ones live in plugins and register
through the hooks in `fiqa_gate.hookspecs`.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fiqa_gate.calibration import Calibration
from fiqa_gate.faces import ALIGNED_SIZE, Detection, Face


class Detector(ABC):
    """Finds faces and their five landmarks in an RGB uint8 image."""

    name: str = "detector"

    @abstractmethod
    def detect(self, image: np.ndarray) -> list[Detection]: ...


class Recognizer(ABC):
    """Embeds aligned 112x112 RGB uint8 crops; compares with cosine similarity.

    `threshold` is the cosine similarity at which the recognizer runs at FMR 1e-3:
    two faces match when their similarity is >= threshold.
    """

    name: str = "recognizer"
    dim: int = 0
    threshold: float = 0.0
    threshold_source: str = ""

    @abstractmethod
    def embed_raw(self, crops: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB -> (N, dim) float32, not normalised."""

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings, ready for cosine similarity and a FAISS IP index."""
        return self.embed_with_norms(crops)[0]

    def embed_with_norms(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(L2-normalised embeddings, the raw embeddings' norms) from one forward pass:
        the norm is a quality signal of its own (MagFace's observation)."""
        crops = check_crops(crops)
        raw = np.asarray(self.embed_raw(crops))
        # said here, for the batch: a wrong shape had failed as an IndexError, or as the
        # first file's fault on every face of a gallery
        if raw.ndim != 2 or len(raw) != len(crops) or (self.dim and raw.shape[1] != self.dim):
            raise ValueError(f"recognizer {self.name!r} returned embeddings of shape "
                             f"{raw.shape} for {len(crops)} faces; it declares "
                             f"({len(crops)}, {self.dim})")
        norms = np.linalg.norm(raw, axis=1)
        return (raw / np.maximum(norms, 1e-12)[:, None]).astype(np.float32), norms


@dataclass
class Scores:
    """What a scorer says of a batch: the network's raw output and the [0, 1] score."""

    raw: np.ndarray
    calibrated: np.ndarray


def real_scores(values: object, scorer: str) -> np.ndarray:
    """A scorer's output as float64, one a face: real numbers, None or NaN for no score.
    Strings, bools and complex numbers are refused ('0.9' had passed as a score)."""
    got = np.asarray(values)
    if got.dtype.kind == "O":  # a list of Decimals, numpy scalars and None
        items = got.reshape(-1).tolist()
        if all(v is None or _real(v) for v in items):
            try:
                return np.asarray([np.nan if v is None else float(v) for v in items])
            except (ArithmeticError, ValueError) as exc:  # sNaN, an int past float's range
                raise ValueError(f"scorer {scorer!r} returned a score that is no float: "
                                 f"{exc}") from None
    elif got.dtype.kind in "iuf":
        return got.astype(np.float64).reshape(-1)
    raise ValueError(f"scorer {scorer!r} returned {got.dtype} scores; a scorer returns one "
                     "real number per face (None or NaN: no score)")


def _real(value: object) -> bool:
    """A real number: float, int, numpy's, or a Decimal (a Number, but not a Complex)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, numbers.Real) or (isinstance(value, numbers.Number)
                                               and not isinstance(value, numbers.Complex))


class Scorer(ABC):
    """Rates aligned faces; higher is better.

    `calibration` maps the raw output to the contract scale: the probability that the
    face matches a good reference of the same person at the recognizer's FMR 1e-3
    threshold. A scorer without a fitted calibration reports raw values clipped to
    [0, 1] and says so in `calibrated_for`.
    """

    name: str = "scorer"
    calibration: Calibration | None = None

    @abstractmethod
    def raw_scores(self, faces: Sequence[Face]) -> np.ndarray: ...

    @property
    def calibrated_for(self) -> str | None:
        return None if self.calibration is None else self.calibration.recognizer

    def score(self, faces: Sequence[Face]) -> Scores:
        if isinstance(faces, np.ndarray):
            raise TypeError("a scorer scores Face objects: wrap aligned crops as "
                            "[Face(crop) for crop in crops] (fiqa_gate.faces.Face)")
        raw = real_scores(self.raw_scores(faces), self.name)
        if len(raw) != len(faces):
            raise ValueError(f"scorer {self.name!r} returned {len(raw)} scores "
                             f"for {len(faces)} faces")
        if self.calibration is None:  # inf is no score, as NaN is: not a perfect face
            calibrated = np.where(np.isfinite(raw), np.clip(raw, 0.0, 1.0), np.nan)
        else:
            calibrated = self.calibration(raw)
        return Scores(raw=raw, calibrated=calibrated)


def check_crops(crops: np.ndarray) -> np.ndarray:
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if crops.ndim != 4 or crops.shape[1:] != (ALIGNED_SIZE, ALIGNED_SIZE, 3):
        raise ValueError(f"expected aligned crops of shape (N, {ALIGNED_SIZE}, {ALIGNED_SIZE}, 3),"
                         f" got {crops.shape}")
    if crops.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB crops, got {crops.dtype}")
    return crops


def stack_crops(faces: Sequence[Face]) -> np.ndarray:
    if not faces:
        return np.zeros((0, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
    return check_crops(np.stack([f.crop for f in faces]))
