"""Example third-party plugin for fiqa-gate.

- Audit log: every scored, rejected and enrolled face is appended as one JSON line to
  $FIQA_GATE_AUDIT_LOG (default ./fiqa-gate-audit.jsonl).
- Policy: enrollment is stricter than probing. A face is enrolled only if its score
  reaches $FIQA_GATE_ENROLL_THRESHOLD (default 0.8); probes and filters keep the
  command's threshold.
- Command: `fiqa-gate audit-summary` counts the log's events.

Install with `pip install examples/audit_plugin`; nothing in fiqa-gate names it.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import TYPE_CHECKING

import click

from fiqa_gate.hookspecs import hookimpl

if TYPE_CHECKING:
    from fiqa_gate.faces import Face
    from fiqa_gate.gate import Decision


def _log_path() -> str:
    return os.environ.get("FIQA_GATE_AUDIT_LOG", "fiqa-gate-audit.jsonl")


def _append(event: str, **fields: object) -> None:
    with open(_log_path(), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")


@hookimpl
def face_scored(face: Face, score: Decision) -> None:
    _append("scored", face=face.face_id, score=score.score, accepted=score.accepted)


@hookimpl
def face_rejected(face: Face, score: Decision, reason: str) -> None:
    _append("rejected", face=face.face_id, score=score.score, reason=reason)


@hookimpl
def face_enrolled(identity: str, face_id: str) -> None:
    _append("enrolled", identity=identity, face_id=face_id)


@hookimpl
def gate_decision(face: Face, score: float, threshold: float,
                  stage: str) -> tuple[bool, str] | None:
    if stage != "enroll":
        return None
    strict = float(os.environ.get("FIQA_GATE_ENROLL_THRESHOLD", "0.8"))
    bar = max(strict, threshold)
    if round(score, 6) >= bar:  # as the core compares: a score that prints as the bar passes
        return True, f"score {score:.3f} >= enrollment threshold {bar:.2f}"
    return False, f"score {score:.3f} < enrollment threshold {bar:.2f}"


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command(name="audit-summary")
    def audit_summary() -> None:
        """Count the events in the audit log."""
        with open(_log_path(), encoding="utf-8") as fh:
            counts = Counter(json.loads(line)["event"] for line in fh if line.strip())
        for event, n in sorted(counts.items()):
            click.echo(f"{event}\t{n}")
