"""Named defects in reject reasons: each kind of damage, done to a real ORL face with its
recorded parameters, is named for what it is; a clean face gets no name."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiqa_gate import degradations, registry
from fiqa_gate.datasets import detect_sources, orl_items
from fiqa_gate.defects import defects, measure
from fiqa_gate.faces import Detection, Face, align_face, inner_face_patch
from fiqa_gate.gate import Gate
from fiqa_gate.hookspecs import hookimpl

DAMAGE = {  # (kind, parameters) -> the name a user reads
    "too dark": {"kind": "exposure", "gain": 0.08},
    "too bright": {"kind": "exposure", "gain": 4.0},
    "low contrast": {"kind": "contrast", "alpha": 0.05},
    "noisy": {"kind": "lowlight", "gain": 0.06, "read_noise": 8.0, "seed": 1},
    "blurred": {"kind": "defocus", "radius": 6.0},
    "face off the template": {"kind": "misalign", "rotation": 25.0, "scale": 1.0,
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
    return Face(align_face(d.image, d.landmarks), src.source, 0, src.detection,
                patch=inner_face_patch(d.image, d.landmarks))


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
    for name in ("face off the template", "noisy", "low contrast"):
        Image.fromarray(_face(source, DAMAGE[name]).crop).save(crops / f"{name}.png")
    out = tmp_path / "f.csv"
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "filter", "--aligned",
                           str(crops), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert "3 rejected (likely: " in done.stderr
    # a crop damaged this much hides its face from the detector too: both are said
    for name in ("face off the template 1", "noisy 1", "low contrast 1",
                 "no face found in the aligned crop 2"):
        assert name in done.stderr
    for row in rows:
        assert row["decision"] == "reject"
        # the alignment check needs the detector the CLI brings, though inputs are aligned
        name = row["path"].rsplit("/", 1)[1][:-4]
        assert f"likely: {name}" in row["reason"]


def test_a_turned_head_is_turned_not_small_nor_off_the_template(source):
    crop = _face(source, None).crop
    # frontal: eyes 40 px apart, mouth 46 px below them; turned: the eyes 18 px apart
    frontal = np.array([[40, 50], [80, 50], [60, 72], [45, 96], [75, 96]], np.float64)
    turned = frontal.copy()
    turned[[0, 3], 0] += 22
    turned[2, 0] = 80  # the nose half an eye distance off their midpoint
    m = measure(Face(crop, "x", 0, Detection((30, 30, 60, 80), turned, 0.9)))
    assert m.face_size == pytest.approx(46 / 40.68 * 35.24, abs=0.2)
    names = _names(Face(crop, "x", 0, Detection((30, 30, 60, 80), turned, 0.9)))
    assert names == {"head turned"}
    off = defects(dataclasses.replace(m, misplaced=20.0))
    assert [d.split(" (")[0] for d in off] == ["head turned"]
    assert "face off the template" in {d.split(" (")[0] for d in defects(
        dataclasses.replace(m, misplaced=20.0, yaw=0.0))}


def test_a_crop_without_a_face_is_said_to_be_one(source):
    detector = source[1]
    rng = np.random.default_rng(0)
    for crop in (rng.integers(0, 256, (112, 112, 3), dtype=np.uint8),  # grass-like
                 np.full((112, 112, 3), 128, np.uint8)):
        assert defects(measure(Face(crop), detector))[-1] == "no face found in the aligned crop"
        # a detected face too (cut off by the picture's edge, hidden), said last
        assert defects(measure(Face(crop, "x", 0, source[0].detection), detector))[-1] == \
            "no face found in the aligned crop"
    # a flat crop is flat, not also blurred
    flat = Face(np.full((112, 112, 3), 128, np.uint8), "x", 0, source[0].detection)
    assert _names(flat) == {"low contrast"}


def test_the_alignment_fill_is_no_part_of_the_face(source):
    face = _face(source, DAMAGE["low contrast"])
    crop = face.crop.copy()
    crop[:, :40] = 0  # where the source picture ended, as warpAffine leaves it
    assert "low contrast" in _names(Face(crop, face.source, 0, face.detection))
    # with hardly any picture left its light is not measured: not "too dark"
    clean = _face(source, None).crop.copy()
    clean[:, :72] = 0
    m = measure(Face(clean, "x", 0, source[0].detection))
    assert np.isnan(m.brightness) and _names(Face(clean, "x", 0, source[0].detection)) == set()


def test_landmarks_that_are_not_five_points_cost_only_their_measurement(source):
    class Marks:
        def __init__(self, marks: np.ndarray) -> None:
            self.marks = marks

        def detect(self, image: np.ndarray) -> list:
            return [Detection((0, 0, 10, 10), self.marks, 0.9)]

    face = _face(source, DAMAGE["blurred"])
    for marks in (np.zeros((68, 2)), np.array([[40, 80, 60, 45, 75], [50, 50, 70, 90, 90]])):
        m = measure(face, Marks(marks))
        assert m.misplaced is None and defects(m) == defects(measure(face))
        odd = Face(face.crop, "x", 0, Detection((0, 0, 10, 10), marks, 0.9))
        assert measure(odd).face_size is None and "blurred" in _names(odd)
    same = Face(face.crop, "x", 0, Detection((0, 0, 10, 10), np.full((5, 2), 7.0), 0.9))
    assert measure(same).face_size is None  # all in one place: no size, no pose


def test_a_policy_that_decides_costs_no_measurement(source):
    calls = []

    class Counting:
        def detect(self, image: np.ndarray) -> list:
            calls.append(1)
            return source[1].detect(image)

    class AcceptAll:
        @hookimpl
        def gate_decision(self, face, score, threshold, stage):
            return True, "kiosk"

    face = _face(source, DAMAGE["blurred"])
    gate = Gate(registry.get_scorer("student"), threshold=1.0, detector=Counting())
    pm = registry.plugin_manager()
    pm.register(AcceptAll(), name="test-accept-all")
    try:
        decision = gate.decide_one(face)
    finally:
        pm.unregister(name="test-accept-all")
    assert decision.accepted and decision.defects == () and calls == []
    assert gate.decide_one(face).defects and calls  # without it: measured


def test_aligned_inputs_need_no_detector_that_loads(source, tmp_path):
    crops = tmp_path / "crops"
    crops.mkdir()
    Image.fromarray(_face(source, DAMAGE["noisy"]).crop).save(crops / "a.png")
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "filter", "--aligned",
                           "--detector", "nosuch", str(crops), "-o", "-"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "no alignment check of rejected faces" in done.stderr
    assert "likely: noisy" in done.stdout


def test_noise_is_measured_where_the_camera_left_it(source):
    """On the source picture, not the crop: alignment smooths noise away when it enlarges
    a face and turns texture into noise when it shrinks one (a sharp 107 px portrait was
    called noisy)."""
    clean, noisy = _face(source, None), _face(source, DAMAGE["noisy"])
    assert "noisy" in _names(noisy)
    swapped = Face(noisy.crop, "x", 0, noisy.detection, patch=clean.patch)
    assert "noisy" not in _names(swapped)
    assert "noisy" in _names(Face(clean.crop, "x", 0, clean.detection, patch=noisy.patch))


def test_a_face_keeps_a_small_copy_of_its_source_not_the_picture(sample_photo):
    from fiqa_gate.images import load_image
    from fiqa_gate.pipeline import faces_in_image

    image = load_image(str(sample_photo)).copy()  # a buffer the caller will reuse
    faces = faces_in_image(image, registry.get_detector())
    assert faces
    for face in faces:
        assert face.patch is not None and face.patch.ndim == 2
        assert max(face.patch.shape) <= 256 and not np.shares_memory(face.patch, image)
    before = [defects(measure(f)) for f in faces]
    image[:] = np.random.default_rng(0).integers(0, 256, image.shape, dtype=np.uint8)
    assert [defects(measure(f)) for f in faces] == before  # a reused buffer changes nothing


def test_a_turned_head_has_no_light_names_from_the_background(source):
    m = measure(_face(source, None))
    glare = dataclasses.replace(m, clipped=0.4, brightness=0.9, yaw=0.6)
    assert [d.split(" (")[0] for d in defects(glare)] == ["head turned"]
    assert {"too bright", "blown-out highlights"} <= {
        d.split(" (")[0] for d in defects(dataclasses.replace(glare, yaw=0.0))}


def test_a_dark_face_is_dark_not_also_flat(source):
    assert _names(_face(source, DAMAGE["too dark"])) == {"too dark"}


def test_small_faces_and_blur_are_named_for_what_they_are(source):
    m = measure(_face(source, None))
    # a small face is small: its blur and noise come from its enlargement
    tiny = dataclasses.replace(m, face_size=12.0, sharpness=0.01, noise=20.0)
    assert [d.split(" (")[0] for d in defects(tiny)] == ["small face"]
    # heavy blur flattens a face: both are said; a turned head keeps its blur
    assert {"low contrast", "blurred"} <= {d.split(" (")[0] for d in defects(
        dataclasses.replace(m, contrast=0.08, sharpness=0.01))}
    assert [d.split(" (")[0] for d in defects(dataclasses.replace(
        m, yaw=0.5, sharpness=0.01))] == ["blurred", "head turned"]


def test_no_face_in_a_very_dark_picture_says_so(tmp_path):
    from fiqa_gate.errors import NoFaceError
    from fiqa_gate.pipeline import faces_from_file

    path = tmp_path / "night.png"
    Image.fromarray(np.full((200, 200, 3), 6, np.uint8)).save(path)
    with pytest.raises(NoFaceError, match=r"no face found \(the picture is very dark"):
        faces_from_file(str(path), registry.get_detector())
    # and in the command's row, where the README shows it (the row had said only "no face
    # found": README audit of 2026-12-08)
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "score", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    (row,) = csv.DictReader(done.stdout.splitlines())
    assert row["error"] == "no face found (the picture is very dark: brightness 0.02)"


def test_no_face_in_a_picture_stored_turned_says_so(tmp_path, orl_root):
    # a phone picture without its EXIF orientation, or a scan fed in sideways, was only
    # "no face found" (stop 45's list of defects not named)
    face = Image.open(orl_root / "s31" / "1.pgm").convert("RGB").resize((184, 224))
    face.rotate(90, expand=True).save(tmp_path / "left.png")  # turned anticlockwise
    face.rotate(-90, expand=True).save(tmp_path / "right.png")
    face.rotate(180).save(tmp_path / "down.png")
    Image.fromarray(np.full((224, 184, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "score", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    errors = {Path(r["path"]).name: r["error"] for r in csv.DictReader(done.stdout.splitlines())}
    hint = "no face found (a face is found once the picture is turned {}: it may be stored " \
        "turned)"
    assert errors == {"left.png": hint.format("90° clockwise"),
                      "right.png": hint.format("90° anticlockwise"),
                      "down.png": hint.format("upside down"), "grey.png": "no face found"}
