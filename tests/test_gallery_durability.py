"""The FAISS + SQLite gallery under SIGKILL, concurrent writers and corrupt files.

Real FAISS and SQLite in real processes; the embeddings are random unit vectors because
the gallery, not the recognizer, is under test here.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fiqa_gate.errors import GalleryError
from fiqa_gate.gallery import Gallery

BATCH = 5

WRITER = textwrap.dedent("""
    import sys, zlib, numpy as np
    from fiqa_gate.gallery import Enrollment, Gallery
    path, tag, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
    g = Gallery.create(path, "sface", 128, 0.383)
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    start = len(g.identities())
    for b in range(batches):
        e = rng.normal(size=(BATCH_SIZE, 128)).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        g.enroll([Enrollment(f"{tag}-{start + b}", v, f"{tag}/{start + b}/{i}.jpg", 0.9)
                  for i, v in enumerate(e)])
        print(b, flush=True)
""").replace("BATCH_SIZE", str(BATCH))


def _writer(path: Path, tag: str, batches: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(batches)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_consistent(path: Path, disk_index: bool = True) -> int:
    g = Gallery.open(path)
    try:
        counts = g.identities()
        assert all(n == BATCH for n in counts.values()), counts  # batches wholly in or out
        index = g.index()
        assert index.ntotal == len(g) == sum(counts.values())
        gen = g.generation()
        on_disk = path / f"index.{gen}.faiss"
        if disk_index and on_disk.exists():  # a written index matches the committed rows
            import faiss

            assert faiss.read_index(str(on_disk)).ntotal == len(g)
        if len(g):
            q = np.ones((1, 128), np.float32) / np.sqrt(128)
            assert len(g.search(q, "sface", k=3)[0]) == min(3, len(g))
        return len(g)
    finally:
        g.close()


def test_enrollment_killed_at_random_moments_leaves_a_consistent_gallery(tmp_path):
    path = tmp_path / "gallery"
    pick = random.Random(99)
    kills, last = 0, 0
    for round_ in range(15):
        proc = _writer(path, f"r{round_}", 1000)
        # wait until it has written a few batches, then kill at a random moment
        for _ in range(pick.randint(1, 6)):
            if not proc.stdout.readline():
                break
        time.sleep(pick.uniform(0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        n = _check_consistent(path)
        assert n >= last  # committed batches are never lost
        last = n
    assert kills >= 10
    print(f"\ngallery survived {kills} SIGKILLs with {last} faces committed")


def test_two_writers_at_once_lose_nothing(tmp_path):
    path = tmp_path / "gallery"
    Gallery.create(path, "sface", 128, 0.383).close()
    procs = [_writer(path, tag, 20) for tag in ("left", "right")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert _check_consistent(path) == 2 * 20 * BATCH
    g = Gallery.open(path)
    assert len(g.identities()) == 40
    g.close()


def test_corrupt_gallery_files_give_a_clear_error_or_a_rebuild(tmp_path):
    path = tmp_path / "gallery"
    proc = _writer(path, "x", 3)
    proc.communicate(timeout=120)
    n = _check_consistent(path)
    # a damaged index is derived data: rebuilt from the database
    (idx,) = path.glob("index.*.faiss")
    idx.write_bytes(b"garbage" * 100)
    assert _check_consistent(path, disk_index=False) == n
    # a damaged database is the source of truth: refuse with a clear error
    (path / "meta.sqlite").write_bytes(b"not a database at all" * 50)
    for suffix in ("-wal", "-shm"):
        (path / f"meta.sqlite{suffix}").unlink(missing_ok=True)
    with pytest.raises(GalleryError, match="corrupt"):
        Gallery.open(path)
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "search", "x.jpg", "--index",
                           str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr
    assert "corrupt" in done.stderr
