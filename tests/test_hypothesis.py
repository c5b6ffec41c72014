"""Property-based tests: the image loader and the manifest under arbitrary input."""

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

COLUMNS = ["path", "score", "error"]
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.binary(min_size=0, max_size=2048))
def test_arbitrary_bytes_load_or_fail_with_image_load_error(data):
    with tempfile.NamedTemporaryFile(suffix=".jpg") as fh:
        fh.write(data)
        fh.flush()
        try:
            img = load_image(fh.name)
        except ImageLoadError as exc:
            assert exc.reason
        else:
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), "JPEG": ("L", "RGB", "CMYK"),
           "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"),
           "GIF": ("L", "P"), "BMP": ("1", "L", "P", "RGB"), "WEBP": ("RGB", "RGBA")}


@FAST
@given(st.sampled_from(sorted(FORMATS)), st.data(), st.integers(8, 64), st.integers(8, 64),
       st.integers(0, 2**31 - 1))
def test_any_mode_and_format_loads_as_rgb_uint8(fmt, data, w, h, seed):
    mode = data.draw(st.sampled_from(FORMATS[fmt]))
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    img = rgb.convert("RGBA").convert(mode) if mode in ("LA", "RGBA") else (
        rgb.convert("L").convert(mode) if mode in ("I;16", "I", "F", "1") else rgb.convert(mode))
    buf = io.BytesIO()
    img.save(buf, fmt)
    with tempfile.NamedTemporaryFile(suffix="." + fmt.lower()) as fh:
        fh.write(buf.getvalue())
        fh.flush()
        out = load_image(fh.name)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                min_size=1, max_size=30)


@FAST
@given(st.lists(NAMES, min_size=1, max_size=25, unique=True), st.floats(0, 1), st.data())
def test_manifest_cut_anywhere_resumes_without_loss_or_duplicate(names, frac, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.csv")
        with open_manifest(path, COLUMNS) as m:
            for n in names:
                m.write_rows([{"path": n, "score": "0.5", "error": ""}])
        size = os.path.getsize(path)
        cut = data.draw(st.integers(0, size))
        with open(path, "rb+") as fh:
            fh.truncate(cut)  # SIGKILL at any byte
        with open_manifest(path, COLUMNS, resume=True) as m:
            assert m.done <= set(names)
            for n in names:
                if n not in m.done:
                    m.write_rows([{"path": n, "score": "0.5", "error": ""}])
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            rows = list(csv.DictReader(fh))
        assert sorted(r["path"] for r in rows) == sorted(names)
        assert all(r["score"] == "0.5" for r in rows)
