"""A FAISS gallery of enrolled faces, with identity metadata in SQLite.

Layout of a gallery folder:
    meta.sqlite          faces (identity, source, score, embedding) and gallery info
    index.<gen>.faiss    the FAISS index for generation <gen> of the database
    lock                 writers hold an exclusive flock on it

SQLite is the source of truth: every enrollment is one transaction that also bumps the
generation and records the SHA-256 of the index of the new state. The index is derived
data: written to a temporary file (and synced) inside that transaction, renamed into
place after the commit. A reader uses an index file only if its digest is the recorded
one; otherwise (a writer was killed between commit and rename, the file is damaged) it
rebuilds the index from the database. So a kill at any moment leaves a gallery whose
index and metadata agree once opened, and FAISS never parses a damaged file (a corrupt
header can make it allocate all memory). A damaged database is a GalleryError.

Names that are not valid UTF-8 (undecodable file names arrive as surrogate escapes) are
stored as their raw bytes and given back unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import logging
import math
import numbers
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import numpy as np

from fiqa_gate.assets import file_mode
from fiqa_gate.errors import GalleryError

if TYPE_CHECKING:
    import faiss

log = logging.getLogger("fiqa_gate")

_P = ParamSpec("_P")
_R = TypeVar("_R")

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS faces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identity TEXT NOT NULL,
    source TEXT NOT NULL,
    score REAL,
    added REAL NOT NULL,
    embedding BLOB NOT NULL,
    fingerprint TEXT  -- the file's SHA-256 when enrolled: a changed file is enrolled again
);
CREATE INDEX IF NOT EXISTS faces_identity ON faces(identity);
"""


def _to_db(text: str) -> str | bytes:
    """SQLite text must be UTF-8: a name that is not is stored as its bytes (a BLOB)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text)
    return text


def _from_db(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _db_errors(method: Callable[Concatenate[Gallery, _P], _R]
               ) -> Callable[Concatenate[Gallery, _P], _R]:
    """SQLite errors of a gallery method become a GalleryError that names the gallery."""
    @functools.wraps(method)
    def wrapper(self: Gallery, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as exc:
            raise GalleryError(_read_only_text(self.path, exc) or _io_text(self.path, exc)
                               or f"{self.path}: gallery database error: {exc}") from exc
        except sqlite3.ProgrammingError as exc:  # the database is fine: its use is not
            if "thread" in str(exc) or "closed" in str(exc):
                raise GalleryError(f"{self.path}: a Gallery is used by the thread that "
                                   f"opened it, until close(); open one per thread ({exc})"
                                   ) from exc
            raise GalleryError(f"{self.path}: gallery database error: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"{self.path}: gallery database is corrupt or unreadable: "
                               f"{exc}") from exc
    return wrapper


@dataclass
class Hit:
    identity: str
    similarity: float
    face_id: int
    source: str
    match: bool


TWIN = 0.9999  # cosine of two embeddings of one picture (the pipeline is deterministic)


@dataclass
class Enrollment:
    identity: str
    embedding: np.ndarray
    source: str
    score: float | None = None
    fingerprint: str | None = None  # of the file's bytes, as `enroll` read them


class Gallery:
    def __init__(self, path: str | os.PathLike[str], db: sqlite3.Connection) -> None:
        self.path = Path(path)
        self._db = db
        self._index: faiss.Index | None = None
        self._index_gen = -1
        self.moved: dict[int, tuple[str, str]] = {}  # by the last enroll (see there)
        self.replaced: set[int] = set()  # faces the last enroll embedded again
        self.existing: set[int] = set()  # items the last enroll found enrolled already
        try:
            self._read_info()
        except BaseException:
            self.close()  # and its private copy, if it reads one
            raise

    @_db_errors
    def _read_info(self) -> None:
        path = self.path
        info = dict(self._db.execute("SELECT key, value FROM info").fetchall())
        try:
            self.recognizer = info["recognizer"]
            self.dim = int(info["dim"])
            self.threshold = float(info["threshold"])
            self.factory = info["factory"]
        except KeyError as exc:
            raise GalleryError(f"{path}: not a fiqa-gate gallery (missing {exc})") from None

    # -- opening --------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
        try:
            if read_only:  # WAL needs to write beside the database even to read it
                return _snapshot(path, bool(os.statvfs(path).f_flag & os.ST_RDONLY))
            db = sqlite3.connect(path / "meta.sqlite", timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")  # a removed face's embedding is erased
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(faces)")}
            if "fingerprint" not in columns:  # a gallery made before fingerprints
                try:
                    db.execute("ALTER TABLE faces ADD COLUMN fingerprint TEXT")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise
            return db
        except sqlite3.DatabaseError as exc:
            raise _unusable(path, exc) from None

    @classmethod
    def create(cls, path: str | os.PathLike[str], recognizer: str, dim: int, threshold: float,
               factory: str | None = None) -> Gallery:
        """Open the gallery at `path`, creating it for `recognizer` if it does not exist
        (with the FAISS index `factory`, Flat when None; an existing one keeps its own)."""
        if not os.fspath(path):
            raise GalleryError("the gallery path is empty; give --index a folder")
        p = Path(path)
        factory_given, factory = factory, factory or "Flat"
        _check_factory(factory, dim)  # before a folder is made for it
        try:
            if p.exists() and not p.is_dir():
                raise GalleryError(f"{p}: is a file, not a gallery folder; give --index a "
                                   "folder")
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a parent that is a file, a dangling link, no permission
            raise GalleryError(f"{p}: cannot make a gallery folder here: {exc}") from None
        try:  # before a lock file is made in a folder that is not ours
            _check_adoptable(p)
        except GalleryError:
            if not (p / "lock").exists():
                raise
            with _locked(p):  # another enroll is making the gallery: judge it when done
                _check_adoptable(p)
        with _locked(p):
            if (p / "meta.sqlite").exists() and not os.access(p / "meta.sqlite", os.W_OK):
                # said before SQLite leaves a -wal and -shm beside a file it cannot write
                raise GalleryError(f"{p}: cannot write to this gallery: its database is "
                                   "read-only; search can still read it")
            db = cls._connect(p)
            try:
                db.execute("BEGIN IMMEDIATE")
                for key, value in (("recognizer", recognizer), ("dim", str(dim)),
                                   ("threshold", repr(float(threshold))), ("factory", factory),
                                   ("generation", "0")):
                    db.execute("INSERT OR IGNORE INTO info VALUES (?, ?)", (key, value))
                db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                db.close()
                raise _unusable(p, exc) from None
        gallery = cls(p, db)
        if (gallery.recognizer, gallery.dim) != (recognizer, dim):
            gallery.close()
            raise GalleryError(f"{p}: gallery was built with recognizer {gallery.recognizer!r}"
                               f" ({gallery.dim}-D), not {recognizer!r} ({dim}-D); use a new "
                               "gallery path")
        kept = [f"{what} {now!r} (not {asked!r})" for what, now, asked in
                (("threshold", gallery.threshold, float(threshold)),
                 ("index", gallery.factory, factory_given or gallery.factory))
                if now != asked]
        if kept:
            log.warning("%s: the gallery keeps the %s it was created with", p,
                        " and ".join(kept))
        return gallery

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Gallery:
        p = Path(path)
        if not (p / "meta.sqlite").is_file():
            raise GalleryError(f"{p}: no gallery here (enroll first: fiqa-gate enroll DIR "
                               f"--index {p})")
        # A gallery on read-only media (a container image, a read-only mount), in a
        # folder this user cannot write, or in a database file this user cannot write, is
        # read as the snapshot it is (the last had left an empty -wal and -shm beside it).
        read_only = (bool(os.statvfs(p).f_flag & os.ST_RDONLY) or not os.access(p, os.W_OK)
                     or not os.access(p / "meta.sqlite", os.W_OK))
        return cls(p, cls._connect(p, read_only))

    def close(self) -> None:
        scratch = _scratch.pop(id(self._db), None)
        if scratch is not None:
            self._db.close()
            shutil.rmtree(scratch, ignore_errors=True)
            return
        # the last connection merges the log into the database as it closes: under the
        # writers' lock, so that a reader copying the gallery never sees half of it
        try:
            with _locked(self.path):
                self._db.close()
        except GalleryError:  # the lock cannot be taken here: close anyway
            self._db.close()

    # -- reading ------------------------------------------------------------------
    @_db_errors
    def generation(self) -> int:
        row = self._db.execute("SELECT value FROM info WHERE key='generation'").fetchone()
        return int(row[0])

    @_db_errors
    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM faces").fetchone()[0])

    @_db_errors
    def identities(self) -> dict[str, int]:
        return {_from_db(k): n for k, n in self._db.execute(
            "SELECT identity, COUNT(*) FROM faces GROUP BY identity ORDER BY identity")}

    @_db_errors
    def sources(self, identity: str, before: float | None = None) -> set[str]:
        """The sources already enrolled under `identity` (a re-run of `enroll` skips
        them); with `before` (a time.time()), only those enrolled before it."""
        return {_from_db(s) for (s,) in self._db.execute(
            "SELECT source FROM faces WHERE identity = ? AND added < ?",
            (_to_db(identity), math.inf if before is None else before))}

    @_db_errors
    def fingerprints(self, identity: str) -> dict[str, str | None]:
        """Each source enrolled under `identity`, with the fingerprint of the file it was
        enrolled from (None: enrolled before fingerprints were kept)."""
        return {_from_db(s): f for s, f in self._db.execute(
            "SELECT source, fingerprint FROM faces WHERE identity = ?", (_to_db(identity),))}

    @_db_errors
    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._db.execute("SELECT id, embedding FROM faces ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        embs = (np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
                if rows else np.zeros((0, self.dim), np.float32))
        return ids, embs

    def _build_index(self, ids: np.ndarray, embs: np.ndarray) -> faiss.Index:
        import faiss

        # rows stored at length 1 stay bit for bit (the index file's digest); raw ones an
        # older version stored through the Python API are scaled here, and rows it let in
        # that cannot be compared (they had blocked every write) become zeros, which match
        # nothing; kept, so the index still holds every face and its file is used on open
        norms = np.linalg.norm(embs.astype(np.float64), axis=1)
        bad = ~np.isfinite(norms) | (norms == 0)
        if bad.any():
            log.warning("%s: %d stored faces have an embedding of NaN, inf or zeros and "
                        "are never a hit (face ids %s); Gallery.remove_identity removes them "
                        "with their identity", self.path, int(bad.sum()),
                        ", ".join(map(str, ids[bad][:5])) + (", ..." if bad.sum() > 5 else ""))
            embs = embs.copy()
            embs[bad], norms[bad] = 0.0, 1.0
        off = np.abs(norms - 1) > 1e-3
        if off.any():
            embs = embs.copy()
            embs[off] = unit_rows(embs[off], "a stored embedding")
        base = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        if not base.is_trained:
            try:
                base.train(embs)
            except RuntimeError as exc:
                # Too few faces to train it (an IVF needs one per list at least): exact
                # search until the gallery is big enough; each write rebuilds the index.
                log.info("%s: %d faces are too few to train %s (%s); exact search for now",
                         self.path, len(embs), self.factory, str(exc).splitlines()[-1])
                base = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIDMap2(base)
        if len(ids):
            index.add_with_ids(embs, ids)
        return index

    @_db_errors
    def index(self) -> faiss.Index:
        """The FAISS index for the current generation: loaded if its file is the one the
        database recorded, else rebuilt from the database (a consistent snapshot)."""
        self._db.execute("BEGIN")  # one read snapshot: generation, digest and faces agree
        try:
            info = dict(self._db.execute(
                "SELECT key, value FROM info WHERE key IN ('generation', 'index_sha256')"))
            gen = int(info["generation"])
            if self._index is not None and self._index_gen == gen:
                return self._index
            index = self._load_index_file(gen, info.get("index_sha256"))
            rebuilt = index is None or index.ntotal != len(self)
            if rebuilt:
                index = self._build_index(*self._all())
        finally:
            self._db.execute("COMMIT")
        if rebuilt and len(self):
            self._save_rebuilt_index(index, gen)
        _probe_enough(index)
        self._index, self._index_gen = index, gen
        return index

    def _save_rebuilt_index(self, index: faiss.Index, gen: int) -> None:
        """Keep an index rebuilt because its file was missing or damaged (a full disk at a
        writer's rename, a file removed by hand), so that each search does not rebuild it
        again; never blocks or fails the search that found it."""
        where = f"{self.path}: index.{gen}.faiss missing or damaged; rebuilt from the database"
        if id(self._db) in _scratch:
            log.warning("%s (the gallery is read-only here, so each search rebuilds it)",
                        where)
            return
        tmp = None
        try:
            with _locked(self.path, wait=False) as got:
                if not got:  # a writer is at work, and writes a new index itself
                    return
                self._db.execute("BEGIN IMMEDIATE")
                if self.generation() != gen:  # written meanwhile
                    self._db.execute("ROLLBACK")
                    return
                tmp = self._commit_with_index(index)
                os.replace(tmp, self.path / f"index.{gen}.faiss")
                tmp = None
            log.warning("%s and saved again", where)
        except (OSError, sqlite3.Error, RuntimeError, GalleryError) as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            log.warning("%s; it could not be saved (%s), so each search rebuilds it", where,
                        exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _load_index_file(self, gen: int, digest: str | None) -> faiss.Index | None:
        import faiss

        if digest is None:
            return None
        try:
            with open(self.path / f"index.{gen}.faiss", "rb") as fh:
                actual = hashlib.sha256()
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    actual.update(chunk)
                if actual.hexdigest() != digest:
                    return None  # damaged, or not this generation's: never parse it
                fh.seek(0)  # the same open file: what was checked is what is parsed
                return faiss.read_index(faiss.PyCallbackIOReader(fh.read))
        except (OSError, RuntimeError):
            return None  # not written (writer killed after its commit), or removed since

    @_db_errors
    def check_recognizer(self, recognizer: str) -> None:
        """Refuse queries embedded by another recognizer than the gallery's."""
        if recognizer != self.recognizer:
            raise GalleryError(f"{self.path}: gallery holds {self.recognizer!r} embeddings; "
                               f"it cannot be searched with {recognizer!r} "
                               f"(use --recognizer {self.recognizer})")

    def search(self, embeddings: np.ndarray, recognizer: str, k: int = 5) -> list[list[Hit]]:
        """Top-k faces for each L2-normalised query; `match` uses the gallery's threshold."""
        self.check_recognizer(recognizer)
        q = np.atleast_2d(np.asarray(embeddings))
        if q.ndim != 2:
            raise GalleryError(f"queries are one embedding [{self.dim}] or a stack "
                               f"[N, {self.dim}], got shape {q.shape}")
        if q.shape[1] != self.dim:
            raise GalleryError(f"query dimension {q.shape[1]} != gallery dimension {self.dim}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise GalleryError(f"k must be a whole number of hits, 1 or more; got {k!r}")
        q = unit_rows(q, "a query")
        index = self.index()
        if index.ntotal == 0:
            return [[] for _ in q]
        sims, ids = index.search(q, min(int(k), index.ntotal))
        meta = {}
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        for chunk in range(0, len(wanted), 500):
            part = wanted[chunk:chunk + 500]
            meta.update({r[0]: r[1:3] for r in self._db.execute(
                f"SELECT id, identity, source, embedding FROM faces WHERE id IN "
                f"({','.join('?' * len(part))})", part) if _comparable(r[3])})
        return [[Hit(_from_db(meta[int(i)][0]), float(s), int(i), _from_db(meta[int(i)][1]),
                     bool(s >= self.threshold))
                 for s, i in zip(srow, irow, strict=True) if i >= 0 and int(i) in meta]
                for srow, irow in zip(sims, ids, strict=True)]

    # -- writing ------------------------------------------------------------------
    @_db_errors
    def enroll(self, items: Sequence[Enrollment], recognizer: str | None = None,
               gone: Callable[[str], bool] | None = None) -> list[int]:
        """Add faces in one transaction; returns their face ids. A face whose source is
        enrolled under its identity already keeps its id (enrolling is idempotent).
        Embeddings are stored L2-normalised (search is by cosine similarity); `recognizer`,
        when given, must be the gallery's, as in `search`.

        With `gone`: an item whose embedding is the same (cosine >= TWIN) as that of a face
        whose stored source `gone` says no longer exists is that picture moved or renamed
        (its folder too): the face keeps its id and takes the item's identity and source,
        instead of a second face of one picture. `self.moved` maps each such id to its
        former (identity, source).

        An item whose source is enrolled under its identity with another fingerprint (the
        file changed since) replaces that face's embedding and keeps its id; those ids
        are in `self.replaced`."""
        self.moved, self.replaced, self.existing = {}, set(), set()
        if not items:
            return []
        moved: dict[int, tuple[str, str]] = {}
        if recognizer is not None:
            self.check_recognizer(recognizer)
        vectors = []
        for item in items:
            if np.shape(item.embedding) != (self.dim,):
                raise GalleryError(f"embedding of {item.source} has shape "
                                   f"{np.shape(item.embedding)}, gallery expects ({self.dim},)")
            vectors.append(unit_rows(np.asarray(item.embedding)[None],
                                     f"embedding of {item.source}")[0])
        twins = self._twins(np.stack(vectors)) if gone is not None else [[] for _ in items]
        replaced: set[int] = set()
        existing: set[int] = set()
        with self._write_transaction():
            ids = []
            for it, vector, candidates in zip(items, vectors, twins, strict=True):
                key = (_to_db(it.identity), _to_db(it.source))
                score = None if it.score is None else float(it.score)
                # Under the lock: a writer that ran meanwhile may have enrolled it already.
                row = self._db.execute("SELECT id, fingerprint FROM faces WHERE identity = ? "
                                       "AND source = ?", key).fetchone()
                if row is not None and None not in (row[1], it.fingerprint) \
                        and row[1] != it.fingerprint:
                    self._db.execute("UPDATE faces SET score = ?, added = ?, embedding = ?, "
                                     "fingerprint = ? WHERE id = ?",
                                     (score, time.time(), vector.tobytes(), it.fingerprint,
                                      row[0]))
                    replaced.add(int(row[0]))
                elif row is not None:  # e.g. by another run since this one looked
                    existing.add(int(row[0]))
                if row is None and gone is not None:
                    row = self._move(candidates, key, gone, moved)
                    if row is not None and it.fingerprint is not None:
                        self._db.execute("UPDATE faces SET fingerprint = ? WHERE id = ?",
                                         (it.fingerprint, row[0]))
                ids.append(row[0] if row else self._db.execute(
                    "INSERT INTO faces (identity, source, score, added, embedding, fingerprint) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (*key, score, time.time(), vector.tobytes(), it.fingerprint)).lastrowid)
        self.moved, self.replaced, self.existing = moved, replaced, existing  # committed
        return [int(i) for i in ids]

    def _twins(self, vectors: np.ndarray) -> list[list[int]]:
        """For each unit vector, the ids of faces with the same embedding."""
        index = self.index()
        if index.ntotal == 0:
            return [[] for _ in vectors]
        sims, ids = index.search(vectors, min(4, index.ntotal))
        return [[int(i) for s, i in zip(srow, irow, strict=True) if i >= 0 and s >= TWIN]
                for srow, irow in zip(sims, ids, strict=True)]

    def _move(self, candidates: list[int], key: tuple[str | bytes, str | bytes],
              gone: Callable[[str], bool], moved: dict[int, tuple[str, str]]
              ) -> tuple[int] | None:
        """Give the first face among `candidates` whose picture is gone the new key."""
        for face_id in candidates:
            if face_id in moved:  # two copies of one moved picture: one face each
                continue
            row = self._db.execute("SELECT identity, source FROM faces WHERE id = ?",
                                   (face_id,)).fetchone()
            if row is None or not gone(_from_db(row[1])):
                continue
            # enrolled anew at its new place: a run that listed its folder before the
            # move must not take it as stale (`remove_sources(..., before=)`)
            self._db.execute("UPDATE faces SET identity = ?, source = ?, added = ? "
                             "WHERE id = ?", (*key, time.time(), face_id))
            moved[face_id] = (_from_db(row[0]), _from_db(row[1]))
            return (face_id,)
        return None

    @_db_errors
    def remove_identity(self, identity: str) -> int:
        return self.remove_identities([identity])

    @_db_errors
    def remove_identities(self, identities: Iterable[str]) -> int:
        """Remove every face of these identities in one transaction; returns how many."""
        with self._write_transaction():
            n = sum(self._db.execute("DELETE FROM faces WHERE identity = ?",
                                     (_to_db(identity),)).rowcount
                    for identity in dict.fromkeys(identities))
        return int(n)

    @_db_errors
    def erase_log(self) -> bool:
        """Merge the write-ahead log into the database and empty it, so what was removed
        is gone from the gallery's files; False while another process still reads an
        older state (its pages stay in the log until it closes)."""
        busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy

    @_db_errors
    def remove_sources(self, pairs: Iterable[tuple[str, str]],
                       before: float | None = None) -> int:
        """Remove the faces enrolled from these (identity, source) pairs in one
        transaction; returns how many were removed. With `before` (a time.time()), a face
        enrolled since (by another run, from a picture that was looked at earlier) stays."""
        keys = [(_to_db(identity), _to_db(source)) for identity, source in pairs]
        if not keys:
            return 0
        limit = math.inf if before is None else before
        with self._write_transaction():
            n = sum(self._db.execute(
                "DELETE FROM faces WHERE identity = ? AND source = ? AND added < ?",
                (*key, limit)).rowcount for key in keys)
        return int(n)

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[None]:
        """Lock; run the body's writes in one transaction that also bumps the generation,
        writes the new index to a temporary file and records its digest; commit; rename
        the index into place."""
        if id(self._db) in _scratch:  # opened as a read-only snapshot: writes would vanish
            raise GalleryError(f"{self.path}: cannot write to this gallery (read-only media "
                               "or no write permission on its folder)")
        with _locked(self.path):
            for stale in self.path.glob(".index.*.tmp"):  # left by a writer that was killed
                stale.unlink(missing_ok=True)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("UPDATE info SET value = CAST(value AS INTEGER) + 1 "
                                 "WHERE key = 'generation'")
                gen = self.generation()
                index = self._build_index(*self._all())
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            tmp = self._commit_with_index(index)
            _probe_enough(index)
            self._index, self._index_gen = index, gen
            try:  # committed: from here on only derived data, which readers can rebuild
                os.replace(tmp, self.path / f"index.{gen}.faiss")
                for old in self.path.glob("index.*.faiss"):
                    if _GENERATION.fullmatch(old.name) and old.name != f"index.{gen}.faiss":
                        old.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("%s: index file not updated (%s); readers rebuild it", self.path,
                            exc)

    def _commit_with_index(self, index: faiss.Index) -> str:
        """In the open transaction: write `index` to a temporary file, record its digest
        and commit; the file, to be renamed into place. Rolled back on any failure."""
        tmp = None
        try:
            tmp, digest = self._write_temporary_index(index)
            self._db.execute("INSERT OR REPLACE INTO info VALUES ('index_sha256', ?)",
                             (digest,))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def _write_temporary_index(self, index: faiss.Index) -> tuple[str, str]:
        """Write `index` to a synced temporary file in the gallery; (its path, SHA-256)."""
        import faiss

        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".index.", suffix=".tmp")
        digest = hashlib.sha256()
        try:
            os.fchmod(fd, file_mode(None))  # a new generation's file, as the database
            with os.fdopen(fd, "wb") as fh:
                def write(chunk: bytes) -> None:
                    fh.write(chunk)
                    digest.update(chunk)

                writer = faiss.PyCallbackIOWriter(write)
                faiss.write_index(index, writer)
                del writer  # flushed
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest()


_GENERATION = re.compile(r"index\.[0-9]+\.faiss")  # only the index files a gallery writes
_OWN = {"lock", "meta.sqlite", "meta.sqlite-wal", "meta.sqlite-shm", "meta.sqlite-journal"}


def _read_only_text(path: Path, exc: sqlite3.DatabaseError) -> str | None:
    """The message for a database this user cannot write (not a damaged one), or None."""
    if "readonly" not in str(exc) and "read-only" not in str(exc):
        return None
    return (f"{path}: cannot write to this gallery: its database or folder is read-only "
            f"({exc}); search can still read it")


def _unusable(path: Path, exc: sqlite3.DatabaseError) -> GalleryError:
    return GalleryError(_read_only_text(path, exc) or _io_text(path, exc)
                        or f"{path}: gallery database is corrupt or unreadable: {exc}")


def _io_text(path: Path, exc: sqlite3.DatabaseError) -> str | None:
    """The message for a write the system refused (not a damaged database), or None:
    a file-size limit had read 'corrupt or unreadable: disk I/O error'."""
    if "disk I/O error" not in str(exc) and "disk is full" not in str(exc):
        return None
    return (f"{path}: the gallery database could not be written ({exc}): a full disk, a "
            "file-size limit (ulimit -f) or a failing drive; what was committed before is "
            "kept")


def is_gallery_listing(filenames: Iterable[str]) -> bool:
    """Whether a folder's files are a gallery's: its database beside its lock or an index
    generation (a folder `iter_files` does not read as pictures)."""
    names = set(filenames)
    return "meta.sqlite" in names and ("lock" in names or any(
        _GENERATION.fullmatch(n) for n in names))


def _check_adoptable(path: Path) -> None:
    """Refuse a folder that holds files but no gallery database (or an empty one):
    enrolling there would start an empty gallery over an index whose metadata is lost,
    or mix a gallery into a user's folder and later delete index files it never wrote."""
    db = path / "meta.sqlite"
    try:
        if db.is_file() and db.stat().st_size > 0:
            return
        others = sorted(e.name for e in os.scandir(path)
                        if e.name not in _OWN and not e.name.startswith("."))  # .DS_Store
    except OSError as exc:
        raise GalleryError(f"{path}: cannot look into the gallery folder: {exc}") from None
    if not others:
        return  # a new folder, or one a killed enrollment left before its first commit
    state = "empty" if db.is_file() else "missing"
    if any(_GENERATION.fullmatch(n) for n in others):
        raise GalleryError(f"{path}: holds a gallery index but its database meta.sqlite is "
                           f"{state}, so which face is whose is lost; nothing was changed. "
                           "Restore meta.sqlite from a backup, or enroll into a new folder")
    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    raise GalleryError(f"{path}: the folder holds other files ({shown}) and no gallery "
                       f"(meta.sqlite {state}); nothing was changed. Give --index a new or "
                       "empty folder")


def unit_rows(vectors: np.ndarray, what: str) -> np.ndarray:
    """Rows scaled to length 1, as float32: the index's inner product is then the cosine
    similarity its threshold is set for (a raw embedding of norm 10 had "matched" strangers
    at similarity 2.4). No length, NaN or inf cannot be compared."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if not (np.isfinite(norms).all() and (norms > 0).all()):
        raise GalleryError(f"{what} holds NaN or inf, or is all zeros: it cannot be compared")
    return np.ascontiguousarray(v / norms, dtype=np.float32)


def _comparable(blob: bytes) -> bool:
    """A stored row that can be a hit: an older version let in rows of NaN or zeros,
    which the index holds as zeros; they are never returned."""
    v = np.frombuffer(blob, dtype=np.float32)
    return bool(np.isfinite(v).all() and v.any())


def _probe_enough(index: faiss.Index) -> None:
    """An IVF searches one of its lists by default (nprobe is not stored with the index),
    which misses neighbours and returns fewer than k hits in a gallery; 16 lists (all,
    when there are fewer) keeps search close to exact at a fraction of its cost."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, 16)


def _check_factory(factory: str, dim: int) -> None:
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise GalleryError(f"invalid FAISS index factory {factory!r}: {exc}") from None
    # an IDMap is built, then refuses every face the gallery adds (with no id of its own)
    if isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
        raise GalleryError(f"FAISS index factory {factory!r} cannot hold a gallery's faces: "
                           "the gallery gives each face its id itself (drop 'IDMap')")


def _snapshot(path: Path, media_read_only: bool) -> sqlite3.Connection:
    """A connection to a gallery this process cannot write. On read-only media with no
    write-ahead log to merge, the database is read as it is (SQLite's immutable mode).
    Otherwise its database and log are copied, under a shared lock that keeps writers
    out meanwhile, to a private temporary folder where SQLite can read them together
    (removed when the gallery is closed)."""
    wal = path / "meta.sqlite-wal"
    if media_read_only and not (wal.exists() and wal.stat().st_size):
        uri = f"{(path / 'meta.sqlite').resolve().as_uri()}?immutable=1"
        return sqlite3.connect(uri, uri=True, isolation_level=None)
    scratch = Path(tempfile.mkdtemp(prefix="fiqa-gallery-"))
    try:
        with _shared_lock(path):
            # the log first: if a last connection's checkpoint runs meanwhile, the
            # database copied after it holds what the log held
            for name in ("meta.sqlite-wal", "meta.sqlite"):
                if (path / name).exists():
                    shutil.copy2(path / name, scratch / name)
        db = sqlite3.connect(scratch / "meta.sqlite", isolation_level=None)
        try:
            db.execute("SELECT COUNT(*) FROM info").fetchone()  # SQLite's files, made now
        except sqlite3.Error:
            db.close()
            raise
    except (OSError, sqlite3.Error) as exc:  # a full temporary folder, say
        shutil.rmtree(scratch, ignore_errors=True)
        why = exc.strerror if isinstance(exc, OSError) else exc
        raise GalleryError(f"{path}: cannot read this gallery through a copy in "
                           f"{scratch.parent} (it cannot be written in place): {why}; "
                           "set TMPDIR to a folder with room") from None
    _scratch[id(db)] = scratch
    atexit.register(shutil.rmtree, scratch, True)  # if never closed
    return db


_scratch: dict[int, Path] = {}  # connection -> the private copy it reads


@contextlib.contextmanager
def _shared_lock(path: Path) -> Iterator[None]:
    """Readers' side of `_locked`: no writer commits while it is held."""
    try:
        fh = open(path / "lock", "rb")
    except OSError:  # no lock file: nobody has written here since it was made
        yield
        return
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        yield


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Serialise writers across processes (flock is released if the process dies).
    Yields whether the lock was taken: always when `wait`, else only if it was free."""
    try:
        fh = open(path / "lock", "a+")
    except OSError as exc:  # read-only media, no permission: before any work
        raise GalleryError(f"{path}: cannot write to this gallery: "
                           f"{exc.strerror or exc}") from None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
