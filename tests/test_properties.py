"""Properties of the image loader and the manifest, for inputs hypothesis makes up.

- Whatever the bytes (random, behind a real format's magic number, a real image with
  bytes flipped or cut), `load_image` returns an RGB uint8 array or raises ImageLoadError,
  never anything else.
- Any small valid image, in any mode and lossless format, with any EXIF orientation,
  loads as the upright RGB uint8 H x W x 3 array it encodes.
- A manifest cut at any byte (what SIGKILL or a full disk leaves), possibly several times,
  and resumed each time, ends with every input's rows exactly once, complete and unchanged.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fiqa_gate.errors import ImageLoadError
from fiqa_gate.images import load_image
from fiqa_gate.manifest import open_manifest

SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def load_bytes(data: bytes, suffix: str = ".jpg") -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=suffix) as fh:
        fh.write(data)
        fh.flush()
        return load_image(fh.name)


def loads_or_fails_cleanly(data: bytes) -> None:
    try:
        img = load_bytes(data)
    except ImageLoadError as exc:
        assert exc.reason and "\n" not in exc.reason
    else:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.flags["C_CONTIGUOUS"] and min(img.shape[:2]) >= 8


# -- the loader on bytes that are not (quite) images --------------------------------------
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\xff\xd8\xff",
         b"GIF89a", b"GIF87a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
         b"P5\n", b"P6\n64 64\n255\n", b"\x00\x00\x01\x00", b"8BPS", b"qoif",
         b"\x00\x00\x00\x0cjP  \r\n\x87\n"]


@SETTINGS
@given(st.sampled_from(MAGIC), st.binary(max_size=3000))
def test_random_bytes_raise_only_image_load_error(magic, tail):
    loads_or_fails_cleanly(magic + tail)


def _valid(fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    if fmt == "GIF":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


VALID = {fmt: _valid(fmt, i) for i, fmt in enumerate(
    ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA"))}


@SETTINGS
@given(st.sampled_from(sorted(VALID)), st.lists(st.tuples(st.integers(0, 10**6),
                                                          st.integers(0, 255)), max_size=8),
       st.floats(0.0, 1.0))
def test_damaged_real_images_raise_only_image_load_error(fmt, flips, keep):
    data = bytearray(VALID[fmt])
    for pos, value in flips:
        data[pos % len(data)] = value
    loads_or_fails_cleanly(bytes(data[: max(1, int(len(data) * keep))]))


# -- the loader on valid images -------------------------------------------------------------
# mode -> lossless formats that store it
FORMATS = {"1": ["PNG", "BMP", "TIFF"], "L": ["PNG", "BMP", "TIFF", "PPM", "GIF"],
           "LA": ["PNG", "TIFF"], "P": ["PNG", "BMP", "GIF", "TIFF"], "RGB": ["PNG", "BMP",
           "TIFF", "PPM", "WEBP"], "RGBA": ["PNG", "TIFF", "WEBP"], "CMYK": ["TIFF"],
           "I;16": ["PNG", "TIFF"], "I": ["TIFF"], "F": ["TIFF"]}
ORIENT = {1: lambda x: x, 2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1],
          4: lambda x: x[::-1], 5: lambda x: x.transpose(1, 0, 2),
          6: lambda x: np.rot90(x, -1), 7: lambda x: x[::-1, ::-1].transpose(1, 0, 2),
          8: lambda x: np.rot90(x, 1)}


@st.composite
def images(draw):
    mode = draw(st.sampled_from(sorted(FORMATS)))
    fmt = draw(st.sampled_from(FORMATS[mode]))
    h, w = draw(st.integers(8, 40)), draw(st.integers(8, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    orientation = draw(st.sampled_from(sorted(ORIENT))) if fmt in ("PNG", "TIFF") else 1
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if mode == "RGBA" or mode == "LA":
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA").convert(mode)
    elif mode in ("I;16", "I", "F"):
        grey = rng.integers(0, 65536, (h, w)).astype({"I;16": np.uint16, "I": np.int32,
                                                       "F": np.float32}[mode])
        img = Image.fromarray(grey)
        assert img.mode == mode
    elif mode == "P":
        img = Image.fromarray(rgb).quantize(draw(st.integers(2, 255)))
    else:
        img = Image.fromarray(rgb).convert(mode)
    return img, fmt, orientation


def expected_rgb(img: Image.Image) -> np.ndarray:
    """What the pixels mean, computed independently of the loader's code."""
    if img.mode in ("RGBA", "LA"):
        rgba = np.asarray(img.convert("RGBA"), np.float64)
        a = rgba[..., 3:] / 255.0
        return np.round(rgba[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8)  # on white
    if img.mode in ("I;16", "I", "F"):
        v = np.asarray(img, np.float64)
        lo, hi = v.min(), v.max()
        grey = ((v - lo) * (255.0 / (hi - lo)) if hi > lo else v * 0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


@SETTINGS
@given(images())
def test_valid_images_of_any_mode_load_upright_as_rgb_uint8(case):
    img, fmt, orientation = case
    buf = io.BytesIO()
    kw = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    if fmt == "WEBP":
        kw["lossless"] = True
        kw["exact"] = True
    img.save(buf, fmt, **kw)
    out = load_bytes(buf.getvalue(), suffix="." + fmt.lower())
    want = ORIENT[orientation](expected_rgb(img))
    assert out.dtype == np.uint8 and out.shape == want.shape and out.shape[2] == 3
    tolerance = 1 if img.mode in ("RGBA", "LA", "I;16", "I", "F") else 0  # rounding only
    assert int(np.abs(out.astype(int) - want.astype(int)).max()) <= tolerance


# -- the manifest under kills at any byte ---------------------------------------------------
COLUMNS = ["path", "score", "face", "error"]
# File names as the walker yields them: any bytes but NUL and "/", undecodable ones as
# surrogate escapes; commas, quotes, newlines and lone CRs included.
NAMES = st.binary(min_size=1, max_size=24).map(
    lambda b: os.fsdecode(b.replace(b"\x00", b"_").replace(b"/", b"_")))
FIELDS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                 max_size=12)
INPUTS = st.lists(st.tuples(NAMES, st.lists(st.tuples(FIELDS, FIELDS), min_size=1,
                                             max_size=4)),
                  min_size=1, max_size=15, unique_by=lambda t: t[0])


def _rows(name: str, faces: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"path": name, "score": score, "face": str(i), "error": error}
            for i, (score, error) in enumerate(faces)]


def _read(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


@SETTINGS
@given(INPUTS, st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3))
def test_manifest_cut_anywhere_then_resumed_has_every_row_once(inputs, cuts):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.csv")
        open(path, "wb").close()
        for cut in [*cuts, None]:  # killed after each cut; the last run completes
            with open_manifest(path, COLUMNS, resume=True, multi_row=True) as m:
                assert m.done <= {name for name, _ in inputs}
                for name, faces in inputs:
                    if name not in m.done:
                        m.write_rows(_rows(name, faces))
            if cut is not None:
                with open(path, "rb+") as fh:
                    fh.truncate(int(os.path.getsize(path) * cut))
        # every input's rows, once, whole and unchanged, in the order they were written
        assert _read(path) == [r for name, faces in inputs for r in _rows(name, faces)]


@SETTINGS
@given(INPUTS, st.floats(0.0, 1.0))
def test_a_resumed_manifest_keeps_what_was_whole_and_only_redoes_the_rest(inputs, cut):
    """Rows before the cut survive byte for byte; only inputs after it are written again
    (and at most the one whose rows the cut could have split)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.csv")
        with open_manifest(path, COLUMNS, multi_row=True) as m:
            ends = []
            for name, faces in inputs:
                m.write_rows(_rows(name, faces))
                ends.append((name, os.path.getsize(path)))
        size = int(os.path.getsize(path) * cut)
        with open(path, "rb") as fh:
            original = fh.read()
        with open(path, "rb+") as fh:
            fh.truncate(size)
        with open_manifest(path, COLUMNS, resume=True, multi_row=True) as m:
            done = set(m.done)
        whole = [name for name, end in ends if end <= size]
        assert done <= set(whole) and len(set(whole) - done) <= 1
        with open(path, "rb") as fh:
            kept = fh.read()
        assert original.startswith(kept)  # nothing rewritten, only a tail dropped
