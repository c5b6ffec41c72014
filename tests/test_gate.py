"""The gate API on real faces: decisions, wrapping a recognizer, policy hooks, the
insightface FaceAnalysis adapter."""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import pytest
from fiqa_gate_plugins.baselines import DetectorConfidenceScorer
from PIL import Image

from fiqa_gate import registry
from fiqa_gate.gate import Gate
from fiqa_gate.hookspecs import hookimpl
from fiqa_gate.images import load_image
from fiqa_gate.pipeline import faces_from_file, faces_in_image

# Uncalibrated on purpose: the score is then the detector's own confidence, so the
# expected decisions can be read off the detections.


@pytest.fixture(scope="module")
def group_faces(sample_photo):
    return faces_from_file(str(sample_photo), registry.get_detector("yunet"))


def test_decisions_follow_threshold(group_faces):
    scorer = DetectorConfidenceScorer()
    scores = [f.det_score for f in group_faces]
    cut = float(np.median(scores))
    decisions = Gate(scorer, threshold=cut).decide(group_faces)
    assert [d.accepted for d in decisions] == [s >= cut for s in scores]
    assert all(d.threshold == cut and d.reason for d in decisions)
    assert any(not d.accepted and "low quality" in d.reason for d in decisions)


def test_wrap_never_embeds_rejected_faces(group_faces):
    rec = registry.get_recognizer("sface")
    seen: list[int] = []

    def embed(crops: np.ndarray) -> np.ndarray:
        seen.append(len(crops))
        return rec.embed(crops)

    scores = sorted(f.det_score for f in group_faces)
    gate = Gate(DetectorConfidenceScorer(), threshold=scores[3])
    gated = gate.wrap(embed)
    out = gated(group_faces)
    accepted = [d.accepted for d in gated.last_decisions]
    assert sum(accepted) == 3 and seen == [3]
    assert [e is not None for e in out] == accepted
    i = accepted.index(True)
    np.testing.assert_allclose(out[i], rec.embed(group_faces[i].crop[None])[0], atol=1e-6)
    # one wrapped function serving several threads: each reads its own call's decisions
    from concurrent.futures import ThreadPoolExecutor

    def call(n: int) -> int:
        got = []
        for _ in range(20):
            gated(group_faces[:n])
            got.append(len(gated.last_decisions))
        return max(got) if set(got) == {n} else -1

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(call, [1, 3, 5, 6])) == [1, 3, 5, 6]


class _Policy:
    def __init__(self, result=None, error=False):
        self.result, self.error = result, error

    @hookimpl
    def gate_decision(self, face, score, threshold, stage):
        if self.error:
            raise RuntimeError("policy bug")
        return self.result if stage == "probe" else None


@pytest.fixture
def policy():
    pm = registry.plugin_manager()
    plugins = []

    def add(p):
        pm.register(p, name=f"test-policy-{len(plugins)}")
        plugins.append(p)
        return p

    yield add
    for p in plugins:
        pm.unregister(p)


def test_policy_overrides_and_failures(group_faces, policy):
    scorer = registry.get_scorer("detector-confidence")
    face = group_faces[0]
    assert Gate(scorer, 0.0, stage="probe").decide_one(face).accepted
    policy(_Policy(result=(False, "camera 7 needs more")))
    d = Gate(scorer, 0.0, stage="probe").decide_one(face)
    assert not d.accepted and d.reason.endswith("camera 7 needs more") and not d.failed
    assert Gate(scorer, 0.0, stage="enroll").decide_one(face).accepted  # other stage
    # a result that is neither None, a bool nor (accepted, reason) is no decision: a
    # two-letter string had unpacked as (accepted="n", reason="o") and accepted the face
    policy(_Policy(result="no"))
    d = Gate(scorer, 0.0, stage="probe").decide_one(face)
    assert not d.accepted and d.reason == ("policy plugin error: test-policy-1: returned "
                                           "'no'; a policy returns None, a bool or "
                                           "(accepted: bool, reason: str)")
    policy(_Policy(error=True))
    d = Gate(scorer, 0.0, stage="probe").decide_one(face)
    assert not d.accepted
    assert d.reason == "policy plugin error: test-policy-2: RuntimeError: policy bug"
    assert d.failed  # an error, not a decision: the CLI counts it as a failure
    # any pair but a string, with a bool-like first item, is a decision
    for result, accepted in (([True, "list"], True), ((1, "int"), True), ((0, "int"), False),
                             ((np.array(True), "0-d"), True), ((np.False_, "np"), False),
                             (np.True_, True)):
        policy(_Policy(result=result))
        d = Gate(scorer, 0.0, stage="probe").decide_one(face)
        assert d.accepted is accepted and not d.reason.startswith("policy plugin error"), \
            (result, d.reason)
    # a pair without a reason says whose decision it was, not "None"
    for result in ((True, None), (True, "  ")):
        policy(_Policy(result=result))
        d = Gate(scorer, 0.0, stage="probe").decide_one(face)
        assert d.accepted and d.reason.startswith("policy test-policy-"), d.reason
        assert not d.reason.endswith((": None", ":   ")), d.reason


def test_event_hook_errors_do_not_stop_the_gate(group_faces, policy):
    class Broken:
        @hookimpl
        def face_scored(self, face, score):
            raise ValueError("audit disk full")

    policy(Broken())
    decisions = Gate(registry.get_scorer("sharpness"), 0.0).decide(group_faces)
    assert len(decisions) == len(group_faces)


def test_a_wrapper_policy_is_refused_and_the_others_still_decide(group_faces, policy, caplog):
    class Wrapper:
        @hookimpl(wrapper=True)
        def gate_decision(self, face, score, threshold, stage):
            return (yield)

    scorer = registry.get_scorer("detector-confidence")
    policy(_Policy(result=(False, "camera 7 needs more")))
    policy(Wrapper())  # newest: called first, were it called as a plain function
    d = Gate(scorer, 0.0, stage="probe").decide_one(group_faces[0])
    assert not d.accepted and d.reason.endswith("camera 7 needs more") and not d.failed
    assert "a wrapper for gate_decision is not supported" in caplog.text


class _YuNetAsInsightface:
    """insightface's det_model interface over the real YuNet detector."""

    def __init__(self):
        self.yunet = registry.get_detector("yunet")

    def detect(self, img_bgr, max_num=0, metric="default"):
        dets = self.yunet.detect(np.ascontiguousarray(img_bgr[:, :, ::-1]))
        bboxes = np.array([[d.box[0], d.box[1], d.box[0] + d.box[2], d.box[1] + d.box[3],
                            d.score] for d in dets], np.float32)
        return bboxes, np.stack([d.landmarks for d in dets]).astype(np.float32)


def test_faceanalysis_adapter(sample_photo):
    from fiqa_gate_plugins.sface import repaired_sface_path
    from insightface.model_zoo import get_model

    from fiqa_gate.insightface_adapter import GatedFaceAnalysis

    recognition = get_model(str(repaired_sface_path()))
    recognition.input_mean, recognition.input_std = 0.0, 1.0  # SFace: raw 0..255 RGB
    recognition.prepare(ctx_id=-1)

    class App:
        det_model = _YuNetAsInsightface()
        models: ClassVar[dict] = {"recognition": recognition}

    rgb = load_image(sample_photo)
    scores = sorted(d.score for d in App.det_model.yunet.detect(rgb))
    gate = Gate(DetectorConfidenceScorer(), threshold=scores[2])
    faces = GatedFaceAnalysis(App(), gate).get(np.ascontiguousarray(rgb[:, :, ::-1]))
    assert len(faces) == 6
    for f in faces:
        assert (f.embedding is not None) == f.gate_decision.accepted
    assert sum(f.embedding is not None for f in faces) == 4
    # What FaceAnalysis.get itself does (insightface's own code is the reference) happens
    # here too, but recognition: every other task model runs on every face, and the
    # liveness addon's "not live" keeps a face from being embedded even when the gate
    # accepts it. insightface's genderage and liveness weights are downloads, so two small
    # task objects with their interface stand in for them.
    from insightface.app import FaceAnalysis

    class Tagger:  # a task model: .get(img, face) adds a field
        def get(self, img, face):
            face.tagged = float(face.det_score)

    class Liveness:  # the addon's contract: sets face.liveness.is_live
        def get(self, img, face):
            from insightface.app.common import Face as InsightFace

            # the most confident face, which the gate accepts, is the spoof
            face.liveness = InsightFace(is_live=abs(float(face.det_score) - scores[-1]) > 1e-4)

    full = FaceAnalysis.__new__(FaceAnalysis)
    full.det_model = App.det_model
    full.models = {"detection": App.det_model, "tag": Tagger(), "recognition": recognition}
    full.addons, full.liveness_mode = {"liveness": Liveness()}, "normal"
    img = np.ascontiguousarray(rgb[:, :, ::-1])
    plain = FaceAnalysis.get(full, img)
    gated = GatedFaceAnalysis(full, gate).get(img, det_metric="max", source="group.jpg")
    assert [f.tagged for f in gated] == [f.tagged for f in plain]
    for p, g in zip(plain, gated, strict=True):
        assert g.liveness.is_live == p.liveness.is_live
        embedded = g.gate_decision.accepted and g.liveness.is_live
        assert (g.get("embedding") is not None) == embedded
        if embedded:
            assert np.allclose(g.embedding, p.embedding)
    assert sum(not g.liveness.is_live and g.gate_decision.accepted for g in gated) == 1
    # the adapter's embedding equals the one from our own pipeline for the same face
    ours = faces_in_image(rgb, App.det_model.yunet)
    rec = registry.get_recognizer("sface")
    kept = next(f for f in faces if f.embedding is not None)
    match = max(ours, key=lambda o: -abs(o.detection.score - float(kept.det_score)))
    e = kept.embedding / np.linalg.norm(kept.embedding)
    assert float(e @ rec.embed(match.crop[None])[0]) > 0.95


def test_a_faces_student_score_does_not_depend_on_the_faces_scored_with_it(group_faces):
    """The shipped int8 graph scales activations over a whole run: batched, faces would
    shift each other's scores. Alone, in a call of many, or on several threads, a face
    must get the same score."""
    from fiqa_gate.components import stack_crops
    from fiqa_gate.student import OnnxStudentScorer

    crops = stack_crops(group_faces)
    one, every_core = OnnxStudentScorer(threads=1), OnnxStudentScorer(threads=None)
    alone = np.concatenate([one.raw_from_crops(c[None]) for c in crops])
    assert len(set(alone.tolist())) == len(crops)  # distinct faces, distinct scores
    assert np.array_equal(one.raw_from_crops(crops), alone)
    assert every_core.threads == (os.cpu_count() or 1)
    assert np.array_equal(every_core.raw_from_crops(crops[::-1]), alone[::-1])
    small_batches = OnnxStudentScorer(threads=1, batch_size=4)
    assert np.array_equal(small_batches.raw_from_crops(crops), alone)


def test_the_runtime_cuts_the_crops_training_and_evaluation_cut(orl_root, sample_photo, tmp_path):
    """ORL images (92 px wide) and thumbnails are enlarged before detection on every path,
    so the gate scores the crops the student was trained and measured on."""
    from fiqa_gate.datasets import detect_sources
    from fiqa_gate.faces import align_face

    detector = registry.get_detector("yunet")
    paths = [orl_root / "s31" / f"{i}.pgm" for i in (1, 2, 3)]
    for path, source in zip(paths, detect_sources([(None, p) for p in paths], detector),
                            strict=True):
        face = faces_from_file(str(path), detector)[0]
        np.testing.assert_array_equal(face.crop, align_face(source.image,
                                                            source.detection.landmarks))
        x, y, w, h = face.detection.box  # reported in the file's own pixels
        assert 0 <= x < x + w <= 92 + 4 and 0 <= y < y + h <= 112 + 4
    # a 20 px thumbnail of a face is still found, where the detector alone misses it
    image = Image.open(sample_photo).convert("RGB")
    box = faces_from_file(str(sample_photo), detector)[0].detection.box
    x, y, w, h = (int(v) for v in box)
    thumb = tmp_path / "thumb.png"
    margin = (x - w // 4, y - h // 4, x + w + w // 4, y + h + h // 4)
    image.crop(margin).resize((20, 24)).save(thumb)
    assert not detector.detect(np.asarray(Image.open(thumb).convert("RGB")))
    assert len(faces_from_file(str(thumb), detector)) == 1


def test_a_thin_strip_is_not_enlarged_past_what_a_detector_takes():
    from fiqa_gate.pipeline import enlarge_for_detection

    strip = np.zeros((8, 300_000, 3), np.uint8)  # enlarged 12x it would be 345 M pixels
    assert enlarge_for_detection(strip)[1] == 1.0
    small = np.zeros((46, 56, 3), np.uint8)
    image, factor = enlarge_for_detection(small)
    assert factor == pytest.approx(96 / 46) and min(image.shape[:2]) == 96


def test_a_scorer_plugin_gives_real_numbers_or_no_score(group_faces):
    # inf had become score 1.0 and an accepted face, and '0.9', True or 1+2j had passed
    # as scores (audit of 2026-12-07)
    from fiqa_gate.components import Scorer

    class Returns(Scorer):
        name = "returns"

        def __init__(self, values):
            self.values = values

        def raw_scores(self, faces):
            return self.values[:len(faces)]

    faces = group_faces[:2]
    d = Gate(Returns([np.inf, 0.7]), 0.5, use_plugins=False).decide(faces)
    assert [x.accepted for x in d] == [False, True]
    assert d[0].reason == "no returns score for this face"
    for bad in (["0.9", "0.1"], [True, False], [1 + 2j, 0.5], [object(), 0.5]):
        with pytest.raises(ValueError, match="a scorer returns one real number per face"):
            Gate(Returns(bad), 0.5, use_plugins=False).decide(faces)
    # real numbers of any kind are scores, and None is no score, as NaN is
    from decimal import Decimal

    for fine in ([Decimal("0.2"), Decimal("0.7")], np.asarray([0.2, 0.7], np.float16),
                 [np.float32(0.2), 0.7], [None, 0.7], np.asarray([0, 1])):
        d = Gate(Returns(fine), 0.5, use_plugins=False).decide(faces)
        assert [x.accepted for x in d] == [False, True], fine


def test_faces_in_image_refuses_arrays_it_cannot_read():
    # an empty image divided by zero or hit an OpenCV assertion (audit of 2026-12-07)
    detector = registry.get_detector("yunet")
    for shape in ((0, 0, 3), (0, 100, 3), (100, 0, 3)):
        with pytest.raises(ValueError, match=r"the image is empty \(shape"):
            faces_in_image(np.zeros(shape, np.uint8), detector)
    for bad in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.float32),
                np.zeros((64, 64, 4), np.uint8)):
        with pytest.raises(TypeError, match="takes an RGB uint8 array"):
            faces_in_image(bad, detector)
    assert faces_in_image(np.zeros((64, 64, 3), np.uint8), detector) == []


def test_a_detector_plugin_without_usable_landmarks_is_named(sample_photo):
    # NaN landmarks had ended in numpy's "SVD did not converge" (audit of 2026-12-07)
    from fiqa_gate.components import Detection, Detector
    from fiqa_gate.images import load_image

    class Broken(Detector):
        name = "broken"

        def __init__(self, landmarks):
            self.landmarks = landmarks

        def detect(self, rgb):
            return [Detection((0.0, 0.0, 10.0, 10.0), self.landmarks, 0.9)]

    image = load_image(str(sample_photo))
    for landmarks in (np.full((5, 2), np.nan), np.zeros((3, 2)), np.zeros((2, 5))):
        with pytest.raises(ValueError, match="detector broken gave a face without five"):
            faces_in_image(image, Broken(landmarks))
    # ten numbers in a row are five points, as alignment reads them
    marks = np.asarray([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]])
    for shape in ((10,), (1, 10), (10, 1), (1, 5, 2)):  # kpss[i:i+1] and the like too
        (face,) = faces_in_image(image, Broken(marks.reshape(shape)))
        assert face.detection.landmarks.shape == (5, 2)  # as Detection promises
    # evaluation and training read a detector's landmarks through the same check
    from fiqa_gate.datasets import detect_sources

    skipped: list[tuple[str, str]] = []
    assert detect_sources([(None, sample_photo)], Broken(np.zeros((2, 5))),
                          skipped=skipped) == []
    assert "detector broken gave a face without five" in skipped[0][1]


def test_the_main_face_is_not_a_larger_but_doubtful_detection():
    """A false face on a shirt (YuNet 0.60) was larger than the real one (0.95) and was
    taken as the subject (gallery audit of 2026-12-08); among faces detected about as
    surely as the surest, the largest still is."""
    from fiqa_gate.faces import Detection, Face
    from fiqa_gate.pipeline import primary_face

    def face(side: float, score: float, index: int) -> Face:
        return Face(np.zeros((112, 112, 3), np.uint8), "p.jpg", index,
                    Detection((0.0, 0.0, side, side), np.zeros((5, 2)), score))

    shirt, subject, bystander = face(600, 0.60, 0), face(450, 0.95, 1), face(100, 0.97, 2)
    assert primary_face([shirt, subject, bystander]) is subject
    # a large face a little less sure than a small one stays the subject
    near, far = face(400, 0.88, 0), face(80, 0.99, 1)
    assert primary_face([near, far]) is near
    crop = Face(np.zeros((112, 112, 3), np.uint8), "aligned.png")  # no detection at all
    assert primary_face([crop]) is crop
    # a detector plugin's NaN confidence, and no face at all: a face, and a clear error
    # (a bare StopIteration had come out; third audit of 2026-12-08)
    odd = face(300, float("nan"), 0)
    assert primary_face([odd, face(100, 0.9, 1)]) is odd
    from fiqa_gate.errors import NoFaceError

    with pytest.raises(NoFaceError):
        primary_face([])


def test_a_bad_crop_or_embedding_is_said_where_it_is_made():
    # In Python, a grey crop was said to have shape (1, 1, 112, 112), a float one failed
    # its whole batch at scoring, an array of crops given to a scorer failed on "truth
    # value ... ambiguous", and a recognizer returning too few rows failed with an
    # IndexError (audit of 2026-12-08).
    from fiqa_gate.components import Recognizer
    from fiqa_gate.faces import Face

    good = np.zeros((112, 112, 3), np.uint8)
    for crop, got in ((good[:, :, 0], r"uint8 array of shape \(112, 112\)"),
                      (good.astype(np.float32), r"float32 array of shape \(112, 112, 3\)"),
                      (good.tolist(), "list")):
        with pytest.raises(ValueError, match=r"^p\.jpg: a face's crop is an aligned 112x112 "
                                             rf"RGB uint8 array \(height x width x 3\), not a "
                                             rf"{got}$"):
            Face(crop, "p.jpg")
    gate = Gate(registry.get_scorer("sharpness"), threshold=0.5)
    with pytest.raises(TypeError, match=r"wrap aligned crops as \[Face\(crop\)"):
        gate.decide(np.stack([good, good]))
    assert gate.decide([]) == [] and len(gate.decide([Face(good)])) == 1

    class Short(Recognizer):
        name, dim = "short", 128

        def __init__(self, rows: int, dim: int) -> None:
            self.rows, self.width = rows, dim

        def embed_raw(self, crops):
            return np.ones((self.rows, self.width), np.float32)

    for rows, width in ((1, 128), (2, 32)):
        with pytest.raises(ValueError, match=rf"recognizer 'short' returned embeddings of "
                                             rf"shape \({rows}, {width}\) for 2 faces; it "
                                             r"declares \(2, 128\)"):
            Short(rows, width).embed(np.stack([good, good]))
    assert Short(2, 128).embed(np.stack([good, good])).shape == (2, 128)
