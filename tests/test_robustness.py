"""Bad input never crashes a run, never changes an input; killed runs resume exactly.

The corpus is generated here (no opaque blobs in the repository) and fed to the real CLI
in subprocesses, with real YuNet and SFace.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCORER = ["--scorer", "sharpness"]  # the gate under test is the pipeline, not a model


def _png_bomb(path: Path, side: int = 200_000) -> None:
    """A valid PNG header that declares side x side pixels (40 Gpx) and no real data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def make_corpus(root: Path, orl_root: Path, sample_photo: Path) -> dict[str, Path]:
    """Every kind of bad (and a few good) inputs; returns name -> path."""
    root.mkdir(parents=True, exist_ok=True)
    face = Image.open(orl_root / "s35" / "1.pgm").convert("RGB")
    buf = io.BytesIO()
    face.save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    png_buf = io.BytesIO()
    face.save(png_buf, "PNG")
    png = png_buf.getvalue()
    c: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        (root / name).write_bytes(data)
        c[name] = root / name

    put("zero.jpg", b"")
    put("truncated.jpg", jpeg[: len(jpeg) // 2])
    put("truncated.png", png[: len(png) // 3])
    put("text.jpg", b"this is not an image, just a note\n")
    put("random.png", np.random.default_rng(0).bytes(4096))
    _png_bomb(root / "bomb.png")
    c["bomb.png"] = root / "bomb.png"
    Image.new("RGB", (1, 1)).save(root / "one_pixel.png")
    c["one_pixel.png"] = root / "one_pixel.png"
    Image.new("RGB", (20000, 20), (90, 90, 90)).save(root / "long_strip.png")
    c["long_strip.png"] = root / "long_strip.png"
    arr16 = (np.asarray(face.convert("L"), np.uint16) * 257)
    Image.fromarray(arr16).save(root / "sixteen_bit.png")
    c["sixteen_bit.png"] = root / "sixteen_bit.png"
    face.convert("CMYK").save(root / "cmyk.jpg", "JPEG")
    c["cmyk.jpg"] = root / "cmyk.jpg"
    pal = face.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(root / "palette.gif", transparency=0)
    c["palette.gif"] = root / "palette.gif"
    rgba = face.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(root / "rgba.png")
    c["rgba.png"] = root / "rgba.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    face.transpose(Image.Transpose.ROTATE_90).save(root / "exif_rotated.jpg", exif=exif)
    c["exif_rotated.jpg"] = root / "exif_rotated.jpg"
    frames = [face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], loop=0)
    c["animated.gif"] = root / "animated.gif"
    Image.new("RGB", (200, 160), (30, 120, 200)).save(root / "no_face.png")
    c["no_face.png"] = root / "no_face.png"
    put("many_faces.jpg", sample_photo.read_bytes())
    for i in (2, 3):
        put(f"good_{i}.pgm", (orl_root / "s36" / f"{i}.pgm").read_bytes())
    os.symlink(root / "good_2.pgm", root / "link_to_good.pgm")
    c["link_to_good.pgm"] = root / "link_to_good.pgm"
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    c["dangling.jpg"] = root / "dangling.jpg"
    (root / "loop").mkdir()
    os.symlink(root / "loop", root / "loop" / "again")  # a directory loop
    put("no_permission.jpg", jpeg)
    os.chmod(root / "no_permission.jpg", 0)
    weird = os.fsencode(str(root)) + b"/caf\xe9_\xff.jpg"  # not UTF-8
    with open(weird, "wb") as fh:
        fh.write(jpeg)
    c["non_utf8"] = Path(os.fsdecode(weird))
    return c


def digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) and not os.path.exists(p):
                out[p] = "dangling -> " + os.readlink(p)
                continue
            try:
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
            except PermissionError:
                out[p] = f"unreadable {os.stat(p).st_size} {os.stat(p).st_mtime_ns}"
    return out


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fiqa_gate", *args], capture_output=True,
                          timeout=timeout)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def corpus(tmp_path, orl_root, sample_photo):
    root = tmp_path / "inbox"
    c = make_corpus(root, orl_root, sample_photo)
    yield root, c
    os.chmod(root / "no_permission.jpg", 0o644)


def test_score_and_filter_survive_every_bad_input(corpus, tmp_path):
    root, c = corpus
    before = digests(root)
    files = {p for p in before if "/loop/" not in p}
    done = _run("score", str(root), "--output", str(tmp_path / "s.csv"), *SCORER)
    assert done.returncode == 1, done.stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in done.stderr
    rows = _rows(tmp_path / "s.csv")
    by_path: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    assert set(by_path) == files  # every file has a row, nothing else, loop walked once
    for name in ("zero.jpg", "truncated.jpg", "truncated.png", "text.jpg", "random.png",
                 "bomb.png", "one_pixel.png", "dangling.jpg", "no_face.png"):
        (row,) = by_path[str(c[name])]
        assert row["error"] and not row["score"], name
    if os.geteuid() != 0:  # root reads anything: the permission case only bites others
        assert by_path[str(c["no_permission.jpg"])][0]["error"]
    for name in ("good_2.pgm", "sixteen_bit.png", "cmyk.jpg", "palette.gif", "rgba.png",
                 "exif_rotated.jpg", "animated.gif", "link_to_good.pgm", "non_utf8"):
        rs = by_path[str(c[name])]
        assert rs and all(r["score"] and not r["error"] for r in rs), (name, rs)
    assert len(by_path[str(c["many_faces.jpg"])]) == 6

    out = tmp_path / "sorted"
    done = _run("filter", "--threshold", "0.5", str(root), "-o", str(tmp_path / "m.csv"),
                "--accepted-dir", str(out / "ok"), "--rejected-dir", str(out / "bad"), *SCORER)
    assert done.returncode == 1 and b"Traceback" not in done.stderr
    manifest = _rows(tmp_path / "m.csv")
    assert sorted(r["path"] for r in manifest) == sorted(files)
    assert digests(root) == before  # nothing changed, nothing removed
    copied = [r for r in manifest if r["copied_to"]]
    assert copied
    for r in copied:
        dest = r["copied_to"].rsplit(" (", 1)[0]
        assert digests(Path(dest).parent)[dest] == before[r["path"]]

    # stdout output with an undecodable name
    done = _run("score", str(c["non_utf8"]), *SCORER)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.fsencode(str(c["non_utf8"])) in done.stdout


def test_move_removes_only_what_was_copied(tmp_path, orl_root):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(1, 4):
        (src / f"{i}.pgm").write_bytes((orl_root / "s37" / f"{i}.pgm").read_bytes())
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    before = digests(src)
    done = _run("filter", str(src), "-o", str(tmp_path / "m.csv"), "--accepted-dir",
                str(tmp_path / "ok"), "--move", *SCORER, "--threshold", "0")
    assert b"Traceback" not in done.stderr
    rows = {r["path"]: r for r in _rows(tmp_path / "m.csv")}
    for path, digest in before.items():
        moved = "moved" in rows[path]["copied_to"]
        assert os.path.exists(path) != moved
        if moved:
            dest = rows[path]["copied_to"].rsplit(" (", 1)[0]
            assert hashlib.sha256(Path(dest).read_bytes()).hexdigest() == digest
    assert os.path.exists(src / "broken.jpg")  # failed, no target for it: kept


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


def test_file_vanishing_mid_run_is_a_row_not_a_crash(tmp_path, orl_root):
    from fiqa_gate.cli import main

    src = tmp_path / "in"
    src.mkdir()
    for i in range(1, 4):
        (src / f"{i}.pgm").write_bytes((orl_root / "s39" / f"{i}.pgm").read_bytes())
    # the walker lists 2.pgm, then it disappears before it is read
    import fiqa_gate.cli as cli_mod

    real_iter = cli_mod.iter_files

    def listing_then_delete(paths):
        files = list(real_iter(paths))
        os.unlink(src / "2.pgm")
        return files

    cli_mod.iter_files = listing_then_delete
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["score", str(src), "--output", str(tmp_path / "s.csv"), *SCORER])
    finally:
        cli_mod.iter_files = real_iter
    assert exit_info.value.code == 1
    rows = {r["path"]: r for r in _rows(tmp_path / "s.csv")}
    assert len(rows) == 3 and rows[str(src / "2.pgm")]["error"]


def test_sigkill_then_resume_scores_every_file_exactly_once(tmp_path, orl_root):
    """Killed at random moments (fixed seed) and resumed until done: no row lost or doubled."""
    src = tmp_path / "crops"
    src.mkdir()
    rng = np.random.default_rng(1)
    base = np.asarray(Image.open(orl_root / "s40" / "1.pgm").convert("RGB").resize((112, 112)))
    for i in range(300):
        noisy = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(src / f"{i:03d}.png")
    out = tmp_path / "m.csv"
    cmd = [sys.executable, "-m", "fiqa_gate", "filter", str(src), "--aligned", "-o", str(out),
           "--resume", *SCORER]
    pick = random.Random(1234)
    kills = 0

    def lines() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    for _ in range(12):
        # kill once a random number of further rows has been written (mid-write included)
        target = lines() + pick.randint(1, 20)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and lines() < target:
            time.sleep(0.002)
        time.sleep(pick.uniform(0, 0.01))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = subprocess.run(cmd, capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    rows = _rows(out)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(str(p) for p in src.iterdir())  # each once, none missing
    assert all(r["decision"] in ("accept", "reject") for r in rows)  # no torn rows
    assert kills >= 10, f"only {kills} runs were killed mid-way; the test proved little"
    print(f"\nmanifest survived {kills} SIGKILLs")
