"""`filter` copies never overwrite a file that is already at the destination.

(The bad-input corpus, kills and resumes are in test_bad_inputs.py and
test_resume_kill.py.)"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

SCORER = ["--scorer", "sharpness"]  # the gate under test is the pipeline, not a model


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fiqa_gate", *args], capture_output=True,
                          timeout=timeout)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def test_existing_destination_is_never_overwritten(tmp_path, orl_root):
    src = tmp_path / "in"
    src.mkdir()
    (src / "1.pgm").write_bytes((orl_root / "s38" / "1.pgm").read_bytes())
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "1.pgm").write_bytes(b"someone else's file")
    done = _run("filter", str(src), "-o", str(tmp_path / "m.csv"), "--accepted-dir", str(ok),
                "--threshold", "0", *SCORER)
    assert done.returncode == 1
    assert (ok / "1.pgm").read_bytes() == b"someone else's file"
    assert "not overwritten" in _rows(tmp_path / "m.csv")[0]["error"]
