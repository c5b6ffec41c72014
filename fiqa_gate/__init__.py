"""fiqa-gate: a face image quality gate for face-recognition pipelines.

Importing the package is cheap and torch-free: models, OpenCV and ONNX Runtime load
lazily, on first use.
"""

from pathlib import Path

from fiqa_gate.errors import FiqaGateError, ImageLoadError, ModelError

__version__ = "0.1.0"


def models_dir() -> Path:
    """Where the shipped student and calibration files live."""
    return Path(__file__).parent / "models"

__all__ = ["FiqaGateError", "ImageLoadError", "ModelError", "__version__", "models_dir"]
