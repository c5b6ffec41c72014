"""insightface model packs (buffalo_l, antelopev2, ...) when the user has one locally.

The packs are licensed for non-commercial research and download from the internet, so
fiqa-gate never fetches them: a pack found under `~/.insightface/models/<pack>/` (or
`$INSIGHTFACE_HOME/models`) is registered as recognizer `insightface:<pack>`. The
recognizer `insightface` picks the first pack found, or says how to get one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np

from fiqa_gate.components import Recognizer
from fiqa_gate.errors import ModelError
from fiqa_gate.hookspecs import hookimpl

log = logging.getLogger(__name__)

# An unmeasured default (no pack can be had offline to measure FMR 1e-3 on): set
# FIQA_GATE_INSIGHTFACE_THRESHOLD to the value measured on your own impostor pairs.
DEFAULT_THRESHOLD = 0.30


def models_root() -> Path:
    return Path(os.environ.get("INSIGHTFACE_HOME", "~/.insightface")).expanduser() / "models"


def find_packs() -> dict[str, Path]:
    """Pack name -> its recognition ONNX file (the largest .onnx with 112x112 input)."""
    root = models_root()
    packs: dict[str, Path] = {}
    try:
        if not root.is_dir():
            return packs
        for pack in sorted(p for p in root.iterdir() if p.is_dir()):
            onnx_files = sorted(pack.glob("*.onnx"), key=lambda p: -p.stat().st_size)
            # insightface names them w600k_r50.onnx, glintr100.onnx, ...: the recognizer
            # is the biggest file of a pack.
            if onnx_files:
                packs[pack.name] = onnx_files[0]
    except OSError as exc:  # a HOME this user cannot enter: as if no pack were there
        log.debug("insightface packs under %s cannot be read: %s", root, exc)
    return packs


class InsightfaceRecognizer(Recognizer):
    """ArcFace ONNX through insightface's model zoo: BGR input, (x - 127.5) / 127.5."""

    dim = 512

    def __init__(self, pack: str, model_file: Path) -> None:
        from insightface.model_zoo import get_model

        self.name = f"insightface:{pack}"
        self._model = get_model(str(model_file))
        if self._model is None or getattr(self._model, "taskname", "") != "recognition":
            raise ModelError(f"{model_file}: not an insightface recognition model")
        self._model.prepare(ctx_id=-1)
        self.dim = int(self._model.output_shape[1])
        self.threshold = float(os.environ.get("FIQA_GATE_INSIGHTFACE_THRESHOLD",
                                              DEFAULT_THRESHOLD))
        self.threshold_source = "default, not measured (set FIQA_GATE_INSIGHTFACE_THRESHOLD)"

    def embed_raw(self, crops: np.ndarray) -> np.ndarray:
        bgr = [np.ascontiguousarray(c[:, :, ::-1]) for c in crops]
        return np.asarray(self._model.get_feat(bgr), dtype=np.float32).reshape(len(crops), -1)


def _missing(*_args: object) -> NoReturn:
    raise ModelError(
        f"no insightface model pack under {models_root()}: packs (buffalo_l, antelopev2) are "
        "non-commercial and not downloadable here; unpack one into "
        f"{models_root()}/<pack>/ to use it, or use --recognizer sface"
    )


@hookimpl
def register_recognizers(register: Callable[..., None]) -> None:
    packs = find_packs()
    for pack, path in packs.items():
        register(f"insightface:{pack}", lambda p=pack, f=path: InsightfaceRecognizer(p, f),
                 f"insightface pack {pack} ({path.name})")
    if packs:
        first, path = next(iter(packs.items()))
        register("insightface", lambda: InsightfaceRecognizer(first, path),
                 f"first local insightface pack ({first})")
    else:
        register("insightface", _missing, "insightface model pack (none found locally)")
