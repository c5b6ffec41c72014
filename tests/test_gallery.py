"""The FAISS + SQLite gallery with real SFace embeddings of ORL faces."""

from __future__ import annotations

import contextlib
import os
import shutil

import numpy as np
import pytest

from fiqa_gate import registry
from fiqa_gate.errors import GalleryError
from fiqa_gate.faces import align_face
from fiqa_gate.gallery import Enrollment, Gallery
from fiqa_gate.images import load_image


@pytest.fixture(scope="module")
def orl_embeddings(orl_root):
    """SFace embeddings of s31-s36, images 1-10: {identity: [10 x 128]}."""
    det, rec = registry.get_detector("yunet"), registry.get_recognizer("sface")
    out = {}
    for s in range(31, 37):
        crops = []
        for i in range(1, 11):
            img = load_image(orl_root / f"s{s}" / f"{i}.pgm")
            crops.append(align_face(img, det.detect(img)[0].landmarks))
        out[f"s{s}"] = rec.embed(np.stack(crops))
    return out


def _enroll_first_five(gallery, embs):
    for ident, e in embs.items():
        gallery.enroll([Enrollment(ident, e[i], f"{ident}/{i + 1}.pgm", 0.9) for i in range(5)])


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF2,Flat"])
def test_enroll_search_persist(tmp_path, orl_embeddings, factory):
    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383, factory)
    _enroll_first_five(g, orl_embeddings)
    assert len(g) == 30 and g.identities() == {f"s{s}": 5 for s in range(31, 37)}
    probes = np.concatenate([e[5:] for e in orl_embeddings.values()])
    truth = [ident for ident in orl_embeddings for _ in range(5)]
    hits = g.search(probes, "sface", k=3)
    rank1 = np.mean([h[0].identity == t for h, t in zip(hits, truth, strict=True)])
    assert rank1 >= 0.95
    assert all(h[0].match for h in hits if h[0].similarity >= 0.383)
    g.close()
    again = Gallery.open(tmp_path / "g")  # reload from disk
    hits2 = again.search(probes, "sface", k=3)
    assert [h[0].face_id for h in hits2] == [h[0].face_id for h in hits]


def test_remove_identity(tmp_path, orl_embeddings):
    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    _enroll_first_five(g, orl_embeddings)
    assert g.remove_identity("s31") == 5
    hits = g.search(orl_embeddings["s31"][5:], "sface", k=1)
    assert all(h[0].identity != "s31" for h in hits)
    assert "s31" not in Gallery.open(tmp_path / "g").identities()


def test_remove_sources_removes_only_those_faces(tmp_path, orl_embeddings):
    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    _enroll_first_five(g, orl_embeddings)
    total = len(g)
    one = sorted(g.sources("s31"))[0]
    # the same source under another identity is another face, and is kept
    assert g.remove_sources([("s31", one), ("s32", one), ("s31", "never-enrolled")]) == 1
    assert one not in g.sources("s31") and len(g.sources("s31")) == 4
    assert len(g) == total - 1 and g.remove_sources([]) == 0
    hits = g.search(orl_embeddings["s31"][:1], "sface", k=total)[0]
    assert len(hits) == total - 1  # the index was rebuilt without it
    assert len(Gallery.open(tmp_path / "g")) == total - 1


def test_other_recognizer_refused(tmp_path, orl_embeddings):
    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    _enroll_first_five(g, orl_embeddings)
    with pytest.raises(GalleryError, match="cannot be searched"):
        g.search(orl_embeddings["s31"][:1], "dlib")
    with pytest.raises(GalleryError, match="built with recognizer"):
        Gallery.create(tmp_path / "g", "dlib", 128, 0.93)


def test_stale_or_missing_index_is_rebuilt(tmp_path, orl_embeddings):
    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    _enroll_first_five(g, orl_embeddings)
    for f in (tmp_path / "g").glob("index.*.faiss"):
        f.write_bytes(b"garbage")  # a damaged derived file
    g2 = Gallery.open(tmp_path / "g")
    assert g2.index().ntotal == 30
    for f in (tmp_path / "g").glob("index.*.faiss"):
        f.unlink()
    assert Gallery.open(tmp_path / "g").index().ntotal == 30


def test_a_rebuilt_index_is_saved_so_the_next_search_loads_it(tmp_path, orl_embeddings,
                                                              caplog):
    # a missing index file was rebuilt from the database at every search, without a word:
    # seconds each for a large gallery (audit of 2026-12-08)
    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    _enroll_first_five(g, orl_embeddings)
    g.close()
    (index_file,) = (tmp_path / "g").glob("index.*.faiss")
    index_file.unlink()
    with caplog.at_level("WARNING"), contextlib.closing(Gallery.open(tmp_path / "g")) as g:
        assert g.index().ntotal == 30
    assert f"{index_file.name} missing or damaged; rebuilt from the database and saved " \
        "again" in caplog.text
    assert index_file.is_file()
    caplog.clear()
    with caplog.at_level("WARNING"), contextlib.closing(Gallery.open(tmp_path / "g")) as g:
        assert g._load_index_file(g.generation(), g._db.execute(
            "SELECT value FROM info WHERE key='index_sha256'").fetchone()[0]) is not None
        hits = g.search(orl_embeddings["s33"][5:6], "sface", k=1)
    assert hits[0][0].identity == "s33" and caplog.text == ""


def test_corrupt_database_is_a_clear_error(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "meta.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(GalleryError, match="corrupt"):
        Gallery.open(tmp_path / "g")


def test_bad_factory_and_dimension(tmp_path):
    with pytest.raises(GalleryError, match="factory"):
        Gallery.create(tmp_path / "g", "sface", 128, 0.383, "NoSuchIndex")
    g = Gallery.create(tmp_path / "h", "sface", 128, 0.383)
    with pytest.raises(GalleryError, match="shape"):
        g.enroll([Enrollment("x", np.zeros(64, np.float32), "x.jpg")])
    # built by FAISS, yet it refuses every face added: refused before a folder is made
    # (it had made a gallery that failed each file and kept its factory; audit 2026-12-08)
    for factory in ("IDMap,Flat", "IDMap,IVF2,Flat", "IDMap2,Flat"):
        with pytest.raises(GalleryError, match="cannot hold a gallery's faces"):
            Gallery.create(tmp_path / "i", "sface", 128, 0.383, factory)
        assert not (tmp_path / "i").exists()


def test_many_processes_opening_a_gallery_from_before_fingerprints_at_once(tmp_path,
                                                                          orl_embeddings):
    # each added the new column; all but one said the gallery was corrupt (third audit
    # of 2026-12-08)
    import sqlite3
    import subprocess
    import sys
    import time

    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    g.enroll([Enrollment("s31", orl_embeddings["s31"][0], "1.pgm")])
    g.close()
    with sqlite3.connect(tmp_path / "g" / "meta.sqlite") as db:
        db.execute("ALTER TABLE faces DROP COLUMN fingerprint")
    # imports take each process a different time: all open at once, after a start signal
    go = tmp_path / "go"
    code = ("import os, sys, time; from fiqa_gate.gallery import Gallery\n"
            "open(sys.argv[1] + '.ready.' + sys.argv[2], 'w').close()\n"
            "while not os.path.exists(sys.argv[1]): time.sleep(0.0005)\n"
            f"g = Gallery.open({str(tmp_path / 'g')!r})\n"
            "print(len(g))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(go), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready.*"))) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["1"] * 8


def test_a_read_only_database_is_said_to_be_read_only_not_corrupt(tmp_path, orl_embeddings):
    import subprocess
    import sys

    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    g.enroll([Enrollment("s31", orl_embeddings["s31"][0], "1.pgm")])
    g.close()
    (tmp_path / "g" / "meta.sqlite").chmod(0o444)
    code = ("import sys; from fiqa_gate.gallery import Gallery\n"
            f"Gallery.create({str(tmp_path / 'g')!r}, 'sface', 128, 0.383)")
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # as root the mode bits do not apply: drop that capability
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv to drop root's file capabilities")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "cannot write to this gallery" in done.stderr and "corrupt" not in done.stderr, \
        done.stderr[-2000:]
    # it is searched, and leaves no -wal or -shm beside the database (it had left both)
    search = (f"import numpy as np; from fiqa_gate.gallery import Gallery\n"
              f"g = Gallery.open({str(tmp_path / 'g')!r})\n"
              f"print(g.search(np.load({str(tmp_path / 'probe.npy')!r}), 'sface', k=1)"
              "[0][0].identity); g.close()")
    np.save(tmp_path / "probe.npy", orl_embeddings["s31"][1:2])
    done = subprocess.run([*cmd[:-1], search], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "s31", done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == \
        ["index.1.faiss", "lock", "meta.sqlite"]


def test_embeddings_are_compared_by_cosine_whatever_their_length(tmp_path, orl_embeddings,
                                                                 caplog):
    # One raw embedding (norm 10) had "matched" strangers at similarity 2.4, and a NaN one
    # was stored (audit of 2026-12-07): rows are stored and searched at length 1.
    import threading

    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    _enroll_first_five(g, {k: v for k, v in orl_embeddings.items() if k != "s34"})
    g.enroll([Enrollment("s34", 10 * e, f"s34/{i}.pgm") for i, e in
              enumerate(orl_embeddings["s34"][:5])], "sface")
    strangers = np.concatenate([orl_embeddings[k][5:] for k in ("s31", "s32", "s33")])
    found = g.search(3 * strangers, "sface", k=1)
    assert [h[0].identity for h in found] == ["s31"] * 5 + ["s32"] * 5 + ["s33"] * 5
    assert all(h[0].similarity <= 1 + 1e-5 for h in found)
    assert g.search(orl_embeddings["s34"][5:], "sface", k=1)[0][0].identity == "s34"
    for bad in (np.full(128, np.nan, np.float32), np.zeros(128, np.float32)):
        with pytest.raises(GalleryError, match="NaN or inf, or is all zeros"):
            g.enroll([Enrollment("ghost", bad, "ghost.jpg")])
        with pytest.raises(GalleryError, match="NaN or inf, or is all zeros"):
            g.search(bad, "sface")
    assert "ghost" not in g.identities()
    for k in (0, -1, 2.5):
        with pytest.raises(GalleryError, match="k must be a whole number"):
            g.search(strangers[:1], "sface", k=k)
    with pytest.raises(GalleryError, match=r"got shape \(1, 2, 128\)"):
        g.search(strangers[None, :2], "sface")
    with pytest.raises(GalleryError, match="holds 'sface' embeddings"):
        g.enroll([Enrollment("s35", orl_embeddings["s35"][0], "x.pgm")], "dlib")
    # another thread, or after close: a misuse, not a corrupt database
    caught: list[str] = []

    def elsewhere() -> None:
        try:
            g.search(strangers[:1], "sface")
        except GalleryError as exc:
            caught.append(str(exc))

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join()
    assert len(caught) == 1 and "open one per thread" in caught[0]
    g.close()
    with pytest.raises(GalleryError, match="until close"):
        g.identities()
    # created again with other settings: the dimension is refused, the rest kept and said
    with pytest.raises(GalleryError, match=r"\(128-D\), not 'sface' \(512-D\)"):
        Gallery.create(tmp_path / "g", "sface", 512, 0.383)
    with caplog.at_level("WARNING"):
        again = Gallery.create(tmp_path / "g", "sface", 128, 0.3, "HNSW32")
    assert again.threshold == 0.383 and again.factory == "Flat"
    assert "keeps the threshold 0.383 (not 0.3) and index 'Flat' (not 'HNSW32')" in caplog.text
    again.close()
    caplog.clear()
    with caplog.at_level("WARNING"):  # no index type asked for: nothing to say
        Gallery.create(tmp_path / "g", "sface", 128, 0.383).close()
    assert "keeps" not in caplog.text


def test_raw_rows_an_older_version_stored_are_compared_by_cosine(tmp_path, orl_embeddings,
                                                                 caplog):
    import sqlite3
    from decimal import Decimal

    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    _enroll_first_five(g, orl_embeddings)
    g.enroll([Enrollment("s31", list(orl_embeddings["s31"][9]), "list.pgm", np.float32(0.7)),
              Enrollment("s31", orl_embeddings["s31"][8], "dec.pgm", Decimal("0.5"))])
    g.close()
    db = sqlite3.connect(tmp_path / "g" / "meta.sqlite")
    assert {r[0] for r in db.execute("SELECT typeof(score) FROM faces")} == {"real"}
    for face_id, blob in db.execute("SELECT id, embedding FROM faces").fetchall():
        db.execute("UPDATE faces SET embedding = ? WHERE id = ?",
                   ((7 * np.frombuffer(blob, np.float32)).tobytes(), face_id))
    db.commit()
    db.close()
    for f in (tmp_path / "g").glob("index.*"):
        f.unlink()
    g = Gallery.open(tmp_path / "g")
    hits = g.search(orl_embeddings["s33"][7], "sface", k=np.int64(3))[0]
    assert len(hits) == 3 and hits[0].identity == "s33"
    assert all(h.similarity <= 1 + 1e-5 for h in hits)
    g.close()
    # a zero row an older version let in is left out of searches, not a block on writes
    db = sqlite3.connect(tmp_path / "g" / "meta.sqlite")
    db.execute("UPDATE faces SET embedding = ? WHERE id = 1",
               (np.zeros(128, np.float32).tobytes(),))
    db.commit()
    db.close()
    for f in (tmp_path / "g").glob("index.*"):
        f.unlink()
    g = Gallery.open(tmp_path / "g")
    with caplog.at_level("WARNING"):
        g.enroll([Enrollment("s36", orl_embeddings["s36"][9], "new.pgm")])
    assert "1 stored faces have an embedding of NaN, inf or zeros and are never a hit " \
        "(face ids 1)" in caplog.text
    # not even for a query every real face is far from, which a zero row would top
    assert all(h.face_id != 1 for h in g.search(-orl_embeddings["s31"][0], "sface",
                                                  k=40)[0])
    g.close()
    # the index file written with it holds every face, so an open uses it, quietly
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = Gallery.open(tmp_path / "g")
        assert again.index().ntotal == len(again) == 33
    assert "never a hit" not in caplog.text


def test_a_trained_index_type_enrolls_before_it_has_enough_faces_to_train(tmp_path,
                                                                          orl_embeddings):
    import faiss

    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383, "IVF16,Flat")
    g.enroll([Enrollment("s31", e, f"s31/{i}.pgm", 0.9)
              for i, e in enumerate(orl_embeddings["s31"][:5])])  # 5 faces, 16 lists
    assert len(g) == 5 and isinstance(faiss.downcast_index(g.index().index), faiss.IndexFlat)
    _enroll_first_five(g, {k: v for k, v in orl_embeddings.items() if k != "s31"})
    assert len(g) == 30
    assert isinstance(faiss.downcast_index(g.index().index), faiss.IndexIVFFlat)
    enrolled = np.concatenate([e[:5] for e in orl_embeddings.values()])
    assert all(h[0].similarity == pytest.approx(1.0, abs=1e-5)
               for h in g.search(enrolled, "sface", k=1))


def test_enrolling_a_source_again_under_its_identity_keeps_one_face(tmp_path, orl_embeddings):
    # what two enroll runs racing on one folder do: each saw the file as new
    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    first = g.enroll([Enrollment("s31", orl_embeddings["s31"][0], "s31/1.pgm", 0.9)])
    again = g.enroll([Enrollment("s31", orl_embeddings["s31"][0], "s31/1.pgm", 0.9),
                      Enrollment("s32", orl_embeddings["s32"][0], "s31/1.pgm", 0.9)])
    assert again[0] == first[0] and again[1] != first[0]  # another identity is another face
    assert len(g) == 2


def test_an_empty_gallery_path_is_refused():
    with pytest.raises(GalleryError, match="path is empty"):
        Gallery.create("", "sface", 128, 0.383)


def test_an_ivf_gallery_finds_what_a_flat_one_finds(tmp_path, orl_embeddings):
    galleries = {f: Gallery.create(tmp_path / f.replace(",", "_"), "sface", 128, 0.383, f)
                 for f in ("Flat", "IVF4,Flat")}
    for g in galleries.values():
        _enroll_first_five(g, orl_embeddings)  # 30 faces: the IVF trains on the fly
    probes = np.concatenate([e[5:] for e in orl_embeddings.values()])
    flat, ivf = (g.search(probes, "sface", k=10) for g in galleries.values())
    assert all(len(h) == 10 for h in ivf)  # it probed more than one of its four lists
    assert [[x.face_id for x in h] for h in ivf] == [[x.face_id for x in h] for h in flat]
    again = Gallery.open(tmp_path / "IVF4_Flat")  # nprobe is not stored with the index
    assert [[x.face_id for x in h] for h in again.search(probes, "sface", k=10)] == \
        [[x.face_id for x in h] for h in flat]


def test_a_gallery_on_read_only_media_is_searched_and_refuses_writes(tmp_path,
                                                                      orl_embeddings):
    # A gallery shipped in a container image or on a read-only mount: SQLite's WAL would
    # need to write beside the database to read it, which read the gallery as corrupt.
    import shutil
    import subprocess

    from conftest import small_filesystem

    with small_filesystem(tmp_path / "media", "4m") as media:
        g = Gallery.create(media / "g", "sface", 128, 0.383)
        _enroll_first_five(g, orl_embeddings)
        # copied while open: its WAL holds committed faces that SQLite's immutable
        # reading would not see
        g.enroll([Enrollment("late", orl_embeddings["s31"][9], "late.pgm", 0.9)])
        shutil.copytree(media / "g", media / "copied-while-open")
        g.close()
        for f in (media / "g").glob("index.*.faiss"):  # a reader rebuilds it in memory
            f.unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        g = Gallery.open(media / "g")
        hits = g.search(orl_embeddings["s33"][5:6], "sface", k=1)
        assert len(g) == 31 and hits[0][0].identity == "s33"
        g.close()
        with pytest.raises(GalleryError, match="cannot write to this gallery: Read-only"):
            Gallery.create(media / "g", "sface", 128, 0.383)
        assert (media / "copied-while-open" / "meta.sqlite-wal").stat().st_size
        copied = Gallery.open(media / "copied-while-open")
        assert len(copied) == 31 and copied.identities()["late"] == 1
        assert copied.search(orl_embeddings["s31"][9:10], "sface", k=1)[0][0].identity \
            == "late"
        from fiqa_gate.gallery import _scratch

        private = _scratch[id(copied._db)]
        copied.close()
        assert not private.exists()  # the private copy goes with the gallery


def test_a_folder_with_other_files_or_a_lost_database_is_not_adopted(tmp_path, orl_embeddings):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.2024.faiss").write_bytes(b"a user's own index")
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(GalleryError, match="nothing was changed"):
        Gallery.create(mine, "sface", 128, 0.34)
    (mine / "index.2024.faiss").rename(mine / "old.faiss")
    with pytest.raises(GalleryError, match=r"holds other files \(notes.txt, old.faiss\)"):
        Gallery.create(mine, "sface", 128, 0.34)
    (mine / "old.faiss").rename(mine / "index.2024.faiss")
    assert sorted(p.name for p in mine.iterdir()) == ["index.2024.faiss", "notes.txt"]
    # a gallery whose database was lost (emptied, deleted): its index is not overwritten
    g = Gallery.create(tmp_path / "g", "sface", 128, 0.34)
    _enroll_first_five(g, orl_embeddings)
    g.close()
    index = next((tmp_path / "g").glob("index.*.faiss"))
    data = index.read_bytes()
    for lose in ("empty", "missing"):
        db = tmp_path / "g" / "meta.sqlite"
        db.write_bytes(b"") if lose == "empty" else db.unlink(missing_ok=True)
        with pytest.raises(GalleryError, match=f"database meta.sqlite is {lose}"):
            Gallery.create(tmp_path / "g", "sface", 128, 0.34)
        assert index.read_bytes() == data
    # a hidden file (.DS_Store) is no obstacle, and a file named like an index but not
    # a generation of this gallery is never deleted
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".DS_Store").write_bytes(b"x")
    g = Gallery.create(fresh, "sface", 128, 0.34)
    (fresh / "index.backup.faiss").write_bytes(b"keep")
    _enroll_first_five(g, orl_embeddings)
    assert (fresh / "index.backup.faiss").read_bytes() == b"keep" and len(g) == 30
    g.close()


RACE = """
import multiprocessing as mp, sys
from fiqa_gate.gallery import Gallery

def make(path, results):
    try:
        Gallery.create(path, "sface", 128, 0.34).close()
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")

if __name__ == "__main__":
    refused = []
    for i in range(30):
        results = mp.Queue()
        procs = [mp.Process(target=make, args=(f"{sys.argv[1]}/g{i}", results))
                 for _ in range(2)]
        [p.start() for p in procs]
        [p.join() for p in procs]
        refused += [r for r in (results.get(), results.get()) if r != "ok"]
    print(refused)
"""


def test_enrolls_creating_one_new_gallery_at_once_all_succeed(tmp_path):
    # the adoption check had seen the other writer's half-made database (an empty
    # meta.sqlite beside its -journal) and refused a gallery being made: 8 of 60 here
    # (audit 2026-12-07)
    import subprocess
    import sys

    script = tmp_path / "race.py"
    script.write_text(RACE)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "race")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_moved_face_is_new_to_a_run_that_listed_before_the_move(tmp_path, orl_embeddings):
    # a concurrent `enroll --prune` that listed the folder before another run moved a
    # face there took the moved face as stale and removed it (audit 2026-12-07)
    import time

    g = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    emb = orl_embeddings["s31"][0]
    (face_id,) = g.enroll([Enrollment("p1", emb, str(tmp_path / "p1" / "x.pgm"))], "sface")
    listed_at = time.time()
    time.sleep(0.01)
    assert g.enroll([Enrollment("z", emb, str(tmp_path / "z" / "x.pgm"))], "sface",
                    gone=lambda source: True) == [face_id]
    assert g.moved == {face_id: ("p1", str(tmp_path / "p1" / "x.pgm"))}
    assert g.remove_sources([("z", str(tmp_path / "z" / "x.pgm"))], before=listed_at) == 0
    assert g.sources("z") == {str(tmp_path / "z" / "x.pgm")} and len(g) == 1
    # a twin whose picture is still there is another picture: a face of its own
    (other,) = g.enroll([Enrollment("q", emb, str(tmp_path / "q" / "x.pgm"))], "sface",
                        gone=lambda source: False)
    assert other != face_id and len(g) == 2
    g.close()


def test_an_item_another_writer_enrolled_meanwhile_is_reported_as_existing(tmp_path,
                                                                          orl_embeddings):
    # two enrolls of one folder at once both said they had enrolled every face (gallery
    # audit of 2026-12-08): the second finds them under the lock and says so
    first = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    second = Gallery.create(tmp_path / "g", "sface", 128, 0.383)
    items = [Enrollment("s31", orl_embeddings["s31"][i], f"s31/{i}.pgm") for i in range(3)]
    ids = first.enroll(items)
    assert first.existing == set()
    more = [*items, Enrollment("s31", orl_embeddings["s31"][5], "new.pgm")]
    assert second.enroll(more)[:3] == ids
    assert second.existing == set(ids) and len(second) == 4
    first.close()
    second.close()


def test_a_write_the_system_refuses_is_not_called_corrupt(tmp_path):
    # under a file-size limit (ulimit -f) SQLite says "disk I/O error", and the gallery
    # was reported "corrupt or unreadable" (audit of 2026-12-08)
    import resource
    import subprocess
    import sys

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (30 * 1024, 30 * 1024))

    code = ("import sys; from fiqa_gate.gallery import Gallery\n"
            "Gallery.create(sys.argv[1], 'sface', 128, 0.383)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g")],
                          capture_output=True, text=True, preexec_fn=limited, timeout=120)
    assert done.returncode != 0
    assert "could not be written (disk I/O error): a full disk, a file-size limit" in \
        done.stderr and "corrupt" not in done.stderr, done.stderr[-2000:]
    # nothing was lost: without the limit the same folder becomes a gallery
    Gallery.create(tmp_path / "g", "sface", 128, 0.383).close()
