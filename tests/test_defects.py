"""Named defects in reject reasons: each kind of damage, done to a real ORL face with its
recorded parameters, is named for what it is; a clean face gets no name."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fiqa_gate import degradations, registry
from fiqa_gate.datasets import detect_sources, orl_items
from fiqa_gate.defects import defects, measure
from fiqa_gate.faces import Detection, Face, align_face
from fiqa_gate.gate import Gate

DAMAGE = {  # (kind, parameters) -> the name a user reads
    "too dark": {"kind": "exposure", "gain": 0.08},
    "too bright": {"kind": "exposure", "gain": 4.0},
    "low contrast": {"kind": "contrast", "alpha": 0.05},
    "noisy": {"kind": "lowlight", "gain": 0.06, "read_noise": 8.0, "seed": 1},
    "blurred": {"kind": "defocus", "radius": 6.0},
    "misaligned or partly hidden": {"kind": "misalign", "rotation": 25.0, "scale": 1.0,
                                    "shift": [12.0, 8.0]},
}


@pytest.fixture(scope="module")
def source():
    detector = registry.get_detector()
    return detect_sources(orl_items(["s33"]), detector)[0], detector


def _face(source, step: dict | None) -> Face:
    src, _ = source
    lm = np.asarray(src.detection.landmarks, np.float64).reshape(5, 2)
    d = degradations.apply(src.image, lm, [step] if step else [])
    return Face(align_face(d.image, d.landmarks), src.source, 0, src.detection)


def _names(face: Face, detector=None) -> set[str]:
    return {text.split(" (")[0] for text in defects(measure(face, detector))}


def test_a_clean_face_has_no_named_defect(source):
    assert _names(_face(source, None), source[1]) == set()


@pytest.mark.parametrize("name", DAMAGE)
def test_each_damage_is_named_for_what_it_is(source, name):
    step = DAMAGE[name]
    face = _face(source, step)
    # the recorded parameters of the kind must exist, so the test damages what it says
    assert set(step) - {"kind"} <= set(degradations.draw(
        step["kind"], 1.0, np.random.default_rng(0),
        np.asarray(source[0].detection.landmarks).reshape(5, 2)))
    assert name in _names(face, source[1])


def test_size_and_pose_come_from_the_detection(source):
    crop = _face(source, None).crop
    lm = np.array([[40, 50], [60, 50], [50, 60], [42, 70], [58, 70]], np.float64)
    small = Face(crop, "x", 0, Detection((30, 40, 40, 45), lm, 0.9))
    assert "small face" in _names(small)
    turned = lm.copy()
    turned[2, 0] += 8  # the nose 0.4 eye distances off the eyes' midpoint
    assert "head turned" in _names(Face(crop, "x", 0, Detection((30, 40, 40, 45),
                                                                turned * 2, 0.9)))
    assert _names(Face(crop, "x", 0, Detection((0, 0, 90, 90), lm * 2, 0.9))) == set()


def test_only_a_rejection_for_its_score_carries_the_defects(source):
    blurred = _face(source, DAMAGE["blurred"])
    scorer = registry.get_scorer("student")
    low, high = Gate(scorer, threshold=0.0).decide_one(blurred), \
        Gate(scorer, threshold=1.0).decide_one(blurred)
    assert low.accepted and "likely" not in low.reason
    assert not high.accepted and high.defects and high.defects[0].startswith("blurred")
    assert high.reason.endswith(f"; likely: {', '.join(high.defects)}")
    assert low.defects == ()


def test_a_failing_detector_costs_the_explanation_not_the_decision(source):
    class Broken:
        def detect(self, image: np.ndarray) -> list:
            raise RuntimeError("broken detector")

    face = _face(source, DAMAGE["blurred"])
    decision = Gate(registry.get_scorer("student"), threshold=1.0,
                    detector=Broken()).decide_one(face)
    assert not decision.accepted and not decision.failed
    assert decision.reason.startswith("low quality")
    # the crop's own measurements are still named, as without a detector
    assert decision.defects == Gate(registry.get_scorer("student"),
                                    threshold=1.0).decide_one(face).defects
    assert decision.defects[0].startswith("blurred")


def test_filter_names_the_defects_of_aligned_crops(source, tmp_path):
    crops = tmp_path / "crops"
    crops.mkdir()
    for name in ("misaligned or partly hidden", "noisy", "low contrast"):
        Image.fromarray(_face(source, DAMAGE[name]).crop).save(crops / f"{name}.png")
    out = tmp_path / "f.csv"
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "filter", "--aligned",
                           str(crops), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert "3 rejected (likely: " in done.stderr
    for name in ("misaligned or partly hidden 1", "noisy 1", "low contrast 1"):
        assert name in done.stderr
    for row in rows:
        assert row["decision"] == "reject"
        # the alignment check needs the detector the CLI brings, though inputs are aligned
        assert f"likely: {row['path'].rsplit('/', 1)[1][:-4]}" in row["reason"]
