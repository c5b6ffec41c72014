"""How often each named defect of `fiqa_gate.defects` fires, on the faces its limits were
set on: ORL identities s1-s30 (never the s31-s40 test split), clean and damaged by one
recipe kind at a time at two severities, each with its recorded parameters.

    python -m fiqa_gate_training.defect_limits        # about a minute on 2 cores

A limit is right when clean faces are rarely named (the first row) and the damage it is
meant for mostly is (its kind's rows); the last lines say how often the student's
rejections at 0.5 come with a named defect, on the recipe's validation faces; the first,
what naming one face's defects costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fiqa_gate.components import Detector
    from fiqa_gate.datasets import SourceFace
    from fiqa_gate.degradations import Degraded

SEVERITIES = (0.5, 0.9)
# the kinds a defect is meant to name; exposure split by its direction
GROUPS = {"under-exposed": ("exposure", 0.4), "over-exposed": ("exposure", 2.0),
          "contrast": ("contrast", None), "lowlight": ("lowlight", None),
          "defocus": ("defocus", None), "motion": ("motion", None),
          "downscale": ("downscale", None), "jpeg": ("jpeg", None),
          "occlusion": ("occlusion", None), "misalign": ("misalign", None)}


def _damaged(face: SourceFace, kind: str, gain: float | None, severity: float,
             seed: int) -> Degraded:
    from fiqa_gate import degradations

    lm = np.asarray(face.detection.landmarks, np.float64).reshape(5, 2)
    rng = np.random.default_rng(seed)
    while True:  # exposure draws its direction at random: draw until it is the group's
        step = degradations.draw(kind, severity, rng, lm)
        if gain is None or (step["gain"] > 1) == (gain > 1):
            return degradations.apply(face.image, lm, [step])


def main() -> None:
    from fiqa_gate import registry
    from fiqa_gate.datasets import ORL_TEST, ORL_TRAIN, ORL_VAL, detect_sources, orl_items
    from fiqa_gate.defects import LIMITS, defects, measure, tally
    from fiqa_gate.faces import Face, align_face

    detector = registry.get_detector()
    sources = detect_sources(orl_items(ORL_TRAIN + ORL_VAL), detector)
    named: dict[str, list[set[str]]] = {}

    def record(group: str, face: Face) -> None:
        found = {text.split(" (")[0] for text in defects(measure(face, detector))}
        named.setdefault(group, []).append(found)

    for i, src in enumerate(sources):
        record("clean", Face(align_face(src.image, src.detection.landmarks), src.source, 0,
                             src.detection, frame=src.image))
        for g, (group, (kind, gain)) in enumerate(GROUPS.items()):
            for s, severity in enumerate(SEVERITIES):
                d = _damaged(src, kind, gain, severity, seed=1000 * i + 10 * g + s)
                record(f"{group} {severity}", Face(align_face(d.image, d.landmarks),
                                                   src.source, 0, src.detection,
                                                   frame=d.image))
    _timing(sources, detector)
    clean = [measure(Face(align_face(s.image, s.detection.landmarks), s.source, 0,
                          s.detection, frame=s.image), detector) for s in sources]
    for field, q in (("brightness", (1, 99)), ("contrast", (1,)), ("sharpness", (1,)),
                     ("noise", (99,)), ("misplaced", (95, 99))):
        values = np.array([getattr(m, field) for m in clean], np.float64)
        values = values[np.isfinite(values)]
        shown = ", ".join(f"{p}th {np.percentile(values, p):.3g}" for p in q)
        print(f"clean faces' {field}: {shown}")
    any_named = np.mean([bool(found) for found in named["clean"]])
    print(f"clean faces named: {any_named:.1%} ({tally([defects(m) for m in clean])})")
    eyes = [m.face_size for m in clean]
    print(f"clean faces: {min(eyes):.1f}-{max(eyes):.1f} px between the eyes, turned at "
          f"most {max(abs(m.yaw) for m in clean):.2f} (the size and pose limits: "
          f"{LIMITS['small']:g} px, {LIMITS['turned']:g})")
    names = sorted({n for rows in named.values() for found in rows for n in found})
    print(f"{'group':<20}{'faces':>6}" + "".join(f"{n[:12]:>14}" for n in names))
    for group, rows in named.items():
        rates = [np.mean([n in found for found in rows]) for n in names]
        print(f"{group:<20}{len(rows):>6}" + "".join(f"{r:>14.0%}" for r in rates))
    # faces no limit was set on (the test identities, clean): how often one is named
    unseen = detect_sources(orl_items(ORL_TEST), detector)
    found = [defects(measure(Face(align_face(s.image, s.detection.landmarks), s.source, 0,
                                  s.detection, frame=s.image), detector)) for s in unseen]
    print(f"clean faces of s31-s40, which set no limit: {sum(map(bool, found))} of "
          f"{len(found)} named ({tally(found) or 'none'})")
    _rejections(detector)


def _timing(sources: list[SourceFace], detector: Detector) -> None:
    """What naming a rejected face's defects costs: median of 5 passes over 20 faces."""
    import time

    from fiqa_gate.defects import measure
    from fiqa_gate.faces import Face, align_face

    faces = [Face(align_face(s.image, s.detection.landmarks), s.source, 0, s.detection,
                  frame=s.image) for s in sources[:20]]
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
    """On the recipe's validation faces: the student's rejections at 0.5 and the defects."""
    from fiqa_gate import degradations
    from fiqa_gate.datasets import ORL_VAL, build_samples, detect_sources, orl_items
    from fiqa_gate.defects import defects, measure
    from fiqa_gate.faces import Face
    from fiqa_gate.registry import get_scorer

    sources = detect_sources(orl_items(ORL_VAL), detector)
    samples = build_samples(sources, detector, variants=40, seed=8, redetect=False)
    by_source = {s.source: s for s in sources}

    def face(i: int) -> Face:  # its damaged picture again, for the noise measurement
        src = by_source[samples.source[i]]
        frame = degradations.apply(src.image, src.detection.landmarks, samples.records[i])
        return Face(samples.crops[i], src.source, 0, src.detection, frame=frame.image)

    faces = [face(i) for i in range(len(samples))]
    score = get_scorer("student").score(faces).calibrated
    rejected = score < 0.5
    explained = np.array([bool(defects(measure(f, detector))) for f in faces])
    print(f"validation faces {len(faces)}: the student rejects {rejected.sum()} at 0.5; "
          f"a defect is named for {explained[rejected].mean():.0%} of them and for "
          f"{explained[~rejected].mean():.0%} of the accepted")


if __name__ == "__main__":
    main()
