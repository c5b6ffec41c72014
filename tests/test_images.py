"""The image loader on real and deliberately broken files (all generated here)."""

from __future__ import annotations

import io
import os
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
