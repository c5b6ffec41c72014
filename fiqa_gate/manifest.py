"""Append-only CSV manifests that survive a killed run.

Rows are flushed as they are written, so after SIGKILL the file holds every finished
row and at most one partial line, which `open_manifest(..., resume=True)` drops before
appending. `done` is the set of inputs already written, so a resumed run skips them.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Sequence
from typing import IO


class Manifest:
    def __init__(self, fh: IO[str], columns: Sequence[str], done: set[str], owned: bool):
        self.columns = list(columns)
        self.done = done
        self._fh = fh
        self._owned = owned

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
        self._fh.write(buf.getvalue())
        self._fh.flush()

    def close(self) -> None:
        if self._owned:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _whole_records(data: bytes) -> int:
    """Length of the longest prefix of whole CSV records. A record ends at a newline
    outside quotes (a quoted file name may itself hold a newline)."""
    end = pos = 0
    open_quote = False
    for line in data.split(b"\n")[:-1]:
        pos += len(line) + 1
        open_quote ^= bool(line.count(b'"') & 1)
        if not open_quote:
            end = pos
    return end


def _read_done(path: str, columns: Sequence[str], key: str) -> set[str]:
    with open(path, "rb+") as fh:
        data = fh.read()
        cut = _whole_records(data)
        if cut != len(data):  # a row cut by a kill
            fh.truncate(cut)
            data = data[:cut]
    if not data:
        return set()
    text = data.decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames != list(columns):
        raise ValueError(f"{path}: existing manifest has columns {reader.fieldnames}, "
                         f"expected {list(columns)}; cannot resume into it")
    return {row[key] for row in reader}


def open_manifest(path: str, columns: Sequence[str], resume: bool = False,
                  key: str = "path") -> Manifest:
    """Open `path` ("-" = stdout) for writing rows; with `resume`, continue an old run."""
    if path == "-":
        out = sys.stdout
        out.write(",".join(columns) + "\n")
        return Manifest(out, columns, set(), owned=False)
    done: set[str] = set()
    if resume and os.path.exists(path):
        done = _read_done(path, columns, key)
    if resume and os.path.exists(path) and os.path.getsize(path) > 0:
        fh = open(path, "a", newline="", encoding="utf-8", errors="surrogateescape")
    else:
        fh = open(path, "w", newline="", encoding="utf-8", errors="surrogateescape")
        fh.write(",".join(columns) + "\n")
        fh.flush()
    return Manifest(fh, columns, done, owned=True)
