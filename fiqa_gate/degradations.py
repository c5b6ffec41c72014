"""Seeded, recorded image degradations: how the labels and the test protocol make bad faces.

Each degradation takes the full RGB image, the face's five landmarks and a severity in
[0, 1], and returns the degraded image, the landmarks to align with (misalignment moves
them) and its parameters. Sizes are in aligned-crop pixels (the 112x112 ArcFace crop), so
"blur radius 3" means the same thing for a 92x112 ORL face and a face in a group photo.

`degrade(image, landmarks, rng)` draws a degradation (or a combination) and a severity;
the same seed gives the same result, and the returned record reproduces it through
`apply(image, landmarks, record)`. It draws from `KINDS`, the kinds the recipes label and
train on; `HELD_OUT_KINDS` (pixelation, haze, side shadow, colour cast, salt and pepper,
posterisation, glare) are never trained on, for a test of damage the scorer never saw.
`EXTRA_KINDS` (over-sharpening, solarisation, interlacing, wavy warp, chromatic aberration,
colour noise, median smoothing) are neither: a recipe may add them to its distillation set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fiqa_gate.faces import TEMPLATE_EYE_DISTANCE

Params = dict[str, Any]


@dataclass(frozen=True)
class Degraded:
    image: np.ndarray
    landmarks: np.ndarray
    record: list[Params]


def _crop_scale(landmarks: np.ndarray) -> float:
    """Image pixels per aligned-crop pixel for this face."""
    eyes = np.linalg.norm(landmarks[1] - landmarks[0])
    return max(float(eyes) / TEMPLATE_EYE_DISTANCE, 0.05)


def _lerp(lo: float, hi: float, severity: float) -> float:
    return float(lo + (hi - lo) * severity)


def _u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# Each entry: draw parameters from (severity, rng, crop scale), then apply them.
# Parameters are plain JSON values so a record can be stored next to the sample.

def _draw_defocus(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"radius": _lerp(1.0, 7.0, sev) * scale}


def _apply_defocus(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    r = max(p["radius"], 0.5)
    size = 2 * int(np.ceil(r)) + 1
    yy, xx = np.mgrid[:size, :size] - size // 2
    kernel = (xx**2 + yy**2 <= r * r).astype(np.float32)
    kernel /= kernel.sum()
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT), lm


def _draw_motion(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"length": _lerp(3.0, 22.0, sev) * scale, "angle": float(rng.uniform(0, 180))}


def _apply_motion(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    length = max(p["length"], 1.0)
    size = 2 * int(np.ceil(length / 2)) + 1
    kernel = np.zeros((size, size), np.float32)
    kernel[size // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), p["angle"], length / size)
    kernel = cv2.warpAffine(kernel, rot, (size, size))
    kernel /= max(kernel.sum(), 1e-6)
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT), lm


def _draw_downscale(sev: float, rng: np.random.Generator, scale: float) -> Params:
    # factor of the aligned-crop resolution the face keeps: 0.5 -> 56 px, 0.07 -> 8 px
    return {"factor": _lerp(0.5, 0.07, sev) / scale}


def _apply_downscale(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    h, w = img.shape[:2]
    f = min(p["factor"], 1.0)
    small = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), lm


def _draw_lowlight(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"gain": _lerp(0.5, 0.06, sev), "read_noise": _lerp(2.0, 8.0, sev),
            "seed": int(rng.integers(2**31))}


def _apply_lowlight(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    # Fewer photons (shot noise), sensor read noise, then the camera's auto-gain.
    rng = np.random.default_rng(p["seed"])
    photons = img.astype(np.float64) * p["gain"]
    noisy = rng.poisson(np.maximum(photons, 0)) + rng.normal(0, p["read_noise"], img.shape)
    return _u8(noisy / p["gain"]), lm


def _draw_jpeg(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"quality": round(_lerp(30, 3, sev))}


def _apply_jpeg(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, p["quality"]])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]), lm


def _draw_exposure(sev: float, rng: np.random.Generator, scale: float) -> Params:
    if rng.random() < 0.5:
        return {"gain": _lerp(1.6, 4.5, sev)}  # over-exposed, highlights clip
    return {"gain": _lerp(0.4, 0.06, sev)}  # under-exposed, kept 8-bit (quantised)


def _apply_exposure(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    return _u8(img.astype(np.float64) * p["gain"]), lm


def _draw_contrast(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"alpha": _lerp(0.5, 0.06, sev)}


def _apply_contrast(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    mean = img.reshape(-1, img.shape[-1]).mean(0)
    return _u8(mean + (img.astype(np.float64) - mean) * p["alpha"]), lm


def _draw_occlusion(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"region": str(rng.choice(["eyes", "mouth", "half"])), "extent": _lerp(0.6, 1.4, sev),
            "grey": int(rng.integers(0, 256))}


def _apply_occlusion(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    out = img.copy()
    s = _crop_scale(lm) * p["extent"]
    if p["region"] == "eyes":  # sunglasses / a bar across both eyes
        centre, half = (lm[0] + lm[1]) / 2, np.array([40.0, 11.0]) * s
    elif p["region"] == "mouth":  # a mask or a hand over the mouth
        centre, half = (lm[3] + lm[4]) / 2 + np.array([0, 4.0]) * s, np.array([30.0, 16.0]) * s
    else:  # one side of the face
        centre, half = (lm[0] + lm[3]) / 2 - np.array([8.0, 0]) * s, np.array([22.0, 45.0]) * s
    angle = np.degrees(np.arctan2(*(lm[1] - lm[0])[::-1]))
    box = cv2.boxPoints(((float(centre[0]), float(centre[1])),
                         (float(2 * half[0]), float(2 * half[1])), float(angle)))
    cv2.fillConvexPoly(out, np.round(box).astype(np.int32), (p["grey"],) * 3)
    return out, lm


def _draw_misalign(sev: float, rng: np.random.Generator, scale: float) -> Params:
    sign = lambda: float(rng.choice([-1.0, 1.0]))  # noqa: E731
    return {"rotation": sign() * _lerp(6, 40, sev) * float(rng.uniform(0.5, 1.0)),
            "scale": float(np.exp(sign() * _lerp(0.08, 0.45, sev) * rng.uniform(0.3, 1.0))),
            "shift": [sign() * _lerp(3, 22, sev) * float(rng.uniform(0, 1)) * scale,
                      sign() * _lerp(3, 22, sev) * float(rng.uniform(0, 1)) * scale]}


def _apply_misalign(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    # Move the landmarks the aligner will use, as a poor landmark detector would.
    centre = lm.mean(0)
    t = np.radians(p["rotation"])
    rot = p["scale"] * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return img, (lm - centre) @ rot.T + centre + np.asarray(p["shift"])


# Held out: kinds no training recipe draws (`degrade` defaults to KINDS), so the test
# protocol can ask how a scorer copes with damage it never saw (`--degradations held-out`).

def _draw_pixelate(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"block": _lerp(2.5, 10.0, sev) * scale}


def _apply_pixelate(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    h, w = img.shape[:2]
    b = max(p["block"], 1.0)
    small = cv2.resize(img, (max(1, round(w / b)), max(1, round(h / b))),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST), lm


def _draw_haze(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"transmission": _lerp(0.7, 0.12, sev), "airlight": float(rng.uniform(170, 250)),
            "scatter": _lerp(0.5, 2.5, sev) * scale}


def _apply_haze(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    # Fog or a dirty window: light scattered in front of the face, plus a little blur.
    import cv2

    soft = cv2.GaussianBlur(img.astype(np.float64), (0, 0), max(p["scatter"], 0.3))
    t = p["transmission"]
    return _u8(soft * t + p["airlight"] * (1 - t)), lm


def _draw_shadow(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"floor": _lerp(0.55, 0.05, sev), "angle": float(rng.uniform(0, 360)),
            "width": _lerp(60.0, 20.0, sev) * scale}


def _apply_shadow(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    # Side light: one side of the face falls to `floor` of its brightness across `width`.
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    centre = lm.mean(0)
    t = np.radians(p["angle"])
    d = ((xx - centre[0]) * np.cos(t) + (yy - centre[1]) * np.sin(t)) / max(p["width"], 1.0)
    ramp = np.clip(d + 0.5, 0.0, 1.0)
    gain = p["floor"] + (1 - p["floor"]) * ramp * ramp * (3 - 2 * ramp)
    return _u8(img * gain[..., None]), lm


def _draw_colour_cast(sev: float, rng: np.random.Generator, scale: float) -> Params:
    hue, strength = float(rng.uniform(0, 2 * np.pi)), _lerp(0.25, 0.8, sev)
    phases = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    return {"gains": [float(g) for g in 1 + strength * np.cos(hue - phases)]}


def _apply_colour_cast(img: np.ndarray, lm: np.ndarray, p: Params
                       ) -> tuple[np.ndarray, np.ndarray]:
    return _u8(img.astype(np.float64) * np.asarray(p["gains"])), lm


def _draw_impulse(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"density": _lerp(0.02, 0.25, sev), "cell": max(scale, 1.0),
            "seed": int(rng.integers(2**31))}


def _apply_impulse(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    # Salt and pepper in aligned-crop-sized cells, so a big face is hit as hard as a small one.
    import cv2

    rng = np.random.default_rng(p["seed"])
    h, w = img.shape[:2]
    gh, gw = max(1, round(h / p["cell"])), max(1, round(w / p["cell"]))
    hit = (rng.random((gh, gw)) < p["density"]).astype(np.uint8)
    white = (rng.random((gh, gw)) < 0.5).astype(np.uint8)
    hit, white = (cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
                  for m in (hit, white))
    out = img.copy()
    out[hit & white] = 255
    out[hit & ~white] = 0
    return out, lm


def _draw_posterize(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"levels": round(_lerp(12, 3, sev))}


def _apply_posterize(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    n = max(int(p["levels"]), 2)
    return _u8(np.floor(img.astype(np.float64) * n / 256) * (255 / (n - 1))), lm


def _draw_glare(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"radius": _lerp(10.0, 35.0, sev) * scale, "strength": _lerp(0.6, 1.0, sev),
            "offset": [float(rng.uniform(-30, 30)) * scale, float(rng.uniform(-35, 25)) * scale]}


def _apply_glare(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    # A specular flare (a lamp on glasses, sun on skin) washing part of the face to white.
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    cx, cy = lm.mean(0) + np.asarray(p["offset"])
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * max(p["radius"], 1.0) ** 2)
    wash = p["strength"] * np.exp(-r2)[..., None]
    return _u8(img + (255.0 - img) * wash), lm


# Extra: kinds neither the default draws nor the held-out test use. A recipe may add them
# to its distillation set (`data.b_extra_kinds`) to widen the damage the student has seen
# while the held-out kinds stay unseen (as AugMix keeps its operations apart from the
# corruptions it is tested on).

def _draw_sharpen(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"sigma": _lerp(1.0, 3.0, sev) * scale, "amount": _lerp(1.0, 6.0, sev)}


def _apply_sharpen(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    # An over-eager unsharp mask: halos along every edge, noise amplified.
    import cv2

    x = img.astype(np.float64)
    soft = cv2.GaussianBlur(x, (0, 0), max(p["sigma"], 0.3))
    return _u8(x + p["amount"] * (x - soft)), lm


def _draw_solarize(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"threshold": round(_lerp(230, 110, sev))}


def _apply_solarize(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    return np.where(img >= p["threshold"], 255 - img, img).astype(np.uint8), lm


def _draw_interlace(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"shift": float(rng.choice([-1.0, 1.0])) * _lerp(1.5, 9.0, sev) * scale,
            "line": max(scale, 1.0)}


def _apply_interlace(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    # Combing: the second video field, captured later, lands shifted on every other line.
    import cv2

    h, w = img.shape[:2]
    moved = cv2.warpAffine(img, np.float64([[1, 0, p["shift"]], [0, 1, 0]]), (w, h),
                           borderMode=cv2.BORDER_REFLECT)
    odd = (np.arange(h) / p["line"]).astype(int) % 2 == 1
    out = img.copy()
    out[odd] = moved[odd]
    return out, lm


def _draw_warp(sev: float, rng: np.random.Generator, scale: float) -> Params:
    # amplitude x 2 pi / wavelength stays under about 0.6, so the image never folds over
    return {"amplitude": _lerp(1.0, 4.0, sev) * scale,
            "wavelength": float(rng.uniform(40, 80)) * scale,
            "phase": [float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))]}


def _apply_warp(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    # A wavy lens, a rolling shutter or a rippled print: a smooth non-rigid displacement.
    import cv2

    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    k = 2 * np.pi / max(p["wavelength"], 1.0)
    a, (px, py) = p["amplitude"], p["phase"]
    mx = (xx + a * np.sin(yy * k + px)).astype(np.float32)
    my = (yy + a * np.sin(xx * k + py)).astype(np.float32)
    return cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), lm


def _draw_chroma_shift(sev: float, rng: np.random.Generator, scale: float) -> Params:
    angle = float(rng.uniform(0, 2 * np.pi))
    d = _lerp(1.0, 6.0, sev) * scale
    return {"shift": [d * float(np.cos(angle)), d * float(np.sin(angle))]}


def _apply_chroma_shift(img: np.ndarray, lm: np.ndarray, p: Params
                        ) -> tuple[np.ndarray, np.ndarray]:
    # Lateral chromatic aberration: red and blue land apart, with colour fringes at edges.
    import cv2

    h, w = img.shape[:2]
    out = img.copy()
    for channel, sign in ((0, 1.0), (2, -1.0)):
        m = np.float64([[1, 0, sign * p["shift"][0]], [0, 1, sign * p["shift"][1]]])
        out[..., channel] = cv2.warpAffine(np.ascontiguousarray(img[..., channel]), m, (w, h),
                                           borderMode=cv2.BORDER_REFLECT)
    return out, lm


def _draw_chroma_noise(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"sigma": _lerp(6.0, 40.0, sev), "cell": _lerp(1.0, 4.0, sev) * scale,
            "seed": int(rng.integers(2**31))}


def _apply_chroma_noise(img: np.ndarray, lm: np.ndarray, p: Params
                        ) -> tuple[np.ndarray, np.ndarray]:
    # A phone sensor's colour blotches: noise in colour only, brightness left as it was.
    import cv2

    rng = np.random.default_rng(p["seed"])
    h, w = img.shape[:2]
    gh, gw = max(1, round(h / max(p["cell"], 1.0))), max(1, round(w / max(p["cell"], 1.0)))
    noise = cv2.resize(rng.normal(0, p["sigma"], (gh, gw, 3)), (w, h),
                       interpolation=cv2.INTER_LINEAR)
    noise -= noise.mean(-1, keepdims=True)
    return _u8(img + noise), lm


def _draw_median(sev: float, rng: np.random.Generator, scale: float) -> Params:
    return {"radius": _lerp(1.0, 3.0, sev) * scale}


def _apply_median(img: np.ndarray, lm: np.ndarray, p: Params) -> tuple[np.ndarray, np.ndarray]:
    # Heavy noise reduction or a "beauty" filter: flat, painted skin with edges kept.
    import cv2

    return cv2.medianBlur(np.ascontiguousarray(img), 2 * max(round(p["radius"]), 1) + 1), lm


Kind = tuple[Callable[..., Params], Callable[..., tuple[np.ndarray, np.ndarray]]]
_TRAINING: dict[str, Kind] = {
    "defocus": (_draw_defocus, _apply_defocus),
    "motion": (_draw_motion, _apply_motion),
    "downscale": (_draw_downscale, _apply_downscale),
    "lowlight": (_draw_lowlight, _apply_lowlight),
    "jpeg": (_draw_jpeg, _apply_jpeg),
    "exposure": (_draw_exposure, _apply_exposure),
    "contrast": (_draw_contrast, _apply_contrast),
    "occlusion": (_draw_occlusion, _apply_occlusion),
    "misalign": (_draw_misalign, _apply_misalign),
}
_HELD_OUT: dict[str, Kind] = {
    "pixelate": (_draw_pixelate, _apply_pixelate),
    "haze": (_draw_haze, _apply_haze),
    "shadow": (_draw_shadow, _apply_shadow),
    "colour_cast": (_draw_colour_cast, _apply_colour_cast),
    "impulse": (_draw_impulse, _apply_impulse),
    "posterize": (_draw_posterize, _apply_posterize),
    "glare": (_draw_glare, _apply_glare),
}
_EXTRA: dict[str, Kind] = {
    "sharpen": (_draw_sharpen, _apply_sharpen),
    "solarize": (_draw_solarize, _apply_solarize),
    "interlace": (_draw_interlace, _apply_interlace),
    "warp": (_draw_warp, _apply_warp),
    "chroma_shift": (_draw_chroma_shift, _apply_chroma_shift),
    "chroma_noise": (_draw_chroma_noise, _apply_chroma_noise),
    "median": (_draw_median, _apply_median),
}
_KINDS = {**_TRAINING, **_HELD_OUT, **_EXTRA}
KINDS = tuple(_TRAINING)  # what the recipes label and train on, and the default test protocol
HELD_OUT_KINDS = tuple(_HELD_OUT)
EXTRA_KINDS = tuple(_EXTRA)
ALL_KINDS = tuple(_KINDS)
# Capture order for combinations: geometry, light and optics first, sensor and codec last.
_ORDER = ("misalign", "warp", "occlusion", "shadow", "glare", "haze", "motion", "interlace",
          "defocus", "chroma_shift", "downscale", "exposure", "contrast", "colour_cast",
          "lowlight", "chroma_noise", "impulse", "median", "sharpen", "solarize", "pixelate",
          "posterize", "jpeg")


def apply(image: np.ndarray, landmarks: np.ndarray, record: list[Params]) -> Degraded:
    """Replay recorded degradations (from `degrade` or hand-written)."""
    img = np.ascontiguousarray(image)
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    for step in record:
        params = {k: v for k, v in step.items() if k not in ("kind", "severity")}
        img, lm = _KINDS[step["kind"]][1](img, lm, params)
    return Degraded(img, lm, list(record))


def draw(kind: str, severity: float, rng: np.random.Generator,
         landmarks: np.ndarray) -> Params:
    """Parameters of one degradation at `severity` in [0, 1] for this face."""
    if kind not in _KINDS:
        raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(_KINDS)}")
    scale = _crop_scale(np.asarray(landmarks, dtype=np.float64).reshape(5, 2))
    return {"kind": kind, "severity": round(float(severity), 4),
            **_KINDS[kind][0](float(severity), rng, scale)}


def degrade(image: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator,
            kinds: tuple[str, ...] = KINDS, combo_probability: float = 0.3) -> Degraded:
    """One random degradation (or a combination of two or three), severity ~ U(0, 1)."""
    n = 1
    if len(kinds) > 1 and rng.random() < combo_probability:
        n = int(rng.integers(2, min(3, len(kinds)) + 1))
    chosen = [str(k) for k in rng.choice(kinds, size=n, replace=False)]
    chosen.sort(key=_ORDER.index)
    # Combined degradations are each milder, so a combination is not always the worst.
    record = [draw(k, rng.uniform(0, 1) ** (1.0 if n == 1 else 1.5), rng, landmarks)
              for k in chosen]
    return apply(image, landmarks, record)
