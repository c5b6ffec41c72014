"""How often each named defect of `fiqa_gate.defects` fires, on the faces its limits were
set on: ORL identities s1-s30 (never the s31-s40 test split), clean and damaged by one
recipe kind at a time at two severities, each with its recorded parameters.

    python -m fiqa_gate_training.defect_limits        # about a minute on 2 cores

Every face is made as `fiqa-gate filter` makes it (`faces_in_image`: the picture
enlarged for detection, aligned, and its inner-face patch cut from the picture itself),
the damage done to the picture first. A limit is right when clean faces are rarely named
(the first row) and the damage it is meant for mostly is (its kind's rows). Also printed:
what naming costs, the clean faces' spread, how often clean faces of s31-s40 (which set
no limit) are named, and how often the student's rejections at 0.5 come with a name, on
the recipe's validation faces.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fiqa_gate.components import Detector
    from fiqa_gate.faces import Face

SEVERITIES = (0.5, 0.9)
# the kinds a defect is meant to name; exposure split by its direction
GROUPS = {"under-exposed": ("exposure", 0.4), "over-exposed": ("exposure", 2.0),
          "contrast": ("contrast", None), "lowlight": ("lowlight", None),
          "defocus": ("defocus", None), "motion": ("motion", None),
          "downscale": ("downscale", None), "jpeg": ("jpeg", None),
          "occlusion": ("occlusion", None), "misalign": ("misalign", None)}


def runtime_face(image: np.ndarray, landmarks: np.ndarray, like: Face) -> Face:
    """The face `faces_in_image` would make of `image` with these landmarks (those of
    the clean picture, moved by the damage), without detecting it again."""
    from fiqa_gate.faces import Detection, Face, align_face, inner_face_patch
    from fiqa_gate.pipeline import enlarge_for_detection

    work, f = enlarge_for_detection(image)
    marks = np.asarray(landmarks, np.float64).reshape(5, 2)
    assert like.detection is not None
    return Face(align_face(work, marks * f), like.source, 0,
                Detection(like.detection.box, marks, like.detection.score),
                patch=inner_face_patch(image, marks))


def clean_faces(identities: tuple[str, ...], detector: Detector
                ) -> list[tuple[np.ndarray, Face]]:
    """(picture, its face) for every ORL picture of these identities, as the CLI sees it."""
    from fiqa_gate.datasets import orl_items
    from fiqa_gate.images import load_image
    from fiqa_gate.pipeline import faces_in_image, primary_face

    out = []
    for _, path in orl_items(identities):
        image = load_image(str(path))
        faces = faces_in_image(image, detector, source=str(path))
        if faces:
            out.append((image, primary_face(faces)))
    return out


def _damaged(image: np.ndarray, face: Face, kind: str, gain: float | None, severity: float,
             seed: int) -> Face:
    from fiqa_gate import degradations

    assert face.detection is not None
    lm = np.asarray(face.detection.landmarks, np.float64).reshape(5, 2)
    rng = np.random.default_rng(seed)
    while True:  # exposure draws its direction at random: draw until it is the group's
        step = degradations.draw(kind, severity, rng, lm)
        if gain is None or (step["gain"] > 1) == (gain > 1):
            d = degradations.apply(image, lm, [step])
            return runtime_face(d.image, d.landmarks, face)


def main() -> None:
    from fiqa_gate import registry
    from fiqa_gate.datasets import ORL_TEST, ORL_TRAIN, ORL_VAL
    from fiqa_gate.defects import LIMITS, defects, measure, tally

    detector = registry.get_detector()
    sources = clean_faces(ORL_TRAIN + ORL_VAL, detector)
    named: dict[str, list[set[str]]] = {}

    def record(group: str, face: Face) -> None:
        found = {text.split(" (")[0] for text in defects(measure(face, detector))}
        named.setdefault(group, []).append(found)

    for i, (image, face) in enumerate(sources):
        record("clean", face)
        for g, (group, (kind, gain)) in enumerate(GROUPS.items()):
            for s, severity in enumerate(SEVERITIES):
                record(f"{group} {severity}",
                       _damaged(image, face, kind, gain, severity, 1000 * i + 10 * g + s))
    clean = [face for _, face in sources]
    _timing(clean[:20], detector)
    measured = [measure(face, detector) for face in clean]
    for field, q in (("brightness", (1, 99)), ("contrast", (1,)), ("sharpness", (1,)),
                     ("noise", (99,)), ("misplaced", (95, 99))):
        values = np.array([getattr(m, field) for m in measured], np.float64)
        values = values[np.isfinite(values)]
        shown = ", ".join(f"{p}th {np.percentile(values, p):.3g}" for p in q)
        print(f"clean faces' {field}: {shown}")
    any_named = np.mean([bool(found) for found in named["clean"]])
    print(f"clean faces named: {any_named:.1%} ({tally([defects(m) for m in measured])})")
    sizes = [m.face_size for m in measured if m.face_size is not None]
    turns = [abs(m.yaw) for m in measured if m.yaw is not None]
    print(f"clean faces: {min(sizes):.1f}-{max(sizes):.1f} px between the eyes, turned at "
          f"most {max(turns):.2f} (the size and pose limits: {LIMITS['small']:g} px, "
          f"{LIMITS['turned']:g})")
    names = sorted({n for rows in named.values() for found in rows for n in found})
    print(f"{'group':<20}{'faces':>6}" + "".join(f"{n[:12]:>14}" for n in names))
    for group, rows in named.items():
        rates = [np.mean([n in found for found in rows]) for n in names]
        print(f"{group:<20}{len(rows):>6}" + "".join(f"{r:>14.0%}" for r in rates))
    unseen = [defects(measure(face, detector)) for _, face in clean_faces(ORL_TEST, detector)]
    print(f"clean faces of s31-s40, which set no limit: {sum(map(bool, unseen))} of "
          f"{len(unseen)} named ({tally(unseen) or 'none'})")
    _rejections(detector)


def _timing(faces: list[Face], detector: Detector) -> None:
    """What naming a rejected face's defects costs: median of 5 passes over 20 faces."""
    from fiqa_gate.defects import measure

    for label, with_detector in (("the crop's measurements", None),
                                 ("with the alignment check", detector)):
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for face in faces:
                measure(face, with_detector)
            runs.append((time.perf_counter() - start) / len(faces) * 1e3)
        print(f"{label}: {np.median(runs):.2f} ms a face (median of 5 passes, 20 faces)")


def _rejections(detector: Detector) -> None:
    """The recipe's validation protocol (ORL s25-s30, 40 seeded degradations a picture,
    seed 8), each damaged picture made into a face as the CLI would: the student's
    rejections at 0.5, and how many come with a name."""
    from fiqa_gate import degradations
    from fiqa_gate.datasets import ORL_VAL, sample_seed
    from fiqa_gate.defects import defects, measure
    from fiqa_gate.registry import get_scorer

    faces = []
    for image, face in clean_faces(ORL_VAL, detector):
        assert face.detection is not None
        faces.append(face)
        for v in range(40):
            rng = np.random.default_rng(sample_seed(8, face.source, v))
            d = degradations.degrade(image, face.detection.landmarks, rng)
            faces.append(runtime_face(d.image, d.landmarks, face))
    score = get_scorer("student").score(faces).calibrated
    rejected = score < 0.5
    explained = np.array([bool(defects(measure(f, detector))) for f in faces])
    print(f"validation faces {len(faces)}: the student rejects {rejected.sum()} at 0.5; "
          f"a defect is named for {explained[rejected].mean():.0%} of them and for "
          f"{explained[~rejected].mean():.0%} of the accepted")


if __name__ == "__main__":
    main()
