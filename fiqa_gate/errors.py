"""Typed errors: every failure a user can cause has a class and a readable message."""


class FiqaGateError(Exception):
    """Base class for every error fiqa-gate raises on purpose."""


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line: an OpenCV message spans several, a CSV cell should not."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class ImageLoadError(FiqaGateError):
    """A file could not be read as an image; `reason` is short and stable (for manifests)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NoFaceError(FiqaGateError):
    """The detector found no face in an image; `reason` is the manifest's text for it,
    with what the picture's light says where it explains the miss."""

    def __init__(self, message: str, reason: str = "no face found") -> None:
        super().__init__(message)
        self.reason = reason


class NotAlignedError(FiqaGateError, ValueError):
    """An input given as an aligned crop is not one (not square)."""


class ModelError(FiqaGateError):
    """A model file is missing, fails its checksum, or has the wrong inputs/outputs."""


class PluginError(FiqaGateError):
    """A plugin is unknown, misbehaves or registers something invalid."""


class GalleryError(FiqaGateError):
    """A gallery is missing, corrupt, locked or built with another recognizer."""


class ManifestError(FiqaGateError):
    """A manifest cannot be resumed: it is not one, or has other columns."""


def caused_by_interrupt(exc: BaseException | None) -> bool:
    """A Ctrl-C inside a library that wrapped it (ONNX Runtime raises an ImportError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
