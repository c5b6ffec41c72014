"""The image loader on real and deliberately broken files (all generated here)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fiqa_gate.errors import ImageLoadError
from fiqa_gate.images import iter_files, load_image


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_orl_pgm_is_rgb(orl_root):
    arr = load_image(orl_root / "s1" / "1.pgm")
    assert arr.shape == (112, 92, 3) and arr.dtype == np.uint8
    assert (arr[..., 0] == arr[..., 1]).all()  # grey expanded to RGB


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_modes_become_rgb(tmp_path, mode):
    base = Image.new("RGB", (40, 30), (200, 10, 10))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(
        (np.arange(1200).reshape(30, 40) * 50).astype(np.uint16))
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    path = _save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    arr = load_image(path)
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8


def test_sixteen_bit_keeps_contrast(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    arr = load_image(_save(Image.fromarray(ramp), tmp_path / "r.png"))
    assert arr.min() == 0 and arr.max() == 255


def test_alpha_composited_on_white(tmp_path):
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert (load_image(_save(img, tmp_path / "a.png")) == 255).all()


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = _save(img, tmp_path / "r.jpg", exif=exif)
    assert load_image(path).shape == (60, 20, 3)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is text, not a JPEG", "not an image"),
    (os.urandom(2048), "not an image"),
])
def test_bad_bytes(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    assert reason in err.value.reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(
        buf, format=fmt)
    path = tmp_path / f"t.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"truncated|corrupt"):
        load_image(path)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = _save(Image.new("1", (20000, 20000)), tmp_path / "bomb.png")
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(path)


def test_tiny_and_missing(tmp_path):
    with pytest.raises(ImageLoadError, match="too small"):
        load_image(_save(Image.new("RGB", (1, 1)), tmp_path / "one.png"))
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "gone.jpg")


def test_walk_lists_every_file_once_and_survives_loops(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.jpg", "a/b/2.png", "a/notes.txt", "top.gif"):
        (tmp_path / name).write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.jpg")
    files = list(iter_files([tmp_path]))
    names = sorted(os.path.relpath(f, tmp_path) for f in files)
    assert names == ["a/1.jpg", "a/b/2.png", "a/notes.txt", "dangling.jpg", "top.gif"]


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.jpg"
    path.write_bytes(data)
    try:
        arr = load_image(path)
    except ImageLoadError as exc:
        assert exc.reason
    else:
        assert arr.ndim == 3 and arr.shape[2] == 3


def test_a_named_pipe_fails_at_once_instead_of_blocking(tmp_path):
    # open() on a FIFO waits for a writer: one stray pipe among the pictures hung enroll
    fifo = tmp_path / "2.pgm"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo)
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def _sideways_face_with_odd_exif(orl_root: Path, path: Path) -> Path:
    """A sideways face, EXIF orientation 6, whose GPS block stores GPSVersionID as text
    (4 ASCII bytes) instead of 4 BYTEs: a camera-app quirk that Pillow reads but cannot
    write back, which ImageOps.exif_transpose tries to do."""
    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack(">HHI", tag, kind, count) + value

    gps_at = 8 + 2 + 12 * 2 + 4
    ifd0 = (struct.pack(">H", 2) + entry(0x0112, 3, 1, struct.pack(">HH", 6, 0))
            + entry(0x8825, 4, 1, struct.pack(">I", gps_at)) + struct.pack(">I", 0))
    gps = struct.pack(">H", 1) + entry(0x0000, 2, 4, b"2.2\x00") + struct.pack(">I", 0)
    blob = b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 8) + ifd0 + gps
    face = Image.open(orl_root / "s1" / "1.pgm").convert("RGB")
    face.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=blob)
    return path


def test_malformed_exif_still_turns_the_face_upright(tmp_path, orl_root):
    path = _sideways_face_with_odd_exif(orl_root, tmp_path / "phone.jpg")
    with Image.open(path) as img:
        assert img.size == (112, 92) and img.getexif()[0x0112] == 6
    arr = load_image(path)
    upright = np.asarray(Image.open(orl_root / "s1" / "1.pgm").convert("RGB"), np.float64)
    assert arr.shape == (112, 92, 3)
    assert np.abs(arr - upright).mean() < 4  # the same face, upright (JPEG noise only)


@pytest.mark.parametrize("orientation, turn", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90),
    (8, Image.Transpose.ROTATE_270), (2, Image.Transpose.FLIP_LEFT_RIGHT),
    (5, Image.Transpose.TRANSPOSE), (7, Image.Transpose.TRANSVERSE),
])
def test_every_exif_orientation_undone(tmp_path, orientation, turn):
    rng = np.random.default_rng(orientation)
    upright = rng.integers(0, 256, (30, 50, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    # stored as a camera would: the upright picture turned the other way
    path = _save(Image.fromarray(upright).transpose(turn), tmp_path / "o.png", exif=exif)
    assert np.array_equal(load_image(path), upright)


def test_photoshop_composite_is_read(tmp_path, orl_root):
    face = np.asarray(Image.open(orl_root / "s1" / "1.pgm").convert("RGB"))
    h, w, c = face.shape  # the smallest valid PSD: version 1, RGB, 8 bits, raw composite
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, c, h, w, 8, 3) + b"\0" * 12
    path = tmp_path / "face.psd"
    path.write_bytes(header + struct.pack(">H", 0)
                     + b"".join(face[:, :, i].tobytes() for i in range(c)))
    assert np.array_equal(load_image(path), face)


def test_non_finite_pixels_of_a_float_image_are_ignored(tmp_path):
    ramp = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    clean = load_image(_save(Image.fromarray(ramp, "F"), tmp_path / "clean.tif"))
    for bad in (np.nan, np.inf, -np.inf):
        damaged = ramp.copy()
        damaged[5, 7] = bad
        arr = load_image(_save(Image.fromarray(damaged, "F"), tmp_path / "bad.tif"))
        assert arr.min() == 0 and arr.max() == 255
        mask = np.ones(ramp.shape, bool)
        mask[5, 7] = False
        assert np.array_equal(arr[mask], clean[mask])


def test_walk_skips_fiqa_gate_s_own_temporary_files_and_nothing_else(tmp_path):
    ours = [".fiqa-45b4a5ea-123-ab_9cdef.part", ".fiqa-1-y2345678.tmp"]  # (an old name)
    photos = ["a.jpg", ".hidden.jpg", ".fiqa-notes.txt", ".fiqa-99999-holiday.part",
              ".fiqa-notes.tmp", ".fiqa-45b4a5ea-123-ab_9cdef.part.jpg"]
    for name in ours + photos:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(os.path.basename(f) for f in iter_files([tmp_path])) == sorted(photos)


# An AVIF with six bytes flipped (found by fuzzing): Pillow's decoder raises RuntimeError.
DAMAGED_AVIF = base64.b64decode(
    "AAAAIGZ0eXBhdmlmAAAAAGF2aWZtaWYxbWlhZk1BMUIAAAD1bWV0YQAAAAAAAAAhaGRscgAAAAAAAAAAcGlj"
    "dAAAAAAAAAAAAAAAAAAAAAAOcGl0bQAAAAAAAQAAAB5pbG9jAAAAAEQAAAEAAQAAAAEAAAEdAAACXAAAAChp"
    "aW5mAAAAAAABAAAAGmluZmUCAAAAAAEAAGF2MDFDb2xvcgAAAAB0aXBycAAAAFRpcGNvAAAAFGlzcGUAAAAA"
    "AAAALgAAADgAAAAQcGl4aQAAAAADCAgIAAAADGF2MUOBAAwAAAAAE2NvbHJuY2x4AAEADQAGgAAAAAlpcm90"
    "AwAAABhpcG1hAAAAAAAAAAEAAQUBAoMEhQAAAmRtZGF0EgAKCRgVbd2iAhoNCDLMBBTHh4ZlAghAnlAAAAjd"
    "TGqgVCdWj2uS+4VHj4JElMea+eosHC3vSc0/TEzEGSb+UlfoCpX6vx9nk1Q/3dNae2DiuKhPNQxfpNT0AbC2"
    "tiwiwnMy4pqm5nApGKu1jKex1/eudMmq/c4n4IQGWeDc3nwGhwkyobBvx7zNr8EdCI+dj2Aj0MeRjqIJB4nU"
    "BpDJGSp8eGIrBo69hFgwmOnjyWqfXf9et5+Wcq/9KnYCkidxGuQ75j/EaLxF5LtqvUrPchYWfjyO4TiEXaBs"
    "PQFZSfVJsn2DPp6xxD8hVgwC7W7AQUoBg5gneLUwSyXoED5o82n6w1PVXi2KxEL0E8aihzqwq+85poxnd/KE"
    "5NAWKdFzKd35RvbYTXoPCF95JOMnNdBl5/NIk1SQ/jvOihJoh+XVbJ+Y4A+vXD728xlKcmSlSss5GydL92Zw"
    "OeDPCnSr7lbhN5vl/NIWIf/oR80tOFb7meYWPujXpojLn9TJzrJiK6ruLZdVAKi6N/Rx9Ve4UN9NcQiuy5GT"
    "vRwuoacAlpSOeqNpDJYF3O8Qtdw8DXPxUHxgoLfoIHQ4cX0uvGisHy/P8w/RkHyA5t8xw5/WuBLjTc2Os9Cc"
    "bIn5+yM/vTA4ZQgDsXoo1eQ1kUosw0GdZ/53IBFAS5szvrxGy0E9Q0L98RLumkSuS0RukYxEYKUHxblZlSBo"
    "ummAVhXd9KJvXhHPST7VZ4/RkHHl31V0OWgDELpbRStMH7ubGWgW7rHcxnNRQc9CfChl60bUNxEyYQrT9PkZ"
    "2TPE56qGWA=="
)


def test_a_damaged_avif_is_a_load_error(tmp_path):
    if "AVIF" not in Image.registered_extensions().values():
        pytest.skip("this Pillow reads no AVIF")
    path = tmp_path / "damaged.avif"
    path.write_bytes(DAMAGED_AVIF)
    with pytest.raises(ImageLoadError, match="corrupt or truncated image: Failed to decode"):
        load_image(path)


def test_an_unsigned_32_bit_tiff_keeps_its_brightest_pixels_bright(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    ramp = np.tile(np.linspace(0, 2**32 - 1, 64), (16, 1)).astype(np.uint32)
    tifffile.imwrite(tmp_path / "u32.tif", ramp)
    row = load_image(tmp_path / "u32.tif")[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()


def test_walk_skips_links_to_folders_above_the_one_given(tmp_path, caplog):
    photos = tmp_path / "home" / "photos"
    (photos / "s1").mkdir(parents=True)
    (photos / "s1" / "me.jpg").write_bytes(b"x")
    (tmp_path / "home" / "not_an_input.jpg").write_bytes(b"x")
    os.symlink("../..", photos / "s1" / "back")  # -> home
    os.symlink(str(photos), photos / "s1" / "again")  # -> the folder given: walked once
    files = list(iter_files([photos]))
    assert files == [str(photos / "s1" / "me.jpg")]
    assert "links to a folder above the one given" in caplog.text and "back" in caplog.text
    # The input is itself a link (~/pictures -> /disk/pictures), and a link inside leads
    # to ~, which holds the input as the user named it, though not its target.
    disk = tmp_path / "disk" / "pictures"
    disk.mkdir(parents=True)
    (disk / "mine.jpg").write_bytes(b"x")
    os.symlink(disk, tmp_path / "home" / "pictures")
    os.symlink(tmp_path / "home", disk / "home")
    given = tmp_path / "home" / "pictures"
    assert list(iter_files([given])) == [str(given / "mine.jpg")]


def test_unlisted_folder_given_as_input_says_why(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "1.jpg").write_bytes(b"x")
    locked.chmod(0)
    try:
        # as root the mode bits do not apply: drop the capabilities that ignore them
        code = ("import sys; from fiqa_gate.images import load_image, identity_folders\n"
                "from fiqa_gate.errors import ImageLoadError, FiqaGateError\n"
                "try: load_image(sys.argv[1])\n"
                "except ImageLoadError as e: print(e.reason)\n"
                "try: identity_folders(sys.argv[1])\n"
                "except FiqaGateError as e: print(e)\n")
        cmd = [sys.executable, "-c", code, str(locked)]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("needs setpriv to drop root's file capabilities")
            cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["folder cannot be listed: Permission denied",
                                        f"{locked}: permission denied"]
