"""The gallery under SIGKILL, concurrent writers and readers, and damaged files.

Real SFace embeddings of ORL faces (YuNet-aligned, computed once), real FAISS and SQLite,
real processes. A batch is one identity's faces, so "wholly in or wholly out" can be read
off the identity counts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fiqa_gate.errors import GalleryError
from fiqa_gate.gallery import Enrollment, Gallery

BATCH = 10  # ORL has ten images per person
MEMORY_LIMIT = 3 << 30  # children that parse damaged files must not take the machine down


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory, orl_root) -> Path:
    """SFace embeddings of ORL s1-s20 (10 faces each), aligned by YuNet: an .npy file."""
    from fiqa_gate import registry
    from fiqa_gate.faces import align_face
    from fiqa_gate.images import load_image

    det, rec = registry.get_detector("yunet"), registry.get_recognizer("sface")
    crops = []
    for s in range(1, 21):
        for i in range(1, 11):
            img = load_image(orl_root / f"s{s}" / f"{i}.pgm")
            crops.append(align_face(img, det.detect(img)[0].landmarks))
    embs = rec.embed(np.stack(crops)).reshape(20, BATCH, rec.dim)
    path = tmp_path_factory.mktemp("emb") / "orl_sface.npy"
    np.save(path, embs)
    return path


# A writer: enrolls batch after batch (real embeddings with a little noise, so that every
# face is distinct) and prints each batch's tag once `enroll` has returned.
WRITER = textwrap.dedent("""
    import os, sys, time, zlib
    import numpy as np
    from fiqa_gate.gallery import Enrollment, Gallery
    path, tag, n, emb_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    go = sys.argv[5] if len(sys.argv) > 5 else None
    embs = np.load(emb_file, allow_pickle=False)
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    g = Gallery.create(path, "sface", 128, 0.383)
    while go and not os.path.exists(go):
        time.sleep(0.001)
    for b in range(n):
        e = embs[b % len(embs)] + rng.normal(0, 0.01, embs.shape[1:]).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        name = f"{tag}-{b}"
        g.enroll([Enrollment(name, v, f"{name}/{i}.pgm", 0.9) for i, v in enumerate(e)])
        print(name, flush=True)
""")


def writer(path: Path, tag: str, n: int, emb_file: Path, go: Path | None = None):
    args = [sys.executable, "-c", WRITER, str(path), tag, str(n), str(emb_file)]
    return subprocess.Popen(args + ([str(go)] if go else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_limit_memory)


def check_gallery(path: Path, committed: set[str] = frozenset(), damaged: bool = False) -> int:
    """The gallery opens; SQLite and FAISS agree on ids and vectors; batches are whole.
    Unless the test `damaged` it on purpose, an index file on disk is whole too."""
    import faiss

    g = Gallery.open(path)
    try:
        counts = g.identities()
        assert all(n == BATCH for n in counts.values()), counts  # wholly in or wholly out
        assert committed <= set(counts), committed - set(counts)  # acknowledged = durable
        ids, embs = g._all()
        index = g.index()
        assert index.ntotal == len(g) == len(ids) == sum(counts.values())
        assert sorted(faiss.vector_to_array(index.id_map).tolist()) == ids.tolist()
        for face_id, emb in zip(ids, embs, strict=True):
            assert np.array_equal(index.reconstruct(int(face_id)), emb)
        # an index file of the current generation is whole: the one the database recorded
        db = sqlite3.connect(path / "meta.sqlite")
        info = dict(db.execute("SELECT key, value FROM info"))
        db.close()
        current = path / f"index.{info['generation']}.faiss"
        if current.exists() and not damaged:
            assert hashlib.sha256(current.read_bytes()).hexdigest() == info["index_sha256"]
        assert len(list(path.glob(".index.*.tmp"))) <= 1  # a killed writer's, at most
        if len(g):
            hits = g.search(embs[:3], "sface", k=1)
            assert [h[0].face_id for h in hits] == ids[:3].tolist()
        return len(g)
    finally:
        g.close()


def test_enrollment_killed_at_random_moments_is_all_or_nothing(tmp_path, embeddings):
    path = tmp_path / "gallery"
    # a gallery with some history, so a kill can land in a transaction of real size
    g = Gallery.create(path, "sface", 128, 0.383)
    base = np.load(embeddings)
    for i in range(len(base)):
        g.enroll([Enrollment(f"base-{i}", v, f"base/{i}/{k}.pgm") for k, v in enumerate(base[i])])
    g.close()

    pick = random.Random(271828)
    committed: set[str] = set()
    kills = sizes = 0
    for round_ in range(24):
        proc = writer(path, f"r{round_}", 10_000, embeddings)
        # kill after 0-4 acknowledged batches, then 0-15 ms into whatever comes next
        for _ in range(pick.randint(0, 4)):
            line = proc.stdout.readline()
            if not line:
                break
            committed.add(line.strip())
        time.sleep(pick.uniform(0.0, 0.015))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        committed.update(line.strip() for line in proc.stdout.read().splitlines())
        err = proc.stderr.read()
        assert proc.returncode == -signal.SIGKILL, err  # it ends only by our hand
        sizes = check_gallery(path, committed)
    assert kills >= 20, kills
    # and the gallery still takes writes: a writer that is left alone finishes
    proc = writer(path, "final", 3, embeddings)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert check_gallery(path, committed | set(out.split())) == sizes + 3 * BATCH
    batches = (sizes - len(base) * BATCH) // BATCH
    (tmp_path / "gallery_kills.json").write_text(json.dumps(
        {"kills": kills, "batches_committed": batches, "acknowledged": len(committed)}))
    print(f"\ngallery survived {kills} SIGKILLs: {batches} batches committed, all whole; "
          f"the {len(committed)} acknowledged ones all present, {batches - len(committed)} "
          f"committed by a writer killed before it could say so")


READER = textwrap.dedent("""
    import os, sys, numpy as np
    from fiqa_gate.gallery import Gallery
    path, stop = sys.argv[1], sys.argv[2]
    checks, last = 0, 0
    q = np.ones((1, 128), np.float32) / np.sqrt(128)
    while not os.path.exists(stop) or checks == 0:
        g = Gallery.open(path)
        counts = g.identities()
        assert all(n == 10 for n in counts.values()), counts  # never half a batch
        n = sum(counts.values())
        assert n >= last, (n, last)  # never goes back
        index = g.index()
        assert index.ntotal >= n, (index.ntotal, n)
        hits = g.search(q, "sface", k=5)[0]  # (on this or a newer generation)
        assert len(hits) >= min(5, index.ntotal), (len(hits), index.ntotal)
        g.close()
        last, checks = n, checks + 1
    print(checks)
""")


def test_two_writers_and_a_reader_at_once_lose_nothing(tmp_path, embeddings):
    path = tmp_path / "gallery"
    Gallery.create(path, "sface", 128, 0.383).close()
    go, stop = tmp_path / "go", tmp_path / "stop"
    writers = {tag: writer(path, tag, 40, embeddings, go) for tag in ("left", "right")}
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_limit_memory)
    time.sleep(1.0)  # both writers have opened the gallery and wait for the start
    go.touch()
    acknowledged = set()
    for proc in writers.values():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        acknowledged |= set(out.split())
    stop.touch()
    out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err[-3000:]
    assert len(acknowledged) == 80
    assert check_gallery(path, acknowledged) == 80 * BATCH
    # the writers really ran at the same time: their batches interleave in commit order
    db = sqlite3.connect(path / "meta.sqlite")
    order = [row[0].split("-")[0] for row in db.execute(
        "SELECT identity FROM faces GROUP BY identity ORDER BY MIN(id)")]
    db.close()
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches >= 2, order
    print(f"\ntwo writers, 80 batches, {switches} interleavings, nothing lost; "
          f"the reader checked {out.strip()} snapshots")


def test_two_enroll_commands_at_once_lose_nothing(tmp_path, orl_root):
    """`fiqa-gate enroll` twice at once into one gallery (real SFace): both complete."""
    from PIL import Image

    folders = []
    for part, people in (("a", range(21, 26)), ("b", range(26, 31))):
        for s in people:
            d = tmp_path / part / f"s{s}"
            d.mkdir(parents=True)
            for i in range(1, 11):
                face = Image.open(orl_root / f"s{s}" / f"{i}.pgm").convert("RGB")
                face.resize((112, 112)).save(d / f"{i}.png")
        folders.append(tmp_path / part)
    gallery = tmp_path / "gallery"
    script = Path(sys.executable).with_name("fiqa-gate")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "fiqa_gate"]
    procs = [subprocess.Popen([*cmd, "enroll", str(f), "--index", str(gallery), "--no-gate",
                               "--aligned", "-o", str(tmp_path / f"{f.name}.csv")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for f in folders]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    assert check_gallery(gallery) == 100
    g = Gallery.open(gallery)
    assert g.identities() == {f"s{s}": 10 for s in range(21, 31)}
    g.close()


# -- damaged files --------------------------------------------------------------------------
CORRUPTION = textwrap.dedent("""
    import hashlib, json, os, random, shutil, sys
    import numpy as np
    from fiqa_gate.errors import GalleryError
    from fiqa_gate.gallery import Gallery
    good, work, what, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    r = random.Random(seed)
    outcomes = {}
    for trial in range(int(sys.argv[5])):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(good, work)
        name = "meta.sqlite" if what == "db" else next(
            f for f in os.listdir(work) if f.startswith("index.") and f.endswith(".faiss"))
        p = os.path.join(work, name)
        data = bytearray(open(p, "rb").read())
        kind = r.choice(["flip", "truncate", "page"])
        if kind == "flip":
            for _ in range(r.randint(1, 8)):
                i = r.randrange(len(data)) if r.random() < 0.5 else r.randrange(min(128, len(data)))
                data[i] ^= 1 << r.randrange(8)
        elif kind == "truncate":
            data = data[: r.randrange(len(data))]
        else:
            at = r.randrange(0, len(data), 4096) if what == "db" else r.randrange(len(data))
            data[at:at + 4096] = r.randbytes(min(4096, len(data) - at))
        open(p, "wb").write(bytes(data))
        try:
            g = Gallery.open(work)
            n = len(g)
            index = g.index()
            ids, embs = g._all()
            assert index.ntotal == n == len(ids), (index.ntotal, n)
            if what == "index":  # the index is exactly the database's faces again
                for face_id, emb in zip(ids, embs):
                    assert np.array_equal(index.reconstruct(int(face_id)), emb), face_id
            if n:
                g.search(embs[:2], "sface", k=3)
            g.close()
            outcome = "consistent"
        except GalleryError as exc:
            outcome = "GalleryError"
            assert str(exc).startswith(work), exc
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # this process's own peak: ru_maxrss would also count the pytest process it forked from
    rss = next(int(line.split()[1]) for line in open("/proc/self/status")
               if line.startswith("VmHWM:")) // 1024
    print(json.dumps({"outcomes": outcomes, "peak_rss_mb": rss}))
""")


@pytest.fixture(scope="module")
def good_gallery(tmp_path_factory, embeddings) -> Path:
    path = tmp_path_factory.mktemp("good") / "gallery"
    g = Gallery.create(path, "sface", 128, 0.383)
    embs = np.load(embeddings)
    for i in range(len(embs)):
        g.enroll([Enrollment(f"s{i + 1}", v, f"s{i + 1}/{k}.pgm") for k, v in enumerate(embs[i])])
    g._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in meta.sqlite itself
    g.close()
    return path


@pytest.mark.parametrize(("what", "trials"), [("index", 40), ("db", 40)])
def test_damaged_gallery_files_are_rebuilt_or_refused_never_a_crash(good_gallery, tmp_path,
                                                                     what, trials):
    """Bit flips, truncation and garbage pages in the index (derived: rebuilt, never
    parsed) and in the database (the truth: refused with a GalleryError, or fine)."""
    done = subprocess.run([sys.executable, "-c", CORRUPTION, str(good_gallery),
                           str(tmp_path / "work"), what, "7", str(trials)],
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=_limit_memory)
    assert done.returncode == 0, done.stderr[-3000:]  # no segfault, no other exception
    result = json.loads(done.stdout)
    assert sum(result["outcomes"].values()) == trials
    if what == "index":
        assert result["outcomes"] == {"consistent": trials}  # always rebuilt
    assert result["peak_rss_mb"] < 1024, result  # a damaged header allocates nothing
    print(f"\n{what}: {trials} damaged copies -> {result}")


def test_garbage_files_and_the_command_line(good_gallery, tmp_path):
    import shutil

    path = tmp_path / "gallery"
    shutil.copytree(good_gallery, path)
    n = check_gallery(path)
    # garbage index: rebuilt from the database
    for f in path.glob("index.*.faiss"):
        f.write_bytes(b"\x00garbage" * 1000)
    assert check_gallery(path, damaged=True) == n
    # another gallery's valid index file in its place: not trusted, rebuilt
    other = tmp_path / "other"
    g = Gallery.create(other, "sface", 128, 0.383)
    g.enroll([Enrollment("x", np.eye(128, dtype=np.float32)[0], "x.pgm")])
    g.close()
    (idx,) = path.glob("index.*.faiss")
    shutil.copy(next(other.glob("index.*.faiss")), idx)
    assert check_gallery(path, damaged=True) == n
    # garbage database: a clear error, from the API and from the command line
    (path / "meta.sqlite").write_bytes(b"SQLite format 2\x00 but really not" * 100)
    with pytest.raises(GalleryError, match="corrupt"):
        Gallery.open(path)
    with pytest.raises(GalleryError, match="corrupt"):
        Gallery.create(path, "sface", 128, 0.383)
    script = Path(sys.executable).with_name("fiqa-gate")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "fiqa_gate"]
    for args in (["search", str(tmp_path / "x.pgm"), "--index", str(path)],
                 ["enroll", str(tmp_path / "people"), "--index", str(path), "--no-gate"]):
        (tmp_path / "people" / "p").mkdir(parents=True, exist_ok=True)
        done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "corrupt" in done.stderr
