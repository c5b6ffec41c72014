"""A FAISS gallery of enrolled faces, with identity metadata in SQLite.

Layout of a gallery folder:
    meta.sqlite          faces (identity, source, score, embedding) and gallery info
    index.<gen>.faiss    the FAISS index for generation <gen> of the database
    lock                 writers hold an exclusive flock on it

SQLite is the source of truth: every enrollment is one transaction that also bumps the
generation. The index is derived data, written to a temporary file and renamed into
place after the commit; a reader that finds no index for the current generation (a
writer was killed between commit and rename) rebuilds it from the database. So a kill at
any moment leaves a gallery whose index and metadata agree once opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fiqa_gate.errors import GalleryError

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS faces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identity TEXT NOT NULL,
    source TEXT NOT NULL,
    score REAL,
    added REAL NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS faces_identity ON faces(identity);
"""


@dataclass
class Hit:
    identity: str
    similarity: float
    face_id: int
    source: str
    match: bool


@dataclass
class Enrollment:
    identity: str
    embedding: np.ndarray
    source: str
    score: float | None = None


class Gallery:
    def __init__(self, path: str | os.PathLike[str], db: sqlite3.Connection):
        self.path = Path(path)
        self._db = db
        info = dict(db.execute("SELECT key, value FROM info").fetchall())
        try:
            self.recognizer = info["recognizer"]
            self.dim = int(info["dim"])
            self.threshold = float(info["threshold"])
            self.factory = info["factory"]
        except KeyError as exc:
            raise GalleryError(f"{path}: not a fiqa-gate gallery (missing {exc})") from None
        self._index = None
        self._index_gen = -1

    # -- opening --------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(path / "meta.sqlite", timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            return db
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"{path}: gallery database is corrupt or unreadable: {exc}") \
                from None

    @classmethod
    def create(cls, path: str | os.PathLike[str], recognizer: str, dim: int, threshold: float,
               factory: str = "Flat") -> Gallery:
        """Open the gallery at `path`, creating it for `recognizer` if it does not exist."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        _check_factory(factory, dim)
        with _locked(p):
            db = cls._connect(p)
            db.execute("BEGIN IMMEDIATE")
            for key, value in (("recognizer", recognizer), ("dim", str(dim)),
                               ("threshold", repr(float(threshold))), ("factory", factory),
                               ("generation", "0")):
                db.execute("INSERT OR IGNORE INTO info VALUES (?, ?)", (key, value))
            db.execute("COMMIT")
        gallery = cls(p, db)
        if gallery.recognizer != recognizer:
            raise GalleryError(f"{p}: gallery was built with recognizer {gallery.recognizer!r}, "
                               f"not {recognizer!r}; use a new gallery path")
        return gallery

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Gallery:
        p = Path(path)
        if not (p / "meta.sqlite").is_file():
            raise GalleryError(f"{p}: no gallery here (enroll first: fiqa-gate enroll DIR "
                               f"--index {p})")
        return cls(p, cls._connect(p))

    def close(self) -> None:
        self._db.close()

    # -- reading ------------------------------------------------------------------
    def generation(self) -> int:
        row = self._db.execute("SELECT value FROM info WHERE key='generation'").fetchone()
        return int(row[0])

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM faces").fetchone()[0])

    def identities(self) -> dict[str, int]:
        return dict(self._db.execute(
            "SELECT identity, COUNT(*) FROM faces GROUP BY identity ORDER BY identity"))

    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._db.execute("SELECT id, embedding FROM faces ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        embs = (np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
                if rows else np.zeros((0, self.dim), np.float32))
        return ids, embs

    def _build_index(self, ids: np.ndarray, embs: np.ndarray):
        import faiss

        base = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        if not base.is_trained:
            if len(embs) < 1:
                return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            base.train(embs)
        index = faiss.IndexIDMap2(base)
        if len(ids):
            index.add_with_ids(embs, ids)
        return index

    def index(self):
        """The FAISS index for the current generation: loaded, or rebuilt if missing."""
        import faiss

        gen = self.generation()
        if self._index is not None and self._index_gen == gen:
            return self._index
        path = self.path / f"index.{gen}.faiss"
        index = None
        if path.is_file():
            try:
                index = faiss.read_index(str(path))
            except RuntimeError:
                index = None  # damaged derived file: rebuild from the database below
            if index is not None and index.ntotal != len(self):
                index = None
        if index is None:
            index = self._build_index(*self._all())
        self._index, self._index_gen = index, gen
        return index

    def search(self, embeddings: np.ndarray, recognizer: str, k: int = 5) -> list[list[Hit]]:
        """Top-k faces for each L2-normalised query; `match` uses the gallery's threshold."""
        if recognizer != self.recognizer:
            raise GalleryError(f"{self.path}: gallery holds {self.recognizer!r} embeddings; "
                               f"it cannot be searched with {recognizer!r} "
                               f"(use --recognizer {self.recognizer})")
        q = np.ascontiguousarray(np.atleast_2d(embeddings), dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise GalleryError(f"query dimension {q.shape[1]} != gallery dimension {self.dim}")
        index = self.index()
        if index.ntotal == 0:
            return [[] for _ in q]
        sims, ids = index.search(q, min(k, index.ntotal))
        meta = {}
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        for chunk in range(0, len(wanted), 500):
            part = wanted[chunk:chunk + 500]
            meta.update({r[0]: r[1:] for r in self._db.execute(
                f"SELECT id, identity, source FROM faces WHERE id IN "
                f"({','.join('?' * len(part))})", part)})
        return [[Hit(meta[int(i)][0], float(s), int(i), meta[int(i)][1], bool(s >= self.threshold))
                 for s, i in zip(srow, irow, strict=True) if i >= 0 and int(i) in meta]
                for srow, irow in zip(sims, ids, strict=True)]

    # -- writing ------------------------------------------------------------------
    def enroll(self, items: Sequence[Enrollment]) -> list[int]:
        """Add faces in one transaction; returns their face ids."""
        if not items:
            return []
        for item in items:
            if item.embedding.shape != (self.dim,):
                raise GalleryError(f"embedding of {item.source} has shape "
                                   f"{item.embedding.shape}, gallery expects ({self.dim},)")
        with _locked(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [self._db.execute(
                    "INSERT INTO faces (identity, source, score, added, embedding) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (it.identity, it.source, it.score, time.time(),
                     np.asarray(it.embedding, np.float32).tobytes())).lastrowid
                    for it in items]
                self._bump_generation()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._write_index()
        return [int(i) for i in ids]

    def remove_identity(self, identity: str) -> int:
        with _locked(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            n = self._db.execute("DELETE FROM faces WHERE identity = ?", (identity,)).rowcount
            self._bump_generation()
            self._db.execute("COMMIT")
            self._write_index()
        return int(n)

    def _bump_generation(self) -> None:
        self._db.execute("UPDATE info SET value = CAST(value AS INTEGER) + 1 "
                         "WHERE key = 'generation'")

    def _write_index(self) -> None:
        """Called with the lock held, after a commit: persist the index atomically."""
        import faiss

        gen = self.generation()
        index = self._build_index(*self._all())
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".index.", suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(index, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path / f"index.{gen}.faiss")
        finally:
            Path(tmp).unlink(missing_ok=True)
        for old in self.path.glob("index.*.faiss"):
            if old.name != f"index.{gen}.faiss":
                old.unlink(missing_ok=True)
        self._index, self._index_gen = index, gen


def _check_factory(factory: str, dim: int) -> None:
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise GalleryError(f"invalid FAISS index factory {factory!r}: {exc}") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise writers across processes (flock is released if the process dies)."""
    with open(path / "lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
