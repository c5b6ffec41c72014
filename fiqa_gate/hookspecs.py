"""The plugin hooks of fiqa-gate (pluggy project name `fiqa_gate`).

A plugin is a module with `@hookimpl` functions, listed under the `fiqa_gate`
entry-point group of its package. First-party plugins in `fiqa_gate_plugins`
register the same way a third party does.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("fiqa_gate")
hookimpl = pluggy.HookimplMarker("fiqa_gate")


@hookspec
def register_detectors(register: Any) -> None:
    """Call `register(name, factory, description)`; factory() returns a Detector."""


@hookspec
def register_recognizers(register: Any) -> None:
    """Call `register(name, factory, description)`; factory() returns a Recognizer."""


@hookspec
def register_scorers(register: Any) -> None:
    """Call `register(name, factory, description)`; factory(context) returns a Scorer.

    `context` is a `fiqa_gate.registry.ScorerContext`: it hands out the recognizer a
    scorer may need (embedding norm) without loading it for scorers that do not.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the `fiqa-gate` command group."""


@hookspec
def face_scored(face: Any, score: Any) -> None:
    """Event: a face got a score (`score` is a fiqa_gate.gate.Decision)."""


@hookspec
def face_rejected(face: Any, score: Any, reason: str) -> None:
    """Event: the gate rejected a face."""


@hookspec
def face_enrolled(identity: str, face_id: str) -> None:
    """Event: a face was committed to a gallery."""


@hookspec(firstresult=True)
def gate_decision(face: Any, score: float, threshold: float, stage: str) -> Any:
    """Policy: override the default accept/reject for one face.

    `stage` is "filter", "enroll" or "probe". Return None to leave the decision to
    the next plugin (and finally to `score >= threshold`), `accepted` (a bool), or the
    tuple `(accepted, reason)`. Anything else, or an exception, rejects the face with a
    reason naming the plugin.
    """
