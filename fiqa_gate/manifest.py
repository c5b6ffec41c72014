"""Append-only CSV manifests that survive a killed run.

Rows are flushed as they are written, so after SIGKILL the file holds every finished
row and at most one partial line, which `open_manifest(..., resume=True)` drops before
appending. `done` is the set of inputs already written, so a resumed run skips them.

An input with several rows (one per face) is written in one write, but a kill can still
cut that write at a line end and leave the input short of rows; so for such manifests
(`multi_row=True`) resuming also drops the rows of the last input, which is done again.
Resuming never touches a file that is not a manifest with the expected columns, and a
new run never empties a file that is not a manifest (a picture, a database named by -o).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import itertools
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from fiqa_gate.errors import ManifestError

log = logging.getLogger(__name__)

# The manifests the commands write; an existing file is emptied for a new run only if it is
# one of them (or a header a kill cut short).
SCORE_COLUMNS = ["path", "score", "raw_score", "face", "box_x", "box_y", "box_w", "box_h",
                 "det_score", "error"]
FILTER_COLUMNS = ["path", "score", "raw_score", "decision", "threshold", "faces", "reason",
                  "error", "copied_to"]
ENROLL_COLUMNS = ["path", "identity", "decision", "score", "reason", "error", "face_id",
                  "faces"]
SEARCH_COLUMNS = ["path", "face", "rank", "identity", "similarity", "match", "source",
                  "error"]
_HEADERS = [(",".join(c) + "\n").encode()
            for c in (SCORE_COLUMNS, FILTER_COLUMNS, ENROLL_COLUMNS, SEARCH_COLUMNS,
                      ENROLL_COLUMNS[:-1])]  # enroll's before it had `faces`


class Manifest:
    def __init__(self, fh: IO[str], columns: Sequence[str], owned: bool, name: str = "-",
                 done_rows: Sequence[dict[str, str]] = (), key: str = "path") -> None:
        self.columns = list(columns)
        self.done_rows = list(done_rows)  # the rows a resumed run found
        self.done = {row[key] for row in self.done_rows}  # their inputs
        self.name = name
        self._fh = fh
        self._owned = owned
        self._failed = False

    def write_rows(self, rows: Sequence[dict]) -> None:
        """Write all rows of one input at once, so a resumed run never sees half of them."""
        buf = io.StringIO()
        # csv quotes a field holding "\n" but not one holding a lone "\r" (legal in POSIX
        # file names), which would then split the record when read back: quote those rows.
        bare_cr = any("\r" in str(v) for row in rows for v in row.values())
        writer = csv.DictWriter(buf, self.columns, extrasaction="ignore", lineterminator="\n",
                                quoting=csv.QUOTE_ALL if bare_cr else csv.QUOTE_MINIMAL)
        writer.writerows(rows)
        # One write per input: a kill leaves whole inputs plus at most one partial line.
        self.write_text(buf.getvalue())

    def write_text(self, text: str) -> None:
        try:
            self._fh.write(text)
            self._fh.flush()
        except OSError as exc:  # a full disk: the rows before stay
            if exc.errno == errno.EPIPE:  # `| head` closed stdout: click ends quietly
                raise
            self._failed = True
            where = "to stdout" if self.name == "-" else self.name
            raise ManifestError(f"cannot write the manifest {where}: "
                                f"{exc.strerror or exc}; the rows before it are kept") \
                from None

    def close(self) -> None:
        if not self._owned:
            return
        try:
            self._fh.flush()
            if stat.S_ISREG(os.fstat(self._fh.fileno()).st_mode):  # not /dev/null, a pipe
                os.fsync(self._fh.fileno())
        except OSError as exc:
            if not self._failed:  # else write_rows has said so already
                self._failed = True
                raise ManifestError(f"cannot write the manifest {self.name}: "
                                    f"{exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):  # a buffer that could not be written
                self._fh.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record_ends(data: bytes) -> list[int]:
    """Offsets just past each whole CSV record. A record ends at a newline outside
    quotes (a quoted file name may itself hold a newline)."""
    ends, pos = [], 0
    open_quote = False
    for line in data.split(b"\n")[:-1]:
        pos += len(line) + 1
        open_quote ^= bool(line.count(b'"') & 1)
        if not open_quote:
            ends.append(pos)
    return ends


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _field(record: bytes, index: int) -> str | None:
    row = next(csv.reader(io.StringIO(_text(record), newline="")), [])
    return row[index] if index < len(row) else None


def _records(data: bytes, columns: Sequence[str]) -> list[tuple[int, int, dict[str, str]]]:
    """(start, end, row) of each record after the header; blank lines have no row."""
    ends = _record_ends(data)
    out = []
    for start, end in itertools.pairwise(ends):
        cells = next(csv.reader(io.StringIO(_text(data[start:end]), newline="")), [])
        if cells:
            out.append((start, end, dict(zip(columns, cells, strict=False))))  # torn: short
    return out


def _read_done(path: str, columns: Sequence[str], key: str, multi_row: bool,
               check: Callable[[list[dict[str, str]]], None] | None = None,
               redo: Callable[[dict[str, str]], bool] | None = None,
               mine: Callable[[str], bool] | None = None) -> list[dict[str, str]]:
    header = (",".join(columns) + "\n").encode()
    with open(path, "rb+") as fh:
        data = fh.read()
        ends = _record_ends(data)
        if not (data[:len(header)] == header if ends else header.startswith(data)):
            first = _text(data.split(b"\n", 1)[0])[:200]
            raise ManifestError(f"{path}: not a manifest with the columns {','.join(columns)} "
                                f"(it starts {first!r}); cannot resume into it")
        cut = ends[-1] if ends else 0  # drop a row cut by a kill (or a torn header)
        index = list(columns).index(key)
        last = _field(data[ends[-2]:ends[-1]], index) if len(ends) > 1 else None
        # and the last input's rows, maybe too few, if this run does that input again
        if multi_row and last is not None and (mine is None or mine(last)):
            first_row = len(ends) - 1
            while first_row > 1 and _field(data[ends[first_row - 2]:ends[first_row - 1]],
                                           index) == last:
                first_row -= 1
            cut = ends[first_row - 1]
        if cut != len(data):
            fh.truncate(cut)
            data = data[:cut]
    records = _records(data, columns)
    if check:  # a refused resume changes nothing more
        check([row for _, _, row in records])
    redone = [bool(redo and redo(row)) for _, _, row in records]
    if any(redone):
        # Those inputs are done again, so their rows go: every input keeps exactly one.
        records = [rec for rec, again in zip(records, redone, strict=True) if not again]
        try:
            _replace(path, data[:ends[0]] + b"".join(data[a:b] for a, b, _ in records))
        except OSError as exc:
            raise ManifestError(f"cannot rewrite {path} to do its {sum(redone)} failed "
                                f"inputs again: {exc.strerror or exc}") from None
    return [row for _, _, row in records]


def _replace(path: str, data: bytes) -> None:
    """Rewrite the file itself (through a link) whole or not at all, keeping its owner
    and mode."""
    from fiqa_gate.assets import atomic_write

    real = Path(os.path.realpath(path))
    links = real.stat().st_nlink
    if links > 1:
        log.warning("%s has %d names; the others keep the rows this run redoes", real, links)
    atomic_write(real, lambda fh: fh.write(data))


def open_manifest(path: str, columns: Sequence[str], resume: bool = False,
                  key: str = "path", multi_row: bool = False,
                  check: Callable[[list[dict[str, str]]], None] | None = None,
                  redo: Callable[[dict[str, str]], bool] | None = None,
                  mine: Callable[[str], bool] | None = None) -> Manifest:
    """Open `path` ("-" = stdout) for writing rows; with `resume`, continue an old run.

    `multi_row`: an input may have several rows (see the module docstring).
    `check`: called with the rows done before; it may refuse the resume (raise).
    `redo`: rows of inputs a resumed run does again (their rows are removed first).
    `mine`: whether an input is one of this run's (default: all are); with `multi_row`,
    the last input's rows are dropped to be done again only if it is.
    """
    if path == "-":
        if resume:
            raise ManifestError("--resume continues a manifest file: give it with -o FILE")
        if sys.stdout is None:  # started with `>&-`
            raise ManifestError("stdout is closed: write the rows to a file with -o FILE")
        manifest = Manifest(sys.stdout, columns, owned=False)
        manifest.write_text(",".join(columns) + "\n")
        return manifest
    done: list[dict[str, str]] = []
    fh = None
    try:
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except FileNotFoundError:
            regular = None
        if resume and regular is False:  # checked before opening: a FIFO would block
            raise ManifestError(f"--resume continues a manifest file; {path} is not one")
        # The file itself, however named (/dev/stdout redirected to it, a link): a
        # rewrite renames a new file over that name, and the rows must go there.
        file = os.path.realpath(path) if regular else path
        # Opened without truncating and locked first: a second run on this manifest is
        # refused before it reads, cuts or rewrites the rows the first one is writing.
        fh = _open_locked(file, path)
        if resume and _size(fh) > 0:
            done = _read_done(file, columns, key, multi_row, check, redo, mine)
            if _replaced(fh, file):  # rewritten (failed rows dropped): lock the new file
                fh.close()
                fh = _open_locked(file, path)
        if not (resume and _size(fh) > 0):  # new, or only a torn header was there
            # stdout's own file (`-o /dev/stdout >> all.csv`): the shell chose to append
            if _is_file(fh) and not _is_stdout(fh):
                _check_overwrite(file, path, columns)
                fh.truncate(0)
            fh.write(",".join(columns) + "\n")
            fh.flush()
    except BaseException as exc:
        if fh is not None:
            fh.close()
        if isinstance(exc, OSError):  # a folder, a missing parent, no permission
            raise ManifestError(f"cannot write the manifest {path}: "
                                f"{exc.strerror or exc}") from None
        raise
    return Manifest(fh, columns, owned=True, name=path, done_rows=done, key=key)


def _check_overwrite(file: str, shown: str, columns: Sequence[str]) -> None:
    """Refuse to empty a file that is not a fiqa-gate manifest: `-o` naming a picture, a
    gallery's database or a user's own CSV (`path,label`) would lose it."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:  # write-only: what it holds cannot be checked
        raise ManifestError(f"{shown} exists and cannot be read ({exc.strerror or exc}) to "
                            "check that it is a manifest before emptying it; remove it or "
                            "give -o another file") from None
    own = [(",".join(columns) + "\n").encode(), *_HEADERS]
    if any(head.startswith(h) or h.startswith(head) for h in own):  # (a torn header too)
        return
    first = _text(head.split(b"\n", 1)[0])
    raise ManifestError(f"{shown} exists and is not a fiqa-gate manifest (it starts "
                        f"{first[:60]!r}); it is not overwritten: remove it or give -o "
                        "another file")


def _open_locked(path: str, shown: str) -> IO[str]:
    fh = open(path, "a", newline="", encoding="utf-8", errors="surrogateescape")
    if not _is_file(fh):  # a pipe, /dev/null: nothing to guard
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ManifestError(f"{shown} is being written by another fiqa-gate run; wait for it "
                            "to finish (then --resume), or write another manifest") from None
    except OSError:  # a file system without locks: go on unguarded
        log.debug("%s: cannot be locked", path, exc_info=True)
    if _replaced(fh, path):  # renamed over between open and lock: lock the new file
        fh.close()
        return _open_locked(path, shown)
    return fh


def _is_stdout(fh: IO[str]) -> bool:
    """Whether `fh` is the file this process's stdout writes to."""
    try:
        out = os.fstat(1)
    except OSError:
        return False
    mine = os.fstat(fh.fileno())
    return (out.st_dev, out.st_ino) == (mine.st_dev, mine.st_ino)


def _is_file(fh: IO[str]) -> bool:
    return stat.S_ISREG(os.fstat(fh.fileno()).st_mode)


def _size(fh: IO[str]) -> int:
    return os.fstat(fh.fileno()).st_size


def _replaced(fh: IO[str], path: str) -> bool:
    """Whether `path` now names another file than the one `fh` holds."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fh.fileno())
    return (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino)
