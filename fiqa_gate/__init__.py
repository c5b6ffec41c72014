"""fiqa-gate: a face image quality gate for face-recognition pipelines.

Importing the package is cheap and torch-free: models, OpenCV and ONNX Runtime load
lazily, on first use.
"""

from fiqa_gate.errors import FiqaGateError, ImageLoadError, ModelError

__version__ = "0.1.0"

__all__ = ["FiqaGateError", "ImageLoadError", "ModelError", "__version__"]
