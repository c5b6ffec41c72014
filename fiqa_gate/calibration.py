"""Monotone maps from a scorer's raw output to the [0, 1] contract scale.

A calibration is fitted by isotonic regression (pool-adjacent-violators) of a binary
outcome, "this face matched a good reference at FMR 1e-3", on the raw score, and
stored as knots for linear interpolation: small, readable JSON and no dependency.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class Calibration:
    x: list[float]
    y: list[float]
    recognizer: str = ""
    note: str = ""

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.float64)
        out = np.interp(raw, self.x, self.y)
        return np.where(np.isfinite(raw), np.clip(out, 0.0, 1.0), np.nan)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        x, y = list(map(float, data["x"])), list(map(float, data["y"]))
        if len(x) != len(y) or len(x) < 2 or any(b < a for a, b in itertools.pairwise(x)):
            raise ValueError("calibration knots must be two equal-length lists, x increasing")
        # a NaN knot would reject every face, a falling map run the gate backwards
        if not all(map(math.isfinite, x + y)) or any(b < a for a, b in itertools.pairwise(y)) \
                or not 0.0 <= y[0] <= y[-1] <= 1.0:
            raise ValueError("calibration knots must be finite, with y rising within [0, 1]")
        return cls(x=x, y=y, recognizer=str(data.get("recognizer", "")),
                   note=str(data.get("note", "")))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        return cls.from_dict(json.loads(Path(path).read_text()))


def isotonic_fit(raw: np.ndarray, target: np.ndarray, max_knots: int = 256) -> tuple[list, list]:
    """Non-decreasing least-squares fit of `target` on `raw` (PAV), as interpolation knots."""
    raw, target = np.asarray(raw, dtype=np.float64), np.asarray(target, dtype=np.float64)
    ok = np.isfinite(raw)  # a face with no score has nothing to calibrate
    if not ok.any():
        raise ValueError("no finite raw score to fit a calibration on")
    # Equal raw values must get one fitted value whatever their order, so they start as one
    # block weighted by their count (undetected faces all score 0, for instance).
    xs, inverse, counts = np.unique(raw[ok], return_inverse=True, return_counts=True)
    sums = np.bincount(inverse.reshape(-1), weights=target[ok], minlength=len(xs))
    # blocks: value, weight, first x, last x
    vals: list[float] = []
    wts: list[float] = []
    lo: list[float] = []
    hi: list[float] = []
    for x, total, n in zip(xs, sums, counts, strict=True):
        vals.append(total / n)
        wts.append(float(n))
        lo.append(x)
        hi.append(x)
        while len(vals) > 1 and vals[-2] >= vals[-1]:
            w = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w
            vals[-2:] = [v]
            wts[-2:] = [w]
            lo[-2:] = [lo[-2]]
            hi[-2:] = [hi[-1]]
    # Knots at both ends of each block, so every raw score the fit saw maps to its fitted
    # value; linear between blocks. (Knots at block centres had a face inside a wide block
    # interpolated towards the block below: sharpness, whose top block spans 3 to 8777,
    # mapped most faces to 0.48 instead of its fitted 0.65.)
    kx, ky = [], []
    for a, b, v in zip(lo, hi, vals, strict=True):
        for x in dict.fromkeys((a, b)):  # one knot for a block of one raw value
            kx.append(x)
            ky.append(v)
    if len(kx) == 1:
        kx, ky = [kx[0] - 1e-6, kx[0] + 1e-6], [ky[0], ky[0]]
    if len(kx) > max_knots:
        idx = np.unique(np.linspace(0, len(kx) - 1, max_knots).round().astype(int))
        kx, ky = [kx[i] for i in idx], [ky[i] for i in idx]
    return [float(v) for v in kx], [float(v) for v in ky]


def fit_calibration(raw: np.ndarray, matched: np.ndarray, recognizer: str,
                    note: str = "") -> Calibration:
    x, y = isotonic_fit(raw, np.asarray(matched, dtype=np.float64))
    return Calibration(x=x, y=y, recognizer=recognizer, note=note)


def read_fitted(path: str | Path) -> dict:
    """A `fiqa-gate calibrate` file's contents: {"recognizer", "scorers": {name: map}, ...}."""
    from fiqa_gate.errors import FiqaGateError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise FiqaGateError(f"{path}: cannot read the calibration: {exc.strerror or exc}") \
            from None
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("scorers"), dict):
        raise FiqaGateError(f"{path}: not a calibration file of `fiqa-gate calibrate`")
    return data


def _fitted_on_another_model(data: dict, scorer: str, model_file: str | Path | None) -> bool:
    """Whether a calibrate file's map for `scorer` was fitted on another model file than
    `model_file` (None: the shipped student's, for the student)."""
    if model_file is None and scorer == "student":
        from fiqa_gate.student import SHIPPED_STUDENT

        model_file = SHIPPED_STUDENT
    models = data.get("models")
    model = models.get(scorer) if isinstance(models, dict) else None
    fitted_on = model.get("sha256") if isinstance(model, dict) else None
    if not fitted_on or model_file is None:
        return False
    from fiqa_gate.assets import sha256_file

    return sha256_file(Path(model_file)) != fitted_on


def load_fitted(path: str | Path, scorer: str, recognizer: str,
                model_file: str | Path | None = None) -> Calibration:
    """The map `fiqa-gate calibrate` fitted for `scorer` with `recognizer`, read from its
    file; refused when the file was fitted with another recognizer, for other scorers, or
    on another model file than `model_file` (the scorer's --model; the shipped student's
    when the student runs without one): its map would not fit these raw outputs."""
    from fiqa_gate.errors import FiqaGateError

    data = read_fitted(path)
    if data.get("recognizer") != recognizer:
        raise FiqaGateError(f"{path} was fitted with recognizer {data.get('recognizer')!r}, "
                            f"not {recognizer!r}: give --recognizer {data.get('recognizer')}"
                            f", or calibrate for {recognizer}")
    entry = data["scorers"].get(scorer)
    if entry is None:
        raise FiqaGateError(f"{path} holds no calibration for scorer {scorer!r} (it has "
                            f"{', '.join(sorted(data['scorers'])) or 'none'})")
    if _fitted_on_another_model(data, scorer, model_file):
        raise FiqaGateError(f"{path} was fitted on another {scorer} model file than "
                            f"{model_file or 'the shipped one'}; calibrate that model (--model)")
    return _fitted_map(path, scorer, recognizer, entry)


def _fitted_map(path: str | Path, scorer: str, recognizer: str, entry: dict) -> Calibration:
    from fiqa_gate.errors import FiqaGateError

    try:
        return Calibration.from_dict({**entry, "recognizer": recognizer})
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise FiqaGateError(f"{path}: the calibration of {scorer} is damaged: {exc}") \
            from None


def shipped_fitted(scorer: str, recognizer: str, model_file: str | Path | None = None
                   ) -> Calibration | None:
    """The map fiqa-gate ships for `scorer` with a recognizer other than the training
    one (`models/calibrations/<recognizer>.json`, written by `fiqa-gate calibrate`), or
    None: no file for the recognizer, none for the scorer, or the student runs another
    model file than the one it was fitted on."""
    from fiqa_gate import models_dir

    path = models_dir() / "calibrations" / f"{Path(recognizer).name}.json"
    if not path.is_file():
        return None
    data = read_fitted(path)
    if (data.get("recognizer") != recognizer or scorer not in data["scorers"]
            or _fitted_on_another_model(data, scorer, model_file)):
        return None  # (a name that only ends like the file's: "x/dlib")
    return _fitted_map(path, scorer, recognizer, data["scorers"][scorer])
