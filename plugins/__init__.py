"""First-party fiqa-gate plugins (installed as `fiqa_gate_plugins`), loaded through the
`fiqa_gate` entry-point group exactly as third-party plugins are."""

from __future__ import annotations

import json

from fiqa_gate.calibration import Calibration


def shipped_calibration(scorer: str, recognizer: str) -> Calibration | None:
    """The calibration fitted for a baseline scorer with a recognizer, if one was shipped."""
    from fiqa_gate import models_dir

    path = models_dir() / "baselines.json"
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    entry = table.get(recognizer, {}).get(scorer)
    return None if entry is None else Calibration.from_dict({"recognizer": recognizer, **entry})
