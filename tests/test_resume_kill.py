"""Runs killed with SIGKILL at random moments, resumed with --resume until done.

The real `fiqa-gate` runs in a subprocess over a folder of small aligned crops; it is
killed at random moments (fixed seed) - during start-up, between rows, just after a row -
and started again with --resume until a run completes on its own. The final manifest must
hold every input exactly once, with no partial line and no duplicate; for `filter`, every
copy must be complete and the inputs unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_SCRIPT = Path(sys.executable).with_name("fiqa-gate")
FIQA = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "fiqa_gate"]
N_IMAGES = 60
MIN_KILLS = 10


@pytest.fixture(scope="module")
def crops(tmp_path_factory, orl_root) -> Path:
    """60 aligned crops (ORL s1-s6, with per-file noise) as 448 px PNGs: decoding them
    paces the run, so that kills land between rows."""
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        s, k = 1 + i // 10, 1 + i % 10
        face = Image.open(orl_root / f"s{s}" / f"{k}.pgm").convert("RGB").resize((448, 448))
        arr = np.clip(np.asarray(face, np.int16) + rng.integers(-10, 11, (448, 448, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:03d}.png", compress_level=1)
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_and_resume(cmd: list[str], manifest: Path, seed: int) -> dict[str, int]:
    """Start `cmd` again and again, SIGKILL it at a random moment, until one run finishes."""
    pick = random.Random(seed)
    stats = {"kills": 0, "killed_in_startup": 0, "torn_tails": 0, "runs": 0}
    for _ in range(200):
        before = complete_lines(manifest)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stats["runs"] += 1
        if pick.random() < 0.25:
            # a moment in start-up: imports, model loading, opening the manifest
            time.sleep(pick.uniform(0.0, 0.6))
        else:
            # a moment in the stream: once 1-3 more rows are on disk, then 0-3 ms more
            target = before + pick.randint(1, 3)
            while proc.poll() is None and complete_lines(manifest) < target:
                time.sleep(0.0005)
            time.sleep(pick.uniform(0.0, 0.003))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stats["kills"] += 1
            stats["killed_in_startup"] += complete_lines(manifest) == before
            if manifest.exists() and not manifest.read_bytes().endswith(b"\n"):
                stats["torn_tails"] += 1
            continue
        err = proc.stderr.read().decode(errors="replace")
        assert "Traceback" not in err, err[-3000:]
        assert proc.returncode == 0, err[-3000:]
        return stats
    raise AssertionError(f"no run completed: {stats}")


def check_manifest(manifest: Path, columns: list[str], crops: Path) -> list[dict[str, str]]:
    data = manifest.read_bytes()
    assert data.endswith(b"\n")  # no partial last line
    lines = data.decode().splitlines()
    assert lines[0] == ",".join(columns) and lines.count(lines[0]) == 1  # one header
    rows = list(csv.reader(lines))
    assert all(len(r) == len(columns) for r in rows), "a row with missing or extra fields"
    records = [dict(zip(columns, r, strict=True)) for r in rows[1:]]
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)), "a file has two rows"
    assert sorted(paths) == sorted(str(p) for p in crops.iterdir()), "a file has no row"
    return records


def report(tmp_path: Path, name: str, stats: dict[str, int]) -> None:
    (tmp_path / f"{name}_kills.json").write_text(json.dumps(stats))
    print(f"\n{name}: survived {stats['kills']} SIGKILLs in {stats['runs']} runs "
          f"({stats['killed_in_startup']} before a new row, {stats['torn_tails']} torn tails)")


def test_filter_killed_and_resumed_copies_every_file_once(crops, tmp_path):
    before = digests(crops)
    manifest = tmp_path / "manifest.csv"
    ok_dir, bad_dir = tmp_path / "accepted", tmp_path / "rejected"
    cmd = [*FIQA, "filter", str(crops), "--aligned", "--scorer", "sharpness",
           "--threshold", "0.55", "-o", str(manifest), "--resume",
           "--accepted-dir", str(ok_dir), "--rejected-dir", str(bad_dir)]
    stats = kill_and_resume(cmd, manifest, seed=20240611)
    assert stats["kills"] >= MIN_KILLS, stats
    report(tmp_path, "filter", stats)

    from fiqa_gate.cli import FILTER_COLUMNS

    rows = check_manifest(manifest, FILTER_COLUMNS, crops)
    assert all(r["decision"] in ("accept", "reject") and r["score"] for r in rows), rows
    assert digests(crops) == before  # inputs never changed
    dests = set()
    for r in rows:
        dest, how = r["copied_to"].rsplit(" (", 1)
        assert how in ("copied)", "already present)"), r  # a copy made before a kill is reused
        target = ok_dir if r["decision"] == "accept" else bad_dir
        assert Path(dest).parent == target
        assert hashlib.sha256(Path(dest).read_bytes()).hexdigest() == before[r["path"]]
        dests.add(dest)
    visible = {str(p) for d in (ok_dir, bad_dir) if d.exists() for p in d.iterdir()
               if not p.name.startswith(".")}
    assert visible == dests  # exactly one complete copy per input, nothing half-copied


def test_score_killed_and_resumed_scores_every_file_once(crops, tmp_path):
    manifest = tmp_path / "scores.csv"
    cmd = [*FIQA, "score", str(crops), "--aligned", "--scorer", "sharpness", "--output",
           str(manifest), "--resume"]
    stats = kill_and_resume(cmd, manifest, seed=31337)
    assert stats["kills"] >= MIN_KILLS, stats
    report(tmp_path, "score", stats)

    from fiqa_gate.cli import SCORE_COLUMNS

    rows = check_manifest(manifest, SCORE_COLUMNS, crops)
    assert all(r["score"] and not r["error"] and r["face"] == "0" for r in rows)
    # Scores do not depend on the run a row was written in.
    clean = subprocess.run([*FIQA, "score", str(crops), "--aligned", "--scorer", "sharpness"],
                           capture_output=True, text=True, timeout=300)
    expected = {r["path"]: r["raw_score"] for r in csv.DictReader(clean.stdout.splitlines())}
    assert {r["path"]: r["raw_score"] for r in rows} == expected


def test_resume_redoes_an_input_whose_rows_a_kill_cut_at_a_line_end(tmp_path, orl_root,
                                                                    sample_photo):
    """A kill can cut the one write of a six-face photo after its third row: a resumed
    run must not take the photo as done, and writes its six rows once."""
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a_face.pgm").write_bytes((orl_root / "s2" / "1.pgm").read_bytes())
    (src / "b_group.jpg").write_bytes(sample_photo.read_bytes())
    out = tmp_path / "scores.csv"
    cmd = [*FIQA, "score", str(src), "--scorer", "sharpness", "--output", str(out)]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    whole = out.read_bytes()
    lines = whole.splitlines(keepends=True)
    assert len(lines) == 1 + 1 + 6
    out.write_bytes(b"".join(lines[:5]))  # header, the face, 3 of the group's 6 rows
    done = subprocess.run([*cmd, "--resume"], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert out.read_bytes() == whole  # the same file as an uninterrupted run


def test_resume_refuses_a_file_that_is_not_its_manifest_and_leaves_it_alone(tmp_path,
                                                                           sample_photo):
    src = tmp_path / "in"
    src.mkdir()
    (src / "x.jpg").write_bytes(sample_photo.read_bytes())
    others = {"photo.jpg": sample_photo.read_bytes(),
              "other.csv": b"name,value\na,1\nb,2\nc,",
              "filter.csv": b"path,score,raw_score,decision,threshold,faces,reason,error,"
                            b"copied_to\n/x.jpg,0.5,1,accept,0.5,1,ok,,\n"}
    for name, data in others.items():
        target = tmp_path / name
        target.write_bytes(data)
        done = subprocess.run([*FIQA, "score", str(src), "--scorer", "sharpness", "--resume",
                               "--output", str(target)], capture_output=True, timeout=300)
        err = done.stderr.decode(errors="replace")
        assert done.returncode == 2 and "Traceback" not in err, err[-2000:]
        assert "cannot resume into it" in err
        assert target.read_bytes() == data, name  # not truncated, not appended to
