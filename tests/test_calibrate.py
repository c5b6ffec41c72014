"""`fiqa-gate calibrate` fits a scorer's map to P(match) for any recognizer, and the
commands gate on a fitted file (`--calibration`), on real faces and real recognizers."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fiqa_gate.calibration import load_fitted
from fiqa_gate.errors import FiqaGateError

MODELS = Path(__file__).resolve().parents[1] / "fiqa_gate" / "models"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fiqa_gate", *args], capture_output=True,
                          text=True, timeout=900)


def test_calibrate_reproduces_the_shipped_calibrations(tmp_path):
    """On its defaults (the recipe's validation faces) and SFace, calibrate fits the maps
    the training run shipped: the student's and every baseline's, knot for knot."""
    out = tmp_path / "sface.json"
    res = run("calibrate", "--recognizer", "sface", "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    fitted = json.loads(out.read_text())
    assert fitted["recognizer"] == "sface" and fitted["faces"] == 2460
    shipped = json.loads((MODELS / "student.json").read_text())["calibration"]
    assert fitted["scorers"]["student"]["x"] == shipped["x"]
    assert fitted["scorers"]["student"]["y"] == shipped["y"]
    baselines = json.loads((MODELS / "baselines.json").read_text())["sface"]
    for name, shipped in baselines.items():
        assert (fitted["scorers"][name]["x"], fitted["scorers"][name]["y"]) == (
            shipped["x"], shipped["y"]), name
    assert "--threshold 0.5 accepts" in res.stderr


def test_calibrate_reproduces_the_shipped_dlib_maps(tmp_path):
    """The maps that ship for dlib are `fiqa-gate calibrate --recognizer dlib` on its
    defaults (about 4 min: dlib embeds 2460 faces)."""
    out = tmp_path / "dlib.json"
    res = run("calibrate", "--recognizer", "dlib", "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    fitted = json.loads(out.read_text())
    shipped = json.loads((MODELS / "calibrations" / "dlib.json").read_text())
    assert fitted["models"]["student"]["sha256"] == shipped["models"]["student"]["sha256"]
    assert fitted["scorers"] == shipped["scorers"]


def test_the_maps_that_ship_for_a_recognizer_are_used_with_it(tmp_path):
    import onnx

    from fiqa_gate.registry import ScorerContext, get_scorer

    shipped = MODELS / "calibrations" / "dlib.json"
    names = ("student", "sharpness", "detector-confidence", "embedding-norm")
    for name in names:
        scorer = get_scorer(name, ScorerContext("dlib"))
        own = load_fitted(shipped, name, "dlib")
        assert scorer.calibrated_for == "dlib"
        assert (scorer.calibration.x, scorer.calibration.y) == (own.x, own.y)
        assert get_scorer(name, ScorerContext("sface")).calibrated_for == "sface"
    # another student model file (here the same graph with other bytes) has no dlib map:
    # the shipped one would not fit its raw outputs
    other = tmp_path / "other.onnx"
    graph = onnx.load(str(MODELS / "student.onnx"))
    graph.doc_string = "another export"
    onnx.save(graph, str(other))
    meta = json.loads((MODELS / "student.json").read_text())
    from fiqa_gate.assets import sha256_file

    (tmp_path / "other.json").write_text(json.dumps({**meta, "sha256": sha256_file(other)}))
    student = get_scorer("student", ScorerContext("dlib", {"model": str(other)}))
    assert student.calibrated_for == "sface"
    # a recognizer whose name only ends like a shipped file's gets none of its maps
    from fiqa_gate.calibration import shipped_fitted

    assert shipped_fitted("sharpness", "x/dlib") is None
    assert shipped_fitted("sharpness", "dlib") is not None


@pytest.fixture(scope="module")
def dlib_calibration(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cal") / "dlib.json"
    res = run("calibrate", "--recognizer", "dlib", "--variants", "2", "--scorer", "student",
              "--scorer", "detector-confidence", "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_a_calibration_for_another_recognizer_gates_with_it(dlib_calibration, tmp_path,
                                                             orl_root):
    d = tmp_path / "faces"
    d.mkdir()
    for s in (33, 36, 38):
        shutil.copy(orl_root / f"s{s}" / "1.pgm", d / f"s{s}.pgm")
    fitted = json.loads(dlib_calibration.read_text())
    assert fitted["recognizer"] == "dlib" and set(fitted["scorers"]) == {
        "student", "detector-confidence"}
    with_file = run("score", str(d), "--recognizer", "dlib", "--calibration",
                    str(dlib_calibration))
    assert with_file.returncode == 0, with_file.stderr
    assert "calibrated for sface" not in with_file.stderr
    shipped = run("score", str(d))  # SFace's map
    rows_file = list(csv.DictReader(with_file.stdout.splitlines()))
    rows_shipped = list(csv.DictReader(shipped.stdout.splitlines()))
    # the same raw outputs, through this file's dlib map instead of SFace's
    assert [r["raw_score"] for r in rows_file] == [r["raw_score"] for r in rows_shipped]
    dlib_map = load_fitted(dlib_calibration, "student", "dlib")
    for r, s in zip(rows_file, rows_shipped, strict=True):  # raw printed to 6 decimals
        assert float(r["score"]) == pytest.approx(float(dlib_map(float(r["raw_score"]))),
                                                  abs=1e-4)
        assert abs(float(r["score"]) - float(s["score"])) > 1e-3  # SFace's map differs
    # the file's map is used over the one that ships for dlib
    res = run("filter", str(d), "--scorer", "detector-confidence", "--recognizer", "dlib",
              "--calibration", str(dlib_calibration), "-o", "-")
    assert res.returncode == 0, res.stderr
    own = load_fitted(dlib_calibration, "detector-confidence", "dlib")
    assert [float(r["score"]) for r in csv.DictReader(res.stdout.splitlines())] == \
        pytest.approx([float(own(float(r["raw_score"]))) for r in
                       csv.DictReader(res.stdout.splitlines())], abs=1e-4)


def test_a_calibration_file_that_does_not_fit_is_refused(dlib_calibration, tmp_path,
                                                         orl_root):
    face = tmp_path / "1.pgm"
    shutil.copy(orl_root / "s33" / "1.pgm", face)
    for args, why in (
            ((), "fitted with recognizer 'dlib', not 'sface'"),
            (("--recognizer", "dlib", "--scorer", "sharpness"),
             "holds no calibration for scorer 'sharpness'")):
        res = run("filter", str(face), "--calibration", str(dlib_calibration), *args)
        assert res.returncode == 2 and why in res.stderr, res.stderr
    res = run("filter", str(face), "--calibration", str(face))
    assert res.returncode == 2 and "not a calibration file" in res.stderr
    # fitted on the shipped student: another model file's raw outputs are not its
    with pytest.raises(FiqaGateError, match="another student model file"):
        load_fitted(dlib_calibration, "student", "dlib", model_file=face)
    # and calibrate never writes over a file that is not an earlier calibration
    before = face.read_bytes()
    res = run("calibrate", "-o", str(face))
    assert res.returncode == 2 and "not an earlier `fiqa-gate calibrate` result" in res.stderr
    assert face.read_bytes() == before


def test_a_calibration_that_would_gate_wrongly_is_damaged(tmp_path):
    from fiqa_gate.calibration import Calibration

    for x, y in (([0.0, float("nan"), 1.0], [0.1, 0.2, 0.3]), ([0.0, 1.0], [0.9, 0.1]),
                 ([float("-inf"), float("inf")], [0.0, 1.0]), ([0.0, 1.0], [0.0, 1.5]),
                 ([0.0, 10**400], [0.0, 1.0])):  # no float holds it
        with pytest.raises((ValueError, OverflowError)):
            Calibration.from_dict({"x": x, "y": y})
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"recognizer": "sface", "models": {"student": "x"},
                                    "scorers": {"student": {"x": x, "y": y}}}))
        with pytest.raises(FiqaGateError, match="calibration of student is damaged"):
            load_fitted(path, "student", "sface")


def test_calibrate_writes_to_a_pipe():
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "calibrate", "--scorer",
                           "sharpness", "--variants", "1", "-o", "/dev/stdout"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["scorers"]["sharpness"]["x"]
