"""insightface model packs (buffalo_l, antelopev2, ...) when the user has one locally.

The packs are licensed for non-commercial research and download from the internet, so
fiqa-gate never fetches them: a pack found under `~/.insightface/models/<pack>/` (or
`$INSIGHTFACE_HOME/models`) is registered as recognizer `insightface:<pack>`. The
recognizer `insightface` picks the first pack whose recognizer loads, or says how to get
one.
"""

from __future__ import annotations

import logging
import os
import re
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


# the other models of insightface's packs, by file name: detectors (det_10g, scrfd_*),
# landmarks (1k3d68, 2d106det) and attributes (genderage)
_NOT_RECOGNIZERS = re.compile(r"(det_|scrfd|1k3d68|2d106|genderage)", re.IGNORECASE)


def find_packs() -> dict[str, list[Path]]:
    """Pack name -> the ONNX files that may be its recognizer, likeliest first: files not
    named as insightface's other models, largest first (w600k_r50, glintr100, ...; in
    buffalo_s the landmark model is larger than the recognizer). A pack of only a
    detector and the like is no recognizer."""
    root = models_root()
    packs: dict[str, list[Path]] = {}
    try:
        if not root.is_dir():
            return packs
        for pack in sorted(p for p in root.iterdir() if p.is_dir()):
            files = [f for f in pack.glob("*.onnx") if not _NOT_RECOGNIZERS.match(f.name)]
            if files:
                packs[pack.name] = sorted(files, key=lambda f: (-f.stat().st_size, f.name))
    except OSError as exc:  # a HOME this user cannot enter: as if no pack were there
        log.debug("insightface packs under %s cannot be read: %s", root, exc)
    return packs


class InsightfaceRecognizer(Recognizer):
    """ArcFace ONNX through insightface's model zoo: BGR input, (x - 127.5) / 127.5."""

    dim = 512

    def __init__(self, pack: str, model_files: list[Path]) -> None:
        from insightface.model_zoo import get_model

        self.name = f"insightface:{pack}"
        tried = []
        for model_file in model_files:
            try:
                model = get_model(str(model_file))
            except Exception as exc:  # a truncated download, a file of another kind
                why = next(iter(str(exc).strip().splitlines()), "")  # ORT's are long
                tried.append(f"{model_file.name}: cannot be read ({type(exc).__name__}: {why})")
                continue
            if model is None or getattr(model, "taskname", "") != "recognition":
                tried.append(f"{model_file.name}: not a recognition model")
                continue
            self._model = model
            break
        else:
            raise ModelError(f"insightface pack {pack} ({model_files[0].parent}) holds no "
                             f"usable recognition model: {'; '.join(tried)}")
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


def _first_usable(packs: dict[str, list[Path]]) -> InsightfaceRecognizer:
    """The first pack, in name order, whose recognizer loads; the others are warned of."""
    failed = []
    for pack, files in packs.items():
        try:
            return InsightfaceRecognizer(pack, files)
        except ModelError as exc:
            failed.append(str(exc))
            log.warning("%s; trying the next pack", exc)
    raise ModelError("no insightface pack could be used: " + " | ".join(failed))


@hookimpl
def register_recognizers(register: Callable[..., None]) -> None:
    packs = find_packs()
    for pack, files in packs.items():
        register(f"insightface:{pack}", lambda p=pack, f=files: InsightfaceRecognizer(p, f),
                 f"insightface pack {pack} ({files[0].name})")
    if packs:
        register("insightface", lambda: _first_usable(packs),
                 f"first usable local insightface pack ({', '.join(packs)})")
    else:
        register("insightface", _missing, "insightface model pack (none found locally)")
