"""One loader for every image that enters fiqa-gate, and one folder walker.

Whatever the file (EXIF-rotated JPEG, CMYK, 16-bit PNG, palette GIF with transparency,
animated image), callers get an RGB uint8 array or an `ImageLoadError` with a short reason.
"""

from __future__ import annotations

import bisect
import logging
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator
from io import BufferedReader
from pathlib import PurePath

import numpy as np
from PIL import Image, UnidentifiedImageError

from fiqa_gate.assets import is_temp_name, same_size_digests
from fiqa_gate.errors import FiqaGateError, ImageLoadError

log = logging.getLogger("fiqa_gate")

# 50 Mpx: far above any camera frame a gate sees, far below a decompression bomb.
DEFAULT_MAX_PIXELS = 50_000_000
MIN_SIDE = 8
# What dataset readers treat as images (the CLI walks every file and reports the rest).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".gif", ".tif",
                            ".tiff", ".webp"})


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float grey: scale the actual range to 8 bits instead of clipping.
        arr = np.asarray(img)
        if img.mode == "I" and _unsigned_32_bit(img):  # Pillow reads it as signed
            arr = arr.view(np.uint32)
        arr = arr.astype(np.float64)
        finite = np.isfinite(arr)  # a float TIFF may hold NaN or inf pixels
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0, 0)
        arr = np.where(finite, arr, np.where(arr > 0, hi, lo))  # +inf white, -inf/NaN black
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _unsigned_32_bit(img: Image.Image) -> bool:
    tags = getattr(img, "tag_v2", None)  # TIFF only
    if tags is None:
        return False

    def first(tag: int, default: int) -> int:
        value = tags.get(tag, default)
        return int(value[0] if isinstance(value, tuple) else value)

    return first(339, 1) == 1 and first(258, 8) == 32  # SampleFormat uint, 32 bits


def _refuse_unless_regular(p: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        try:  # a folder given as input reaches here only if it could not be walked
            with os.scandir(p):
                pass
        except OSError as exc:
            raise ImageLoadError(p, f"folder cannot be listed: {exc.strerror or exc}") from None
        raise ImageLoadError(p, "is a directory")
    if not stat.S_ISREG(mode):
        raise ImageLoadError(p, "not a regular file (a pipe, socket or device)")


def _upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says; as stored if that cannot be read.

    Not ImageOps.exif_transpose: it also rewrites the metadata of the copy, and that fails
    on EXIF blocks that are slightly malformed (a GPS tag of the wrong type) although the
    orientation itself is readable."""
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # any malformed metadata: the pixels are still good
        log.debug("unreadable EXIF orientation; image used as stored", exc_info=True)
        return img
    method = _TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _open(p: str) -> BufferedReader:
    """Open for reading, or an ImageLoadError that says why not (before any decoding)."""
    try:
        # Look before opening: opening a device or a pipe can have effects of its own.
        _refuse_unless_regular(p, os.stat(p).st_mode)
        # Non-blocking, so a file swapped for a named pipe cannot stall the run.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        try:
            _refuse_unless_regular(p, os.fstat(fd).st_mode)
        except ImageLoadError:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb")
    except FileNotFoundError:
        raise ImageLoadError(p, "file not found (deleted or a dangling link?)") from None
    except IsADirectoryError:
        raise ImageLoadError(p, "is a directory") from None
    except PermissionError:
        raise ImageLoadError(p, "permission denied") from None
    except OSError as exc:  # a link loop, a name too long, an I/O error ...
        raise ImageLoadError(p, f"cannot open: {exc.strerror or exc}") from None


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read `path` as an upright RGB uint8 array of shape (H, W, 3).

    Raises ImageLoadError for anything that is not a complete, sane image.
    """
    p = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns before it errors on bombs; we enforce our own limit instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open(p) as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    raise ImageLoadError(p, "empty file (0 bytes)")
                with Image.open(fh) as img:
                    w, h = img.size
                    if w * h > max_pixels:
                        raise ImageLoadError(
                            p, f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels}"
                        )
                    if min(w, h) < MIN_SIDE:
                        raise ImageLoadError(p, f"image too small: {w}x{h}")
                    # Freshly opened, an animated image is at its first frame (and a
                    # PSD at its composite, which seek(0) would leave).
                    img.load()
                    img = _upright(img)
                    rgb = _to_rgb(img)
                    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(p, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(p, f"image too large: {exc}") from None
    except OSError as exc:
        # Pillow reports truncated and corrupt data as OSError.
        raise ImageLoadError(p, f"corrupt or truncated image: {exc}") from None
    except (ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageLoadError(p, f"unreadable image: {type(exc).__name__}: {exc}") from None
    except RuntimeError as exc:  # the AVIF decoder's report of damaged data
        raise ImageLoadError(p, f"corrupt or truncated image: {exc}") from None


def iter_files(paths: Iterable[str | os.PathLike[str]],
               enter: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Every file under `paths`, each once, in a stable order.

    Directories are walked (following links, guarding against loops; `enter`, when given,
    says whether to walk a folder; the folder given is walked once however many links
    lead back to it); a link to a folder above the one given is skipped with a warning,
    since it would take in everything beside the input (and `filter --move` would move
    it), and so is a fiqa-gate gallery's folder (its database is no one's picture, and
    `filter --move` would take it away). fiqa-gate's own temporary files and the
    operating systems' folder clutter (.DS_Store, ._* resource forks, Thumbs.db) are not
    listed. Files given by name are yielded even if they do not exist or are not images,
    so that the caller reports them instead of skipping them silently.
    """
    from fiqa_gate.gallery import is_gallery_listing

    seen_dirs: set[tuple[int, int]] = set()
    for raw in paths:
        top = os.fspath(raw)
        if not os.path.isdir(top):
            yield top
            continue
        real_top, upward, galleries = os.path.realpath(top), [], []
        # above the input: the folders holding it, as named and as resolved (the input
        # may itself be a link, whose target's folders are not where the user looks)
        above = {os.path.realpath(a) for a in _ancestors(os.path.abspath(top))}
        unlistable: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True,
                                                    onerror=unlistable.append):
            yield from (e.filename for e in unlistable if e.filename)
            unlistable.clear()
            try:
                st = os.stat(dirpath)
            except OSError:
                yield dirpath  # vanished or unreadable: reported, not skipped
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs or (enter is not None and not enter(dirpath)):
                dirnames[:] = []  # a symlink loop, the same folder twice, or not wanted
                continue
            real = os.path.realpath(dirpath)
            if dirpath != top and real != real_top and (
                    _inside(real_top, real) or any(real == a or _inside(a, real)
                                                   for a in above)):
                upward.append(dirpath)
                dirnames[:] = []
                continue
            seen_dirs.add(key)
            if is_gallery_listing(filenames):
                galleries.append(dirpath)
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if d not in _CLUTTER_DIRS)
            for name in sorted(filenames):
                # a copy or report fiqa-gate is writing (or a killed run left), or a file
                # the file manager wrote: not an input
                if not (is_temp_name(name) or is_clutter(name)):
                    yield os.path.join(dirpath, name)
        # a folder that cannot be listed becomes an input that fails with its reason
        yield from (e.filename for e in unlistable if e.filename)
        _warn_skipped(top, upward, "folders skipped: links to a folder above the one given")
        _warn_skipped(top, galleries, "folders skipped: fiqa-gate galleries")


_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "ehthumbs.db", "desktop.ini", ".directory"})
# the folder of resource forks macOS puts in a zip; unpacked elsewhere it mirrors the tree
_CLUTTER_DIRS = frozenset({"__MACOSX"})


def is_clutter(name: str) -> bool:
    """A file a file manager writes beside pictures (`._*` are macOS resource forks)."""
    return name in _CLUTTER or name.startswith("._")


def _ancestors(path: str) -> list[str]:
    out = []
    while (parent := os.path.dirname(path)) != path:
        out.append(parent)
        path = parent
    return out


def identity_folders(root: str | os.PathLike[str], once: bool = False
                     ) -> list[tuple[str, list[str]]]:
    """(identity, every file below it) for each sub-folder of `root`, the layout of
    CASIA-WebFace, VGGFace2 and LFW: ROOT/<identity>/**/<file>.

    Each picture belongs to one identity: one person must not be counted again under a
    second name, nor everyone under one. Skipped, with a warning: files directly in ROOT
    (no one's); hidden folders and links at the top that lead nowhere; a linked identity
    folder, or a link at any depth below one, that leads into another identity's folder,
    into ROOT or above it; and every file of a picture found under two identities (a hard
    link or a byte-for-byte copy: whose it is is unknown). A real folder keeps its name
    over a link to it; a link to a folder outside ROOT is its identity's, unless a second
    name at the top links there too (then neither is).
    Every other file is listed, to be read or to fail with its reason: a dangling link,
    and a second name or copy of a picture inside one identity unless `once` (evaluation
    and training compare faces, and one picture under two names would match itself).
    """
    top = os.fspath(root)
    if not os.path.isdir(top):
        where = "" if os.path.isabs(top) else f"; taken from the working folder {os.getcwd()}"
        raise FiqaGateError(f"{top}: not a directory (expected ROOT/<identity>/<images>"
                            f"{where})")
    try:
        with os.scandir(top) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except PermissionError:
        raise FiqaGateError(f"{top}: permission denied") from None
    except OSError as exc:
        raise FiqaGateError(f"{top}: cannot be listed: {exc.strerror or exc}") from None
    kinds = {e.name: _entry_kind(e) for e in entries}
    _warn_skipped(top, [n for n, k in kinds.items() if k == "file" and not is_clutter(n)],
                  "files directly in the folder skipped; an identity's images go in "
                  "ROOT/<identity>/")
    _warn_skipped(top, [n for n, k in kinds.items() if k == "broken"],
                  "links that lead to no file or folder skipped")
    hidden = [n for n, k in kinds.items() if k == "dir" and n.startswith(".")]
    _warn_skipped(top, hidden, "hidden folders skipped (a .Trash or .git is no person)")
    kinds.update(dict.fromkeys(hidden, "hidden"))
    # no warning: an unzipped archive made on a Mac always has it
    kinds.update({n: "hidden" for n, k in kinds.items() if k == "dir" and n in _CLUTTER_DIRS})
    real_top, owners, kept, linked = os.path.realpath(top), _Owners(), set(), []
    real_of = {e.name: os.path.realpath(e.path) for e in entries if kinds[e.name] == "dir"}
    # a folder outside ROOT linked at the top under two names: whose it is is unknown, as
    # for a picture under two identities (the first name had kept it)
    names_of: dict[str, list[str]] = {}
    for e in entries:
        real = real_of.get(e.name)
        if e.is_symlink() and real is not None and not (
                real == real_top or _inside(real, real_top) or _inside(real_top, real)):
            names_of.setdefault(real, []).append(e.name)
    doubled = [names for names in names_of.values() if len(names) > 1]
    _warn_skipped(top, sorted(" = ".join(names) for names in doubled), "identity folders "
                  "skipped: links of two or more names to one folder, so whose it is is "
                  "unknown")
    kinds.update(dict.fromkeys((n for names in doubled for n in names), "twice"))
    for e in sorted(entries, key=lambda e: (e.is_symlink(), e.name)):  # real folders first
        if kinds[e.name] != "dir":
            continue
        real = real_of[e.name]
        where = _elsewhere(real, None, owners, real_top) if e.is_symlink() else None
        if where is not None:
            linked.append(f"{e.name} ({where})")
            continue
        owners.add(real, e.name)
        kept.add(e.name)
    _warn_skipped(top, linked, "identity folders skipped: links into another identity's "
                  "folder, into ROOT or above it")
    folders, strays = [], []
    picture: dict[str, tuple[int, int, int]] = {}  # regular files: device, inode, size
    found_any: set[str] = set()
    for e in entries:
        if e.name not in kept:
            continue

        def enter(folder: str, name: str = e.name) -> bool:
            where = _elsewhere(os.path.realpath(folder), name, owners, real_top)
            if where is not None:
                strays.append(f"{folder} ({where})")
            return where is None

        files: list[str] = []
        for f in iter_files([e.path], enter=enter):
            found_any.add(e.name)
            try:
                st = os.stat(f)
            except OSError:  # dangling or unreadable: an input that fails with its reason
                files.append(f)
                continue
            where = _elsewhere(os.path.realpath(f), e.name, owners, real_top)
            if where is not None:
                strays.append(f"{f} ({where})")
                continue
            files.append(f)
            if stat.S_ISREG(st.st_mode):
                picture[f] = (st.st_dev, st.st_ino, st.st_size)
        folders.append((e.name, files))
    folders, found_any = _one_spelling(top, folders, found_any, merge=once)
    shared, twice = _same_pictures(folders, picture, once)
    emptied = [name for name, files in folders if not files and name in found_any]
    _warn_skipped(top, [name for name, files in folders if name not in found_any],
                  "identity folders with no files (nothing to read in them)")
    _warn_skipped(top, strays, "files and folders skipped: reached through a link into "
                  "another identity's folder, into ROOT or above it")
    _warn_skipped(top, shared, "pictures skipped, each found under two or more identities "
                  "(a hard link or a byte-for-byte copy), so whose it is is unknown")
    _warn_skipped(top, twice, "images skipped, each the same picture as one listed before "
                  "(a second name or a byte-for-byte copy)")
    _warn_skipped(top, emptied, "identities left with no file of their own")
    if not folders:
        raise FiqaGateError(f"{top}: no identity sub-folders (expected "
                            "ROOT/<identity>/<images>)")
    return folders


def _one_spelling(top: str, folders: list[tuple[str, list[str]]], found_any: set[str],
                  merge: bool) -> tuple[list[tuple[str, list[str]]], set[str]]:
    """Folders whose names differ only in Unicode form (Zoë composed on one machine and
    decomposed on a Mac), named in a warning; when `merge` (faces are compared), one
    identity under the composed name: as two, one person's own pictures had become
    impostor pairs and set the threshold. Enroll keeps them apart: a gallery holds each
    folder's own spelling, which its reruns and --prune follow."""
    import unicodedata

    spellings: dict[str, list[str]] = {}
    for name, _ in folders:
        spellings.setdefault(unicodedata.normalize("NFC", name), []).append(name)
    alike = {key: names for key, names in spellings.items() if len(names) > 1}
    if not alike:
        return folders, found_any
    _warn_skipped(top, [f"{key} ({len(names)} folders)" for key, names in alike.items()],
                  "identity folders spelt alike in two Unicode forms, "
                  + ("each taken as one person" if merge else "enrolled apart, as the "
                     "folders are; rename one to the other's spelling to make them one"))
    if not merge:
        return folders, found_any
    name_of = {name: key if key in alike else name
               for key, names in spellings.items() for name in names}
    files_of: dict[str, list[str]] = {}
    for name, files in folders:
        files_of.setdefault(name_of[name], []).extend(files)
    return list(files_of.items()), {name_of[name] for name in found_any}


def _same_pictures(folders: list[tuple[str, list[str]]],
                   picture: dict[str, tuple[int, int, int]], once: bool
                   ) -> tuple[list[str], list[str]]:
    """Remove, in place, every file of a picture found under two or more identities (a
    hard link or a copy misfiled in a folder that sorts first had kept the wrong label),
    and, when `once`, every later name of a picture inside one identity. A picture is a
    file (device and inode) or, for files of one size, their bytes. Only files that share
    a size are read, and without `once` only where the size spans identities: a folder of
    distinct pictures costs one stat each. Returns the pictures dropped across identities
    ("a = b") and the names dropped inside one ("a (= first)")."""
    owner = {f: name for name, files in folders for f in files}
    key: dict[str, object] = {f: (dev, ino) for f, (dev, ino, _) in picture.items()}
    key.update(same_size_digests(
        {f: size for f, (_, _, size) in picture.items()},
        lambda group: (len({key[f] for f in group}) > 1
                       and (once or len({owner[f] for f in group}) > 1))))
    files_of: dict[object, list[str]] = {}
    for f, k in key.items():
        files_of.setdefault(k, []).append(f)
    ambiguous = {k for k, fs in files_of.items() if len({owner[f] for f in fs}) > 1}
    shared = sorted(" = ".join(sorted(files_of[k])) for k in ambiguous)
    first: dict[object, str] = {}
    twice: list[str] = []
    for i, (name, files) in enumerate(folders):
        kept = []
        for f in files:
            k = key.get(f)
            if k in ambiguous:
                continue
            if k is not None and once and first.setdefault(k, f) != f:
                twice.append(f"{f} (= {first[k]})")
                continue
            kept.append(f)
        folders[i] = (name, kept)
    return shared, twice


def _elsewhere(real: str, name: str | None, owners: _Owners, real_top: str) -> str | None:
    """Where `real` lies if it is not identity `name`'s (None: it is); `name` None asks
    about a linked identity folder, which must not hold another identity's folder either."""
    owner = owners.owner(real)
    if owner is not None:
        return None if owner == name else f"in {owner!r}"
    if real == real_top or _inside(real_top, real):
        return "ROOT or above it"
    if _inside(real, real_top):
        return "in ROOT"
    if name is None and (below := owners.below(real)) is not None:
        return f"above {below!r}"
    return None


def _entry_kind(entry: os.DirEntry[str]) -> str:
    """'dir', 'file' or 'broken' (a dangling or looping link, or unreadable)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file() or not entry.is_symlink():
            return "file"
    except OSError:
        pass
    return "broken"


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


class _Owners:
    """Real folders of the identities kept so far, for one question asked quickly of
    tens of thousands of them: which one is a folder the same as, inside, or above?"""

    def __init__(self) -> None:
        self.name: dict[str, str] = {}
        self.sorted: list[str] = []

    def add(self, real: str, name: str) -> None:
        self.name[real] = name
        bisect.insort(self.sorted, real)

    def owner(self, real: str) -> str | None:
        """The kept folder that `real` is, or is inside."""
        for folder in (real, *map(str, PurePath(real).parents)):
            if folder in self.name:
                return self.name[folder]
        return None

    def below(self, real: str) -> str | None:
        """A kept folder inside `real`."""
        prefix = real.rstrip(os.sep) + os.sep
        i = bisect.bisect_left(self.sorted, prefix)
        if i < len(self.sorted) and self.sorted[i].startswith(prefix):
            return self.name[self.sorted[i]]
        return None


def _warn_skipped(top: str, names: list[str], what: str) -> None:
    if names:
        log.warning("%s: %d %s: %s", top, len(names), what,
                    ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
